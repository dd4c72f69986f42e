"""What the PSNR-vs-size figure draws, read from the matplotlib Figure's artists (`figure`), with
every expected coordinate worked out by hand below; `plot_report` writes that figure as a PNG.

Sizes: a=100, b=200, c=300, d=400 weights (1000 in all); a b-bit per-tensor layer saves
(16 - b)/16 of its float16 size, so after the first k layers of the order the reduction is
100 * sum((16 - b) * size) / (16 * 1000) %.
"""

import math

import pytest

from search.recipes.apple_json import SearchReport
from search.recipes.apple_rule import Recipe
from search.recipes.plot import cumulative_curve, figure, plot_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAP = 150.0  # PSNRs above this (bit-exact runs: ~209 dB, inf) are drawn at the cap
SIZES = {"a": 100, "b": 200, "c": 300, "d": 400}
ORDER = ["a", "b", "c", "d"]
CUM = {
    1: {"a": [40.0, 40.0], "b": [30.0, 31.0], "c": [20.0, 20.0], "d": [10.0, 10.0]},
    4: {"a": [50.0, 50.0], "b": [45.0, 45.0], "c": [35.0, 35.0], "d": [25.0, 25.0]},
    8: {"a": [60.0, 60.0], "b": [55.0, 55.0], "c": [50.0, 50.0], "d": [42.0, math.inf]},
}
# By hand: 1-bit saves 15/16 (1500, 3000, 4500, 6000 of 16000), 4-bit 12/16, 8-bit 8/16.
CURVES = {"1-bit": ([9.375, 28.125, 56.25, 93.75], [40.0, 30.5, 20.0, 10.0]),
          "4-bit": ([7.5, 22.5, 45.0, 75.0], [50.0, 45.0, 35.0, 25.0]),
          "8-bit": ([5.0, 15.0, 30.0, 50.0], [60.0, 55.0, 50.0, CAP])}  # d: mean of 42 and inf, capped


def _recipe(avg_bits: float, strategy: str = "apple") -> Recipe:
    return Recipe(f"recipe_{avg_bits:.2f}_bit_mixedpalette", {}, avg_bits, 1.0, None, strategy)


def _lines(fig) -> dict:
    ax = fig.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line) for line in ax.get_lines()}


def _legend(fig) -> list[str]:
    legend = fig.axes[0].get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def _full_report() -> SearchReport:
    # 16.00 b keeps every layer in float16: 209 dB (bit-exact) is drawn at the cap, x = 0 %.
    recipes = [(_recipe(16.0), 209.0), (_recipe(6.0), 50.0), (_recipe(4.0), 40.0), (_recipe(2.0), 30.0)]
    return SearchReport("org/model", {"original": 210.0, "linear_8bit": 40.0}, recipes, cumulative=CUM,
                        order={b: ORDER for b in CUM}, sizes=SIZES, protocol="apple")


def test_full_report_draws_curves_baselines_frontier_and_recipes():
    fig = figure(_full_report(), frontier=[(60.0, 35.0), (10.0, 55.0), (80.0, math.inf)])
    lines = _lines(fig)
    for name, (xs, ys) in CURVES.items():  # one curve per depth, measured points only, capped
        assert lines[name][0] == pytest.approx(xs) and lines[name][1] == pytest.approx(ys), name
    x, y, _ = lines["8-bit (linear quant)"]  # Apple's per-tensor int8 baseline, at 50 % (8 of 16 bits)
    assert (x, y) == ([50.0], [40.0])
    assert any(line.get_ydata()[0] == line.get_ydata()[1] == 40.0 for line in fig.axes[0].get_lines()
               if line.get_label().startswith("_"))  # its iso-dB line
    assert "original (reference)" not in lines  # 210 dB lies above the cap: not drawn
    assert lines["optimal frontier"][:2] == ([10.0, 60.0, 80.0], [55.0, 35.0, CAP])  # sorted by x, inf capped
    xs, ys, series = lines["Apple's recipes"]  # 100 * (1 - bits / 16), ordered by x
    assert (xs, ys) == ([0.0, 62.5, 75.0, 87.5], [CAP, 50.0, 40.0, 30.0])
    assert series.get_marker() == "o"
    labels = sorted(t.get_text() for t in fig.axes[0].texts)
    assert labels == ["16.00b", "2.00b", "4.00b", "6.00b"]
    assert _legend(fig) == ["1-bit", "4-bit", "8-bit", "8-bit (linear quant)", "optimal frontier", "Apple's recipes"]
    ax = fig.axes[0]
    assert ax.get_title() == "org/model" and ax.get_xlim() == (0.0, 100.0)
    assert ax.get_xlabel() == "Model size reduction of candidate layers vs float16 (%)"
    assert ax.get_ylabel() == "Signal integrity (PSNR, dB)"


def test_original_drawn_when_below_the_cap_and_classic_baseline_name():
    report = SearchReport("m", {"original": 90.0, "linear_8bit": 41.0, "linear_8bit_per_channel": 44.0},
                          cumulative={4: CUM[4]}, order={4: ORDER}, sizes=SIZES)  # protocol classic
    lines = _lines(figure(report))
    original = lines["original (reference)"]
    assert list(original[1]) == [90.0, 90.0] and original[2].get_linestyle() == "--"
    assert lines["8-bit (linear quant)"][:2] == ([50.0], [44.0])  # classic: the per-channel baseline, not Apple's


def test_partial_report_draws_what_is_measured():
    recipes = [(_recipe(3.5), None)]
    report = SearchReport("org/model", {"original": math.inf}, recipes,
                          cumulative={4: {"a": [50.0], "c": [35.0]}},  # gaps in the order, one depth only
                          order={4: ORDER, 8: ORDER}, sizes=SIZES)
    fig = figure(report)
    lines = _lines(fig)
    assert set(lines) == {"4-bit"}  # 8-bit has an order but no point; inf original not drawn; recipe not measured
    assert lines["4-bit"][:2] == ([7.5, 45.0], [50.0, 35.0])  # a: 1200/16000, a+b+c: 7200/16000
    assert [t.get_text() for t in fig.axes[0].texts] == ["1 recipe(s) not measured yet"]
    assert _legend(fig) == ["4-bit"]


def test_empty_report_says_so():
    fig = figure(SearchReport("m", {}))
    assert _lines(fig) == {}
    assert [t.get_text() for t in fig.axes[0].texts] == ["no measurements yet"]
    assert fig.axes[0].get_legend() is None


def test_plot_report_writes_that_figure_as_png(tmp_path):
    from PIL import Image

    out = plot_report(_full_report(), tmp_path / "sub" / "full.png", frontier=[(10.0, 55.0), (60.0, 35.0)])
    assert out == tmp_path / "sub" / "full.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as img:
        assert img.size == (800, 550)  # 8 x 5.5 in at 100 dpi
        colours = img.convert("RGB").getcolors(1 << 20)
    assert len(colours) > 50  # curves, markers and text drawn, not a blank canvas


def test_cumulative_curve_x_by_hand():
    report = SearchReport("m", {}, cumulative={4: {"a": [50.0], "c": [35.0, 37.0]}},
                          order={4: ORDER}, sizes=SIZES)
    xs, ys = cumulative_curve(report, 4)
    # 4-bit saves 12/16 = 75% of a layer; after a: 100/1000, after c: 600/1000 of candidates
    assert xs == pytest.approx([7.5, 45.0])
    assert ys == [50.0, 36.0]


def _crowded_report():
    """Apple's 6.39 b and 6.00 b recipes a hair apart, an optimal 3.00 b over a refined 2.99 b."""
    recipes = [(_recipe(6.39), 38.2), (_recipe(6.00), 37.9), (_recipe(4.50), 33.0),
               (_recipe(6.20, "optimal"), 38.0), (_recipe(3.00, "optimal"), 30.1), (_recipe(2.99, "refined"), 30.0)]
    return SearchReport("org/model", {"original": 210.0, "linear_8bit": 40.0}, recipes,
                        cumulative=CUM, order={b: ORDER for b in CUM}, sizes=SIZES), recipes


def test_recipe_series_legend_and_labels_that_do_not_collide():
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
