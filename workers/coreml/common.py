"""Core ML stage, shared part: reading ML programs and matching torch layers to Core ML weights.

Torch layers are matched to Core ML weights by content: the sha256 of the float16 values,
flattened in C order. A Linear weight (out, in) that a converter turned into a 1x1
convolution (out, in, 1, 1) has the same flattened bytes, and names never matter, so a
package from Apple's ``torch2coreml`` (other weight names, Linear as Conv) matches as well
as one converted here. The other stages live in ``convert`` (diffusers UNet to ML
program), ``apply`` (palettization with exact LUTs) and ``validate``.
Plain functions and frozen dataclasses; nothing here touches the database.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from common.errors import first_line

LUT_OP = "constexpr_lut_to_dense"
PALETTIZED_SUFFIX = "_palettized"  # coremltools names the op replacing const X "X_palettized"
MAX_LISTED = 8  # names listed in one-line error messages
ERROR_CHARS = 300  # at most this much of a library's error message is quoted


class CoreMLError(Exception):
    """The Core ML stage cannot go on; the message is one line naming what to fix."""


@dataclass(frozen=True)
class LayerMatch:
    """A torch layer and the Core ML const op holding the same float16 values."""

    layer: str
    const: str
    shape: tuple[int, ...]  # Core ML shape (a Linear may be (out, in, 1, 1) there)


def quiet_coremltools() -> None:
    """coremltools logs a warning per skipped op and on import; keep only errors."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def listing(names, limit: int = MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def fp16_digest(values: np.ndarray) -> str:
    """Exact content hash: sha256 of the float16 bytes, flattened in C order."""
    arr = np.ascontiguousarray(values)
    if arr.dtype != np.float16:
        raise CoreMLError(f"expected float16 values, got {arr.dtype}")
    return hashlib.sha256(arr.reshape(-1).view(np.uint8)).hexdigest()


def value_digest(values) -> str:
    """Hash of any const value (dtype and shape included): 'unchanged' means bit-identical."""
    arr = np.ascontiguousarray(np.asarray(values))
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    if arr.dtype == object:
        h.update(repr(arr.tolist()).encode())
    else:
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


def package_size(path: str | os.PathLike) -> int:
    """Bytes on disk of an .mlpackage (a directory) or a file."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# -- reading ML programs ------------------------------------------------------------------
def load_mlmodel(path: str | os.PathLike):
    """The package's MLModel without compiling it (works on Linux, where Core ML is absent)."""
    import coremltools as ct

    quiet_coremltools()
    p = Path(path)
    if not p.exists():
        raise CoreMLError(f"Core ML model {p} does not exist")
    try:
        model = ct.models.MLModel(str(p), skip_model_load=True)
    except Exception as exc:
        raise CoreMLError(f"{p} is not a readable Core ML model: {first_line(exc, ERROR_CHARS)}") from None
    if model.get_spec().WhichOneof("Type") != "mlProgram":
        raise CoreMLError(f"{p} is not an ML program (neural-network models cannot be palettized this way); "
                          "convert the UNet with convert_to='mlprogram'")
    return model


def read_program(path: str | os.PathLike):
    """The MIL program of a saved package, with every weight read (coremltools' milproto loader)."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    model = load_mlmodel(path)
    spec = model.get_spec()
    try:
        return milproto.load(spec, spec.specificationVersion, model.weights_dir)
    except Exception as exc:
        raise CoreMLError(f"cannot read the ML program of {path}: {first_line(exc, ERROR_CHARS)}") from None


def iter_ops(program) -> Iterator:
    """Every op of every function, nested blocks included."""
    def walk(block):
        for op in block.operations:
            yield op
            for inner in op.blocks:
                yield from walk(inner)

    for fn in program.functions.values():
        yield from walk(fn)


def const_value(op):
    val = op.outputs[0].val
    return getattr(val, "val", val)


def describe_program(program) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """``(consts, weights)`` by op name: the value digest of every floating-point tensor const
    (what "all other weights unchanged" compares; integer consts such as transpose
    permutations are graph parameters, which re-saving may canonicalise), and the float16
    content digest and shape of every float16 one (what layers are matched against)."""
    consts, weights = {}, {}
    for op in iter_ops(program):
        val = const_value(op) if op.op_type == "const" else None
        if not (isinstance(val, np.ndarray) and val.dtype.kind == "f" and val.ndim >= 1):
            continue
        consts[op.name] = value_digest(val)
        if val.dtype == np.float16:
            weights[op.name] = (fp16_digest(val), tuple(int(d) for d in val.shape))
    return consts, weights


# -- content matching ----------------------------------------------------------------------
def match_layers(torch_weights: Mapping[str, np.ndarray], weights: Mapping[str, tuple[str, tuple[int, ...]]],
                 where: str = "the Core ML model") -> dict[str, LayerMatch]:
    """Map every torch layer to the one Core ML const with the same float16 content.

    ``weights`` is ``describe_program``'s second map. Raises CoreMLError listing the layers
    with no match, then those with several (a duplicated weight cannot be told apart).
    Shapes need not agree: only the flattened float16 values are compared.
    """
    by_digest: dict[str, list[str]] = {}
    for name, (digest, _shape) in weights.items():
        by_digest.setdefault(digest, []).append(name)
    owners: dict[str, list[str]] = {}
    found, missing, ambiguous = {}, [], []
    for layer, weight in torch_weights.items():
        names = by_digest.get(fp16_digest(np.asarray(weight, dtype=np.float16)), [])
        if not names:
            missing.append(layer)
        elif len(names) > 1:
            ambiguous.append(f"{layer} ({listing(names, 3)})")
        else:
            found[layer] = LayerMatch(layer, names[0], weights[names[0]][1])
            owners.setdefault(names[0], []).append(layer)
    shared = [f"{listing(layers, 3)} -> {name}" for name, layers in owners.items() if len(layers) > 1]
    if missing:
        raise CoreMLError(f"{len(missing)} of {len(torch_weights)} recipe layers have no float16 weight with the "
                          f"same content in {where}: {listing(missing)}; is it a Core ML model of this UNet "
                          "(same weights, float16, not already compressed)?")
    if ambiguous or shared:
        raise CoreMLError(f"recipe layers match several Core ML weights (identical values), so they cannot be "
                          f"palettized separately: {listing(ambiguous + shared)}")
    return found

