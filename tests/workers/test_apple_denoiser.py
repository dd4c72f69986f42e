"""The denoiser on Apple's Core ML contract (``workers.coreml.bundle.denoiser``).

Three checks, each against something that is not our code: the Neural-Engine rewrite computes
what diffusers' own denoiser computes (same values, diffusers' layout); the converted package's
inputs and outputs are the table below, written from Apple's sources; and every diffusers
weight is one float16 const of the package (what palettization with the search's LUTs needs).
Core ML prediction runs on macOS only.
"""
from __future__ import annotations

import collections
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.coreml.bundle import attention as ane_attention
from workers.coreml.bundle.contract import ATTENTIONS, BundleOptions
from workers.coreml.bundle.denoiser import AppleDenoiser, apple_denoiser_inputs, convert_apple_denoiser, example_inputs
from workers.coreml.common import CoreMLError, describe_program, iter_ops, load_mlmodel, match_layers, read_program
from workers.denoiser import candidate_layers

MODELS = {"sd": "tiny-sd", "sdxl": "tiny-sdxl", "sdxl-refiner": "tiny-sdxl-refiner", "sd3": "tiny-sd3"}
F16, F32 = "FLOAT16", "FLOAT32"
# Apple's contract for the tiny models, from apple/ml-stable-diffusion: torch2coreml.py convert_unet
# (sample [B, in_channels, H, W], timestep [B], encoder_hidden_states [B, cross_attention_dim, 1, 77],
# SDXL time_ids [B, 6] (refiner: 5) and text_embeds [B, pooled]; float16 in, noise_pred float32 out)
# and, for SD3, MultiModalDiffusionTransformer.swift + StableDiffusion3Pipeline.swift (tokens [B, 4096, 1,
# 154] = CLIP's 77 then T5's 77, pooled [B, 2048, 1, 1]; output denoiser_output per convert_mmdit). The
# numbers are the tiny configs': latents 8x8x4, cross-attention 32 (SD, refiner) / 64 (SDXL), SD3 joint 64.
CONTRACT = {
    "sd": ([("sample", [2, 4, 8, 8], F16), ("timestep", [2], F16), ("encoder_hidden_states", [2, 32, 1, 77], F16)],
           [("noise_pred", [2, 4, 8, 8], F32)]),
    "sdxl": ([("sample", [2, 4, 8, 8], F16), ("timestep", [2], F16), ("encoder_hidden_states", [2, 64, 1, 77], F16),
              ("time_ids", [2, 6], F16), ("text_embeds", [2, 32], F16)], [("noise_pred", [2, 4, 8, 8], F32)]),
    "sdxl-refiner": ([("sample", [2, 4, 8, 8], F16), ("timestep", [2], F16),
                      ("encoder_hidden_states", [2, 32, 1, 77], F16), ("time_ids", [2, 5], F16),
                      ("text_embeds", [2, 32], F16)], [("noise_pred", [2, 4, 8, 8], F32)]),
    "sd3": ([("latent_image_embeddings", [2, 4, 8, 8], F16), ("timestep", [2], F16),
             ("token_level_text_embeddings", [2, 64, 1, 154], F16), ("pooled_text_embeddings", [2, 64, 1, 1], F16)],
            [("denoiser_output", [2, 4, 8, 8], F32)]),
}
MACOS_ONLY = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction (MLModel.predict) needs macOS")


@pytest.fixture(scope="module")
def denoisers(model_cache):
    from workers.models import load_denoiser, resolve_model

    return {family: load_denoiser(resolve_model(name, model_cache)).float().eval() for family, name in MODELS.items()}


@pytest.fixture(scope="module")
def perturbed(denoisers):
    """Copies whose vectors (norm scales and shifts, biases) are random: the tiny models' norms are
    initialised to ones and zeros, under which a misused norm parameter would go unnoticed."""
    import copy

    g, out = torch.Generator().manual_seed(1), {}
    for family, model in denoisers.items():
        out[family] = copy.deepcopy(model)
        with torch.no_grad():
            for p in out[family].parameters():
                if p.ndim == 1:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
    return out


def diffusers_output(denoiser, family, values):
    """diffusers' own forward on the same values, converted to diffusers' layout."""
    with torch.no_grad():
        if family == "sd3":
            latent, t, tokens, pooled = values
            return denoiser(latent, encoder_hidden_states=tokens.squeeze(2).transpose(1, 2),
                            pooled_projections=pooled.flatten(1), timestep=t, return_dict=False)[0]
        sample, t, ehs = values[:3]
        added = {"time_ids": values[3], "text_embeds": values[4]} if len(values) == 5 else None
        return denoiser(sample, t, encoder_hidden_states=ehs.squeeze(2).transpose(1, 2), added_cond_kwargs=added,
                        return_dict=False)[0]


def assert_same_function(denoiser, family, attention):
    values = example_inputs(denoiser, family, BundleOptions(attention=attention))
    with torch.no_grad():
        ours = AppleDenoiser(denoiser, family, attention)(*values)
    ref = diffusers_output(denoiser, family, values)
    diff, scale = float((ours - ref).abs().max()), float(ref.abs().max())
    print(f"{family} {attention}: max |diff| {diff:.2e} (output max {scale:.2f})")
    assert ours.shape == ref.shape and diff <= 1e-5 * max(1.0, scale)


# -- the rewrite computes diffusers' function ------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("family", list(MODELS))
def test_rewrite_equals_diffusers(perturbed, family, attention, monkeypatch):
    # v2 chunks queries 512 at a time; tiny latents have 64 (SD3: 64 + 154) tokens, so use chunks of 24 to
    # exercise the chunking and its remainder on the real models.
    monkeypatch.setattr(ane_attention, "QUERY_CHUNK", 24)
    assert_same_function(perturbed[family], family, attention)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_sd35_qk_norm_and_dual_attention(denoisers, attention):
    """SD3.5's per-head RMS query/key norms and second attention, on a tiny SD3.5-shaped MMDiT."""
    from diffusers import SD3Transformer2DModel

    cfg = {k: v for k, v in denoisers["sd3"].config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**{**cfg, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}).eval()
    with torch.no_grad():  # non-trivial norm weights, so that using them wrongly shows
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.ndim > 1 else 0.5) + (1.0 if "norm" in name else 0.0))
    assert_same_function(model, "sd3", attention)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_attention_equals_scaled_dot_product(attention):
    """Each implementation against torch's own attention, with more queries than one v2 chunk (and
    a remainder), and cross-attention (77 keys)."""
    g = torch.Generator().manual_seed(0)
    heads, d, b = 4, 16, 2
    for sq, sk in ((1100, 1100), (1100, 77)):
        q, k, v = (torch.randn(b, heads * d, 1, s, generator=g) for s in (sq, sk, sk))
        ours = ane_attention.attend(q, k, v, heads, d ** -0.5, attention)
        split = lambda x: x.reshape(b, heads, d, -1).transpose(2, 3)  # noqa: E731 (B, heads, S, d)
        ref = F.scaled_dot_product_attention(split(q), split(k), split(v))
        ref = ref.transpose(2, 3).reshape(b, heads * d, 1, sq)
        assert float((ours - ref).abs().max()) < 1e-5


def test_caller_model_untouched_and_errors(denoisers):
    unet = denoisers["sdxl"]
    before = {n: type(m).__name__ for n, m in unet.named_modules()}
    weights = {n: p.clone() for n, p in unet.state_dict().items()}
    rewritten = AppleDenoiser(unet, "sdxl")
    assert {n: type(m).__name__ for n, m in unet.named_modules()} == before
    assert all(torch.equal(weights[n], p) for n, p in unet.state_dict().items())
    assert not any(isinstance(m, torch.nn.Linear) for m in rewritten.modules())
    for family, model, words in (("flux", denoisers["sd3"], "no pipeline in Apple's Swift"),
                                 ("pixart", denoisers["sd3"], "no pipeline in Apple's Swift"),
                                 ("sd3", unet, "needs a SD3Transformer2DModel"),
                                 ("sd", unet, "is not a sd UNet"), ("sdxl", denoisers["sd"], "is not a sdxl UNet")):
        with pytest.raises(CoreMLError, match=words) as err:
            apple_denoiser_inputs(model, family, BundleOptions())
        assert "\n" not in str(err.value)
    with pytest.raises(CoreMLError, match="batch of 2"):
        convert_apple_denoiser(denoisers["sd3"], "sd3", BundleOptions(batch_one=True), "/nonexistent/x.mlpackage")


def test_inputs_follow_the_contract_and_options(denoisers):
    for family, (inputs, _) in CONTRACT.items():
        assert apple_denoiser_inputs(denoisers[family], family, BundleOptions()) == \
            [(n, tuple(s)) for n, s, _ in inputs]
    shapes = dict(apple_denoiser_inputs(denoisers["sdxl"], "sdxl", BundleOptions(batch_one=True, latent_size=(6, 10))))
    assert shapes["sample"] == (1, 4, 6, 10) and shapes["time_ids"] == (1, 6)


# -- the converted packages ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(denoisers, tmp_path_factory):
    """Split-einsum packages, converted once each on first use (family -> path)."""
    out, made = tmp_path_factory.mktemp("apple-denoiser"), {}

    def get(family, attention="split-einsum", ios18=False):
        key = (family, attention, ios18)
        if key not in made:
            made[key] = out / f"{family}-{attention}-{int(ios18)}.mlpackage"
            convert_apple_denoiser(denoisers[family], family, BundleOptions(attention=attention), made[key], ios18)
        return made[key]

    return get


def io_table(path):
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    def rows(features):
        return [(f.name, list(f.type.multiArrayType.shape), ArrayFeatureType.ArrayDataType.Name(
            f.type.multiArrayType.dataType)) for f in features]

    spec = load_mlmodel(path).get_spec()
    return rows(spec.description.input), rows(spec.description.output), spec.specificationVersion


def op_counts(path):
    counts = collections.Counter(op.op_type for op in iter_ops(read_program(path)))
    return {k: counts[k] for k in ("einsum", "linear", "conv", "matmul")}


@pytest.mark.slow  # a conversion is 5-30 s of CPU per tiny model (scheduled first under xdist)
@pytest.mark.parametrize("family", ["sdxl"])  # the other families' packages: tests/search/test_bundle.py
def test_split_einsum_package(denoisers, packages, family):
    path = packages(family)
    inputs, outputs, version = io_table(path)
    assert (inputs, outputs) == CONTRACT[family]
    assert version == 7  # macOS 13, Apple's default --min-deployment-target
    counts = op_counts(path)
    cands = candidate_layers(denoisers[family], 0)
    print(f"{family} split-einsum ops: {counts}")
    # every Linear and Conv2d became one conv; attention is einsums; no linear op left
    assert counts["einsum"] > 0 and counts["linear"] == 0 and counts["conv"] == len(cands)
    _, weights = describe_program(read_program(path))
    torch_weights = {c.name: denoisers[family].get_submodule(c.name).weight.detach().numpy() for c in cands}
    matches = match_layers(torch_weights, weights)  # raises unless each layer is exactly one const
    assert len(matches) == len(cands) and len({m.const for m in matches.values()}) == len(cands)


@pytest.mark.slow
def test_original_attention_ios18_package(denoisers, packages):
    path = packages("sd3", "original", ios18=True)
    inputs, outputs, version = io_table(path)
    assert (inputs, outputs) == CONTRACT["sd3"] and version == 9  # iOS 18 / macOS 15
    counts = op_counts(path)
    print(f"sd3 original ops: {counts}")
    cands = candidate_layers(denoisers["sd3"], 0)
    assert counts["linear"] == 0 and counts["conv"] == len(cands)
    torch_weights = {c.name: denoisers["sd3"].get_submodule(c.name).weight.detach().numpy() for c in cands}
    assert len(match_layers(torch_weights, describe_program(read_program(path))[1])) == len(cands)


@MACOS_ONLY
@pytest.mark.parametrize("family", list(MODELS))
def test_package_predicts_diffusers_output(denoisers, packages, family):
    import coremltools as ct

    denoiser, path = denoisers[family], packages(family)
    values = example_inputs(denoiser, family, BundleOptions())
    names = [n for n, _ in apple_denoiser_inputs(denoiser, family, BundleOptions())]
    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    out = model.predict({n: v.numpy().astype(np.float16) for n, v in zip(names, values)})
    (got,) = out.values()
    ref = diffusers_output(denoiser, family, values).numpy()
    assert got.dtype == np.float32 and np.abs(got - ref).max() <= 0.05 * max(1.0, np.abs(ref).max())
