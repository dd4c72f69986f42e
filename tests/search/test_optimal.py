"""search.recipes.{noise_model,knapsack,fast_plan}: the noise model, the knapsack against brute force, fast mode."""

import itertools
import math
import time

import numpy as np
import pytest

from common.formats import average_bits, size_mb
from search.recipes.fast_plan import fast_plan, refine_candidates
from search.recipes.knapsack import frontier, optimal_for_budget, optimal_for_psnr
from search.recipes.noise_model import NoiseTable, predict_psnr


def _table(seed, n_layers, n_prompts, bits=(1, 2, 4, 8), scatter=2.0, floor_db=200.0):
    """Isolated PSNR ~ 6 dB per bit plus per-layer offsets and per-prompt scatter (not monotone)."""
    rng = np.random.default_rng(seed)
    layers = tuple(f"l{i}" for i in range(n_layers))
    base = rng.uniform(20, 45, n_layers)
    iso = {b: {l: tuple(base[i] + 6.0 * b + rng.normal(0, scatter, n_prompts)) for i, l in enumerate(layers)}
           for b in bits}
    sizes = {l: int(rng.integers(100_000, 3_000_000)) for l in layers}
    return NoiseTable.from_isolated(iso, [floor_db] * n_prompts, layers), sizes


def _brute(table, sizes):
    """Every recipe: (true prediction, prediction of the mean noise, avg bits, size_mb)."""
    L, choices = len(table.layers), tuple(b.bits for b in table.bits) + (16,)  # per-tensor formats: their depths
    combos = np.array(list(itertools.product(range(len(choices)), repeat=L)))
    zeros = np.zeros_like(table.noise[table.bits[0]])
    noise = np.stack([table.noise[b] for b in table.bits] + [zeros], 1)
    total = table.floor + noise[np.arange(L), combos].sum(1)
    n, b = np.array([sizes[l] for l in table.layers]), np.array(choices)[combos]
    avg = (n * b).sum(1) / n.sum()
    mb = np.where(b == 16, n * 2, n * b / 8 + 2.0**b * 2).sum(1) / 1e6
    return np.mean(-10 * np.log10(total), 1), -10 * np.log10(total.mean(1)), avg, mb


AVG_BUDGETS = [1.0, 1.5, 2.3, 3.0, 4.0, 5.5, 7.0, 9.0, 12.0, 16.0]


# ---------------------------------------------------------------- noise model


def test_predict_psnr_by_hand():
    iso = {4: {"a": (40.0, 30.0), "b": (50.0, 30.0)}, 8: {"a": (60.0, 60.0), "b": (70.0, 70.0)}}
    t = NoiseTable.from_isolated(iso, [math.inf, math.inf], ["a", "b"])
    # prompt 0: 1e-4 + 1e-5; prompt 1: 1e-3 + 1e-3
    want = (-10 * math.log10(1.1e-4) - 10 * math.log10(2e-3)) / 2
    assert predict_psnr(t, {"a": 4, "b": 4}) == pytest.approx(want)
    assert predict_psnr(t, {"a": 4, "b": 16}) == pytest.approx(35.0)  # 16 bits adds no noise
    assert predict_psnr(t, {"a": 4}) == pytest.approx(35.0)  # absent counts as 16
    assert predict_psnr(t, {}) == math.inf  # bit-exact reference, nothing palettized
    t80 = NoiseTable.from_isolated(iso, [80.0, 80.0], ["a", "b"])
    assert predict_psnr(t80, {}) == pytest.approx(80.0)  # the noise floor
    assert predict_psnr(t80, {"a": 8, "b": 8}) < predict_psnr(t, {"a": 8, "b": 8})


def test_bit_exact_isolated_is_zero_noise():
    t = NoiseTable.from_isolated({8: {"a": (math.inf,), "b": (60.0,)}}, [math.inf], ["a", "b"])
    assert predict_psnr(t, {"a": 8, "b": 8}) == pytest.approx(60.0)


# ---------------------------------------------------------------- knapsack vs brute force


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_exact_for_one_prompt(seed):
    """One prompt: the prediction is monotone in total noise, so the knapsack must hit the brute force."""
    t, sizes = _table(seed, 5 + seed % 3, 1, scatter=0.0 if seed % 2 else 3.0)
    pred, _, avg, mb = _brute(t, sizes)
    for budget in AVG_BUDGETS:
        r = optimal_for_budget(t, sizes, max_avg_bits=budget)
        assert r.strategy == "optimal" and r.threshold is None
        assert r.avg_bits <= budget and average_bits(r.bits, sizes) == r.avg_bits
        assert predict_psnr(t, r.bits) == pytest.approx(pred[avg <= budget].max(), abs=1e-9)
    lo = mb.min()
    for factor in [1.0, 1.3, 2.0, 4.0, 8.0, 16.0]:
        r = optimal_for_budget(t, sizes, max_size_mb=lo * factor)
        assert r.size_mb <= lo * factor and size_mb(r.bits, sizes) == r.size_mb
        assert predict_psnr(t, r.bits) == pytest.approx(pred[mb <= lo * factor].max(), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_several_prompts_against_brute_force(seed):
    """Several prompts: at least the exact optimum of the mean-noise surrogate, at most the brute force."""
    t, sizes = _table(100 + seed, 5 + seed % 3, 4)
    pred, surrogate, avg, _ = _brute(t, sizes)
    gaps = []
    for budget in AVG_BUDGETS:
        ok = avg <= budget
        got = predict_psnr(t, optimal_for_budget(t, sizes, max_avg_bits=budget).bits)
        surrogate_best = pred[np.flatnonzero(ok)[np.argmax(surrogate[ok])]]
        assert surrogate_best - 1e-9 <= got <= pred[ok].max() + 1e-9
        gaps.append(pred[ok].max() - got)
    print(f"seed {seed}: gap to the brute-force best prediction, max {max(gaps):.4f} dB")
    assert max(gaps) < 0.5


def test_budget_met_exactly_and_tight():
    t, sizes = _table(7, 40, 3, bits=(1, 2, 4, 6, 8))
    for budget in [1.2, 2.0, 3.3, 4.0, 6.0, 7.5]:
        r = optimal_for_budget(t, sizes, max_avg_bits=budget)
        assert budget - 0.05 < r.avg_bits <= budget
    lo = size_mb({l: 1 for l in sizes}, sizes)
    for mb in [lo * 1.01, lo * 3, lo * 10]:
        r = optimal_for_budget(t, sizes, max_size_mb=mb)
        assert mb * 0.99 < r.size_mb <= mb
    # at or above all-16 everything stays float16; at exactly all-minimum everything is at 1 bit
    assert set(optimal_for_budget(t, sizes, max_avg_bits=20.0).bits.values()) == {16}
    assert set(optimal_for_budget(t, sizes, max_avg_bits=1.0).bits.values()) == {1}
    assert set(optimal_for_budget(t, sizes, max_size_mb=lo).bits.values()) == {1}


def test_budget_of_a_uniform_recipe_can_be_met():
    """A budget equal to a uniform recipe's (all 4 bits) must not be lost to grid rounding."""
    layers = [f"l{i}" for i in range(30)]
    iso = {b: {l: (30.0 + 6 * b,) for l in layers} for b in (2, 4, 6)}  # every layer alike
    sizes = {l: 100_003 + 7919 * i for i, l in enumerate(layers)}
    r = optimal_for_budget(NoiseTable.from_isolated(iso, [200.0], layers), sizes, max_avg_bits=4.0)
    assert r.avg_bits == 4.0 and set(r.bits.values()) == {4}


def test_frontier_is_monotone_and_below_the_knapsack():
    t, sizes = _table(3, 30, 1, bits=(1, 2, 4, 6, 8))
    pts = frontier(t, sizes, n_points=20)
    assert 2 <= len(pts) <= 20
    xs, ys = zip(*pts)
    assert all(np.diff(xs) > 0) and all(np.diff(ys) > 0)
    assert xs[0] == pytest.approx(1.0) and xs[-1] <= 16.0
    for x, y in pts[::4]:
        assert predict_psnr(t, optimal_for_budget(t, sizes, max_avg_bits=x).bits) >= y - 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_optimal_for_psnr_against_brute_force(seed):
    t, sizes = _table(200 + seed, 6, 1 + 3 * (seed % 2))
    pred, _, _, mb = _brute(t, sizes)
    for target in np.percentile(pred, [10, 50, 90, 99]):
        r = optimal_for_psnr(t, sizes, float(target))
        assert predict_psnr(t, r.bits) >= target
        assert r.size_mb <= mb[pred >= target].min() + 1e-3 * (mb.max() - mb.min())
    with pytest.raises(ValueError, match="unreachable"):
        optimal_for_psnr(t, sizes, 250.0)  # above the 200 dB noise floor
    assert set(optimal_for_psnr(t, sizes, 0.0).bits.values()) == {1}


# ---------------------------------------------------------------- fast mode


def _proportional(seed=0, n_layers=6, n_prompts=3):
    """Isolated noise exactly proportional to weight MSE: noise(l,b,i) = k[l,i] * mse(l,b)."""
    rng = np.random.default_rng(seed)
    layers = [f"l{i}" for i in range(n_layers)]
    mse = {b: {l: float(rng.uniform(0.5, 2) * 4.0**-b) for l in layers} for b in (1, 2, 4, 6, 8)}
    k = rng.uniform(1e-3, 1e-1, (n_layers, n_prompts))
    iso = {b: {l: tuple(-10 * np.log10(k[i] * mse[b][l])) for i, l in enumerate(layers)} for b in mse}
    return layers, mse, iso


@pytest.mark.parametrize("anchors", [(4,), (2, 6), (1, 8)])
def test_from_anchors_reproduces_proportional_table(anchors):
    layers, mse, iso = _proportional()
    full = NoiseTable.from_isolated(iso, [90.0] * 3, layers)
    fast = NoiseTable.from_anchors({a: iso[a] for a in anchors}, mse, [90.0] * 3, layers)
    assert fast.bits == full.bits == (1, 2, 4, 6, 8)
    for b in full.bits:
        np.testing.assert_allclose(fast.noise[b], full.noise[b], rtol=1e-9)
    assert fast.predicted == {(l, b) for l in layers for b in full.bits if b not in anchors}
    assert full.predicted == frozenset()


def test_from_anchors_uses_nearest_anchor_higher_on_ties():
    layers, mse, iso = _proportional(n_prompts=1)
    iso[2] = {l: (v[0] + 3.0,) for l, v in iso[2].items()}  # the 2-bit anchor disagrees by 3 dB
    fast = NoiseTable.from_anchors({2: iso[2], 6: iso[6]}, mse, [90.0], layers, bits=(1, 4, 8))
    truth = NoiseTable.from_isolated(iso, [90.0], layers)
    np.testing.assert_allclose(fast.noise[4], truth.noise[4], rtol=1e-9)  # tie 2 vs 6 -> 6
    np.testing.assert_allclose(fast.noise[8], truth.noise[8], rtol=1e-9)
    np.testing.assert_allclose(fast.noise[1], truth.noise[1] * 10**-0.3, rtol=1e-9)  # from 2 bits


def test_from_anchors_zero_weight_mse():
    iso = {4: {"a": (50.0,), "b": (60.0,)}}
    mse = {4: {"a": 1e-4, "b": 0.0}, 8: {"a": 0.0, "b": 0.0}}
    t = NoiseTable.from_anchors(iso, mse, [90.0], ["a", "b"], bits=(4, 8))
    assert t.noise[8].tolist() == [[0.0], [0.0]]  # exact palette: no noise
    mse[8]["b"] = 1e-6  # 'b' is exact at its anchor yet not at 8 bits: nothing to scale from
    with pytest.raises(ValueError, match="no measured depth"):
        NoiseTable.from_anchors(iso, mse, [90.0], ["a", "b"], bits=(4, 8))


def test_fast_plan():
    sizes = {"a": 10, "b": 20}
    mse = {b: {"a": 4.0**-b, "b": 4.0**-b} for b in (1, 2, 4, 6, 8)}
    assert fast_plan(mse, sizes, (1, 2, 4, 6, 8)) == {4: ["a", "b"]}
    assert fast_plan(mse, sizes, (2, 4, 8), anchors=(2, 8)) == {2: ["a", "b"], 8: ["a", "b"]}
    mse[8]["b"] = 0.0  # exact at the only anchor: also measure the nearest depth with MSE > 0
    assert fast_plan(mse, sizes, (2, 4, 8), anchors=(8,)) == {4: ["b"], 8: ["a", "b"]}
    with pytest.raises(ValueError, match="subset"):
        fast_plan(mse, sizes, (2, 4), anchors=(8,))
    with pytest.raises(ValueError, match="misses"):
        fast_plan({4: {"a": 1.0}}, sizes, (4,))


def test_refine_candidates():
    layers, mse, iso = _proportional(seed=3, n_layers=12, n_prompts=2)
    sizes = {l: 100_000 * (i + 1) for i, l in enumerate(layers)}
    fast = NoiseTable.from_anchors({4: iso[4]}, mse, [90.0] * 2, layers)
    small = refine_candidates(fast, sizes, [3.0, 5.0], margin_db=0.5)
    large = refine_candidates(fast, sizes, [3.0, 5.0], margin_db=6.0)
    assert small <= large and large and all(pair in fast.predicted for pair in large)
    assert refine_candidates(fast, sizes, [3.0], margin_db=60.0) > small
    full = NoiseTable.from_isolated(iso, [90.0] * 2, layers)  # all measured: nothing to refine
    assert refine_candidates(full, sizes, [3.0, 5.0], margin_db=6.0) == set()


# ---------------------------------------------------------------- validation


def test_validation_errors():
    iso = {4: {"a": (40.0,), "b": (50.0,)}}
    t = NoiseTable.from_isolated(iso, [90.0], ["a", "b"])
    sizes = {"a": 100, "b": 200}
    cases = [
        (lambda: NoiseTable.from_isolated({4: {"a": (math.nan,), "b": (1.0,)}}, [90.0], ["a", "b"]), "not finite"),
        (lambda: NoiseTable.from_isolated({4: {"a": (-math.inf,), "b": (1.0,)}}, [90.0], ["a", "b"]), "not finite"),
        (lambda: NoiseTable.from_isolated({5: iso[4]}, [90.0], ["a", "b"]), "unknown bit depth"),
        (lambda: NoiseTable.from_isolated({4: {"a": (40.0,)}}, [90.0], ["a", "b"]), "misses"),
        (lambda: NoiseTable.from_isolated({4: {**iso[4], "c": (1.0,)}}, [90.0], ["a", "b"]), "not in the table"),
        (lambda: NoiseTable.from_isolated(iso, [90.0, 90.0], ["a", "b"]), "expected 2 per-prompt"),
        (lambda: NoiseTable.from_isolated({}, [90.0], ["a", "b"]), "empty"),
        (lambda: NoiseTable.from_isolated(iso, [math.nan], ["a", "b"]), "not finite"),
        (lambda: NoiseTable.from_anchors(iso, {4: {"a": 1.0}}, [90.0], ["a", "b"]), "weight_mse misses"),
        (lambda: predict_psnr(t, {"a": 2}), "not in the table"),
        (lambda: predict_psnr(t, {"c": 4}), "not in the noise table"),
        (lambda: optimal_for_budget(t, sizes), "exactly one"),
        (lambda: optimal_for_budget(t, sizes, max_avg_bits=4, max_size_mb=1), "exactly one"),
        (lambda: optimal_for_budget(t, sizes, max_avg_bits=3.9), "below the all-minimum"),
        (lambda: optimal_for_budget(t, sizes, max_size_mb=1e-4), "below the all-minimum"),
        (lambda: optimal_for_budget(t, sizes, max_avg_bits=math.inf), "not finite"),
        (lambda: optimal_for_budget(t, {"a": 100}, max_avg_bits=8), "differ on 1 layers"),
        (lambda: optimal_for_budget(t, {**sizes, "c": 5}, max_avg_bits=8), "differ on 1 layers"),
        (lambda: optimal_for_psnr(t, sizes, math.nan), "not finite"),
        (lambda: frontier(t, sizes, n_points=1), "n_points"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------- speed


def test_speed_792_layers():
    """SDXL-sized: 792 layers x (5 depths + 16) x 8 prompts; printed, bounded loosely."""
    rng = np.random.default_rng(2)
    layers = tuple(f"l{i}" for i in range(792))
    base = rng.uniform(55, 85, len(layers))  # isolated PSNR at 4 bits
    iso = {b: {l: tuple(base[i] + 6.0 * (b - 4) + rng.normal(0, 1.0, 8)) for i, l in enumerate(layers)}
           for b in (1, 2, 4, 6, 8)}
    sizes = {l: int(np.exp(rng.uniform(np.log(2e5), np.log(2.95e7)))) for l in layers}
    t = NoiseTable.from_isolated(iso, [80.0] * 8, layers)
    times = []
    for budget in (2.0, 4.0, 6.0):
        start = time.perf_counter()
        r = optimal_for_budget(t, sizes, max_avg_bits=budget)
        times.append(time.perf_counter() - start)
        assert budget - 0.01 < r.avg_bits <= budget
    start = time.perf_counter()
    pts = frontier(t, sizes)
    t_frontier = time.perf_counter() - start
    start = time.perf_counter()
    r = optimal_for_psnr(t, sizes, pts[20][1])
    t_psnr = time.perf_counter() - start
    assert predict_psnr(t, r.bits) >= pts[20][1]
    print(f"792 layers: optimal_for_budget {', '.join(f'{s:.2f}' for s in times)} s; "
          f"frontier {t_frontier:.3f} s; optimal_for_psnr {t_psnr:.2f} s")
    assert max(times) < 10 and t_psnr < 60
