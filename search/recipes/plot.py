"""PSNR-vs-size figure of a search, in the spirit of Apple's pre-analysis plot.

x is the size reduction of the candidate layers relative to float16 (numel-weighted bits,
as Apple computes it: a per-tensor LUT ignored, a grouped format's LUTs counted, as in
``common.formats.average_bits``), y the mean PSNR over prompts; one curve per format. Uses a bare
``Figure`` with the Agg canvas (no pyplot), so it needs no display and touches no global
matplotlib state, which matters in a server process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from search.recipes.apple_json import SearchReport
from common.formats import FLOAT16_BITS, layer_bits
from workers.evaluation.protocol import LINEAR8_BASELINE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_MAX_PSNR = 150.0  # above this (bit-exact runs: ~200 dB or inf) values are clipped / not drawn


def _mean(psnrs: Sequence[float] | float | None) -> float | None:
    """Mean PSNR over prompts, None if unusable (no values or NaN); inf is clipped."""
    if psnrs is None:
        return None
    values = [float(psnrs)] if isinstance(psnrs, (int, float)) else [float(p) for p in psnrs]
    if not values or any(math.isnan(v) for v in values):
        return None
    return min(sum(values) / len(values), PLOT_MAX_PSNR)


def reduction_percent(avg_bits: float) -> float:
    """Size reduction (%) of candidates stored at ``avg_bits`` per weight vs float16."""
    return 100.0 * (1.0 - avg_bits / FLOAT16_BITS)


def cumulative_curve(report: SearchReport, nbits) -> tuple[list[float], list[float]]:
    """(x, y) of one depth's cumulative curve: point i = first i layers of the order palettized.

    Only measured points are returned, so partial (and non-contiguous) data plots fine.
    """
    measured = report.cumulative.get(nbits, {})
    order = list(report.order.get(nbits) or measured)
    total = sum(report.sizes.values())
    if not order or total <= 0 or any(layer not in report.sizes for layer in order):
        return [], []
    saved = np.cumsum([FLOAT16_BITS * report.sizes[layer] - layer_bits(report.sizes, layer, nbits, False)
                       for layer in order])
    scale = 100.0 / FLOAT16_BITS / total
    xs, ys = [], []
    for layer, cum in zip(order, saved):
        y = _mean(measured.get(layer))
        if y is not None:
            xs.append(float(cum) * scale)
            ys.append(y)
    return xs, ys


# Recipe series: (strategy, legend label, marker, colour); other strategies share the last style.
SERIES = (("apple", "Apple's recipes", "o", "black"), ("optimal", "optimal recipes", "s", "darkviolet"),
          ("refined", "refined recipes", "^", "crimson"), (None, "other recipes", "D", "tab:brown"))
# Where a recipe's label may go, in points from its marker, tried in this order.
LABEL_OFFSETS = [(dx, dy) for r in (1, 2, 3, 4) for dx, dy in
                 ((5, 5 * r), (5, -9 - 9 * (r - 1)), (-32, 5 * r), (-32, -9 - 9 * (r - 1)))]


def _series(measured: list[tuple[float, float, object]]) -> dict[tuple, list[tuple[float, float, object]]]:
    known = {s[0] for s in SERIES[:-1]}
    out: dict[tuple, list] = {}
    for x, y, r in measured:
        style = next(s for s in SERIES if s[0] == (r.strategy if r.strategy in known else None))
        out.setdefault(style, []).append((x, y, r))
    return out


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: int = 8) -> list:
    """Annotate each (x, y, text) at the first offset where its box overlaps no label placed
    before and stays inside the axes; a label that fits nowhere is left out (its marker and the
    legend still show it). Needs the axes limits final. Returns the placed annotations."""
    renderer = ax.figure.canvas.get_renderer()
    inside, placed, taken = ax.get_window_extent(renderer), [], []
    for x, y, text in sorted(points, key=lambda p: (-p[1], p[0])):
        for dx, dy in LABEL_OFFSETS:
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize)
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            if inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) and \
                    not any(box.overlaps(other) for other in taken):
                placed.append(label)
                taken.append(box)
                break
            label.remove()
    return placed


def figure(report: SearchReport, *, frontier: list[tuple[float, float]] | None = None) -> Figure:
    """The PSNR-vs-size figure of ``report`` (see `plot_report`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: the curves alone need no matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = False

    for nbits in sorted(set(report.cumulative) | set(report.order)):  # formats: "4-bit", "4g16-bit"
        xs, ys = cumulative_curve(report, nbits)
        if xs:
            ax.plot(xs, ys, "-", marker="." if len(xs) < 30 else None, label=f"{nbits}-bit", alpha=0.8)
            drawn = True

    lin8 = _mean(report.baselines.get(LINEAR8_BASELINE[report.protocol]))
    if lin8 is not None:
        ax.plot([50.0], [lin8], "bx", markersize=8, label="8-bit (linear quant)")
        ax.axhline(lin8, color="b", linestyle=":", linewidth=0.8)
        drawn = True

    original = report.baselines.get("original")
    if original is not None and math.isfinite(original) and original <= PLOT_MAX_PSNR:
        ax.axhline(original, color="k", linestyle="--", linewidth=1, label="original (reference)")
        drawn = True

    if frontier:
        fx, fy = zip(*sorted(frontier))
        ax.plot(fx, [min(float(v), PLOT_MAX_PSNR) for v in fy], "g--", linewidth=1, label="optimal frontier")
        drawn = True

    measured = [(reduction_percent(r.avg_bits), _mean(p), r) for r, p in report.recipes]
    measured = sorted(((x, y, r) for x, y, r in measured if y is not None), key=lambda m: m[:2])
    for (_, name, marker, colour), points in _series(measured).items():
        ax.plot([m[0] for m in points], [m[1] for m in points], linestyle="-", marker=marker, color=colour,
                markersize=6, linewidth=0.8, label=name, zorder=3)
        drawn = True

    pending = sum(1 for _, p in report.recipes if p is None)
    if pending:
        ax.text(0.01, 0.01, f"{pending} recipe(s) not measured yet", transform=ax.transAxes,
                fontsize=8, color="gray")
    if not drawn:
        ax.text(0.5, 0.5, "no measurements yet", transform=ax.transAxes,
                ha="center", va="center", color="gray")

    ax.set_xlim(0, 100)
    ax.set_xlabel("Model size reduction of candidate layers vs float16 (%)")
    ax.set_ylabel("Signal integrity (PSNR, dB)")
    ax.set_title(report.model_version)
    ax.grid(True, alpha=0.3)
    if measured:
        ax.margins(y=0.12)  # room for the labels of the highest and lowest recipes
        ax.autoscale_view()
        place_labels(ax, [(x, y, f"{r.avg_bits:.2f}b") for x, y, r in measured])
    if drawn:
        ax.legend(fontsize=8, loc="best")
    return fig


def plot_report(
    report: SearchReport,
    path: Path,
    *,
    frontier: list[tuple[float, float]] | None = None,
) -> Path:
    """Write the PSNR-vs-size PNG for ``report`` to ``path`` and return ``path``.

    Draws one cumulative curve per measured bit depth, the linear 8-bit point (50%) and its
    iso-dB line, the reference ``original`` as a dashed line when finite and below PLOT_MAX_PSNR,
    an optional ``frontier`` [(reduction %, PSNR)], and the measured recipes as one marked series
    per strategy (Apple's, optimal, refined), each labelled with its bits where the label fits
    without covering another.
    """
    path = Path(path)
    fig = figure(report, frontier=frontier)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
