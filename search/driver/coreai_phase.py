"""The ``coreml`` phase of a search submitted with ``--target coreai``, or asked for Core AI by a
request (`search apply ID --target coreai`, ``POST /searches/{id}/coreml`` with ``target``; issue
36): each asked recipe becomes the folder Apple's Core AI exporter writes, built and checked on a
node (the worker is the Core ML phase's, `workers.coreai.worker.CoreAIWorker`; Core AI runs on
Linux, so any node), zipped there and pulled to the head's package store as ``<key>.coreai.zip``
in pieces, exactly as Core ML bundles are (`search.driver.coreml_phase`: its start, wait,
heartbeat, stop and shipping are reused here, not copied). One `CoreAIBundleInfo` row per recipe
holds the checks (LUTs bit for bit, the runtime PSNR against the search's measured one) and the
comparison with Apple's 4bit preset (unless the request said no). A recipe with 3-bit layers is
refused in one line (a failed row saying why) and the others build.

Resuming is running again: a recipe whose zip is stored whole is not built again; one that failed
is stored as failed with why, and built again on resume. Only the driver writes the database.
"""
from __future__ import annotations

import ray

from search.driver.coreml_jobs import require_node
from storage.coreai_store import CoreAIStore, compares_4bit, failed, from_result, job_target, search_target
from storage.package_store import COREAI_SUFFIX, PackageStore

PHASE = "coreml"  # the same phase (and job row) as Core ML: what it builds is the search's target


def is_coreai(search, storage=None) -> bool:
    """Whether the search's Core ML phase builds Core AI folders: the target its last request named
    (`search apply ID --target coreai --server URL`), else its config's (`search submit --target coreai`)."""
    return (job_target(storage, search) if storage is not None else search_target(search)) == "coreai"


def refusals(recipes: dict, keys: list[str]) -> dict[str, str]:
    """The asked recipes Core AI cannot export (3-bit layers), each with its one-line why; the
    others still build (a search submitted for Core ML may hold 3-bit recipes)."""
    from workers.coreai import CoreAIError
    from workers.coreai.layout import check_formats

    why = {}
    for key in keys:
        try:
            check_formats(recipes[key].bits)
        except CoreAIError as exc:
            why[key] = str(exc)
    return why


def shipped_keys(storage, packages: PackageStore, search_id: str) -> set[str]:
    """Recipes whose Core AI zip is stored whole on the head."""
    return {k for k, b in CoreAIStore(storage).bundles(search_id).items()
            if b.status == "shipped" and packages.complete(b.path, b.zip_bytes)}


def run_coreai(phase, keys: list[str]) -> None:
    """Build, check and ship the Core AI folder of every key not shipped yet (``phase``: the running
    `CoreMLPhase`, whose job row, reporter and package store this uses)."""
    from workers.coreai.worker import CoreAIWorker

    sid, reporter = phase.search.id, phase.reporter
    done = shipped_keys(phase.storage, phase.packages, sid)
    todo = [k for k in keys if k not in done]
    recipes = {r.key: r for r in phase.storage.recipes(sid)}
    for key, why in refusals(recipes, todo).items():  # refused in one line, not built
        CoreAIStore(phase.storage).put(sid, failed(key, why, recipes[key].psnr))
        reporter.message(f"[red]recipe {key} has no Core AI folder:[/] {why}")
        todo.remove(key)
        done.add(key)  # counted as handled: a refusal is its outcome
    reporter.phase_start(PHASE, len(keys))
    reporter.advance(PHASE, len(keys) - len(todo))
    if todo:
        node = phase.jobs.job(sid).coreml_node
        require_node(node)
        worker = phase._start(todo, node, CoreAIWorker)
        try:
            host = phase._wait(worker.node.remote())
            phase.jobs.update(sid, node=host)
            reporter.message(f"Core AI worker ready on {host}; {len(todo)} Core AI folder(s) to build "
                             f"({len(keys) - len(todo)} already shipped)")
            compare = compares_4bit(phase.storage, sid)
            for key in todo:
                _one(phase, worker, key, recipes[key].psnr, compare)
                reporter.advance(PHASE)
        finally:
            ray.kill(worker, no_restart=True)
    reporter.phase_end(PHASE)
    if phase.bundle_bytes:
        reporter.message(f"Core AI folders shipped to the head: {phase.bundle_bytes / 1e6:.2f} MB in "
                         f"{phase.bundle_ship_s:.2f} s")


def _one(phase, worker, key: str, measured: float | None, compare_4bit: bool = True) -> None:
    sid, store = phase.search.id, CoreAIStore(phase.storage)
    packed, why = phase._call(worker.coreai.remote(key, compare_4bit), "build a Core AI folder")
    phase.bundles_built += 1
    if packed is None:
        store.put(sid, failed(key, why, measured))
        phase.reporter.message(f"[red]the Core AI folder of recipe {key} failed:[/] {why}")
        return
    r = packed.result
    if not (r.luts_ok and r.runtime_ok is not False):
        row = from_result(key, r, status="failed", path=None, node=packed.node)
        store.put(sid, row)
        phase.reporter.message(f"[red]the Core AI folder of recipe {key} failed its checks:[/] {row.detail}")
        return
    phase.bundle_ship_s += phase._ship(worker, key, "coreai", COREAI_SUFFIX, packed.size_bytes, packed.sha256)
    phase.bundle_bytes += packed.size_bytes
    store.put(sid, from_result(key, r, status="shipped", path=phase.packages.relative_path(sid, key, COREAI_SUFFIX),
                               sha256=packed.sha256, zip_bytes=packed.size_bytes, node=packed.node))
