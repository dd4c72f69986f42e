"""Driver side of `search bundle`: one recipe of a search as a Resources folder for Apple's Swift pipeline.

Reads the search's recipe and its exact palettes (``coreml_jobs``), runs the Core ML worker with
action ``bundle`` (a Ray task on the ``coreml`` node, or any node off a cluster), and stores one
``BundleInfo`` row per recipe: what `search status` and the dashboard show. Errors are
``ApplyError`` with one line; the search's own data is only read.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from common.formats import is_palettized
from search.driver.coreml_jobs import (ApplyError, Executor, evaluator_settings, load_search, node_choice,
                                       run_on_node, select_keys, stored_palettes)
from storage import Storage
from storage.coreml_store import CoreMLStore
from storage.records import BundleInfo
from workers.coreml.bundle.build import BundleJob, BundleResult, check_target
from workers.coreml.bundle.contract import BundleOptions
from workers.coreml.task import CoreMLJob
from workers.models import model_options


def _one_recipe(storage: Storage, search_id: str, recipe: str | None):
    """The search and the one stored recipe a bundle is built from; ApplyError (one line) otherwise."""
    search = load_search(storage, search_id)
    stored = {r.key: r for r in storage.recipes(search.id)}
    if not stored:
        raise ApplyError(f"search {search.id} has no recipes yet (status {search.status}); finish it with "
                         f"`search resume {search.id}`")
    keys = select_keys(stored, recipe, f"search {search.id}")
    if len(keys) != 1:
        raise ApplyError("a bundle holds one recipe: pass --recipe KEY (one of: " + ", ".join(stored) + ")")
    return search, stored[keys[0]]


@dataclass(frozen=True)
class CoreAIReport:
    search_id: str
    recipe_key: str
    result: object  # workers.coreai.bundle.CoreAIResult


def bundle_coreai(storage: Storage, search_id: str, *, recipe: str | None, out_dir: str | os.PathLike,
                  compare_4bit: bool = True, device: str | None = None) -> CoreAIReport:
    """`search bundle --target coreai`: one recipe as the folder Apple's Core AI exporter writes,
    built and checked in this process (the Linux Core AI runtime runs the denoiser); the search's
    data is only read, one `CoreAIBundleInfo` row (its checks and table) is written. Refusals (no extra installed, 3-bit layers, a family Apple does not export,
    a busy folder) are one-line ``ApplyError``s before any work."""
    from workers import coreai
    from workers.coreai.layout import check_formats, pipeline_type

    try:
        coreai.require()
    except coreai.CoreAIError as exc:
        raise ApplyError(str(exc)) from None
    search, r = _one_recipe(storage, search_id, recipe)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ApplyError(f"{out} exists and is not empty; give a new folder for the bundle")
    from workers.models import resolve_model

    try:
        check_formats(r.bits)
        spec = resolve_model(search.model, **model_options(search.config))
        pipeline_type(spec.family, spec.img2img)
    except coreai.CoreAIError as exc:
        raise ApplyError(str(exc)) from None
    palettes = stored_palettes(storage, search, {(l, b) for l, b in r.bits.items() if is_palettized(b)})
    from workers.coreai.bundle import CoreAIJob, build
    from workers.evaluation.evaluator import Evaluator

    settings = evaluator_settings(search)
    ev = Evaluator(spec, settings.signal, precision=settings.precision, fingerprint=search.fingerprint,
                   device=device, min_size=settings.min_size)
    job = CoreAIJob(search.id, search.model, search.fingerprint, r.key, dict(r.bits), r.avg_bits, r.psnr, palettes,
                    str(out), search.model_version, compare_4bit)
    try:
        result = build(job, ev)
    except coreai.CoreAIError as exc:
        raise ApplyError(str(exc)) from None
    from storage.coreai_store import CoreAIStore, from_result

    ok = result.luts_ok and result.runtime_ok is not False  # its checks and table, as `search status` shows them
    CoreAIStore(storage).put(search.id, from_result(r.key, result, status="built" if ok else "failed",
                                                    path=result.path, node=socket.gethostname()))
    return CoreAIReport(search.id, r.key, result)


@dataclass(frozen=True)
class BundleReport:
    search_id: str
    node: str
    result: BundleResult
    info: BundleInfo


def summary(r: BundleResult) -> str:
    """One line of the checks, as stored and shown."""
    numeric = r.numeric_detail if r.numeric_ok is not None else "numeric check not run"
    return (f"{r.palettized_layers} layers with the search's LUTs ({'ok' if r.structural_ok else 'FAILED'}); "
            f"{numeric}; {'compiled' if r.compiled else 'not compiled (off macOS)'}")


def _here(job: CoreMLJob, _node: str):
    """Run the Core ML worker in this process, its libraries' progress bars and warnings silenced
    (as in a Ray task), the bundle's own step lines kept on the terminal."""
    from workers.coreml.bundle import build
    from workers.coreml.task import run_job

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    build.STEPS["stream"] = terminal
    try:
        for fd in saved:
            os.dup2(devnull, fd)
        return run_job(job)
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
        build.STEPS["stream"] = None
        terminal.close()


def bundle_recipe(storage: Storage, search_id: str, *, recipe: str | None, out_dir: str | os.PathLike,
                  options: BundleOptions, coreml_node: str | None = None, ray_address: str | None = None,
                  execute: Executor | None = None) -> BundleReport:
    """Build the Resources folder of one recipe of a finished (or partly finished) search; store its row."""
    node = node_choice(coreml_node, ray_address)
    search, r = _one_recipe(storage, search_id, recipe)
    try:
        check_target(options, None)
    except Exception as exc:  # CoreMLError: refused before any work
        raise ApplyError(str(exc)) from None
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ApplyError(f"{out} exists and is not empty; give a new folder for the bundle")
    palettes = stored_palettes(storage, search, {(l, b) for l, b in r.bits.items() if is_palettized(b)})
    bundle = BundleJob(search.id, search.model, search.fingerprint, r.key, dict(r.bits), r.psnr, palettes, options,
                       str(out), search.model_version)
    job = CoreMLJob("bundle", search.id, search.model, search.fingerprint, evaluator_settings(search), (),
                    bundle=bundle, model_options=model_options(search.config))
    if execute is None and node == "any" and not (ray_address or os.environ.get("RAY_ADDRESS")):
        execute = _here  # no cluster: build in this process (no Ray start-up; its step lines reach the terminal)
    result = run_on_node(execute, job, node, ray_address).bundles[0]
    ok = result.structural_ok and result.numeric_ok is not False
    info = BundleInfo(r.key, "built" if ok else "failed", summary(result), result.path, result.total_bytes, "",
                      asdict(options), socket.gethostname() if node == "any" else node, result.seconds)
    CoreMLStore(storage).put_bundle(search.id, info)
    return BundleReport(search.id, info.node, result, info)
