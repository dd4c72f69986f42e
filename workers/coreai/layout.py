"""What Apple's Core AI diffusion exporter writes, per pipeline type, and what a recipe may hold.

Read from apple/coreai-models (``python/src/coreai_models/diffusion/components.py``,
``pipeline.py``, ``presets.py``; ``swift/.../PipelineDescriptor+CoreAI.swift``), written here in
our own words; docs/coreai.md quotes the facts. One folder per model: an ``<Asset>.aimodel``
per component (each a folder ``{main.mlirb, main.hash, metadata.json}``), the tokenizer
folder(s) copied from the model, and ``metadata.json`` (schema 0.2, ``kind: diffusion``) whose
``assets`` map tells Swift which file is which component.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.formats import PaletteFormat
from workers.coreai import CoreAIError

METADATA_VERSION = "0.2"
EXPORT_BATCH = 2  # Apple's dummy denoiser inputs: batch 2 (classifier-free guidance)
TOKENS = 77  # CLIP's context: the text encoders' input_ids (1, 77)
SD3_TOKENS = 154  # SD3's joint text sequence (two CLIPs' 77 each, T5-less)
EXPORT_NBITS = (1, 2, 4, 6, 8)  # what exports in coreai-opt 0.4.0 / coreai-torch 0.4.3 (3 bits does not)
PRESET_4BIT = {"type": "int4", "symmetric": True, "granularity": "per_block", "block_size": 32}
PRESET_4BIT_THRESHOLD = 32768  # Apple's weight_num_threshold: smaller weights stay float16


@dataclass(frozen=True)
class Component:
    """One exported component: its key in metadata.json's ``assets``, file stem, I/O names, and
    whether Apple's presets may compress it (text encoders and the denoiser; never the VAE)."""

    key: str
    asset: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    quantizable: bool = False

    @property
    def filename(self) -> str:
        return f"{self.asset}.aimodel"


SD = (
    Component("text_encoder", "TextEncoder", ("input_ids",), ("last_hidden_state",), True),
    Component("unet", "Unet", ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",), True),
    Component("vae_decoder", "VAEDecoder", ("z",), ("image",)),
    Component("vae_encoder", "VAEEncoder", ("image",), ("latent_params",)),
)
SD3 = (
    Component("text_encoder", "TextEncoder", ("input_ids",), ("hidden_embeds", "pooled_outputs"), True),
    Component("text_encoder_2", "TextEncoder2", ("input_ids",), ("hidden_embeds", "pooled_outputs"), True),
    Component("transformer", "MMDiT", ("sample", "timestep", "encoder_hidden_states", "pooled_projections"),
              ("noise_pred",), True),
    Component("vae_decoder", "VAEDecoder", ("z",), ("image",)),
)
COMPONENTS = {"sd": SD, "sd3": SD3}
TOKENIZERS = {"sd": ("tokenizer",), "sd3": ("tokenizer", "tokenizer_2")}  # T5's tokenizer_3 is skipped
DENOISER_KEY = {"sd": "unet", "sd3": "transformer"}


def pipeline_type(spec_family: str, img2img: bool = False) -> str:
    """Apple's pipeline type of a search's model family; other families are refused in one line."""
    if spec_family in COMPONENTS and not img2img:
        return spec_family
    raise CoreAIError(f"Apple's Core AI diffusion exporter has no pipeline for {spec_family}"
                      f"{' image-to-image' if img2img else ''} models (it exports SD 1.x/2.x, SD3 and FLUX.2 "
                      "Klein); use --target coreml")


def denoiser_component(ptype: str) -> Component:
    return next(c for c in COMPONENTS[ptype] if c.key == DENOISER_KEY[ptype])


def check_formats(bits: dict) -> None:
    """Refuse, in one line, a recipe holding a depth that does not export to Core AI (3 bits)."""
    bad = sorted({str(f) for f in map(PaletteFormat.of, bits.values()) if f.palettized and f.bits not in EXPORT_NBITS})
    if bad:
        raise CoreAIError(f"the recipe holds {', '.join(bad)}-bit layers, and Core AI cannot export 3-bit palettes "
                          "(coreai-opt 0.4.0 packs 1/2/4/6/8 bits); pick a recipe without them, or search with "
                          "--nbits excluding 3")
