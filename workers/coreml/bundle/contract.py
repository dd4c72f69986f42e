"""What Apple's Swift pipeline loads, per family: the file names a Resources folder must hold,
and the options a bundle is built with.

Read from apple/ml-stable-diffusion (``swift/StableDiffusion/pipeline/*+Resources.swift``,
``torch2coreml.py``); ``docs/bundles.md`` quotes the facts. A pipeline is created with
``resourcesAt: URL`` and finds each model by its base name in that one folder, compiled
(``.mlmodelc``); off macOS a bundle holds ``.mlpackage``s with the same base names.
"""
from __future__ import annotations

from dataclasses import dataclass

ATTENTIONS = ("split-einsum", "split-einsum-v2", "original")  # Apple's SPLIT_EINSUM (default), _V2, ORIGINAL
ENCODER_NBITS = (8, 6, 4)  # --encoders-nbits: uniform k-means palettization of text encoders and VAE
TOKEN_LENGTH = 77  # CLIP's context: every text input and the denoiser's token axis
SWIFT_FAMILIES = ("sd", "sdxl", "sdxl-refiner", "sd3")  # families with a Swift pipeline
NO_SWIFT_PIPELINE = {"flux", "pixart"}


@dataclass(frozen=True)
class BundleOptions:
    """How a Resources folder is built (validated at construction; frozen: hashable, stored as is)."""

    attention: str = "split-einsum"
    chunk: bool = False  # the denoiser in two chunks (Chunk1 / Chunk2), needed on iOS
    batch_one: bool = False  # batch 1: guidance-free few-step models (Apple's --unet-batch-one)
    latent_size: tuple[int, int] | None = None  # (H, W) of the latents; None: the denoiser's sample_size
    encoders_nbits: int | None = None  # None: text encoders and VAE stay float16
    compile: bool = False  # compile every package to .mlmodelc (macOS only)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.encoders_nbits is not None and self.encoders_nbits not in ENCODER_NBITS:
            raise ValueError(f"--encoders-nbits must be one of {', '.join(map(str, ENCODER_NBITS))}, "
                             f"got {self.encoders_nbits!r}")
        if self.latent_size is not None:
            h, w = self.latent_size
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 and h % 2 == 0 and w % 2 == 0):
                raise ValueError(f"--latent-size must be even positive H[xW], got {h}x{w}")

    @property
    def batch(self) -> int:
        return 1 if self.batch_one else 2


def denoiser_name(family: str) -> str:
    """The denoiser's base name in the folder (its chunks add ``Chunk1`` / ``Chunk2``)."""
    return {"sd": "Unet", "sdxl": "Unet", "sdxl-refiner": "UnetRefiner",
            "sd3": "MultiModalDiffusionTransformer"}[family]


def text_encoder_names(family: str) -> tuple[str, ...]:
    """Text encoders in the folder: SD one, SDXL base two, the refiner only the second, SD3 the two CLIPs
    (T5 is optional in Swift's SD3 pipeline, which feeds zeros without it)."""
    return {"sd": ("TextEncoder",), "sdxl": ("TextEncoder", "TextEncoder2"), "sdxl-refiner": ("TextEncoder2",),
            "sd3": ("TextEncoder", "TextEncoder2")}[family]


def bundle_family(spec_family: str, img2img: bool) -> str:
    """Swift's family of a search's model (ModelSpec.family; the refiner is SDXL's image-to-image one)."""
    if spec_family == "sdxl" and img2img:
        return "sdxl-refiner"
    return spec_family
