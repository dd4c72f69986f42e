"""Fast mode's planning: which isolated runs to make when the other depths are predicted.

``fast_plan`` gives the first round (every layer at the anchor depths); after a first recipe
search on that table, ``refine_candidates`` lists the predicted entries worth measuring because
an error of ``margin_db`` in them would change a choice.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from common.formats import check_sizes, fits
from search.recipes.knapsack import hull_greedy, knapsack_problem
from search.recipes.noise_model import NoiseTable, check_nbits, check_number


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
