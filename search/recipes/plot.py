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
from typing import Sequence

import numpy as np

from search.recipes.apple_json import SearchReport
from common.formats import FLOAT16_BITS, layer_bits
from workers.evaluation.protocol import LINEAR8_BASELINE

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


def plot_report(
    report: SearchReport,
    path: Path,
    *,
    frontier: list[tuple[float, float]] | None = None,
) -> Path:
    """Write the PSNR-vs-size PNG for ``report`` to ``path`` and return ``path``.

    Draws one cumulative curve per measured bit depth, the linear 8-bit point (50%) and its
    iso-dB line, the measured recipes as labelled markers joined as "mixed-bit", the
    reference ``original`` as a dashed line when finite and below PLOT_MAX_PSNR, and an
    optional ``frontier`` [(reduction %, PSNR)] labelled "optimal".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: the curves alone need no matplotlib
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(8, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = False

    for nbits in sorted(set(report.cumulative) | set(report.order)):  # formats: "4-bit", "4g16-bit"
        xs, ys = cumulative_curve(report, nbits)
        if xs:
            ax.plot(xs, ys, "-", marker="." if len(xs) < 30 else None, label=f"{nbits}-bit")
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

    measured = [(reduction_percent(r.avg_bits), _mean(p), r) for r, p in report.recipes]
    measured = sorted(((x, y, r) for x, y, r in measured if y is not None), key=lambda m: m[:2])
    if measured:
        ax.plot(
            [m[0] for m in measured], [m[1] for m in measured], "k-o",
            markersize=6, linewidth=1, label="mixed-bit recipes",
        )
        for x, y, r in measured:
            ax.annotate(f"{r.avg_bits:.2f}b", (x, y), textcoords="offset points",
                        xytext=(4, 6), fontsize=8)
        drawn = True

    if frontier:
        fx, fy = zip(*sorted(frontier))
        ax.plot(fx, [min(float(v), PLOT_MAX_PSNR) for v in fy], "g--", label="optimal")
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
    if drawn:
        ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
