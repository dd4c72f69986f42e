"""The serial Apple reference checks itself: hand-computed pieces, then one whole run on tiny-sd.

Only the whole-run test touches the project (``workers.models.resolve_model``, to build the
built-in model directory); the reference module itself imports nothing from the project.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from tests.reference import apple_serial as ref


# --------------------------------------------------------------------------- compute_psnr

def test_psnr_hand_computed_peak_from_test():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 2.0], [3.0, 5.0]])
    # mse = 1/4 -> rms 0.5; peak = max|b| = 5
    assert ref.compute_psnr(a, b) == pytest.approx(20 * math.log10(5.00001 / (0.5 + 1e-10)))
    assert ref.compute_psnr(a, b) == pytest.approx(20.0000174, abs=1e-6)
    # swapped: the peak now comes from the other array (4), so the value changes
    assert ref.compute_psnr(b, a) == pytest.approx(20 * math.log10(4.00001 / 0.5))


def test_psnr_identical_is_finite_ceiling():
    x = np.array([0.5, -2.0, 1.0], dtype=np.float32)
    assert ref.compute_psnr(x, x) == pytest.approx(20 * math.log10((2.0 + 1e-5) / 1e-10), rel=1e-6)
    z = np.zeros(4)
    assert ref.compute_psnr(z, z) == pytest.approx(100.0)  # 20*log10(1e-5/1e-10)


def test_psnr_dtype_option():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 8, 8)).astype(np.float32)
    b = a + 1e-3 * rng.standard_normal(a.shape).astype(np.float32)
    v32 = ref.compute_psnr(a, b)
    v64 = ref.compute_psnr(a, b, np.float64)
    assert v32 == pytest.approx(v64, abs=1e-4)


def test_round_psnr_is_python_format_rounding():
    assert ref.round_psnr(12.25) == 12.2  # exact binary tie -> even
    assert ref.round_psnr(12.35) == 12.3  # 12.35 is 12.3499999... in binary
    assert ref.round_psnr(12.75) == 12.8
    assert ref.round_psnr(np.float32(30.04)) == 30.0
    assert ref.per_prompt_psnr(np.ones((2, 3)), np.ones((2, 3))) == [ref.round_psnr(
        20 * math.log10(1.00001 / 1e-10))] * 2


# --------------------------------------------------------------------------- fake int8

def test_fake_int8_hand_computed_fp16():
    w = np.array([-1.0, 0.5, 0.25, 2.0], dtype=np.float32)
    # lo=-1, hi=2, span 3; zp = round((-128*2 - 127*-1)/3) = -43; q = round(w*85) - 43
    # q = [-128, round(42.5)=42 -> -1, 21 -> -22, 127]; dequant = (q + 43) * fp16(3/255)
    scale = np.float16(3) / np.float16(255)
    expected = np.array([-85, 42, 21, 170], dtype=np.float16) * scale
    out = ref.fake_int8_linear(w)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, expected)


def test_fake_int8_forces_zero_into_range():
    out = ref.fake_int8_linear(np.array([1.0, 2.0], dtype=np.float16))
    # lo=0, hi=2: zp=-128, q = round(w*127.5) - 128 = [round(127.5)=128 -> 0, 127]
    scale = np.float16(2) / np.float16(255)
    np.testing.assert_array_equal(out, np.array([128, 255], dtype=np.float16) * scale)


def test_fake_int8_is_per_tensor_not_per_channel():
    w = np.array([[0.01, -0.02], [4.0, -3.0]], dtype=np.float16)
    out = ref.fake_int8_linear(w)
    scale = (np.float16(7) / np.float16(255))
    # one scale for the whole tensor: the small row is crushed to multiples of the big step
    assert np.all(np.abs(out[0]) <= scale)
    steps = out.astype(np.float64) / np.float64(scale)
    np.testing.assert_allclose(steps, np.round(steps), atol=0.02)  # multiples of ONE step
    assert steps.max() - steps.min() < 255.5


def test_fake_int8_unet_touches_every_weight_module():
    net = nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3), nn.LayerNorm(3, elementwise_affine=False))
    torch.manual_seed(0)
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
    before = [p.detach().clone() for p in (net[0].weight, net[1].weight, net[0].bias)]
    assert ref.fake_int8_unet(net) == 2  # Linear + GroupNorm; the affine-less LayerNorm skipped
    assert not torch.equal(net[0].weight, before[0])
    assert torch.equal(net[0].bias, before[2])  # biases untouched
    assert torch.allclose(net[1].weight, before[1], atol=2e-3)
    assert net[0].weight.dtype == torch.float32


# --------------------------------------------------------------------------- k-means palettes

@pytest.mark.parametrize("numel", [20_000, 9_216])  # kmeans1d path / small-tensor path
@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_kmeans_palette_has_at_most_2n_values(numel, nbits):
    rng = np.random.default_rng(nbits)
    w = (0.05 * rng.standard_normal(numel)).astype(np.float16)
    lut, idx, _ = ref.kmeans_palettize_array(w, nbits)
    assert lut.dtype == np.float16 and lut.size == 2 ** nbits
    dense = lut[idx]
    assert dense.shape == w.shape
    # (float32: numpy 2.2.6's AVX-512 float16 quicksort mis-sorts many-duplicate arrays here)
    assert len(np.unique(dense.astype(np.float32))) <= 2 ** nbits
    assert np.mean((dense.astype(np.float64) - w) ** 2) < np.var(w.astype(np.float64))


def test_kmeans_error_decreases_with_bits():
    w = (0.05 * np.random.default_rng(1).standard_normal(30_000)).astype(np.float16)
    errs = []
    for n in ref.APPLE_NBITS:
        lut, idx, _ = ref.kmeans_palettize_array(w, n)
        errs.append(float(np.mean((lut[idx].astype(np.float64) - w) ** 2)))
    assert errs == sorted(errs, reverse=True)


def test_palettizer_module_restore_and_memo():
    torch.manual_seed(0)
    lin = nn.Linear(200, 100)  # 20,000 weights: the kmeans1d path
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())  # fp16-representable, like the tiny models
    orig = lin.weight.detach().clone()
    pal = ref.Palettizer()
    saved = pal(lin, 2, "lin")
    assert len(torch.unique(lin.weight)) <= 4 and lin.weight.dtype == torch.float32
    first = lin.weight.detach().clone()
    ref.restore_weight(lin, saved)
    assert torch.equal(lin.weight, orig)
    pal(lin, 2, "lin")
    assert torch.equal(lin.weight, first) and pal.fits == 1  # memo hit, same values


# --------------------------------------------------------------------------- order and recipes

def test_descending_order_is_stable_on_ties():
    single = {"metadata": {}, "a": [10.0, 20.0], "b": [30.0, 1.0], "c": [15.0, 15.0], "d": [40.0, 0.0]}
    # sums: a 30, b 31, c 30, d 40 -> d, b, then a before c (module order kept on the tie)
    assert ref.descending_psnr_order(single) == ["d", "b", "a", "c"]


def test_thresholds_linspace_both_ends_in_apple_order():
    t = ref.recipe_thresholds(80.0, 60.0, 7)
    assert t[0] == 79.0 and t[-1] == 65.0 and len(t) == 7
    assert t == sorted(t, reverse=True)
    assert ref.recipe_thresholds(50.0, 60.0, 3) == [49.0, 57.0, 65.0]  # ascending if so given


def _table():
    # two prompts; layers listed in the 1-bit curve order (y before x); 2-bit order differs
    return {
        "1": {"metadata": {}, "y": [50.0, 52.0], "x": [40.0, 40.0]},
        "2": {"metadata": {}, "x": [60.0, 60.0], "y": [55.0, 55.2]},
        "4": {"metadata": {}, "y": [70.0, 70.0], "x": [65.0, 66.0]},
    }


def test_build_recipe_rule_hand_made_table():
    sizes = {"x": 300, "y": 100}
    recipe, avg, size_mb = ref.build_recipe(_table(), sizes, 50.5, [1, 2, 4], 16, 2)
    # y: 1-bit mean 51 > 50.5 -> 1; x: 1-bit 40, 2-bit 60 > 50.5 -> 2
    assert recipe == {"y": 1, "x": 2}
    assert list(recipe) == ["y", "x"]  # the 1-bit curve's order
    assert avg == pytest.approx((1 * 100 + 2 * 300) / 400)
    assert size_mb == pytest.approx(700 / 8e6)
    # strictly above: y's 1-bit mean is exactly 51.0
    recipe, _, _ = ref.build_recipe(_table(), sizes, 51.0, [1, 2, 4], 16, 2)
    assert recipe["y"] == 2  # 2-bit mean 55.1 > 51
    # nothing passes -> default bits (16 counts as 16 in the average)
    recipe, avg, _ = ref.build_recipe(_table(), sizes, 80.0, [1, 2, 4], 16, 2)
    assert recipe == {"y": 16, "x": 16} and avg == 16.0
    recipe, avg, _ = ref.build_recipe(_table(), sizes, 80.0, [1, 2, 4], 6, 2)
    assert recipe == {"y": 6, "x": 6} and avg == 6.0
    # mixed: y passes only at 4 bits, x never -> 16
    recipe, avg, _ = ref.build_recipe(_table(), sizes, 66.0, [1, 2, 4], 16, 2)
    assert recipe == {"y": 4, "x": 16} and avg == pytest.approx((4 * 100 + 16 * 300) / 400)
    assert ref.recipe_key(avg) == "recipe_13.00_bit_mixedpalette"


def test_apply_recipe_skips_16_and_rejects_unknown_names():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(200, 100), nn.Linear(200, 100))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.half().float())
    w1 = net[1].weight.detach().clone()
    ref.apply_recipe(net, {"0": 1, "1": 16}, ref.Palettizer())
    assert len(torch.unique(net[0].weight)) <= 2 and torch.equal(net[1].weight, w1)
    with pytest.raises(KeyError):
        ref.apply_recipe(net, {"nope": 4}, ref.Palettizer())


# --------------------------------------------------------------------------- whole run

def _check_result(result, nbits):
    r = result["reference"]
    names, sizes = r["candidates"], dict(zip(r["candidates"], r["sizes"]))
    n_prompts = len(r["prompts"])
    assert set(result) == {"model_version", "baselines", "recipes", "single_layer",
                           "cumulative", "reference"}
    assert list(result["single_layer"]) == [str(n) for n in nbits]
    for n in nbits:
        single = result["single_layer"][str(n)]
        assert list(single) == names  # module order, no metadata
        for values in single.values():
            assert len(values) == n_prompts
            assert all(v == ref.round_psnr(v) for v in values)
        cum = result["cumulative"][str(n)]
        meta = cum["metadata"]
        assert meta["candidates"] == ref.descending_psnr_order(single)
        assert meta["sizes"] == [sizes[k] for k in meta["candidates"]]
        assert list(cum)[1:] == meta["candidates"]
        # the first cumulative point is the best layer's isolated measurement
        first = meta["candidates"][0]
        assert cum[first] == single[first]
    b = result["baselines"]
    assert list(b)[:2] == ["original", "linear_8bit"]
    assert b["original"] > 200  # CPU float32 is bit-exact: the formula's ceiling
    assert 0 < b["linear_8bit"] < b["original"]
    thresholds = ref.recipe_thresholds(b["original"], b["linear_8bit"], r["num_recipes"])
    assert r["thresholds"] == thresholds
    keys = set()
    for detail, t in zip(r["recipe_details"], thresholds):
        recipe, avg, _ = ref.build_recipe(result["cumulative"], sizes, t, nbits,
                                          r["default_nbits"], n_prompts)
        key = ref.recipe_key(avg)
        assert detail["key"] == key and detail["threshold"] == t
        keys.add(key)
        assert set(recipe) == set(names)
    assert set(result["recipes"]) == keys
    for key, recipe in result["recipes"].items():
        avg = sum(recipe[k] * sizes[k] for k in names) / sum(sizes.values())
        assert key == ref.recipe_key(avg)
        assert b[key] == ref.round_psnr(b[key])
    # the lowest threshold's recipe is at most as large as the highest one's
    details = r["recipe_details"]
    assert details[-1]["avg_bits"] <= details[0]["avg_bits"]


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    from workers.models import resolve_model

    spec = resolve_model("tiny-sd", tmp_path_factory.mktemp("tiny-cache"))
    return spec.location, spec.default_resolution, spec.default_min_size


def test_whole_reference_on_tiny_sd(tiny_sd_dir, capsys):
    path, resolution, min_size = tiny_sd_dir
    nbits = list(ref.APPLE_NBITS)
    start = time.perf_counter()
    result = ref.run_apple_pre_analysis(path, nbits=nbits, resolution=resolution,
                                        min_size=min_size, model_version="tiny-sd", num_threads=1)
    wall = time.perf_counter() - start
    r = result["reference"]
    with capsys.disabled():
        print(f"\n[apple_serial] tiny-sd: {len(r['candidates'])} candidates, nbits {nbits}, "
              f"{r['pipeline_runs']} pipeline runs ({r['pipeline_seconds']:.1f} s), "
              f"{r['kmeans_fits']} k-means fits ({r['kmeans_seconds']:.1f} s), wall {wall:.1f} s; "
              f"baselines {result['baselines']}")
    assert result["model_version"] == "tiny-sd"
    assert r["pipeline_class"] == "StableDiffusionPipeline"
    assert len(r["candidates"]) == 43  # Linear/Conv2d weights above 10,000 elements (TINY_MIN_SIZE)
    assert r["pipeline_runs"] == 1 + 2 * 43 * len(nbits) + 2 * (2 + r["num_recipes"])
    _check_result(result, nbits)
    # every measured 8-bit isolated layer is far better than the 1-bit one
    s1, s8 = result["single_layer"]["1"], result["single_layer"]["8"]
    assert all(ref.mean_of(s8[k]) > ref.mean_of(s1[k]) for k in r["candidates"])


def test_signal_runner_is_repeatable(tiny_sd_dir):
    path, resolution, _ = tiny_sd_dir
    pipe = ref.load_pipeline(path)
    run = ref.SignalRunner(ref.APPLE_PROMPTS[:2], resolution)
    a, b = run(pipe), run(pipe)
    assert a.shape == (2, 4, resolution // 8, resolution // 8)
    np.testing.assert_array_equal(a, b)  # the generator state is restored before each call
    # the generator draws the latents: another state gives another output
    run.state = torch.Generator().manual_seed(1).get_state()
    assert not np.array_equal(run(pipe), a)


def test_default_nbits_on_tiny_sd(tiny_sd_dir):
    """Apple's --default-nbits: the analysis runs on top of (and against) a model with every
    weight palettized to d bits; layers passing no threshold get d; baselines stay pristine."""
    path, resolution, min_size = tiny_sd_dir
    result = ref.run_apple_pre_analysis(path, nbits=[4], resolution=resolution, min_size=min_size,
                                        num_recipes=3, default_nbits=2, num_threads=1)
    r = result["reference"]
    assert r["pipeline_runs"] == 1 + 2 * 43 + 2 * (2 + 3)
    b = result["baselines"]
    assert b["original"] > 200  # measured on the pristine pipeline
    single = result["single_layer"]["4"]
    # re-palettizing a 2-bit layer at 4 bits is exact: the analysis reference is the 2-bit model
    assert all(ref.mean_of(v) > 200 for v in single.values())
    assert r["thresholds"][0] == b["original"] - 1
    for key, recipe in result["recipes"].items():
        assert set(recipe.values()) <= {4, 2}
    low = r["recipe_details"][-1]  # the lowest threshold
    assert low["threshold"] == pytest.approx(b["linear_8bit"] + 5)
