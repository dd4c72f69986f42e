"""Built-in tiny pipelines for demos and tests without network: the UNet ones ("tiny-sdxl",
"tiny-sd", "tiny-sdxl-refiner") here, the transformer ones in `workers.tiny_transformers`.

They are complete diffusers pipeline directories with deterministic random weights, written
with ``save_pretrained`` and then loaded through the same ``from_pretrained`` path as a Hub
model, so nothing downstream special-cases them. The structure mirrors the real families
(SDXL: two CLIP encoders, pooled embeddings, ``text_time`` conditioning, linear attention
projections; SD-1.5: one encoder, conv projections, PNDM; the SDXL refiner: image-to-image,
the second encoder only, aesthetic-score conditioning) at a size where one 1-step call on a
batch of 8 takes a fraction of a second on one CPU core.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from common.files import publish_dir
from workers.tiny_parts import (TINY_RESOLUTION, _round_to_fp16, _seeded, _text_encoder, _tokenizer,  # noqa: F401
                                _vae, _write_vocab_files)
from workers.tiny_transformers import TRANSFORMER_BUILDERS

UNET_MODELS = ("tiny-sdxl", "tiny-sd", "tiny-sdxl-refiner")
BUILTIN_MODELS = UNET_MODELS + tuple(TRANSFORMER_BUILDERS)
TINY_MIN_SIZE = 10_000  # > 10,000 elements: coremltools' kmeans1d path, as every SDXL candidate (> 1e5)
FORMAT_VERSION = "1"  # bump when the built directory changes: forces a rebuild
MARKER = ".mbp-tiny-model"
_SAMPLE_SIZE = TINY_RESOLUTION // 8


def default_cache_dir() -> Path:
    """Per-user cache (``MBP_SEARCH_CACHE`` overrides) so builds survive between runs."""
    env = os.environ.get("MBP_SEARCH_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mbp-search"))


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
    )
    if family == "refiner":  # the refiner: second encoder only (32 wide), 5 time ids (aesthetic score)
        kw = dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4),
            cross_attention_dim=32, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=5 * 8 + 32,
        )
    elif family == "sdxl":
        kw = dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
            cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    else:
        kw = dict(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, cross_attention_dim=32, use_linear_projection=False,
        )
    with _seeded("unet"):
        unet = UNet2DConditionModel(**common, **kw)
    return _round_to_fp16(unet.eval())


def build_tiny_pipeline(name: str):
    """Construct the pipeline object in memory (float32, fp16-representable weights)."""
    from diffusers import (EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {BUILTIN_MODELS}")
    if name in TRANSFORMER_BUILDERS:
        return TRANSFORMER_BUILDERS[name]()
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, steps_offset=1)
    tok = _tokenizer("<|endoftext|>")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    if name == "tiny-sdxl-refiner":
        return StableDiffusionXLImg2ImgPipeline(
            vae=_vae(force_upcast=False), unet=_unet("refiner"), tokenizer=None, text_encoder=None,
            tokenizer_2=_tokenizer("!"),
            text_encoder_2=_text_encoder("text_encoder_2", len(tok), eos, projection=True),
            scheduler=EulerDiscreteScheduler(**sched, timestep_spacing="leading",
                                             prediction_type="epsilon", interpolation_type="linear"),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )
    if name == "tiny-sdxl":
        return StableDiffusionXLPipeline(
            vae=_vae(), unet=_unet("sdxl"), tokenizer=tok, tokenizer_2=_tokenizer("!"),
            text_encoder=_text_encoder("text_encoder", len(tok), eos, projection=False),
            text_encoder_2=_text_encoder("text_encoder_2", len(tok), eos, projection=True),
            scheduler=EulerDiscreteScheduler(**sched, timestep_spacing="leading",
                                             prediction_type="epsilon", interpolation_type="linear"),
        )
    return StableDiffusionPipeline(
        vae=_vae(), unet=_unet("sd"), tokenizer=tok,
        text_encoder=_text_encoder("text_encoder", len(tok), eos, projection=False),
        scheduler=PNDMScheduler(**sched, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@contextlib.contextmanager
def quiet_hf():
    """Hide diffusers/transformers progress bars and warnings for internal load/save steps."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for mod in (dlog, tlog):
        mod.set_verbosity_error()
        mod.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub dropped
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        for mod, verbosity, bars in saved:
            mod.set_verbosity(verbosity)
            if bars:
                mod.enable_progress_bar()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _marker_text(name: str) -> str:
    return json.dumps({"name": name, "format": FORMAT_VERSION})


def _is_current(path: Path, name: str) -> bool:
    try:
        return (path / MARKER).read_text() == _marker_text(name)
    except OSError:
        return False


@contextlib.contextmanager
def _build_lock(lock_path: Path):
    """Serialise builders across processes (best effort where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_tiny_model(name: str, cache_dir: Path | None = None) -> Path:
    """Build ``name`` into ``cache_dir`` once and return its pipeline directory.

    The build happens in a temporary sibling directory that is renamed into place, so a
    crash never leaves a half-written model, and the marker file (written last) records the
    format version so an outdated build is replaced.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {BUILTIN_MODELS}")
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    root = root / "builtin"
    final = root / name
    if _is_current(final, name):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{name}.lock"):
        if _is_current(final, name):
            return final
        import torch

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            with quiet_hf():
                pipe = build_tiny_pipeline(name)
                pipe.save_pretrained(tmp, safe_serialization=True)
                pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True,
                                                       variant="fp16")
            for sub in ("tokenizer", "tokenizer_2"):  # the CLIP ones (T5's is one tokenizer.json)
                if "CLIP" in _read(tmp / sub / "tokenizer_config.json"):
                    _write_vocab_files(tmp / sub)
            (tmp / MARKER).write_text(_marker_text(name))
            publish_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final

