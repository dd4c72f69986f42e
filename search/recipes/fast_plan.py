"""Fast mode's planning: which isolated runs to make when the other depths are predicted.

``fast_plan`` gives the first round (every layer at the anchor depths); ``floor_descent`` takes a
layer whose anchor measurement the evaluation floor hides one depth lower, until its own noise
shows; after a first recipe search on that table, ``refine_candidates`` lists the predicted
entries worth measuring because an error of ``margin_db`` in them would change a choice.

Why the descent. Under float16 arithmetic a 4-bit layer's noise can sit below the evaluation
floor (bench model: 4-bit isolated noise is ~112 dB in float32, the float16 floor 82.4 dB; SDXL's
4-bit layers measured 84-86 dB on an H200, at its floor). Such a measurement says only "at most
the floor", and predicting 1-2 bits from it by the weight-MSE ratio (x100-1000) gives every layer
the same made-up sensitivity: on the float16 bench model fast mode's one-shot recipes measured
78.7 / 70.6 / 66.0 dB at 5 / 4 / 3 bits from the 4-bit anchor, 80.2 / 78.9 / 77.5 from 1-bit
measurements (Apple's: 80.4 / 79.5 / 77.6). On bit-exact float32 nothing descends.

Why it stops short. A hidden measurement still bounds the noise, and a bound extrapolated over a
short span of weight MSE is close enough: the descent stops once every lower depth is within
``MAX_EXTRAPOLATION`` (9 dB) of the hidden depth's weight MSE, i.e. one bit (a palette's MSE
falls ~6 dB per bit). On the float16 bench model this skips the 1-bit runs of the 49 layers
still hidden at 2 bits: fast mode took 240 instead of 282 pipeline runs, and its refined recipes
measured -0.25 / -0.10 / +0.10 / -0.66 dB against Apple's at 6 / 5 / 4 / 3 bits (descending to
1 bit: -0.39 / -0.39 / +0.18 / -0.19 dB).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from common.formats import check_sizes, fits
from search.recipes.knapsack import hull_greedy, knapsack_problem
from search.recipes.noise_model import NoiseTable, check_nbits, check_number, lowest, resolved


def fast_plan(weight_mse, sizes: Mapping[str, int], nbits: Sequence[int], anchors=(4,)) -> dict[int, list[str]]:
    """Isolated runs fast mode needs first: {bits: layers}, every layer at every anchor, plus the
    nearest depth with weight MSE > 0 for a layer exact (MSE 0) at all anchors. After a first
    recipe search, measure only what ``refine_candidates`` returns and rebuild the table."""
    check_sizes(sizes)
    nbits, anchors = sorted({check_nbits(b) for b in nbits}), sorted({check_nbits(a) for a in anchors})
    if not anchors or not set(anchors) <= set(nbits):
        raise ValueError(f"anchors {anchors} must be a non-empty subset of nbits {nbits}")
    plan: dict = {a: [l for l in sizes if fits(sizes, l, a)] for a in anchors}
    for l in sizes:
        usable = [b for b in nbits if fits(sizes, l, b)]  # a group size that does not divide: skipped
        if any(l not in weight_mse.get(b, {}) for b in usable):
            raise ValueError(f"weight_mse misses layer {l!r} at one of {nbits} bits")
        mse = {b: check_number(weight_mse[b][l], f"weight_mse[{b}][{l!r}]") for b in usable}
        other = [b for b in usable if mse[b] > 0]
        if all(mse[a] == 0 for a in anchors if a in mse) and other:
            plan.setdefault(min(other, key=lambda b: (min(abs(b.bits - a.bits) for a in anchors), -b.bits, b)),
                            []).append(l)
    return dict(sorted(plan.items()))


MAX_EXTRAPOLATION = 8.0  # (9 dB of weight MSE) a floor-hidden bound predicts depths at most this much noisier


def floor_descent(measured: Mapping, weight_mse, sizes: Mapping[str, int], nbits: Sequence[int], first,
                  eval_floor) -> tuple[list, list]:
    """(chain, todo): per layer, from its lowest first-round depth (``first``: (layer, bits) pairs),
    each measured depth the floor hides (not ``resolved``) is followed by the next lower searched
    depth with weight MSE > 0, unless every lower depth's weight MSE is within ``MAX_EXTRAPOLATION``
    of the hidden one's; ``chain`` lists the measured ones past the first round, ``todo`` the
    next to measure. ``measured``: {(layer, bits): per-prompt noise powers}. Pure, so a resumed
    search plans the same runs."""
    nbits = sorted({check_nbits(b) for b in nbits})
    start: dict = {}
    for l, b in first:
        b = check_nbits(b)
        start[l] = lowest([start.get(l, b), b])
    chain, todo = [], []
    for l, a in start.items():
        while (l, a) in measured and not resolved(measured[l, a], eval_floor):
            lower = [b for b in nbits if b.bits < a.bits and fits(sizes, l, b) and weight_mse.get(b, {}).get(l, 0) > 0]
            if not lower or max(weight_mse[b][l] for b in lower) <= MAX_EXTRAPOLATION * weight_mse[a][l]:
                break  # nothing lower, or every lower depth is predicted close enough from this bound
            a = max(lower, key=lambda f: (f.bits, -(f.group_size or 0)))  # next depth down, per tensor first
            (chain if (l, a) in measured else todo).append((l, a))
    return chain, todo


def refine_candidates(table: NoiseTable, sizes: Mapping[str, int], targets: Iterable[float],
                      margin_db: float) -> set[tuple[str, int]]:
    """Predicted (layer, bits) worth measuring for these average-bit targets. At each target's
    Lagrange multiplier lam (hull step where the budget binds) a layer takes argmin noise +
    lam*cost; if its choice's predicted noise margin_db worse and an alternative's margin_db
    better flips that, both predicted entries are returned. Measured entries never move."""
    m = 10.0 ** (check_number(margin_db, "margin_db") / 10.0)
    noise, cost, choices = knapsack_problem(table, sizes, False)
    values, total, rows = noise.mean(2), int(sum(sizes.values())), np.arange(len(cost))
    is_pred = np.array([[(l, b) in table.predicted for b in choices] for l in table.layers])
    out: set[tuple[str, int]] = set()
    for t in targets:
        budget = math.floor(check_number(t, "target") * total)
        if budget < cost.min(1).sum():
            raise ValueError(f"target {t} bits is below the all-minimum-bits recipe")
        lam = hull_greedy(values, cost, budget)[1] or 0.0
        ref = (values + lam * cost).argmin(1)
        worse = values[rows, ref] * np.where(is_pred[rows, ref], m, 1.0) + lam * cost[rows, ref]
        flips = values * np.where(is_pred, 1 / m, 1.0) + lam * cost < worse[:, None]
        flips[rows, ref] = False
        for l, k in zip(*np.nonzero(flips)):
            out |= {(table.layers[l], choices[j]) for j in (k, ref[l]) if is_pred[l, j]}
    return out
