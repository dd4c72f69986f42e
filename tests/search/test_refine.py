"""Floor-aware noise model and measured refinement (pure: no model, no Ray)."""
from __future__ import annotations

import numpy as np
import pytest

from common.formats import PaletteFormat
from search.recipes.knapsack import optimal_for_budget
from search.recipes.noise_model import NoiseTable, floor_noise, floor_probe_layers, floor_probe_plan, predict_psnr
from search.recipes.refine import candidate_key, refine

SIZES = {f"l{i}": 1000 * (i + 1) for i in range(8)}
BITS = (2, 4, 8)


def _iso(rng, floor_db=None):
    out = {}
    for b in BITS:
        out[b] = {}
        for l in SIZES:
            true = 10 ** (-(20 + 6 * b + rng.uniform(0, 10)) / 10) * np.ones(2)
            total = true + (10 ** (-floor_db / 10) if floor_db else 0)
            out[b][l] = list(-10 * np.log10(total))
    return out


def test_floor_estimate_is_the_mean_power_of_repeated_probe_runs():
    runs = [[82.0, 83.1], [82.6, 82.2], [83.3, 81.9]]
    plain = [np.mean([10 ** (-r[i] / 10) for r in runs]) for i in range(2)]
    assert np.allclose(floor_noise(runs), plain)
    assert floor_probe_layers(list(SIZES), 3) == ["l0", "l4", "l7"]
    assert floor_probe_layers(["a", "b"], 8) == ["a", "b"]


def _db(power):
    return list(np.round(-10 * np.log10(power), 1))  # stored like Apple's protocol: 0.1 dB


@pytest.mark.parametrize("floor_db", [None, 82.0, 127.0])
def test_two_probe_magnitudes_separate_the_floor_from_the_linear_response(floor_db):
    """p(ulps) = floor + r * ulps**2 per probe: the floor is what does not grow from 1 to 4 ulps.
    Reference: the floor that generated the probes, recovered within the 0.1 dB rounding."""
    rng = np.random.default_rng(3)
    floor = np.zeros(3) if floor_db is None else 10 ** (-(floor_db + rng.uniform(-1.5, 1.5, 3)) / 10)
    responses = [10 ** (-rng.uniform(110, 130, 3) / 10) for _ in range(8)]  # each probe layer's own
    probes = {ulps: [_db(floor + r * ulps ** 2) for r in responses] for ulps in (1, 4)}
    got = floor_noise(probes)
    p1 = np.mean([10 ** (-np.array(p) / 10) for p in probes[1]], axis=0)
    if floor_db is None:  # bit-exact arithmetic: nothing to take out (the one-magnitude estimate took p1)
        assert np.all(got <= 0.05 * p1)
        assert np.allclose(floor_noise(probes[1]), p1)
    else:
        assert np.allclose(got, floor, rtol=0.1, atol=0.05 * np.mean(responses, axis=0))
    assert np.all((0 <= got) & (got <= p1))  # never negative, never above the 1-ulp probe
    assert floor_probe_plan(list(SIZES))[:2] == [("l0", 1), ("l0", 4)] and len(floor_probe_plan(list(SIZES))) == 16
    with pytest.raises(ValueError, match="need 1"):
        floor_noise({4: probes[4]})  # the 4-ulp probes alone are not a floor


def test_floor_is_counted_once_not_per_layer():
    rng = np.random.default_rng(0)
    floor_db = 60.0
    clean, noisy = _iso(rng, None), None
    rng = np.random.default_rng(0)
    noisy = _iso(rng, floor_db)
    f = floor_noise([[floor_db, floor_db]])
    aware = NoiseTable.from_isolated(noisy, [210.0, 210.0], list(SIZES), f)
    naive = NoiseTable.from_isolated(noisy, [210.0, 210.0], list(SIZES))
    truth = NoiseTable.from_isolated(clean, [210.0, 210.0], list(SIZES))
    recipe = {l: 8 for l in SIZES}
    # the measurement of that recipe: its true noise plus the floor once
    measured = float(np.mean(-10 * np.log10(sum(10 ** (-np.array(clean[8][l]) / 10) for l in SIZES)
                                             + 10 ** (-floor_db / 10))))
    assert abs(predict_psnr(aware, recipe) - measured) < 0.01
    assert predict_psnr(naive, recipe) < measured - 1.0
    assert predict_psnr(truth, recipe) > measured


def _setup(seed=1):
    table = NoiseTable.from_isolated(_iso(np.random.default_rng(seed)), [210.0, 210.0], list(SIZES))
    # the "device": additive model plus interactions the model cannot see
    w = np.random.default_rng(seed + 1).uniform(0.5, 2.0, len(SIZES))

    def truth(bits):
        n = sum(w[i] * table.noise[b][i] for i, (l, b) in enumerate(bits.items()) if b != 16)
        return float(np.mean(-10 * np.log10(n + table.floor)))
    return table, truth


@pytest.mark.parametrize("target", [3.0, 4.5, 6.0])
def test_refined_never_below_its_starts_and_within_budget(target):
    table, truth = _setup()
    one_shot = optimal_for_budget(table, SIZES, max_avg_bits=target).bits
    other = {l: min(BITS) for l in SIZES}
    calls = []

    def measure(maps):
        calls.extend(candidate_key(m) for m in maps)
        return [truth(m) for m in maps]

    r = refine(table, SIZES, {"knapsack": one_shot, "apple": other}, measure, evals=12, max_avg_bits=target)
    assert r.psnr >= max(truth(one_shot), truth(other))
    assert r.psnr == truth(r.bits)
    avg = sum(SIZES[l] * PaletteFormat.of(b).bits for l, b in r.bits.items()) / sum(SIZES.values())
    assert avg <= target
    assert r.evals == len(calls) == len(set(calls)) <= 12  # every map measured once


def test_replay_with_stored_measurements_repeats_nothing():
    table, truth = _setup(3)
    start = optimal_for_budget(table, SIZES, max_avg_bits=4.0).bits
    store: dict[str, float] = {}
    runs = []

    def measure(maps):
        out = []
        for m in maps:
            k = candidate_key(m)
            if k not in store:
                runs.append(k)
                store[k] = truth(m)
            out.append(store[k])
        return out

    first = refine(table, SIZES, {"knapsack": start}, measure, evals=10, max_avg_bits=4.0)
    n = len(runs)
    again = refine(table, SIZES, {"knapsack": start}, measure, evals=10, max_avg_bits=4.0)
    assert len(runs) == n and again.bits == first.bits and again.psnr == first.psnr
