"""The measurement signal: spec validation, PSNR, and SignalRunner against the real pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.models import candidate_layers, load_pipeline
from workers.evaluation.signal import DEFAULT_PROMPTS, SignalRunner, SignalSpec, psnr

PROMPTS = DEFAULT_PROMPTS[:4]


def _max_psnr(ref) -> np.ndarray:
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    return 20 * np.log10((np.abs(ref).max(axis=1) + 1e-5) / 1e-10)


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd"])
def pipe(request):
    """One float32 CPU pipeline per tiny model; tests restore any weight they change."""
    spec = request.getfixturevalue(request.param.replace("-", "_") + "_spec")
    return load_pipeline(spec)


# --- SignalSpec -------------------------------------------------------------------------

def test_spec_defaults():
    spec = SignalSpec(prompts=list(PROMPTS))
    assert spec.prompts == PROMPTS and isinstance(spec.prompts, tuple)
    assert (spec.seed, spec.steps, spec.resolution, spec.guidance_scale, spec.batch_size, spec.protocol) == \
        (None, 1, 0, None, 0, "apple")
    assert len(DEFAULT_PROMPTS) == 8 and len(set(DEFAULT_PROMPTS)) == 8
    hash(spec)


def test_spec_protocol_defaults():
    """No prompts means the protocol's own: Apple's 8 captions, or the classic ones."""
    from workers.evaluation.protocol import APPLE_PROMPTS, CLASSIC_PROMPTS

    assert SignalSpec().prompts == APPLE_PROMPTS and len(APPLE_PROMPTS) == 8
    assert APPLE_PROMPTS[0] == "a black and brown dog standing outside a door."
    assert SignalSpec(protocol="classic").prompts == CLASSIC_PROMPTS == DEFAULT_PROMPTS
    with pytest.raises(ValueError, match="unknown protocol 'mps'"):
        SignalSpec(protocol="mps")


@pytest.mark.parametrize("kw, word", [
    (dict(prompts=("",)), "prompts"),
    (dict(prompts=("ok", " ")), "prompts"),
    (dict(prompts="a single string"), "prompts"),
    (dict(steps=0), "steps"),
    (dict(seed=-1), "seed"),
    (dict(resolution=60), "multiple of 8"),
    (dict(resolution=-64), "multiple of 8"),
    (dict(batch_size=-1), "batch_size"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
])
def test_spec_validation(kw, word):
    with pytest.raises(ValueError, match=word):
        SignalSpec(**kw)


# --- psnr -------------------------------------------------------------------------------

def test_psnr_formula():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    same = psnr(ref, ref.copy())
    assert same.dtype == np.float64 and same.shape == (3,)
    assert np.all(np.isfinite(same)) and np.allclose(same, _max_psnr(ref))
    noisy = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    r64, n64 = ref.astype(np.float64), noisy.astype(np.float64)
    expected = [20 * np.log10((np.abs(r).max() + 1e-5) / (np.sqrt(np.mean((r - n) ** 2)) + 1e-10))
                for r, n in zip(r64, n64)]
    np.testing.assert_allclose(psnr(ref, noisy), expected, rtol=1e-12)
    np.testing.assert_allclose(psnr(torch.from_numpy(ref), torch.from_numpy(noisy)), expected,
                               rtol=1e-12)
    assert np.all(psnr(ref, noisy) < same)
    with pytest.raises(ValueError):
        psnr(ref, ref[:2])


# --- SignalRunner -----------------------------------------------------------------------

def test_run_shape_and_self_psnr(pipe):
    runner = SignalRunner(pipe, SignalSpec(prompts=PROMPTS), "cpu")
    out = runner.run()
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.shape == (4, pipe.unet.config.in_channels, 8, 8)
    assert torch.isfinite(out).all()
    again = runner.run()
    assert torch.equal(out, again)
    np.testing.assert_allclose(psnr(out, again), _max_psnr(out))
    assert np.all(psnr(out, again) > 150)


def test_cached_embeddings_match_prompt_strings(pipe):
    """The fast path must measure exactly what the pipeline does with the prompt strings."""
    runner = SignalRunner(pipe, SignalSpec(prompts=PROMPTS, seed=3), "cpu")
    with torch.no_grad():
        direct = pipe(prompt=list(PROMPTS), negative_prompt=[""] * len(PROMPTS),
                      **runner.call_kwargs(0, len(PROMPTS))).images
    assert torch.equal(runner.run(), direct.float())


def test_two_runners_identical_and_seed_matters(pipe):
    spec = SignalSpec(prompts=PROMPTS, seed=7)
    assert torch.equal(SignalRunner(pipe, spec, "cpu").run(), SignalRunner(pipe, spec, "cpu").run())
    other = SignalRunner(pipe, SignalSpec(prompts=PROMPTS, seed=8), "cpu").run()
    assert not torch.equal(other, SignalRunner(pipe, spec, "cpu").run())


def test_changing_one_weight_lowers_psnr(pipe):
    runner = SignalRunner(pipe, SignalSpec(prompts=PROMPTS), "cpu")
    ref = runner.run()
    name = candidate_layers(pipe.unet, 8192)[-1].name
    weight = dict(pipe.unet.named_modules())[name].weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        hurt = psnr(ref, runner.run())
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert np.all(np.isfinite(hurt)) and np.all(hurt < _max_psnr(ref) - 50)
    assert torch.equal(runner.run(), ref)  # restoring the weight restores the signal


def test_batching_resolution_and_guidance(pipe):
    whole = SignalRunner(pipe, SignalSpec(prompts=PROMPTS), "cpu").run()
    split = SignalRunner(pipe, SignalSpec(prompts=PROMPTS, batch_size=3), "cpu").run()
    assert split.shape == whole.shape
    assert np.all(psnr(whole, split) > 120)  # equal up to float rounding of batched kernels
    small = SignalRunner(pipe, SignalSpec(prompts=PROMPTS[:2], resolution=32), "cpu")
    assert small.run().shape == (2, pipe.unet.config.in_channels, 4, 4)
    no_cfg = SignalRunner(pipe, SignalSpec(prompts=PROMPTS, guidance_scale=1.0), "cpu")
    assert not no_cfg.cfg and not any("negative" in k for k in no_cfg.embeds)
    assert not torch.equal(no_cfg.run(), whole)
    scale = pipe.vae_scale_factor
    pipe.vae_scale_factor = 16  # as if the VAE downsampled 16x: 40 px is no longer valid
    try:
        with pytest.raises(ValueError, match="VAE scale factor 16"):
            SignalRunner(pipe, SignalSpec(prompts=PROMPTS, resolution=40), "cpu")
    finally:
        pipe.vae_scale_factor = scale


def test_device_matches_cpu(pipe, device):
    spec = SignalSpec(prompts=PROMPTS)
    cpu = SignalRunner(pipe, spec, "cpu").run()
    pipe.to(device)
    try:
        out = SignalRunner(pipe, spec, device).run()
    finally:
        pipe.to("cpu")
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert np.all(psnr(cpu, out) > (150 if device == "cpu" else 60))
