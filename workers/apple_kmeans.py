"""Apple's k-means for small tensors: coremltools' own call, kept as a `Palette`.

Apple's script palettizes every weight with ``_get_kmeans_lookup_table_and_weight(nbits, fp16)``
(coremltools). From 10,000 float16 elements on, that is kmeans1d, the optimal 1-D k-means that
`workers.palettize.kmeans_palette` reproduces from the bit-pattern histogram. Below 10,000 it is
scikit-learn's ``KMeans(init="k-means++", n_init=1, tol=1e-2, random_state=0)``: a heuristic
whose k-means++ seeds are drawn by element position, so its result depends on the tensor itself,
not only on its histogram, and only that very call reproduces it. Under Apple's protocol a
candidate that small (a ``--min-size`` under 10,000) is therefore fitted here, from its values, by
coremltools' function (``apple_palette``); `workers.palette_formats.fit_palette` decides when.

The LUT coremltools returns is in scikit-learn's cluster order; it is sorted here (the indices
renumbered with it), so every weight keeps exactly the value Apple's call gives it
(``lut[indices]``) while the `Palette` keeps its ascending LUT and its 65,536-entry table.
"""
from __future__ import annotations

import warnings

import numpy as np

from workers.palettize import Palette, PaletteError, _bits, _check_nbits, fp16_histogram, histogram_mse, nearest_code

KMEANS1D_FROM = 10_000  # coremltools' rule: fp16 tensors with at least this many elements go to kmeans1d


def takes_sklearn(numel: int) -> bool:
    """Whether coremltools' k-means call sends a float16 tensor of ``numel`` elements to scikit-learn."""
    return int(numel) < KMEANS1D_FROM


def apple_palette(weights: np.ndarray, nbits: int) -> Palette:
    """The palette Apple's ``fake_palettize`` applies to ``weights`` (float16), through coremltools'
    own ``_get_kmeans_lookup_table_and_weight``: ``palette.dequantize(weights)`` equals its
    ``lut.astype(float16)[indices]`` element for element. Any size works (from 10,000 elements
    on it is coremltools' kmeans1d, which `kmeans_palette` gives faster)."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    nbits = _check_nbits(nbits)
    patterns = _bits(weights).reshape(-1)
    if not np.isfinite(weights).all():
        raise PaletteError("weights contain NaN or inf")
    with warnings.catch_warnings():  # scikit-learn warns when there are fewer distinct values than entries
        warnings.simplefilter("ignore")
        lut, labels = _get_kmeans_lookup_table_and_weight(nbits, np.ascontiguousarray(weights))
    lut = np.asarray(lut).reshape(-1).astype(np.float16)  # as Apple's compress_kmeans casts it
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if lut.shape != (1 << nbits,) or labels.shape != patterns.shape:
        raise PaletteError(f"coremltools returned a LUT of {lut.size} entries and {labels.size} indices for "
                           f"{patterns.size} weights at {nbits} bits")
    order = np.argsort(lut.astype(np.float64), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    lut, labels = lut[order], rank[labels]
    code = nearest_code(lut)  # patterns the tensor does not hold: the nearest entry
    code[patterns] = labels
    if not np.array_equal(code[patterns], labels):  # one value, one cluster: a table can hold it
        raise PaletteError("coremltools put equal weights in different clusters")
    code = code.astype(np.uint8)
    return Palette(nbits, lut, code, histogram_mse(fp16_histogram(weights), lut, code))
