"""Grouped (per output-channel group) and 3-bit palettes, against coremltools' own functions:
its ``per_grouped_channel`` k-means (``palettize_weights.grouped_channelwise_compress``, which
uses kmeans1d for groups of 10,000+ fp16 elements) and its per-tensor k-means at 3 bits."""
import logging

import numpy as np
import pytest
import torch

from common.formats import PaletteFormat
from workers.palette_formats import GroupedPalette, dequantize_torch, fit_palette, load_palette, save_palette
from workers.palettize import PaletteError, kmeans_palette

logging.getLogger("coremltools").setLevel(logging.ERROR)


def _weight(out=64, inner=640, seed=0):
    """Conv/linear-like weight whose channel groups differ in scale (what grouped LUTs exploit)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.005, 0.05, out)[:, None]
    return (rng.standard_normal((out, inner)) * scale).astype(np.float16)


@pytest.mark.parametrize("nbits, group", [(2, 16), (3, 16), (4, 16), (4, 32), (6, 64)])
def test_grouped_palette_equals_coremltools_per_grouped_channel(nbits, group):
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    w = _weight()  # groups of group x 640 >= 10,240 elements: coremltools takes its kmeans1d path
    ref = palettize_weights.grouped_channelwise_compress(w, "KMEANS", nbits, 0, group)
    pal = fit_palette(w, f"{nbits}g{group}")
    assert isinstance(pal, GroupedPalette) and pal.format == PaletteFormat(nbits, group)
    ref_lut = np.asarray(ref.lut).reshape(64 // group, 2**nbits)
    assert np.array_equal(pal.luts.view(np.uint16), ref_lut.astype(np.float16).view(np.uint16))
    assert np.array_equal(pal.indices(w), np.asarray(ref.indices).astype(np.uint8))
    dense = np.take_along_axis(ref_lut, np.asarray(ref.indices).reshape(64 // group, -1).astype(np.int64), 1)
    assert np.array_equal(pal.dequantize(w).view(np.uint16), dense.astype(np.float16).reshape(w.shape).view(np.uint16))
    mse = float(np.mean((w.astype(np.float64) - dense.reshape(w.shape).astype(np.float64)) ** 2))
    assert pal.weight_mse == pytest.approx(mse, rel=1e-9)


def test_grouped_is_never_worse_and_wins_on_channel_groups_of_different_scales():
    # Each group's optimal LUT is at least as good on it as the per-tensor LUT (a feasible one).
    w = _weight()
    assert fit_palette(w, "4g16").weight_mse <= fit_palette(w, 4).weight_mse * (1 + 1e-6)
    sorted_scales = w[np.argsort(np.abs(w.astype(np.float32)).mean(1))]  # groups of similar channels
    assert fit_palette(sorted_scales, "4g16").weight_mse < fit_palette(sorted_scales, 4).weight_mse


def test_three_bits_equals_coremltools_kmeans():
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w = _weight(16, 1000, seed=3)
    lut, idx = _get_kmeans_lookup_table_and_weight(3, w)
    pal = kmeans_palette(w, 3)
    assert np.array_equal(pal.lut.view(np.uint16), lut.astype(np.float16).view(np.uint16))
    assert np.array_equal(pal.indices(w).reshape(-1), np.asarray(idx).reshape(-1))


def test_dequantize_torch_matches_numpy_and_files_round_trip(tmp_path):
    w = _weight(32, 320, seed=5).reshape(32, 20, 4, 4)  # a conv weight: groups along axis 0
    pal = fit_palette(w, "3g8")
    out = dequantize_torch(torch.from_numpy(w), pal).numpy()
    assert np.array_equal(out.view(np.uint16), pal.dequantize(w).view(np.uint16))
    for g, group in enumerate(pal.groups):  # group g is exactly k-means of channels [8g, 8g+8)
        assert group == kmeans_palette(w[8 * g:8 * g + 8], 3)
    save_palette(tmp_path / "p.npz", pal)
    back = load_palette(tmp_path / "p.npz")
    assert back == pal and back.weight_mse == pytest.approx(pal.weight_mse, rel=1e-12)
    per_tensor = fit_palette(w, 4)
    save_palette(tmp_path / "t.npz", per_tensor)  # per-tensor files are written as before
    assert load_palette(tmp_path / "t.npz") == per_tensor


def test_grouped_errors():
    w = _weight(48, 100)
    with pytest.raises(PaletteError, match="does not divide 48"):
        fit_palette(w, "4g32")
    with pytest.raises(PaletteError, match="float16"):
        fit_palette(w, 16)
    with pytest.raises(PaletteError, match="do not match"):
        fit_palette(w, "4g16").indices(w[:32])


def test_grouped_palette_from_device_histograms_equals_the_direct_fit():
    """What the CPU palette tasks fit from the evaluators' per-group histograms is `fit_palette`."""
    from workers.evaluation.device_ops import histogram_torch
    from workers.palette_formats import palette_from_histograms

    w = _weight(32, 320, seed=7)
    for fmt in ("3g8", "4g16", "2g32"):
        groups = 32 // PaletteFormat.of(fmt).group_size
        counts = histogram_torch(torch.from_numpy(w), groups)
        assert counts.shape == (groups, 1 << 16) and int(counts.sum()) == w.size
        assert palette_from_histograms(counts, fmt) == fit_palette(w, fmt)
    assert palette_from_histograms(histogram_torch(torch.from_numpy(w)), 4) == fit_palette(w, 4)
