"""The search's exact LUTs and indices in Core AI's form, put into a torch denoiser for export, and
read back from a saved ``.aimodel`` with Core AI's own API.

Core AI stores a palettized weight as ``coreai.lut_to_dense(indices, lut, axis)``: ``indices``
shaped like the weight (packed to ui1/2/4/6/8 on save), ``lut`` of rank ``weight.ndim + 2``
shaped ``[G, 1, ..., 1, 2**bits, 1]``: ``G`` LUTs along the output channels, each for
``out / G`` consecutive channels. That is the search's layout exactly: one LUT per tensor
(``G = 1``) or one per ``group_size`` output channels in channel order (``4g16``), and
``Palette.indices(w)`` in C order. So the weight is put in as Core AI's own torch op
(``torch.ops.coreai.lut_to_dense``, via a parametrization of ``weight``: diffusers' code reads
``module.weight`` as always) and the converter lowers it unchanged: no re-clustering anywhere.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from common.formats import PaletteFormat
from workers.coreai import CoreAIError

LUT_OP = "coreai.lut_to_dense"
_RESOURCE_NAME = re.compile(r"dense_resource<([^>]+)>")
_RESOURCE_BLOB = re.compile(r"([A-Za-z0-9_.$-]+)\s*:\s*\"0x([0-9A-Fa-f]*)\"")


@dataclass(frozen=True, eq=False)
class CoreAILut:
    """One palettized layer: ``lut`` float16 (G, 2**bits), ``indices`` uint8 shaped like the weight."""

    layer: str
    fmt: PaletteFormat
    lut: np.ndarray
    indices: np.ndarray

    def lut_tensor(self) -> np.ndarray:
        """The LUT in Core AI's shape ``[G, 1, ..., 1, 2**bits, 1]`` (rank = weight rank + 2)."""
        g, n = self.lut.shape
        return self.lut.reshape((g,) + (1,) * (self.indices.ndim - 1) + (n, 1))

    def dense(self) -> np.ndarray:
        """lut[group of the weight, index]: the float16 weight Core AI decompresses."""
        g = self.lut.shape[0]
        rows = self.indices.reshape(g, -1).astype(np.int64)
        return np.take_along_axis(self.lut, rows, axis=1).reshape(self.indices.shape)

    def key(self) -> str:
        """Content digest of (shape, LUTs, indices): how a saved op is matched to its layer."""
        return layer_key(self.indices.shape, self.lut, self.indices)


def layer_key(shape, lut: np.ndarray, indices: np.ndarray) -> str:
    h = hashlib.sha256(repr(tuple(int(d) for d in shape)).encode())
    h.update(np.ascontiguousarray(lut, dtype=np.float16).reshape(-1).view(np.uint16).tobytes())
    h.update(np.ascontiguousarray(indices, dtype=np.uint8).reshape(-1).tobytes())
    return h.hexdigest()


def search_luts(weights: Mapping[str, np.ndarray], bits: Mapping[str, object], palettes: Mapping) -> dict[str, CoreAILut]:
    """{layer: CoreAILut} from the search's stored palettes (``{(layer, format): Palette}``) and the
    float16 weights they were fitted to; a missing palette is a one-line error."""
    out, absent = {}, []
    for layer, w in weights.items():
        fmt = PaletteFormat.of(bits[layer])
        pal = palettes.get((layer, fmt))
        if pal is None:
            absent.append(f"{layer}@{fmt}")
            continue
        lut = np.asarray(pal.luts if fmt.grouped else pal.lut, dtype=np.float16).reshape(-1, 1 << fmt.bits)
        idx = np.ascontiguousarray(pal.indices(w), dtype=np.uint8).reshape(w.shape)
        out[layer] = CoreAILut(layer, fmt, lut, idx)
    if absent:
        raise CoreAIError(f"the search has no stored palette for {len(absent)} recipe layers: {', '.join(absent[:5])}")
    return out


class _LutWeight(torch.nn.Module):
    """``weight`` as Core AI's ``lut_to_dense(indices, lut, 0)`` (the original value is ignored)."""

    def __init__(self, entry: CoreAILut):
        super().__init__()
        self.register_buffer("indices", torch.from_numpy(entry.indices.copy()))
        self.register_buffer("lut", torch.from_numpy(entry.lut_tensor().copy()))

    def forward(self, _original):
        return torch.ops.coreai.lut_to_dense(self.indices, self.lut, 0)


def put_luts(denoiser: torch.nn.Module, luts: Mapping[str, CoreAILut]) -> None:
    """Make each layer's ``weight`` Core AI's palettized form, in place (use on a copy)."""
    import coreai_torch._compression.custom_layers  # noqa: F401  registers torch.ops.coreai.lut_to_dense
    from torch.nn.utils import parametrize

    for layer, entry in luts.items():
        module = denoiser.get_submodule(layer)
        if tuple(module.weight.shape) != entry.indices.shape:
            raise CoreAIError(f"{layer}: weight {tuple(module.weight.shape)} is not the palettized one {entry.indices.shape}")
        parametrize.register_parametrization(module, "weight", _LutWeight(entry), unsafe=True)
        # the float16 original is never read again: keep nothing of it in the exported program
        module.parametrizations.weight.original = torch.nn.Parameter(torch.zeros(0, dtype=module.weight.dtype),
                                                                     requires_grad=False)


def _walk(op):
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def _unpack(blob_hex: str, nbits: int, count: int) -> np.ndarray:
    """A dense_resource blob (4-byte alignment header, then the values bit-packed LSB first, as
    ``coreai.runtime.NDArray`` unpacks sub-byte arrays) as ``count`` uint8 values."""
    data = np.frombuffer(bytes.fromhex(blob_hex)[4:], dtype=np.uint8)
    if nbits == 8:
        return data[:count].copy()
    bits = np.unpackbits(data, bitorder="little")[:count * nbits].reshape(count, nbits)
    return (bits.astype(np.uint16) << np.arange(nbits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)


def _blob(name: str, blobs: dict, asset_path) -> str:
    if name not in blobs:
        raise CoreAIError(f"{asset_path}: resource {name} of a lut_to_dense is not in the asset")
    return blobs[name]


def _dense(attr, blobs: dict, dtype, asset_path) -> np.ndarray:
    """A constant's value: inline (Core AI's attribute reader) or a dense_resource blob (large LUTs)."""
    m = _RESOURCE_NAME.search(str(attr))
    if m is None:
        return np.array(attr)
    data = bytes.fromhex(_blob(m.group(1), blobs, asset_path))[4:]
    return np.frombuffer(data, dtype=dtype).reshape(tuple(attr.type.shape))


def read_luts(asset_path) -> list[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
    """Every ``lut_to_dense`` of a saved asset as (weight shape, LUTs (G, 2**bits) float16, indices
    uint8 shaped like the weight), read with Core AI's API (``AIModelAsset.load(...).program``)."""
    from coreai.authoring import AIModelAsset

    module = AIModelAsset.load(str(asset_path)).program._module._mlir_module  # noqa: SLF001 (no public walker yet)
    text = module.operation.get_asm(large_elements_limit=None)
    blobs = dict(_RESOURCE_BLOB.findall(text.rpartition("dialect_resources:")[2]))
    found = []
    for op in _walk(module.operation):
        if op.name != LUT_OP:
            continue
        idx_attr, lut_attr = (v.owner.attributes["value"] for v in list(op.operands)[:2])
        lut = _dense(lut_attr, blobs, np.float16, asset_path)
        n = lut.shape[-2]
        shape = tuple(int(d) for d in op.results[0].type.shape)
        m = _RESOURCE_NAME.search(str(idx_attr))
        if m is not None:
            idx = _unpack(_blob(m.group(1), blobs, asset_path), int(np.log2(n)), int(np.prod(shape)))
        else:
            idx = np.array(idx_attr).astype(np.uint8)
        found.append((shape, lut.reshape(lut.shape[0], n).astype(np.float16), idx.reshape(shape)))
    return found


def compare_luts(asset_path, expected: Mapping[str, CoreAILut]) -> tuple[bool, str]:
    """Whether the asset holds exactly the expected palettized weights (LUTs and indices bit for
    bit, nothing else palettized); a one-line detail either way."""
    found = Counter(layer_key(s, l, i) for s, l, i in read_luts(asset_path))
    want = Counter(e.key() for e in expected.values())
    missing = [e.layer for e in expected.values() if found[e.key()] < want[e.key()]]
    extra = sum((found - want).values())
    if missing or extra:
        return False, (f"{len(missing)} layers without their exact LUTs and indices in the asset "
                       f"({', '.join(missing[:3])}); {extra} other lut_to_dense ops")
    depths = Counter(str(e.fmt) for e in expected.values())
    return True, (f"{len(expected)} weights are lut_to_dense with the search's LUTs and indices, bit for bit "
                  f"({', '.join(f'{n} at {b}' for b, n in sorted(depths.items()))})")
