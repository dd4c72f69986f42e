"""The web dashboard of `search serve`: the page at ``/`` (searches, one search, compare), the
OpenAPI page at ``/docs``, their scripts and styles (vendored, served from here: no CDN, so both
work on a cluster without internet), and the JSON the page polls.

**Token.** The pages and static files hold no data, so they are served without the token
(`is_public`); the page asks for the token once, keeps it in the tab's sessionStorage and sends
it as an ``Authorization`` header on every data request, never in a URL. Every data route keeps
requiring it (the app's middleware).

**Reads only.** The data routes read through a `storage.reader.ReadOnlyStorage` (read-only
connections, deferred transactions): any number of open dashboards never takes SQLite's write
lock, so they cannot slow the driver's inserts.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from search.service.dashboard_data import chart_data, chart_version, search_page, searches_rows
from search.service.progress_file import read_progress
from search.service.requests import ApiError, find_search
from search.service.responses import errors
from storage.reader import ReadOnlyStorage
from storage.records import ACTIVE

STATIC = Path(__file__).with_name("static")
PAGES = {"/": "index.html", "/docs": "docs.html"}
VENDOR_MAX_AGE_S = 86400  # pinned vendored files never change under one name
SHARED_S = 1.0  # pages poll every 2 s; what one computed serves the others for this long
CHART_REFRESH_S = 5.0  # while results arrive each second, the chart points are recomputed this often
CHARTS_KEPT = 32  # searches whose latest chart JSON the service keeps (~200 kB each at SDXL size)


def is_public(path: str) -> bool:
    """Paths served without the token: liveness, the two pages and their static files."""
    return path == "/health" or path in PAGES or path.startswith("/static/")


def _static_files() -> dict[str, Path]:
    """Every file the service may send under /static/, by name: a request can only pick one of
    these (nothing a user types becomes a path)."""
    return {p.relative_to(STATIC).as_posix(): p for p in sorted(STATIC.rglob("*")) if p.is_file()}


def dashboard_router(service) -> APIRouter:
    router = APIRouter()
    files = _static_files()
    readers: list[ReadOnlyStorage] = []
    lock = threading.Lock()
    charts: dict[str, tuple[str, bytes, float]] = {}  # search id -> (ETag, chart JSON, computed at): latest
    rows: dict[str, tuple] = {}  # search id -> (version, list row) of searches that are not active

    def reader() -> ReadOnlyStorage:
        """Opened on first use: the service's own `Storage` has created and migrated the file."""
        with lock:
            if not readers:
                readers.append(ReadOnlyStorage(service.db_path))
            return readers[0]

    shared: dict[tuple, tuple[float, object]] = {}  # (view, search id) -> (computed at, JSON)

    def once_per_poll(key: tuple, compute):
        """One computation of a view per SHARED_S, whatever number of pages poll it: three open
        dashboards cost the service (and the evaluators sharing its CPUs) what one costs."""
        now = time.monotonic()
        hit = shared.get(key)
        if hit is None or now - hit[0] > SHARED_S:
            hit = shared[key] = (now, compute())
        return hit[1]

    def page(path: str):
        return FileResponse(STATIC / PAGES[path], media_type="text/html", headers={"Cache-Control": "no-cache"})

    @router.get("/", include_in_schema=False)
    def index():
        return page("/")

    @router.get("/docs", include_in_schema=False)
    def docs():
        return page("/docs")

    @router.get("/static/{name:path}", include_in_schema=False)
    def static(name: str):
        path = files.get(name)
        if path is None:
            raise ApiError(404, "not found")
        cache = f"max-age={VENDOR_MAX_AGE_S}" if name.startswith("vendor/") else "no-cache"
        return FileResponse(path, headers={"Cache-Control": cache})

    @router.get("/dashboard/searches", tags=["dashboard"])
    def dashboard_searches() -> list[dict]:
        """Every search, newest first, with progress, ETA (at the last minute's rate) and the best
        recipe so far: the dashboard's list."""
        return once_per_poll(("list",), lambda: searches_rows(reader(), rows))

    by_id = errors(404, 409, 422)  # an unknown id, an ambiguous prefix

    @router.get("/dashboard/searches/{search_id}", tags=["dashboard"], responses=by_id)
    def dashboard_search(search_id: str) -> dict:
        """`GET /searches/{id}` plus per-phase wall times, evaluators (node, device, evaluations/s),
        progress with ETA and the best recipe so far."""
        r = reader()
        s = find_search(r, search_id)
        return once_per_poll(("search", s.id), lambda: {**search_page(r, s, read_progress(service.progress_path(s.id))),
                                                        "running_here": service.running(s.id)})

    @router.get("/searches/{search_id}/measurements", tags=["dashboard"],
                responses={304: {"description": "unchanged since the ETag sent in If-None-Match"}, **by_id})
    def measurements(search_id: str, request: Request):
        """The points of the dashboard's charts, computed as `search plot` computes them: recipes,
        linear 8-bit, cumulative curves per format, isolated PSNR per (layer, format) as
        ``[layer index, format index, PSNR dB, MB]``. Answers 304 to a matching ``If-None-Match``."""
        r = reader()
        s = find_search(r, search_id)
        etag = chart_version(r, s)
        cached = charts.get(s.id)
        if cached is not None and cached[0] != etag and s.status in ACTIVE and \
                time.monotonic() - cached[2] < CHART_REFRESH_S:
            etag = cached[0]  # a running search's charts are redrawn every CHART_REFRESH_S, not per result
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        if cached is None or cached[0] != etag:  # computed once per version, whatever number of pages ask
            cached = (etag, json.dumps(chart_data(r, s), allow_nan=False).encode(), time.monotonic())
            charts.pop(s.id, None)
            charts[s.id] = cached
            while len(charts) > CHARTS_KEPT:  # the least recently computed go first
                charts.pop(next(iter(charts)))
        return Response(cached[1], media_type="application/json", headers={"ETag": etag, "Cache-Control": "no-cache"})

    return router


__all__ = ["dashboard_router", "is_public"]
