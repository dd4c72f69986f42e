"""`search serve`: the search service that runs on a cluster's head node.

An HTTP API (FastAPI, served by uvicorn) over the same SQLite database, palette store and Ray
cluster the local CLI uses. Request handlers only validate input, write rows and read them
back; no search ever runs inside a handler.

**How drivers run.** Each search's driver is a *Ray task* (`_drive`, ``num_cpus=0``,
``max_retries=0``) pinned with a hard ``NodeAffinitySchedulingStrategy`` to the node this
service runs on: the SQLite database and the palette files are local files there, and SQLite
must not be shared over a network file system. The task opens `Storage`, claims the search and
calls `search.jobs.run_search`, which creates the evaluator actors anywhere in the cluster
(GPU workers, Macs with the ``coreml`` resource, ...). A task rather than a Ray *job*:
the job API lives in the dashboard (which small or locked-down clusters run without), starts a
whole new driver process per search, and would hand back only a job id; a task returns an
``ObjectRef`` the service keeps for `cancel` / shutdown, its failures come back as exceptions,
and it shares the service's fate, which is what resume-on-restart expects.
Node affinity is by node *id*, not by the ``node:<ip>`` resource, because several Ray nodes
may share one IP (the multi-node tests run two nodes on 127.0.0.1).

**Cancel** sets the search's ``cancelling`` flag in the database (the driver polls it at every
heartbeat) — the same path as the local `search cancel`. **Shutdown** (SIGTERM/SIGINT)
interrupts every driver with ``ray.cancel`` (a KeyboardInterrupt in the task, which the driver
turns into a clean ``interrupted`` state), and on the next start the service resumes every
interrupted search (``resume_interrupted``), including those whose driver died without a word
(a stale heartbeat).

**Security.** Optional bearer token (``Authorization: Bearer <token>``, compared with
`secrets.compare_digest`) on every route except ``/health``; ids must be hex (anything else is
404, so no user string ever reaches a path); generated files live under ``data_dir`` with names
built from the stored id; a model given as a path must resolve (symlinks followed) under one of
``allowed_model_dirs``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional, Union

import ray
from fastapi import Body, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from search.config import ConfigError, SearchConfig, parse_floats, parse_nbits, parse_strategy
from search.driver.driver import driver_id
from storage import Search, Storage, StorageError
from storage.records import ACTIVE, STALE_AFTER_S
from workers.models import ModelError

log = logging.getLogger("mbp_search.service")

ID_PATTERN = re.compile(r"[0-9a-f]{1,32}")
TOKEN_ENV = "MBP_SEARCH_TOKEN"
SERVER_ENV = "MBP_SEARCH_SERVER"
MIN_TOKEN_LENGTH = 16
PROGRESS_WRITE_S = 0.5   # the driver rewrites its progress file at most this often
KEEP_MESSAGES = 100
SHUTDOWN_GRACE_S = 30.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() + "Z" if t else None


class ApiError(Exception):
    """An expected failure of a request: status code, one-line detail, optional extras."""

    def __init__(self, status: int, detail: str, **extra):
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- request bodies ------------------------------------------------------------------------
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=2000)]


class SubmitRequest(BaseModel):
    """The options of `search submit`, as JSON. Lists may be given as the CLI's comma strings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=1024,
                       description="Hub id, alias, built-in tiny-sdxl / tiny-sd, or an absolute path under an "
                                   "allowed model directory of the server")
    workers: Optional[int] = Field(None, ge=1, le=4096, description="evaluator actors [default: GPUs, else 2]")
    nbits: Union[str, int, list[int]] = "1,2,4,6,8"
    num_recipes: int = 7
    min_size: Optional[int] = None
    prompts: Optional[list[Prompt]] = Field(None, min_length=1, max_length=1024,
                                            description="calibration prompts (the CLI sends the lines of --prompts)")
    seed: int = 0
    steps: int = 1
    resolution: Optional[int] = None
    batch_size: int = 0
    precision: str = "auto"
    strategy: str = "apple"
    targets: Union[str, float, list[float], None] = None
    evals: str = "full"
    anchors: Union[str, int, list[int], None] = None
    curves: Optional[bool] = None
    resume: bool = Field(False, description="if an unfinished search has this model and config, resume it")

    def options(self) -> dict:
        """Parsed exactly as the CLI parses its flags (same functions, same messages)."""
        def text(v) -> str:
            return ",".join(map(str, v)) if isinstance(v, list) else str(v)

        options = dict(nbits=parse_nbits(text(self.nbits)), num_recipes=self.num_recipes, min_size=self.min_size,
                       seed=self.seed, steps=self.steps, resolution=self.resolution, batch_size=self.batch_size,
                       precision=self.precision, strategy=parse_strategy(self.strategy),
                       targets=parse_floats(text(self.targets), "--targets") if self.targets not in (None, "", []) else (),
                       evals=self.evals,
                       anchors=parse_nbits(text(self.anchors), "--anchors") if self.anchors not in (None, "", []) else None,
                       curves=self.curves)
        if self.prompts is not None:
            options["prompts"] = tuple(p.strip() for p in self.prompts if p.strip())
            if not options["prompts"]:
                raise ConfigError("prompts are all blank")
        return options


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: Optional[int] = Field(None, ge=1, le=4096)


# -- progress, written by the driver task, read by the service ------------------------------
class ProgressFile:
    """A `search.progress.Reporter` that keeps the driver's bars in a small JSON file
    (atomically replaced, at most every PROGRESS_WRITE_S): phases with their totals and done
    counts, and the last messages, so `search submit --server --wait` can draw the same bars."""

    def __init__(self, path: Path, run: str):
        self.path = path
        self.state: dict = {"run": run, "started_at": _iso(utcnow()), "phases": [], "messages": [], "seq": 0,
                            "result": None}
        self._last = 0.0
        self.write()

    def phase_start(self, phase: str, total: int) -> None:
        self.state["phases"].append({"phase": phase, "total": int(total), "done": 0})
        self.write()

    def advance(self, phase: str, n: int = 1) -> None:
        for entry in reversed(self.state["phases"]):
            if entry["phase"] == phase:
                entry["done"] += n
                break
        if time.monotonic() - self._last >= PROGRESS_WRITE_S:
            self.write()

    def phase_end(self, phase: str) -> None:
        self.write()

    def message(self, text: str) -> None:
        self.state["seq"] += 1
        self.state["messages"] = (self.state["messages"] + [[self.state["seq"], str(text)]])[-KEEP_MESSAGES:]
        self.write()

    def finish(self, **result) -> None:
        self.state["result"] = result
        self.write()

    def write(self) -> None:
        self._last = time.monotonic()
        self.state["updated_at"] = _iso(utcnow())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.path)
        except OSError as exc:  # progress is a convenience: never fail a search for it
            log.warning("cannot write progress file %s: %s", self.path, exc)


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- the driver task -------------------------------------------------------------------------
def _stale(s: Search) -> bool:
    now = utcnow()
    return s.effective_status(now) == "interrupted" or (now - (s.heartbeat_at or s.updated_at)).total_seconds() > STALE_AFTER_S


def _wait_for_gpus(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.cluster_resources().get("GPU", 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no GPU node joined the cluster within {timeout_s:.0f} s (autoscaler request "
                               "pending); check `ray status` and the cluster's max_workers / quotas")
        time.sleep(5)


def _drive(db_path: str, progress_path: str, prepared, workers: int | None, handed_from: str,
           wait_gpus_s: float) -> dict:
    """Run one search's driver (inside a Ray task on the service's node). Returns a summary;
    every failure of the search itself is recorded in the database by the driver."""
    from search.driver.driver import SearchFailed, SearchInterrupted
    from search.driver.jobs import run_search

    sid = prepared.search.id
    storage = Storage(db_path)
    try:
        if storage.get_search(sid).status == "cancelling":  # cancelled while queued
            storage.update_search(sid, status="cancelled")
            return {"id": sid, "status": "cancelled"}
        me = driver_id()
        try:
            storage.claim(sid, me, lambda cur: cur.owner == handed_from or _stale(cur))
        except StorageError as exc:  # another live driver holds it: leave it alone
            return {"id": sid, "status": "refused", "error": _one_line(exc)}
        reporter = ProgressFile(Path(progress_path), run=f"{me}@{time.time():.3f}")
        try:
            if wait_gpus_s > 0:
                reporter.message("waiting for the autoscaler to add GPU workers")
                _wait_for_gpus(wait_gpus_s)
            search, driver = run_search(storage, prepared, workers=workers, reporter=reporter)
        except (SearchInterrupted, SearchFailed):
            return {"id": sid, "status": storage.get_search(sid).status}
        except Exception as exc:
            s = storage.get_search(sid)
            if s.status in ACTIVE:  # failed before the driver took over (e.g. no GPUs)
                storage.update_search(sid, status="failed", error=_one_line(exc))
            raise
        reporter.finish(evaluations=driver.evaluations, reference_runs=driver.reference_runs,
                        first_result_s=driver.first_result_s)
        return {"id": sid, "status": search.status, "evaluations": driver.evaluations}
    finally:
        storage.close()


_drive_task = ray.remote(num_cpus=0, max_retries=0)(_drive)


# -- the service ---------------------------------------------------------------------------
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
        self.prepare_lock = threading.Lock()  # one model load (prepare/resume) at a time
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._gpus_requested = False

    # paths: only ever built from a validated, stored id
    def progress_path(self, sid: str) -> Path:
        return self._inside(self.data_dir / "progress" / f"{_checked_id(sid)}.json")

    def plot_path(self, sid: str) -> Path:
        return self._inside(self.data_dir / "plots" / f"{_checked_id(sid)}.png")

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
            self.tasks[sid] = _drive_task.options(scheduling_strategy=strategy, name=f"search-driver-{sid}").remote(
                str(self.db_path), str(self.progress_path(sid)), prepared, workers, self.owner,
                self.gpu_wait_s if self.request_gpus else 0.0)
        log.info("search %s: driver task started", sid)

    def hand_over(self, sid: str) -> None:
        """Take a resumable search for this service (refused if a live driver holds it) and
        show it as pending until its driver task claims it."""
        self.storage.claim(sid, self.owner, _stale)
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
            log.warning("cannot resume interrupted search %s: %s", sid, getattr(exc, "detail", None) or _one_line(exc))
        except Exception as exc:  # never let one search stop the service
            log.exception("resuming search %s failed: %s", sid, exc)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check_tasks()
                self._check_watch()
            except Exception as exc:  # pragma: no cover - keep monitoring whatever happens
                log.warning("monitor: %s", _one_line(exc))

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
                log.warning("search %s: driver task ended abnormally: %s", sid, _one_line(exc))
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

    # model paths of remote requests
    def check_model(self, model: str) -> str:
        """Built-in names, aliases and Hub ids pass; a path must be absolute and resolve under an
        allowed directory. Returns the name to use (a path fully resolved)."""
        from workers.models import ALIASES, BUILTIN_MODELS, _looks_like_path

        name = model.strip()
        if "\x00" in name:
            raise ApiError(422, "model name contains a NUL character")
        if name in BUILTIN_MODELS or name in ALIASES:
            return name
        path = Path(name)
        if not (_looks_like_path(name) or path.is_absolute() or name.startswith("~") or path.exists()):
            return name  # a Hub id; resolve_model checks it
        if not path.is_absolute():
            raise ApiError(422, f"model path '{name}' must be an absolute path on the server")
        resolved = path.resolve()
        if not self.allowed_model_dirs:
            raise ApiError(403, f"model path '{name}' refused: this server accepts no local model paths "
                                "(start it with --allow-model-dir DIR)")
        if not any(resolved == d or resolved.is_relative_to(d) for d in self.allowed_model_dirs):
            allowed = ", ".join(map(str, self.allowed_model_dirs))
            raise ApiError(403, f"model path '{name}' is outside the server's allowed model directories ({allowed})")
        return str(resolved)


def _checked_id(sid: str) -> str:
    if not isinstance(sid, str) or not ID_PATTERN.fullmatch(sid):
        raise ApiError(404, f"no search '{str(sid)[:40]}'")
    return sid


# -- read models ---------------------------------------------------------------------------
def summary(storage: Storage, s: Search, now: datetime) -> dict:
    return {"id": s.id, "model": s.model, "model_version": s.model_version, "status": s.effective_status(now),
            "phase": s.phase, "created_at": _iso(s.created_at), "evaluations": s.evaluations,
            "measurements": storage.count_measurements(s.id), "error": s.error}


def phase_counts(storage: Storage, s: Search, candidates: int) -> dict:
    """Absolute per-phase progress from the database (for searches without a progress file)."""
    counts = storage.count_measurements(s.id)
    nb = len(s.config.get("nbits", ()))
    recipes = storage.recipes(s.id)
    baselines = len(storage.baselines(s.id))
    full = s.config.get("evals", "full") == "full"
    return {
        "palettes": {"done": len(storage.palettes(s.id)), "total": candidates * nb},
        "isolated": {"done": counts.get("isolated", 0) + baselines, "total": candidates * nb + 2 if full else None},
        "cumulative": {"done": counts.get("cumulative", 0), "total": candidates * nb if s.config.get("curves") else 0},
        "recipes": {"done": sum(1 for r in recipes if r.psnr is not None), "total": len(recipes)},
    }


def detail(service: Service, s: Search, now: datetime) -> dict:
    storage = service.storage
    info = summary(storage, s, now)
    candidates = len(storage.layers(s.id))
    info.update(
        config=s.config, fingerprint=s.fingerprint, elapsed_s=s.elapsed_s, candidates=candidates,
        updated_at=_iso(s.updated_at), finished_at=_iso(s.finished_at), running_here=service.running(s.id),
        baselines={k: b.psnr for k, b in storage.baselines(s.id).items()},
        recipes=[{"key": r.key, "strategy": r.strategy, "avg_bits": r.avg_bits, "size_mb": r.size_mb,
                  "threshold": r.threshold, "predicted_psnr": r.predicted_psnr, "psnr": r.psnr}
                 for r in storage.recipes(s.id)],
        counts=phase_counts(storage, s, candidates),
        progress=read_progress(service.progress_path(s.id)),
    )
    return info


# -- the app -------------------------------------------------------------------------------
def create_app(db_path: Path | str, data_dir: Path | str, token: str | None = None, allowed_model_dirs=(),
               ray_address: str | None = None, resume_interrupted: bool = True, *, request_gpus: int = 0,
               gpu_wait_s: float = 1800.0) -> FastAPI:
    """The FastAPI app. Ray is joined (and interrupted searches resumed) at start-up: call
    ``app.state.service.start()`` first to fail fast, else the lifespan does it."""
    service = Service(db_path, data_dir, allowed_model_dirs=allowed_model_dirs, ray_address=ray_address,
                      resume_interrupted=resume_interrupted, request_gpus=request_gpus, gpu_wait_s=gpu_wait_s)

    @asynccontextmanager
    async def lifespan(_app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("mbp-search")
    except PackageNotFoundError:  # pragma: no cover
        pkg_version = "0"
    bearer = HTTPBearer(auto_error=False, description="the server's token (search serve --token / MBP_SEARCH_TOKEN)")
    app = FastAPI(title="mbp-search", version=pkg_version, lifespan=lifespan,
                  description="Mixed-bit palettization recipe searches: submit, watch, resume, cancel, download.",
                  dependencies=[Depends(bearer)] if token else [])
    app.state.service = service
    expected = token.encode() if token else None

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if expected is not None and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
                return JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"},
                                    content={"detail": "missing or wrong token: send 'Authorization: Bearer <token>' "
                                                       "(search ... --token / MBP_SEARCH_TOKEN)"})
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail, **exc.extra})

    @app.exception_handler(ConfigError)
    @app.exception_handler(ModelError)
    async def _bad_input(_request, exc: Exception):
        return JSONResponse(status_code=422, content={"detail": _one_line(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        return JSONResponse(status_code=422, content={"detail": f"{where}: {first['msg']}",
                                                      "errors": jsonable_encoder(errors)})

    def lookup(sid: str) -> Search:
        _checked_id(sid)
        try:
            return service.storage.get_search(sid)
        except StorageError as exc:
            msg = _one_line(exc)
            if "ambiguous" in msg:
                raise ApiError(409, msg) from None
            raise ApiError(404, f"no search '{sid}'") from None

    @app.get("/health", tags=["service"])
    def health() -> dict:
        """Liveness (no token needed)."""
        return {"status": "ok", "version": pkg_version}

    @app.get("/cluster", tags=["service"])
    def cluster() -> dict:
        """The Ray cluster the drivers run on."""
        res = ray.cluster_resources()
        nodes = [{"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"), "alive": n.get("Alive"),
                  "is_head": "node:__internal_head__" in n.get("Resources", {}),
                  "resources": {k: v for k, v in n.get("Resources", {}).items() if not k.startswith("node:")}}
                 for n in ray.nodes()]
        return {"resources": res, "nodes": nodes, "service_node": service.node_id}

    @app.post("/searches", status_code=201, tags=["searches"])
    def submit(body: SubmitRequest, response: Response) -> dict:
        """Create a search (or, with ``resume``, continue the unfinished one with the same model
        and config) and start its driver. Returns as soon as the search is stored: the model's
        UNet is loaded once here to list its candidate layers and fingerprint it."""
        from search.driver.jobs import DuplicateSearch, prepare_search, resolve_config
        from workers.models import resolve_model

        model = service.check_model(body.model)
        options = body.options()
        SearchConfig(**{k: v for k, v in options.items() if v is not None})  # fail before loading a model
        with service.prepare_lock:
            spec = resolve_model(model)
            config = resolve_config(spec, **options)
            try:
                prepared = prepare_search(service.storage, model, config, spec, resume_duplicate=body.resume)
            except DuplicateSearch as exc:
                raise ApiError(409, str(exc), existing=exc.existing.id) from None
            sid = prepared.search.id
            if not prepared.created:
                current = service.storage.get_search(sid)
                if service.running(sid) or (current.status in ACTIVE and not _stale(current)):
                    response.status_code = 200
                    return {**summary(service.storage, current, utcnow()), "created": False}
                service.hand_over(sid)
            service.launch(prepared, body.workers)
        return {**summary(service.storage, service.storage.get_search(sid), utcnow()), "created": prepared.created}

    @app.get("/searches", tags=["searches"])
    def list_searches() -> list[dict]:
        """Every search in the database, oldest first."""
        now = utcnow()
        return [summary(service.storage, s, now) for s in service.storage.list_searches()]

    @app.get("/searches/{search_id}", tags=["searches"])
    def get_search(search_id: str) -> dict:
        """Status, phase, per-phase counts (``counts`` from the database, ``progress`` the
        running driver's bars), baselines and recipes."""
        return detail(service, lookup(search_id), utcnow())

    @app.post("/searches/{search_id}/resume", status_code=202, tags=["searches"])
    def resume(search_id: str, body: Annotated[Optional[ResumeRequest], Body()] = None) -> dict:
        """Continue an interrupted, failed or cancelled search; stored results are kept."""
        s = lookup(search_id)
        if s.status == "completed":
            raise ApiError(409, f"search {s.id} is already completed; nothing to resume")
        if service.running(s.id) or (s.status in ACTIVE and not _stale(s)):
            raise ApiError(409, f"search {s.id} is already running")
        try:
            service.resume(s.id, body.workers if body else None)
        except StorageError as exc:
            raise ApiError(409, _one_line(exc)) from None
        info = summary(service.storage, service.storage.get_search(s.id), utcnow())
        return info

    @app.post("/searches/{search_id}/cancel", status_code=202, tags=["searches"])
    def cancel(search_id: str) -> dict:
        """Ask the search's driver to stop; it stores what it has and marks it cancelled (resumable)."""
        s = lookup(search_id)
        status = s.effective_status(utcnow())
        if status not in ACTIVE or not service.storage.request_cancel(s.id):
            raise ApiError(409, f"search {s.id} is not running (status {status})")
        return summary(service.storage, service.storage.get_search(s.id), utcnow())

    @app.get("/searches/{search_id}/recipes.json", tags=["downloads"])
    def recipes_json(search_id: str) -> Response:
        """The recipes and measurements in Apple's JSON format (what `search download` writes)."""
        from search.recipes.apple_json import to_apple_json
        from search.recipes.tables import build_report

        s = lookup(search_id)
        text = json.dumps(to_apple_json(build_report(service.storage, s)), indent=2, allow_nan=False)
        return Response(text + "\n", media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{s.id}-recipes.json"'})

    @app.get("/searches/{search_id}/plot.png", tags=["downloads"], response_class=FileResponse)
    def plot_png(search_id: str):
        """PSNR vs size reduction (what `search plot` draws), regenerated while the search changes."""
        from search.recipes.plot import plot_report
        from search.recipes.tables import build_report

        s = lookup(search_id)
        path = service.plot_path(s.id)
        fresh = (s.status == "completed" and s.finished_at is not None and path.exists()
                 and path.stat().st_mtime > s.finished_at.replace(tzinfo=timezone.utc).timestamp())
        if not fresh:
            tmp = path.with_name(f"{s.id}.{threading.get_ident()}.tmp.png")
            plot_report(build_report(service.storage, s), tmp)
            os.replace(tmp, path)
        return FileResponse(path, media_type="image/png", filename=f"{s.id}-psnr.png")

    return app


__all__ = ["create_app", "Service", "SubmitRequest", "ProgressFile", "TOKEN_ENV", "SERVER_ENV", "ID_PATTERN"]
