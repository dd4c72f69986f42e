"""`search serve`: the search service that runs on a cluster's head node.

An HTTP API (FastAPI, served by uvicorn) over the same SQLite database, palette store and Ray
cluster the local CLI uses. Request handlers only validate input, write rows and read them
back; no search ever runs inside a handler.

The parts: `requests` (JSON bodies, ids, model paths), `supervisor` (the `Service`: Ray, the
driver tasks, resume on restart), `driver_task` (one search's driver as a Ray task),
`progress_file` (its bars, for `--wait`); what a search looks like in a response is
search.read_models, shared with the command line's local mode.

**Security.** Optional bearer token (``Authorization: Bearer <token>``, compared with
`secrets.compare_digest`) on every route except ``/health`` and the dashboard's pages and assets
(`search.service.dashboard.is_public`: they hold no data; the page sends the token itself); ids
must be hex (anything else is 404, so no user string ever reaches a path); generated files live
under ``data_dir`` with names built from the stored id; a model given as a path must resolve
(symlinks followed) under one of ``allowed_model_dirs``, and an ``images_dir`` under one of
``allowed_images_dirs``; a client sends its own images instead (search.service.uploaded_images).
"""
from __future__ import annotations

import secrets
import threading
import time
from contextlib import asynccontextmanager
from datetime import timezone
from pathlib import Path
from typing import Annotated, Optional

import ray
from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPBearer

from common.clock import utcnow
from common.errors import first_line
from common.files import atomic_write_bytes
from search.config import ConfigError
from search import read_models
from search.read_models import search_detail, search_summary
from search.submit_options import check_coreai_installed
from search.service.coreml_routes import checked_apply, router as coreml_router
from search.service.gallery_routes import router as gallery_router
from search.service.recipe_routes import router as recipe_router
from search.service.driver_task import stale
from search.service.progress_file import read_progress
from search.service.dashboard import dashboard_router, is_public
from search.service.requests import (ApiError, ResumeRequest, SubmitRequest, body_refusal, check_model_files,
                                     find_search, submitted_images)
from search.service.responses import (DuplicateBody, SearchSummary, auth_responses, errors, install_error_handlers,
                                      links, public, unauthorized)
from search.service.supervisor import Service
from storage import Search, StorageError
from storage.coreml_store import CoreMLStore
from storage.records import ACTIVE
from workers.models import ModelError

PLOT_REFRESH_S = 5.0  # a running search's plot.png: drawing it per request cost the search half its speed


def create_app(db_path: Path | str, data_dir: Path | str, token: str | None = None, allowed_model_dirs=(),
               ray_address: str | None = None, resume_interrupted: bool = True, *, request_gpus: int = 0,
               gpu_wait_s: float = 1800.0, allowed_images_dirs=()) -> FastAPI:
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
                  dependencies=[Depends(bearer)] if token else [], responses=auth_responses(token),
                  docs_url=None, redoc_url=None)
    app.state.service = service
    expected = token.encode() if token else None
    plot_lock = threading.Lock()
    images_dirs = tuple(Path(d).expanduser().resolve() for d in allowed_images_dirs)  # --allow-images-dir

    @app.middleware("http")
    async def limit_submit_body(request: Request, call_next):  # uploaded images: bounded before parsing
        if request.method == "POST" and request.url.path.rstrip("/") == "/searches":
            refused = body_refusal(request.headers)
            if refused is not None:
                return refused
        return await call_next(request)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if expected is not None and not is_public(request.url.path):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
                return unauthorized()
        return await call_next(request)

    install_error_handlers(app, ApiError, (ConfigError, ModelError))
    public(app, "/health")
    by_id = errors(404, 409, 422)  # an unknown id, an ambiguous prefix
    created = links({"GetSearch": "get_search", "ResumeSearch": "resume_search", "CancelSearch": "cancel_search",
                     "RecipesJson": "recipes_json", "PlotPng": "plot_png"}, "search_id", "$response.body#/id")

    def lookup(sid: str) -> Search:
        return find_search(service.storage, sid)

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

    @app.post("/searches", status_code=201, tags=["searches"], responses={
        201: {"model": SearchSummary, "description": "created and started", "links": created},
        200: {"model": SearchSummary, "description": "resume=true: the same search, already running"},
        **errors(403, 409, 422, bodies={409: DuplicateBody})})
    def submit(body: SubmitRequest, response: Response) -> dict:
        """Create a search (or, with ``resume``, continue the unfinished one with the same model
        and options) and start its driver. Returns at once: the model name and options are
        checked here, without the network; resolving, downloading and fingerprinting the model
        are the search's ``preparing`` phase, in its driver."""
        from search.driver.jobs import DuplicateSearch, submit_search
        from workers.models import model_key

        model = service.check_model(body.model)
        check_model_files(body.loras, body.config_dir, service.allowed_model_dirs)  # before anything reads them
        model_key(model)  # unknown names, bad repo ids, directories that are no pipeline: 422 now
        options = body.options()  # validated: fails before anything is stored (images_dir aside, next line)
        check_coreai_installed(options["target"])  # --target coreai: the [coreai] extra here, or one 422 line
        coreml = checked_apply(body.apply, body.coreml_node, options["target"])  # the Core ML stage asked too
        options["images_dir"] = submitted_images(body, images_dirs, service.data_dir)  # allowed, or uploaded
        with service.prepare_lock:  # the duplicate check and the insert, together
            try:
                prepared = submit_search(service.storage, model, options, resume_duplicate=body.resume)
            except DuplicateSearch as exc:
                raise ApiError(409, str(exc), existing=exc.existing.id) from None
            sid = prepared.search.id
            if not prepared.created:
                current = service.storage.get_search(sid)
                if service.running(sid) or (current.status in ACTIVE and not stale(current)):
                    response.status_code = 200
                    return {**search_summary(service.storage, current), "created": False}
                service.hand_over(sid)
            if coreml:
                CoreMLStore(service.storage).request(sid, *coreml)
            service.launch(prepared, body.workers)
        return {**search_summary(service.storage, service.storage.get_search(sid)), "created": prepared.created}

    @app.get("/searches", tags=["searches"], responses={200: {"model": list[SearchSummary]}})
    def list_searches() -> list[dict]:
        """Every search in the database, oldest first."""
        now = utcnow()
        return [search_summary(service.storage, s, now) for s in service.storage.list_searches()]

    @app.get("/searches/{search_id}", tags=["searches"], operation_id="get_search",
             responses={200: {"model": SearchSummary}, **by_id})
    def get_search(search_id: str) -> dict:
        """Status, phase, per-phase counts (``counts`` from the database, ``progress`` the
        running driver's bars), baselines and recipes."""
        s = lookup(search_id)
        return {**search_detail(service.storage, s), "running_here": service.running(s.id),
                "progress": read_progress(service.progress_path(s.id))}

    @app.post("/searches/{search_id}/resume", status_code=202, tags=["searches"], operation_id="resume_search",
              responses={202: {"model": SearchSummary}, **by_id})
    def resume(search_id: str, body: Annotated[Optional[ResumeRequest], Body()] = None) -> dict:
        """Continue an interrupted, failed or cancelled search; stored results are kept."""
        s = lookup(search_id)
        if s.status == "completed":
            raise ApiError(409, f"search {s.id} is already completed; nothing to resume")
        if service.running(s.id) or (s.status in ACTIVE and not stale(s)):
            raise ApiError(409, f"search {s.id} is already running")
        try:
            service.resume(s.id, body.workers if body else None)
        except StorageError as exc:
            raise ApiError(409, first_line(exc)) from None
        return search_summary(service.storage, service.storage.get_search(s.id))

    @app.post("/searches/{search_id}/cancel", status_code=202, tags=["searches"], operation_id="cancel_search",
              responses={202: {"model": SearchSummary}, **by_id})
    def cancel(search_id: str) -> dict:
        """Ask the search's driver to stop; it stores what it has and marks it cancelled (resumable)."""
        s = lookup(search_id)
        status = s.effective_status(utcnow())
        if status not in ACTIVE or not service.storage.request_cancel(s.id):
            raise ApiError(409, f"search {s.id} is not running (status {status})")
        return search_summary(service.storage, service.storage.get_search(s.id))

    @app.get("/searches/{search_id}/recipes.json", tags=["downloads"], operation_id="recipes_json", responses=by_id)
    def recipes_json(search_id: str) -> Response:
        """The recipes and measurements in Apple's JSON format (what `search download` writes)."""
        s = lookup(search_id)
        return Response(read_models.recipes_json(service.storage, s), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{s.id}-recipes.json"'})

    @app.get("/searches/{search_id}/plot.png", tags=["downloads"], response_class=FileResponse, operation_id="plot_png",
             responses={200: {"content": {"image/png": {}}, "description": "the plot"}, **by_id})
    def plot_png(search_id: str):
        """PSNR vs size reduction (what `search plot` draws), regenerated while the search changes."""
        s = lookup(search_id)
        path = service.plot_path(s.id)
        with plot_lock:  # one drawing at a time: concurrent requests for a plot share its file
            drawn = path.stat().st_mtime if path.exists() else None
            fresh = drawn is not None and (  # a running search's plot is redrawn at most every PLOT_REFRESH_S
                time.time() - drawn < PLOT_REFRESH_S if s.status in ACTIVE else
                s.finished_at is not None and drawn > s.finished_at.replace(tzinfo=timezone.utc).timestamp())
            if not fresh:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, read_models.plot_png(service.storage, s))
        return FileResponse(path, media_type="image/png", filename=f"{s.id}-psnr.png")

    app.include_router(coreml_router)
    app.include_router(gallery_router)  # the gallery: /searches/{id}/images (search.service.gallery_routes)
    app.include_router(recipe_router)  # `search recipe --server`
    app.include_router(dashboard_router(service))  # the pages at / and /docs, their assets and data
    return app


__all__ = ["create_app"]
