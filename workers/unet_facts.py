"""Facts about a loaded UNet: its candidate layers, its fingerprint, and the device to use."""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from workers.model_spec import Candidate


def candidate_layers(unet: nn.Module, min_size: int) -> list[Candidate]:
    """Every Linear/Conv2d whose weight has more than ``min_size`` elements, module order."""
    out = []
    for name, mod in unet.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight.numel() > min_size:
            kind = "linear" if isinstance(mod, nn.Linear) else "conv"
            out.append(Candidate(name, mod.weight.numel(), tuple(mod.weight.shape), kind))
    return out


def unet_fingerprint(unet: nn.Module) -> str:
    """sha256 of the UNet config and all weights as fp16 (independent of load dtype/path)."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in dict(getattr(unet, "config", {})).items() if not k.startswith("_")}
    h.update(type(unet).__name__.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in unet.state_dict().items():
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
