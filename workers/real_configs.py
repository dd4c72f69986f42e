"""The denoisers of real checkpoints, from their published ``config.json`` values, counted on the
meta device (no download, no memory): candidates above Apple's 1e5 elements, parameters, and the
size of Apple's default analysis on them. Also the config the ``sd35m-arch`` built-in uses.

The values are the published ones of each repository's ``transformer/config.json`` or
``unet/config.json`` (only the keys that differ from diffusers' defaults are written).
"""
from __future__ import annotations

from dataclasses import dataclass

from workers.model_spec import REAL_MIN_SIZE

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm")
FLUX_SCHNELL = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56))
PIXART_SIGMA = dict(
    sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
    patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
    use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
    activation_fn="gelu-approximate", attention_bias=True)
SDXL_REFINER = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560, norm_num_groups=32)


@dataclass(frozen=True)
class RealDenoiser:
    repo: str
    cls: str  # the diffusers class of its denoiser
    config: dict
    steps: int  # denoiser steps per pipeline run under the default protocol
    resolution: int  # pixels under the default protocol


REAL_DENOISERS = {
    "sd3.5-medium": RealDenoiser("stabilityai/stable-diffusion-3.5-medium", "SD3Transformer2DModel", SD35_MEDIUM,
                                 28, 1024),
    "sd3.5-large": RealDenoiser("stabilityai/stable-diffusion-3.5-large", "SD3Transformer2DModel", SD35_LARGE,
                                28, 1024),
    "flux-schnell": RealDenoiser("black-forest-labs/FLUX.1-schnell", "FluxTransformer2DModel", FLUX_SCHNELL, 4, 1024),
    "pixart-sigma": RealDenoiser("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArtTransformer2DModel", PIXART_SIGMA,
                                 20, 1024),
    "sdxl-refiner-1.0": RealDenoiser("stabilityai/stable-diffusion-xl-refiner-1.0", "UNet2DConditionModel",
                                     SDXL_REFINER, 1, 768),  # 4 steps at strength 0.25: one denoising step
}


def meta_denoiser(name: str):
    """The real denoiser's modules on the meta device: structure and sizes, no memory."""
    import diffusers
    import torch

    real = REAL_DENOISERS[name]
    with torch.device("meta"):
        return getattr(diffusers, real.cls)(**real.config)


def analysis_size(name: str, nbits: int = 5) -> dict:
    """Candidates, parameters and Apple's default analysis (``nbits`` depths, isolated and
    cumulative: 2 x nbits x candidates pipeline runs) of a real denoiser."""
    from workers.denoiser import candidate_layers

    module = meta_denoiser(name)
    candidates = candidate_layers(module, REAL_MIN_SIZE)
    real = REAL_DENOISERS[name]
    runs = 2 * nbits * len(candidates)
    return {"model": name, "repo": real.repo, "candidates": len(candidates),
            "candidate_params": sum(c.numel for c in candidates),
            "params": sum(p.numel() for p in module.parameters()), "pipeline_runs": runs,
            "steps_per_run": real.steps, "denoiser_calls": runs * real.steps, "resolution": real.resolution}
