"""The ``optimal`` strategy: per-layer bit depths from an additive-noise model and a knapsack.

Apple's thresholds on cumulative curves cost 2 x depths x layers pipeline runs and cannot
answer "best recipe at 4.0 bits" or "smallest recipe that keeps 70 dB". Here each layer's
palettization error is independent noise on the output; its power relative to the prompt's
peak is ``n = 10**(-psnr/10)`` from the isolated PSNR. A recipe's prediction for prompt i is
``-10*log10(floor_i + sum_l n[l, b_l, i])``, averaged over prompts like the measured PSNR.

Objective and exactness. The mean of per-prompt dB is not separable over layers; it is raised
by minorize-maximize: ``-log`` is convex, so the prediction is at least its tangent at the
current recipe, and raising the tangent is the separable ``min sum_l sum_i w_i n[l, b_l, i]``
with ``w_i = 1/N_i`` (a local ascent: several prompts are not solved globally). Round 0
(``w_i = 1``: total mean noise, the usual surrogate; for one prompt the prediction itself) and
each later round solve that multiple-choice knapsack exactly: the Lagrangian (convex-hull)
greedy gives an incumbent and the dual bound, reduced-cost fixing drops choices that cannot be
in a better recipe (exact), and a DP over the layers left undecided, on a grid with extra costs
rounded down, is backtracked until a recipe fits at exact costs (certified optimal when the
first does). Leftover budget is spent greedily at exact costs. Budgets are never exceeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Iterable, Mapping, Sequence

import numpy as np

from search.recipes.apple_rule import FLOAT16_BITS, RECIPE_NBITS, Recipe, _check_sizes, make_recipe


def _num(v: object, where: str, allow_inf: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (Real, np.floating, np.integer)):
        raise ValueError(f"{where}: {v!r} is not a number")
    f = float(v)
    if math.isnan(f) or (math.isinf(f) and not (allow_inf and f > 0)):
        raise ValueError(f"{where}: {f} is not finite")
    return f


def _nbits(b: object) -> int:
    if isinstance(b, bool) or b not in RECIPE_NBITS:
        raise ValueError(f"unknown bit depth {b!r}; palettized depths are {RECIPE_NBITS}")
    return int(b)  # type: ignore[arg-type]


def _noises(isolated, layers, n_prompts: int) -> dict[tuple[str, int], np.ndarray]:
    """{(layer, bits): per-prompt noise}; +inf PSNR (bit-exact) is zero noise."""
    out = {}
    for b, per in isolated.items():
        for l, ps in per.items():
            if l not in layers:
                raise ValueError(f"isolated[{b}] has layer {l!r} that is not in the table")
            if isinstance(ps, (str, bytes)) or len(ps) != n_prompts:
                raise ValueError(f"isolated[{b}][{l!r}]: expected {n_prompts} per-prompt PSNRs, got {ps!r}")
            out[l, _nbits(b)] = 10.0 ** (-np.array([_num(p, f"isolated[{b}][{l!r}]", True) for p in ps]) / 10)
    return out


def _floor(original_per_prompt, layers) -> np.ndarray:
    if not len(layers) or not len(original_per_prompt):
        raise ValueError("need at least one layer and one prompt")
    return 10.0 ** (-np.array([_num(p, "original", True) for p in original_per_prompt]) / 10)


@dataclass(frozen=True, eq=False)
class NoiseTable:
    """Relative noise power per (layer, bits) per prompt; ``predicted`` marks fast-mode entries."""

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    noise: dict[int, np.ndarray]  # bits -> (n_layers, n_prompts)
    floor: np.ndarray  # (n_prompts,): the unmodified pipeline run again
    predicted: frozenset = field(default_factory=frozenset)  # {(layer, bits)} not measured

    @classmethod
    def from_isolated(cls, isolated, original_per_prompt, layers) -> "NoiseTable":
        layers, floor = tuple(layers), _floor(original_per_prompt, layers)
        got, bits = _noises(isolated, set(layers), len(floor)), tuple(sorted(_nbits(b) for b in isolated))
        if not bits:
            raise ValueError("isolated is empty: no bit depth measured")
        for b in bits:
            missing = [l for l in layers if (l, b) not in got]
            if missing:
                raise ValueError(f"isolated[{b}] misses {len(missing)} layers, e.g. {missing[0]!r}")
        return cls(layers, bits, {b: np.stack([got[l, b] for l in layers]) for b in bits}, floor)

    @classmethod
    def from_anchors(cls, isolated_at_anchors, weight_mse, original_per_prompt, layers,
                     bits: Sequence[int] = RECIPE_NBITS) -> "NoiseTable":
        """Fast mode: ``noise(l,b) = noise(l,a) * mse(l,b) / mse(l,a)``, ``a`` the depth measured
        for that layer nearest to ``b`` (ties: the higher, less saturated one) with ``mse > 0``.
        Measured entries are used as they are; ``mse(l,b) == 0`` (exact palette) is no noise."""
        layers, floor = tuple(layers), _floor(original_per_prompt, layers)
        got, bits = _noises(isolated_at_anchors, set(layers), len(floor)), sorted({_nbits(b) for b in bits})
        if not bits:
            raise ValueError("bits is empty")
        mse = {}
        for b in set(bits) | {a for _, a in got}:
            for l in layers:
                if l not in weight_mse.get(b, {}):
                    raise ValueError(f"weight_mse misses layer {l!r} at {b} bits")
                mse[l, b] = _num(weight_mse[b][l], f"weight_mse[{b}][{l!r}]")
                if mse[l, b] < 0:
                    raise ValueError(f"weight_mse[{b}][{l!r}] is negative")
        noise, predicted = {b: np.empty((len(layers), len(floor))) for b in bits}, set()
        for i, l in enumerate(layers):
            anchors = [a for (m, a) in got if m == l and mse[l, a] > 0]
            for b in bits:
                if (l, b) in got:
                    noise[b][i] = got[l, b]
                    continue
                predicted.add((l, b))
                if mse[l, b] > 0 and not anchors:
                    raise ValueError(f"layer {l!r}: no measured depth with weight MSE > 0 to predict {b} bits")
                a = min(anchors, key=lambda a: (abs(a - b), -a)) if anchors else None
                noise[b][i] = got[l, a] * (mse[l, b] / mse[l, a]) if mse[l, b] > 0 else 0.0
        return cls(layers, tuple(bits), noise, floor, frozenset(predicted))


def _psnr_of(total: np.ndarray) -> np.ndarray:
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
    return float(_psnr_of(total))


# --------------------------------------------------------------------------- the knapsack


def _problem(table: NoiseTable, sizes: Mapping[str, int], by_size: bool):
    """Noise (L, K, P) and integer costs (L, K) in bits (LUTs included when by_size); K = bits + 16."""
    _check_sizes(sizes)
    diff = sorted(set(sizes) ^ set(table.layers))
    if diff:
        raise ValueError(f"sizes and the noise table differ on {len(diff)} layers, e.g. {diff[0]!r}")
    choices = table.bits + (FLOAT16_BITS,)
    n = np.array([int(sizes[l]) for l in table.layers], dtype=np.int64)[:, None]
    b = np.array(choices, dtype=np.int64)[None, :]
    cost = n * b + (16 * 2**b * (b != FLOAT16_BITS) if by_size else 0)
    zeros = np.zeros_like(table.floor)[None].repeat(len(n), 0)
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


def _greedy(values, cost, budget):
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
    pick, lam = _greedy(values, cost, budget)
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
        score = np.where(ok, _psnr_of(trial), -np.inf)
        l, k = np.unravel_index(np.argmax(score), score.shape)
        if not score[l, k] > _psnr_of(total) + 1e-12:
            break
        pick[l] = k
        total = floor + noise[rows, pick].sum(0)
    return pick


def _solve(noise, cost, floor, budget, grid, rounds=4):
    """Minorize-maximize over prompt weights, one exact separable knapsack per round."""
    rows, w, best, seen = np.arange(len(cost)), np.ones(noise.shape[2]), None, set()
    pred = lambda p: float(_psnr_of(floor + noise[rows, p].sum(0)))  # noqa: E731
    for _ in range(rounds):
        values = noise @ (w / w.sum())
        greedy = _fill(noise, cost, floor, _greedy(values, cost, budget)[0], budget)
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
    if (max_avg_bits is None) == (max_size_mb is None):
        raise ValueError("give exactly one of max_avg_bits and max_size_mb")
    by_size = max_size_mb is not None
    limit = _num(max_size_mb if by_size else max_avg_bits, "budget")
    noise, cost, choices = _problem(table, sizes, by_size)
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
    return _recipe(table, sizes, choices, _solve(noise, cost, table.floor, budget, grid))


def optimal_for_psnr(table: NoiseTable, sizes: Mapping[str, int], min_psnr: float, *,
                     grid: int = 4096, rel_tol: float = 1e-3) -> Recipe:
    """Smallest size_mb predicted >= min_psnr: bisection on the size budget (to rel_tol of the
    size range) from the first hull-sweep recipe that reaches the target."""
    target = _num(min_psnr, "min_psnr")
    noise, cost, choices = _problem(table, sizes, True)
    rows, floor = np.arange(len(cost)), table.floor
    pred = lambda p: float(_psnr_of(floor + noise[rows, p].sum(0)))  # noqa: E731
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
    noise, cost, _ = _problem(table, sizes, False)
    total, rows = int(sum(sizes.values())), np.arange(len(cost))
    pick, segs = _hull(noise.mean(2), cost)
    spent = int(cost[rows, pick].sum())
    points = [(spent / total, float(_psnr_of(table.floor + noise[rows, pick].sum(0))))]
    for _, l, k in segs:
        spent, pick[l] = spent + int(cost[l, k] - cost[l, pick[l]]), k
        if math.isfinite(p := float(_psnr_of(table.floor + noise[rows, pick].sum(0)))) and p > points[-1][1]:
            points.append((spent / total, p))
    points = [pt for pt in points if math.isfinite(pt[1])]
    if len(points) <= n_points:
        return points
    xs = np.array([x for x, _ in points])
    keep = {int(np.searchsorted(xs, t, side="right")) - 1 for t in np.linspace(xs[0], xs[-1], n_points)}
    return [points[i] for i in sorted(keep)]


@dataclass(frozen=True)
class Calibration:
    """measured ~= a + b * predicted (dB) from end-to-end recipe runs; identity below 2 points."""

    a: float = 0.0
    b: float = 1.0
    residuals: tuple[float, ...] = ()  # measured - corrected prediction, per pair

    @property
    def rms(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.residuals)))) if self.residuals else 0.0

    def apply(self, predicted: float) -> float:
        return self.a + self.b * float(predicted)


def calibrate(pairs: Iterable[tuple[float, float]]) -> Calibration:
    """Least squares on (predicted, measured) dB; a slope <= 0 (or equal predictions) falls back to
    an offset only, so a correction never inverts the order of recipes."""
    pts = [(_num(p, "predicted"), _num(m, "measured")) for p, m in pairs]
    if len(pts) < 2:
        return Calibration(residuals=tuple(m - p for p, m in pts))
    x, y = np.array(pts).T
    b = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else 0.0
    b = b if b > 0 else 1.0
    a = float(np.mean(y - b * x))
    return Calibration(a, b, tuple(float(r) for r in y - (a + b * x)))


def fast_plan(weight_mse, sizes: Mapping[str, int], nbits: Sequence[int], anchors=(4,)) -> dict[int, list[str]]:
    """Isolated runs fast mode needs first: {bits: layers}, every layer at every anchor, plus the
    nearest depth with weight MSE > 0 for a layer exact (MSE 0) at all anchors. After a first
    recipe search, measure only what ``refine_candidates`` returns and rebuild the table."""
    _check_sizes(sizes)
    nbits, anchors = sorted({_nbits(b) for b in nbits}), sorted({_nbits(a) for a in anchors})
    if not anchors or not set(anchors) <= set(nbits):
        raise ValueError(f"anchors {anchors} must be a non-empty subset of nbits {nbits}")
    plan: dict[int, list[str]] = {a: list(sizes) for a in anchors}
    for l in sizes:
        if any(l not in weight_mse.get(b, {}) for b in nbits):
            raise ValueError(f"weight_mse misses layer {l!r} at one of {nbits} bits")
        mse = {b: _num(weight_mse[b][l], f"weight_mse[{b}][{l!r}]") for b in nbits}
        other = [b for b in nbits if mse[b] > 0]
        if all(mse[a] == 0 for a in anchors) and other:
            plan.setdefault(min(other, key=lambda b: (min(abs(b - a) for a in anchors), -b)), []).append(l)
    return dict(sorted(plan.items()))


def refine_candidates(table: NoiseTable, sizes: Mapping[str, int], targets: Iterable[float],
                      margin_db: float) -> set[tuple[str, int]]:
    """Predicted (layer, bits) worth measuring for these average-bit targets. At each target's
    Lagrange multiplier lam (hull step where the budget binds) a layer takes argmin noise +
    lam*cost; if its choice's predicted noise margin_db worse and an alternative's margin_db
    better flips that, both predicted entries are returned. Measured entries never move."""
    m = 10.0 ** (_num(margin_db, "margin_db") / 10.0)
    noise, cost, choices = _problem(table, sizes, False)
    values, total, rows = noise.mean(2), int(sum(sizes.values())), np.arange(len(cost))
    is_pred = np.array([[(l, b) in table.predicted for b in choices] for l in table.layers])
    out: set[tuple[str, int]] = set()
    for t in targets:
        budget = math.floor(_num(t, "target") * total)
        if budget < cost.min(1).sum():
            raise ValueError(f"target {t} bits is below the all-minimum-bits recipe")
        lam = _greedy(values, cost, budget)[1] or 0.0
        ref = (values + lam * cost).argmin(1)
        worse = values[rows, ref] * np.where(is_pred[rows, ref], m, 1.0) + lam * cost[rows, ref]
        flips = values * np.where(is_pred, 1 / m, 1.0) + lam * cost < worse[:, None]
        flips[rows, ref] = False
        for l, k in zip(*np.nonzero(flips)):
            out |= {(table.layers[l], choices[j]) for j in (k, ref[l]) if is_pred[l, j]}
    return out
