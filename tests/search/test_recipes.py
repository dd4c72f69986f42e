"""Hand-computed tables for search.recipes."""

import math

import numpy as np
import pytest

from common.formats import PALETTE_NBITS as RECIPE_NBITS
from common.formats import average_bits, size_mb
from search.recipes.apple_rule import (
    Recipe,
    apple_recipes,
    apple_thresholds,
    cumulative_order,
    make_recipe,
    recipe_key,
    thresholds,
)

SIZES = {"a": 100, "b": 200, "c": 300, "d": 400}  # 1000 weights in all
# Mean PSNR after palettizing up to and including the layer, per bit depth.
CUMULATIVE = {
    1: {"a": 40.0, "b": 30.0, "c": 20.0, "d": 10.0},
    4: {"a": 50.0, "b": 45.0, "c": 35.0, "d": 25.0},
    8: {"a": 60.0, "b": 55.0, "c": 50.0, "d": 42.0},
}


# ---------------------------------------------------------------- arithmetic


def test_average_bits_by_hand():
    bits = {"a": 1, "b": 4, "c": 8, "d": 8}
    # (100*1 + 200*4 + 300*8 + 400*8) / 1000 = 6500 / 1000
    assert average_bits(bits, SIZES) == pytest.approx(6.5)
    assert average_bits({l: 16 for l in SIZES}, SIZES) == 16.0


def test_missing_layers_count_as_float16():
    # a at 8 bits, the rest 16: (800 + 900*16) / 1000
    assert average_bits({"a": 8}, SIZES) == pytest.approx(15.2)


def test_size_mb_by_hand():
    bits = {"a": 1, "b": 4, "c": 8, "d": 16}
    # a: 100/8 + 2*2 = 16.5; b: 200*4/8 + 16*2 = 132; c: 300 + 256*2 = 812; d: 400*2 = 800
    assert size_mb(bits, SIZES) == pytest.approx((16.5 + 132 + 812 + 800) / 1e6)
    assert size_mb({l: 16 for l in SIZES}, SIZES) == pytest.approx(2000 / 1e6)


def test_arithmetic_validation():
    with pytest.raises(ValueError, match="'zz'.*not a candidate"):
        average_bits({"zz": 4}, SIZES)
    with pytest.raises(ValueError, match="bits 5"):
        size_mb({"a": 5}, SIZES)
    with pytest.raises(ValueError, match="empty"):
        average_bits({}, {})
    with pytest.raises(ValueError, match="positive integer"):
        average_bits({}, {"a": 0})


def test_recipe_key_and_make_recipe():
    assert recipe_key(4.5) == "recipe_4.50_bit_mixedpalette"
    assert recipe_key(3.14159) == "recipe_3.14_bit_mixedpalette"
    r = make_recipe({"a": 1, "b": 4, "c": 8, "d": 8}, SIZES, threshold=None, strategy="optimal")
    assert r == Recipe("recipe_6.50_bit_mixedpalette", {"a": 1, "b": 4, "c": 8, "d": 8},
                       6.5, size_mb(r.bits, SIZES), None, "optimal")
    assert list(make_recipe({"c": 4}, SIZES).bits) == ["a", "b", "c", "d"]


# ---------------------------------------------------------------- order and thresholds


def test_cumulative_order_descending_ties_in_candidate_order():
    iso = {"b": 40.0, "a": 30.0, "c": 40.0, "d": math.inf}
    assert cumulative_order(iso) == ["d", "b", "c", "a"]  # dict order breaks the tie, as in Apple's sort
    assert cumulative_order(iso, ["a", "c", "b", "d"]) == ["d", "c", "b", "a"]  # module order given
    # An independent reference: Python's stable sort by -psnr over the candidate order.
    cands = ["c", "a", "d", "b"]
    assert cumulative_order(iso, cands) == sorted(cands, key=lambda k: -iso[k])
    with pytest.raises(ValueError, match="NaN"):
        cumulative_order({"a": float("nan")})
    with pytest.raises(ValueError, match="empty"):
        cumulative_order({})


def test_thresholds_endpoints_like_linspace():
    ts = thresholds(80.0, 60.0, 7)
    assert len(ts) == 7
    assert ts[0] == 79.0 and ts[-1] == 65.0  # original - 1 ... linear_8bit + 5
    assert ts == np.linspace(79.0, 65.0, 7).tolist()
    assert all(x > y for x, y in zip(ts, ts[1:]))
    assert thresholds(80.0, 60.0, 1) == [79.0]
    assert thresholds(80.0, 60.0, 2) == [79.0, 65.0]


def test_thresholds_cap():
    assert thresholds(200.0, 60.0, 3, cap=100.0) == [100.0, 82.5, 65.0]
    assert thresholds(math.inf, 60.0, 3, cap=100.0) == [100.0, 82.5, 65.0]
    # cap above original - 1 changes nothing
    assert thresholds(80.0, 60.0, 3, cap=100.0) == [79.0, 72.0, 65.0]


def test_thresholds_validation():
    with pytest.raises(ValueError, match="empty threshold range"):
        thresholds(66.0, 60.0, 3)  # 65 <= 65
    with pytest.raises(ValueError, match="empty threshold range"):
        thresholds(200.0, 60.0, 3, cap=50.0)
    with pytest.raises(ValueError, match="pass a cap"):
        thresholds(math.inf, 60.0, 3)
    with pytest.raises(ValueError, match=">= 1"):
        thresholds(80.0, 60.0, 0)
    with pytest.raises(ValueError, match="NaN"):
        thresholds(float("nan"), 60.0, 3)
    with pytest.raises(ValueError, match="linear_8bit"):
        thresholds(80.0, math.inf, 3)


# ---------------------------------------------------------------- Apple's rule


def test_apple_recipe_by_hand():
    (r,) = apple_recipes(CUMULATIVE, SIZES, [38.0])
    # a: 1-bit 40 > 38; b: 1-bit 30 no, 4-bit 45 yes; c: 20, 35 no, 50 yes; d: 10, 25 no, 42 yes
    assert r.bits == {"a": 1, "b": 4, "c": 8, "d": 8}
    assert r.avg_bits == pytest.approx(6.5)
    assert r.key == "recipe_6.50_bit_mixedpalette"
    assert r.threshold == 38.0 and r.strategy == "apple"
    assert r.size_mb == pytest.approx((16.5 + 132 + 812 + 912) / 1e6)


def test_threshold_is_strictly_above():
    (r,) = apple_recipes(CUMULATIVE, SIZES, [45.0])
    # a: 4-bit 50; b: 4-bit 45 is NOT above 45 -> 8-bit 55; c: 8-bit 50; d: nothing above -> 16
    assert r.bits == {"a": 4, "b": 8, "c": 8, "d": 16}
    assert r.avg_bits == pytest.approx((400 + 1600 + 2400 + 6400) / 1000)


def test_avg_bits_falls_as_threshold_falls():
    ts = [60.0, 45.0, 38.0, 20.0, 5.0]
    rs = apple_recipes(CUMULATIVE, SIZES, ts)
    assert [r.threshold for r in rs] == ts
    assert [r.avg_bits for r in rs] == pytest.approx([16.0, 10.8, 6.5, 3.1, 1.0])
    assert rs[0].bits == {l: 16 for l in SIZES}  # 60 is not above 60
    assert rs[3].bits == {"a": 1, "b": 1, "c": 4, "d": 4}
    # At realistic sizes (> 1e5 weights) the LUT is negligible and size falls too; on the
    # tiny table above an 8-bit LUT (512 B) outweighs the layer, so check it scaled up.
    big = {l: n * 1000 for l, n in SIZES.items()}
    sizes = [r.size_mb for r in apple_recipes(CUMULATIVE, big, ts)]
    assert all(x > y for x, y in zip(sizes, sizes[1:]))


def test_identical_maps_keep_first():
    rs = apple_recipes(CUMULATIVE, SIZES, [38.0, 37.0, 36.0, 20.0])
    assert [r.threshold for r in rs] == [38.0, 20.0]


@pytest.mark.parametrize("ts", [[40.0, 44.0], [44.0, 40.0]])
def test_distinct_maps_same_key_later_wins_like_apple(ts):
    sizes = {"x": 100_000, "y": 1}
    cum = {4: {"y": 41.0}, 8: {"x": 50.0, "y": 45.0}}
    rs = apple_recipes(cum, sizes, ts)
    # 44 -> y at 8 bits (avg 8.00); 40 -> y at 4 bits (avg 7.99996, also "8.00")
    assert len(rs) == 1
    assert rs[0].key == "recipe_8.00_bit_mixedpalette"
    # Apple's dict: the later threshold's recipe overwrites the earlier one under the same key.
    assert rs[0].threshold == ts[-1] and rs[0].bits == {"x": 8, "y": 8 if ts[-1] == 44.0 else 4}


def test_default_bits_fallback_and_apple_thresholds():
    (r,) = apple_recipes(CUMULATIVE, SIZES, [45.0], default_bits=4)
    assert r.bits == {"a": 4, "b": 8, "c": 8, "d": 4}  # d passes no threshold: the default depth
    assert apple_thresholds(80.0, 60.0, 3) == np.linspace(79.0, 65.0, 3).tolist()
    assert apple_thresholds(66.0, 64.0, 2) == [65.0, 69.0]  # Apple's linspace, even ascending


def test_subset_of_depths_and_unmeasured_layers():
    cum = {8: {"a": 60.0, "b": 55.0}, 4: {"a": 50.0}}  # c, d never measured; unordered keys
    (r,) = apple_recipes(cum, SIZES, [48.0])
    assert r.bits == {"a": 4, "b": 8, "c": 16, "d": 16}


def test_infinite_psnr_is_very_high():
    cum = {1: {"a": math.inf}, 8: {"a": 60.0, "b": math.inf}}
    (r,) = apple_recipes(cum, SIZES, [1000.0])
    assert r.bits == {"a": 1, "b": 8, "c": 16, "d": 16}


@pytest.mark.parametrize(
    "cum, sizes, ts, match",
    [
        ({4: {"zz": 40.0}}, SIZES, [30.0], "'zz' that is not in sizes"),
        ({5: {"a": 40.0}}, SIZES, [30.0], "bit depth 5 is not a palette format"),
        ({16: {"a": 40.0}}, SIZES, [30.0], "bit depth 16 is not a palette format"),
        ({4: {"a": float("nan")}}, SIZES, [30.0], r"cumulative\[4\]\['a'\]: PSNR is NaN"),
        ({4: {"a": "40"}}, SIZES, [30.0], "not a number"),
        ({}, SIZES, [30.0], "cumulative is empty"),
        ({4: {}}, SIZES, [30.0], "no measurements"),
        (CUMULATIVE, {}, [30.0], "sizes is empty"),
        (CUMULATIVE, SIZES, [], "thresholds is empty"),
        (CUMULATIVE, SIZES, [float("nan")], "NaN"),
        (CUMULATIVE, SIZES, [math.inf], "finite"),
    ],
)
def test_apple_recipes_validation(cum, sizes, ts, match):
    with pytest.raises(ValueError, match=match):
        apple_recipes(cum, sizes, ts)


def test_nbits_constant():
    assert RECIPE_NBITS == (1, 2, 4, 6, 8)
