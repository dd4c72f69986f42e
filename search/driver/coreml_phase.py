"""The ``coreml`` phase on a cluster: the search's recipes and exact palettes go to a Core ML
worker actor (`workers.coreml.shipping`, on a node with the ``coreml`` resource unless the
request says ``any``), which applies and validates one recipe at a time; each package comes back
to the head in pieces through Ray's object store and is kept in the `PackageStore`.

It runs after a search's recipes (`search submit --apply`) or on its own for a finished search
(``POST /searches/{id}/coreml``, `search apply --server`). Resuming is running again: a recipe
whose zip is stored whole and whose validation is stored is not redone. A recipe that cannot be
applied is marked failed with the reason and the others go on; the search's measurements are
only read. Only the driver writes the database.
"""
from __future__ import annotations

import time
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from common.errors import first_line, typed_line
from common.formats import is_palettized
from search.driver.coreml_jobs import ApplyError, evaluator_settings, require_node, select_keys, stored_palettes
from search.driver.progress import NullReporter, Reporter
from search.driver.signals import SearchInterrupted
from storage import Search, Storage, Validation
from storage.coreml_store import CoreMLStore
from storage.package_store import PackageStore
from storage.records import PackageInfo
from workers.coreml.shipping import IN_FLIGHT, CoreMLWorker, Packed
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


class CoreMLPhase:
    def __init__(self, storage: Storage, search: Search, packages: PackageStore, *, spec=None, weights=None,
                 reporter: Reporter | None = None, should_stop: Callable[[], bool] = lambda: False):
        self.storage, self.search, self.packages = storage, search, packages
        self.jobs = CoreMLStore(storage)
        self.spec, self.weights = spec, weights  # the model as the driver resolved it, its shipped files
        self.reporter, self.should_stop = reporter or NullReporter(), should_stop
        self.shipped_bytes, self.ship_s = 0, 0.0

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

    def _run(self) -> None:
        sid = self.search.id
        keys = self._keys()
        done = done_keys(self.storage, self.packages, sid)
        todo = [k for k in keys if k not in done]
        self.reporter.phase_start(PHASE, len(keys))
        self.reporter.advance(PHASE, len(keys) - len(todo))
        if todo:
            node = self.jobs.job(sid).coreml_node
            require_node(node)
            worker = self._start(todo, node)
            try:
                host = self._wait(worker.node.remote())
                self.jobs.update(sid, node=host)
                self.reporter.message(f"Core ML worker ready on {host}; {len(todo)} recipe(s) to apply "
                                      f"({len(keys) - len(todo)} already shipped and validated)")
                for key in todo:
                    self._one(worker, key)
            finally:
                ray.kill(worker, no_restart=True)
        self.reporter.phase_end(PHASE)
        if self.shipped_bytes:
            self.reporter.message(f"Core ML packages shipped to the head: {self.shipped_bytes / 1e6:.2f} MB in "
                                  f"{self.ship_s:.2f} s ({self.shipped_bytes / 1e6 / max(self.ship_s, 1e-9):.1f} MB/s)")

    def _start(self, keys: list[str], node: str):
        s, by_key = self.search, {r.key: r for r in self.storage.recipes(self.search.id)}
        wanted = {(l, b) for k in keys for l, b in by_key[k].bits.items() if is_palettized(b)}
        job = CoreMLJob("apply", s.id, s.model, s.fingerprint, evaluator_settings(s),
                        tuple(RecipeJob(k, by_key[k].bits, by_key[k].avg_bits, by_key[k].psnr) for k in keys),
                        stored_palettes(self.storage, s, wanted), "search", "", None, weights=self.weights,
                        spec=self.spec)
        options = dict(num_cpus=1, max_restarts=0, max_task_retries=0)
        if node == "coreml":  # the coreml resource reserves the Mac; a node may offer it with no CPU for evaluators
            options.update(num_cpus=0, resources={COREML_RESOURCE: 1})
        return ray.remote(CoreMLWorker).options(**options).remote(job)

    def _wait(self, ref):
        """ray.get that keeps the heartbeat and notices a stop request; task errors become ApplyError."""
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            if self.should_stop():
                raise CoreMLStopped(f"Core ML phase of search {self.search.id} stopped")
            self.jobs.update(self.search.id)
            if ready:
                return ray.get(ref)

    def _one(self, worker, key: str) -> None:
        sid = self.search.id
        try:
            packed: Packed = self._wait(worker.apply.remote(key))
        except RayActorError as exc:
            raise ApplyError(f"the Core ML worker died: {first_line(exc, 300)}") from None
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            why = typed_line(cause, 300) if isinstance(cause, Exception) else first_line(exc, 300)
            self.jobs.put_package(sid, PackageInfo(key, "failed", why, None, 0, "", "", 0.0))
            self.reporter.message(f"[red]recipe {key} failed on the Core ML node:[/] {why}")
            self.reporter.advance(PHASE)
            return
        except RayError as exc:
            raise ApplyError(f"the Core ML worker could not run: {first_line(exc, 300)}") from None
        o = packed.outcome
        self.storage.put_validation(sid, Validation(o.key, o.mlpackage, o.size_bytes, o.avg_bits, o.structural_ok,
                                                    o.structural_detail, o.numeric_psnr, o.numeric_ok, o.runtime,
                                                    o.runtime_note, packed.node))
        t0 = time.monotonic()
        writer = self.packages.writer(sid, key)
        try:
            pieces = worker.pieces.options(num_returns="streaming",
                                           _generator_backpressure_num_objects=IN_FLIGHT).remote(key)
            for ref in pieces:
                writer.write(self._wait(ref))
            writer.commit(packed.size_bytes, packed.sha256)
        except BaseException:
            writer.abort()  # a partial zip is never kept
            raise
        seconds = time.monotonic() - t0
        self.shipped_bytes += packed.size_bytes
        self.ship_s += seconds
        why = "" if o.structural_ok and o.numeric_ok is not False else (
            o.structural_detail if not o.structural_ok else o.numeric_detail)
        self.jobs.put_package(sid, PackageInfo(key, "shipped", why, self.packages.relative_path(sid, key),
                                               packed.size_bytes, packed.sha256, packed.node, seconds))
        self.reporter.advance(PHASE)
        if why:
            self.reporter.message(f"[red]recipe {key} failed validation:[/] {why}")



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
