"""The evaluator: loads the pipeline once on its device and measures work items.

Runs inside a Ray actor (see `search.driver.pool`), but is a plain class so it can be used and
tested directly. It never touches the database: it returns plain dataclasses.

What a measurement compares follows the protocol (`workers.evaluation.protocol`). With Apple's
``--default-nbits D`` (D < 16) the analysis runs on a pipeline whose every denoiser weight is
palettized to D bits (that is also its reference), while the baselines and recipes are measured
on the pristine weights against the pristine reference, as Apple's script does.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import socket
import time
from contextlib import contextmanager

import numpy as np
import torch

from common.formats import FLOAT16_BITS, is_palettized
from workers.evaluation.device_ops import fake_int8_per_tensor_torch, floor_probe_weight, histogram_torch
from workers.evaluation.items import EvalResult, PaletteResult, WorkItem
from workers.evaluation.prefix import PrefixCache
from workers.evaluation.protocol import mean_db, psnr_per_prompt
from workers.evaluation.signal import SignalRunner, SignalSpec
from workers.evaluation.weight_swap import InPlaceSwap, palettize_like_apple, weighted_modules
from workers.models import (ModelError, ModelSpec, candidate_layers, denoiser_fingerprint, denoiser_of, load_pipeline,
                            pick_device)
from workers.apple_kmeans import takes_sklearn
from workers.palette_formats import PALETTES, dequantize_torch, fit_palette
from workers.palettize import Palette, linear_8bit


# Fault injection for the failure-handling tests: work-item keys that always raise.
_INJECTED_FAILURES = frozenset(k for k in os.environ.get("MBP_SEARCH_FAIL_KEYS", "").split(",") if k)
# Test hooks for the interruption tests: every evaluator's start-up (as a big model's reference
# run would) and every evaluation take this much longer.
_SLOW_START_S = float(os.environ.get("MBP_SEARCH_SLOW_START_S") or 0)
_SLOW_EVAL_S = float(os.environ.get("MBP_SEARCH_SLOW_EVAL_S") or 0)


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
                 min_size: int = 0, default_nbits: int = FLOAT16_BITS, weights=None, prefix_reuse: bool = True,
                 compile: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.device = device or pick_device()
        self.dtype = compute_dtype(self.device, precision)
        t0 = time.perf_counter()
        if weights is not None:  # a workers.weights.WeightsManifest: the copy on this node
            from workers.weights import local_copy

            spec = dataclasses.replace(spec, source="local", location=str(local_copy(weights, spec.requested)))
        self.spec = spec  # what was loaded (the Core ML bundle reads its family)
        self.pipe = load_pipeline(spec, device=self.device, dtype=self.dtype)
        self.denoiser = denoiser = denoiser_of(self.pipe)
        with torch.no_grad():  # the reference is the float16 model, whatever the compute dtype
            for p in denoiser.parameters():
                p.data = p.data.to(torch.float16).to(self.dtype)
        if fingerprint is not None and denoiser_fingerprint(denoiser) != fingerprint:
            raise ModelError(f"model '{spec.requested}' on this node differs from the one the search was started with "
                             "(denoiser fingerprint mismatch)")
        self.modules = {c.name: denoiser.get_submodule(c.name) for c in candidate_layers(denoiser, min_size)}
        self.protocol = signal.protocol
        self.runner = SignalRunner(self.pipe, signal, self.device)
        self.load_s = time.perf_counter() - t0
        self.node, self.worker = _ray_identity()
        self._palettes: dict[tuple[str, int], Palette] = {}
        # --default-nbits: keep the pristine weights and reference for baselines and recipes,
        # then palettize every denoiser weight to the default depth; that pipeline is the analysis'.
        self.default_nbits = int(default_nbits)
        self.pristine: dict[str, torch.Tensor] | None = None
        self._pristine_palettes: dict[tuple[str, int], Palette] = {}
        self.prefix = PrefixCache(denoiser, reuse=prefix_reuse, compile=compile) if prefix_reuse or compile else None
        if self.prefix is not None:
            self.runner.before_call = self.prefix.before_call
        t0 = time.perf_counter()
        self.reference = self.pristine_reference = self.runner.run()  # cold: includes compiling
        self.reference_s = time.perf_counter() - t0
        if is_palettized(self.default_nbits):
            self.pristine = {name: m.weight.data.clone() for name, m in weighted_modules(denoiser)}
            with torch.no_grad():  # in place: a compiled denoiser keeps its graphs
                for name, m in weighted_modules(denoiser):
                    m.weight.data.copy_(palettize_like_apple(m.weight.data, self.default_nbits).to(self.dtype))
            self.reference = self.runner.run()
        self._record_reference()
        time.sleep(_SLOW_START_S)

    def _record_reference(self) -> None:
        """Warm-up done: time a warm run of the analysis' reference, record the prefix cache
        during it, and check the device repeats itself bit for bit."""
        t0 = time.perf_counter()
        if self.prefix is None:
            again = self.runner.run()
        elif self.prefix.compiled:  # the hooks of the ordering pass must not enter compiled code
            with self.prefix.ordering():
                self.runner.run()
            with self.prefix.recording():
                again = self.runner.run()
        else:
            with self.prefix.ordering(), self.prefix.recording():
                again = self.runner.run()
        self.warm_s = time.perf_counter() - t0
        self.deterministic = bool(torch.equal(again, self.reference))
        self.reference = again  # the replayed activations are this run's

    def info(self) -> dict:
        return {"device": self.device, "dtype": str(self.dtype).replace("torch.", ""), "node": self.node,
                "worker": self.worker, "host": socket.gethostname(), "load_s": self.load_s,
                "reference_s": self.reference_s, "warm_s": self.warm_s, "deterministic": self.deterministic,
                "prefix_reuse": bool(self.prefix and self.prefix.reuse), "candidates": len(self.modules)}

    def histogram(self, item: WorkItem) -> np.ndarray:
        """The fp16 bit-pattern histogram of a candidate, computed where its weight is (one per
        channel group when ``item.bits`` is a grouped format); the palettes are fitted from it by
        CPU tasks (`workers.palette_formats.palette_from_sample`). Under Apple's protocol a weight
        under 10,000 elements is sent itself, in float16: its k-means (scikit-learn's, as Apple's
        call) depends on more than the histogram."""
        weight = self.modules[item.layer].weight.data
        if item.bits is None or not item.bits.grouped:
            if self.protocol == "apple" and takes_sklearn(weight.numel()):
                return weight.to(torch.float16).cpu().numpy()
            return histogram_torch(weight)
        return histogram_torch(weight, weight.shape[0] // item.bits.group_size)

    def _weight16(self, layer: str) -> torch.Tensor:
        return self.modules[layer].weight.data.to(torch.float16)

    def fit_palette(self, item: WorkItem) -> PaletteResult:
        t0 = time.perf_counter()
        w = self._weight16(item.layer).cpu().numpy()
        palette = fit_palette(w, item.bits, apple=self.protocol == "apple")
        self._palettes[(item.layer, item.bits)] = palette
        return PaletteResult(item.key, item.layer, item.bits, palette, self.node, self.worker, time.perf_counter() - t0)

    def _palette(self, layer: str, bits: int, provided: dict) -> Palette:
        key = (layer, bits)
        if key not in self._palettes:
            value = provided.get(key)
            if value is None:
                raise KeyError(f"no palette for {layer} at {bits} bits was sent to this evaluator")
            if not isinstance(value, PALETTES):
                import ray

                value = ray.get(value)
            self._palettes[key] = value
        return self._palettes[key]

    def _pristine_palette(self, layer: str, bits: int) -> Palette:
        """A recipe's palette when the analysis ran on default-palettized weights: fitted on the
        pristine weight, as Apple's recipe step palettizes the pristine pipeline."""
        key = (layer, bits)
        if key not in self._pristine_palettes:
            self._pristine_palettes[key] = fit_palette(self.pristine[layer].to(torch.float16).cpu().numpy(), bits,
                                                       apple=self.protocol == "apple")
        return self._pristine_palettes[key]

    def _on_pristine(self, item: WorkItem) -> bool:
        return self.pristine is not None and item.phase in ("baseline", "recipe", "candidate")

    @contextmanager
    def _patched(self, item: WorkItem, palettes: dict):
        """Swap in the modified weights for one run (in place) and always put the originals back;
        the run resumes from the reference's activations where the item allows it."""
        modules = dict(weighted_modules(self.denoiser))
        swap = InPlaceSwap(modules)
        try:
            with torch.no_grad():
                if self._on_pristine(item):
                    for name, data in self.pristine.items():
                        swap(name, data)
                if item.linear8:
                    self._swap_linear8(swap, modules)
                changed = []
                if item.phase == "floor":
                    swap(item.layer, floor_probe_weight(modules[item.layer].weight.data, item.position or 1).to(self.dtype))
                    changed.append(item.layer)
                for layer, bits in item.assignment:
                    if not is_palettized(bits):
                        continue
                    weight = modules[layer].weight.data
                    pal = (self._pristine_palette(layer, bits) if self._on_pristine(item)
                           else self._palette(layer, bits, palettes))
                    swap(layer, dequantize_torch(weight.to(torch.float16), pal).to(self.dtype))
                    changed.append(layer)
            full = self.prefix is None or item.linear8 or self._on_pristine(item) or item.phase == "baseline"
            with (contextlib.nullcontext() if full else self.prefix.replaying(changed)):
                yield
        finally:
            swap.restore()

    def _swap_linear8(self, swap, modules) -> None:
        if self.protocol == "apple":  # every denoiser weight, per tensor int8 (Apple's fake_int8_quantize), on the device
            for name, module in modules.items():
                swap(name, fake_int8_per_tensor_torch(module.weight.data.to(torch.float16)).to(self.dtype))
        else:  # classic: the candidates, per output channel uint8
            for name, module in self.modules.items():
                w16 = module.weight.data.to(torch.float16).cpu().numpy()
                swap(name, torch.from_numpy(linear_8bit(w16)).to(self.device, self.dtype))

    def _fresh_copy_run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Apple's "original": a deep copy of the pipeline run against a new run of the reference
        pipeline (on MPS this is the device's run-to-run floor; bit-exact devices give ~210 dB)."""
        with (self.prefix.detached() if self.prefix is not None else contextlib.nullcontext()):
            twin = copy.deepcopy(self.pipe)
        try:
            test = SignalRunner(twin, self.runner.spec, self.device).run()
        finally:
            del twin
        return self.runner.run(), test

    def evaluate(self, item: WorkItem, palettes: dict | None = None) -> EvalResult:
        if item.key in _INJECTED_FAILURES:
            raise RuntimeError(f"injected failure for {item.key} (MBP_SEARCH_FAIL_KEYS)")
        time.sleep(_SLOW_EVAL_S)
        t0 = time.perf_counter()
        reference = self.pristine_reference if self._on_pristine(item) else self.reference
        if item.phase == "baseline" and item.name == "original" and self.protocol == "apple":
            with self._patched(item, {}):
                reference, out = self._fresh_copy_run()
        else:
            with self._patched(item, palettes or {}):
                out = self.runner.run()
        values, mean = self.score(out, reference)
        if not np.all(np.isfinite(values)):
            raise FloatingPointError(f"non-finite output for {item.key} (the pipeline produced NaN/inf)")
        return EvalResult(item.key, values, mean, self.node, self.worker, time.perf_counter() - t0)

    def score(self, out, reference=None) -> tuple[tuple[float, ...], float]:
        """Per-prompt PSNRs of ``out`` against the reference, and their mean, as the protocol
        defines them (the Core ML validation scores its outputs with this too)."""
        values = psnr_per_prompt(self.reference if reference is None else reference, out, self.protocol)
        return values, (mean_db(values) if self.protocol == "apple" else float(np.mean(values)))

    def gallery_image(self, item, palettes: dict | None = None, spec=None):
        """One gallery image (`workers.evaluation.gallery`): a plain pipeline call for one prompt
        with ``item``'s row swapped in; returns its PNG bytes."""
        from workers.evaluation.gallery import render_item

        return render_item(self, item, palettes or {}, spec)

    def pid(self) -> int:
        return os.getpid()

