"""The denoiser of a pipeline, whatever its family: ``pipe.unet`` (SD 1.x/2.x, SDXL, the
refiner, few-step UNets) or ``pipe.transformer`` (SD3/SD3.5 MMDiT, Flux.1, PixArt-Σ).

Everything a search touches goes through here, so no caller knows which family it measures:
the candidate layers (module names are the keys of Apple's JSON, as in Apple's format), the
fingerprint, the device to use. For a UNet everything is computed exactly as before the
transformer families existed (the fingerprint of a UNet is unchanged).
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from workers.model_spec import DENOISER_FOLDERS, Candidate


def denoiser_of(pipe) -> nn.Module:
    """The pipeline's denoiser module (``pipe.unet`` or ``pipe.transformer``)."""
    for folder in DENOISER_FOLDERS:
        module = getattr(pipe, folder, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def candidate_layers(denoiser: nn.Module, min_size: int) -> list[Candidate]:
    """Every Linear/Conv2d whose weight has more than ``min_size`` elements, module order
    (Apple's get_palettizable_modules on the denoiser)."""
    out = []
    for name, mod in denoiser.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight.numel() > min_size:
            kind = "linear" if isinstance(mod, nn.Linear) else "conv"
            out.append(Candidate(name, mod.weight.numel(), tuple(mod.weight.shape), kind))
    return out


def denoiser_fingerprint(denoiser: nn.Module) -> str:
    """sha256 of the denoiser's class, config and all weights as fp16 (independent of load
    dtype/path), so results are never mixed between models or applied to a fine-tuned one."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in dict(getattr(denoiser, "config", {})).items() if not k.startswith("_")}
    h.update(type(denoiser).__name__.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in denoiser.state_dict().items():
            h.update(f"\n{name}:{tuple(t.shape)}:".encode())
            t = t.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(torch.float16)
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def pick_device() -> str:
    """Fastest available torch device."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
