"""Resolving a user's model name to a loadable pipeline, and UNet introspection.

``resolve_model`` checks cheaply (no weights loaded) that a model can be loaded, so a search
fails at submission with a one-line message instead of minutes later in a worker.
``unet_fingerprint`` identifies the exact weights a search measured, so results are never
mixed between models or applied to a different (e.g. fine-tuned) UNet.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import typed_line
from workers.arch_models import ARCH_MODELS, ensure_arch_model
from workers.unet_facts import Candidate, candidate_layers, pick_device, unet_fingerprint  # noqa: F401 (re-exported)
from workers.tiny_models import (BUILTIN_MODELS, TINY_MIN_SIZE, TINY_RESOLUTION, default_cache_dir, ensure_tiny_model,
                                 quiet_hf)

REAL_MIN_SIZE = 100_000  # Apple's PALETTIZE_MIN_SIZE
ERROR_CHARS = 240  # at most this much of a library's error message is quoted
ALIASES = {
    "sdxl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "stabilityai/sdxl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1-base": "stabilityai/stable-diffusion-2-1-base",
    "sd-2.1": "stabilityai/stable-diffusion-2-1",
}
try:  # diffusers >= 0.36 renamed torch_dtype to dtype (the old name warns)
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    _DTYPE_KW = "dtype"
except ImportError:  # pragma: no cover - older diffusers
    _DTYPE_KW = "torch_dtype"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ModelError(Exception):
    """A model cannot be used; the one-line message names the model and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    requested: str  # what the user typed
    source: str  # "builtin" | "local" | "hub"
    location: str  # local directory, or Hub repo id
    family: str  # "sdxl" | "sd"
    default_min_size: int
    default_resolution: int  # pixels

    @property
    def tiny(self) -> bool:
        """A built-in tiny model: keeps its own small resolution under Apple's protocol."""
        return self.source == "builtin" and self.default_min_size == TINY_MIN_SIZE


def hub_offline() -> bool:
    """Read HF_HUB_OFFLINE at call time (huggingface_hub only reads it at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _read_json(path: Path | str | None) -> dict | None:
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError, TypeError):
        return None


def _describe(index: dict | None, unet_cfg: dict | None, vae_cfg: dict | None, name: str,
              hint: str = "") -> tuple[str, int]:
    """Family and default resolution from model_index.json and the unet/vae configs."""
    if index is not None and "unet" not in index:
        raise ModelError(f"model '{name}' ({index.get('_class_name', '?')}) has no UNet: "
                         "only UNet-based SD/SDXL pipelines can be searched")
    cls = str((index or {}).get("_class_name", ""))
    sdxl = "XL" in cls or (unet_cfg or {}).get("addition_embed_type") == "text_time"
    family = "sdxl" if sdxl else "sd"
    sample = (unet_cfg or {}).get("sample_size")
    blocks = (vae_cfg or {}).get("block_out_channels")
    scale = 2 ** (len(blocks) - 1) if blocks else 8
    if isinstance(sample, int) and sample > 0:
        return family, sample * scale
    if family == "sdxl":
        return family, 1024
    sd2_768 = re.search(r"2-[01]$", hint) is not None  # stable-diffusion-2(-1) without -base
    return family, 768 if sd2_768 else 512


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "~", "/")) or (os.sep != "/" and os.sep in name)
            or name.count("/") > 1 or name.endswith("/"))


def _resolve_local(requested: str, path: Path) -> ModelSpec:
    if not (path / "model_index.json").is_file():
        raise ModelError(f"'{requested}' is not a diffusers pipeline directory (no model_index.json)")
    if not (path / "unet").is_dir():
        raise ModelError(f"'{requested}' has no unet/ folder: only UNet-based SD/SDXL pipelines "
                         "can be searched")
    family, res = _describe(_read_json(path / "model_index.json"),
                            _read_json(path / "unet" / "config.json"),
                            _read_json(path / "vae" / "config.json"), requested)
    return ModelSpec(requested, "local", str(path.resolve()), family, REAL_MIN_SIZE, res)


def _cached_or_download(repo: str, filename: str, offline: bool) -> str | None:
    """Path of a small file of ``repo``: from the cache, else downloaded when online."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str) or offline:
        return cached if isinstance(cached, str) else None
    try:
        return hf_hub_download(repo, filename, etag_timeout=10)
    except Exception:
        return None


def _fetch_model_index(repo: str) -> str:
    """Download model_index.json, turning Hub failures into one-line ModelErrors."""
    import huggingface_hub
    from huggingface_hub import errors

    unreachable = ModelError(f"model '{repo}' is not in the local Hugging Face cache and the Hub "
                             "is unreachable: run with network once, or pass a local pipeline "
                             "directory")
    try:  # one quick request first: hf_hub_download retries for ~20 s when offline
        huggingface_hub.model_info(repo, timeout=10)
        return huggingface_hub.hf_hub_download(repo, "model_index.json", etag_timeout=10)
    except errors.GatedRepoError:
        raise ModelError(f"model '{repo}' is gated: accept its licence on huggingface.co and "
                         "log in (hf auth login), or pass a local pipeline directory") from None
    except errors.RepositoryNotFoundError:
        raise ModelError(f"model '{repo}' does not exist on the Hugging Face Hub (or is private: "
                         "log in with hf auth login)") from None
    except errors.LocalEntryNotFoundError:
        raise unreachable from None
    except errors.EntryNotFoundError:
        raise ModelError(f"'{repo}' is not a diffusers pipeline repository (no model_index.json)"
                         ) from None
    except Exception:  # DNS, proxy, timeouts, HTTP 5xx: all mean "cannot use the Hub now"
        raise unreachable from None


def _resolve_hub(requested: str, repo: str) -> ModelSpec:
    index_path = _cached_or_download(repo, "model_index.json", offline=True)
    reached_hub = False  # only download the small configs when the Hub just answered
    if index_path is None:
        if hub_offline():
            raise ModelError(f"model '{repo}' is not in the local Hugging Face cache and "
                             "HF_HUB_OFFLINE is set: run with network once, or pass a local "
                             "pipeline directory")
        index_path, reached_hub = _fetch_model_index(repo), True
    unet_cfg, vae_cfg = (
        _read_json(_cached_or_download(repo, f"{sub}/config.json", offline=not reached_hub))
        for sub in ("unet", "vae"))
    family, res = _describe(_read_json(index_path), unet_cfg, vae_cfg, repo, hint=repo)
    return ModelSpec(requested, "hub", repo, family, REAL_MIN_SIZE, res)


def resolve_model(name: str, cache_dir: Path | None = None) -> ModelSpec:
    """Map a built-in name, alias, local directory or Hub id to a checked ``ModelSpec``."""
    requested = name
    name = (name or "").strip()
    if not name:
        raise ModelError("no model given: pass a built-in name (tiny-sdxl, tiny-sd), a Hub id "
                         "(owner/name) or a local pipeline directory")
    if name in BUILTIN_MODELS or name in ARCH_MODELS:
        arch = name in ARCH_MODELS
        try:
            path = ensure_arch_model(name, Path(cache_dir or default_cache_dir()).expanduser() / "builtin") if arch else ensure_tiny_model(name, cache_dir)
        except Exception as exc:
            raise ModelError(f"could not build built-in model '{name}': {typed_line(exc, ERROR_CHARS)}") from None
        family = "sdxl" if "sdxl" in name else "sd"
        if arch:  # full size: the real candidates and resolution
            return ModelSpec(requested, "builtin", str(path), family, REAL_MIN_SIZE, 1024 if family == "sdxl" else 512)
        return ModelSpec(requested, "builtin", str(path), family, TINY_MIN_SIZE, TINY_RESOLUTION)
    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_local(requested, path)
    if path.exists():
        raise ModelError(f"'{requested}' is a file, not a diffusers pipeline directory")
    if _looks_like_path(name):
        raise ModelError(f"model directory '{requested}' does not exist")
    repo = ALIASES.get(name, name)
    if "/" not in repo:
        known = ", ".join([*BUILTIN_MODELS, *ARCH_MODELS, *ALIASES])
        raise ModelError(f"unknown model '{requested}': use one of {known}, a Hub id "
                         "(owner/name) or a local pipeline directory")
    if not _REPO_ID.match(repo) or "--" in repo or ".." in repo:
        raise ModelError(f"'{requested}' is not a valid Hugging Face repo id (expected owner/name)")
    return _resolve_hub(requested, repo)


def _local_only(spec: ModelSpec) -> bool:
    return spec.source != "hub" or hub_offline()


def _fp16_published(spec: ModelSpec) -> bool | None:
    """Whether the UNet has fp16 variant files (None: cannot tell without the Hub)."""
    if spec.source != "hub":
        return any(Path(spec.location, "unet").glob("*.fp16.*"))
    import huggingface_hub

    names = ("unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.safetensors.index.fp16.json")
    if any(isinstance(huggingface_hub.try_to_load_from_cache(spec.location, n), str)
           for n in names):
        return True
    if hub_offline():
        return None
    try:
        files = {f.rfilename for f in huggingface_hub.model_info(spec.location, timeout=10).siblings}
    except Exception:
        return None
    return any(n in files for n in names)


def _with_variant(load, spec: ModelSpec):
    """Load the fp16 variant where published (half the download), else the default weights."""
    published = _fp16_published(spec)
    variants = ["fp16"] if published else [None] if published is False else ["fp16", None]
    for i, variant in enumerate(variants):
        try:
            return load(variant=variant)
        except Exception as exc:
            if i + 1 < len(variants):
                continue
            hint = " (run with network once to download it)" if spec.source == "hub" else ""
            raise ModelError(f"could not load model '{spec.requested}' from {spec.location}: "
                             f"{typed_line(exc, ERROR_CHARS)}{hint}") from None


def load_pipeline(spec: ModelSpec, device: str = "cpu", dtype=torch.float32):
    """Load the whole pipeline (as the workers run it), on ``device`` in ``dtype``."""
    from diffusers import DiffusionPipeline

    kw = {_DTYPE_KW: dtype, "local_files_only": _local_only(spec)}
    if spec.family == "sd":
        kw.update(safety_checker=None, requires_safety_checker=False)
    with quiet_hf():  # per-worker progress bars and fallback warnings are only noise
        pipe = _with_variant(lambda variant: DiffusionPipeline.from_pretrained(
            spec.location, variant=variant, **kw), spec)
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe.to(device)
    except Exception as exc:
        raise ModelError(f"could not move model '{spec.requested}' to {device}: "
                         f"{typed_line(exc, ERROR_CHARS)}") from None


def load_unet(spec: ModelSpec):
    """The UNet alone in fp16 on CPU: what the driver needs for candidates and fingerprint."""
    from diffusers import UNet2DConditionModel

    kw = {_DTYPE_KW: torch.float16, "subfolder": "unet", "local_files_only": _local_only(spec)}
    if not _accelerate_available():
        kw["low_cpu_mem_usage"] = False  # otherwise diffusers prints an install hint
    with quiet_hf():
        unet = _with_variant(lambda variant: UNet2DConditionModel.from_pretrained(
            spec.location, variant=variant, **kw), spec)
    return unet.eval()


def _accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None
