"""Resolving a user's model name to a loadable pipeline, and loading its denoiser.

``resolve_model`` checks cheaply (no weights loaded) that a model can be loaded, so a search
fails at submission with a one-line message instead of minutes later in a worker.
``denoiser_fingerprint`` identifies the exact weights a search measured, so results are never
mixed between models or applied to a different (e.g. fine-tuned) denoiser.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from common.errors import typed_line
from workers.hub import hub_offline, resolve_hub
from workers.single_file import is_single_file
from workers.arch_models import ARCH_MODELS, ensure_arch_model
from workers.denoiser import (Candidate, candidate_layers, denoiser_fingerprint, denoiser_of,  # noqa: F401
                              pick_device)  # (re-exported)
from workers.model_spec import (ALIASES, REAL_MIN_SIZE, ModelError, ModelSpec, denoiser_folder, describe, read_json,
                                supported_line)
from workers.tiny_models import (BUILTIN_MODELS, TINY_MIN_SIZE, TINY_RESOLUTION, default_cache_dir, ensure_tiny_model,
                                 quiet_hf)

ERROR_CHARS = 240  # at most this much of a library's error message is quoted
try:  # diffusers >= 0.36 renamed torch_dtype to dtype (the old name warns)
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    _DTYPE_KW = "dtype"
except ImportError:  # pragma: no cover - older diffusers
    _DTYPE_KW = "torch_dtype"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "~", "/")) or (os.sep != "/" and os.sep in name)
            or name.count("/") > 1 or name.endswith("/"))


def _describe_dir(requested: str, path: Path, tiny: bool = False) -> dict:
    """The spec fields of a pipeline directory (its model_index.json and configs)."""
    if not (path / "model_index.json").is_file():
        raise ModelError(f"'{requested}' is not a diffusers pipeline directory (no model_index.json)")
    index = read_json(path / "model_index.json")
    folder = denoiser_folder(index)
    if folder is None or not (path / folder).is_dir():
        raise ModelError(f"'{requested}' has no unet/ or transformer/ folder; {supported_line()}")
    return describe(index, read_json(path / folder / "config.json"), read_json(path / "vae" / "config.json"),
                    requested, hint=requested, tiny_resolution=TINY_RESOLUTION if tiny else 0)


def _resolve_local(requested: str, path: Path) -> ModelSpec:
    return ModelSpec(requested, "local", str(path.resolve()), default_min_size=REAL_MIN_SIZE,
                     **_describe_dir(requested, path))


def path_kind(path: Path) -> str | None:
    """"dir", "file" (anything else that exists) or None; a name no file system takes (too long)
    is no path, not an error: a model name is user input."""
    try:
        return "dir" if path.is_dir() else "file" if path.exists() else None
    except OSError:
        return None


def _classify(name: str, requested: str) -> tuple[str, str]:
    """("builtin" | "local" | "file" | "hub", the name, directory, file or repo id): the checks that need neither
    the network nor any weights (a local directory's structure is checked by `_resolve_local`)."""
    if not name:
        raise ModelError("no model given: pass a built-in name (tiny-sdxl, tiny-sd), a Hub id "
                         "(owner/name) or a local pipeline directory")
    if name in BUILTIN_MODELS or name in ARCH_MODELS:
        return "builtin", name
    path = Path(name).expanduser()
    kind = path_kind(path)
    if kind == "dir":
        return "local", str(path)
    if kind == "file":
        if is_single_file(name):
            return "file", str(path)
        raise ModelError(f"'{requested}' is a file, not a diffusers pipeline directory or a single-file "
                         "checkpoint (.safetensors, .ckpt)")
    if is_single_file(name) and (_looks_like_path(name) or "/" not in name):
        raise ModelError(f"checkpoint file '{requested}' does not exist")
    if _looks_like_path(name):
        raise ModelError(f"model directory '{requested}' does not exist")
    repo = ALIASES.get(name, name)
    if "/" not in repo:
        known = ", ".join([*BUILTIN_MODELS, *ARCH_MODELS, *ALIASES])
        raise ModelError(f"unknown model '{requested}': use one of {known}, a Hub id "
                         "(owner/name) or a local pipeline directory")
    if not _REPO_ID.match(repo) or "--" in repo or ".." in repo:
        raise ModelError(f"'{requested}' is not a valid Hugging Face repo id (expected owner/name)")
    return "hub", repo


def model_key(name: str) -> str:
    """What a model name stands for, checked without the network and without loading or building
    anything (built-in name, resolved pipeline directory, Hub repo id): a search that is still to
    be prepared is identified by it. Raises the ModelError `resolve_model` would for bad names."""
    requested, name = name, (name or "").strip()
    source, value = _classify(name, requested)
    if source == "local":
        return _resolve_local(requested, Path(value)).location
    if source == "file":
        return str(Path(value).resolve())
    return value


def model_options(config: dict | None) -> dict:
    """The resolve_model keywords a search's stored config or options hold (single files: LoRAs, --config)."""
    config = config or {}
    return {"loras": tuple(config.get("loras") or ()), "config_dir": config.get("config_dir")}


def _resolve_file(requested: str, path: Path, cache_dir: Path | None, loras: tuple, config_dir: str | None
                  ) -> ModelSpec:
    """A single-file checkpoint (+ LoRAs), materialized once into a pipeline directory (workers.single_file)."""
    from workers.single_file import materialize, version_line

    cache = Path(cache_dir or default_cache_dir()).expanduser()
    try:
        location, facts = materialize(path, requested, cache, loras, config_dir)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"could not load checkpoint '{requested}': {typed_line(exc, ERROR_CHARS)}") from None
    return ModelSpec(requested, "file", str(location), default_min_size=REAL_MIN_SIZE, version=version_line(facts),
                     **_describe_dir(requested, location))


def resolve_model(name: str, cache_dir: Path | None = None, *, loras: tuple[str, ...] = (),
                  config_dir: str | None = None) -> ModelSpec:
    """Map a built-in name, alias, local directory, Hub id or single-file checkpoint (with
    ``loras`` "FILE[:SCALE]" fused, configs from ``config_dir``) to a checked ``ModelSpec``."""
    requested = name
    name = (name or "").strip()
    source, value = _classify(name, requested)
    if source == "file":
        return _resolve_file(requested, Path(value), cache_dir, tuple(loras or ()), config_dir)
    if loras or config_dir:
        raise ModelError("--lora and --config apply to single-file checkpoints (.safetensors, .ckpt), not to "
                         f"'{requested}'")
    if source == "builtin":
        arch = name in ARCH_MODELS
        try:
            path = (ensure_arch_model(name, Path(cache_dir or default_cache_dir()).expanduser() / "builtin") if arch
                    else ensure_tiny_model(name, cache_dir))
        except Exception as exc:
            raise ModelError(f"could not build built-in model '{name}': {typed_line(exc, ERROR_CHARS)}") from None
        min_size = REAL_MIN_SIZE if arch else TINY_MIN_SIZE
        return ModelSpec(requested, "builtin", str(path), default_min_size=min_size,
                         **_describe_dir(requested, path, tiny=not arch))
    if source == "local":
        return _resolve_local(requested, Path(value))
    return resolve_hub(requested, value)


def _local_only(spec: ModelSpec) -> bool:
    return spec.source != "hub" or hub_offline()


def _fp16_published(spec: ModelSpec) -> bool | None:
    """Whether the denoiser has fp16 variant files (None: cannot tell without the Hub)."""
    if spec.source != "hub":
        return any(Path(spec.location, spec.denoiser).glob("*.fp16.*"))
    import huggingface_hub

    names = (f"{spec.denoiser}/diffusion_pytorch_model.fp16.safetensors",
             f"{spec.denoiser}/diffusion_pytorch_model.safetensors.index.fp16.json")
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


def with_variant(load, spec: ModelSpec):
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
        pipe = with_variant(lambda variant: DiffusionPipeline.from_pretrained(
            spec.location, variant=variant, **kw), spec)
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe.to(device)
    except Exception as exc:
        raise ModelError(f"could not move model '{spec.requested}' to {device}: "
                         f"{typed_line(exc, ERROR_CHARS)}") from None


def load_denoiser(spec: ModelSpec):
    """The denoiser alone (``unet/`` or ``transformer/``, the class its model_index.json names) in
    fp16 on CPU: what the driver needs for candidates and fingerprint."""
    import diffusers

    _slow_load_hook()
    index = _model_index(spec)
    folder = denoiser_folder(index) or "unet"
    cls = getattr(diffusers, (index or {}).get(folder, [None, "UNet2DConditionModel"])[1])
    kw = {_DTYPE_KW: torch.float16, "subfolder": folder, "local_files_only": _local_only(spec)}
    if not _accelerate_available():
        kw["low_cpu_mem_usage"] = False  # otherwise diffusers prints an install hint
    with quiet_hf():
        module = with_variant(lambda variant: cls.from_pretrained(spec.location, variant=variant, **kw), spec)
    return module.eval()


def _model_index(spec: ModelSpec) -> dict | None:
    if spec.source != "hub":
        return read_json(Path(spec.location) / "model_index.json")
    import huggingface_hub

    path = huggingface_hub.try_to_load_from_cache(spec.location, "model_index.json")
    if not isinstance(path, str) and not hub_offline():
        path = huggingface_hub.hf_hub_download(spec.location, "model_index.json", etag_timeout=10)
    return read_json(path if isinstance(path, str) else None)


def _slow_load_hook() -> None:
    """Test hook: MBP_SEARCH_SLOW_LOAD_S makes every UNet load (a search's preparation) that much
    slower, so tests can see that a submit returns before the model is loaded."""
    delay = float(os.environ.get("MBP_SEARCH_SLOW_LOAD_S") or 0)
    if delay > 0:
        import time

        time.sleep(delay)


def _accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None
