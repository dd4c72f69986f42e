"""The ``optimal`` strategy's recipes: the best predicted recipe under a size budget, exactly.

Objective and exactness. The mean of per-prompt dB (``noise_model``) is not separable over
layers; it is raised by minorize-maximize: ``-log`` is convex, so the prediction is at least its
tangent at the current recipe, and raising the tangent is the separable
``min sum_l sum_i w_i n[l, b_l, i]`` with ``w_i = 1/N_i`` (a local ascent: several prompts are
not solved globally). Round 0 (``w_i = 1``: total mean noise, the usual surrogate; for one
prompt the prediction itself) and each later round solve that multiple-choice knapsack
exactly: the Lagrangian (convex-hull) greedy gives an incumbent and the dual bound,
reduced-cost fixing drops choices that cannot be in a better recipe (exact), and a DP over the
layers left undecided, on a grid with extra costs rounded down, is backtracked until a recipe
fits at exact costs (certified optimal when the first does). Leftover budget is spent greedily
at exact costs. Budgets are never exceeded.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from common.formats import FLOAT16, check_sizes, fits, layer_bits
from search.recipes.apple_rule import Recipe, make_recipe
from search.recipes.noise_model import NoiseTable, check_number, psnr_of_noise


def knapsack_problem(table: NoiseTable, sizes: Mapping[str, int], by_size: bool):
    """Noise (L, K, P) and integer costs (L, K) in bits (every LUT included when by_size, else
    `average_bits`' count); K = formats + 16. A format a layer cannot take costs one bit more
    than float16 (and its noise is infinite): a choice no solver picks."""
    check_sizes(sizes)
    diff = sorted(set(sizes) ^ set(table.layers))
    if diff:
        raise ValueError(f"sizes and the noise table differ on {len(diff)} layers, e.g. {diff[0]!r}")
    choices = table.bits + (FLOAT16,)
    cost = np.array([[layer_bits(sizes, l, f, by_size) if fits(sizes, l, f) else layer_bits(sizes, l, FLOAT16) + 1
                      for f in choices] for l in table.layers], dtype=np.int64)
    zeros = np.zeros_like(table.floor)[None].repeat(len(table.layers), 0)
    return np.stack([table.noise[c] for c in table.bits] + [zeros], 1), cost, choices


def _hull(values: np.ndarray, cost: np.ndarray):
    """Per layer the lower convex hull from its cheapest choice; all hull steps, most noise
    removed per bit first (a layer's own steps stay in order: their slopes rise)."""
    start, segs = np.empty(len(values), dtype=np.int64), []
    for l, (v, c) in enumerate(zip(values, cost)):
        hull = []
        for k in sorted(range(len(v)), key=lambda k: (c[k], v[k])):
            if hull and v[k] >= v[hull[-1]]:
                continue
            while len(hull) > 1:
                a, m = hull[-2], hull[-1]
                if (v[m] - v[a]) * (c[k] - c[a]) < (v[k] - v[a]) * (c[m] - c[a]):
                    break
                hull.pop()  # m is on or above the chord a-k
            hull.append(k)
        start[l] = hull[0]
        segs += [((v[k] - v[a]) / (c[k] - c[a]), l, k) for a, k in zip(hull, hull[1:])]
    return start, sorted(segs)


def hull_greedy(values, cost, budget):
    """Hull steps until one does not fit: (recipe, Lagrange multiplier or None if all fitted)."""
    pick, segs = _hull(values, cost)
    spent = int(cost[np.arange(len(pick)), pick].sum())
    for slope, l, k in segs:
        step = int(cost[l, k] - cost[l, pick[l]])
        if spent + step > budget:
            return pick, -slope
        pick[l], spent = k, spent + step
    return pick, None


_DP_WORK = 2**20  # cells x layers per DP: a small core gets a finer grid for the same work


def _dp(values, cost, budget, grid):
    """DP on a grid of the slack, extra costs rounded DOWN (a relaxation), backtracked from cells
    G, G-1, ..., G-L; the first recipe that fits at exact costs wins: exact if it is the one from
    G, and the one from G-L always fits. Infinite values are pruned choices."""
    L, K = values.shape
    base = np.where(np.isfinite(values), cost, np.iinfo(np.int64).max).min(1)
    extra, slack = np.maximum(cost - base[:, None], 0), budget - int(base.sum())
    G = int(min(slack, max(grid, 4 * L, min(_DP_WORK // L, 1 << 15))))
    cells = extra if G == slack else (extra * G) // slack
    best, choice, cand = np.zeros(G + 1), np.empty((L, G + 1), dtype=np.int8), np.empty((K, G + 1))
    for l in range(L):
        cand.fill(np.inf)
        for k in np.nonzero(cells[l] <= G)[0]:
            cand[k, cells[l, k]:] = best[: G + 1 - cells[l, k]] + values[l, k]
        choice[l] = cand.argmin(0)
        best = cand[choice[l], np.arange(G + 1)]
    c, picks = np.arange(G, max(G - L, 0) - 1, -1), np.empty((L, min(G, L) + 1), dtype=np.int64)
    for l in range(L - 1, -1, -1):
        picks[l] = choice[l, c]
        c = c - cells[l, picks[l]]
    fits = extra[np.arange(L)[:, None], picks].sum(0) <= slack
    return picks[:, int(np.argmax(fits))], bool(fits[0])


def _knapsack(values, cost, budget, grid, incumbents):
    """Min sum(values) s.t. cost <= budget. A choice whose reduced cost at the dual optimum exceeds
    (best incumbent - dual bound) is in no better recipe, so it is dropped; the DP runs on the
    layers left with several choices, and reruns on a smaller core while it improves."""
    rows = np.arange(len(cost))
    pick, lam = hull_greedy(values, cost, budget)
    if lam is None:
        return pick  # every hull step fitted: each layer at its least noise
    red = values + lam * cost
    lb, sur = red.min(1).sum() - lam * budget, lambda p: values[rows, p].sum()  # noqa: E731
    best = min(incumbents + [pick], key=sur)
    for _ in range(4):
        keep = red - red.min(1)[:, None] <= (sur(best) - lb) * (1 + 1e-9)
        keep[rows, best] = True
        core, out = keep.sum(1) > 1, best.copy()
        if not core.any():
            break
        fixed = int(cost[rows[~core], out[~core]].sum())
        out[core], exact = _dp(np.where(keep[core], values[core], np.inf), cost[core], budget - fixed, grid)
        if not sur(out) < sur(best):
            break
        best = out
        if exact:
            break
    return best


def _fill(noise, cost, floor, pick, budget):
    """Spend leftover budget, at exact costs, on the change that raises the prediction most."""
    rows, pick = np.arange(len(pick)), pick.copy()
    total = floor + noise[rows, pick].sum(0)
    for _ in range(4 * len(pick)):
        ok = cost - cost[rows, pick][:, None] <= budget - int(cost[rows, pick].sum())
        trial = np.maximum(total - noise[rows, pick][:, None, :] + noise, floor)  # >= floor; no cancellation
        score = np.where(ok, psnr_of_noise(trial), -np.inf)
        l, k = np.unravel_index(np.argmax(score), score.shape)
        if not score[l, k] > psnr_of_noise(total) + 1e-12:
            break
        pick[l] = k
        total = floor + noise[rows, pick].sum(0)
    return pick


def _solve(noise, cost, floor, budget, grid, rounds=4):
    """Minorize-maximize over prompt weights, one exact separable knapsack per round."""
    rows, w, best, seen = np.arange(len(cost)), np.ones(noise.shape[2]), None, set()
    pred = lambda p: float(psnr_of_noise(floor + noise[rows, p].sum(0)))  # noqa: E731
    for _ in range(rounds):
        values = noise @ (w / w.sum())
        greedy = _fill(noise, cost, floor, hull_greedy(values, cost, budget)[0], budget)
        exact = _knapsack(values, cost, budget, grid, [greedy] + ([best[1]] if best else []))
        for p in (greedy, _fill(noise, cost, floor, exact, budget)):
            if best is None or pred(p) > best[0] + 1e-12:
                best = (pred(p), p)
        if best[1].tobytes() in seen:
            break
        seen.add(best[1].tobytes())
        w = 1.0 / np.maximum(floor + noise[rows, best[1]].sum(0), 1e-300)
    return best[1]


def _recipe(table, sizes, choices, pick) -> Recipe:
    return make_recipe({l: choices[k] for l, k in zip(table.layers, pick)}, sizes, None, "optimal")


def optimal_for_budget(table: NoiseTable, sizes: Mapping[str, int], *, max_avg_bits: float | None = None,
                       max_size_mb: float | None = None, grid: int = 4096) -> Recipe:
    """Best predicted recipe with average bits (or size_mb, LUTs included) <= the budget, never over
    (checked with the same float arithmetic as recipes.average_bits / size_mb)."""
    noise, cost, choices, budget = budget_problem(table, sizes, max_avg_bits=max_avg_bits, max_size_mb=max_size_mb)
    return _recipe(table, sizes, choices, _solve(noise, cost, table.floor, budget, grid))


def budget_problem(table: NoiseTable, sizes: Mapping[str, int], *, max_avg_bits: float | None = None,
                   max_size_mb: float | None = None):
    """``knapsack_problem`` plus the largest integer budget whose float value is within the limit."""
    if (max_avg_bits is None) == (max_size_mb is None):
        raise ValueError("give exactly one of max_avg_bits and max_size_mb")
    by_size = max_size_mb is not None
    limit = check_number(max_size_mb if by_size else max_avg_bits, "budget")
    noise, cost, choices = knapsack_problem(table, sizes, by_size)
    total, lo, hi = int(sum(sizes.values())), int(cost.min(1).sum()), int(cost.max(1).sum())
    to_float = (lambda c: (c / 8) / 1e6) if by_size else (lambda c: c / total)
    budget = max(int(math.floor(min(limit * (8e6 if by_size else total), hi))), lo - 1)
    while budget >= lo and to_float(budget) > limit:
        budget -= 1
    while budget < hi and to_float(budget + 1) <= limit:
        budget += 1
    if budget < lo:
        unit = "MB" if by_size else "bits/weight"
        raise ValueError(f"budget {limit} {unit} is below the all-minimum-bits recipe ({to_float(lo):.6g} {unit})")
    return noise, cost, choices, budget


def optimal_for_psnr(table: NoiseTable, sizes: Mapping[str, int], min_psnr: float, *,
                     grid: int = 4096, rel_tol: float = 1e-3) -> Recipe:
    """Smallest size_mb predicted >= min_psnr: bisection on the size budget (to rel_tol of the
    size range) from the first hull-sweep recipe that reaches the target."""
    target = check_number(min_psnr, "min_psnr")
    noise, cost, choices = knapsack_problem(table, sizes, True)
    rows, floor = np.arange(len(cost)), table.floor
    pred = lambda p: float(psnr_of_noise(floor + noise[rows, p].sum(0)))  # noqa: E731
    best = np.full(len(cost), len(choices) - 1)
    if pred(best) < target:
        raise ValueError(f"min_psnr {target} dB is unreachable: all-16 predicts {pred(best):.2f} dB (the noise floor)")
    pick, segs = _hull(noise.mean(2), cost)
    for _, l, k in [(0, None, None)] + segs:
        if l is not None:
            pick[l] = k
        if pred(pick) >= target:
            best = pick.copy()
            break
    lo, hi = int(cost.min(1).sum()), int(cost[rows, best].sum())
    while hi - lo > max(1, rel_tol * int((cost.max(1) - cost.min(1)).sum())):
        mid = (lo + hi) // 2
        p = _solve(noise, cost, floor, mid, grid)
        if pred(p) >= target:
            best, hi = p, int(cost[rows, p].sum())
        else:
            lo = mid
    return _recipe(table, sizes, choices, best)


def frontier(table: NoiseTable, sizes: Mapping[str, int], n_points: int = 50) -> list[tuple[float, float]]:
    """(avg_bits, predicted PSNR) along the hull sweep of the mean-noise surrogate, kept where the
    prediction rises (monotone) and finite, thinned to ~n_points even in bits. Fast (no DP);
    knapsack recipes lie on or just above it."""
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}")
    noise, cost, _ = knapsack_problem(table, sizes, False)
    total, rows = int(sum(sizes.values())), np.arange(len(cost))
    pick, segs = _hull(noise.mean(2), cost)
    spent = int(cost[rows, pick].sum())
    points = [(spent / total, float(psnr_of_noise(table.floor + noise[rows, pick].sum(0))))]
    for _, l, k in segs:
        spent, pick[l] = spent + int(cost[l, k] - cost[l, pick[l]]), k
        if math.isfinite(p := float(psnr_of_noise(table.floor + noise[rows, pick].sum(0)))) and p > points[-1][1]:
            points.append((spent / total, p))
    points = [pt for pt in points if math.isfinite(pt[1])]
    if len(points) <= n_points:
        return points
    xs = np.array([x for x, _ in points])
    keep = {int(np.searchsorted(xs, t, side="right")) - 1 for t in np.linspace(xs[0], xs[-1], n_points)}
    return [points[i] for i in sorted(keep)]
