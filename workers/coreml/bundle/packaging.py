"""The step every Resources component shares: trace a float32 torch module, convert it to an ML
program the way Apple's ``torch2coreml._convert_to_coreml`` does (fixed shapes, float32 outputs,
minimum deployment target macOS 13), optionally palettize it, save it atomically, free it.

Everything built here is dropped (and garbage-collected) before returning, so converting a
pipeline component by component never holds two traces or two Core ML programs at once: SDXL's
text encoder 2 and VAE are gigabytes each, and Apple's users run out of memory converting them
together. The caller's torch module is never changed (a float16 or GPU one is copied to float32 on
the CPU, one component at a time).
"""
from __future__ import annotations

import copy
import gc
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import first_line
from workers.coreml.bundle.contract import ENCODER_NBITS
from workers.coreml.common import ERROR_CHARS, CoreMLError, quiet_coremltools
from workers.coreml.convert import save_package

DEPLOYMENT_TARGET = "macOS13"  # Apple's --min-deployment-target default: the oldest OS its Swift package runs on
# Weights with fewer elements stay float (coremltools' own weight_threshold default): norms, biases and
# small convolutions carry little size and much accuracy.
PALETTE_MIN_ELEMENTS = 2048
# Ops whose weights are never palettized: Apple's _quantize_weights leaves "gather" out (the token
# embedding table; a 4-bit vocabulary would blur every prompt).
UNPALETTIZED_OPS = ("gather",)
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class TensorSpec:
    """One fixed-shape model input or output as Swift sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float16" | "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not all(isinstance(d, int) and d > 0 for d in self.shape):
            raise ValueError(f"{self.name}: shape must be positive integers, got {self.shape}")


@dataclass(frozen=True)
class Converted:
    """A saved component package: what it is, where, how long it took."""

    name: str  # Apple's base name: TextEncoder, TextEncoder2, VAEDecoder, VAEEncoder
    path: str
    precision: str  # compute precision of the program: "float16" | "float32"
    nbits: int | None  # None: weights kept at that precision
    seconds: float


def float32_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when it is already float32 on the CPU (traced as is), else a float32 CPU copy."""
    param = next(module.parameters(), None)
    if param is None or (param.device.type == "cpu" and param.dtype == torch.float32):
        return module
    return copy.deepcopy(module).to("cpu", torch.float32)


def check_nbits(nbits: int | None) -> None:
    if nbits is not None and nbits not in ENCODER_NBITS:
        raise CoreMLError(f"nbits must be one of {', '.join(map(str, ENCODER_NBITS))} or None, got {nbits!r}")


def palettize(model, nbits: int):
    """Uniform per-tensor k-means palettization with coremltools' own palettizer (Apple's
    ``--quantize-nbits``): every weight of at least PALETTE_MIN_ELEMENTS elements becomes a
    ``constexpr_lut_to_dense`` with a 2**nbits-entry table, except those of UNPALETTIZED_OPS."""
    import coremltools as ct

    config = ct.optimize.coreml.OptimizationConfig(
        global_config=ct.optimize.coreml.OpPalettizerConfig(mode="kmeans", nbits=nbits,
                                                            weight_threshold=PALETTE_MIN_ELEMENTS),
        op_type_configs={op: None for op in UNPALETTIZED_OPS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-means warns on tensors with fewer distinct values than entries (masks)
        return ct.optimize.coreml.palettize_weights(model, config=config)


def convert_module(module: torch.nn.Module, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[str, ...],
                   precision: str, path: str | os.PathLike, nbits: int | None = None,
                   descriptions: dict[str, str] | None = None) -> Converted:
    """Trace ``module`` (float32, CPU) on zeros of the input shapes, convert, palettize, save, free.

    Inputs are declared with their Core ML dtype (a float16 input needs macOS 13, the target);
    outputs are float32, as Apple declares them and Swift reads them. Errors are one-line CoreMLErrors.
    """
    import coremltools as ct

    quiet_coremltools()
    check_nbits(nbits)
    t0 = time.perf_counter()
    example = tuple(torch.zeros(spec.shape, dtype=torch.float32) for spec in inputs)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape asserts
            traced = torch.jit.trace(module.eval(), example, strict=False, check_trace=False)
            model = ct.convert(
                traced, convert_to="mlprogram", skip_model_load=True,
                minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
                compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
                inputs=[ct.TensorType(name=s.name, shape=s.shape, dtype=DTYPES[s.dtype]) for s in inputs],
                outputs=[ct.TensorType(name=o, dtype=np.float32) for o in outputs])
        del traced
        if nbits is not None:
            model = palettize(model, nbits)
    except Exception as exc:
        raise CoreMLError(f"Core ML conversion of {name} failed: {first_line(exc, ERROR_CHARS)}") from None
    for key, text in (descriptions or {}).items():
        if key in {s.name for s in inputs}:
            model.input_description[key] = text
        else:
            model.output_description[key] = text
    save_package(model, path)
    del model
    gc.collect()
    return Converted(name, str(path), precision, nbits, time.perf_counter() - t0)
