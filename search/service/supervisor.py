"""The service's state and its drivers: storage, the Ray connection, and the driver tasks it
launched (search.service.driver_task), pinned to this node; a monitor thread notices tasks that
ended and searches whose driver died with a previous service, and resumes them.

**Cancel** sets the search's ``cancelling`` flag in the database (the driver polls it at every
heartbeat) — the same path as the local `search cancel`. **Shutdown** (SIGTERM/SIGINT)
interrupts every driver with ``ray.cancel`` (a KeyboardInterrupt in the task, which the driver
turns into a clean ``interrupted`` state), and on the next start the service resumes every
interrupted search (``resume_interrupted``), including those whose driver died without a word
(a stale heartbeat).
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import ray

from common.clock import utcnow
from common.errors import first_line
from search.config import ConfigError
from search.driver.driver import driver_id
from search.service.driver_task import drive_task, stale
from search.service.requests import ApiError, check_model, checked_id
from storage import Storage, StorageError
from storage.records import ACTIVE
from workers.models import ModelError

log = logging.getLogger("mbp_search.service")

SHUTDOWN_GRACE_S = 30.0


class Service:
    """Shared state of the API: storage, the Ray connection, the driver tasks it launched."""

    def __init__(self, db_path: Path | str, data_dir: Path | str, *, allowed_model_dirs=(),
                 ray_address: str | None = None, resume_interrupted: bool = True, request_gpus: int = 0,
                 gpu_wait_s: float = 1800.0, poll_s: float = 1.0):
        self.db_path = Path(db_path).expanduser().resolve()
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.allowed_model_dirs = tuple(Path(d).expanduser().resolve() for d in allowed_model_dirs)
        self.ray_address = ray_address
        self.resume_interrupted = resume_interrupted
        self.request_gpus = int(request_gpus)
        self.gpu_wait_s = gpu_wait_s
        self.poll_s = poll_s
        self.owner = driver_id()
        self.storage: Storage | None = None
        self.node_id: str | None = None
        self.tasks: dict[str, object] = {}  # search id -> ObjectRef of its driver task
        self.watch: set[str] = set()       # searches active at start-up whose driver may be dead
        self._lock = threading.RLock()
        self.prepare_lock = threading.Lock()  # one submit (duplicate check + insert) or resume check at a time
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._gpus_requested = False

    # paths: only ever built from a validated, stored id
    def progress_path(self, sid: str) -> Path:
        return self._inside(self.data_dir / "progress" / f"{checked_id(sid)}.json")

    def plot_path(self, sid: str) -> Path:
        return self._inside(self.data_dir / "plots" / f"{checked_id(sid)}.png")

    @property
    def packages_dir(self) -> Path:
        """The Core ML packages shipped to the head: ``<data_dir>/packages/<search>/<key>.mlpackage.zip``."""
        return self.data_dir / "packages"

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.data_dir):
            raise ApiError(404, "not found")
        return resolved

    # lifecycle
    def start(self) -> None:
        if self.storage is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.storage = Storage(self.db_path)
        from search.driver.driver import ensure_ray

        ensure_ray(self.ray_address)
        self.node_id = ray.get_runtime_context().get_node_id()
        if self.resume_interrupted:
            self._scan()
        self._monitor = threading.Thread(target=self._monitor_loop, name="search-service-monitor", daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        """Interrupt every driver cleanly (they store what they have and mark the search
        interrupted), then leave Ray."""
        self._stop.set()
        with self._lock:
            refs = dict(self.tasks)
        for ref in refs.values():
            try:
                # Not recursive: the evaluators' calls must not fail with TaskCancelledError;
                # the driver turns the interrupt into a clean stop and shuts them down itself.
                ray.cancel(ref, force=False, recursive=False)
            except Exception:
                pass
        if refs:
            try:
                ray.wait(list(refs.values()), num_returns=len(refs), timeout=SHUTDOWN_GRACE_S)
            except Exception:
                pass
        for sid in refs:
            try:
                if self.storage.get_search(sid).status in ACTIVE:
                    self.storage.update_search(sid, status="interrupted")
            except Exception:
                pass
        if self._gpus_requested:
            self._release_gpus()
        if self._monitor:
            self._monitor.join(timeout=5)
        try:
            ray.shutdown()
        except Exception:
            pass
        if self.storage:
            self.storage.close()

    def describe_ray(self) -> str:
        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        where = self.ray_address or os.environ.get("RAY_ADDRESS") or "a local instance"
        return (f"Ray {where}: {nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU, "
                f"{res.get('coreml', 0):g} coreml")

    # drivers
    def running(self, sid: str) -> bool:
        with self._lock:
            ref = self.tasks.get(sid)
            if ref is None:
                return False
            ready, _ = ray.wait([ref], timeout=0)
            return not ready

    def launch(self, prepared, workers: int | None) -> None:
        sid = prepared.search.id
        with self._lock:
            if self.running(sid):
                raise ApiError(409, f"search {sid} is already running on this service")
            if self.request_gpus and not self._gpus_requested:
                self._request_gpus()
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            strategy = NodeAffinitySchedulingStrategy(self.node_id, soft=False)
            self.tasks[sid] = drive_task.options(scheduling_strategy=strategy, name=f"search-driver-{sid}").remote(
                str(self.db_path), str(self.progress_path(sid)), prepared, workers, self.owner,
                self.gpu_wait_s if self.request_gpus else 0.0, str(self.packages_dir))
        log.info("search %s: driver task started", sid)

    def hand_over(self, sid: str) -> None:
        """Take a resumable search for this service (refused if a live driver holds it) and
        show it as pending until its driver task claims it."""
        self.storage.claim(sid, self.owner, stale)
        self.storage.update_search(sid, status="pending")

    def resume(self, sid: str, workers: int | None = None) -> None:
        from search.driver.jobs import prepare_resume

        with self.prepare_lock:
            prepared = prepare_resume(self.storage, sid)
            self.hand_over(sid)
            self.launch(prepared, workers)

    def _request_gpus(self) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": 1}] * self.request_gpus)
        self._gpus_requested = True

    def _release_gpus(self) -> None:
        from ray.autoscaler.sdk import request_resources

        try:
            request_resources(bundles=[])
        except Exception:
            pass
        self._gpus_requested = False

    def _scan(self) -> None:
        """At start-up: resume interrupted searches; watch active ones whose driver may have died
        with the previous service (their heartbeat goes stale after STALE_AFTER_S)."""
        now = utcnow()
        for s in self.storage.list_searches():
            if s.status == "interrupted" or (s.status in ACTIVE and s.effective_status(now) == "interrupted"):
                self._auto_resume(s.id)
            elif s.status in ACTIVE:
                self.watch.add(s.id)

    def _auto_resume(self, sid: str) -> None:
        try:
            self.resume(sid)
            log.warning("resumed interrupted search %s", sid)
        except (ApiError, StorageError, ModelError, ConfigError) as exc:
            log.warning("cannot resume interrupted search %s: %s", sid, getattr(exc, "detail", None) or first_line(exc))
        except Exception as exc:  # never let one search stop the service
            log.exception("resuming search %s failed: %s", sid, exc)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check_tasks()
                self._check_watch()
            except Exception as exc:  # pragma: no cover - keep monitoring whatever happens
                log.warning("monitor: %s", first_line(exc))

    def _check_tasks(self) -> None:
        with self._lock:
            items = list(self.tasks.items())
        if not items:
            return
        ready, _ = ray.wait([ref for _, ref in items], num_returns=len(items), timeout=0)
        ready = set(ready)
        for sid, ref in items:
            if ref not in ready:
                continue
            try:
                result = ray.get(ref)
                log.info("search %s: driver ended (%s)", sid, result.get("status"))
            except Exception as exc:
                # The task died (worker crash, cancel, lost node): whatever it held is stored;
                # the search is resumable.
                log.warning("search %s: driver task ended abnormally: %s", sid, first_line(exc))
                try:
                    if self.storage.get_search(sid).status in ACTIVE and not self._stop.is_set():
                        self.storage.update_search(sid, status="interrupted")
                except Exception:
                    pass
            with self._lock:
                if self.tasks.get(sid) is ref:
                    del self.tasks[sid]
        with self._lock:
            idle = not self.tasks
        if idle and self._gpus_requested:
            self._release_gpus()

    def _check_watch(self) -> None:
        if not self.watch:
            return
        now = utcnow()
        for sid in list(self.watch):
            try:
                s = self.storage.get_search(sid)
            except StorageError:
                self.watch.discard(sid)
                continue
            if s.status not in ACTIVE and s.status != "interrupted":
                self.watch.discard(sid)      # finished, failed or cancelled by its own driver
            elif s.status == "interrupted" or s.effective_status(now) == "interrupted":
                self.watch.discard(sid)
                self._auto_resume(sid)

    def check_model(self, model: str) -> str:
        """The model of a remote request, checked against this server's allowed model directories."""
        return check_model(model, self.allowed_model_dirs)
