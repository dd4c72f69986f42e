"""Build one Resources folder that Apple's Swift pipeline loads: a recipe's palettized denoiser on
Apple's contract (optionally in two chunks), the text encoders, the VAE and the tokenizer.

The folder is built in ``<DIR>.partial`` next to ``DIR`` and renamed into place when complete, so a
folder named ``DIR`` is always whole. Each component is saved atomically and converted one at a
time (the converted copy freed before the next: Apple's users run out of memory on SDXL), so a
build that is killed resumes component by component when run again with the same options.
The denoiser is palettized with exactly the search's LUTs and indices (``workers.coreml.apply``)
and checked structurally and numerically as `search apply` checks its packages; on macOS every
package is also compiled (``.mlmodelc``, what ``resourcesAt:`` loads).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.files import atomic_write_text, publish_dir
from common.formats import formats_json, is_palettized
from workers.coreml.apply import layer_luts, needs_ios18, palettize, torch_weights
from workers.coreml.bundle import manifest
from workers.coreml.bundle.contract import (NO_SWIFT_PIPELINE, BundleOptions, bundle_family, denoiser_name,
                                            text_encoder_names)
from workers.coreml.common import CoreMLError, describe_program, match_layers, read_program
from workers.coreml.validate import check_numeric, check_structure

STATE_FILE = ".bundle-state.json"  # in the .partial folder: the options its components were built with
COMPILE_NOTE = ("Compile on a Mac before use (Swift's resourcesAt: loads .mlmodelc): "
                "for f in *.mlpackage; do xcrun coremlcompiler compile \"$f\" .; done && rm -r *.mlpackage\n")


@dataclass(frozen=True)
class BundleJob:
    """One recipe of one search, as the Core ML worker needs it (plain data; no database)."""

    search_id: str
    model: str
    fingerprint: str
    recipe_key: str
    bits: dict  # {layer: format}, the recipe (16 included)
    measured_psnr: float | None
    palettes: dict  # {(layer, format): Palette}: the search's exact LUTs
    options: BundleOptions
    out_dir: str  # the Resources folder to create
    model_version: str = ""  # what the search says it searched (Hub id, path, built-in name)
    cache_dir: str = ""  # parts shared by recipes (float16 denoiser, encoders, VAE) kept here ("": none)


def _cache(job: BundleJob) -> Path | None:
    """Where the recipe-independent parts of this model and these options are kept across
    recipes (the Core ML phase's 'all' converts each once), or None."""
    if not job.cache_dir:
        return None
    key = json.dumps({"fingerprint": job.fingerprint, "options": asdict(job.options)}, sort_keys=True)
    return Path(job.cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # packages are never changed in place: one file on disk for the cache and the folder
    except OSError:
        shutil.copy2(src, dst)


def _copy_package(src: Path, dst: Path) -> None:
    """``src`` as ``dst``, built aside and renamed into place (never half there)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        shutil.copytree(src, tmp / dst.name, copy_function=_link_or_copy)
        publish_dir(tmp / dst.name, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STEPS = {"stream": None}  # where the step lines go (None: stderr); `search bundle` points it at the terminal


@contextlib.contextmanager
def _step(label: str):
    """One line per step: SDXL's steps take minutes each, and a user should see which one is running
    and how long each took."""
    stream = STEPS["stream"] or sys.stderr
    print(f"bundle: {label} ...", file=stream, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"bundle: {label} done in {time.perf_counter() - t0:.1f} s", file=stream, flush=True)


def _kept(cache: Path | None, target: Path, convert) -> None:
    """``target`` (a package) from the cache, else made by ``convert(target)`` and kept there."""
    if target.is_dir():
        return
    kept = cache / target.name if cache is not None else None
    if kept is not None and kept.is_dir():
        _copy_package(kept, target)
        return
    with _step(f"converting {target.stem}"):
        convert(target)
    gc.collect()
    if kept is not None:
        _copy_package(target, kept)


@dataclass(frozen=True)
class BundleResult:
    path: str
    family: str
    files: tuple[manifest.FileEntry, ...]
    total_bytes: int
    deployment_target: str
    palettized_layers: int
    structural_ok: bool
    structural_detail: str
    numeric_psnr: float | None
    numeric_ok: bool | None
    numeric_detail: str
    compiled: bool
    seconds: float
    notes: tuple[str, ...] = ()


def _partial_dir(final: Path, options: BundleOptions, key: str) -> Path:
    """The folder being built; a stale one built with other options (or another recipe) is wiped."""
    partial = final.with_name(final.name + ".partial")
    state = {"options": asdict(options), "recipe": key}
    try:
        if json.loads((partial / STATE_FILE).read_text()) != json.loads(json.dumps(state)):
            shutil.rmtree(partial)
    except (OSError, ValueError):
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_text(partial / STATE_FILE, json.dumps(state))
    return partial


def _cpu32(module):
    """A float32 CPU copy of ``module`` for tracing (the evaluator's may be float16 or on a GPU)."""
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cpu" and p.dtype == torch.float32:
        return module
    return copy.deepcopy(module).to("cpu", torch.float32)


def check_target(options: BundleOptions, family_name: str | None) -> None:
    """Refuse what cannot be built here, before any work (one line each; family None: not known yet)."""
    if options.compile and sys.platform != "darwin":
        raise CoreMLError(f"--compile needs macOS (Core ML's compiler), and this node runs {sys.platform}; "
                          "build without it and compile on a Mac (the folder's README.txt has the command)")
    if family_name in NO_SWIFT_PIPELINE:
        raise CoreMLError(f"{family_name} models have no pipeline in Apple's Swift package, so there is no Resources "
                          "folder to build; use `search apply` for a Core ML package of the denoiser")


def latent_hw(denoiser, options: BundleOptions) -> tuple[int, int]:
    """The latent size the denoiser and the VAE are converted at: the option, else the model's own."""
    if options.latent_size is not None:
        return options.latent_size
    size = denoiser.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _denoiser(job: BundleJob, ev, family: str, partial: Path) -> tuple[str, list[Path], object, int]:
    """Convert, palettize with the search's LUTs, check, optionally chunk: (target, packages, checks, n)."""
    from workers.coreml.bundle.chunk import chunk_package
    from workers.coreml.bundle.chunk_check import check_chunks
    from workers.coreml.bundle.denoiser import convert_apple_denoiser

    name = denoiser_name(family)
    ios18 = bool(needs_ios18(job.bits))
    target = "macOS15" if ios18 else "macOS13"
    whole = partial / f"{name}.mlpackage"
    chunks = [partial / f"{name}Chunk1.mlpackage", partial / f"{name}Chunk2.mlpackage"]
    cache = _cache(job)
    base = cache / f"{name}-{target}.mlpackage" if cache is not None else partial / ".base" / f"{name}.mlpackage"
    wanted = {l: b for l, b in job.bits.items() if is_palettized(b)}
    weights = torch_weights(ev.denoiser, sorted(wanted))
    if not base.is_dir():
        # Copied without the evaluator's prefix-cache dispatchers: a copy's forwards would call the original's.
        with _step(f"converting {name} ({job.options.attention})"), \
                ev.prefix.detached() if getattr(ev, "prefix", None) is not None else contextlib.nullcontext():
            convert_apple_denoiser(_cpu32(ev.denoiser), family, job.options, base, ios18)
        gc.collect()
    consts, fp16 = describe_program(read_program(base))
    matches = match_layers(weights, fp16, where=f"the converted {name}")
    luts = layer_luts(weights, job.bits, matches, job.palettes)
    if not whole.is_dir():
        with _step(f"palettizing {len(luts)} layers of {name} with the search's LUTs"):
            palettize(base, whole, luts, weights)
    structural, dense = check_structure(read_program(whole), consts, luts, "search's")
    if len(dense) == len(luts):
        with _step("numeric check (the search's signal with the package's weights)"):
            numeric = check_numeric(ev, dense, job.measured_psnr)
    else:
        numeric = None
    packages = [whole]
    if job.options.chunk:
        if not all(c.is_dir() for c in chunks):
            with _step(f"cutting {name} in two chunks"):
                chunk_package(whole, partial, name)
        problems = check_chunks(whole, *chunks)
        if problems:
            raise CoreMLError(f"the chunks of {name} are wrong: {'; '.join(problems[:3])}")
        shutil.rmtree(whole)  # Swift uses the chunks when both exist; the whole would be dead weight
        packages = chunks
    shutil.rmtree(partial / ".base", ignore_errors=True)
    return target, packages, (structural, numeric), len(luts)


def _others(job: BundleJob, ev, family: str, hw: tuple[int, int], partial: Path) -> list[str]:
    """Text encoders, VAE decoder and encoder, tokenizer files: each converted unless already there.
    Returns notes for the user (what was left out, and why)."""
    from workers.coreml.bundle import components

    nbits, notes = job.options.encoders_nbits, []
    cache = _cache(job)
    for name in text_encoder_names(family):
        _kept(cache, partial / f"{name}.mlpackage",
              lambda path, name=name: components.convert_text_encoder(ev.pipe, family, name, path, nbits))
    vae = _cpu32(ev.pipe.vae)
    _kept(cache, partial / "VAEDecoder.mlpackage",
          lambda path: components.convert_vae_decoder(vae, family, hw, path, nbits))
    if not components.swift_can_encode(vae):
        notes.append("VAEEncoder left out: Swift's Encoder assumes 4 latent channels and no shift factor, so this "
                     "VAE cannot encode images there (Swift treats the encoder as optional: image-to-image only)")
    else:
        _kept(cache, partial / "VAEEncoder.mlpackage",
              lambda path: components.convert_vae_encoder(vae, family, hw, path, nbits))
    del vae
    notes += list(components.write_tokenizer(ev.pipe, family, partial).notes)
    return notes


def _compile_all(partial: Path) -> None:
    """macOS: every .mlpackage becomes the .mlmodelc that Swift loads (the package is removed)."""
    import coremltools as ct

    for package in sorted(partial.glob("*.mlpackage")):
        target = partial / f"{package.stem}.mlmodelc"
        shutil.rmtree(target, ignore_errors=True)
        ct.utils.compile_model(str(package), str(target))
        shutil.rmtree(package)


def build_bundle(job: BundleJob, ev) -> BundleResult:
    """Build the Resources folder of ``job`` with the evaluator ``ev`` (its pipeline and signal protocol)."""
    t0 = time.perf_counter()
    spec = ev.spec
    family = bundle_family(spec.family, spec.img2img)
    check_target(job.options, family)
    final = Path(job.out_dir).expanduser().resolve()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise CoreMLError(f"{final} exists and is not empty; give a new folder for the bundle")
    partial = _partial_dir(final, job.options, job.recipe_key)
    hw = latent_hw(ev.denoiser, job.options)
    target, packages, (structural, numeric), n = _denoiser(job, ev, family, partial)
    notes = _others(job, ev, family, hw, partial)
    if job.options.compile:
        with _step("compiling every model to .mlmodelc"):
            _compile_all(partial)
    else:
        atomic_write_text(partial / "README.txt", COMPILE_NOTE)
    (partial / STATE_FILE).unlink(missing_ok=True)
    files = manifest.list_files(partial)
    data = manifest.BundleManifest(
        model=job.model, model_version=job.model_version, fingerprint=job.fingerprint, search_id=job.search_id,
        recipe_key=job.recipe_key, family=family, formats=formats_json(job.bits), attention=job.options.attention,
        latent_size=list(hw), batch=job.options.batch, chunked=job.options.chunk,
        encoders_nbits=job.options.encoders_nbits, deployment_target=target, compiled=job.options.compile,
        palettized_layers=n, files=[asdict(f) for f in files], total_bytes=sum(f.bytes for f in files),
        notes=notes)
    manifest.write(partial, data)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        final.rmdir()  # empty (checked above)
    publish_dir(partial, final)
    return BundleResult(str(final), family, tuple(files), data.total_bytes, target, n, structural.ok,
                        structural.detail, numeric.psnr if numeric else None, numeric.ok if numeric else False,
                        numeric.detail if numeric else "not run: some palettized weights cannot be decompressed",
                        job.options.compile, time.perf_counter() - t0, tuple(notes))
