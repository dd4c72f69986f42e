"""Built-in tiny transformer-denoiser pipelines: ``tiny-sd3`` (SD3/SD3.5 MMDiT: CLIP ×2 + T5),
``tiny-flux`` (Flux.1 schnell-like: CLIP + T5, no guidance embedding, packed latents) and
``tiny-pixart`` (PixArt-Σ: T5 only, ada-norm-single DiT).

Random deterministic weights (fp16-representable), tokenizers and text encoders built locally,
written with ``save_pretrained`` by `workers.tiny_models.ensure_tiny_model` and loaded through
plain ``from_pretrained`` like any pipeline directory. Widths (128 inside the transformer) are
chosen so that the attention and feed-forward weights are candidates (> 10,000 elements).
"""
from __future__ import annotations

from workers.tiny_parts import (TINY_RESOLUTION, _round_to_fp16, _seeded, _text_encoder, _tokenizer, _vae,
                                t5_encoder, t5_tokenizer)

_LATENT = TINY_RESOLUTION // 8  # 8x8 latents
_T5_WIDTH = 64


def _clip_pair():
    tok = _tokenizer("<|endoftext|>")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    return tok, eos


def _flow_scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kw)


def build_sd3():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, eos = _clip_pair()
    t5 = t5_tokenizer()
    with _seeded("transformer"):
        transformer = SD3Transformer2DModel(
            sample_size=_LATENT, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=_T5_WIDTH, caption_projection_dim=128,
            pooled_projection_dim=64, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=_round_to_fp16(transformer.eval()), scheduler=_flow_scheduler(shift=3.0), vae=_vae(),
        text_encoder=_text_encoder("text_encoder", len(tok), eos, projection=True), tokenizer=tok,
        text_encoder_2=_text_encoder("text_encoder_2", len(tok), eos, projection=True), tokenizer_2=_tokenizer("!"),
        text_encoder_3=t5_encoder(_T5_WIDTH, len(t5)), tokenizer_3=t5)


def build_flux():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tok, eos = _clip_pair()
    t5 = t5_tokenizer()
    with _seeded("transformer"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=_T5_WIDTH, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(8, 12, 12))
    return FluxPipeline(
        transformer=_round_to_fp16(transformer.eval()), scheduler=_flow_scheduler(shift=1.0), vae=_vae(),
        text_encoder=_text_encoder("text_encoder", len(tok), eos, projection=False), tokenizer=tok,
        text_encoder_2=t5_encoder(_T5_WIDTH, len(t5)), tokenizer_2=t5)


def build_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    t5 = t5_tokenizer()
    with _seeded("transformer"):
        transformer = PixArtTransformer2DModel(
            sample_size=_LATENT, num_layers=2, patch_size=2, attention_head_dim=32, num_attention_heads=4,
            in_channels=4, out_channels=8, cross_attention_dim=128, caption_channels=_T5_WIDTH,
            norm_type="ada_norm_single", use_additional_conditions=False, norm_elementwise_affine=False,
            norm_eps=1e-6)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            num_train_timesteps=1000, prediction_type="epsilon")
    return PixArtSigmaPipeline(transformer=_round_to_fp16(transformer.eval()), scheduler=scheduler, vae=_vae(),
                               text_encoder=t5_encoder(_T5_WIDTH, len(t5)), tokenizer=t5)


TRANSFORMER_BUILDERS = {"tiny-sd3": build_sd3, "tiny-flux": build_flux, "tiny-pixart": build_pixart}
