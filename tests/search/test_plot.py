"""plot_report writes a real PNG for full, partial and empty reports."""

import math

import pytest

from search.recipes.apple_json import SearchReport
from search.recipes.plot import cumulative_curve, plot_report
from search.recipes.apple_rule import apple_recipes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = {"a": 100, "b": 200, "c": 300, "d": 400}
ORDER = ["a", "b", "c", "d"]
CUM = {
    1: {"a": [40.0, 40.0], "b": [30.0, 31.0], "c": [20.0, 20.0], "d": [10.0, 10.0]},
    4: {"a": [50.0, 50.0], "b": [45.0, 45.0], "c": [35.0, 35.0], "d": [25.0, 25.0]},
    8: {"a": [60.0, 60.0], "b": [55.0, 55.0], "c": [50.0, 50.0], "d": [42.0, math.inf]},
}


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000


def _means():
    return {b: {l: sum(v) / len(v) for l, v in per.items()} for b, per in CUM.items()}


def test_full_report(tmp_path):
    recipes = apple_recipes(_means(), SIZES, [45.0, 38.0, 20.0])
    report = SearchReport(
        "org/model", {"original": 210.0, "linear_8bit": 40.0},
        [(r, 50.0 - i * 10) for i, r in enumerate(recipes)],
        cumulative=CUM, order={b: ORDER for b in CUM}, sizes=SIZES,
    )
    out = plot_report(report, tmp_path / "sub" / "full.png",
                      frontier=[(10.0, 55.0), (60.0, 35.0)])
    assert out == tmp_path / "sub" / "full.png"
    _assert_png(out)


def test_partial_report(tmp_path):
    recipes = apple_recipes(_means(), SIZES, [38.0])
    report = SearchReport(
        "org/model", {"original": math.inf},
        [(recipes[0], None)],
        cumulative={4: {"a": [50.0], "c": [35.0]}},  # gaps in the order, one depth only
        order={4: ORDER, 8: ORDER},
        sizes=SIZES,
    )
    _assert_png(plot_report(report, tmp_path / "partial.png"))


def test_empty_report(tmp_path):
    _assert_png(plot_report(SearchReport("m", {}), tmp_path / "empty.png"))


def test_cumulative_curve_x_by_hand():
    report = SearchReport("m", {}, cumulative={4: {"a": [50.0], "c": [35.0, 37.0]}},
                          order={4: ORDER}, sizes=SIZES)
    xs, ys = cumulative_curve(report, 4)
    # 4-bit saves 12/16 = 75% of a layer; after a: 100/1000, after c: 600/1000 of candidates
    assert xs == pytest.approx([7.5, 45.0])
    assert ys == [50.0, 36.0]
