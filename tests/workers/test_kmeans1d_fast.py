"""workers.kmeans1d_fast against coremltools' own vendored ``kmeans1d``, value for value.

The palettes a search stores must be exactly coremltools' (Apple's recipes, Core ML's LUTs), so
clusters and centroids are compared with ``==`` on exact ties, on fp16 histograms of several
shapes at every bit depth, and on random weighted data.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from workers import kmeans1d_fast

logging.getLogger("coremltools").setLevel(logging.ERROR)


def reference(x, w, k):
    from coremltools._deps import _HAS_KMEANS1D, _kmeans1d

    assert _HAS_KMEANS1D, "coremltools' kmeans1d extension is missing"
    fit = _kmeans1d.cluster(x, k, weights=w)
    return list(fit.clusters), list(fit.centroids)


def check(x, w, k):
    clusters, centroids = kmeans1d_fast.cluster(x, w, k)
    ref_clusters, ref_centroids = reference(x, w, k)
    assert clusters.tolist() == ref_clusters
    assert centroids.tolist() == ref_centroids  # bit for bit, not approximately


def test_exact_ties_resolve_as_kmeans1d():
    """Equally spaced, equally weighted values: many partitions cost exactly the same."""
    for n in range(1, 33):
        x, w = np.arange(n, dtype=np.float64), np.ones(n)
        for k in range(1, n + 1):
            check(x, w, k)


def test_symmetric_weights_and_duplicated_gaps():
    x = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0])
    w = np.array([5.0, 1.0, 5.0, 2.0, 5.0, 1.0, 5.0, 3.0, 3.0, 3.0])
    for k in range(1, x.size + 1):
        check(x, w, k)


def fp16_support(values: np.ndarray):
    """The distinct values and counts of an fp16 tensor, as the palette code passes them."""
    uniq, counts = np.unique(values.astype(np.float16).astype(np.float64), return_counts=True)
    return uniq, counts.astype(np.float64)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("shape", ["normal", "heavy_tail", "few_values"])
def test_fp16_histograms_at_every_depth(shape, nbits):
    rng = np.random.default_rng(nbits)
    if shape == "normal":
        v = rng.standard_normal(40_000) * 0.02
    elif shape == "heavy_tail":
        v = rng.standard_t(2, 40_000) * 0.01
    else:
        v = rng.integers(-40, 40, 5_000) / 64.0  # 80 values on an exact grid: ties likely
    x, w = fp16_support(v)
    check(x, w, min(1 << nbits, x.size))


def test_random_weighted_data():
    rng = np.random.default_rng(7)
    for _ in range(40):
        n = int(rng.integers(1, 400))
        x = np.unique(rng.standard_normal(n))
        w = rng.integers(1, 50, x.size).astype(np.float64)
        check(x, w, int(rng.integers(1, x.size + 1)))


@pytest.mark.parametrize("values, weights, k, match", [
    ([], [], 1, "non-empty"),
    ([1.0, 0.0], [1, 1], 1, "ascending"),
    ([0.0, 0.0], [1, 1], 1, "distinct"),
    ([0.0, 1.0], [1, 0], 1, "positive"),
    ([0.0, 1.0], [1], 1, "one length"),
    ([0.0, 1.0], [1, 1], 3, "k must be"),
    ([0.0, 1.0], [1, 1], 0, "k must be"),
])
def test_bad_input(values, weights, k, match):
    with pytest.raises(ValueError, match=match):
        kmeans1d_fast.cluster(np.array(values, dtype=np.float64), np.array(weights, dtype=np.float64), k)
