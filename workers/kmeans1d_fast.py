"""Optimal weighted 1-D k-means, compiled with numba: the clusters coremltools' vendored
``kmeans1d`` returns, several times faster.

Why: a search fits one palette per (layer, bit depth), and the 8-bit ones dominate a CPU
search's work (0.9 s each for ~20,000 distinct fp16 values in ``kmeans1d``, which spends most of
it in hash maps and ``std::function`` calls rather than arithmetic). Apple's recipes and Core ML
packages must carry exactly coremltools' palette, so this is not a different k-means: it runs
the same dynamic program (Grønlund et al. 2017, section 2.2: one SMAWK row-minima pass per
cluster count over the same implicit matrix, the same prefix-sum cost, the same backtracking
and running-mean centroids) with the same comparisons on the same doubles, so ties and
rounding resolve the same way. `tests/workers/test_kmeans1d_fast.py` compares it with
coremltools' own ``kmeans1d`` value for value (exact ties, the tiny models' layers, random
tensors at every bit depth).

Input: distinct values in ascending order (a histogram's support), positive weights (counts).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _cost(p, i, j):
    """Weighted squared error of sorted items i..j around their mean (0 for an empty range);
    ``p[m]`` holds the prefix sums of w, w*x and w*x*x over the first m items."""
    if j < i:
        return 0.0
    w = p[j + 1, 0] - p[i, 0]
    s = p[j + 1, 1] - p[i, 1]
    mu = s / w
    r = p[j + 1, 2] - p[i, 2]
    r += w * (mu * mu)
    r -= (2 * mu) * s
    return r


@njit(cache=True, inline="always")
def _entry(prev, p, i, j):
    """Matrix entry (row i = last item, column j = first item of the last cluster): the best
    cost of the items before j with one cluster fewer, plus the cost of j..i. Columns right of
    the diagonal repeat the row's previous cost (the matrix stays totally monotone)."""
    col = i if (j == 0 or i < j - 1) else j - 1
    return prev[col] + _cost(p, j, i)


@njit(cache=True)
def _row_minima(prev, p, n, argmin_out, min_out, cols_buf, top_val, level_start, level_len, pos):
    """SMAWK over the n x n matrix of `_entry`: the column of each row's minimum.

    The recursion (reduce the columns, recurse on the odd rows, fill in the even rows) runs as
    a loop down the levels and back up. At level L the rows are every 2**L-th row starting at
    2**L - 1, so there are n >> L of them. `cols_buf` starts with all n columns (0..n-1, set
    once by the caller) and holds each level's surviving columns after them, one level after
    another.
    """
    # Down: REDUCE at every level; level L's input columns are level L-1's survivors.
    level = 0
    in_start, in_len, out = 0, n, n
    while n >> level:
        nrows, step = n >> level, 1 << level
        first = step - 1
        start, size = out, 0
        for t in range(in_len):
            col = cols_buf[in_start + t]
            while size > 0:  # top_val[s]: the entry of stack slot s's column in row s
                if _entry(prev, p, first + (size - 1) * step, col) >= top_val[size - 1]:
                    break
                size -= 1
            if size < nrows:
                cols_buf[start + size] = col
                top_val[size] = _entry(prev, p, first + size * step, col)
                size += 1
        level_start[level], level_len[level] = start, size
        in_start, in_len = start, size
        out = start + size
        level += 1
    # Up: INTERPOLATE the even rows of each level from the odd rows' answers below.
    for lv in range(level - 1, -1, -1):
        nrows, step = n >> lv, 1 << lv
        first = step - 1
        start_c, ncols = level_start[lv], level_len[lv]
        for idx in range(ncols):
            pos[cols_buf[start_c + idx]] = idx
        lo = 0
        for r in range(0, nrows, 2):
            row = first + r * step
            hi = ncols - 1
            if r < nrows - 1:
                hi = pos[argmin_out[first + (r + 1) * step]]
            best_c = cols_buf[start_c + lo]
            best = _entry(prev, p, row, best_c)
            for c in range(lo + 1, hi + 1):
                col = cols_buf[start_c + c]
                v = _entry(prev, p, row, col)
                if v < best:
                    best_c, best = col, v
            argmin_out[row], min_out[row] = best_c, best
            lo = hi


@njit(cache=True)
def _cluster(x, w, k):
    n = x.size
    p = np.zeros((n + 1, 3))
    for i in range(n):
        p[i + 1, 0] = w[i] + p[i, 0]
        p[i + 1, 1] = w[i] * x[i] + p[i, 1]
        p[i + 1, 2] = w[i] * x[i] * x[i] + p[i, 2]
    back = np.zeros((k, n), dtype=np.int32)
    prev, cur = np.empty(n), np.empty(n)
    for i in range(n):
        prev[i] = _cost(p, 0, i)
    top_val = np.empty(n)
    cols_buf = np.empty(3 * n + 64, dtype=np.int64)  # level sizes halve: n + n + n/2 + ... < 3n
    cols_buf[:n] = np.arange(n)  # every level 0's input columns; never overwritten
    level_start = np.zeros(64, dtype=np.int64)
    level_len = np.zeros(64, dtype=np.int64)
    pos = np.zeros(n, dtype=np.int64)
    for kk in range(1, k):
        _row_minima(prev, p, n, back[kk], cur, cols_buf, top_val, level_start, level_len, pos)
        prev, cur = cur, prev
    clusters = np.zeros(n, dtype=np.int64)
    centroids = np.zeros(k)
    t, kk, last = n, k - 1, n - 1
    while True:
        end = t
        t = back[kk, last]
        c = 0.0
        for i in range(t, end):
            clusters[i] = kk
            c += (x[i] - c) * (p[i + 1, 0] - p[i, 0]) / (p[i + 1, 0] - p[t, 0])
        centroids[kk] = c
        kk -= 1
        last = t - 1
        if t <= 0:
            break
    return clusters, centroids


def cluster(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each value, centroids) for distinct ascending ``values`` with ``weights``."""
    x = np.ascontiguousarray(values, dtype=np.float64)
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if x.ndim != 1 or x.shape != w.shape or x.size == 0:
        raise ValueError(f"values and weights must be non-empty 1-D arrays of one length, got {x.shape} and {w.shape}")
    if (np.diff(x) <= 0).any() or not (w > 0).all():
        raise ValueError("values must be distinct and ascending, weights positive")
    if not 1 <= k <= x.size:
        raise ValueError(f"k must be between 1 and the number of values ({x.size}), got {k}")
    return _cluster(x, w, int(k))


if __name__ == "__main__":  # `python -m workers.kmeans1d_fast`: compile once into numba's cache (setup)
    cluster(np.arange(3.0), np.ones(3), 2)
