"""The ``optimal`` strategy's noise model: what palettizing a set of layers does to the output.

Apple's thresholds on cumulative curves cost 2 x depths x layers pipeline runs and cannot
answer "best recipe at 4.0 bits" or "smallest recipe that keeps 70 dB". Here each layer's
palettization error is independent noise on the output; its power relative to the prompt's
peak is ``n = 10**(-psnr/10)`` from the isolated PSNR. A recipe's prediction for prompt i is
``-10*log10(floor_i + sum_l n[l, b_l, i])``, averaged over prompts like the measured PSNR.
``knapsack`` chooses recipes on this model, ``fast_plan`` decides what to measure for it;
``calibration`` corrects what it predicts with the search's own end-to-end measurements.

The evaluation floor. In float16 arithmetic (every GPU/MPS search, ``--precision float16``)
any change to a layer re-rounds everything downstream, so every isolated measurement carries
the evaluation's own noise ``f_i`` (~82 dB on the bench model, 84-86 dB on SDXL at 512 px);
summing N isolated powers would count it N times. ``f_i`` is measured by floor probes
(``floor_probe_plan``: a layer's float16 weight moved by one ulp, its lowest mantissa bit
flipped, and again by four ulps the same way: far below any palette's error but touching every
output) and taken out of each
isolated power, ``max(n - f, 0)``, before summing; it is counted once per recipe. Two
magnitudes separate the floor from the probe's own response: with the same signs, a linear
response grows exactly 16x in power from 1 to 4 ulps, a rounding floor does not, so ``f = (16 p1 - p4) / 15``. On bit-exact
float32 that is ~0 (the 1-ulp probe reads the real response, 127.8 dB on the bench model, and
the 4-ulp one 12 dB less), so nothing is taken out there; searches stored before the second
magnitude existed keep the one-magnitude estimate ``f = p1``.

Rounding. Under Apple's protocol the stored per-prompt PSNRs are rounded to 0.1 dB: a +-1.2 %
error in each noise power, independent between layers, so it shrinks relative to the sum.
The model works from the per-prompt values as stored (the unrounded ones are never kept, and
the end-to-end measurement the prediction is compared with is rounded the same way); where an
isolated power and the floor are within the rounding of each other the clamp at 0 applies.

Entries are per (layer, palette format). A format a layer cannot take (a group size that does
not divide its output channels; ``unfit``) has infinite noise, so no recipe ever picks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Iterable, Mapping, Sequence

import numpy as np

from common.formats import FLOAT16_BITS, PALETTE_NBITS, PaletteFormat, palettized_format


def check_number(v: object, where: str, allow_inf: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (Real, np.floating, np.integer)):
        raise ValueError(f"{where}: {v!r} is not a number")
    f = float(v)
    if math.isnan(f) or (math.isinf(f) and not (allow_inf and f > 0)):
        raise ValueError(f"{where}: {f} is not finite")
    return f


def check_nbits(b: object) -> PaletteFormat:
    """A palette format (int depths and spellings accepted); float16 and anything else are errors."""
    f = palettized_format(b)
    if f is None:
        raise ValueError(f"unknown bit depth {b!r}; palettized depths are {PALETTE_NBITS} (or formats such as 4g16)")
    return f


def nearest(anchors, b: PaletteFormat):
    """The anchor to predict ``b`` from: nearest in bits, ties to the higher (less saturated) one."""
    return min(anchors, key=lambda a: (abs(a.bits - b.bits), -a.bits, a != b))


FLOOR_PROBES = 8  # probes of the evaluation floor, spread over the candidates in module order
PROBE_ULPS = (1, 4)  # how far a probe moves each float16 weight (same signs): 16x apart in response power


def floor_probe_layers(layers: Sequence[str], n: int = FLOOR_PROBES) -> list[str]:
    """The layers whose floor probes are measured: ``n`` evenly spaced in module order."""
    layers = list(layers)
    if len(layers) <= n:
        return layers
    return [layers[round(i * (len(layers) - 1) / (n - 1))] for i in range(n)] if n > 1 else layers[:1]


def floor_probe_plan(layers: Sequence[str]) -> list[tuple[str, int]]:
    """(layer, ulps) of every floor probe a search measures."""
    return [(l, ulps) for l in floor_probe_layers(layers) for ulps in PROBE_ULPS]


def floor_noise(probes: Mapping[int, Iterable[Sequence[float]]] | Iterable[Sequence[float]]) -> np.ndarray:
    """Per-prompt noise power of the evaluation floor from the probes' per-prompt PSNRs.

    ``{ulps: [probe, ...]}`` with 1 and 4 ulps: ``(16 p1 - p4) / 15`` of their mean powers
    ``p1``, ``p4``, kept within ``[0, p1]``. One ulp alone (or a plain list of probes): ``p1``."""
    by_ulps = dict(probes) if isinstance(probes, Mapping) else {1: probes}
    if set(by_ulps) - set(PROBE_ULPS) or 1 not in by_ulps:
        raise ValueError(f"floor probes of {sorted(by_ulps)} ulps; need 1 (and optionally 4)")
    power = {}
    for ulps, runs in by_ulps.items():
        rows = [[check_number(p, "floor probe", True) for p in ps] for ps in runs]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("floor probes: need at least one, all with the same number of prompts")
        power[ulps] = np.mean(10.0 ** (-np.array(rows) / 10), axis=0)
    if 4 not in power:
        return power[1]
    if power[4].shape != power[1].shape:
        raise ValueError("floor probes: both magnitudes need the same number of prompts")
    return np.clip((16 * power[1] - power[4]) / 15, 0.0, power[1])


RESOLVED = 2.0  # an isolated power >= this x the floor's shows the layer's own noise (>= 3 dB above it)


def resolved(power, eval_floor) -> bool:
    """Whether an isolated measurement's mean noise power rises clearly above the evaluation floor."""
    return eval_floor is None or float(np.mean(power)) >= RESOLVED * float(np.mean(eval_floor))


def lowest(formats):
    """The noisiest of measured formats, where a prediction or the floor descent starts: fewest
    bits, then per tensor before grouped, then the smaller group size."""
    return min(formats, key=lambda f: (f.bits, f.group_size or 0))


def _noises(isolated, layers, n_prompts: int, eval_floor=None) -> dict[tuple[str, int], np.ndarray]:
    """{(layer, bits): per-prompt noise, the evaluation floor taken out}; +inf PSNR is zero noise."""
    out = {}
    for b, per in isolated.items():
        for l, ps in per.items():
            if l not in layers:
                raise ValueError(f"isolated[{b}] has layer {l!r} that is not in the table")
            if isinstance(ps, (str, bytes)) or len(ps) != n_prompts:
                raise ValueError(f"isolated[{b}][{l!r}]: expected {n_prompts} per-prompt PSNRs, got {ps!r}")
            n = 10.0 ** (-np.array([check_number(p, f"isolated[{b}][{l!r}]", True) for p in ps]) / 10)
            out[l, check_nbits(b)] = n if eval_floor is None else np.maximum(n - eval_floor, 0.0)
    return out


def _floor(original_per_prompt, layers, eval_floor=None) -> np.ndarray:
    """Noise of a recipe before any layer's: the re-run reference, or the evaluation floor."""
    if not len(layers) or not len(original_per_prompt):
        raise ValueError("need at least one layer and one prompt")
    floor = 10.0 ** (-np.array([check_number(p, "original", True) for p in original_per_prompt]) / 10)
    if eval_floor is None:
        return floor
    if np.shape(eval_floor) != floor.shape:
        raise ValueError(f"the evaluation floor has {np.size(eval_floor)} prompts, original {floor.size}")
    return np.maximum(floor, eval_floor)


@dataclass(frozen=True, eq=False)
class NoiseTable:
    """Relative noise power per (layer, bits) per prompt; ``predicted`` marks fast-mode entries."""

    layers: tuple[str, ...]
    bits: tuple[PaletteFormat, ...]
    noise: dict[PaletteFormat, np.ndarray]  # format -> (n_layers, n_prompts)
    floor: np.ndarray  # (n_prompts,): the unmodified pipeline run again, or the evaluation floor
    predicted: frozenset = field(default_factory=frozenset)  # {(layer, bits)} not measured
    eval_floor: np.ndarray | None = None  # (n_prompts,): taken out of every isolated power

    @classmethod
    def from_isolated(cls, isolated, original_per_prompt, layers, eval_floor=None, unfit=()) -> "NoiseTable":
        layers, floor = tuple(layers), _floor(original_per_prompt, layers, eval_floor)
        got = _noises(isolated, set(layers), len(floor), eval_floor)
        bits = tuple(sorted(check_nbits(b) for b in isolated))
        if not bits:
            raise ValueError("isolated is empty: no bit depth measured")
        got |= {(l, check_nbits(b)): np.full(len(floor), np.inf) for l, b in unfit}
        for b in bits:
            missing = [l for l in layers if (l, b) not in got]
            if missing:
                raise ValueError(f"isolated[{b}] misses {len(missing)} layers, e.g. {missing[0]!r}")
        return cls(layers, bits, {b: np.stack([got[l, b] for l in layers]) for b in bits}, floor,
                   eval_floor=eval_floor)

    @classmethod
    def from_anchors(cls, isolated_at_anchors, weight_mse, original_per_prompt, layers,
                     bits: Sequence[int] = PALETTE_NBITS, eval_floor=None, unfit=()) -> "NoiseTable":
        """Fast mode: ``noise(l,b) = noise(l,a) * mse(l,b) / mse(l,a)``, ``a`` the depth measured
        for that layer nearest to ``b`` (ties: the higher, less saturated one) with ``mse > 0``.
        Measured entries are used as they are; ``mse(l,b) == 0`` (exact palette) is no noise."""
        layers, floor = tuple(layers), _floor(original_per_prompt, layers, eval_floor)
        raw = _noises(isolated_at_anchors, set(layers), len(floor))
        got = {k: v if eval_floor is None else np.maximum(v - eval_floor, 0.0) for k, v in raw.items()}
        # base of a prediction: the anchor's noise above the floor; an anchor within 3 dB of the
        # floor only bounds its noise (<= raw), so half the raw power is used instead of ~0
        base = {k: v if eval_floor is None else np.maximum(v - eval_floor, v / RESOLVED) for k, v in raw.items()}
        bits = sorted({check_nbits(b) for b in bits})
        if not bits:
            raise ValueError("bits is empty")
        unfit = {(l, check_nbits(b)) for l, b in unfit}
        mse = {}
        for b in set(bits) | {a for _, a in got}:
            for l in layers:
                if (l, b) in unfit:
                    continue
                if l not in weight_mse.get(b, {}):
                    raise ValueError(f"weight_mse misses layer {l!r} at {b} bits")
                mse[l, b] = check_number(weight_mse[b][l], f"weight_mse[{b}][{l!r}]")
                if mse[l, b] < 0:
                    raise ValueError(f"weight_mse[{b}][{l!r}] is negative")
        noise, predicted = {b: np.empty((len(layers), len(floor))) for b in bits}, set()
        for i, l in enumerate(layers):
            anchors = [a for (m, a) in got if m == l and mse[l, a] > 0]
            # predict from measurements that show the layer's own noise (``fast_plan.floor_descent``);
            # if none does, from the lowest depth (the most noise over the floor)
            shown = [a for a in anchors if resolved(raw[l, a], eval_floor)]
            anchors = shown or ([lowest(anchors)] if anchors else [])
            for b in bits:
                if (l, b) in unfit:
                    noise[b][i] = np.inf
                    continue
                if (l, b) in got:
                    noise[b][i] = got[l, b]
                    continue
                predicted.add((l, b))
                if mse[l, b] > 0 and not anchors:
                    raise ValueError(f"layer {l!r}: no measured depth with weight MSE > 0 to predict {b} bits")
                a = nearest(anchors, b) if anchors else None
                noise[b][i] = base[l, a] * (mse[l, b] / mse[l, a]) if mse[l, b] > 0 else 0.0
        return cls(layers, tuple(bits), noise, floor, frozenset(predicted), eval_floor)


def psnr_of_noise(total: np.ndarray) -> np.ndarray:
    """Mean over the last axis (prompts) of -10*log10(noise); zero noise is +inf."""
    with np.errstate(divide="ignore"):
        return np.mean(-10.0 * np.log10(total), axis=-1)


def predict_psnr(table: NoiseTable, bits: Mapping[str, int]) -> float:
    """Predicted mean PSNR of a recipe; layers of the table absent from ``bits`` count as 16."""
    index, total = {l: i for i, l in enumerate(table.layers)}, table.floor.copy()
    for l, b in bits.items():
        if l not in index:
            raise ValueError(f"layer {l!r} is not in the noise table")
        if b != FLOAT16_BITS:
            if isinstance(b, bool) or b not in table.noise:
                raise ValueError(f"layer {l!r}: bits {b!r} not in the table's {table.bits} (or 16)")
            total += table.noise[b][index[l]]
    return float(psnr_of_noise(total))
