"""Predicted PSNRs corrected by the search's own end-to-end measurements.

The additive noise model (``noise_model``) is blind to two things every search has measured
anyway: how the layers' errors interact (trained weights: 1-2.5 dB either way on the bench
model) and what float16 arithmetic does to a recipe as a whole (isolated measurements near the
evaluation floor cannot resolve a layer's own noise; summed, they predicted 5-7.5 dB too little
on the bench model). Every end-to-end measurement of the search - the points of Apple's
cumulative curves, every measured recipe - is a (predicted, measured) pair on the same model,
so the prediction for a new recipe is corrected by what the model got wrong on the measured
recipes it predicted most alike: the median of (measured - predicted) over the ``NEIGHBOURS``
pairs nearest in predicted dB (none further than ``MAX_GAP_DB``). The correction is a
non-decreasing map of the prediction, so it never reorders recipes and a PSNR target can be
turned back into a target for the model (``invert``). Fewer than ``MIN_PAIRS`` pairs: no
correction. Pure: the pairs come from ``strategy.calibration``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

NEIGHBOURS = 15  # pairs whose median error corrects a prediction
MAX_GAP_DB = 6.0  # a pair further than this (in predicted dB) says nothing about a prediction
MIN_PAIRS = 3


@dataclass(frozen=True)
class Calibration:
    """A non-decreasing piecewise-linear map of predicted dB; constant offsets beyond its ends.
    No knots: the identity."""

    knots: tuple[tuple[float, float], ...] = ()  # (predicted, corrected), both non-decreasing
    pairs: int = 0

    def apply(self, predicted: float) -> float:
        p = float(predicted)
        if not self.knots or not math.isfinite(p):
            return p
        xs, ys = np.array(self.knots).T
        if p <= xs[0]:
            return p + ys[0] - xs[0]
        if p >= xs[-1]:
            return p + ys[-1] - xs[-1]
        return float(np.interp(p, xs, ys))

    def invert(self, target: float) -> float:
        """The smallest prediction whose corrected value reaches ``target``."""
        t = float(target)
        if not self.knots or not math.isfinite(t):
            return t
        xs, ys = np.array(self.knots).T
        if t <= ys[0]:
            return t - (ys[0] - xs[0])
        if t > ys[-1]:
            return t - (ys[-1] - xs[-1])
        i = int(np.searchsorted(ys, t, side="left"))  # first knot with ys >= t (i >= 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return float(x1 if y1 == y0 else x0 + (t - y0) * (x1 - x0) / (y1 - y0))


def calibrate(pairs: Iterable[tuple[float, float]], neighbours: int = NEIGHBOURS,
              max_gap_db: float = MAX_GAP_DB) -> Calibration:
    """The correction from (predicted, measured) dB pairs; pairs with a non-finite value are left out
    (a bit-exact 'original' is +inf)."""
    pts = np.array([(float(p), float(m)) for p, m in pairs if math.isfinite(p) and math.isfinite(m)]).reshape(-1, 2)
    if len(pts) < MIN_PAIRS:
        return Calibration(pairs=len(pts))
    pred, err = pts[:, 0], pts[:, 1] - pts[:, 0]
    knots = []
    for x in np.unique(pred):
        gap = np.abs(pred - x)
        near = np.argsort(gap, kind="stable")[:neighbours]
        near = near[gap[near] <= max_gap_db]
        knots.append((x, x + float(np.median(err[near]))))
    xs = np.array([k[0] for k in knots])
    ys = np.maximum.accumulate(np.array([k[1] for k in knots]))  # never reorder recipes
    return Calibration(tuple(zip(xs.tolist(), ys.tolist())), len(pts))
