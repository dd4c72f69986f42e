"""The Core ML worker: apply recipes to a Core ML UNet and validate them, as one Ray task.

Macs join the Ray cluster with the custom resource ``coreml`` (``ray start ... --resources
'{"coreml": 1}'``) and the task requires it; ``coreml_node="any"`` lets it run on any node,
which then does everything except Core ML prediction (macOS only). ``run_job`` is a plain
function (tests and the driver can call it in-process); it never touches the database and
returns plain frozen dataclasses for the driver to store.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common.errors import first_line, typed_line
from common.formats import LayerSizes, average_bits, is_palettized
from workers.coreml.common import CoreMLError, LayerMatch, listing, match_layers, package_size, read_program
from workers.coreml.apply import (Manifest, layer_luts, needs_ios18, package_name, palettize, read_manifest,
                                  torch_weights, write_manifest)
from workers.coreml.convert import (IOS18_SPEC_VERSION, BaseModel, capture_inputs, ensure_base_model,
                                    load_base_model, spec_version, user_base_model)
from workers.coreml.validate import check_numeric, check_runtime, check_structure
from workers.evaluation.items import EvaluatorSettings

COREML_RESOURCE = "coreml"
NODE_CHOICES = ("coreml", "any")
BASE_DIR = ".base"  # converted base models are cached under the output directory


@dataclass(frozen=True)
class RecipeJob:
    key: str
    bits: dict | None  # {layer: format}; None (validate): the formats recorded in the package's manifest
    avg_bits: float | None
    measured_psnr: float | None  # the search's end-to-end PSNR; None for recipes made elsewhere
    mlpackage: str | None = None  # validate: the package to check


@dataclass(frozen=True)
class CoreMLJob:
    action: str  # "apply" | "validate"
    search_id: str
    model: str  # the torch model being compressed (a resolve_model name)
    fingerprint: str | None  # its required UNet fingerprint (the search's), None: not checked
    evaluation: EvaluatorSettings  # the search's signal protocol, precision and min_size
    recipes: tuple[RecipeJob, ...]
    palettes: dict = field(default_factory=dict)  # {(layer, bits): Palette}, the search's exact LUTs
    lut_source: str = "search"  # "search": palettes above; "kmeans": workers.palettize.kmeans_lut
    out_dir: str = ""
    mlpackage: str | None = None  # the user's float16 UNet package (None: convert the torch UNet)
    device: str | None = None  # torch device of the numeric check (None: as the search's evaluators)
    weights: object = None  # workers.weights.WeightsManifest: the model's files shipped by the driver
    spec: object = None  # the driver's workers.models.ModelSpec, with ``weights`` (None: resolve ``model`` here)
    bundle: object = None  # action "bundle": workers.coreml.bundle.build.BundleJob
    model_options: dict = field(default_factory=dict)  # resolve_model's LoRAs / --config of a single file


@dataclass(frozen=True)
class RecipeOutcome:
    key: str
    mlpackage: str
    size_bytes: int
    avg_bits: float
    palettized_layers: int
    lut_source: str
    structural_ok: bool
    structural_detail: str
    numeric_psnr: float | None
    measured_psnr: float | None  # what numeric_psnr was compared with
    numeric_ok: bool | None
    numeric_detail: str
    runtime: dict[str, float] | None
    runtime_note: str
    seconds: float


@dataclass(frozen=True)
class JobResult:
    node: str
    base_mlpackage: str | None
    base_converted: bool
    base_cached: bool
    outcomes: tuple[RecipeOutcome, ...]
    seconds: float
    bundles: tuple = ()  # workers.coreml.bundle.build.BundleResult, for action "bundle"


def _evaluator(job: CoreMLJob):
    from workers.evaluation.evaluator import Evaluator
    from workers.models import resolve_model

    settings = job.evaluation
    return Evaluator(job.spec or resolve_model(job.model, **job.model_options), settings.signal, precision=settings.precision,
                     fingerprint=job.fingerprint, device=job.device, min_size=settings.min_size, weights=job.weights)


def _check(ev, package: Path, base: BaseModel, luts, recipe: RecipeJob, avg_bits: float, lut_source: str,
           t0: float) -> RecipeOutcome:
    program = read_program(package)
    source = "search's" if lut_source == "search" else "k-means (kmeans_lut)"
    structural, dense = check_structure(program, base.consts, luts, source)
    del program
    if len(dense) == len(luts):
        numeric = check_numeric(ev, dense, recipe.measured_psnr)
        n_psnr, n_ok, n_detail = numeric.psnr, numeric.ok, numeric.detail
    else:
        n_psnr, n_ok, n_detail = None, False, "not run: some palettized weights cannot be decompressed"
    runtime = check_runtime(ev, str(package))
    return RecipeOutcome(recipe.key, str(package), package_size(package), float(avg_bits), len(luts), lut_source,
                         structural.ok, structural.detail, n_psnr, recipe.measured_psnr, n_ok, n_detail,
                         runtime.psnr, runtime.note,
                         time.perf_counter() - t0)


def _average_bits(unet, bits: dict[str, int], min_size: int) -> float:
    """Apple's average over the model's candidates (absent ones at 16) and the recipe's layers."""
    from workers.models import candidate_layers

    shapes = {c.name: tuple(c.shape) for c in candidate_layers(unet, min_size)}
    for layer in bits:
        if layer not in shapes:
            shapes[layer] = tuple(unet.get_submodule(layer).weight.shape)
    sizes = LayerSizes({l: int(np.prod(s)) for l, s in shapes.items()}, {l: s[0] for l, s in shapes.items()})
    return average_bits(bits, sizes)


def _bases(job: CoreMLJob, ev, fingerprint: str, targets: set[bool]) -> dict[bool, BaseModel]:
    """The float16 package per deployment target needed ({needs iOS 18: base}): the user's one,
    which must be new enough for 3-bit / grouped recipes, or conversions of the torch UNet."""
    if job.mlpackage:
        base = user_base_model(job.mlpackage)
        version = spec_version(job.mlpackage)
        late = [r for r in job.recipes if needs_ios18(r.bits)]
        if late and version < IOS18_SPEC_VERSION:
            raise CoreMLError(f"recipe {late[0].key} uses {', '.join(needs_ios18(late[0].bits))}, which Core ML has "
                              f"from iOS 18 / macOS 15 on, but {Path(job.mlpackage).name} targets an older OS "
                              f"(specification version {version}); convert it with minimum_deployment_target iOS18")
        return {t: base for t in targets}
    inputs, _ = capture_inputs(ev.pipe, ev.runner)
    return {t: ensure_base_model(ev.denoiser, fingerprint, inputs, Path(job.out_dir) / BASE_DIR, t)
            for t in sorted(targets)}


def apply_job(job: CoreMLJob, ev, fingerprint: str) -> tuple[BaseModel, list[RecipeOutcome]]:
    if job.lut_source not in ("search", "kmeans"):
        raise CoreMLError(f"unknown LUT source {job.lut_source!r}")
    out_dir = Path(job.out_dir)
    unet = ev.denoiser
    absent = sorted({l for r in job.recipes for l in r.bits if not _has_weight(unet, l)})
    if absent:
        raise CoreMLError(f"{len(absent)} recipe layers are not weight layers of the model being compressed "
                          f"({job.model}): {listing(absent)}")
    min_size = job.evaluation.min_size
    job = replace(job, recipes=tuple(r if r.avg_bits is not None else
                                     replace(r, avg_bits=_average_bits(unet, r.bits, min_size))
                                     for r in job.recipes))
    wanted = {r.key: {l: b for l, b in r.bits.items() if is_palettized(b)} for r in job.recipes}
    weights = torch_weights(unet, sorted({l for layers in wanted.values() for l in layers}))
    late = {r.key: bool(needs_ios18(r.bits)) for r in job.recipes}  # 3-bit / grouped: iOS 18 target
    bases = _bases(job, ev, fingerprint, set(late.values()))
    matches = {t: match_layers(weights, b.weights, where=Path(b.path).name) for t, b in bases.items()}
    palettes = job.palettes if job.lut_source == "search" else None
    plans = [(r, layer_luts({l: weights[l] for l in wanted[r.key]}, r.bits, matches[late[r.key]], palettes))
             for r in job.recipes]  # all LUTs first: a missing palette fails before any output
    outcomes = []
    for recipe, luts in plans:
        t0 = time.perf_counter()
        package, base = out_dir / f"{package_name(recipe.key)}.mlpackage", bases[late[recipe.key]]
        palettize(base.path, package, luts, weights)
        write_manifest(package, Manifest(
            recipe.key, job.search_id, dict(recipe.bits), float(recipe.avg_bits), job.lut_source, job.model,
            fingerprint, base.path, {e.layer: c for c, e in luts.items()},
            {e.layer: e.palette_digest for e in luts.values() if e.palette_digest}, recipe.measured_psnr))
        outcomes.append(_check(ev, package, base, luts, recipe, recipe.avg_bits, job.lut_source, t0))
    return bases[min(bases)], outcomes


def _has_weight(unet, layer: str) -> bool:
    try:
        return isinstance(getattr(unet.get_submodule(layer), "weight", None), torch.Tensor)
    except AttributeError:
        return False


def _validate(job: CoreMLJob, ev, fingerprint: str) -> list[RecipeOutcome]:
    outcomes = []
    for recipe in job.recipes:
        t0 = time.perf_counter()
        package = Path(recipe.mlpackage or "")
        if not package.is_dir():
            raise CoreMLError(f"{package} does not exist on node {socket.gethostname()}; re-apply the recipe "
                              "or pass --dir with the folder that holds the packages")
        m = read_manifest(package)
        if m.fingerprint != fingerprint:
            raise CoreMLError(f"{package.name} was applied to another UNet ({m.model}); validate it with --model "
                              f"{m.model}")
        if recipe.bits is not None and m.lut_source == "search" and recipe.bits != m.bits:
            raise CoreMLError(f"{package.name} holds other bits than recipe {recipe.key} has now; re-apply it")
        weights = torch_weights(ev.denoiser, sorted(m.layers))
        matches = {l: LayerMatch(l, c, ()) for l, c in m.layers.items()}
        palettes = job.palettes if m.lut_source == "search" else None
        if palettes is not None:
            stale = [l for l, d in m.palette_digests.items()
                     if (l, m.bits[l]) in palettes and palettes[(l, m.bits[l])].digest != d]
            if stale:
                raise CoreMLError(f"{package.name} was made with other palettes than the search stores now: "
                                  f"{', '.join(stale[:3])}")
        luts = layer_luts(weights, m.bits, matches, palettes)
        base = load_base_model(m.base_mlpackage)
        if recipe.measured_psnr is None and m.measured_psnr is not None:
            recipe = replace(recipe, measured_psnr=m.measured_psnr)
        outcomes.append(_check(ev, package, base, luts, recipe, m.avg_bits, m.lut_source, t0))
    return outcomes


def run_job(job: CoreMLJob) -> JobResult:
    """Apply (or re-validate) recipes; everything the driver stores comes back in the result."""
    from workers.models import denoiser_fingerprint

    t0 = time.perf_counter()
    if job.action not in ("apply", "validate", "bundle"):
        raise CoreMLError(f"unknown Core ML job action {job.action!r}")
    ev = _evaluator(job)
    if job.action == "bundle":
        from workers.coreml.bundle.build import build_bundle

        result = build_bundle(job.bundle, ev)
        return JobResult(socket.gethostname(), None, True, False, (), time.perf_counter() - t0, (result,))
    fingerprint = job.fingerprint or denoiser_fingerprint(ev.denoiser)
    if job.action == "apply":
        base, outcomes = apply_job(job, ev, fingerprint)
        return JobResult(socket.gethostname(), base.path, base.converted, base.cached, tuple(outcomes),
                         time.perf_counter() - t0)
    outcomes = _validate(job, ev, fingerprint)
    return JobResult(socket.gethostname(), None, False, False, tuple(outcomes), time.perf_counter() - t0)


def submit(job: CoreMLJob, coreml_node: str = "coreml"):
    """Start ``run_job`` as a Ray task; it needs the ``coreml`` resource unless coreml_node is 'any'."""
    import ray

    if coreml_node not in NODE_CHOICES:
        raise CoreMLError(f"--coreml-node must be one of {', '.join(NODE_CHOICES)}, got {coreml_node!r}")
    options = dict(num_cpus=1, max_retries=0)
    if coreml_node == "coreml":
        options["resources"] = {COREML_RESOURCE: 1}
    return ray.remote(run_job).options(**options).remote(job)


def run_remote(job: CoreMLJob, coreml_node: str = "coreml") -> JobResult:
    """``submit`` and wait; a failure in the task comes back as its own exception (one line)."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(submit(job, coreml_node))
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception) and not isinstance(cause, RayError):
            if type(cause).__module__.startswith(("workers.", "search.", "storage.")):
                raise cause from None
            raise CoreMLError(f"the Core ML task failed: {typed_line(cause, 300)}") from None
        raise CoreMLError(f"the Core ML task failed: {first_line(exc, 300)}") from None
    except RayError as exc:
        raise CoreMLError(f"the Core ML task could not run: {first_line(exc, 300)}") from None
