"""What a single-file checkpoint is (its family, read from its keys and shapes) and the diffusers
configs it is loaded with, which ship with the project so that no load asks the Hub.

A file in the original Stable Diffusion layout holds weights only. Diffusers' single-file loader
otherwise downloads the base model's configs; here they are written from the published values
(`workers.arch_models` / `workers.real_configs` hold the UNet and VAE configs of SD 1.5, SDXL base
and the SDXL refiner; the CLIP text encoders' values are those of openai/clip-vit-large-patch14,
OpenCLIP ViT-H (SD 2.x, 23 of its 24 layers, as diffusers' SD 2 text_encoder) and ViT-bigG).
The tokenizers are CLIP's real byte-pair vocabulary, built from OpenAI's merges file
(``data/clip_bpe_simple_vocab_16e6.txt.gz``, as shipped by open_clip, MIT licence) exactly as
transformers' CLIPTokenizer vocabulary was (49,408 tokens). A checkpoint of another shape needs
``--config DIR`` (a diffusers pipeline directory of that shape).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from workers.model_spec import ModelError

BPE_FILE = Path(__file__).with_name("data") / "clip_bpe_simple_vocab_16e6.txt.gz"
UNET = "model.diffusion_model."
# family -> (pipeline class, what the user is told)
FAMILIES = {"sd1": ("StableDiffusionPipeline", "SD 1.x"), "sd2": ("StableDiffusionPipeline", "SD 2.x (768 px, v)"),
            "sdxl": ("StableDiffusionXLPipeline", "SDXL base"),
            "sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline", "SDXL refiner")}
_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              steps_offset=1)


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _found(keys) -> str:
    """The top-level prefixes of a file's keys, with counts: what the refusal names."""
    counts: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2]) if k.startswith(("model.", "conditioner.", "cond_stage_model.")) \
            else k.split(".")[0][:40]
        counts[head] = counts.get(head, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{n} {h}.*" for h, n in top) or "no tensors"


def detect_family(shapes: dict[str, tuple[int, ...]], name: str) -> str:
    """sd1 | sd2 | sdxl | sdxl-refiner (or sd3, which the caller refuses) from keys and shapes;
    anything else is one ModelError line naming what was found."""
    keys = list(shapes)
    if not _has(keys, UNET):
        if any("lora_" in k or ".lora." in k or "lora_A" in k for k in keys):
            raise ModelError(f"'{name}' is a LoRA, not a checkpoint: pass it with --lora and give the base model "
                             "with --model")
        raise ModelError(f"'{name}' has no UNet (no model.diffusion_model.* weights); found: {_found(keys)}")
    if _has(keys, UNET + "joint_blocks."):
        return "sd3"
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight", ())
    if len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelError(f"'{name}' is a UNet with {conv_in[1]} input channels (inpainting or another "
                         "conditioning), which a text-to-image search cannot run")
    if _has(keys, "conditioner.embedders.1.model.") and _has(keys, "conditioner.embedders.0.transformer."):
        return "sdxl"
    if _has(keys, "conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if _has(keys, "cond_stage_model.model."):
        return "sd2"
    if _has(keys, "cond_stage_model.transformer."):
        return "sd1"
    raise ModelError(f"'{name}' has a UNet but no text encoder of SD 1.x, SD 2.x or SDXL; found: {_found(keys)}")


def _clip(hidden: int, inter: int, heads: int, layers: int, proj: int, act: str, cls: str) -> dict:
    return {"architectures": [cls], "model_type": "clip_text_model", "hidden_size": hidden,
            "intermediate_size": inter, "num_attention_heads": heads, "num_hidden_layers": layers,
            "projection_dim": proj, "hidden_act": act, "max_position_embeddings": 77, "vocab_size": 49408,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-5}


def family_configs(family: str) -> dict[str, dict]:
    """``{relative path: json}`` of the pipeline directory a ``family`` checkpoint loads into
    (tokenizers apart: `write_family_config`)."""
    from workers.arch_models import SD15_UNET, SDXL_UNET, VAE, VAE_EXTRA
    from workers.real_configs import SDXL_REFINER

    clip_l = _clip(768, 3072, 12, 12, 768, "quick_gelu", "CLIPTextModel")
    vae = dict(VAE, **VAE_EXTRA["sd15-arch"], _class_name="AutoencoderKL")
    euler = dict(_SCHED, _class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                 prediction_type="epsilon", interpolation_type="linear")
    index = {"_class_name": FAMILIES[family][0]}
    if family == "sd1":
        unet, encoders = dict(SD15_UNET), {"text_encoder": clip_l}
        sched = dict(_SCHED, _class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False)
    elif family == "sd2":
        unet = dict(SD15_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                    use_linear_projection=True)
        encoders = {"text_encoder": _clip(1024, 4096, 16, 23, 512, "gelu", "CLIPTextModel")}
        sched = dict(_SCHED, _class_name="DDIMScheduler", prediction_type="v_prediction", clip_sample=False,
                     set_alpha_to_one=False)
        vae = dict(vae, sample_size=768)
    elif family == "sdxl":
        unet, sched = dict(SDXL_UNET), euler
        encoders = {"text_encoder": clip_l,
                    "text_encoder_2": _clip(1280, 5120, 20, 32, 1280, "gelu", "CLIPTextModelWithProjection")}
        vae = dict(VAE, **VAE_EXTRA["sdxl-arch"], _class_name="AutoencoderKL")
        index["force_zeros_for_empty_prompt"] = True
    else:  # sdxl-refiner
        unet, sched = dict(SDXL_REFINER), euler
        encoders = {"text_encoder_2": _clip(1280, 5120, 20, 32, 1280, "gelu", "CLIPTextModelWithProjection")}
        vae = dict(VAE, **VAE_EXTRA["sdxl-arch"], _class_name="AutoencoderKL")
        index.update(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                     text_encoder=[None, None], tokenizer=[None, None])
    index.update(unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
                 scheduler=["diffusers", sched["_class_name"]])
    if family in ("sd1", "sd2"):
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    out = {"model_index.json": index, "unet/config.json": dict(unet, _class_name="UNet2DConditionModel"),
           "vae/config.json": vae, "scheduler/scheduler_config.json": sched}
    for folder, cfg in encoders.items():
        index[folder] = ["transformers", cfg["architectures"][0]]
        index[folder.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        out[f"{folder}/config.json"] = cfg
    return out


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges from OpenAI's BPE file, as transformers' CLIPTokenizer builds them."""
    from workers.tiny_parts import _bytes_to_unicode

    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """CLIP's real tokenizer (``pad_token``: <|endoftext|> for CLIP-L, ! for the OpenCLIP ones)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_family_config(family: str, dest: Path) -> None:
    """The configs and tokenizers of a ``family`` pipeline directory, written under ``dest``."""
    for rel, cfg in family_configs(family).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(json.dumps(cfg, indent=1))
    index = family_configs(family)["model_index.json"]
    for folder in ("tokenizer", "tokenizer_2"):
        if (index.get(folder) or [None])[0]:
            write_tokenizer(dest / folder, "<|endoftext|>" if family in ("sd1", "sdxl") and folder == "tokenizer"
                            else "!")


__all__ = ["FAMILIES", "clip_vocab", "detect_family", "family_configs", "write_family_config", "write_tokenizer"]
