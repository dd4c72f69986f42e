"""The denoiser as Apple's Swift pipeline loads it: Apple's input names, shapes and order, float16
inputs, a float32 prediction, the Neural-Engine layout (``neural_engine``) with diffusers' weights.

Facts from apple/ml-stable-diffusion: ``torch2coreml.py`` ``convert_unet`` (inputs ``sample``,
``timestep``, ``encoder_hidden_states`` [B, cross_attention_dim, 1, 77], SDXL's ``time_ids`` and
``text_embeds``; output ``noise_pred``; float16 inputs; ``convert_to="mlprogram"``; macOS 13 by
default) and, for SD3, ``convert_mmdit`` plus ``MultiModalDiffusionTransformer.swift`` /
``StableDiffusion3Pipeline.swift`` (``latent_image_embeddings``, ``timestep``,
``token_level_text_embeddings`` [B, joint_attention_dim, 1, 154] (CLIP's 77 then T5's 77),
``pooled_text_embeddings`` [B, pooled_dim, 1, 1]; output ``denoiser_output``).

Unlike Apple (SD3 in float32), every family is converted with float16 compute precision: the
project palettizes the package by finding each diffusers weight as one float16 const.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from common.errors import first_line
from workers.coreml.bundle.contract import NO_SWIFT_PIPELINE, SWIFT_FAMILIES, TOKEN_LENGTH, BundleOptions
from workers.coreml.common import ERROR_CHARS, CoreMLError, quiet_coremltools

OUTPUT_NAMES = {"sd": "noise_pred", "sdxl": "noise_pred", "sdxl-refiner": "noise_pred", "sd3": "denoiser_output"}
TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}  # original size, crop, target size | aesthetic score
SD3_TOKENS = 2 * TOKEN_LENGTH  # Swift concatenates CLIP's and T5's 77 tokens
TARGETS = {False: "macOS13", True: "macOS15"}  # Apple's default --min-deployment-target; iOS 18 formats


def _check_family(denoiser: nn.Module, family: str) -> None:
    if family in NO_SWIFT_PIPELINE:
        raise CoreMLError(f"{family} has no pipeline in Apple's Swift package, so it has no Core ML bundle")
    if family not in SWIFT_FAMILIES:
        raise CoreMLError(f"unknown family {family!r}; expected one of {', '.join(SWIFT_FAMILIES)}")
    kind = type(denoiser).__name__
    expected = "SD3Transformer2DModel" if family == "sd3" else "UNet2DConditionModel"
    if kind != expected:
        raise CoreMLError(f"family {family} needs a {expected}, got a {kind}")
    if family != "sd3":
        text_time = denoiser.config.addition_embed_type == "text_time"
        if text_time != (family in TIME_IDS):
            raise CoreMLError(f"this UNet ({'with' if text_time else 'without'} SDXL's text_time conditioning) "
                              f"is not a {family} UNet")
        if not isinstance(denoiser.config.cross_attention_dim, int):
            raise CoreMLError("UNets with a cross_attention_dim per block have no Core ML layout in Apple's pipeline")


def _latent_size(denoiser: nn.Module, options: BundleOptions) -> tuple[int, int]:
    if options.latent_size is not None:
        return options.latent_size
    size = denoiser.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def apple_denoiser_inputs(denoiser: nn.Module, family: str,
                          options: BundleOptions) -> list[tuple[str, tuple[int, ...]]]:
    """Apple's input names and shapes, in Apple's order (the traced module's positional order)."""
    _check_family(denoiser, family)
    cfg, b = denoiser.config, options.batch
    h, w = _latent_size(denoiser, options)
    if family == "sd3":
        return [("latent_image_embeddings", (b, cfg.in_channels, h, w)), ("timestep", (b,)),
                ("token_level_text_embeddings", (b, cfg.joint_attention_dim, 1, SD3_TOKENS)),
                ("pooled_text_embeddings", (b, cfg.pooled_projection_dim, 1, 1))]
    inputs = [("sample", (b, cfg.in_channels, h, w)), ("timestep", (b,)),
              ("encoder_hidden_states", (b, cfg.cross_attention_dim, 1, TOKEN_LENGTH))]
    if family in TIME_IDS:
        n = TIME_IDS[family]
        pooled = cfg.projection_class_embeddings_input_dim - n * cfg.addition_time_embed_dim
        if pooled <= 0:
            raise CoreMLError(f"this UNet's add embedding does not take {n} time ids; is it a {family} UNet?")
        inputs += [("time_ids", (b, n)), ("text_embeds", (b, pooled))]
    return inputs


def example_inputs(denoiser: nn.Module, family: str, options: BundleOptions, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Plausible float32 values for Apple's inputs (tracing and tests): Gaussian latents and
    embeddings, a mid-schedule timestep, SDXL's time ids for the latent size."""
    g = torch.Generator().manual_seed(seed)
    h, w = _latent_size(denoiser, options)
    values = []
    for name, shape in apple_denoiser_inputs(denoiser, family, options):
        if name == "timestep":
            values.append(torch.full(shape, 500.0))
        elif name == "time_ids":
            ids = [8 * h, 8 * w, 0, 0] + ([6.0] if shape[1] == 5 else [8 * h, 8 * w])
            values.append(torch.tensor([ids] * shape[0], dtype=torch.float32))
        else:
            values.append(torch.randn(shape, generator=g))
    return tuple(values)


class AppleDenoiser(nn.Module):
    """Apple's positional inputs -> the prediction, computing diffusers' function with the
    denoiser's own weights in the Neural-Engine layout (a deep copy: the caller's model is
    never modified)."""

    def __init__(self, denoiser: nn.Module, family: str, attention: str = "split-einsum"):
        super().__init__()
        from workers.coreml.bundle.contract import ATTENTIONS

        _check_family(denoiser, family)
        if attention not in ATTENTIONS:
            raise CoreMLError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.family = family
        if family == "sd3":
            from workers.coreml.bundle.neural_engine_sd3 import ANESD3Transformer

            self.net = ANESD3Transformer(denoiser, attention)
        else:
            from workers.coreml.bundle.neural_engine import neural_engine_unet

            self.net = neural_engine_unet(denoiser, attention)
        self.eval()

    def forward(self, *inputs):
        if self.family == "sd3":
            return self.net(*inputs)
        sample, timestep, encoder_hidden_states = inputs[:3]
        added = {"time_ids": inputs[3], "text_embeds": inputs[4]} if len(inputs) == 5 else None
        return self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                        return_dict=False)[0]


def convert_apple_denoiser(denoiser: nn.Module, family: str, options: BundleOptions, path: str | os.PathLike,
                           ios18: bool = False) -> None:
    """Trace the Neural-Engine rewrite in float32 on the CPU and save it at ``path`` as a float16
    ML program with Apple's inputs (float16) and output (float32); minimum deployment target
    macOS 13 (Apple's default), macOS 15 / iOS 18 with ``ios18``."""
    import coremltools as ct

    from workers.coreml.convert import save_package

    quiet_coremltools()
    if family == "sd3" and options.batch_one:
        raise CoreMLError("Swift's SD3 pipeline always runs the denoiser on a batch of 2; --batch-one is for UNets")
    model = AppleDenoiser(denoiser, family, options.attention)
    specs = apple_denoiser_inputs(denoiser, family, options)
    example = example_inputs(denoiser, family, options)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape asserts
            traced = torch.jit.trace(model, example, strict=False, check_trace=False)
            mlmodel = ct.convert(
                traced, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                minimum_deployment_target=getattr(ct.target, TARGETS[ios18]), skip_model_load=True,
                inputs=[ct.TensorType(name=n, shape=s, dtype=np.float16) for n, s in specs],
                outputs=[ct.TensorType(name=OUTPUT_NAMES[family], dtype=np.float32)])
    except CoreMLError:
        raise
    except Exception as exc:
        raise CoreMLError(f"Core ML conversion of the {family} denoiser ({options.attention}) failed: "
                          f"{first_line(exc, ERROR_CHARS)}") from None
    save_package(mlmodel, path)
