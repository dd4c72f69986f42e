"""What a model is, once resolved (`ModelSpec`), the error every model problem raises, and how a
pipeline's configs describe it (`describe`: family, denoiser, image-to-image or not, default
resolution and the protocol's steps / guidance). No torch, no network.

The families a search supports are listed once, in `PIPELINES`; `HUB_MODELS` names the Hub ids
with a short alias each and, where the model card's sampling differs from its pipeline's
``__call__`` defaults (few-step models), the steps and guidance the model is run with.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

REAL_MIN_SIZE = 100_000  # Apple's PALETTIZE_MIN_SIZE
APPLE_RESOLUTION = 768  # Apple's TEST_RESOLUTION: every UNet pipeline, image-to-image ones included
APPLE_STEPS = 1  # Apple's num_inference_steps for text-to-image UNets
IMG2IMG_STEPS, IMG2IMG_STRENGTH = 4, 0.25  # Apple's image-to-image call (4 steps at strength 0.25)

# Pipeline class -> family. The family decides nothing about how a search runs (one code path,
# see workers.denoiser); it names the model to the user and picks its default protocol below.
PIPELINES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd", "LatentConsistencyModelImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux",
    "PixArtSigmaPipeline": "pixart", "PixArtAlphaPipeline": "pixart",
}
TRANSFORMER_FAMILIES = ("sd3", "flux", "pixart")
# Native steps of the transformer families: their pipelines' __call__ defaults.
NATIVE_STEPS = {"sd3": 28, "flux": 28, "pixart": 20}

# alias -> (Hub id, steps, guidance); None: the protocol's / pipeline's own.
HUB_MODELS = {
    "sd-1.5": ("stable-diffusion-v1-5/stable-diffusion-v1-5", None, None),
    "sd-2.1-base": ("stabilityai/stable-diffusion-2-1-base", None, None),
    "sd-2.1": ("stabilityai/stable-diffusion-2-1", None, None),
    "sdxl-base-1.0": ("stabilityai/stable-diffusion-xl-base-1.0", None, None),
    "stabilityai/sdxl-base-1.0": ("stabilityai/stable-diffusion-xl-base-1.0", None, None),
    "sdxl-refiner-1.0": ("stabilityai/stable-diffusion-xl-refiner-1.0", None, None),
    "sdxl-turbo": ("stabilityai/sdxl-turbo", 1, 0.0),
    "sd-turbo": ("stabilityai/sd-turbo", 1, 0.0),
    "lcm-dreamshaper-v7": ("SimianLuo/LCM_Dreamshaper_v7", 4, None),
    "sd3-medium": ("stabilityai/stable-diffusion-3-medium-diffusers", None, None),
    "sd3.5-medium": ("stabilityai/stable-diffusion-3.5-medium", None, None),
    "sd3.5-large": ("stabilityai/stable-diffusion-3.5-large", None, None),
    "sd3.5-large-turbo": ("stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", 4, 0.0),
    "flux-dev": ("black-forest-labs/FLUX.1-dev", None, None),
    "pixart-sigma": ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", None, None),
}
ALIASES = {alias: repo for alias, (repo, _, _) in HUB_MODELS.items()}
_SAMPLING = {repo: (steps, guidance) for repo, steps, guidance in HUB_MODELS.values()}
_SAMPLING["tiny-flux"] = (4, None)  # the built-in tiny Flux is schnell-like (no guidance embedding)


DENOISER_FOLDERS = ("unet", "transformer")  # a pipeline's attribute and folder, in lookup order


def denoiser_folder(index: dict | None) -> str | None:
    """The denoiser's component name in a model_index.json (None: the pipeline has none)."""
    return next((f for f in DENOISER_FOLDERS if f in (index or {})), None)


class ModelError(Exception):
    """A model cannot be used; the one-line message names the model and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    requested: str  # what the user typed
    source: str  # "builtin" | "local" | "hub" | "file" (a single-file checkpoint, materialized: location)
    location: str  # local directory, or Hub repo id
    family: str  # "sd" | "sdxl" | "sd3" | "flux" | "pixart"
    default_min_size: int
    default_resolution: int  # pixels: the model's native size
    denoiser: str = "unet"  # "unet" | "transformer": the pipeline attribute a search palettizes
    img2img: bool = False  # Apple's rule: "Img2Img" in the pipeline class name
    protocol_resolution: int = APPLE_RESOLUTION  # pixels under Apple's protocol
    default_steps: int = APPLE_STEPS
    default_guidance: float | None = None  # None: the pipeline's __call__ default
    version: str = ""  # model_version when not the name / repo id (single files: file, sha256, LoRAs)

    @property
    def tiny(self) -> bool:
        """A built-in tiny model: keeps its own small resolution under Apple's protocol (the
        built-in full-architecture models are measured like any real model)."""
        return self.source == "builtin" and self.default_min_size < REAL_MIN_SIZE


@dataclass(frozen=True)
class Candidate:
    name: str
    numel: int
    shape: tuple[int, ...]
    kind: str  # "linear" | "conv"


def read_json(path: Path | str | None) -> dict | None:
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError, TypeError):
        return None


def supported_line() -> str:
    names = sorted(set(PIPELINES))
    return "supported pipelines: " + ", ".join(names)


def describe(index: dict | None, denoiser_cfg: dict | None, vae_cfg: dict | None, name: str,
             hint: str = "", tiny_resolution: int = 0) -> dict:
    """The ModelSpec fields a pipeline's configs decide: family, denoiser, img2img, native and
    protocol resolution, default steps and guidance (``tiny_resolution``: a built-in tiny model's
    own size, which every protocol keeps). Unsupported pipelines raise one ModelError line."""
    cls = str((index or {}).get("_class_name", ""))
    if index is not None and cls not in PIPELINES:
        raise ModelError(f"model '{name}' is a {cls or 'pipeline without a class name'}, which cannot be "
                         f"searched; {supported_line()}")
    cfg = denoiser_cfg or {}
    family = PIPELINES.get(cls) or ("sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd")
    denoiser = "transformer" if family in TRANSFORMER_FAMILIES else "unet"
    if index is not None and denoiser not in index:
        raise ModelError(f"model '{name}' ({cls}) has no {denoiser}/ component; {supported_line()}")
    img2img = "Img2Img" in cls
    sample = cfg.get("sample_size")
    blocks = (vae_cfg or {}).get("block_out_channels")
    scale = 2 ** (len(blocks) - 1) if blocks else 8
    if isinstance(sample, int) and sample > 0:
        res = sample * scale
    elif family in ("sdxl", *TRANSFORMER_FAMILIES):
        res = 1024
    else:  # stable-diffusion-2(-1) without -base is a 768 px model
        res = 768 if re.search(r"2-[01]$", hint) is not None else 512
    res = tiny_resolution or res
    steps, guidance = _SAMPLING.get(hint, (None, None))
    if steps is None:
        steps = IMG2IMG_STEPS if img2img else NATIVE_STEPS.get(family, APPLE_STEPS)
    protocol_res = tiny_resolution or (res if denoiser == "transformer" else APPLE_RESOLUTION)
    return dict(family=family, default_resolution=res, denoiser=denoiser, img2img=img2img,
                protocol_resolution=protocol_res, default_steps=steps, default_guidance=guidance)
