"""The Core ML stage through the service: queue it for a search, read its jobs, packages, bundles
and validations, download a package or a bundle (the recipe's Resources folder for Apple's Swift
pipeline, zipped). An `APIRouter` that `search.service.app` includes; the app's
token middleware covers every route here.

``POST /searches/{id}/coreml`` returns at once: for a completed search it starts the phase as a
Ray task on the service's node (search.service.coreml_task); for a running one it is queued and
the search's driver runs it after the recipes; an interrupted or failed one runs it when resumed.
Packages and bundles are served from the service's data directory by the stored key, never by a
path the user gives; each is listed only once its zip is stored whole (search.driver.coreml_phase).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from common.clock import utcnow
from common.errors import first_line
from common.formats import LUT_SPELLING_PATTERN
from search.read_models import bundles, coreml_progress
from search.service.progress_file import read_progress
from search.submit_options import APPLY_HELP, COREML_NODE_HELP, check_coreai_installed, parse_apply
from search.service.requests import ApiError, checked_id, find_search
from search.service.responses import errors
from storage import Search
from storage.coreai_store import search_target, set_job_target
from storage.coreml_store import CoreMLStore
from storage.package_store import BUNDLE_SUFFIX, COREAI_SUFFIX, SUFFIX, PackageStore
from storage.records import ACTIVE, STALE_AFTER_S

router = APIRouter(tags=["coreml"])
TARGET_HELP = ("what the phase builds: coreml (packages and Resources folders) or coreai (the folders Apple's Core AI "
               "exporter writes; 3-bit recipes are refused, each in one line, the others build) [default: the "
               "search's own target]")


class CoreMLBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apply: str = Field("all", min_length=1, max_length=8192, description=APPLY_HELP)
    coreml_node: Optional[Literal["coreml", "any"]] = Field(None, description=COREML_NODE_HELP + " [default: coreml; "
                                                            "any with target coreai]")
    target: Optional[Literal["coreml", "coreai"]] = Field(None, description=TARGET_HELP)
    compare_4bit: bool = Field(True, description="target coreai: also measure Apple's 4bit preset on the same "
                               "model and protocol (the table); false: the checks only")


def require_coreml_node(coreml_node: str) -> None:
    """409 with one line, at once, when the job needs a ``coreml`` node and the cluster has none."""
    from search.driver.coreml_jobs import ApplyError, require_node

    try:
        require_node(coreml_node)
    except ApplyError as exc:
        raise ApiError(409, str(exc)) from None


def checked_apply(apply: str | None, coreml_node: str | None, target: str = "coreml") -> tuple[str, str] | None:
    """The Core ML stage asked with a submit (``apply``/``coreml_node`` of the body), checked
    before anything is stored; None when not asked. ``target`` coreai: Core AI folders, any node
    by default, and the [coreai] extra must be installed here."""
    if apply is None:
        if coreml_node is not None:
            raise ApiError(422, "coreml_node: only with apply")
        return None
    keys, node = parse_apply(apply, coreml_node, target)  # ConfigError: 422 with its line
    require_coreml_node(node)
    return keys, node


def _service(request: Request):
    return request.app.state.service


def _search(service, sid: str) -> Search:
    return find_search(service.storage, sid)


def _progress_path(service, sid: str):
    return service.data_dir / "progress" / f"{checked_id(sid)}.coreml.json"


def _view(service, s: Search) -> dict:
    return {"id": s.id, "status": s.effective_status(utcnow()), "phase": s.phase,
            "coreml": coreml_progress(service.storage, s),
            "validations": {k: asdict(v) for k, v in service.storage.validations(s.id).items()},
            "bundles": bundles(service.storage, s), "progress": read_progress(_progress_path(service, s.id))}


def _launch(request: Request, s: Search) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from search.service.coreml_task import coreml_task

    service = _service(request)
    tasks = request.app.state.__dict__.setdefault("coreml_tasks", {})
    strategy = NodeAffinitySchedulingStrategy(service.node_id, soft=False)
    tasks[s.id] = coreml_task.options(scheduling_strategy=strategy, name=f"search-coreml-{s.id}").remote(
        str(service.db_path), str(service.packages_dir), str(_progress_path(service, s.id)), s.id)


def _running(request: Request, sid: str, job) -> bool:
    """A job's task is alive: this service's task has not ended, else (a search's driver, or a
    previous service) its heartbeat is fresh."""
    import ray

    if job is None or job.status != "running":
        return False
    ref = request.app.state.__dict__.get("coreml_tasks", {}).get(sid)
    if ref is not None:
        return not ray.wait([ref], timeout=0)[0]
    return (utcnow() - job.updated_at).total_seconds() < STALE_AFTER_S


@router.post("/searches/{search_id}/coreml", status_code=202, responses=errors(404, 409, 422))
def queue_coreml(search_id: str, request: Request, body: Annotated[Optional[CoreMLBody], Body()] = None) -> dict:
    """Apply the search's recipes with its exact palettes on the Core ML node, validate them and
    ship the packages to the head; with ``target`` coreai build their Core AI folders instead (any
    node by default). Returns at once; packages and folders already shipped are not redone."""
    service, body = _service(request), body or CoreMLBody()
    s = _search(service, search_id)
    target = body.target or search_target(s)
    keys, node = parse_apply(body.apply, body.coreml_node, target)
    check_coreai_installed(target)  # coreai: the [coreai] extra on the service, or one 422 line
    if s.status == "completed" and keys != "all":
        stored = {r.key for r in service.storage.recipes(s.id)}
        if unknown := [k for k in keys.split(",") if k not in stored]:
            raise ApiError(422, f"no recipe '{unknown[0]}' in search {s.id}; choose from: {', '.join(sorted(stored))}")
    require_coreml_node(node)
    jobs = CoreMLStore(service.storage)
    if _running(request, s.id, jobs.job(s.id)):
        raise ApiError(409, f"the Core ML phase of search {s.id} is already running")
    jobs.request(s.id, keys, node)
    set_job_target(service.storage, s.id, target, body.compare_4bit)
    if s.status == "completed":
        _launch(request, s)
        note = "started"
    elif s.status in ACTIVE and not s.driver_gone(utcnow()):
        note = "queued: runs after the search's recipes"
    else:
        note = f"queued: runs when search {s.id} is resumed"
    return {**_view(service, s), "note": note}


@router.get("/searches/{search_id}/coreml", responses=errors(404, 409, 422))
def coreml_status(search_id: str, request: Request) -> dict:
    """The Core ML job of a search, its packages (size, sha256), its validations and its bundles
    (the folder's total size; the zip's size and sha256 once shipped)."""
    service = _service(request)
    return _view(service, _search(service, search_id))


# -- a Mac outside the cluster (`search apply ID --server URL --here`) ------------------------
@router.get("/searches/{search_id}/coreml/recipes.json", responses=errors(404, 409, 422))
def here_job(search_id: str, request: Request) -> dict:
    """What a Core ML machine outside the cluster needs to apply the recipes itself: the model,
    its UNet fingerprint, the search's config, the recipes and which palettes they use (each from
    ``/coreml/palette``). No file path of the server."""
    from common.formats import formats_json, is_palettized

    service = _service(request)
    s = _search(service, search_id)
    recipes = service.storage.recipes(s.id)
    if not recipes:
        raise ApiError(409, f"search {s.id} has no recipes yet (status {s.effective_status(utcnow())})")
    stored = service.storage.palettes(s.id)
    used = sorted({(l, b) for r in recipes for l, b in r.bits.items() if is_palettized(b)},
                  key=lambda p: (p[0], str(p[1].to_json())))
    return {"id": s.id, "model": s.model, "fingerprint": s.fingerprint, "config": s.config,
            "recipes": [{"key": r.key, "bits": formats_json(r.bits), "avg_bits": r.avg_bits, "psnr": r.psnr}
                        for r in recipes],
            "palettes": [{"layer": l, "bits": str(b.to_json()), "digest": stored[(l, b)].digest if (l, b) in stored
                          else None} for l, b in used]}


@router.get("/searches/{search_id}/coreml/palette", response_class=FileResponse, responses=errors(404, 409, 422))
def here_palette(search_id: str, request: Request, layer: Annotated[str, Query(min_length=1)],
                 bits: Annotated[str, Query(pattern=LUT_SPELLING_PATTERN, examples=["4", "4g16"])]):
    """One exact palette the search measured (its stored .npz), by layer and format."""
    from common.formats import PaletteFormat
    from storage.palette_store import PaletteStore

    service = _service(request)
    s = _search(service, search_id)
    try:
        fmt = PaletteFormat.of(bits)
    except ValueError as exc:
        raise ApiError(422, f"bits: {first_line(exc)}") from None
    info = service.storage.palettes(s.id).get((layer, fmt))
    if info is None:
        raise ApiError(404, f"search {s.id} stores no palette for layer '{layer[:200]}' at {fmt}")
    store = PaletteStore(service.storage.path)
    path = store.path(info.path).resolve()
    if not path.is_relative_to(store.root.resolve()) or not path.is_file():
        raise ApiError(404, f"the palette of layer '{layer[:200]}' at {fmt} is missing on the server")
    return FileResponse(path, media_type="application/octet-stream", headers={"X-Palette-Digest": info.digest})


class ValidationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe_key: str = Field(..., min_length=1, max_length=512)
    mlpackage: str = Field(..., max_length=4096)
    size_bytes: int = Field(..., ge=0)
    avg_bits: float
    structural_ok: bool
    structural_detail: str = Field(..., max_length=20000)
    numeric_psnr: Optional[float] = None
    numeric_ok: Optional[bool] = None
    runtime: Optional[dict[str, float]] = None
    runtime_note: str = Field(..., max_length=2000)
    node: str = Field(..., min_length=1, max_length=300)


@router.post("/searches/{search_id}/coreml/validations", responses=errors(404, 409, 422))
def here_validations(search_id: str, request: Request, body: list[ValidationBody]) -> dict:
    """Validation results of recipes applied outside the cluster; they replace earlier ones."""
    from storage import Validation

    service = _service(request)
    s = _search(service, search_id)
    keys = {r.key for r in service.storage.recipes(s.id)}
    if unknown := [v.recipe_key for v in body if v.recipe_key not in keys]:
        raise ApiError(422, f"no recipe '{unknown[0][:200]}' in search {s.id}")
    for v in body:
        service.storage.put_validation(s.id, Validation(**v.model_dump()))
    return _view(service, s)


# declared last: the other /coreml/... routes are matched first
@router.get("/searches/{search_id}/coreml/{name}", response_class=FileResponse, responses={
    206: {"description": "the requested byte range"}, 416: {"description": "range not satisfiable"},
    **errors(404, 409, 422)})
def package_zip(search_id: str, name: str, request: Request):
    """One recipe's package as a zip (``<key>.mlpackage.zip``), its Resources folder for
    Apple's Swift pipeline (``<key>.bundle.zip``: one folder ``Resources/``), or its Core AI folder
    (``<key>.coreai.zip``: one folder ``CoreAI/``, the phase run with target coreai); Range requests
    resume a download. The ``X-Checksum-SHA256`` header is the digest of the whole zip."""
    service = _service(request)
    s = _search(service, search_id)
    store = CoreMLStore(service.storage)
    if name.endswith(SUFFIX):
        key, what = name[: -len(SUFFIX)], "package"
        p = store.packages(s.id).get(key)
        path, size, sha256 = (p.path, p.size_bytes, p.sha256) if p is not None else (None, 0, "")
    elif name.endswith(BUNDLE_SUFFIX):
        key, what = name[: -len(BUNDLE_SUFFIX)], "bundle"
        p = store.bundles(s.id).get(key)
        path, size, sha256 = (p.path, p.zip_bytes, p.sha256) if p is not None else (None, 0, "")
    elif name.endswith(COREAI_SUFFIX):  # a Core AI folder (issue 36: a search submitted with --target coreai)
        from storage.coreai_store import CoreAIStore

        key, what = name[: -len(COREAI_SUFFIX)], "Core AI folder"
        p = CoreAIStore(service.storage).bundles(s.id).get(key)
        path, size, sha256 = (p.path, p.zip_bytes, p.sha256) if p is not None else (None, 0, "")
    else:
        raise ApiError(404, f"no package '{name[:80]}': ask for <recipe key>{SUFFIX}, <recipe key>{BUNDLE_SUFFIX} "
                            f"or <recipe key>{COREAI_SUFFIX}")
    if p is None or p.status != "shipped":
        why = f" ({p.detail})" if p is not None and p.detail else ""
        raise ApiError(404, f"search {s.id} has no {what} for recipe '{key[:80]}'{why[:300]}")
    packages = PackageStore(service.packages_dir)
    file = packages.path(path).resolve()
    if not file.is_relative_to(packages.root) or not packages.complete(path, size):
        raise ApiError(404, f"the {what} of recipe '{key[:80]}' is missing on the server; apply it again")
    return FileResponse(file, media_type="application/zip", filename=f"{s.id}-{name}",
                        headers={"X-Checksum-SHA256": sha256})
