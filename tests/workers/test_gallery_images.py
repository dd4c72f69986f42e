"""Gallery images made by the evaluator (workers.evaluation.gallery), checked against independent
references: a plain diffusers pipeline call written out here, and scikit-image on the PNGs."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch

PROMPTS = ("a red fox in the snow", "a lighthouse at dusk")
STEPS = 3


@pytest.fixture(scope="module")
def made(tiny_sd_spec):
    """One evaluator (prefix reuse on, as searches run) and the images of every row kind."""
    from workers.evaluation.evaluator import Evaluator
    from workers.evaluation.gallery import GalleryItem, GallerySpec
    from workers.evaluation.signal import SignalSpec
    from workers.models import candidate_layers
    from workers.palettize import kmeans_palette

    ev = Evaluator(tiny_sd_spec, SignalSpec(prompts=PROMPTS, protocol="apple"), device="cpu",
                   min_size=tiny_sd_spec.default_min_size)
    spec = GallerySpec(prompts=PROMPTS, seed=1234, steps=STEPS, resolution=tiny_sd_spec.default_resolution)
    layers = [c.name for c in candidate_layers(ev.denoiser, tiny_sd_spec.default_min_size)][:4]
    palettes = {(l, 2): kmeans_palette(ev.modules[l].weight.data.to(torch.float16).numpy(), 2) for l in layers}
    recipe = tuple((l, 2) for l in layers)
    both = tuple(range(len(PROMPTS)))
    made = {"original": ev.gallery_image(GalleryItem("g/original", "original", both), {}, spec),
            "linear_8bit": ev.gallery_image(GalleryItem("g/l8", "linear_8bit", both, linear8=True), {}, spec),
            "recipe": ev.gallery_image(GalleryItem("g/r", "recipe", both, recipe), palettes, spec)}
    out = {(row, i): png for row, m in made.items() for i, png in zip(m.prompts, m.pngs)}
    for m in made.values():
        assert m.prompts == both and len(m.pngs) == len(both)
        assert list(m.sha256) == [hashlib.sha256(p).hexdigest() for p in m.pngs]
    again = ev.gallery_image(GalleryItem("g/original", "original", both), {}, spec)  # weights were put back
    return {"images": out, "again": again.pngs, "spec": spec, "ev": ev}


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGB" and im.format == "PNG"
        return np.asarray(im)


def test_float16_images_equal_a_plain_diffusers_call(made, tiny_sd_spec):
    """The reference: diffusers' own pipeline from the model folder, float32 on the CPU with the
    denoiser's weights rounded to float16 (the float16 model), the prompt text, the pipeline's own
    scheduler, a CPU generator seeded with the seed; pixel for pixel."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_spec.location, dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.data = p.data.to(torch.float16).to(torch.float32)
    res = tiny_sd_spec.default_resolution
    refs = pipe(prompt=list(PROMPTS), num_inference_steps=STEPS, height=res, width=res,
                generator=[torch.Generator("cpu").manual_seed(1234) for _ in PROMPTS]).images
    for i, ref in enumerate(refs):
        got = _pixels(made["images"][("original", i)])
        assert got.shape == (res, res, 3)
        assert np.array_equal(np.asarray(ref.convert("RGB")), got), f"prompt {i}"


def test_rows_differ_and_the_weights_are_put_back(made):
    imgs = made["images"]
    assert made["again"] == (imgs[("original", 0)], imgs[("original", 1)])  # the rows' weights were put back
    for i in range(len(PROMPTS)):
        assert imgs[("recipe", i)] != imgs[("original", i)]  # 2-bit layers change the image
        assert not np.array_equal(_pixels(imgs[("linear_8bit", i)]), _pixels(imgs[("original", i)]))
    assert imgs[("original", 0)] != imgs[("original", 1)]


def test_image_metrics_are_scikit_images_on_the_saved_pngs(made):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from workers.evaluation.gallery import image_metrics

    imgs = made["images"]
    for row in ("linear_8bit", "recipe"):
        for i in range(len(PROMPTS)):
            ref, img = _pixels(imgs[("original", i)]), _pixels(imgs[(row, i)])
            psnr, ssim = image_metrics(imgs[("original", i)], imgs[(row, i)])
            assert psnr == peak_signal_noise_ratio(ref, img)
            assert ssim == structural_similarity(ref, img, channel_axis=-1, data_range=255)
            # and by hand: 10 log10(255² / MSE)
            mse = np.mean((ref.astype(np.float64) - img.astype(np.float64)) ** 2)
            assert psnr == pytest.approx(10 * np.log10(255.0 ** 2 / mse), rel=1e-12)
    assert image_metrics(imgs[("original", 0)], imgs[("original", 0)]) == (None, 1.0)


def test_a_few_step_model_keeps_its_own_count():
    from search.driver.gallery_phase import default_steps
    from workers.model_spec import ModelSpec

    turbo = ModelSpec("sdxl-turbo", "hub", "stabilityai/sdxl-turbo", "sdxl", 100_000, 512, default_steps=1)
    base = ModelSpec("sdxl-base-1.0", "hub", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 100_000, 1024)
    schnell = ModelSpec("flux-schnell", "hub", "black-forest-labs/FLUX.1-schnell", "flux", 100_000, 1024)
    assert (default_steps(turbo), default_steps(base), default_steps(schnell)) == (1, 20, 4)


def test_gallery_options_are_checked_and_leave_the_fingerprint_alone():
    from search.config import ConfigError, SearchConfig
    from search.submit_options import parse_search_options

    base = SearchConfig()
    off = SearchConfig(gallery=False, gallery_steps=4, gallery_resolution=512)
    assert off.fingerprint() == base.fingerprint()  # what is measured is the same: resume and duplicates hold
    assert "gallery" not in base.to_dict() and SearchConfig.from_dict(off.to_dict()) == off
    for bad, line in (({"gallery_steps": 0}, "--gallery-steps must be"), ({"gallery_resolution": 100},
                                                                           "--gallery-resolution must be")):
        with pytest.raises(ConfigError, match=line):
            parse_search_options(bad)
    assert parse_search_options({"gallery": False})["gallery"] is False
