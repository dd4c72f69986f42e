"""Time workers.palettize.kmeans_lut against coremltools' k-means on one large fp16 weight.

    python benchmarks/kmeans_speed.py [--numel 14700000] [--nbits 1 2 4 6 8] [--repeats 3]

Both run on the same deterministic tensor (normal, std 0.02, plus a few seeded outliers)
in the same process; the MSE of each is measured the same way (fp16 LUT applied to the
indices). The target is ours < 1/5 of coremltools' time at 4 bits. A second table times the
weighted k-means alone: coremltools' vendored kmeans1d against workers.kmeans1d_fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.formats import PALETTE_NBITS  # noqa: E402
from workers.palettize import kmeans_lut  # noqa: E402


def make_weight(numel: int, seed: int = 0) -> np.ndarray:
    """A 2-D fp16 tensor shaped like a Linear/Conv weight: normal body plus rare outliers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(numel, dtype=np.float32) * np.float32(0.02)
    n_out = max(1, numel // 1_000_000)
    w[rng.choice(numel, n_out, replace=False)] = rng.standard_normal(n_out).astype(np.float32) * 0.5
    cols = next(c for c in (2880, 1280, 1000, 640, 320, 1) if numel % c == 0)
    return w.astype(np.float16).reshape(numel // cols, cols)


def mse(w: np.ndarray, lut: np.ndarray, idx: np.ndarray) -> float:
    deq = np.asarray(lut).astype(np.float16)[np.asarray(idx).reshape(w.shape)]
    return float(np.mean((w.astype(np.float64) - deq.astype(np.float64)) ** 2))


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=14_700_000)
    ap.add_argument("--nbits", type=int, nargs="+", default=list(PALETTE_NBITS))
    ap.add_argument("--repeats", type=int, default=3, help="best-of repeats for ours (coremltools runs once)")
    args = ap.parse_args(argv)

    logging.disable(logging.WARNING)  # coremltools' import-time chatter
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w = make_weight(args.numel)
    distinct = int(np.count_nonzero(np.bincount(w.view(np.uint16).ravel(), minlength=1 << 16)))
    print(f"tensor {w.shape} fp16, {w.size:,} elements, {distinct:,} distinct values; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, numpy {np.__version__}")
    print(f"{'nbits':>5} {'coremltools s':>14} {'ours s':>8} {'speed-up':>9} {'coremltools MSE':>16} {'ours MSE':>12} {'rel diff':>10}")
    for nbits in args.nbits:
        t_ref, (lut_ref, wq_ref) = timed(lambda: _get_kmeans_lookup_table_and_weight(nbits, w), 1)
        t_ours, (lut, idx) = timed(lambda: kmeans_lut(w, nbits), args.repeats)
        m_ref, m_ours = mse(w, lut_ref, wq_ref), mse(w, lut, idx)
        rel = (m_ours - m_ref) / m_ref if m_ref else 0.0
        print(f"{nbits:>5} {t_ref:>14.3f} {t_ours:>8.3f} {t_ref / t_ours:>8.1f}x {m_ref:>16.6e} {m_ours:>12.6e} {rel:>+10.2e}")
        del lut_ref, wq_ref
    # The k-means alone, on the same distinct values and counts: coremltools' vendored kmeans1d
    # (what our palettes used before) against workers.kmeans1d_fast (the same program, numba).
    from coremltools._deps import _kmeans1d
    from workers import kmeans1d_fast
    from workers.palettize import fp16_histogram, histogram_support
    x, wt, _ = histogram_support(fp16_histogram(w))
    print(f"\nthe weighted k-means alone on the {x.size:,} distinct values:")
    print(f"{'nbits':>5} {'kmeans1d s':>11} {'kmeans1d_fast s':>16} {'speed-up':>9} {'identical':>10}")
    for nbits in args.nbits:
        k = min(1 << nbits, x.size)
        t_ref, ref = timed(lambda: _kmeans1d.cluster(x, k, weights=wt), 1)
        t_fast, (clusters, centroids) = timed(lambda: kmeans1d_fast.cluster(x, wt, k), args.repeats)
        same = clusters.tolist() == list(ref.clusters) and centroids.tolist() == list(ref.centroids)
        print(f"{nbits:>5} {t_ref:>11.3f} {t_fast:>16.3f} {t_ref / t_fast:>8.1f}x {str(same):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
