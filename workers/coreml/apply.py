"""Palettize a Core ML UNet with exactly the LUTs and indices the search measured.

Each palettized const gets ``OpPalettizerConfig(mode="custom", lut_function=f)`` where ``f``
returns the search palette's per-tensor LUT (2^bits float16 values) and the index of every
weight (``Palette.indices``, C order), after checking it was handed the very float16 values
that palette was fitted to. Layers at 16 bits are not touched. For recipes made elsewhere
the LUTs come from ``workers.palettize.kmeans_lut`` (the same optimal k-means).

Next to every ``<key>.mlpackage`` a ``<key>.mbp.json`` manifest records what was applied
(base package, layer -> Core ML weight, bits, LUT source) so ``search validate`` can check
the package again later, on another node.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from common.errors import first_line
from common.files import atomic_write_text
from workers.coreml.common import (ERROR_CHARS, CoreMLError, LayerMatch, fp16_digest, listing, load_mlmodel,
                                  quiet_coremltools)
from workers.coreml.convert import save_package
from workers.palettize import Palette, kmeans_lut

MANIFEST_FORMAT = 1
LUT_SOURCES = ("search", "kmeans")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, eq=False)
class LayerLut:
    """What one torch layer becomes: its Core ML const, bits, LUT and per-weight indices."""

    layer: str
    const: str
    bits: int
    lut: np.ndarray  # float16, (2**bits,)
    indices: np.ndarray  # uint8, flat, C order of the weight
    weight_digest: str  # float16 content digest of the weight the indices belong to
    palette_digest: str | None  # the search palette's digest (None: k-means recomputed)


@dataclass(frozen=True)
class Manifest:
    recipe_key: str
    search_id: str
    bits: dict[str, int]  # every recipe layer, 16 included
    avg_bits: float
    lut_source: str  # "search" | "kmeans"
    model: str
    fingerprint: str
    base_mlpackage: str
    layers: dict[str, str]  # palettized torch layer -> Core ML const name
    palette_digests: dict[str, str]
    measured_psnr: float | None  # what the numeric check compares with (None: nothing measured)


def package_name(key: str) -> str:
    return _UNSAFE.sub("_", key) or "recipe"


def manifest_path(package: str | os.PathLike) -> Path:
    p = Path(package)
    return p.parent / f"{p.name.removesuffix('.mlpackage')}.mbp.json"


def torch_weights(unet, layers) -> dict[str, np.ndarray]:
    """float16 numpy weights of ``layers`` in the model being compressed (clear error if absent)."""
    import torch

    missing, out = [], {}
    for layer in layers:
        try:
            weight = unet.get_submodule(layer).weight
        except AttributeError:
            missing.append(layer)
            continue
        out[layer] = weight.detach().to("cpu", torch.float16).contiguous().numpy()
    if missing:
        raise CoreMLError(f"{len(missing)} recipe layers are not weight layers of the model being compressed: "
                          f"{listing(missing)}")
    return out


def layer_luts(weights: Mapping[str, np.ndarray], bits: Mapping[str, int], matches: Mapping[str, LayerMatch],
               palettes: Mapping[tuple[str, int], Palette] | None) -> dict[str, LayerLut]:
    """{const name: LayerLut} for every palettized layer; ``palettes=None`` recomputes k-means."""
    out, absent = {}, []
    for layer, w in weights.items():
        b = int(bits[layer])
        if palettes is None:
            lut, idx = kmeans_lut(w, b)
            digest = None
        else:
            pal = palettes.get((layer, b))
            if pal is None:
                absent.append(f"{layer}@{b}")
                continue
            lut, idx, digest = pal.lut, pal.indices(w), pal.digest
        out[matches[layer].const] = LayerLut(layer, matches[layer].const, b, np.array(lut, dtype=np.float16),
                                             np.ascontiguousarray(idx, dtype=np.uint8).reshape(-1),
                                             fp16_digest(w), digest)
    if absent:
        raise CoreMLError(f"the search has no stored palette for {len(absent)} recipe layers: {listing(absent)}")
    return out


def palettize(base: str | os.PathLike, out: str | os.PathLike, luts: Mapping[str, LayerLut]) -> None:
    """Save ``base`` with every const in ``luts`` replaced by its exact LUT (``constexpr_lut_to_dense``)."""
    import coremltools as ct

    quiet_coremltools()
    called: set[str] = set()

    def exact(entry: LayerLut):
        def lut_function(weight):
            w = np.asarray(weight)
            if w.dtype != np.float16 or w.size != entry.indices.size or fp16_digest(w) != entry.weight_digest:
                raise CoreMLError(f"Core ML weight {entry.const} is not the float16 weight of {entry.layer}")
            called.add(entry.const)
            return entry.lut.copy(), entry.indices.copy()
        return lut_function

    config = ct.optimize.coreml.OptimizationConfig(op_name_configs={
        const: ct.optimize.coreml.OpPalettizerConfig(mode="custom", lut_function=exact(entry), weight_threshold=0)
        for const, entry in luts.items()})
    try:
        model = ct.optimize.coreml.palettize_weights(load_mlmodel(base), config)
    except CoreMLError:
        raise
    except Exception as exc:
        raise CoreMLError(f"Core ML palettization failed: {first_line(exc, ERROR_CHARS)}") from None
    skipped = sorted(set(luts) - called)
    if skipped:
        raise CoreMLError(f"coremltools did not palettize {len(skipped)} weights: {listing(skipped)}")
    save_package(model, out)


def write_manifest(package: str | os.PathLike, m: Manifest) -> None:
    path = manifest_path(package)
    data = {"format": MANIFEST_FORMAT, **m.__dict__}
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def read_manifest(package: str | os.PathLike) -> Manifest:
    path = manifest_path(package)
    try:
        data = json.loads(path.read_text())
        if data.pop("format") != MANIFEST_FORMAT:
            raise ValueError("unknown format")
        m = Manifest(**data)
    except FileNotFoundError:
        raise CoreMLError(f"{path} is missing: {package} was not written by `search apply` "
                          "(or was moved without its .mbp.json)") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CoreMLError(f"unreadable manifest {path}: {first_line(exc, ERROR_CHARS)}") from None
    if m.lut_source not in LUT_SOURCES:
        raise CoreMLError(f"unreadable manifest {path}: lut_source {m.lut_source!r}")
    return m
