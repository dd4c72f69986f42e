"""Validate a palettized denoiser package (UNet or transformer): structure, numerics in torch,
Core ML prediction (macOS).

1. structural: read back from the saved package, every palettized weight is a
   ``constexpr_lut_to_dense`` with 2^bits float16 LUT entries (one LUT per channel group for a
   grouped format) equal to the expected LUTs, and
   its unpacked indices equal the expected indices; every other const is bit-identical to
   the base model's and no other weight was compressed.
2. numeric: the weights decompressed from the package replace the torch denoiser's, the search's
   signal protocol runs, and the PSNR must be within ``tolerance`` dB of the measured one.
3. runtime (macOS only): the pipeline runs with Core ML predicting the denoiser, per compute unit,
   against the torch float16 reference latents.
"""
from __future__ import annotations

import inspect
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from common.errors import first_line
from workers.coreml.common import (LUT_OP, PALETTIZED_SUFFIX, CoreMLError, const_value, iter_ops, listing,
                            value_digest)
from workers.coreml.apply import LayerLut
from workers.coreml.call_inputs import flatten_call

COMPUTE_UNITS = ("CPU_AND_GPU", "CPU_AND_NE")
NUMERIC_TOLERANCE_DB = 0.1


@dataclass(frozen=True)
class StructuralResult:
    ok: bool
    detail: str


@dataclass(frozen=True)
class NumericResult:
    psnr: float
    per_prompt: tuple[float, ...]
    ok: bool | None  # None: no measured PSNR to compare with
    detail: str


@dataclass(frozen=True)
class RuntimeResult:
    psnr: dict[str, float] | None  # {compute unit: PSNR dB}; None where prediction did not run
    note: str


def _unpack(op) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(luts, flat indices, shape) of a constexpr_lut_to_dense (iOS16 or iOS18 form); ``luts`` is
    (groups, entries): one row per tensor, or one per channel group along axis 0 (iOS18)."""
    lut = np.asarray(op.lut.val)
    if "shape" in op.inputs:  # iOS16: packed uint8 indices and an explicit shape
        from coremltools.optimize import _utils as optimize_utils

        shape = tuple(int(d) for d in op.shape.val)
        nbits = int(np.log2(lut.size))
        idx = optimize_utils.restore_elements_from_packed_bits(op.indices.val, nbits, int(np.prod(shape)))
        return lut.reshape(1, -1), np.asarray(idx).reshape(-1), shape
    indices = np.asarray(op.indices.val)
    if int(np.prod(lut.shape[1:-2])) != 1 or lut.shape[-1] != 1:
        raise CoreMLError(f"{op.name}: not a scalar LUT grouped along axis 0 (lut shape {lut.shape})")
    return lut.reshape(lut.shape[0], -1), indices.reshape(-1), tuple(int(d) for d in indices.shape)


def _dense(luts: np.ndarray, idx: np.ndarray, shape) -> np.ndarray:
    """luts[group of the weight, index]: what constexpr_lut_to_dense computes (groups along axis 0)."""
    rows = idx.reshape(len(luts), -1).astype(np.int64)
    return np.take_along_axis(luts, rows, axis=1).reshape(shape)


def check_structure(program, base_consts: Mapping[str, str], luts: Mapping[str, LayerLut], source: str = "expected"
                    ) -> tuple[StructuralResult, dict[str, np.ndarray]]:
    """Structural validation of a saved package's program; also returns the dense weights
    ``{torch layer: lut[indices]}`` decompressed from it (for the numeric check)."""
    ops = {op.name: op for op in iter_ops(program)}
    problems, dense = [], {}
    for const, entry in luts.items():
        op = ops.get(const + PALETTIZED_SUFFIX)
        if op is None or op.op_type != LUT_OP:
            problems.append(f"{entry.layer}: no {LUT_OP} op for Core ML weight {const}")
            continue
        if const in ops:
            problems.append(f"{entry.layer}: the float16 weight {const} is still present")
        lut, idx, shape = _unpack(op)
        expected = entry.lut.reshape(-1, 1 << entry.bits.bits)  # (groups, entries)
        if idx.size == int(np.prod(shape)) and idx.size % len(lut) == 0 and int(idx.max(initial=0)) < lut.shape[1]:
            dense[entry.layer] = _dense(lut, idx, shape)  # whatever the package holds, for the numeric check
        if lut.shape != expected.shape:
            problems.append(f"{entry.layer}: {lut.shape[0]} LUT(s) of {lut.shape[1]} entries, expected "
                            f"{expected.shape[0]} of {expected.shape[1]} ({entry.bits})")
        elif lut.dtype != np.float16 or not np.array_equal(lut.view(np.uint16), expected.view(np.uint16)):
            problems.append(f"{entry.layer}: LUT differs from the {source} one")
        elif idx.size != entry.indices.size or not np.array_equal(idx.astype(np.uint8), entry.indices):
            problems.append(f"{entry.layer}: indices differ from the {source} ones")
    expected_ops = {c + PALETTIZED_SUFFIX for c in luts}
    extra = sorted(op.name for op in ops.values() if op.op_type.startswith("constexpr_") and op.name not in expected_ops)
    if extra:
        problems.append(f"other weights are compressed too: {listing(extra, 3)}")
    feeding = {v.op.name for name in expected_ops if name in ops for v in ops[name].inputs.values() if v.op is not None}
    now = {name: op for name, op in ops.items() if op.op_type == "const" and name not in feeding
           and isinstance(const_value(op), np.ndarray) and const_value(op).dtype.kind == "f"
           and const_value(op).ndim >= 1}
    others = {name: d for name, d in base_consts.items() if name not in luts}
    removed = sorted(n for n in others if n not in now)
    changed = sorted(n for n in others if n in now and value_digest(const_value(now[n])) != others[n])
    added = sorted(n for n in now if n not in base_consts)
    for what, names in (("removed", removed), ("changed", changed), ("added", added)):
        if names:
            problems.append(f"{len(names)} other weights {what}: {listing(names, 3)}")
    if problems:
        head = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}: "
        return StructuralResult(False, head + "; ".join(problems[:5])), dense
    hist = Counter(e.bits for e in luts.values())
    depths = ", ".join(f"{n} at {b}{'' if b.grouped else ' bits'}" for b, n in sorted(hist.items())) or "none"
    return StructuralResult(True, f"{len(luts)} weights are constexpr_lut_to_dense ({depths}) with the {source} "
                                  f"LUTs and indices; the {len(others)} other weights are unchanged"), dense


def _run_with_weights(evaluator, weights: Mapping[str, np.ndarray]) -> torch.Tensor:
    """The signal run with ``weights`` loaded into the torch denoiser; originals always restored."""
    unet, originals = evaluator.denoiser, {}
    try:
        with torch.no_grad():
            for layer, value in weights.items():
                module = unet.get_submodule(layer)
                originals[layer] = module.weight.data
                w = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float16)).reshape(module.weight.shape)
                module.weight.data = w.to(evaluator.device, evaluator.dtype)
        return evaluator.runner.run()
    finally:
        for layer, data in originals.items():
            unet.get_submodule(layer).weight.data = data


def check_numeric(evaluator, weights: Mapping[str, np.ndarray], measured: float | None,
                  tolerance: float = NUMERIC_TOLERANCE_DB) -> NumericResult:
    per_prompt, value = evaluator.score(_run_with_weights(evaluator, weights), evaluator.pristine_reference)
    if measured is None:
        return NumericResult(value, per_prompt, None, f"{value:.2f} dB (no measured PSNR to compare with)")
    ok = bool(np.isfinite(value) and abs(value - measured) <= tolerance)
    return NumericResult(value, per_prompt, ok, f"{value:.2f} dB vs measured {measured:.2f} dB "
                                                f"({'within' if ok else 'NOT within'} {tolerance} dB)")


class CoreMLDenoiser:
    """Stands in for the denoiser's ``forward``: feeds each call to a Core ML model's ``predict``.

    Binds each call to the denoiser's own signature (`workers.coreml.call_inputs`), so it serves
    UNets and transformers alike. Adapts to the model's inputs: splits the batch when the model
    takes a smaller one, and turns (B, S, C) text embeddings into (B, C, 1, S) for models that
    expect them so (Apple's torch2coreml layout).
    """

    def __init__(self, model, forward):
        from coremltools.proto import FeatureTypes_pb2

        spec = model.get_spec()
        half = FeatureTypes_pb2.ArrayFeatureType.FLOAT16
        self.model, self.signature = model, inspect.signature(forward)  # bound once, not per denoiser call
        self.inputs = {i.name: (tuple(int(d) for d in i.type.multiArrayType.shape),
                                np.float16 if i.type.multiArrayType.dataType == half else np.float32)
                       for i in spec.description.input}
        self.output = spec.description.output[0].name

    def __call__(self, *args, **kwargs):
        call = flatten_call(self.signature, args, kwargs)
        feeds = call.feeds()
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise CoreMLError(f"the Core ML model needs inputs the pipeline does not give: {', '.join(missing)}")
        first = call.arrays[0]
        batch = first.shape[0]
        step = next(iter(self.inputs.values()))[0][0] or batch
        if batch % step:
            raise CoreMLError(f"pipeline batch {batch} is not a multiple of the Core ML model's batch {step}")
        outs = []
        for start in range(0, batch, step):
            chunk = {}
            for name, (shape, dtype) in self.inputs.items():
                x = feeds[name][start:start + step]
                if len(shape) == 4 and x.ndim == 3:
                    x = x.transpose(0, 2, 1)[:, :, None, :]
                chunk[name] = np.ascontiguousarray(x, dtype=dtype)
            outs.append(np.asarray(self.model.predict(chunk)[self.output], dtype=np.float32))
        like = next(t for t in (*args, *kwargs.values()) if torch.is_tensor(t))
        out = torch.from_numpy(np.concatenate(outs)).to(like.device, like.dtype)
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)  # UNet outputs are read as `.sample` or `[0]` alike
        return (out,)


def run_with_coreml(evaluator, predictor) -> torch.Tensor:
    """The signal run with the denoiser's forward replaced by ``predictor`` (always restored)."""
    denoiser = evaluator.denoiser
    denoiser.forward = predictor
    try:
        return evaluator.runner.run()
    finally:
        del denoiser.forward


def check_runtime(evaluator, package: str, compute_units=COMPUTE_UNITS) -> RuntimeResult:
    """Core ML prediction of the palettized package per compute unit (macOS only)."""
    if sys.platform != "darwin":
        return RuntimeResult(None, f"not run: Core ML prediction needs macOS, and this node runs {sys.platform}; "
                                   "run `search validate` with a Mac in the cluster (--coreml-node coreml)")
    import coremltools as ct

    results, notes = {}, []
    for unit in compute_units:
        try:
            model = ct.models.MLModel(package, compute_units=getattr(ct.ComputeUnit, unit))
            out = run_with_coreml(evaluator, CoreMLDenoiser(model, evaluator.denoiser.forward))
            results[unit] = evaluator.score(out, evaluator.pristine_reference)[1]
        except Exception as exc:
            notes.append(f"{unit} failed: {first_line(exc, 200)}")
    ran = ", ".join(f"{u} {p:.2f} dB" for u, p in results.items())
    note = "Core ML prediction vs torch float16 reference: " + (ran or "no compute unit ran")
    return RuntimeResult(results or None, note + ("; " + "; ".join(notes) if notes else ""))
