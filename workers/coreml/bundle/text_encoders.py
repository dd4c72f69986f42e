"""CLIP text encoders as Apple's Swift pipeline reads them (``TextEncoder.swift``, ``TextEncoderXL.swift``).

Swift tokenizes, pads to the model's input length (77) and passes the ids as float32 in one input,
``input_ids`` [1, 77]. It then reads outputs by name:
- ``StableDiffusionPipeline`` (family "sd"): ``last_hidden_state`` [1, 77, D] (the final layer norm's
  output, what diffusers' SD pipeline conditions on); ``pooled_outputs`` is there too (Apple's converter
  returns the CLIP model's own tuple) but unread.
- SDXL base, refiner and SD3 (``TextEncoderXL``): ``hidden_embeds`` = the penultimate hidden state
  (``hidden_states[-2]``, diffusers' default clip_skip for these pipelines) and ``pooled_outputs`` = the
  projected ``text_embeds`` of a CLIPTextModelWithProjection, else ``pooler_output`` (Apple's rule).
  SDXL concatenates the two hidden states and takes the pool of TextEncoder2; SD3 concatenates both
  pools; the refiner has only TextEncoder2.

SD3 differs from Apple's converter on purpose: Apple converts SDXL base's CLIP encoders for SD3 (whose
first is a CLIPTextModel, so its pool is unprojected); here the SD3 pipeline's own encoders are
converted, so ``pooled_outputs`` is what diffusers' SD3 pipeline pools. SD3's T5 (``TextEncoderT5``) is
left out: optional in Swift (zeros without it, like diffusers without text_encoder_3), and Apple ships a
pre-converted one rather than converting 4.7 B parameters.
"""
from __future__ import annotations

import os

import torch

from workers.coreml.bundle.contract import SWIFT_FAMILIES, TOKEN_LENGTH, text_encoder_names
from workers.coreml.bundle.packaging import Converted, TensorSpec, convert_module, float32_cpu
from workers.coreml.common import CoreMLError

# (family, Apple's name) -> the diffusers pipeline attribute holding that encoder and its tokenizer
_ATTRIBUTES = {"TextEncoder": ("text_encoder", "tokenizer"), "TextEncoder2": ("text_encoder_2", "tokenizer_2")}
INPUT_NAME = "input_ids"
POOLED_NAME = "pooled_outputs"


def hidden_output_name(family: str) -> str:
    """``last_hidden_state`` for SD (``TextEncoder.swift``), ``hidden_embeds`` for the XL-style pipelines."""
    return "last_hidden_state" if family == "sd" else "hidden_embeds"


def encoder_attributes(family: str, name: str) -> tuple[str, str]:
    """The pipeline attributes (text encoder, tokenizer) Apple's ``name`` is made from in ``family``."""
    if family not in SWIFT_FAMILIES:
        raise CoreMLError(f"no Swift pipeline for family {family!r}; Swift families: {', '.join(SWIFT_FAMILIES)}")
    names = text_encoder_names(family)
    if name not in names:
        raise CoreMLError(f"a {family} Resources folder has text encoders {', '.join(names)}, not {name!r}")
    return _ATTRIBUTES[name]


class SwiftTextEncoder(torch.nn.Module):
    """float32 token ids [1, 77] -> (hidden states [1, 77, D], pooled [1, P]), as Swift reads them."""

    def __init__(self, text_encoder: torch.nn.Module, penultimate: bool):
        super().__init__()
        self.text_encoder, self.penultimate = text_encoder, penultimate

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids.to(torch.long), output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        return hidden, pooled


def swift_text_encoder(pipe, family: str, name: str) -> SwiftTextEncoder:
    """The torch function the ``name`` package of ``family`` is traced from (the pipeline's own weights)."""
    attr, _tok = encoder_attributes(family, name)
    encoder = getattr(pipe, attr, None)
    if encoder is None:
        raise CoreMLError(f"the {type(pipe).__name__} has no {attr}, which {name} is made from")
    return SwiftTextEncoder(float32_cpu(encoder), penultimate=family != "sd").eval()


def convert_text_encoder(pipe, family: str, name: str, path: str | os.PathLike, nbits: int | None = None) -> Converted:
    """Convert one text encoder of ``pipe`` to ``path`` (float16 compute, float32 input and outputs, as Apple),
    palettized to ``nbits`` when given. The pipeline is not changed; the caller may drop the torch
    encoder afterwards to free its memory."""
    module = swift_text_encoder(pipe, family, name)
    length = _input_length(pipe, family, name)
    hidden = hidden_output_name(family)
    descriptions = {INPUT_NAME: "The token ids that represent the input text",
                    hidden: "Hidden states after the encoder layers" if family != "sd"
                    else "The token embeddings as encoded by the Transformer model",
                    POOLED_NAME: "The pooled text embedding"}
    try:
        return convert_module(module, name, (TensorSpec(INPUT_NAME, (1, length), "float32"),), (hidden, POOLED_NAME),
                              "float16", path, nbits, descriptions)
    finally:
        del module


def _input_length(pipe, family: str, name: str) -> int:
    """Swift pads and truncates to the model's own input length; CLIP's context is 77 tokens."""
    _enc, tok_attr = encoder_attributes(family, name)
    tokenizer = getattr(pipe, tok_attr, None)
    length = getattr(tokenizer, "model_max_length", TOKEN_LENGTH)
    if length != TOKEN_LENGTH:
        raise CoreMLError(f"{tok_attr} pads to {length} tokens; Swift's pipelines and the denoiser use {TOKEN_LENGTH}")
    return length
