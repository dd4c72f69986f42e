"""Recipes over mixed formats: the knapsack against brute force (sizes by hand: indices plus one
float16 LUT per channel group), unfit formats never chosen, Apple's rule with grouped curves,
and Apple's JSON keeping only per-tensor recipes in its own sections."""
import itertools
import math

import numpy as np
import pytest

from common.formats import FLOAT16, LayerSizes, PaletteFormat
from search.recipes.apple_json import SearchReport, parse_recipe_file, to_apple_json
from search.recipes.apple_rule import apple_recipes, make_recipe
from search.recipes.knapsack import optimal_for_budget
from search.recipes.noise_model import NoiseTable, predict_psnr

FORMATS = [PaletteFormat.of(f) for f in ("2", "2g16", "4", "4g16")]
LAYERS = {"a": (64, 300), "b": (40, 500), "c": (32, 700), "d": (80, 200)}  # (out channels, weights per channel)


def _problem(seed):
    rng = np.random.default_rng(seed)
    sizes = LayerSizes({l: o * i for l, (o, i) in LAYERS.items()}, {l: o for l, (o, _) in LAYERS.items()})
    unfit = [(l, f) for l in sizes for f in FORMATS if f.grouped and sizes.channels[l] % f.group_size]
    iso = {f: {l: (float(rng.uniform(20, 40) + 5 * f.bits + (4 if f.grouped else 0)),) for l in sizes
               if (l, f) not in unfit} for f in FORMATS}
    return NoiseTable.from_isolated(iso, [120.0], list(sizes), unfit=unfit), sizes, unfit


def _bits_by_hand(layer, f):
    out, per = LAYERS[layer]
    if f == FLOAT16:
        return 16 * out * per
    groups = out // f.group_size if f.grouped else 1
    return out * per * f.bits + 16 * 2**f.bits * groups


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_with_grouped_formats_against_brute_force(seed):
    table, sizes, unfit = _problem(seed)
    assert unfit == [("b", PaletteFormat(2, 16)), ("b", PaletteFormat(4, 16))]  # 16 does not divide 40
    choices = FORMATS + [FLOAT16]
    best = {}
    for combo in itertools.product(choices, repeat=len(LAYERS)):
        recipe = dict(zip(LAYERS, combo))
        if any((l, f) in unfit for l, f in recipe.items()):
            continue
        mb = sum(_bits_by_hand(l, f) for l, f in recipe.items()) / 8 / 1e6
        best[tuple(combo)] = (mb, predict_psnr(table, recipe))
    for budget in np.linspace(min(v[0] for v in best.values()), max(v[0] for v in best.values()), 7)[1:]:
        r = optimal_for_budget(table, sizes, max_size_mb=float(budget))
        assert r.size_mb <= budget and not any((l, f) in unfit for l, f in r.bits.items())
        assert r.size_mb == pytest.approx(sum(_bits_by_hand(l, f) for l, f in r.bits.items()) / 8 / 1e6)
        brute = max(p for mb, p in best.values() if mb <= budget)
        assert predict_psnr(table, r.bits) == pytest.approx(brute, abs=1e-9)


def test_apple_rule_with_grouped_curves():
    sizes = LayerSizes({"a": 6400, "b": 2400}, {"a": 64, "b": 48})
    g = PaletteFormat(4, 16)
    cumulative = {2: {"a": 30.0, "b": 20.0}, g: {"a": 45.0, "b": 41.0}, 4: {"a": 50.0, "b": 30.0}}
    r = apple_recipes(cumulative, sizes, [35.0])[0]
    # the lowest format above 35 dB, in the order 2 < 4 < 4g16 (fewer bits, then fewer LUTs)
    assert r.bits == {"a": 4, "b": g}
    with pytest.raises(ValueError, match="group size does not divide"):
        apple_recipes({PaletteFormat(4, 32): {"b": 40.0}}, sizes, [35.0])


def test_apple_json_keeps_apples_sections_per_tensor_and_reads_both_back():
    sizes = LayerSizes({"a": 6400, "b": 2400}, {"a": 64, "b": 48})
    per_tensor = make_recipe({"a": 4, "b": 8}, sizes)
    grouped = make_recipe({"a": "3g16", "b": 4}, sizes, strategy="optimal")
    report = SearchReport("m", {"original": 100.0, "linear_8bit": 60.0}, [(per_tensor, 50.0), (grouped, 52.0)],
                          single_layer={4: {"a": [40.0]}, PaletteFormat(3, 16): {"a": [38.0]}}, sizes=sizes,
                          protocol="apple")
    data = to_apple_json(report)
    assert list(data["recipes"]) == [per_tensor.key] and data["recipes"][per_tensor.key] == {"a": 4, "b": 8}
    assert data["mbp_search"]["format_recipes"] == {grouped.key: {"a": "3g16", "b": 4}}
    assert grouped.key not in data["baselines"] and data["mbp_search"]["recipe_info"][grouped.key]["psnr"] == 52.0
    assert list(data["single_layer"]) == ["4"] and list(data["mbp_search"]["format_single_layer"]) == ["3g16"]
    _, recipes = parse_recipe_file(data)
    assert recipes == {per_tensor.key: per_tensor.bits, grouped.key: grouped.bits}
    assert math.isclose(grouped.avg_bits, (6400 * 3 + 4 * 16 * 8 + 2400 * 4) / 8800)



def test_refinement_over_grouped_formats_never_measures_an_unfit_format():
    """The measured refinement moves layers between formats: every map it asks to measure, and
    the map it returns, stay within the budget (sizes by hand, LUTs included) and never give a
    layer a group size that does not divide its output channels."""
    from search.recipes.refine import refine

    moved = 0
    for seed in range(6):
        table, sizes, unfit = _problem(seed)
        budget = 0.6 * sum(_bits_by_hand(l, FLOAT16) for l in LAYERS) / 8 / 1e6  # room to move up and down
        start = optimal_for_budget(table, sizes, max_size_mb=budget).bits
        asked = []

        def measure(maps):
            asked.extend(maps)
            return [predict_psnr(table, m) - 0.1 * sum(PaletteFormat.of(f).grouped for f in m.values()) for m in maps]

        r = refine(table, sizes, {"knapsack": start}, measure, evals=12, max_size_mb=budget)
        assert r.bits in asked and asked[0] == start
        moved += len(asked) - 1
        for m in asked:
            assert not any((l, f) in unfit for l, f in m.items()), m
            assert sum(_bits_by_hand(l, PaletteFormat.of(f)) for l, f in m.items()) / 8 / 1e6 <= budget + 1e-12
    assert moved > 0  # the refinement did explore other formats
