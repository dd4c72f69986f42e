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
        return self._along(predicted, 0)

    def invert(self, target: float) -> float:
        """The smallest prediction whose corrected value reaches ``target``."""
        return self._along(target, 1)

    def _along(self, value: float, side: int) -> float:
        """Map ``value`` from the knots' ``side`` (0: predicted, 1: corrected) to the other: linear
        on the first segment that reaches it, constant offsets beyond the ends, identity without knots."""
        v = float(value)
        if not self.knots or not math.isfinite(v):
            return v
        src, dst = np.array(self.knots).T[[side, 1 - side]]
        if v <= src[0]:
            return v + dst[0] - src[0]
        if v > src[-1]:
            return v + dst[-1] - src[-1]
        i = int(np.searchsorted(src, v, side="left"))  # first knot at or above v (i >= 1)
        s0, s1, d0, d1 = src[i - 1], src[i], dst[i - 1], dst[i]
        return float(d1 if s1 == s0 else d0 + (v - s0) * (d1 - d0) / (s1 - s0))


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
