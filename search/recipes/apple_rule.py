"""Mixed-bit palettization recipes: thresholds, Apple's recipe rule, size arithmetic.

Pure functions, no I/O, so the driver, the API and the tests can all use them on plain
dicts. The semantics follow Apple's ``mixed_bit_compression_pre_analysis.py``:

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

RECIPE_NBITS = (1, 2, 4, 6, 8)  # palettized depths the Neural Engine accelerates
FLOAT16_BITS = 16  # "not palettized": the layer stays in float16
ALLOWED_BITS = frozenset(RECIPE_NBITS + (FLOAT16_BITS,))


@dataclass(frozen=True)
class Recipe:
    """One mixed-bit recipe; ``bits`` covers every candidate layer (plain ``{layer: bits}``)."""

    key: str
    bits: dict[str, int]
    avg_bits: float
    size_mb: float
    threshold: float | None
    strategy: str = "apple"


# --------------------------------------------------------------------------- validation


def _check_sizes(sizes: Mapping[str, int]) -> None:
    if not sizes:
        raise ValueError("sizes is empty: no candidate layers")
    for layer, numel in sizes.items():
        if not isinstance(layer, str):
            raise ValueError(f"layer name {layer!r} is not a string")
        if isinstance(numel, bool) or not isinstance(numel, (int, np.integer)) or numel <= 0:
            raise ValueError(f"size of layer {layer!r} must be a positive integer, got {numel!r}")


def _check_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> None:
    _check_sizes(sizes)
    for layer, b in bits.items():
        if layer not in sizes:
            raise ValueError(f"layer {layer!r} in the recipe is not a candidate (not in sizes)")
        if isinstance(b, bool) or b not in ALLOWED_BITS:
            raise ValueError(f"layer {layer!r}: bits {b!r} not in {sorted(ALLOWED_BITS)}")


def _psnr(value: object, where: str) -> float:
    """A PSNR as float; NaN is an error, +inf (bit-exact) is kept as a very high value."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{where}: PSNR {value!r} is not a number")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{where}: PSNR is NaN")
    return v


# --------------------------------------------------------------------------- arithmetic


def average_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Numel-weighted mean bits per weight over all candidates (missing layers count as 16, as Apple's apply does)."""
    _check_bits(bits, sizes)
    total = sum(sizes.values())
    return sum(bits.get(layer, FLOAT16_BITS) * n for layer, n in sizes.items()) / total


def size_mb(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Compressed bytes of the candidates / 1e6: indices (numel*b/8) plus a float16 LUT of 2**b entries.

    Apple reports ``numel*b/8`` only; the LUT is added here because it is what ships.
    """
    _check_bits(bits, sizes)
    total = 0.0
    for layer, n in sizes.items():
        b = bits.get(layer, FLOAT16_BITS)
        total += n * 2 if b == FLOAT16_BITS else n * b / 8 + (2**b) * 2
    return total / 1e6


def recipe_key(avg_bits: float) -> str:
    """Apple's key: average bits per weight, 2 decimals."""
    return f"recipe_{avg_bits:.2f}_bit_mixedpalette"


def make_recipe(
    bits: Mapping[str, int],
    sizes: Mapping[str, int],
    threshold: float | None = None,
    strategy: str = "apple",
) -> Recipe:
    """Build a Recipe over every candidate (layers absent from ``bits`` become 16)."""
    _check_bits(bits, sizes)
    full = {layer: int(bits.get(layer, FLOAT16_BITS)) for layer in sizes}
    avg = average_bits(full, sizes)
    return Recipe(recipe_key(avg), full, avg, size_mb(full, sizes), threshold, strategy)


# --------------------------------------------------------------------------- Apple's search


def cumulative_order(isolated: Mapping[str, float]) -> list[str]:
    """Layers by descending isolated PSNR (least harmful first), ties broken by name.

    Apple sorts by ``-sum(psnrs)`` with dict order as the tie-break; a name tie-break
    makes the order reproducible whatever order the measurements arrived in.
    """
    if not isolated:
        raise ValueError("isolated is empty: no single-layer measurements")
    scored = [(-_psnr(v, f"isolated[{k!r}]"), k) for k, v in isolated.items()]
    return [k for _, k in sorted(scored)]


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


def _check_cumulative(
    cumulative: Mapping[int, Mapping[str, float]], sizes: Mapping[str, int]
) -> dict[int, dict[str, float]]:
    if not cumulative:
        raise ValueError("cumulative is empty: no bit depth measured")
    clean: dict[int, dict[str, float]] = {}
    for b, per_layer in cumulative.items():
        if isinstance(b, bool) or b not in RECIPE_NBITS:
            raise ValueError(f"bit depth {b!r} not in {RECIPE_NBITS}")
        clean[int(b)] = {}
        for layer, v in per_layer.items():
            if layer not in sizes:
                raise ValueError(f"cumulative[{b}] has layer {layer!r} that is not in sizes")
            clean[int(b)][layer] = _psnr(v, f"cumulative[{b}][{layer!r}]")
    if not any(clean.values()):
        raise ValueError("cumulative has no measurements")
    return dict(sorted(clean.items()))


def apple_recipes(
    cumulative: Mapping[int, Mapping[str, float]],
    sizes: Mapping[str, int],
    thresholds: Sequence[float],
) -> list[Recipe]:
    """One recipe per threshold (in the order given) by Apple's rule.

    ``cumulative[b][layer]`` is the mean PSNR after palettizing, at ``b`` bits, every layer
    up to and including ``layer`` in that depth's cumulative order. A layer gets the lowest
    ``b`` with ``cumulative[b][layer] > threshold``; layers with no such depth (or not
    measured at any depth) stay at 16. Depths may be a subset of RECIPE_NBITS.

    Duplicates: a threshold whose bit map equals an earlier one is dropped. Distinct maps
    whose keys round to the same 2-decimal average keep the recipe from the *higher*
    threshold (it is pointwise >= in bits, so expected better PSNR for < 0.01 bit/weight
    more), in the position of the first; the other is dropped, never overwritten silently.
    """
    _check_sizes(sizes)
    depths = _check_cumulative(cumulative, sizes)
    ts = [_psnr(t, "threshold") for t in thresholds]
    if not ts:
        raise ValueError("thresholds is empty")
    if any(not math.isfinite(t) for t in ts):
        raise ValueError(f"thresholds must be finite, got {ts}")

    out: list[Recipe] = []
    seen_maps: set[tuple[int, ...]] = set()
    index_by_key: dict[str, int] = {}
    for t in ts:
        bits = {}
        for layer in sizes:
            bits[layer] = FLOAT16_BITS
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
        elif t > out[i].threshold:  # type: ignore[operator]
            out[i] = recipe
    return out
