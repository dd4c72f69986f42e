"""benchmarks/bench_model.py's two bench models: the SD-1.x one (``--base tiny-sd``, for Core AI)
was added without touching the SDXL one, whose marker must stay byte for byte what every cached
``tiny-sdxl-trained`` carries (a changed marker would rebuild it and move every bench figure).
Pure checks: nothing is trained here."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_model as bm

# the marker every tiny-sdxl-trained built before the tiny-sd variant existed carries
SDXL_MARKER = ('{"name": "tiny-sdxl-trained", "version": "1", "base": "tiny-sdxl", "base_format": "1", '
               '"seed": 1234, "steps": 900, "batch": 16, "lr": 0.001}')


def test_sdxl_marker_and_path_unchanged(tmp_path):
    assert bm._marker_text() == SDXL_MARKER
    assert bm._marker_text("tiny-sdxl") == SDXL_MARKER
    assert bm.bench_dir(tmp_path) == tmp_path / "bench" / "tiny-sdxl-trained"


def test_sd_variant_has_its_own_name_and_marker(tmp_path):
    assert bm.bench_dir(tmp_path, "tiny-sd") == tmp_path / "bench" / "tiny-sd-trained"
    marker = json.loads(bm._marker_text("tiny-sd"))
    assert marker == {**json.loads(SDXL_MARKER), "name": "tiny-sd-trained", "base": "tiny-sd"}


def test_current_build_is_returned_without_training(tmp_path):
    for base in ("tiny-sdxl", "tiny-sd"):
        d = bm.bench_dir(tmp_path, base)
        d.mkdir(parents=True)
        (d / bm.MARKER).write_text(bm._marker_text(base))
        # a current marker: returned as is (a build would need the base model and minutes of training)
        assert bm.ensure_bench_model(tmp_path, base=base, log=pytest.fail) == d
    # one base's marker does not make the other current
    (bm.bench_dir(tmp_path, "tiny-sd") / bm.MARKER).write_text(SDXL_MARKER)
    assert not bm._is_current(bm.bench_dir(tmp_path, "tiny-sd"), "tiny-sd")


def test_unknown_base_refused(tmp_path):
    with pytest.raises(ValueError, match="no bench model for 'tiny-flux'"):
        bm.ensure_bench_model(tmp_path, base="tiny-flux")


def test_photo_variant_has_its_own_dir_and_marker(tmp_path):
    """--photo (VAE trained too) is a third model: the UNet recipe's fields plus the VAE's; the
    UNet-only markers are untouched by it."""
    from benchmarks import bench_photo_vae as pv

    assert bm.bench_dir(tmp_path, photo=True) == tmp_path / "bench" / "tiny-sdxl-photo"
    assert bm.bench_dir(tmp_path, "tiny-sd", photo=True) == tmp_path / "bench" / "tiny-sd-photo"
    marker = json.loads(bm._marker_text(photo=True))
    assert marker == {**json.loads(SDXL_MARKER), "name": "tiny-sdxl-photo", "vae": json.loads(json.dumps(pv.recipe()))}
    assert marker["vae"]["config"]["latent_channels"] == 4 and len(marker["vae"]["config"]["block_out_channels"]) == 4
    assert bm._marker_text() == SDXL_MARKER
    d = bm.bench_dir(tmp_path, photo=True)
    d.mkdir(parents=True)
    (d / bm.MARKER).write_text(SDXL_MARKER)  # a UNet-only marker does not make the photo model current
    assert not bm._is_current(d, photo=True)
    (d / bm.MARKER).write_text(bm._marker_text(photo=True))
    assert bm.ensure_bench_model(tmp_path, photo=True, log=pytest.fail) == d


def test_photo_vae_psnr_matches_skimage():
    """The reported reconstruction PSNR is scikit-image's (data range 2 for [-1, 1] images), per image, averaged."""
    import numpy as np
    import torch
    from skimage.metrics import peak_signal_noise_ratio

    from benchmarks import bench_photo_vae as pv

    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(5, 3, 8, 8, generator=g)).clamp(-1, 1)
    ref = np.mean([peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=2.0) for x, y in zip(a, b)])
    assert pv.psnr(b, a) == pytest.approx(ref, abs=1e-4)


def test_photo_vae_keeps_the_unets_latent_shape():
    """64 px images -> 8x8x4 latents: what tiny-sdxl's UNet (sample_size 8, 4 channels) and the pipeline's
    vae_scale_factor (2 ** (blocks - 1) = 8) expect, so the photo model loads and runs like the others."""
    import torch
    from diffusers import AutoencoderKL

    from benchmarks import bench_photo_vae as pv

    vae = AutoencoderKL(**pv.VAE_CONFIG).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 8, 8)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
