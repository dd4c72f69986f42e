"""Tests for workers.palettize, with coremltools' own k-means as the reference (no mocks)."""
import itertools
import logging
import os

import numpy as np
import pytest
import torch

from common.formats import LUT_NBITS as SUPPORTED_NBITS
from workers import palettize as P
from workers.palettize import (
    Palette,
    PaletteError,
    dequantize_torch,
    kmeans_lut,
    kmeans_palette,
    linear_8bit,
    load_palette,
    save_palette,
)

logging.getLogger("coremltools").setLevel(logging.ERROR)


def _normal(n=200_000, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float16)


def _heavy(n=200_000, seed=1):
    """Student-t body plus a few far outliers on both sides (stresses prefix-sum precision)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(2, n) * 0.01
    w[rng.choice(n, 12, replace=False)] = rng.choice([-1, 1], 12) * rng.uniform(5, 300, 12)
    return w.astype(np.float16)


def _outliers(n=200_000, seed=2):
    """Tight body with a handful of huge outliers: naive prefix sums lose ~1% MSE at 8 bits."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n) * 1e-3
    w[rng.choice(n, 10, replace=False)] = rng.standard_normal(10) * 3000
    return w.astype(np.float16)


DISTS = {"normal": _normal(), "heavy": _heavy(), "outliers": _outliers()}


def _mse(w, deq):
    return float(np.mean((w.astype(np.float64) - deq.astype(np.float64)) ** 2))


@pytest.mark.parametrize("nbits", SUPPORTED_NBITS)
@pytest.mark.parametrize("dist", sorted(DISTS))
def test_mse_parity_with_coremltools(dist, nbits):
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w = DISTS[dist]
    lut, wq = _get_kmeans_lookup_table_and_weight(nbits, w)
    ref = _mse(w, lut.astype(np.float16)[np.asarray(wq)])  # as Core ML would apply it: fp16 LUT
    pal = kmeans_palette(w, nbits)
    assert abs(pal.weight_mse - ref) <= 1e-3 * ref
    assert pal.weight_mse == pytest.approx(_mse(w, pal.dequantize(w)), rel=1e-12)


@pytest.mark.parametrize("nbits", SUPPORTED_NBITS)
def test_kmeans_lut_shapes_dtypes_and_consistency(nbits):
    w = _normal(12_000, seed=3).reshape(30, 20, 20)
    lut, idx = kmeans_lut(w, nbits)
    assert lut.dtype == np.float16 and lut.shape == (1 << nbits,)
    assert idx.dtype == np.uint8 and idx.shape == w.shape and int(idx.max()) < 1 << nbits
    assert np.all(np.diff(lut.astype(np.float64)) >= 0) and np.isfinite(lut).all()
    pal = kmeans_palette(w, nbits)
    assert np.array_equal(pal.lut, lut) and np.array_equal(pal.indices(w), idx)
    assert np.array_equal(pal.dequantize(w).view(np.uint16), lut[idx].view(np.uint16))
    wt = w.transpose(2, 0, 1)  # non-contiguous input
    assert np.array_equal(pal.dequantize(wt), lut[idx].transpose(2, 0, 1))


@pytest.mark.parametrize("nbits", SUPPORTED_NBITS)
@pytest.mark.parametrize("dist", sorted(DISTS))
def test_equal_to_coremltools_element_for_element(dist, nbits):
    """LUT and every dequantized weight equal coremltools' own k-means (as Apple's script and
    Core ML run it), boundary weights and tied optima included."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w = DISTS[dist]
    lut, wq = _get_kmeans_lookup_table_and_weight(nbits, w)
    theirs = lut.astype(np.float16)[np.asarray(wq)].reshape(w.shape)
    pal = kmeans_palette(w, nbits)
    assert np.array_equal(pal.dequantize(w).view(np.uint16), theirs.view(np.uint16))
    used = np.unique(np.asarray(wq))
    assert np.array_equal(np.sort(pal.lut[used]), np.sort(lut.astype(np.float16)[used]))


@pytest.mark.parametrize("nbits", (1, 4, 8))
def test_absent_patterns_map_to_the_nearest_entry(nbits):
    w = DISTS["heavy"][:50_000]
    pal = kmeans_palette(w, nbits)
    vals = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    absent = np.isfinite(vals)
    absent[np.unique(w.view(np.uint16))] = False
    absent[0x8000] = absent[0] = False
    lut = pal.lut.astype(np.float64)
    dist = np.abs(vals[absent][:, None] - lut[None, :]).min(axis=1)
    assert np.array_equal(np.abs(vals[absent] - lut[pal.code[absent]]), dist)
    assert np.all(pal.code[np.isnan(vals)] == 0)


def test_dequantize_torch_bitwise_equal_to_numpy():
    w = DISTS["heavy"][:60_000].copy()
    w[:4] = np.array([0.0, -0.0, 6e-8, -3e-6], dtype=np.float16)  # zeros and subnormals
    w = w.reshape(300, 200)
    pal = kmeans_palette(w, 4)
    ref = pal.dequantize(w)
    t = torch.from_numpy(w.copy())
    out = dequantize_torch(t, pal)
    assert out.dtype == torch.float16 and out.shape == t.shape and out.device == t.device
    assert np.array_equal(out.numpy().view(np.uint16), ref.view(np.uint16))
    out_t = dequantize_torch(t.t(), pal)  # non-contiguous
    assert np.array_equal(out_t.numpy().view(np.uint16), ref.T.view(np.uint16))


def test_linear_8bit_error_bound_and_constant_channels():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 8, 3, 3)) * rng.uniform(1e-3, 1, (64, 1, 1, 1))).astype(np.float16)
    w[3] = 0.5  # constant channels: scale 0, must not divide by zero
    w[7] = 0.0
    with np.errstate(all="raise"):
        deq = linear_8bit(w)
    assert deq.dtype == np.float16 and deq.shape == w.shape
    flat, dflat = w.reshape(64, -1).astype(np.float64), deq.reshape(64, -1).astype(np.float64)
    scale = (flat.max(1) - flat.min(1)) / 255
    tol = scale / 2 + np.abs(flat).max(1) * 2.0**-11 + 1e-7  # half a step + fp16 rounding
    assert np.all(np.abs(dflat - flat).max(1) <= tol)
    assert np.array_equal(deq[3], w[3]) and np.array_equal(deq[7], w[7])
    assert all(len(np.unique(row)) <= 256 for row in dflat)
    assert np.abs(dflat - flat).max() > 0  # it really quantized
    assert linear_8bit(w.astype(np.float32)).dtype == np.float16
    assert linear_8bit(np.array(0.75, np.float16)) == np.float16(0.75)  # 0-d: one constant channel
    v = np.linspace(-1, 1, 1000).astype(np.float16)  # 1-D: one channel, as in coremltools
    assert np.abs(linear_8bit(v).astype(np.float64) - v).max() <= 1 / 255 + 2.0**-11


def test_save_load_roundtrip(tmp_path):
    pal = kmeans_palette(DISTS["normal"][:20_000], 6)
    path = tmp_path / "layer.npz"
    save_palette(path, pal)
    back = load_palette(path)
    assert back.digest == pal.digest and back == pal and hash(back) == hash(pal)
    assert back.nbits == 6 and back.weight_mse == pal.weight_mse
    assert os.listdir(tmp_path) == ["layer.npz"]  # no temp file left behind
    save_palette(str(path), kmeans_palette(DISTS["normal"][:20_000], 2))  # atomic overwrite
    assert load_palette(str(path)).nbits == 2


def test_load_errors(tmp_path):
    with pytest.raises(PaletteError, match="not found"):
        load_palette(tmp_path / "missing.npz")
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(PaletteError, match="corrupt"):
        load_palette(bad)
    good = tmp_path / "good.npz"
    pal = kmeans_palette(DISTS["normal"][:20_000], 4)
    save_palette(good, pal)
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:300])
    with pytest.raises(PaletteError, match="corrupt"):
        load_palette(trunc)
    code = pal.code.copy()
    code[123] = (code[123] + 1) % 16  # tampered payload, stale digest
    tampered = tmp_path / "tampered.npz"
    np.savez_compressed(tampered, nbits=4, lut=pal.lut, code=code, weight_mse=pal.weight_mse, digest=pal.digest)
    with pytest.raises(PaletteError, match="digest"):
        load_palette(tampered)
    partial = tmp_path / "partial.npz"
    np.savez_compressed(partial, nbits=4, lut=pal.lut)
    with pytest.raises(PaletteError, match="missing"):
        load_palette(partial)


@pytest.mark.parametrize(
    "weights, nbits, match",
    [
        (np.zeros(100, np.float32), 4, "float16"),
        ([0.5, 1.0], 4, "float16"),
        (np.zeros(0, np.float16), 4, "empty"),
        (np.zeros(100, np.float16), 5, r"\(1, 2, 3, 4, 6, 8\)"),
        (np.zeros(100, np.float16), 16, "nbits"),
        (np.zeros(100, np.float16), True, "nbits"),
        (np.zeros(100, np.float16), "4", "nbits"),
        (np.array([0.1, np.nan], np.float16), 4, "NaN"),
        (np.array([0.1, np.inf], np.float16), 4, "inf"),
        (np.array([-np.inf, 0.1], np.float16), 4, "inf"),
    ],
)
def test_palette_errors(weights, nbits, match):
    with pytest.raises(PaletteError, match=match) as e:
        kmeans_palette(weights, nbits)
    assert "\n" not in str(e.value)


def test_other_input_errors():
    pal = kmeans_palette(_normal(1000), 2)
    with pytest.raises(PaletteError):
        pal.indices(np.zeros(10, np.float32))
    with pytest.raises(PaletteError):
        dequantize_torch(torch.zeros(10), pal)
    with pytest.raises(PaletteError):
        linear_8bit(np.zeros(0, np.float16))
    with pytest.raises(PaletteError):
        linear_8bit(np.array([[1, np.nan]], np.float32))
    with pytest.raises(PaletteError, match="lut"):
        Palette(2, np.zeros(3, np.float16), pal.code, 0.0)
    with pytest.raises(PaletteError, match="code"):
        Palette(1, np.zeros(2, np.float16), pal.code, 0.0)  # entries up to 3 >= 2
    with pytest.raises(ValueError):  # read-only: the digest stays valid
        pal.lut[0] = 1


def test_single_value_and_few_values():
    w = np.full((50, 50), 0.25, np.float16)
    for nbits in SUPPORTED_NBITS:
        pal = kmeans_palette(w, nbits)
        assert pal.weight_mse == 0 and np.all(pal.lut == np.float16(0.25)) and np.all(pal.indices(w) == 0)
    few = np.random.default_rng(2).choice(np.array([-3, -0.5, 0, 1e-3, 2, 7, 9], np.float16), 20_000)
    for nbits in (4, 6, 8):
        pal = kmeans_palette(few, nbits)
        assert pal.weight_mse == 0.0 and np.array_equal(pal.dequantize(few), few)
        assert np.isfinite(pal.lut).all() and pal.lut[-1] == np.float16(9)  # tail repeats last centroid


def test_negative_zero_and_subnormals():
    w = np.array([0.0, -0.0, -0.0, 1.0, 1.0], np.float16)
    pal = kmeans_palette(w, 1)
    assert pal.weight_mse == 0.0 and list(pal.lut) == [0.0, 1.0]
    assert pal.indices(w).tolist() == [0, 0, 0, 1, 1]
    sub = (np.arange(1, 41) * 6e-8).astype(np.float16)  # 40 distinct subnormals
    assert np.all(np.abs(sub) < np.finfo(np.float16).smallest_normal)
    pal = kmeans_palette(sub, 6)
    assert pal.weight_mse == 0.0 and np.array_equal(pal.dequantize(sub), sub)
    pal = kmeans_palette(np.concatenate([sub, -sub]), 2)
    assert 0 < pal.weight_mse < 1e-12


def test_deterministic():
    w = DISTS["heavy"][:100_000]
    for nbits in (2, 6):
        a, b = kmeans_palette(w, nbits), kmeans_palette(w.copy()[::-1][::-1], nbits)
        c = kmeans_palette(np.asfortranarray(w.reshape(400, 250)), nbits)
        assert a.digest == b.digest == c.digest


def _brute(x, w, k):
    """Min SSE over all contiguous partitions of sorted x into k non-empty clusters."""
    best = np.inf
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        sse = 0.0
        for lo, hi in zip((0,) + cuts, cuts + (len(x),)):
            mu = np.dot(w[lo:hi], x[lo:hi]) / w[lo:hi].sum()
            sse += np.dot(w[lo:hi], (x[lo:hi] - mu) ** 2)
        best = min(best, sse)
    return best


def test_public_mse_matches_brute_force_on_tiny_tensors():
    """Through the public API: the fitted tensor's MSE equals the optimal partition's, up to fp16 centroids."""
    rng = np.random.default_rng(12)
    for _ in range(20):
        vals = np.unique(rng.standard_normal(10).astype(np.float16))
        w = np.repeat(vals, rng.integers(1, 30, vals.size))
        pal = kmeans_palette(w, 2)
        x, cnt = np.unique(w.astype(np.float64), return_counts=True)
        best = _brute(x, cnt.astype(np.float64), 4) / w.size
        # rounding centroids to fp16 costs at most (half an fp16 ulp)^2 per weight
        assert best - 1e-12 <= pal.weight_mse <= best + (np.abs(x).max() * 2.0**-11) ** 2 + 1e-12
