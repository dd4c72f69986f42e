"""Model resolution, the built-in tiny pipelines, candidates and fingerprints."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from workers import models, tiny_models
from workers.models import (ALIASES, ModelError, candidate_layers, load_pipeline, load_denoiser,
                            pick_device, resolve_model, denoiser_fingerprint)
from workers.tiny_models import BUILTIN_MODELS, TINY_MIN_SIZE, TINY_RESOLUTION, ensure_tiny_model

SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so the user's real cache never changes an outcome."""
    from huggingface_hub import constants

    path = tmp_path / "hf-cache"
    path.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    return path


def _fake_cached_repo(cache: Path, repo: str, files: dict[str, dict]) -> None:
    """Lay out ``files`` the way huggingface_hub caches a snapshot of ``repo``."""
    commit = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for name, content in files.items():
        target = base / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(content))


def _error(name: str, **kw) -> str:
    with pytest.raises(ModelError) as info:
        resolve_model(name, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --- resolution -------------------------------------------------------------------------

def test_builtin_specs(tiny_sdxl_spec, tiny_sd_spec, model_cache):
    for spec, family in ((tiny_sdxl_spec, "sdxl"), (tiny_sd_spec, "sd")):
        assert spec.source == "builtin" and spec.family == family
        assert spec.default_min_size == TINY_MIN_SIZE
        assert spec.default_resolution == TINY_RESOLUTION
        path = Path(spec.location)
        assert path.is_relative_to(model_cache) and (path / "model_index.json").is_file()
    assert set(BUILTIN_MODELS) == {"tiny-sdxl", "tiny-sd", "tiny-sdxl-refiner", "tiny-sd3", "tiny-flux", "tiny-pixart"}


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MBP_SEARCH_CACHE", str(tmp_path / "c"))
    assert tiny_models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MBP_SEARCH_CACHE")
    assert "mbp-search" in str(tiny_models.default_cache_dir())


def test_local_directory(tiny_sdxl_spec, tiny_sd_spec):
    spec = resolve_model(tiny_sdxl_spec.location)
    assert (spec.source, spec.family, spec.location) == ("local", "sdxl", tiny_sdxl_spec.location)
    assert spec.default_min_size == 100_000
    assert spec.default_resolution == TINY_RESOLUTION  # unet sample_size x VAE scale factor
    assert resolve_model(tiny_sd_spec.location + "/").family == "sd"


def test_bad_paths(tmp_path):
    assert "does not exist" in _error(str(tmp_path / "missing" / "model"))
    assert "does not exist" in _error("./no/such/dir")
    assert "does not exist" in _error("~/no-such-mbp-model-dir")
    assert "no model_index.json" in _error(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert "no unet/" in _error(str(tmp_path))
    (tmp_path / "file.txt").write_text("x")
    assert "is a file" in _error(str(tmp_path / "file.txt"))


@pytest.mark.parametrize("name", ["foo/ba r", "-foo/bar", "foo/bar!", "fo--o/bar"])
def test_invalid_repo_id(name):
    assert "not a valid Hugging Face repo id" in _error(name)


def test_unknown_and_empty_names():
    msg = _error("sdxl")
    assert "unknown model 'sdxl'" in msg and "tiny-sdxl" in msg
    assert "no model given" in _error("  ")


def test_uncached_hub_id_offline(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _error("nobody-here/not-a-model")
    assert "'nobody-here/not-a-model' is not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE" in msg and "local pipeline directory" in msg
    assert SDXL_ID in _error("sdxl-base-1.0")  # alias expanded before the lookup


def _raise(cls, message="x"):
    """Raise a huggingface_hub error without building an HTTP response object."""
    def fail(*args, **kwargs):
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        raise exc
    return fail


def test_uncached_hub_id_online_failures(hf_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "model_info", _raise(ConnectionError))
    assert "the Hub is unreachable" in _error("someone/something")
    monkeypatch.setattr(huggingface_hub, "model_info", _raise(errors.RepositoryNotFoundError))
    assert "does not exist on the Hugging Face Hub" in _error("someone/something")
    monkeypatch.setattr(huggingface_hub, "model_info", _raise(errors.GatedRepoError))
    assert "is gated" in _error("someone/something")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(errors.RemoteEntryNotFoundError))
    assert "not a diffusers pipeline repository" in _error("someone/something")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(errors.LocalEntryNotFoundError))
    assert "the Hub is unreachable" in _error("someone/something")


def test_cached_hub_alias(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_cached_repo(hf_cache, SDXL_ID, {
        "model_index.json": {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "x"]},
        "unet/config.json": {"sample_size": 128, "addition_embed_type": "text_time"},
        "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
    })
    for name in ("sdxl-base-1.0", "stabilityai/sdxl-base-1.0", SDXL_ID):
        spec = resolve_model(name)
        assert (spec.requested, spec.source, spec.location) == (name, "hub", SDXL_ID)
        assert (spec.family, spec.default_resolution, spec.default_min_size) == ("sdxl", 1024, 100_000)
    # Only model_index.json cached: the family comes from the class name, size from defaults.
    _fake_cached_repo(hf_cache, ALIASES["sd-2.1"], {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"]}})
    spec = resolve_model("sd-2.1")
    assert (spec.family, spec.default_resolution) == ("sd", 768)
    # A transformer pipeline: native resolution and its pipeline's steps; an unsupported class: one line.
    _fake_cached_repo(hf_cache, "someone/flux-like", {
        "model_index.json": {"_class_name": "FluxPipeline", "transformer": ["diffusers", "x"]}})
    spec = resolve_model("someone/flux-like")
    assert (spec.family, spec.denoiser, spec.default_resolution, spec.protocol_resolution, spec.default_steps) == (
        "flux", "transformer", 1024, 1024, 28)
    _fake_cached_repo(hf_cache, "someone/inpaint", {
        "model_index.json": {"_class_name": "StableDiffusionInpaintPipeline", "unet": ["diffusers", "x"]}})
    message = _error("someone/inpaint")
    assert "StableDiffusionInpaintPipeline" in message and "FluxPipeline" in message and "\n" not in message


def test_cached_hub_pipeline_loads_offline(hf_cache, monkeypatch, tiny_sd_spec):
    """A Hub id whose snapshot is fully cached resolves and loads with HF_HUB_OFFLINE=1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "1" * 40
    base = hf_cache / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd_spec.location, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    spec = resolve_model("someone/tiny-sd")
    assert (spec.source, spec.family, spec.default_resolution) == ("hub", "sd", TINY_RESOLUTION)
    assert models._fp16_published(spec) is True
    assert denoiser_fingerprint(load_denoiser(spec)) == denoiser_fingerprint(load_denoiser(tiny_sd_spec))
    assert type(load_pipeline(spec)).__name__ == "StableDiffusionPipeline"


# --- the tiny pipelines -----------------------------------------------------------------

def test_tiny_sdxl_structure(tiny_sdxl_spec):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = load_pipeline(tiny_sdxl_spec)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert type(pipe.text_encoder) is CLIPTextModel
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.tokenizer is not None and pipe.tokenizer_2 is not None
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time" and cfg.use_linear_projection
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size * 2
    assert isinstance(pipe.unet.mid_block.attentions[0].proj_in, nn.Linear)
    assert pipe.unet.dtype == torch.float32 and pipe.vae_scale_factor == 8


def test_tiny_sd_structure(tiny_sd_spec):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = load_pipeline(tiny_sd_spec)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None and not pipe.config.requires_safety_checker
    assert not pipe.unet.config.use_linear_projection
    assert pipe.unet.config.addition_embed_type is None
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].proj_in, nn.Conv2d)


@pytest.mark.parametrize("sub", ["tokenizer", "tokenizer_2"])
def test_tokenizer_files(tiny_sdxl_spec, sub):
    from transformers import CLIPTokenizer

    folder = Path(tiny_sdxl_spec.location) / sub
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    tok = CLIPTokenizer.from_pretrained(folder)
    prompt = "A watercolor illustration of a fox, naïve 漢字 🙂 under a tree!! " * 5
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length,
              truncation=True).input_ids
    assert tok.model_max_length == 77 and len(ids) == 77
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids[1:-1]
    assert tok.convert_ids_to_tokens(tok("the cat").input_ids)[1:3] == ["the</w>", "cat</w>"]


def test_fp16_variant_and_fingerprint_dtype(tiny_sd_spec):
    unet16 = load_denoiser(tiny_sd_spec)
    assert unet16.dtype == torch.float16
    assert any(Path(tiny_sd_spec.location, "unet").glob("*.fp16.safetensors"))
    pipe = load_pipeline(tiny_sd_spec)  # float32; weights are exactly fp16-representable
    assert denoiser_fingerprint(unet16) == denoiser_fingerprint(pipe.unet)
    local = resolve_model(tiny_sd_spec.location)
    assert denoiser_fingerprint(load_denoiser(local)) == denoiser_fingerprint(unet16)


def test_load_without_fp16_variant_and_load_errors(tiny_sd_spec, tmp_path):
    copy = tmp_path / "sd-copy"
    shutil.copytree(tiny_sd_spec.location, copy)
    for f in copy.rglob("*.fp16.*"):
        f.unlink()
    spec = resolve_model(str(copy))
    unet = load_denoiser(spec)
    assert unet.dtype == torch.float16
    assert denoiser_fingerprint(unet) == denoiser_fingerprint(load_denoiser(tiny_sd_spec))
    assert load_pipeline(spec).unet.dtype == torch.float32
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    for load in (load_denoiser, load_pipeline):
        with pytest.raises(ModelError) as info:
            load(spec)
        assert "could not load model" in str(info.value) and "\n" not in str(info.value)


def test_rebuild_is_deterministic_and_concurrent_safe(tiny_sd_spec, tmp_path):
    expected = denoiser_fingerprint(load_denoiser(tiny_sd_spec))
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(ensure_tiny_model("tiny-sd", tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    spec = resolve_model("tiny-sd", tmp_path)
    assert denoiser_fingerprint(load_denoiser(spec)) == expected
    # Deleting forces a rebuild; an outdated marker too; both give the same weights.
    shutil.rmtree(spec.location)
    assert denoiser_fingerprint(load_denoiser(resolve_model("tiny-sd", tmp_path))) == expected
    marker = Path(spec.location) / tiny_models.MARKER
    marker.write_text("old")
    ensure_tiny_model("tiny-sd", tmp_path)
    assert marker.read_text() != "old"
    assert not [p for p in (tmp_path / "builtin").iterdir() if p.is_dir() and p.name.startswith(".")]


def test_in_memory_sdxl_build_matches_cache(tiny_sdxl_spec):
    built = tiny_models.build_tiny_pipeline("tiny-sdxl").unet
    assert denoiser_fingerprint(built) == denoiser_fingerprint(load_denoiser(tiny_sdxl_spec))


# --- candidates and fingerprints --------------------------------------------------------

def test_candidate_layers(tiny_sdxl_spec, tiny_sd_spec):
    counts = {}
    for spec in (tiny_sdxl_spec, tiny_sd_spec):
        unet = load_denoiser(spec)
        cands = candidate_layers(unet, spec.default_min_size)
        counts[spec.family] = len(cands)
        modules = dict(unet.named_modules())
        order = [n for n in modules if n in {c.name for c in cands}]
        assert [c.name for c in cands] == order
        for c in cands:
            mod = modules[c.name]
            assert c.numel == mod.weight.numel() > spec.default_min_size
            assert c.shape == tuple(mod.weight.shape)
            assert c.kind == ("linear" if isinstance(mod, nn.Linear) else "conv")
        assert {c.kind for c in cands} == {"linear", "conv"}
        everything = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert len(candidate_layers(unet, 0)) == len(everything)
        big = max(c.numel for c in cands)
        assert candidate_layers(unet, big) == []
    assert counts == {"sdxl": 67, "sd": 43}


def test_fingerprint_changes_with_one_weight(tiny_sd_spec):
    unet = load_denoiser(tiny_sd_spec)
    before = denoiser_fingerprint(unet)
    assert denoiser_fingerprint(unet) == before and len(before) == 64
    name = candidate_layers(unet, TINY_MIN_SIZE)[3].name
    weight = dict(unet.named_modules())[name].weight
    with torch.no_grad():
        weight.view(-1)[7] += 0.25
    assert denoiser_fingerprint(unet) != before


def test_pick_device():
    assert pick_device() in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        assert pick_device() in {"cpu", "mps"}


def test_local_transformer_pipeline_directory(model_cache, tmp_path):
    """A transformer pipeline directory of the user's (here a copy of tiny-sd3, not the built-in
    name) resolves as a local model and loads through plain from_pretrained: same denoiser."""
    from diffusers import DiffusionPipeline

    from workers.models import denoiser_of

    builtin = resolve_model("tiny-sd3", model_cache)
    local = tmp_path / "my-sd3"
    shutil.copytree(builtin.location, local)
    spec = resolve_model(str(local))
    assert (spec.source, spec.family, spec.denoiser, spec.img2img) == ("local", "sd3", "transformer", False)
    assert spec.default_steps == 28 and spec.default_min_size == 100_000  # the pipeline's own steps, Apple's size
    plain = DiffusionPipeline.from_pretrained(str(local))
    assert type(plain).__name__ == "StableDiffusion3Pipeline"
    assert denoiser_fingerprint(denoiser_of(plain)) == denoiser_fingerprint(load_denoiser(spec))
    assert denoiser_fingerprint(load_denoiser(spec)) == denoiser_fingerprint(load_denoiser(builtin))


def test_family_specs(model_cache):
    """Every built-in family: its denoiser, Apple's image-to-image rule, steps and size."""
    expect = {"tiny-sdxl-refiner": ("sdxl", "unet", True, 4), "tiny-sd3": ("sd3", "transformer", False, 28),
              "tiny-flux": ("flux", "transformer", False, 4), "tiny-pixart": ("pixart", "transformer", False, 20)}
    for name, facts in expect.items():
        spec = resolve_model(name, model_cache)
        assert (spec.family, spec.denoiser, spec.img2img, spec.default_steps) == facts, name
        assert spec.protocol_resolution == spec.default_resolution == TINY_RESOLUTION
    assert resolve_model("tiny-sdxl", model_cache).default_steps == 1
