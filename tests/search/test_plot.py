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


def _crowded_report():
    """Apple's 6.39 b and 6.00 b recipes a hair apart, an optimal 3.00 b over a refined 2.99 b."""
    from search.recipes.apple_rule import Recipe

    def recipe(bits, strategy, key):
        return Recipe(key, {}, bits, 1.0, None, strategy)

    recipes = [(recipe(6.39, "apple", "recipe_6.39_bit_mixedpalette"), 38.2),
               (recipe(6.00, "apple", "recipe_6.00_bit_mixedpalette"), 37.9),
               (recipe(4.50, "apple", "recipe_4.50_bit_mixedpalette"), 33.0),
               (recipe(6.20, "optimal", "recipe_6.20_bit_mixedpalette_optimal"), 38.0),
               (recipe(3.00, "optimal", "recipe_3.00_bit_mixedpalette_optimal"), 30.1),
               (recipe(2.99, "refined", "recipe_2.99_bit_mixedpalette_refined"), 30.0)]
    return SearchReport("org/model", {"original": 210.0, "linear_8bit": 40.0}, recipes,
                        cumulative=CUM, order={b: ORDER for b in CUM}, sizes=SIZES), recipes


def test_recipe_series_legend_and_labels_that_do_not_collide():
    from search.recipes.plot import figure

    report, recipes = _crowded_report()
    fig = figure(report, frontier=[(10.0, 55.0), (60.0, 35.0)])
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    series = {"Apple's recipes": 3, "optimal recipes": 2, "refined recipes": 1}
    for name, n in series.items():  # separate marked series, each in the legend
        assert len(lines[name].get_xdata()) == n and lines[name].get_marker() not in (None, "None", "")
    assert len({lines[name].get_marker() for name in series}) == 3
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert set(series) <= legend

    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text().endswith("b")]
    assert sorted(t.get_text() for t in labels) == sorted(f"{r.avg_bits:.2f}b" for r, _ in recipes)
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):  # no two labels share a pixel (plain interval arithmetic)
        for b in boxes[i + 1:]:
            assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0, (a, b)
