"""Mixed-bit palettization recipes: the Recipe record, its key, thresholds, Apple's recipe rule.

Pure functions, no I/O, so the driver, the API and the tests can all use them on plain
dicts. Bit depths and size arithmetic (``average_bits``, ``size_mb``) live in
``common.formats``, since the Core ML worker needs them too. The semantics follow Apple's ``mixed_bit_compression_pre_analysis.py``:

* thresholds are ``np.linspace(original - 1, linear_8bit + 5, n)`` (both ends included);
* for a threshold, a layer gets the lowest bit depth whose *cumulative* mean PSNR is
  strictly above the threshold, otherwise 16 (kept in float16);
* a recipe's key is ``recipe_{avg:.2f}_bit_mixedpalette`` where ``avg`` is the
  numel-weighted mean bits per weight over the candidate layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Mapping, Sequence

import numpy as np

from common.formats import (FLOAT16_BITS, RECIPE_BITS, PaletteFormat, average_bits, check_bits, check_sizes,
                            out_channels, palettized_format, size_mb)

ALLOWED_BITS = RECIPE_BITS  # the name tests/search/test_end_to_end.py imports


@dataclass(frozen=True)
class Recipe:
    """One mixed-bit recipe; ``bits`` covers every candidate layer (``{layer: format}``; a
    per-tensor format equals its int depth)."""

    key: str
    bits: dict[str, PaletteFormat]
    avg_bits: float
    size_mb: float
    threshold: float | None
    strategy: str = "apple"


# --------------------------------------------------------------------------- validation


def _psnr(value: object, where: str) -> float:
    """A PSNR as float; NaN is an error, +inf (bit-exact) is kept as a very high value."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{where}: PSNR {value!r} is not a number")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{where}: PSNR is NaN")
    return v


# --------------------------------------------------------------------------- keys and recipes


def recipe_key(avg_bits: float) -> str:
    """Apple's key: average bits per weight, 2 decimals."""
    return f"recipe_{avg_bits:.2f}_bit_mixedpalette"


def unique_key(recipe: Recipe, taken: Mapping[str, Mapping[str, int]]) -> str | None:
    """The one rule for naming a recipe among others (stored recipes, a JSON download): its
    Apple key, else ``<key>_<strategy>``, then ``<key>_<strategy>2``, 3, ...; None if the very
    same bit map is already there under some key (it is not stored or written twice)."""
    if any(bits == recipe.bits for bits in taken.values()):
        return None
    key, n = recipe.key, 2
    if key in taken:
        key = f"{recipe.key}_{recipe.strategy}"
        while key in taken:
            key, n = f"{recipe.key}_{recipe.strategy}{n}", n + 1
    return key


def make_recipe(
    bits: Mapping[str, int],
    sizes: Mapping[str, int],
    threshold: float | None = None,
    strategy: str = "apple",
) -> Recipe:
    """Build a Recipe over every candidate (layers absent from ``bits`` become 16)."""
    check_bits(bits, sizes)
    full = {layer: PaletteFormat.of(bits.get(layer, FLOAT16_BITS)) for layer in sizes}
    avg = average_bits(full, sizes)
    return Recipe(recipe_key(avg), full, avg, size_mb(full, sizes), threshold, strategy)


# --------------------------------------------------------------------------- Apple's search


def cumulative_order(isolated: Mapping[str, float], candidates: Sequence[str] | None = None) -> list[str]:
    """Layers by descending isolated PSNR (least harmful first), ties in candidate order.

    Apple sorts its single-layer dict (candidates in module order) by ``-sum(psnrs)`` with
    Python's stable sort, so equal PSNRs (common once values are rounded to 0.1 dB) keep
    module order. ``candidates`` gives that order whatever order the measurements arrived
    in (default: the dict's own order); layers not measured are left out.
    """
    if not isolated:
        raise ValueError("isolated is empty: no single-layer measurements")
    names = [c for c in candidates if c in isolated] if candidates is not None else list(isolated)
    scored = {k: -_psnr(isolated[k], f"isolated[{k!r}]") for k in names}
    return sorted(names, key=scored.__getitem__)


def thresholds(
    original: float, linear_8bit: float, n: int, cap: float | None = None
) -> list[float]:
    """``n`` PSNR thresholds from ``original - 1`` down to ``linear_8bit + 5`` (both included), descending.

    ``cap`` bounds the upper end: bit-exact float32 runs give ``original`` ~200 dB or +inf,
    which would waste most recipes on thresholds no palettized layer can reach.
    An empty or inverted range (upper <= lower) raises ValueError rather than silently
    producing ascending thresholds as Apple's linspace would: it means the baselines are
    unusable (8-bit linear within 6 dB of the reference) and the caller must choose.
    ``n == 1`` gives just the upper end (as linspace does) but the range is still checked.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of thresholds must be an integer >= 1, got {n!r}")
    original = _psnr(original, "baseline 'original'")
    linear_8bit = _psnr(linear_8bit, "baseline 'linear_8bit'")
    if not math.isfinite(linear_8bit):
        raise ValueError(f"baseline 'linear_8bit' must be finite, got {linear_8bit}")
    upper = original - 1.0
    if cap is not None:
        cap = _psnr(cap, "threshold cap")
        if not math.isfinite(cap):
            raise ValueError(f"threshold cap must be finite, got {cap}")
        upper = min(upper, cap)
    if not math.isfinite(upper):
        raise ValueError(f"baseline 'original' is {original}; pass a cap for the upper threshold")
    lower = linear_8bit + 5.0
    if upper <= lower:
        raise ValueError(
            f"empty threshold range: upper {upper:.2f} dB (original - 1 or cap) <= "
            f"lower {lower:.2f} dB (linear_8bit + 5)"
        )
    return [float(t) for t in np.linspace(upper, lower, int(n))]


def apple_thresholds(original: float, linear_8bit: float, n: int) -> list[float]:
    """Apple's thresholds exactly: ``np.linspace(original - 1, linear_8bit + 5, n)``, in that
    order, whatever the range (the Apple protocol; `thresholds` is the checked variant)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of thresholds must be an integer >= 1, got {n!r}")
    original = _psnr(original, "baseline 'original'")
    linear_8bit = _psnr(linear_8bit, "baseline 'linear_8bit'")
    if not (math.isfinite(original) and math.isfinite(linear_8bit)):
        raise ValueError(f"baselines must be finite, got original {original}, linear_8bit {linear_8bit}")
    return [float(t) for t in np.linspace(original - 1.0, linear_8bit + 5.0, int(n))]


def _check_cumulative(
    cumulative: Mapping[int, Mapping[str, float]], sizes: Mapping[str, int]
) -> dict[int, dict[str, float]]:
    if not cumulative:
        raise ValueError("cumulative is empty: no bit depth measured")
    clean: dict[PaletteFormat, dict[str, float]] = {}
    for b, per_layer in cumulative.items():
        f = palettized_format(b)
        if f is None:
            raise ValueError(f"bit depth {b!r} is not a palette format")
        clean[f] = {}
        for layer, v in per_layer.items():
            if layer not in sizes:
                raise ValueError(f"cumulative[{b}] has layer {layer!r} that is not in sizes")
            channels = out_channels(sizes, layer)
            if channels is not None and not f.fits(channels):
                raise ValueError(f"cumulative[{b}] has layer {layer!r} whose channels the group size does not divide")
            clean[f][layer] = _psnr(v, f"cumulative[{b}][{layer!r}]")
    if not any(clean.values()):
        raise ValueError("cumulative has no measurements")
    return dict(sorted(clean.items()))


def apple_recipes(
    cumulative: Mapping[int, Mapping[str, float]],
    sizes: Mapping[str, int],
    thresholds: Sequence[float],
    default_bits: int | PaletteFormat = FLOAT16_BITS,
) -> list[Recipe]:
    """One recipe per threshold (in the order given) by Apple's rule.

    ``cumulative[b][layer]`` is the mean PSNR after palettizing, at ``b`` bits, every layer
    up to and including ``layer`` in that depth's cumulative order. A layer gets the lowest
    ``b`` with ``cumulative[b][layer] > threshold``; layers with no such depth (or not
    measured at any depth) get ``default_bits`` (Apple's ``--default-nbits``, 16 unless
    given). Depths may be any palette formats: "lowest" is `PaletteFormat`'s order (fewer
    bits, then fewer LUTs); a layer a grouped format skipped has no entry in its curve.

    Duplicates: a threshold whose bit map equals an earlier one is dropped. Distinct maps
    whose keys round to the same 2-decimal average behave as in Apple's script, where the
    later recipe overwrites the earlier one under the shared key: the recipe of the *lower*
    threshold is kept, in the position of the first.
    """
    check_sizes(sizes)
    depths = _check_cumulative(cumulative, sizes)
    ts = [_psnr(t, "threshold") for t in thresholds]
    if not ts:
        raise ValueError("thresholds is empty")
    if any(not math.isfinite(t) for t in ts):
        raise ValueError(f"thresholds must be finite, got {ts}")

    default_bits = PaletteFormat.of(default_bits)
    out: list[Recipe] = []
    seen_maps: set[tuple[PaletteFormat, ...]] = set()
    index_by_key: dict[str, int] = {}
    for t in ts:
        bits = {}
        for layer in sizes:
            bits[layer] = default_bits
            for b, per_layer in depths.items():
                v = per_layer.get(layer)
                if v is not None and v > t:
                    bits[layer] = b
                    break
        signature = tuple(bits.values())
        if signature in seen_maps:
            continue
        seen_maps.add(signature)
        recipe = make_recipe(bits, sizes, threshold=t)
        i = index_by_key.get(recipe.key)
        if i is None:
            index_by_key[recipe.key] = len(out)
            out.append(recipe)
        else:
            out[i] = recipe
    return out
