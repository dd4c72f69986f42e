"""What a model is, once resolved (`ModelSpec`), the error every model problem raises, and how a
pipeline's configs describe it (family, default resolution). No torch, no network."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

REAL_MIN_SIZE = 100_000  # Apple's PALETTIZE_MIN_SIZE


class ModelError(Exception):
    """A model cannot be used; the one-line message names the model and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    requested: str  # what the user typed
    source: str  # "builtin" | "local" | "hub"
    location: str  # local directory, or Hub repo id
    family: str  # "sdxl" | "sd"
    default_min_size: int
    default_resolution: int  # pixels

    @property
    def tiny(self) -> bool:
        """A built-in tiny model: keeps its own small resolution under Apple's protocol (the
        built-in full-architecture models are measured like any real model)."""
        return self.source == "builtin" and self.default_min_size < REAL_MIN_SIZE


@dataclass(frozen=True)
class Candidate:
    name: str
    numel: int
    shape: tuple[int, ...]
    kind: str  # "linear" | "conv"


def read_json(path: Path | str | None) -> dict | None:
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError, TypeError):
        return None


def describe(index: dict | None, unet_cfg: dict | None, vae_cfg: dict | None, name: str,
              hint: str = "") -> tuple[str, int]:
    """Family and default resolution from model_index.json and the unet/vae configs."""
    if index is not None and "unet" not in index:
        raise ModelError(f"model '{name}' ({index.get('_class_name', '?')}) has no UNet: "
                         "only UNet-based SD/SDXL pipelines can be searched")
    cls = str((index or {}).get("_class_name", ""))
    sdxl = "XL" in cls or (unet_cfg or {}).get("addition_embed_type") == "text_time"
    family = "sdxl" if sdxl else "sd"
    sample = (unet_cfg or {}).get("sample_size")
    blocks = (vae_cfg or {}).get("block_out_channels")
    scale = 2 ** (len(blocks) - 1) if blocks else 8
    if isinstance(sample, int) and sample > 0:
        return family, sample * scale
    if family == "sdxl":
        return family, 1024
    sd2_768 = re.search(r"2-[01]$", hint) is not None  # stable-diffusion-2(-1) without -base
    return family, 768 if sd2_768 else 512
