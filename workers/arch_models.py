"""Built-in full-architecture pipelines for benchmarking without a download: ``sdxl-arch``,
``sd15-arch`` and ``sd35m-arch`` (SD3.5-medium: the real MMDiT-X transformer of
`workers.real_configs`, 391 candidates, 2,243 M parameters; its T5 encoder has the real width
4096 and two layers).

The UNet and VAE have the real configs of SDXL base 1.0 and Stable Diffusion 1.5 (an SDXL UNet
has 2,567.5 M parameters and 792 candidates above 1e5 elements, as the real one), with
deterministic random weights (torch's default initialisation under fixed seeds, rounded to
fp16). The text encoders have the real widths (768, and 1280 for SDXL's second) but two layers
and the tiny models' vocabulary: they run once per evaluator, so their depth does not change
what a search costs. Measurements on them mean nothing; timings mean what they would on the
real model. Built once into ``<cache>/builtin/<name>`` (fp16 only: ~5.2 GB for sdxl-arch,
~1.9 GB for sd15-arch; building takes a few minutes on a CPU) and then loaded like any local
pipeline directory.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from common.files import publish_dir

ARCH_MODELS = ("sdxl-arch", "sd15-arch", "sd35m-arch")
ARCH_FORMAT = "1"
ARCH_MARKER = ".mbp-arch-model"

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", upcast_attention=False,
)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
    freq_shift=0, act_fn="silu",
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu",
)
VAE_EXTRA = {"sdxl-arch": dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
             "sd15-arch": dict(sample_size=512, scaling_factor=0.18215)}
# (hidden, intermediate, heads, projection) of the text encoders: the real widths, two layers.
ENCODERS = {"sdxl-arch": ((768, 3072, 12, None), (1280, 5120, 20, 1280)), "sd15-arch": ((768, 3072, 12, None),),
            "sd35m-arch": ((768, 3072, 12, 768), (1280, 5120, 20, 1280))}
SD3_VAE = dict(VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
_SEEDS = {"text_encoder": 21, "text_encoder_2": 22, "unet": 23, "vae": 24, "text_encoder_3": 25}


def unet_config(name: str) -> dict:
    return dict(SDXL_UNET if name == "sdxl-arch" else SD15_UNET)


def meta_unet(name: str):
    """The denoiser on the meta device: its structure and sizes without memory or time."""
    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from workers.real_configs import SD35_MEDIUM

    with torch.device("meta"):
        if name == "sd35m-arch":
            return SD3Transformer2DModel(**SD35_MEDIUM)
        return UNet2DConditionModel(**unet_config(name))


def _sd35m(vae, tok, encoders):
    """SD3.5-medium: the real transformer, the SD3 VAE (16 latent channels), CLIP-L/G and a T5
    of the real width with two layers."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from workers.real_configs import SD35_MEDIUM
    from workers.tiny_models import _tokenizer
    from workers.tiny_parts import t5_tokenizer

    t5_tok = t5_tokenizer()
    cfg = T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with _seeded("text_encoder_3"):
        t5 = T5EncoderModel(cfg).eval().half()
    with _seeded("unet"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM).eval().to(torch.float16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1], tokenizer_2=_tokenizer("!"),
        text_encoder_3=t5, tokenizer_3=t5_tok)


def _seeded(component: str):
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(_SEEDS[component])
    return stack


def build_arch_pipeline(name: str):
    """The pipeline in memory, fp16 (weights from torch's default init under fixed seeds)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from workers.tiny_models import _tokenizer

    if name not in ARCH_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {ARCH_MODELS}")
    tok = _tokenizer("<|endoftext|>")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    encoders = []
    for i, (hidden, inter, heads, proj) in enumerate(ENCODERS[name]):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                             num_attention_heads=heads, max_position_embeddings=77, projection_dim=proj or hidden,
                             hidden_act="gelu", bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
        with _seeded("text_encoder_2" if i else "text_encoder"):
            encoders.append((CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval().half())
    if name == "sd35m-arch":
        with _seeded("vae"):
            vae = AutoencoderKL(**SD3_VAE).eval().half()
        return _sd35m(vae, tok, encoders)
    with _seeded("unet"):
        unet = UNet2DConditionModel(**unet_config(name)).eval().half()
    with _seeded("vae"):
        vae = AutoencoderKL(**VAE, **VAE_EXTRA[name]).eval().half()
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)
    if name == "sdxl-arch":
        return StableDiffusionXLPipeline(
            vae=vae, unet=unet, tokenizer=tok, tokenizer_2=_tokenizer("!"), text_encoder=encoders[0],
            text_encoder_2=encoders[1], scheduler=EulerDiscreteScheduler(
                **sched, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear"))
    return StableDiffusionPipeline(
        vae=vae, unet=unet, tokenizer=tok, text_encoder=encoders[0],
        scheduler=PNDMScheduler(**sched, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def ensure_arch_model(name: str, root: Path) -> Path:
    """Build ``name`` into ``root/name`` once (atomically, under a lock) and return the folder."""
    from workers.tiny_models import _build_lock, _write_vocab_files, quiet_hf

    marker = json.dumps({"name": name, "format": ARCH_FORMAT})
    final = root / name

    def current() -> bool:
        try:
            return (final / ARCH_MARKER).read_text() == marker
        except OSError:
            return False

    if current():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{name}.lock"):
        if current():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            with quiet_hf():
                build_arch_pipeline(name).save_pretrained(tmp, safe_serialization=True, variant="fp16")
            for sub in ("tokenizer", "tokenizer_2"):  # the CLIP ones
                if (tmp / sub).is_dir():
                    _write_vocab_files(tmp / sub)
            (tmp / ARCH_MARKER).write_text(marker)
            publish_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
