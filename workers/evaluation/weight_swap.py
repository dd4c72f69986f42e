"""Denoiser weights as an evaluation changes them: which modules have weights, Apple's
``--default-nbits`` palettization, and swapping values in place (``copy_``) and back."""
from __future__ import annotations

import numpy as np
import torch

from workers.evaluation.device_ops import histogram_torch
from workers.palettize import dequantize_torch, palette_from_histogram


def weighted_modules(denoiser):
    """Every denoiser module with a weight tensor, in `named_modules` order (what Apple's
    fake_int8_quantize and --default-nbits walk over: norms and small layers too)."""
    for name, module in denoiser.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            yield name, module


def palettize_like_apple(weight: torch.Tensor, nbits: int) -> torch.Tensor:
    """Apple's fake_palettize of one weight for --default-nbits: coremltools' k-means on the
    fp16 values (its optimal 1-D k-means from 10,000 elements on, which `kmeans_palette`
    reproduces exactly and much faster, here from the histogram computed on the weight's
    device; scikit-learn's below that, so coremltools' own call)."""
    w16 = weight.to(torch.float16)
    if w16.numel() >= 10_000:
        return dequantize_torch(w16, palette_from_histogram(histogram_torch(w16), nbits))
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w16 = w16.cpu().numpy()
    lut, idx = _get_kmeans_lookup_table_and_weight(nbits, w16)
    dense = lut.astype(np.float16)[np.asarray(idx, dtype=np.int64)].reshape(w16.shape)
    return torch.from_numpy(dense).to(weight.device)


class InPlaceSwap:
    """Puts new values into weight tensors with ``copy_`` (the tensors stay the same objects, so
    a compiled UNet is not recompiled) and restores the saved originals exactly."""

    def __init__(self, modules: dict):
        self.modules = modules
        self.saved: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, data: torch.Tensor) -> None:
        weight = self.modules[name].weight.data
        if name not in self.saved:
            self.saved[name] = weight.clone()
        weight.copy_(data)

    def restore(self) -> None:
        with torch.no_grad():
            for name, data in self.saved.items():
                self.modules[name].weight.data.copy_(data)
        self.saved = {}
