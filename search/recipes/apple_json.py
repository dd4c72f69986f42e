"""Apple's recipe JSON: write a search report in it, read recipes back from it.

The layout mirrors ``mixed_bit_compression_pre_analysis.py`` so that Apple's apply script
and plot can read our downloads:

    {"model_version": ..., "baselines": {"original", "linear_8bit", "<recipe key>": psnr},
     "recipes": {"<recipe key>": {layer: bits}},
     "single_layer": {"<nbits>": {"metadata": {...}, layer: [psnr per prompt]}},
     "cumulative":   {"<nbits>": {"metadata": {..., "candidates": [...], "sizes": [...]},
                      layer: [psnr per prompt] in cumulative order},
     "mbp_search": {...this project's own fields...}}

Apple's sections hold only what Apple's tools read: per-tensor integer depths (1, 2, 4, 6, 8,
16). A recipe using any other format (3 bits, grouped ``4g16``) goes into
``mbp_search.format_recipes`` (its PSNR in ``mbp_search.recipe_info``), and the isolated and
cumulative measurements of those formats into ``mbp_search.format_single_layer`` /
``format_cumulative``, keyed by spelling; `parse_recipe_file` reads both sections back.

Strict JSON (no NaN/Infinity): a PSNR of +inf (bit-exact output) is written as
``JSON_INF_PSNR`` (1000 dB, above anything the PSNR formula's 1e-10 epsilon allows, ~200 dB),
-inf as ``-JSON_INF_PSNR``, NaN as null. In ``mbp_search`` non-finite floats become null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.formats import RECIPE_BITS, PaletteFormat, formats_json
from search.recipes.apple_rule import Recipe, unique_key
from workers.evaluation.protocol import LINEAR8_BASELINE, round_db

JSON_INF_PSNR = 1000.0
UNNAMED_RECIPE = "recipe"  # key given to a bare {layer: bits} map (real key needs sizes)
_APPLE_TOP_KEYS = ("model_version", "baselines", "recipes", "single_layer", "cumulative")

# What the numbers of a download mean, written into it (mbp_search.protocol).
PROTOCOL_NOTES = {
    "apple": {
        "name": "apple",
        "psnr": "compute_psnr(ref, test): 20*log10((max|test| + 1e-5) / (rms(ref - test) + 1e-10)), per prompt, "
                "rounded to 0.1 dB; a measurement is the plain mean of the rounded values",
        "original": "a fresh deep copy of the pipeline run against the reference pipeline",
        "linear_8bit": "int8 LINEAR fake quantization (0 in range, one scale per tensor) of every UNet module "
                       "with a weight",
        "recipes": "baselines[recipe key] is the recipe's mean PSNR rounded once more to 0.1 dB",
    },
    "classic": {
        "name": "classic",
        "psnr": "20*log10((max|ref| + 1e-5) / (rms(ref - test) + 1e-10)) per prompt, unrounded, averaged",
        "original": "the evaluator's reference run again",
        "linear_8bit_per_channel": "uint8 affine per output channel of every candidate layer",
        "recipes": "baselines[recipe key] is the recipe's mean PSNR",
    },
}


@dataclass(frozen=True)
class SearchReport:
    """Plain data the driver assembles from storage; partial reports are fine."""

    model_version: str
    baselines: dict[str, float]
    recipes: list[tuple[Recipe, float | None]] = field(default_factory=list)
    single_layer: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    cumulative: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    order: dict[int, list[str]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    protocol: str = "classic"  # what the PSNRs mean (workers.evaluation.protocol)


# --------------------------------------------------------------------------- writing


def json_psnr(value: float | None) -> float | None:
    """A PSNR as a strict-JSON number: ±inf -> ±JSON_INF_PSNR, NaN/None -> None."""
    if value is None:
        return None
    v = float(value)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return JSON_INF_PSNR if v > 0 else -JSON_INF_PSNR
    return v


def _json_safe(obj: Any, where: str = "mbp_search") -> Any:
    """Recursively turn ``extra`` into strict-JSON data (numpy scalars, tuples, Paths too)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return _json_safe(obj.item(), where)
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serialisable")


def _metadata(fmt, cumulative: bool) -> dict[str, Any]:
    # Apple's benchmark_signal_integrity metadata (per tensor: 1, 1); grouped formats say their group size.
    f = PaletteFormat.of(fmt)
    if f.grouped:
        return {"nbits": f.bits, "group_size": f.group_size, "cumulative": cumulative}
    return {"nbits": f.bits, "out_ngroups": 1, "in_ngroups": 1, "cumulative": cumulative}


def is_apple_recipe(bits: Mapping[str, Any]) -> bool:
    """Whether Apple's tools can read the recipe: per-tensor depths they know only."""
    return all(PaletteFormat.of(b) in RECIPE_BITS for b in bits.values())


def to_apple_json(report: SearchReport) -> dict:
    """Apple-format dict (strict-JSON safe) from a report.

    Unmeasured recipes appear in ``recipes`` but not in ``baselines`` (Apple's plot expects a
    number there). Identical recipes are written once; a different recipe whose key is taken
    is renamed by ``apple_rule.unique_key`` (as the driver names stored recipes), never overwritten.
    Cumulative entries follow ``order[b]``; its metadata lists the full order and sizes, so for a
    complete report entries align 1:1 with ``candidates`` as Apple's plot needs.
    ``mbp_search`` holds ``recipe_info`` (key -> avg_bits, size_mb, threshold, strategy, psnr)
    plus ``report.extra``, whose keys win on a clash.
    """
    apple = report.protocol == "apple"
    baselines: dict[str, float | None] = {}
    for name in ("original", LINEAR8_BASELINE[report.protocol]):
        if name in report.baselines:
            baselines[name] = json_psnr(report.baselines[name])
    for name, v in report.baselines.items():
        baselines.setdefault(name, json_psnr(v))

    recipes: dict[str, dict[str, int]] = {}
    format_recipes: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    for recipe, psnr in report.recipes:
        key = unique_key(recipe, {**recipes, **format_recipes})
        if key is None:
            continue
        if not is_apple_recipe(recipe.bits):
            format_recipes[key] = formats_json(recipe.bits)
        else:
            recipes[key] = {layer: int(PaletteFormat.of(b).bits) for layer, b in recipe.bits.items()}
        if psnr is not None and key in recipes:  # Apple's script rounds a recipe's mean PSNR once more to 0.1 dB
            baselines[key] = json_psnr(round_db(psnr) if apple and math.isfinite(psnr) else psnr)
        info[key] = {
            "avg_bits": recipe.avg_bits,
            "size_mb": recipe.size_mb,
            "threshold": json_psnr(recipe.threshold),
            "strategy": recipe.strategy,
            "psnr": json_psnr(psnr),
        }

    single_layer: dict[str, dict[str, Any]] = {}
    for b in sorted(report.single_layer, key=PaletteFormat.of):
        # Apple's final JSON has no metadata under single_layer (its sort pops it).
        entry: dict[str, Any] = {} if apple else {"metadata": _metadata(b, False)}
        for layer, psnrs in report.single_layer[b].items():
            entry[layer] = [json_psnr(p) for p in psnrs]
        single_layer[str(b)] = entry

    cumulative: dict[str, dict[str, Any]] = {}
    for b in sorted(set(report.cumulative) | set(report.order), key=PaletteFormat.of):
        measured = report.cumulative.get(b, {})
        order = list(report.order.get(b) or measured)
        in_order = set(order)
        stray = [layer for layer in measured if layer not in in_order]
        if stray:
            raise ValueError(f"cumulative[{b}] has layers outside its order: {stray[:3]}")
        missing = [layer for layer in order if layer not in report.sizes]
        if missing:
            raise ValueError(f"cumulative[{b}] order has layers without a size: {missing[:3]}")
        meta = _metadata(b, True)
        meta.update(candidates=order, sizes=[int(report.sizes[c]) for c in order])
        entry = {"metadata": meta}
        for layer in order:
            if layer in measured:
                entry[layer] = [json_psnr(p) for p in measured[layer]]
        cumulative[str(b)] = entry

    for key, shot in (report.extra.get("gallery") or {}).items():  # image PSNR/SSIM beside the latent PSNR
        if key in info:
            info[key].update(image_psnr=json_psnr(shot["image_psnr_mean"]), image_ssim=shot["image_ssim_mean"])
    mbp = {"recipe_info": info, "protocol": PROTOCOL_NOTES[report.protocol]}
    other = [k for k in {**single_layer, **cumulative} if PaletteFormat.of(k) not in RECIPE_BITS]
    if format_recipes or other:
        mbp.update(format_recipes=format_recipes,
                   format_single_layer={k: single_layer.pop(k) for k in other if k in single_layer},
                   format_cumulative={k: cumulative.pop(k) for k in other if k in cumulative})
    mbp.update(_json_safe(dict(report.extra)))
    return {
        "model_version": report.model_version,
        "baselines": baselines,
        "recipes": recipes,
        "single_layer": single_layer,
        "cumulative": cumulative,
        "mbp_search": mbp,
    }


# --------------------------------------------------------------------------- reading


class RecipeFileError(ValueError):
    """A recipe file that cannot be used; the message is one line naming the problem."""


def _load(data: Any) -> Any:
    if isinstance(data, Path):
        try:
            data = data.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeFileError(f"cannot read recipe file {str(data)!r}: {e}") from None
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise RecipeFileError("recipe file is not UTF-8 text") from None
    if isinstance(data, str):
        try:
            return json.loads(data, parse_constant=_reject_constant)
        except (json.JSONDecodeError, RecipeFileError) as e:
            raise RecipeFileError(f"recipe file is not valid JSON: {e}") from None
    return data


def _reject_constant(name: str) -> Any:
    raise RecipeFileError(f"{name} is not allowed")


def _check_recipe(key: str, recipe: Any) -> dict[str, PaletteFormat]:
    if not isinstance(recipe, Mapping):
        raise RecipeFileError(f"recipe {key!r} is not an object of {{layer: bits}}")
    if not recipe:
        raise RecipeFileError(f"recipe {key!r} is empty")
    out: dict[str, PaletteFormat] = {}
    for layer, b in recipe.items():
        if not isinstance(layer, str):
            raise RecipeFileError(f"recipe {key!r}: layer name {layer!r} is not a string")
        if isinstance(b, float) and b.is_integer():
            b = int(b)
        try:
            out[layer] = PaletteFormat.of(b)
        except (ValueError, AttributeError, TypeError):
            raise RecipeFileError(
                f"recipe {key!r}: layer {layer!r} has bits {b!r}, expected one of "
                f"{sorted(RECIPE_BITS)} or a palette format such as 3 or 4g16"
            ) from None
    return out


def parse_recipe_file(data: dict | str | bytes | Path) -> tuple[str | None, dict[str, dict[str, int]]]:
    """``(model_version or None, {key: {layer: bits}})`` from an Apple file, our download, or a bare map.

    A ``str`` is JSON text, a ``Path`` a file to read. A bare ``{layer: bits}`` map (no Apple
    top-level keys, no object values) is one recipe under ``UNNAMED_RECIPE``: its real key
    needs the model's candidate sizes, which the caller has.
    """
    obj = _load(data)
    if not isinstance(obj, Mapping):
        raise RecipeFileError(f"recipe file must be a JSON object, got {type(obj).__name__}")
    if not obj:
        raise RecipeFileError("recipe file is an empty object: no recipes")
    model_version = obj.get("model_version")
    if "recipes" in obj:
        if model_version is not None and not isinstance(model_version, str):
            raise RecipeFileError(f"model_version must be a string, got {model_version!r}")
        recipes = obj["recipes"]
        if not isinstance(recipes, Mapping):
            raise RecipeFileError("'recipes' must be an object of {key: {layer: bits}}")
        extra = obj.get("mbp_search")
        extra = extra.get("format_recipes") if isinstance(extra, Mapping) else None
        if isinstance(extra, Mapping):  # this project's mixed-format recipes (not for Apple's tools)
            recipes = {**recipes, **extra}
        if not recipes:
            raise RecipeFileError("'recipes' is empty: no recipes")
        out = {}
        for key, recipe in recipes.items():
            if not isinstance(key, str):
                raise RecipeFileError(f"recipe key {key!r} is not a string")
            out[key] = _check_recipe(key, recipe)
        return model_version, out
    if any(k in obj for k in _APPLE_TOP_KEYS) or any(
        isinstance(v, (Mapping, list)) for v in obj.values()
    ):
        raise RecipeFileError("no 'recipes' in the file (and it is not a bare {layer: bits} map)")
    return None, {UNNAMED_RECIPE: _check_recipe(UNNAMED_RECIPE, obj)}
