"""Convert the search's denoiser (UNet or transformer) to a float16 Core ML ML program, cached.

The inputs are the ones the search's pipeline call really passes to the denoiser (captured with
a forward pre-hook during one signal run, `workers.coreml.call_inputs`): same batch, same
latent size, same conditioning. The denoiser is traced in float32 on the CPU and converted
with ``compute_precision=FLOAT16``, so every Core ML weight holds exactly the float16 value
the search measured.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import first_line
from common.files import atomic_write_text, publish_dir
from workers.coreml.call_inputs import DenoiserInputs, flatten_call
from workers.coreml.common import ERROR_CHARS, CoreMLError, describe_program, quiet_coremltools, read_program

OUTPUT_NAME = "noise_pred"
BASE_FORMAT = "1"  # bump when the conversion changes: cached base models are rebuilt
# Minimum deployment targets: per-tensor 1/2/4/6/8-bit recipes keep macOS 14 / iOS 17 (the opset
# Apple's recipes target); 3-bit and grouped LUTs exist from macOS 15 / iOS 18 on (spec version 9).
TARGETS = {False: "macOS14", True: "macOS15"}
IOS18_SPEC_VERSION = 9


@dataclass(frozen=True)
class BaseModel:
    """The float16 Core ML UNet that recipes are applied to, and the digests of its consts."""

    path: str
    converted: bool  # False: the user's own .mlpackage
    cached: bool  # True: reused from an earlier conversion
    consts: dict[str, str]  # const op name -> value digest (every const)
    weights: dict[str, tuple[str, tuple[int, ...]]]  # float16 tensor consts -> (content digest, shape)
    seconds: float


def capture_inputs(pipe, runner) -> tuple[DenoiserInputs, torch.Tensor]:
    """Run the signal once; return the first denoiser call's inputs and the output latents."""
    from workers.denoiser import denoiser_of

    denoiser, calls = denoiser_of(pipe), []

    def hook(_module, args, kwargs):
        if not calls:
            calls.append(flatten_call(denoiser.forward, args, kwargs))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        latents = runner.run()
    finally:
        handle.remove()
    if not calls:
        raise CoreMLError(f"the pipeline never called its {type(denoiser).__name__} during the signal run")
    return calls[0], latents


class _DenoiserForCoreML(torch.nn.Module):
    """Positional inputs -> the denoiser's first output: the signature torch.jit.trace needs."""

    def __init__(self, denoiser, inputs: DenoiserInputs):
        super().__init__()
        self.denoiser, self.inputs = denoiser, inputs

    def forward(self, *tensors):
        return self.denoiser(**self.inputs.call_kwargs(tensors), return_dict=False)[0]


def convert_denoiser(denoiser, inputs: DenoiserInputs, path: str | os.PathLike, ios18: bool = False) -> None:
    """Trace ``denoiser`` in float32 on the CPU and save it as a float16 ML program at ``path``
    (minimum deployment target macOS 14, or macOS 15 / iOS 18 for 3-bit and grouped formats)."""
    import coremltools as ct

    quiet_coremltools()
    params = list(denoiser.parameters())
    if params and (params[0].device.type != "cpu" or params[0].dtype != torch.float32):
        denoiser = copy.deepcopy(denoiser).to("cpu", torch.float32)
    example = tuple(torch.from_numpy(a) for a in inputs.arrays)
    wrapper = _DenoiserForCoreML(denoiser, inputs).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape asserts
            traced = torch.jit.trace(wrapper, example, strict=False, check_trace=False)
            model = ct.convert(
                traced, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                minimum_deployment_target=getattr(ct.target, TARGETS[ios18]), skip_model_load=True,
                inputs=[ct.TensorType(name=n, shape=a.shape, dtype=np.float32)
                        for n, a in zip(inputs.names, inputs.arrays)],
                outputs=[ct.TensorType(name=OUTPUT_NAME)])
    except Exception as exc:
        raise CoreMLError(f"Core ML conversion of the {type(denoiser).__name__} failed: "
                          f"{first_line(exc, ERROR_CHARS)}") from None
    save_package(model, path)


def save_package(model, path: str | os.PathLike) -> None:
    """Save next to ``path`` then rename, so a crash never leaves a half-written package."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        model.save(str(tmp / path.name))
        publish_dir(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_key(fingerprint: str, inputs: DenoiserInputs, ios18: bool = False) -> str:
    import coremltools as ct

    key = {"fingerprint": fingerprint, "inputs": inputs.shapes(), "coremltools": ct.__version__, "format": BASE_FORMAT}
    if ios18:  # (the macOS 14 key stays what it was, so earlier cached conversions are reused)
        key["target"] = TARGETS[True]
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_base_model(denoiser, fingerprint: str, inputs: DenoiserInputs, cache_dir: str | os.PathLike,
                      ios18: bool = False) -> BaseModel:
    """The converted UNet for these weights and input shapes, converting only on a cache miss.

    ``cache_dir/unet-<key>.mlpackage`` plus ``unet-<key>.json`` (written last, with the const
    digests the structural validation compares against): a package without its sidecar is
    an interrupted conversion and is redone.
    """
    t0 = time.perf_counter()
    key = _cache_key(fingerprint, inputs, ios18)
    path = Path(cache_dir) / f"unet-{key}.mlpackage"
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
        if path.is_dir() and meta.get("key") == key:
            weights = {k: (d, tuple(s)) for k, (d, s) in meta["weights"].items()}
            return BaseModel(str(path), True, True, meta["consts"], weights, time.perf_counter() - t0)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    convert_denoiser(denoiser, inputs, path, ios18)
    consts, weights = describe_program(read_program(path))
    atomic_write_text(sidecar, json.dumps({"key": key, "fingerprint": fingerprint, "inputs": inputs.shapes(),
                                           "consts": consts, "weights": weights}))
    return BaseModel(str(path), True, False, consts, weights, time.perf_counter() - t0)


def spec_version(path: str | os.PathLike) -> int:
    """The package's Core ML specification version (9 and up: iOS 18 / macOS 15)."""
    from workers.coreml.common import load_mlmodel

    return int(load_mlmodel(path).get_spec().specificationVersion)


def user_base_model(path: str | os.PathLike) -> BaseModel:
    """A UNet .mlpackage the user already has (e.g. from Apple's torch2coreml)."""
    t0 = time.perf_counter()
    consts, weights = describe_program(read_program(path))
    return BaseModel(str(Path(path).resolve()), False, False, consts, weights, time.perf_counter() - t0)


def load_base_model(path: str | os.PathLike) -> BaseModel:
    """A base package recorded in a manifest: our cached conversion (its sidecar) or the user's."""
    sidecar = Path(path).with_suffix(".json")
    if Path(path).is_dir() and sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
            weights = {k: (d, tuple(s)) for k, (d, s) in meta["weights"].items()}
            return BaseModel(str(path), True, True, meta["consts"], weights, 0.0)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return user_base_model(path)
