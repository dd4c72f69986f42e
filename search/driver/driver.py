"""The driver: runs a search's remaining phases on a pool of Ray evaluators and stores every
result as it arrives. It is the only writer of the database; resuming is just running again,
since every phase skips what is already stored."""
from __future__ import annotations

import threading
import time
from typing import Callable

from common.errors import first_line
from common.formats import is_palettized
from search.config import SearchConfig
from search.driver.cluster import driver_id, ensure_ray, plan_workers  # driver_id, ensure_ray: search/service imports them here
from search.driver.coreml_phase import CoreMLStage
from search.driver.gallery_phase import GalleryPhase
from search.driver.palette_feed import PaletteStage
from search.driver.pool import EvaluatorPool, ItemFailed, PoolError, actor_class, can_place
from search.driver.progress import NullReporter, Reporter
from search.driver.recipe_phase import RecipePhases
from search.driver.reuse import Reuse
from search.driver.signals import SearchFailed, SearchInterrupted, deferred, stop_on_signals
from search.recipes.strategy import descent_plan, floor_plan, isolated_plan, refinement_plan
from search.recipes.tables import load_tables, weight_mse
from storage import Baseline, DiskError, Measurement, Search, Storage, StorageError
from storage.palette_store import PaletteStore
from workers.evaluation.items import WorkItem
from workers.evaluation.protocol import LINEAR8_BASELINE
from workers.models import ModelSpec
from workers.weights import WeightShipper, fetch_pipeline

HEARTBEAT_S = 5.0
CANCEL_POLL_S = 1.0


class SearchDriver(PaletteStage, RecipePhases, GalleryPhase, CoreMLStage):
    def __init__(self, storage: Storage, search: Search, spec: ModelSpec, *, workers: int | None = None,
                 reporter: Reporter | None = None, actor_resources: dict | None = None, weights_dir=None):
        self.storage, self.search, self.spec = storage, search, spec
        self.weights_dir = weights_dir  # the local pipeline directory (None: found from the spec)
        self.shipper, self.config = None, SearchConfig.from_dict(search.config)
        self.reporter, self.requested_workers, self.actor_resources = reporter or NullReporter(), workers, actor_resources
        self.palette_store = PaletteStore(storage.path)
        self._stop, self.cancelled = threading.Event(), False
        self._last_beat = self._last_poll = 0.0
        self.palette_refs: dict[tuple[str, int], object] = {}
        self.pool: EvaluatorPool | None = None
        self.evaluations = 0  # results this driver computed and stored (resume cost accounting)
        self.reference_runs = 0  # each evaluator's own reference output
        self.started = time.monotonic()
        self.first_result_s: float | None = None  # seconds from start to the first new stored result
        self.shipped_bytes = 0  # weights put into the object store for evaluators on other nodes
        self.timings: dict[str, float] = {}  # wall seconds per phase (palettes overlap isolated)
        self.actor_cpus = 0.0
        self.reuse = Reuse(storage, search, self.config, None)  # keys need the evaluators' device: see _start_pool

    # -- lifecycle ------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self._stop.set()

    def _should_stop(self) -> bool:
        """Heartbeat, and notice `search cancel` from any process sharing the database (within
        a second: one small read, where the heartbeat is a write)."""
        now = time.monotonic()
        if now - self._last_poll > CANCEL_POLL_S:
            self._last_poll = now
            if now - self._last_beat > HEARTBEAT_S:
                self.storage.heartbeat(self.search.id)
                self._last_beat = now
            if self.storage.get_search(self.search.id).status == "cancelling":
                self.cancelled = True
                self._stop.set()
        return self._stop.is_set()

    def run(self) -> Search:
        sid = self.search.id
        started = self.started = time.monotonic()
        with stop_on_signals(self.request_stop):
            self._run_phases(sid, started)
        return self.storage.get_search(sid)

    def _run_phases(self, sid: str, started: float) -> None:
        def end(status: str, error: str | None = None) -> None:  # if the disk still takes it: resume works either way
            try:
                self.storage.update_search(sid, status=status, error=error, add_elapsed=time.monotonic() - started)
            except StorageError:
                pass
        try:
            self._start_pool()
            self._phase_isolated()
            self._phase_cumulative()
            self._phase_recipes()
            self._phase_gallery()
            self._phase_coreml()
            self.storage.update_search(sid, status="completed", phase="done", finished=True,
                                       add_elapsed=time.monotonic() - started)
        except (SearchInterrupted, KeyboardInterrupt):  # a stop noticed by the pool, or a signal elsewhere
            end("cancelled" if self.cancelled else "interrupted")
            raise SearchInterrupted(f"search {sid} interrupted") from None
        except (ItemFailed, PoolError) as exc:
            end("failed", str(exc))
            raise SearchFailed(str(exc)) from None
        except BaseException as exc:  # a full or read-only disk (DiskError) stops it like an interrupt
            stopped = isinstance(exc, DiskError)
            end("interrupted" if stopped else "failed", None if stopped else first_line(exc))
            raise
        finally:
            if self.pool:
                self.pool.shutdown()

    def run_recipes(self, keys: list[str], then: Callable | None = None):
        """Measure stored recipes end to end (`search recipe`), whatever the search's status; return ``then()``."""
        with stop_on_signals(self.request_stop):
            try:
                self._start_pool()
                self._load_palettes()
                self.measure_recipes(keys)
                return then() if then else None
            finally:
                if self.pool:
                    self.pool.shutdown()

    def _start_pool(self) -> None:
        n, cpus, gpus, threads = plan_workers(self.requested_workers)
        cls = actor_class(cpus, gpus, self.actor_resources)
        spec, signal_spec = self.spec, self.config.signal_spec()
        kwargs = dict(precision=self.config.precision, fingerprint=self.search.fingerprint, threads=threads,
                      min_size=self.config.min_size, default_nbits=self.config.default_nbits,
                      prefix_reuse=self.config.prefix_reuse, compile=self.config.compile)
        auto = self.requested_workers is None
        shipper = self._weight_shipper()
        self.pool = EvaluatorPool(n, lambda: cls.remote(spec, signal_spec, weights=shipper.manifest(), **kwargs),
                                  can_place=can_place(cpus, gpus),
                                  target_size=(lambda: plan_workers(None)[0]) if auto else None)
        self.pool.on_actor_lost = lambda exc, lost: self.reporter.message(
            f"[yellow]an evaluator died ({type(exc).__name__}); re-queued {len(lost)} item(s); "
            f"{len(self.pool.slots)} evaluator(s) now")
        self.reporter.message(f"starting {n} evaluator(s) ({'GPU' if gpus else 'CPU'}, {threads} thread(s) each)")
        self.storage.update_search(self.search.id, phase="starting")
        t0 = time.monotonic()
        if not (infos := self.pool.start(self._should_stop)):
            raise SearchInterrupted(f"search {self.search.id} interrupted")
        self.timings["start"], self.actor_cpus = time.monotonic() - t0, cpus * n
        self.reference_runs += len(infos)  # each computed its own reference
        self.reuse = Reuse(self.storage, self.search, self.config, infos, on_copied=lambda n, src: self.reporter.message(
            f"reused {n} stored result(s) from search(es) {', '.join(src)}") if n else None)
        d = infos[0]
        odd = "" if d.get("deterministic", True) else "; [yellow]the device does not repeat runs bit for bit"
        self.reporter.message(f"evaluators ready on {d['device']} ({d['dtype']}), {d['candidates']} candidates; one "
                              f"pipeline run takes {d['warm_s']:.3f} s warm (first run {d['reference_s']:.2f} s, model "
                              f"load {d['load_s']:.1f} s); prefix reuse {'on' if d.get('prefix_reuse') else 'off'}{odd}")

    def _weight_shipper(self) -> WeightShipper:
        """Evaluators on other nodes get the weights from this one, through Ray's object store."""
        if self.shipper is None:
            root = self.weights_dir or fetch_pipeline(self.spec)

            def shipped(files: int, size: int) -> None:
                self.shipped_bytes = size
                self.reporter.message(f"weights shipped through the object store: {files} files, {size / 1e6:.1f} MB "
                                      "(once; evaluators on other nodes copy them into their cache)")

            self.shipper = WeightShipper(root, self.search.fingerprint, on_shipped=shipped)
        return self.shipper

    def _run_items(self, phase: str, items: list[WorkItem], submit: Callable, store: Callable, *, feed=None,
                   total: int | None = None) -> None:
        self.storage.update_search(self.search.id, phase=phase)
        items = self.reuse.take(items)  # stored by another search with the same key: copied, not run
        report = total != 0 or phase != "palettes"  # palettes alone: the feed reports them
        if report:
            self.reporter.phase_start(phase, len(items) if total is None else total)
        t0 = time.monotonic()
        with deferred():  # the pool's loop notices a stop request within a second
            for item, result in self.pool.run(items, submit, self._should_stop, feed=feed):
                store(item, result)
                if item.phase == "palette":
                    continue
                if self.first_result_s is None:
                    self.first_result_s = time.monotonic() - self.started
                self.reporter.advance(phase)
        if report:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - t0
            self.reporter.phase_end(phase)
        if self._stop.is_set():
            raise SearchInterrupted(f"search {self.search.id} interrupted")

    # -- phases ---------------------------------------------------------------------------
    def _submit_eval(self, actor, item: WorkItem):
        refs = {key: self.palette_refs[key] for key in item.assignment if is_palettized(key[1])}
        return actor.evaluate.remote(item, refs)

    def _store_measurement(self, item: WorkItem, r) -> None:
        self.evaluations += 1
        self.storage.add_measurement(self.search.id, Measurement(
            item.key, item.phase, item.bits, item.layer, item.position, r.psnr, r.per_prompt, r.node, r.worker,
            r.duration_s, **self.reuse.tag(item)))

    def _phase_isolated(self) -> None:
        """Palettes and isolated measurements, pipelined: an isolated item goes to the evaluators
        as soon as its palette exists (fast mode plans from every palette's MSE, so it waits)."""
        sid = self.search.id
        tables = load_tables(self.storage, sid)
        linear8 = LINEAR8_BASELINE[self.config.protocol]
        items = [WorkItem(f"baseline/{n}", "baseline", name=n, linear8=(n == linear8))
                 for n in ("original", linear8) if n not in tables.baselines]
        items += [WorkItem(key, "floor", layer=layer, position=position)  # the evaluation floor's probes
                  for key, layer, position in floor_plan(tables)]
        if self.config.evals == "full":
            items = self.reuse.take(items)  # before the palettes: what is copied needs none
            todo = self.reuse.take(self._isolated_items(isolated_plan(self.config, tables.sizes, {})))
            waiting: dict = {}
            for it in todo:
                waiting.setdefault((it.layer, it.bits), []).append(it)
            self._fit_palettes(self._palette_feed(waiting), "isolated", items, len(items) + len(todo))
            return
        self._fit_palettes(self._palette_feed({}), "palettes", [], 0)
        mse = weight_mse(self.storage, sid)
        run = lambda name, todo: self._run_items(name, todo, self._submit_eval, self._store_isolated)  # noqa: E731
        run("isolated", items + self._isolated_items(isolated_plan(self.config, tables.sizes, mse)))
        while todo := descent_plan(self.config, load_tables(self.storage, sid), mse):
            self.reporter.message(f"fast mode: {len(todo)} layer(s) hidden by the evaluation floor, measured one depth lower")
            run("descent", self._isolated_items(todo))
        refine = refinement_plan(self.config, load_tables(self.storage, sid), mse)
        self.reporter.message(f"fast mode: {len(refine)} more isolated measurement(s) where a prediction decides a choice")
        run("refine", self._isolated_items(refine))

    def _isolated_items(self, pairs) -> list[WorkItem]:
        done = self.storage.measured_keys(self.search.id)
        return [WorkItem(f"isolated/{b}/{layer}", "isolated", bits=b, layer=layer, assignment=((layer, b),))
                for layer, b in pairs if f"isolated/{b}/{layer}" not in done]

    def _store_isolated(self, item: WorkItem, r) -> None:
        if item.phase == "baseline":
            self.evaluations += 1
            self.storage.add_baseline(self.search.id, Baseline(item.name, r.psnr, r.per_prompt, r.node, r.duration_s,
                                                               **self.reuse.tag(item)))
        else:
            self._store_measurement(item, r)

    def _phase_cumulative(self) -> None:
        if not self.config.curves:
            return
        tables = load_tables(self.storage, self.search.id)
        items = []
        for b in (b for b in self.config.nbits if tables.isolated.get(b)):  # a format may fit no layer
            order = tables.order(b)
            for pos in range(1, len(order) + 1):
                if pos in tables.cumulative.get(b, {}):
                    continue
                items.append(WorkItem(f"cumulative/{b}/{pos:05d}", "cumulative", bits=b, layer=order[pos - 1],
                                      position=pos, assignment=tuple((l, b) for l in order[:pos])))
        # Longest prefixes first: they take the longest, so the tail of the phase stays balanced.
        items.sort(key=lambda it: -it.position)
        self._run_items("cumulative", items, self._submit_eval, self._store_measurement)


__all__ = ["SearchDriver", "SearchInterrupted", "SearchFailed", "ensure_ray", "driver_id"]
