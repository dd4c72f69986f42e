"""search.recipes.calibration against a plain loop, and strategy.calibration on stored tables."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from common.formats import LayerSizes
from search.recipes.calibration import Calibration, calibrate
from search.recipes.noise_model import NoiseTable, predict_psnr
from search.recipes.strategy import calibration
from search.recipes.tables import Tables
from storage import Measurement


def _reference_knots(pairs, k, gap):
    """What the module docstring says, as a plain loop: per distinct prediction the median error
    of the k nearest pairs (ties: first stored) within `gap` dB, then never decreasing."""
    knots = []
    for x in sorted({p for p, _ in pairs}):
        by_gap = sorted(range(len(pairs)), key=lambda i: (abs(pairs[i][0] - x), i))[:k]
        errs = [pairs[i][1] - pairs[i][0] for i in by_gap if abs(pairs[i][0] - x) <= gap]
        knots.append([x, x + statistics.median(errs)])
    for i in range(1, len(knots)):
        knots[i][1] = max(knots[i][1], knots[i - 1][1])
    return knots


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knots_match_a_plain_loop_and_interpolate(seed):
    rng = np.random.default_rng(seed)
    pred = rng.uniform(60, 110, 60).round(1)  # repeated predictions too
    pairs = [(float(p), float(p + 3 + 0.05 * (p - 80) + rng.normal(0, 0.7))) for p in pred]
    cal = calibrate(pairs, neighbours=9, max_gap_db=4.0)
    want = _reference_knots(pairs, 9, 4.0)
    assert cal.pairs == 60 and np.allclose(np.array(cal.knots), np.array(want))
    (x0, y0), (x1, y1) = want[3], want[4]
    mid = (x0 + x1) / 2
    assert cal.apply(mid) == pytest.approx((y0 + y1) / 2)  # linear between knots
    assert cal.apply(want[0][0] - 10) == pytest.approx(want[0][1] - 10)  # constant offsets beyond the ends
    assert cal.apply(want[-1][0] + 10) == pytest.approx(want[-1][1] + 10)
    grid = np.linspace(50, 120, 300)
    got = [cal.apply(g) for g in grid]
    assert all(b >= a for a, b in zip(got, got[1:]))  # never reorders recipes
    for t in np.linspace(55, 125, 50):  # invert: the smallest prediction reaching t
        x = cal.invert(t)
        assert cal.apply(x) >= t - 1e-9 and (x <= grid[0] or cal.apply(x - 1e-3) < t + 1e-9)


def test_too_few_or_non_finite_pairs_leave_predictions_alone():
    assert calibrate([(80.0, 85.0), (81.0, 86.0)]) == Calibration(pairs=2)
    assert calibrate([(80.0, math.inf), (81.0, math.nan), (math.inf, 90.0), (82, 83)]).apply(70.0) == 70.0
    assert Calibration().invert(70.0) == 70.0
    assert calibrate([(80.0, 85.0)] * 3).apply(80.0) == pytest.approx(85.0)


def _m(key, phase, bits, layer, position, psnr, n=2):
    return Measurement(key, phase, bits, layer, position, psnr, (psnr,) * n, "node", "w", 0.0)


def test_strategy_calibration_uses_curves_and_recipes_and_corrects_a_new_recipe():
    """A 'device' whose every recipe measures 3 dB better than the additive model says: each
    end-to-end measurement is a pair, and a recipe never measured is corrected by 3 dB."""
    layers = [f"l{i}" for i in range(12)]
    iso_db = {4: {l: 70.0 + 2 * i for i, l in enumerate(layers)}, 8: {l: 90.0 + 2 * i for i, l in enumerate(layers)}}
    iso = {b: {l: [v, v] for l, v in per.items()} for b, per in iso_db.items()}
    table = NoiseTable.from_isolated(iso, [math.inf, math.inf], layers)
    device = lambda bits: predict_psnr(table, bits) + 3.0  # noqa: E731
    isolated = {b: {l: _m(f"i/{b}/{l}", "isolated", b, l, None, v) for l, v in per.items()} for b, per in iso_db.items()}
    cumulative = {}
    for b in (4, 8):
        order = sorted(layers, key=lambda l: -iso_db[b][l])
        cumulative[b] = {k: _m(f"c/{b}/{k}", "cumulative", b, order[k - 1], k, device({l: b for l in order[:k]}))
                         for k in range(1, len(order) + 1)}
    sizes = LayerSizes({l: 1000 for l in layers}, {l: 16 for l in layers})
    tables = Tables(sizes, isolated, cumulative, {"original": math.inf}, {"original": (math.inf, math.inf)})
    cal = calibration(tables, table)
    assert cal.pairs == 24
    new = {l: (4 if i % 3 == 0 else 8) for i, l in enumerate(layers)}  # not a point of either curve
    assert cal.apply(predict_psnr(table, new)) == pytest.approx(device(new), abs=0.05)
    # a stored recipe counts too; a cumulative point whose layer disagrees with the order does not
    wrong = dict(cumulative[4])
    wrong[1] = _m("c/4/1", "cumulative", 4, layers[-1] if wrong[1].layer != layers[-1] else layers[0], 1, 10.0)
    recipes = ((new, device(new)),)
    t2 = Tables(sizes, isolated, {4: wrong, 8: cumulative[8]}, {"original": math.inf},
                {"original": (math.inf, math.inf)}, recipes=recipes)
    assert calibration(t2, table).pairs == 24


def test_a_recipe_with_no_palettized_layer_is_not_a_calibration_pair():
    """A recipe that keeps every layer in float16 re-runs the reference: under float16 arithmetic
    it measures ~209 dB (bit-exact), while the model predicts the evaluation floor for it. Among a
    fast search's few pairs it once bent the map so far that `search recipe --psnr 80` (tiny-sd,
    float16) picked a recipe predicted 80.47 dB that measured 73.30. Only recipes that palettize
    something are pairs."""
    layers = [f"l{i}" for i in range(4)]
    floor = np.full(2, 10 ** -8.0)  # an 80 dB evaluation floor
    iso = {4: {l: [70.0 + i, 70.0 + i] for i, l in enumerate(layers)}}
    table = NoiseTable.from_isolated(iso, [209.0, 209.0], layers, floor)
    device = lambda bits: predict_psnr(table, bits) + 2.0  # noqa: E731
    isolated = {4: {l: _m(f"i/4/{l}", "isolated", 4, l, None, 70.0 + i) for i, l in enumerate(layers)}}
    sizes = LayerSizes({l: 1000 for l in layers}, {l: 16 for l in layers})
    maps = [{l: (4 if j <= k else 16) for j, l in enumerate(layers)} for k in range(3)]
    recipes = tuple((m, device(m)) for m in maps) + (({l: 16 for l in layers}, 209.1),)
    tables = Tables(sizes, isolated, {}, {"original": 209.0}, {"original": (209.0, 209.0)}, recipes=recipes)
    cal = calibration(tables, table)
    assert cal.pairs == 3
    near_floor = {layers[3]: 4}  # predicted close to the floor, palettizes one layer
    assert cal.apply(predict_psnr(table, near_floor)) == pytest.approx(device(near_floor), abs=1e-9)
