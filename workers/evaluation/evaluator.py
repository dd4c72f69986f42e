"""The evaluator: loads the pipeline once on its device and measures work items.

Runs inside a Ray actor (see `search.pool`), but is a plain class so it can be used and
tested directly. It never touches the database: it returns plain dataclasses.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager

import numpy as np
import torch

from workers.evaluation.items import EvalResult, PaletteResult, WorkItem
from workers.models import ModelError, ModelSpec, candidate_layers, load_pipeline, pick_device, unet_fingerprint
from workers.palettize import Palette, dequantize_torch, kmeans_palette, linear_8bit
from workers.evaluation.signal import SignalRunner, SignalSpec, psnr


# Fault injection for the failure-handling tests: work-item keys that always raise.
_INJECTED_FAILURES = frozenset(k for k in os.environ.get("MBP_SEARCH_FAIL_KEYS", "").split(",") if k)


def compute_dtype(device: str, precision: str) -> torch.dtype:
    """fp16 where kernels are fast and complete (cuda, mps); fp32 on CPU. Weights are always
    rounded to fp16 first, so the reference is the float16 model either way."""
    if precision == "float16":
        return torch.float16
    if precision == "float32":
        return torch.float32
    return torch.float32 if device == "cpu" else torch.float16


def _ray_identity() -> tuple[str, str]:
    try:
        import ray

        if not ray.is_initialized():  # asking for a runtime context would start a local instance
            raise RuntimeError
        ctx = ray.get_runtime_context()
        actor = ctx.get_actor_id()
        return ctx.get_node_id()[:16], (actor or "driver")[:12]
    except Exception:  # not inside Ray
        return socket.gethostname(), f"pid{os.getpid()}"


class Evaluator:
    def __init__(self, spec: ModelSpec, signal: SignalSpec, *, precision: str = "auto",
                 fingerprint: str | None = None, device: str | None = None, threads: int | None = None,
                 min_size: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.device = device or pick_device()
        self.dtype = compute_dtype(self.device, precision)
        t0 = time.perf_counter()
        self.pipe = load_pipeline(spec, device=self.device, dtype=self.dtype)
        unet = self.pipe.unet
        with torch.no_grad():  # the reference is the float16 model, whatever the compute dtype
            for p in unet.parameters():
                p.data = p.data.to(torch.float16).to(self.dtype)
        if fingerprint is not None and unet_fingerprint(unet) != fingerprint:
            raise ModelError(f"model '{spec.requested}' on this node differs from the one the search was started with "
                             "(UNet fingerprint mismatch)")
        self.modules = {c.name: unet.get_submodule(c.name) for c in candidate_layers(unet, min_size)}
        self.runner = SignalRunner(self.pipe, signal, self.device)
        self.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.reference = self.runner.run()
        self.reference_s = time.perf_counter() - t0
        self.node, self.worker = _ray_identity()
        self._palettes: dict[tuple[str, int], Palette] = {}

    def info(self) -> dict:
        return {"device": self.device, "dtype": str(self.dtype).replace("torch.", ""), "node": self.node,
                "worker": self.worker, "host": socket.gethostname(), "load_s": self.load_s,
                "reference_s": self.reference_s, "candidates": len(self.modules)}

    def _weight16(self, layer: str) -> torch.Tensor:
        return self.modules[layer].weight.data.to(torch.float16)

    def fit_palette(self, item: WorkItem) -> PaletteResult:
        t0 = time.perf_counter()
        w = self._weight16(item.layer).cpu().numpy()
        palette = kmeans_palette(w, item.bits)
        self._palettes[(item.layer, item.bits)] = palette
        return PaletteResult(item.key, item.layer, item.bits, palette, self.node, self.worker, time.perf_counter() - t0)

    def _palette(self, layer: str, bits: int, provided: dict) -> Palette:
        key = (layer, bits)
        if key not in self._palettes:
            value = provided.get(key)
            if value is None:
                raise KeyError(f"no palette for {layer} at {bits} bits was sent to this evaluator")
            if not isinstance(value, Palette):
                import ray

                value = ray.get(value)
            self._palettes[key] = value
        return self._palettes[key]

    @contextmanager
    def _patched(self, item: WorkItem, palettes: dict):
        """Swap in the modified weights for one run and always put the originals back."""
        originals = {}
        try:
            with torch.no_grad():
                if item.linear8:
                    for name, module in self.modules.items():
                        w16 = module.weight.data.to(torch.float16).cpu().numpy()
                        originals[name] = module.weight.data
                        module.weight.data = torch.from_numpy(linear_8bit(w16)).to(self.device, self.dtype)
                for layer, bits in item.assignment:
                    if bits == 16:
                        continue
                    module = self.modules[layer]
                    pal = self._palette(layer, bits, palettes)
                    originals[layer] = module.weight.data
                    module.weight.data = dequantize_torch(module.weight.data.to(torch.float16), pal).to(self.dtype)
            yield
        finally:
            for name, data in originals.items():
                self.modules[name].weight.data = data

    def evaluate(self, item: WorkItem, palettes: dict | None = None) -> EvalResult:
        if item.key in _INJECTED_FAILURES:
            raise RuntimeError(f"injected failure for {item.key} (MBP_SEARCH_FAIL_KEYS)")
        t0 = time.perf_counter()
        with self._patched(item, palettes or {}):
            out = self.runner.run()
        values = psnr(self.reference, out)
        if not np.all(np.isfinite(values)):
            raise FloatingPointError(f"non-finite output for {item.key} (the pipeline produced NaN/inf)")
        return EvalResult(item.key, tuple(float(v) for v in values), float(np.mean(values)), self.node, self.worker,
                          time.perf_counter() - t0)

    def pid(self) -> int:
        return os.getpid()
