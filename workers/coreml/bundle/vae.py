"""The VAE's decoder and encoder as Apple's Swift pipeline reads them (``Decoder.swift``, ``Encoder.swift``).

What is inside the model and what Swift does around it:
- ``VAEDecoder``: ``z`` [1, C, H, W] -> ``image`` [1, 3, 8H, 8W] in [-1, 1]: ``post_quant_conv`` (when the
  VAE has one) and the decoder. Swift divides the latents by the scaling factor and adds the shift
  factor itself, then turns [-1, 1] into pixels; H, W are the denoiser's latent size.
- ``VAEEncoder``: ``x`` [1, 3, 8H, 8W] (an image in [-1, 1]) -> ``latent`` [1, 2C, H, W]: the encoder and
  ``quant_conv``, i.e. the Gaussian's moments. Swift takes channels 0..<4 as the mean and 4..<8 as the
  log-variance (clipped to [-30, 20]), samples, and multiplies by the scaling factor. That is only
  right for 4 latent channels and no shift factor, so a VAE without those (SD3's: 16 channels, shift
  0.0609) gets no VAEEncoder: it is optional in every Swift pipeline (image-to-image needs it).

Precision follows Apple's converter: SDXL's VAE (base and refiner) overflows in float16, so Apple
converts it in float32 with float32 inputs; every other VAE is float16 with a float16 input (SD3's
decoder: DiffusionKit's float16, which Apple's converter calls). Outputs are float32.
"""
from __future__ import annotations

import os

import torch

from workers.coreml.bundle.contract import SWIFT_FAMILIES
from workers.coreml.bundle.packaging import Converted, TensorSpec, convert_module, float32_cpu
from workers.coreml.common import CoreMLError

FLOAT32_FAMILIES = ("sdxl", "sdxl-refiner")  # Apple: `if args.custom_vae_version is None and args.xl_version`
SWIFT_LATENT_CHANNELS = 4  # Encoder.swift slices output[0][0..<4] and [4..<8]


def vae_precision(family: str) -> str:
    _check_family(family)
    return "float32" if family in FLOAT32_FAMILIES else "float16"


def image_scale(vae) -> int:
    """Pixels per latent (8 for every Stable Diffusion VAE: one halving per down block but the last)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def swift_can_encode(vae) -> bool:
    """Whether Swift's ``Encoder`` turns this VAE's moments into the right latents (see the module doc)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.config.latent_channels == SWIFT_LATENT_CHANNELS and shift == 0.0


def _part(vae, name: str) -> torch.nn.Module:
    """One part of the VAE in float32 on the CPU (copied only if it is not): a missing 1x1 conv is the identity."""
    part = getattr(vae, name, None)
    return torch.nn.Identity() if part is None else float32_cpu(part)


class SwiftVAEDecoder(torch.nn.Module):
    """Scaled-back latents -> image in [-1, 1]: what diffusers' ``vae.decode(z).sample`` computes."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = _part(vae, "post_quant_conv")
        self.decoder = _part(vae, "decoder")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class SwiftVAEEncoder(torch.nn.Module):
    """Image in [-1, 1] -> the latent Gaussian's moments (mean, then log-variance, along channels)."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = _part(vae, "encoder")
        self.quant_conv = _part(vae, "quant_conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))


def convert_vae_decoder(vae, family: str, latent_hw: tuple[int, int], path: str | os.PathLike,
                        nbits: int | None = None) -> Converted:
    """Convert the decoder for latents of ``latent_hw`` (the denoiser's) to ``path``."""
    h, w = _check(vae, family, latent_hw)
    precision = vae_precision(family)
    module = SwiftVAEDecoder(vae).eval()
    descriptions = {"z": "The denoised latents, divided by the scaling factor (plus the shift factor)",
                    "image": "Generated image normalized to range [-1, 1]"}
    try:
        return convert_module(module, "VAEDecoder", (TensorSpec("z", (1, vae.config.latent_channels, h, w), precision),),
                              ("image",), precision, path, nbits, descriptions)
    finally:
        del module


def convert_vae_encoder(vae, family: str, latent_hw: tuple[int, int], path: str | os.PathLike,
                        nbits: int | None = None) -> Converted:
    """Convert the encoder for images of ``latent_hw`` times the VAE's scale to ``path``; a VAE Swift's
    Encoder cannot use (``swift_can_encode``) is a CoreMLError: leave VAEEncoder out instead."""
    h, w = _check(vae, family, latent_hw)
    if not swift_can_encode(vae):
        raise CoreMLError(f"Swift's VAEEncoder handles {SWIFT_LATENT_CHANNELS} latent channels and no shift factor; "
                          f"this VAE has {vae.config.latent_channels} channels, shift factor "
                          f"{getattr(vae.config, 'shift_factor', None)}: leave VAEEncoder out (image-to-image only)")
    precision = vae_precision(family)
    scale = image_scale(vae)
    module = SwiftVAEEncoder(vae).eval()
    descriptions = {"x": "The input image normalized to range [-1, 1]",
                    "latent": "The latent distribution's mean and log-variance, concatenated along channels"}
    try:
        return convert_module(module, "VAEEncoder", (TensorSpec("x", (1, 3, h * scale, w * scale), precision),),
                              ("latent",), precision, path, nbits, descriptions)
    finally:
        del module


def _check_family(family: str) -> None:
    if family not in SWIFT_FAMILIES:
        raise CoreMLError(f"no Swift pipeline for family {family!r}; Swift families: {', '.join(SWIFT_FAMILIES)}")


def _check(vae, family: str, latent_hw) -> tuple[int, int]:
    _check_family(family)
    if not (hasattr(vae, "decoder") and hasattr(vae, "encoder") and hasattr(vae.config, "latent_channels")):
        raise CoreMLError(f"expected a diffusers AutoencoderKL, got {type(vae).__name__}")
    try:
        h, w = latent_hw
    except (TypeError, ValueError):
        raise CoreMLError(f"latent size must be (H, W), got {latent_hw!r}") from None
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise CoreMLError(f"latent size must be positive integers (H, W), got {latent_hw!r}")
    return h, w
