"""The ``coreml`` phase on a cluster: the search's recipes and exact palettes go to a Core ML
worker actor (`workers.coreml.shipping`, on a node with the ``coreml`` resource unless the
request says ``any``), which applies and validates one recipe at a time and builds its Resources
folder for Apple's Swift pipeline (default `BundleOptions`; Flux and PixArt have no Swift
pipeline, so no bundle: one note); each package and each bundle comes back to the head in
pieces through Ray's object store and is kept in the `PackageStore` (``<key>.mlpackage.zip``,
``<key>.bundle.zip``).

It runs after a search's recipes (`search submit --apply`) or on its own for a finished search
(``POST /searches/{id}/coreml``, `search apply --server`). Resuming is running again: a recipe
whose zip is stored whole and whose validation is stored is not applied again, a bundle whose zip
is stored whole is not built again. A recipe that cannot be applied or bundled is marked failed
with the reason and the others go on; the search's measurements are only read. Only the driver
writes the database.
"""
from __future__ import annotations

import time
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from common.errors import first_line, typed_line
from common.formats import is_palettized
from search.driver.bundle_jobs import summary
from search.driver.coreml_jobs import ApplyError, evaluator_settings, require_node, select_keys, stored_palettes
from search.driver.progress import NullReporter, Reporter
from search.driver.signals import SearchInterrupted
from storage import Search, Storage, Validation
from storage.coreml_store import CoreMLStore
from storage.package_store import BUNDLE_SUFFIX, SUFFIX, PackageStore
from storage.records import BundleInfo, PackageInfo
from workers.coreml.bundle.contract import NO_SWIFT_PIPELINE, bundle_family
from workers.coreml.shipping import IN_FLIGHT, CoreMLWorker, Packed, PackedBundle
from workers.coreml.task import COREML_RESOURCE, CoreMLJob, RecipeJob

PHASE = "coreml"
POLL_S = 1.0


class CoreMLStopped(SearchInterrupted):
    """The phase was asked to stop (cancel, signal); what was shipped is stored."""


def done_keys(storage: Storage, packages: PackageStore, search_id: str) -> set[str]:
    """Recipes whose package is stored whole on the head and whose validation is stored."""
    validated = storage.validations(search_id)
    return {k for k, p in CoreMLStore(storage).packages(search_id).items()
            if p.status == "shipped" and k in validated and packages.complete(p.path, p.size_bytes)}


def bundled_keys(storage: Storage, packages: PackageStore, search_id: str) -> set[str]:
    """Recipes whose bundle zip is stored whole on the head."""
    return {k for k, b in CoreMLStore(storage).bundles(search_id).items()
            if b.status == "shipped" and packages.complete(b.path, b.zip_bytes)}


def no_bundle_note(family: str) -> str:
    return (f"{family} models have no pipeline in Apple's Swift package: no Resources folder is built, "
            "the Core ML packages are the result")


class CoreMLPhase:
    def __init__(self, storage: Storage, search: Search, packages: PackageStore, *, spec=None, weights=None,
                 reporter: Reporter | None = None, should_stop: Callable[[], bool] = lambda: False):
        self.storage, self.search, self.packages = storage, search, packages
        self.jobs = CoreMLStore(storage)
        self.spec, self.weights = spec, weights  # the model as the driver resolved it, its shipped files
        self.reporter, self.should_stop = reporter or NullReporter(), should_stop
        self.shipped_bytes, self.ship_s = 0, 0.0  # packages shipped node -> head
        self.bundle_bytes, self.bundle_ship_s, self.bundles_built = 0, 0.0, 0  # bundles built and shipped

    def pending(self) -> bool:
        job = self.jobs.job(self.search.id)
        return job is not None and job.status != "completed"

    def run(self) -> None:
        """Run the phase if one is asked and not completed; the job row says how it ended."""
        sid, t0 = self.search.id, time.monotonic()
        if not self.pending():
            return
        self.jobs.update(sid, status="running")
        try:
            self._run()
        except CoreMLStopped:
            self.jobs.update(sid, status="interrupted", add_seconds=time.monotonic() - t0)
            raise
        except BaseException as exc:
            self.jobs.update(sid, status="failed", error=first_line(exc), add_seconds=time.monotonic() - t0)
            raise
        self.jobs.update(sid, status="completed", add_seconds=time.monotonic() - t0)

    def _keys(self) -> list[str]:
        job = self.jobs.job(self.search.id)
        stored = {r.key: r for r in self.storage.recipes(self.search.id)}
        where = f"search {self.search.id}"
        if job.keys is None:
            return select_keys(stored, "all", where)
        return [k for choice in job.keys for k in select_keys(stored, choice, where)]

    def _family(self) -> str | None:
        """Swift's family of the search's model, when the driver resolved it (None: the worker says)."""
        return bundle_family(self.spec.family, self.spec.img2img) if self.spec is not None else None

    def _run(self) -> None:
        sid = self.search.id
        keys = self._keys()
        from search.driver.coreai_phase import is_coreai, run_coreai

        if is_coreai(self.search, self.storage):  # --target coreai (the search's or the request's): Core AI folders
            return run_coreai(self, keys)
        family = self._family()
        done = done_keys(self.storage, self.packages, sid)
        bundled = set(keys) if family in NO_SWIFT_PIPELINE else bundled_keys(self.storage, self.packages, sid)
        todo = [k for k in keys if k not in done or k not in bundled]
        self.reporter.phase_start(PHASE, len(keys))
        self.reporter.advance(PHASE, len(keys) - len(todo))
        if family in NO_SWIFT_PIPELINE:
            self.reporter.message(no_bundle_note(family))
        if todo:
            node = self.jobs.job(sid).coreml_node
            require_node(node)
            worker = self._start(todo, node)
            try:
                host = self._wait(worker.node.remote())
                self.jobs.update(sid, node=host)
                if family is None:
                    family = self._wait(worker.bundle_family.remote())
                    if family in NO_SWIFT_PIPELINE:
                        self.reporter.message(no_bundle_note(family))
                        bundled = set(keys)
                to_apply, to_bundle = [k for k in keys if k not in done], [k for k in keys if k not in bundled]
                bundles = ("" if family in NO_SWIFT_PIPELINE else
                           f", {len(to_bundle)} bundle(s) to build ({len(keys) - len(to_bundle)} already shipped)")
                self.reporter.message(f"Core ML worker ready on {host}; {len(to_apply)} recipe(s) to apply "
                                      f"({len(keys) - len(to_apply)} already shipped and validated){bundles}")
                for key in todo:
                    if key not in done:
                        self._one(worker, key)
                    if key not in bundled:
                        self._bundle(worker, key)
                    self.reporter.advance(PHASE)
            finally:
                ray.kill(worker, no_restart=True)
        self.reporter.phase_end(PHASE)
        for what, size, seconds in (("packages", self.shipped_bytes, self.ship_s),
                                    ("bundles", self.bundle_bytes, self.bundle_ship_s)):
            if size:
                self.reporter.message(f"Core ML {what} shipped to the head: {size / 1e6:.2f} MB in {seconds:.2f} s "
                                      f"({size / 1e6 / max(seconds, 1e-9):.1f} MB/s)")

    def _start(self, keys: list[str], node: str, worker_class=CoreMLWorker):
        s, by_key = self.search, {r.key: r for r in self.storage.recipes(self.search.id)}
        wanted = {(l, b) for k in keys for l, b in by_key[k].bits.items() if is_palettized(b)}
        job = CoreMLJob("apply", s.id, s.model, s.fingerprint, evaluator_settings(s),
                        tuple(RecipeJob(k, by_key[k].bits, by_key[k].avg_bits, by_key[k].psnr) for k in keys),
                        stored_palettes(self.storage, s, wanted), "search", "", None, weights=self.weights,
                        spec=self.spec)
        options = dict(num_cpus=1, max_restarts=0, max_task_retries=0)
        if node == "coreml":  # the coreml resource reserves the Mac; a node may offer it with no CPU for evaluators
            options.update(num_cpus=0, resources={COREML_RESOURCE: 1})
        return ray.remote(worker_class).options(**options).remote(job, s.model_version)

    def _wait(self, ref):
        """ray.get that keeps the heartbeat and notices a stop request; task errors become ApplyError."""
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            if self.should_stop():
                raise CoreMLStopped(f"Core ML phase of search {self.search.id} stopped")
            self.jobs.update(self.search.id)
            if ready:
                return ray.get(ref)

    def _call(self, ref, what: str):
        """Wait for a worker call; (result, None), or (None, why) when the call raised (the worker
        lives on); the worker dying or not running stops the phase."""
        try:
            return self._wait(ref), None
        except RayActorError as exc:
            raise ApplyError(f"the Core ML worker died: {first_line(exc, 300)}") from None
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            return None, typed_line(cause, 300) if isinstance(cause, Exception) else first_line(exc, 300)
        except RayError as exc:
            raise ApplyError(f"the Core ML worker could not {what}: {first_line(exc, 300)}") from None

    def _ship(self, worker, key: str, kind: str, suffix: str, size: int, sha256: str) -> float:
        """Pull a zip the worker made into the package store (kept only whole); returns the seconds."""
        t0 = time.monotonic()
        writer = self.packages.writer(self.search.id, key, suffix)
        try:
            pieces = worker.pieces.options(num_returns="streaming",
                                           _generator_backpressure_num_objects=IN_FLIGHT).remote(key, kind)
            for ref in pieces:
                writer.write(self._wait(ref))
            writer.commit(size, sha256)
        except BaseException:
            writer.abort()  # a partial zip is never kept
            raise
        return time.monotonic() - t0

    def _one(self, worker, key: str) -> None:
        sid = self.search.id
        packed, why = self._call(worker.apply.remote(key), "run")
        if packed is None:
            self.jobs.put_package(sid, PackageInfo(key, "failed", why, None, 0, "", "", 0.0))
            self.reporter.message(f"[red]recipe {key} failed on the Core ML node:[/] {why}")
            return
        packed: Packed
        o = packed.outcome
        self.storage.put_validation(sid, Validation(o.key, o.mlpackage, o.size_bytes, o.avg_bits, o.structural_ok,
                                                    o.structural_detail, o.numeric_psnr, o.numeric_ok, o.runtime,
                                                    o.runtime_note, packed.node))
        seconds = self._ship(worker, key, "mlpackage", SUFFIX, packed.size_bytes, packed.sha256)
        self.shipped_bytes += packed.size_bytes
        self.ship_s += seconds
        why = "" if o.structural_ok and o.numeric_ok is not False else (
            o.structural_detail if not o.structural_ok else o.numeric_detail)
        self.jobs.put_package(sid, PackageInfo(key, "shipped", why, self.packages.relative_path(sid, key),
                                               packed.size_bytes, packed.sha256, packed.node, seconds))
        if why:
            self.reporter.message(f"[red]recipe {key} failed validation:[/] {why}")

    def _bundle(self, worker, key: str) -> None:
        """Build the recipe's Resources folder on the node and ship its zip; one whose checks
        fail is stored as failed with why (and not shipped), and built again on resume."""
        sid = self.search.id
        packed, why = self._call(worker.bundle.remote(key), "build a bundle")
        self.bundles_built += 1
        if packed is None:
            self.jobs.put_bundle(sid, BundleInfo(key, "failed", why, None, 0, "", {}, "", 0.0))
            self.reporter.message(f"[red]the bundle of recipe {key} failed on the Core ML node:[/] {why}")
            return
        packed: PackedBundle
        r = packed.result
        for note in r.notes:
            self.reporter.message(f"bundle of recipe {key}: {note}")
        if not (r.structural_ok and r.numeric_ok is not False):
            self.jobs.put_bundle(sid, BundleInfo(key, "failed", summary(r), None, r.total_bytes, "", packed.options,
                                                 packed.node, r.seconds))
            self.reporter.message(f"[red]the bundle of recipe {key} failed its checks:[/] {summary(r)}")
            return
        self.bundle_ship_s += self._ship(worker, key, "bundle", BUNDLE_SUFFIX, packed.size_bytes, packed.sha256)
        self.bundle_bytes += packed.size_bytes
        self.jobs.put_bundle(sid, BundleInfo(key, "shipped", summary(r),
                                             self.packages.relative_path(sid, key, BUNDLE_SUFFIX), r.total_bytes,
                                             packed.sha256, packed.options, packed.node, r.seconds,
                                             packed.size_bytes))


class CoreMLStage:
    """`SearchDriver` inherits it: the ``coreml`` phase after the recipes when the search was
    submitted with ``--apply``. Needs the driver's ``storage``, ``search``, ``spec``, ``pool``,
    ``reporter``, ``_weight_shipper`` and ``_should_stop``; ``packages`` (set by
    `search.driver.jobs.run_search`) is the head's package store."""

    packages: PackageStore | None = None

    def _phase_coreml(self) -> None:
        packages = self.packages or PackageStore.beside(self.storage.path)
        phase = CoreMLPhase(self.storage, self.search, packages, spec=self.spec, reporter=self.reporter,
                            should_stop=self._should_stop)
        if not phase.pending():
            return
        self.storage.update_search(self.search.id, phase=PHASE)
        if self.pool:  # the evaluators' CPUs go to the Core ML worker
            self.pool.shutdown()
            self.pool = None
        phase.weights = self._weight_shipper().manifest()
        t0 = time.monotonic()
        phase.run()  # a stop request: CoreMLStopped, a SearchInterrupted
        self.timings[PHASE] = time.monotonic() - t0
        self.shipped_packages_bytes = phase.shipped_bytes
