"""Palettize a Core ML UNet with exactly the LUTs and indices the search measured.

Each palettized const gets ``OpPalettizerConfig(mode="custom", lut_function=f)`` where ``f``
returns the search palette's per-tensor LUT (2^bits float16 values) and the index of every
weight (``Palette.indices``, C order), after checking it was handed the very float16 values
that palette was fitted to. A grouped format (``4g16``) adds ``granularity="per_grouped_channel",
group_size, channel_axis=0``: coremltools 9 (``grouped_channelwise_compress``) splits axis 0
into the groups and calls ``f`` once per group, in order, with that group's values, then
stacks the LUTs; ``f`` recognises the group by the fp16 content digest of its values and
returns that group's searched LUT and indices. Those recipes, and 3-bit ones, need an
iOS 18 / macOS 15 model (`needs_ios18`). Layers at 16 bits are not touched. For recipes made elsewhere
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
from common.formats import PaletteFormat, formats_json, recipe_formats
from workers.palette_formats import fit_palette

MANIFEST_FORMAT = 1
LUT_SOURCES = ("search", "kmeans")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, eq=False)
class LayerLut:
    """What one torch layer becomes: its Core ML const, bits, LUT and per-weight indices."""

    layer: str
    const: str
    bits: PaletteFormat
    lut: np.ndarray  # float16, (2**bits,) per tensor; (groups, 2**bits) grouped, in channel order
    indices: np.ndarray  # uint8, flat, C order of the weight
    weight_digest: str  # float16 content digest of the weight the indices belong to
    palette_digest: str | None  # the search palette's digest (None: k-means recomputed)


@dataclass(frozen=True)
class Manifest:
    recipe_key: str
    search_id: str
    bits: dict[str, PaletteFormat]  # every recipe layer, 16 included
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


def needs_ios18(bits: Mapping[str, object]) -> list[str]:
    """The formats of a recipe that Core ML has only from iOS 18 / macOS 15 on (3 bits, grouped)."""
    return sorted({str(f) for f in map(PaletteFormat.of, bits.values()) if f.needs_ios18})


def layer_luts(weights: Mapping[str, np.ndarray], bits: Mapping[str, object], matches: Mapping[str, LayerMatch],
               palettes: Mapping | None) -> dict[str, LayerLut]:
    """{const name: LayerLut} for every palettized layer; ``palettes=None`` recomputes k-means."""
    out, absent = {}, []
    for layer, w in weights.items():
        b = PaletteFormat.of(bits[layer])
        pal = fit_palette(w, b) if palettes is None else palettes.get((layer, b))
        if pal is None:
            absent.append(f"{layer}@{b}")
            continue
        lut = pal.luts if b.grouped else pal.lut
        idx, digest = pal.indices(w), None if palettes is None else pal.digest
        out[matches[layer].const] = LayerLut(layer, matches[layer].const, b, np.array(lut, dtype=np.float16),
                                             np.ascontiguousarray(idx, dtype=np.uint8).reshape(-1),
                                             fp16_digest(w), digest)
    if absent:
        raise CoreMLError(f"the search has no stored palette for {len(absent)} recipe layers: {listing(absent)}")
    return out


def palettize(base: str | os.PathLike, out: str | os.PathLike, luts: Mapping[str, LayerLut],
              weights: Mapping[str, np.ndarray]) -> None:
    """Save ``base`` with every const in ``luts`` replaced by its exact LUTs (``constexpr_lut_to_dense``);
    ``weights`` ({torch layer: float16 weight}) tell a grouped layer's channel groups apart."""
    import coremltools as ct

    quiet_coremltools()
    called: set[str] = set()

    def exact(entry: LayerLut, group_digests):
        def lut_function(weight):
            w = np.asarray(weight)
            if entry.bits.grouped:  # one call per channel group: which one is told by its content
                g = group_digests.get(fp16_digest(w)) if w.dtype == np.float16 else None
                if g is None:
                    raise CoreMLError(f"Core ML weight {entry.const}: a channel group that is not one of {entry.layer}'s")
                called.add(entry.const)
                n = entry.indices.size // len(entry.lut)
                return entry.lut[g].copy(), entry.indices[g * n:(g + 1) * n].copy()
            if w.dtype != np.float16 or w.size != entry.indices.size or fp16_digest(w) != entry.weight_digest:
                raise CoreMLError(f"Core ML weight {entry.const} is not the float16 weight of {entry.layer}")
            called.add(entry.const)
            return entry.lut.copy(), entry.indices.copy()
        return lut_function

    def op_config(entry: LayerLut, weight):
        if not entry.bits.grouped:
            return ct.optimize.coreml.OpPalettizerConfig(mode="custom", lut_function=exact(entry, None),
                                                         weight_threshold=0)
        rows = np.ascontiguousarray(weight).reshape(len(entry.lut), -1)
        return ct.optimize.coreml.OpPalettizerConfig(
            mode="custom", lut_function=exact(entry, {fp16_digest(r): g for g, r in enumerate(rows)}),
            granularity="per_grouped_channel", group_size=entry.bits.group_size, channel_axis=0, weight_threshold=0)

    config = ct.optimize.coreml.OptimizationConfig(op_name_configs={
        const: op_config(entry, weights[entry.layer]) for const, entry in luts.items()})
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
    data = {"format": MANIFEST_FORMAT, **m.__dict__, "bits": formats_json(m.bits)}
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def read_manifest(package: str | os.PathLike) -> Manifest:
    path = manifest_path(package)
    try:
        data = json.loads(path.read_text())
        if data.pop("format") != MANIFEST_FORMAT:
            raise ValueError("unknown format")
        m = Manifest(**{**data, "bits": recipe_formats(data["bits"])})
    except FileNotFoundError:
        raise CoreMLError(f"{path} is missing: {package} was not written by `search apply` "
                          "(or was moved without its .mbp.json)") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CoreMLError(f"unreadable manifest {path}: {first_line(exc, ERROR_CHARS)}") from None
    if m.lut_source not in LUT_SOURCES:
        raise CoreMLError(f"unreadable manifest {path}: lut_source {m.lut_source!r}")
    return m
