"""The gallery through the service (docs/gallery.md): its status and rows, making it for a finished
search, and each image. An `APIRouter` that `search.service.app` includes; the app's token
middleware covers every route here.

``GET /searches/{id}/images`` -> ``{"status": "missing|running|done", "prompts": [...], "rows":
[{"key", "avg_bits", "psnr_mean", "ssim_mean", "worst_prompt", "images": [{"prompt", "psnr",
"ssim", "sha256", "url"}]}]}`` (`search.read_models.gallery`; the dashboard reads exactly this).
``POST /searches/{id}/images`` makes the missing images of a search that is not running, as a Ray
task on the service's node (the database and the gallery are local files there, as for the
drivers: search.service.driver_task). ``GET /searches/{id}/images/{key}/{n}.png`` serves a stored
image by its stored row, never by a path the client gives, with its sha256 as ETag and a year of
immutable caching (a 304 when the client has it).
"""
from __future__ import annotations

import re
from pathlib import Path

import ray
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from common.clock import utcnow
from search.read_models import gallery
from search.service.requests import ApiError, find_search
from search.service.responses import errors
from storage.gallery_store import GalleryFiles, GalleryStore, gallery_root
from storage.records import ACTIVE

router = APIRouter(tags=["gallery"])
CACHE = "public, max-age=31536000, immutable"
_NAME = re.compile(r"^(\d{1,6})\.png$")


def make_gallery(db_path: str, data_dir: str, search_id: str) -> dict:
    """The missing gallery images of a search (inside a Ray task on the service's node)."""
    from search.driver.driver import SearchDriver
    from storage import Storage
    from storage.package_store import PackageStore
    from workers.models import model_options, resolve_model

    storage = Storage(db_path)
    try:
        s = storage.get_search(search_id)
        driver = SearchDriver(storage, s, resolve_model(s.model, **model_options(s.config)))
        driver.packages = PackageStore(Path(data_dir) / "packages")  # its gallery: <data_dir>/gallery
        return {"id": search_id, "made": driver.run_gallery()}
    finally:
        storage.close()


gallery_task = ray.remote(num_cpus=0, max_retries=0)(make_gallery)


def _service(request: Request):
    return request.app.state.service


def _tasks(request: Request) -> dict:
    return request.app.state.__dict__.setdefault("gallery_tasks", {})


def _running(request: Request, sid: str) -> bool:
    ref = _tasks(request).get(sid)
    return ref is not None and not ray.wait([ref], timeout=0)[0]


@router.get("/searches/{search_id}/images", responses=errors(404, 409, 422))
def gallery_status(search_id: str, request: Request) -> dict:
    """The gallery of a search: missing, running or done; one row per float16 / linear_8bit /
    recipe with its mean image PSNR/SSIM against float16, worst prompt and images."""
    service = _service(request)
    s = find_search(service.storage, search_id)
    return gallery(service.storage, s, running=_running(request, s.id))


@router.post("/searches/{search_id}/images", status_code=202, responses=errors(404, 409, 422))
def gallery_start(search_id: str, request: Request) -> dict:
    """Make the missing images of a search that is not running (returns at once; the status says
    when it is done). A running search makes them itself after its recipes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    service = _service(request)
    s = find_search(service.storage, search_id)
    if s.status in ACTIVE and not s.driver_gone(utcnow()):
        raise ApiError(409, f"search {s.id} is running; its gallery phase follows the recipes")
    files = GalleryFiles(gallery_root(service.db_path, service.data_dir))
    whole = all(files.path(r.path).is_file() for r in GalleryStore(service.storage).images(s.id))
    if not _running(request, s.id) and (gallery(service.storage, s, images=False)["status"] != "done" or not whole):
        strategy = NodeAffinitySchedulingStrategy(service.node_id, soft=False)
        _tasks(request)[s.id] = gallery_task.options(scheduling_strategy=strategy, name=f"search-gallery-{s.id}").remote(
            str(service.db_path), str(service.data_dir), s.id)
    return gallery(service.storage, s, running=_running(request, s.id))


@router.get("/searches/{search_id}/images/{key}/{name}", response_class=FileResponse, responses={
    200: {"content": {"image/png": {}}, "description": "the image"}, 304: {"description": "not modified"},
    **errors(404, 409, 422)})
def gallery_image(search_id: str, key: str, name: str, request: Request):
    """One gallery image (``<n>.png``, n the prompt's index) of row ``key`` (original,
    linear_8bit or a recipe key); ETag: its sha256."""
    service = _service(request)
    s = find_search(service.storage, search_id)
    match = _NAME.match(name)
    record = None
    if match is not None:
        record = next((r for r in GalleryStore(service.storage).images(s.id)
                       if r.row == key and r.prompt == int(match.group(1))), None)
    if record is None:
        raise ApiError(404, f"search {s.id} has no gallery image '{key[:80]}/{name[:20]}'")
    files = GalleryFiles(gallery_root(service.db_path, service.data_dir))
    path = files.path(record.path).resolve()
    if not path.is_relative_to(files.root) or not path.is_file():
        raise ApiError(404, f"the gallery image '{key[:80]}/{name[:20]}' is missing on the server; POST "
                            f"/searches/{s.id}/images makes it again")
    etag = f'"{record.sha256}"'
    headers = {"ETag": etag, "Cache-Control": CACHE}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type="image/png", headers=headers)


__all__ = ["router", "make_gallery", "gallery_task"]
