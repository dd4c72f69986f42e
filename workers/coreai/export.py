"""Export one diffusers component to a Core AI ``.aimodel`` the way Apple's exporter does.

Apple's path (``coreai_models.diffusion.gpu.export_stateless``): a thin wrapper module whose
forward returns the tensors Swift reads, ``torch.export`` with fixed dummy inputs, Core AI's
decompositions, ``TorchConverter`` in RELEASE mode with named inputs and outputs, then
``save_asset``. The denoiser's dummy batch is 2, the text encoders take ``input_ids (1, 77)``,
the VAE works at the denoiser's sample size, and nearest-neighbour 2x upsampling is written as
``repeat_interleave`` (Apple's patch, kept for GPU residency). The ``4bit`` preset is Apple's
post-conversion INT4 per-block-32 symmetric quantization of weights of at least 32,768
elements (``coreai_opt.coreai_utils.quantize_weights``).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from workers.coreai.layout import EXPORT_BATCH, PRESET_4BIT_THRESHOLD, SD3_TOKENS, TOKENS, Component


class TextEncoder(torch.nn.Module):
    def __init__(self, encoder, pooled: bool):
        super().__init__()
        self.model, self.pooled = encoder, pooled
        self.projected = "WithProjection" in type(encoder).__name__

    def forward(self, input_ids):
        out = self.model(input_ids)
        if not self.pooled:
            return out.last_hidden_state
        return out.last_hidden_state, (out.text_embeds if self.projected else out.pooler_output)


class Denoiser(torch.nn.Module):
    """UNet (sample, timestep, encoder_hidden_states) or SD3 transformer (+ pooled_projections)."""

    def __init__(self, denoiser, sd3: bool):
        super().__init__()
        self.model, self.sd3 = denoiser, sd3
        _nearest_as_repeat(denoiser)

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections=None):
        if self.sd3:
            return self.model(hidden_states=sample.contiguous(), encoder_hidden_states=encoder_hidden_states.contiguous(),
                              pooled_projections=pooled_projections.contiguous(), timestep=timestep).sample
        return self.model(sample, timestep, encoder_hidden_states).sample


class VAEDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        _nearest_as_repeat(vae.decoder)

    def forward(self, z):
        return self.vae.decode(z).sample


class VAEEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.parameters


def _nearest_as_repeat(module: torch.nn.Module) -> None:
    """Every 2x nearest ``Upsample2D`` as repeat_interleave (same values; what Apple exports)."""
    from diffusers.models.upsampling import Upsample2D

    for mod in module.modules():
        if not isinstance(mod, Upsample2D) or mod.use_conv_transpose:
            continue

        def forward(hidden_states, output_size=None, *args, _mod=mod, **kwargs):
            if getattr(_mod, "interpolate", True):
                hidden_states = hidden_states.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
            if _mod.use_conv:
                conv = _mod.conv if getattr(_mod, "name", "conv") == "conv" else _mod.Conv2d_0
                hidden_states = conv(hidden_states)
            return hidden_states

        mod.forward = forward


def wrapper_and_inputs(component: Component, pipe, denoiser, latent_hw: tuple[int, int], dtype: torch.dtype,
                       tokens: int | None = None):
    """(wrapper module, dummy inputs) for one component, as Apple's registry builds them (``tokens``:
    another denoiser text length, for a validation copy fed the search's own SD3 calls)."""
    h, w = latent_hw
    g = torch.Generator().manual_seed(0)
    if component.key.startswith("text_encoder"):
        encoder = pipe.text_encoder if component.key == "text_encoder" else pipe.text_encoder_2
        return TextEncoder(encoder, len(component.outputs) == 2), (torch.zeros(1, TOKENS, dtype=torch.long),)
    if component.key in ("unet", "transformer"):
        cfg, b = denoiser.config, EXPORT_BATCH
        sample = torch.randn(b, cfg.in_channels, h, w, generator=g).to(dtype)
        t = torch.full((b,), 999.0, dtype=dtype)
        if component.key == "unet":
            ctx = torch.randn(b, tokens or TOKENS, cfg.cross_attention_dim, generator=g).to(dtype)
            return Denoiser(denoiser, sd3=False), (sample, t, ctx)
        ctx = torch.randn(b, tokens or SD3_TOKENS, cfg.joint_attention_dim, generator=g).to(dtype)
        pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g).to(dtype)
        return Denoiser(denoiser, sd3=True), (sample, t, ctx, pooled)
    vae = pipe.vae
    vdtype = next(vae.parameters()).dtype
    if component.key == "vae_decoder":
        return VAEDecoder(vae), (torch.randn(1, vae.config.latent_channels, h, w, generator=g).to(vdtype),)
    return VAEEncoder(vae), (torch.randn(1, 3, h * 8, w * 8, generator=g).to(vdtype),)


def to_program(wrapper: torch.nn.Module, inputs: tuple, component: Component):
    """torch module -> Core AI AIProgram (Apple's export_stateless, RELEASE mode)."""
    import coreai_torch

    wrapper.eval()

    def export_fn(module):
        with torch.no_grad():
            exported = torch.export.export(module, args=inputs)
        return exported.run_decompositions(coreai_torch.get_decomp_table())

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    converter.add_pytorch_module(wrapper, export_fn=export_fn, input_names=component.inputs,
                                 output_names=component.outputs)
    program = converter.to_coreai()
    if hasattr(program, "optimize"):  # newer coreai-core; 0.4.x optimizes while building
        program.optimize()
    return program


def quantize_4bit(program):
    """Apple's ``4bit`` preset on a converted program (in place)."""
    from coreai_opt.coreai_utils import CompressionGranularity, DType, quantize_weights
    from coreai_opt.coreai_utils.common import QScheme

    return quantize_weights(program, dtype=DType.INT4, qscheme=QScheme.SYMMETRIC,
                            granularity=CompressionGranularity.PER_BLOCK, block_size=32,
                            weight_num_threshold=PRESET_4BIT_THRESHOLD, in_place=True)


def save(program, path: Path, description: str, custom: dict | None = None) -> None:
    """``save_asset`` with the asset metadata Apple's exporter stamps (description, creation date)."""
    from coreai.runtime import AIModelAssetMetadata

    meta = AIModelAssetMetadata()
    meta.model_description = description
    meta.creation_date = int(time.time())
    for k, v in (custom or {}).items():
        meta.set_custom(k, v)
    if path.exists():
        shutil.rmtree(path)
    program.save_asset(path, meta)
