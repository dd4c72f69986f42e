"""Core AI folders per recipe (issue 36): one row each with its checks on the Linux Core AI runtime
(LUTs bit for bit, runtime PSNR against the search's measured PSNR) and the comparison with Apple's
4bit preset. Kept apart from `storage.api` (one concern, one module), on the same engine: one short
transaction per call. Only the driver (`search.driver.bundle_jobs`, the Core ML phase) writes it.
Also what a queued Core ML phase builds when a request names a target (`job_target`): the service's
request handler writes that one row, as it writes the Core ML job row itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects.sqlite import insert

from common.clock import utcnow
from storage import schema as s
from storage.api import Storage

STATES = ("built", "shipped", "failed")


@dataclass(frozen=True)
class CoreAIBundleInfo:
    """One recipe's Core AI folder: ``path`` is the folder (built locally) or the zip relative to
    the package store (shipped); ``comparison`` is ``{rows, delta_db, weights, ...}`` or None."""

    recipe_key: str
    status: str
    detail: str
    path: str | None
    total_bytes: int
    sha256: str
    zip_bytes: int
    luts_ok: bool | None
    luts_detail: str
    runtime_psnr: float | None
    measured_psnr: float | None
    runtime_ok: bool | None
    runtime_detail: str
    comparison: dict | None
    node: str
    seconds: float
    floor_psnr: float | None = None  # the runtime's float16 floor, when the runtime check measured it

    def __post_init__(self):
        if self.status not in STATES:
            raise ValueError(f"Core AI bundle status must be one of {', '.join(STATES)}, got {self.status!r}")

    @property
    def difference_db(self) -> float | None:
        """Runtime PSNR minus the search's measured PSNR (None when either is missing)."""
        if self.runtime_psnr is None or self.measured_psnr is None:
            return None
        return self.runtime_psnr - self.measured_psnr

    @property
    def ok(self) -> bool:
        return self.status != "failed" and self.luts_ok is True and self.runtime_ok is not False


_FIELDS = ("status", "detail", "path", "total_bytes", "sha256", "zip_bytes", "luts_ok", "luts_detail", "runtime_psnr",
           "measured_psnr", "runtime_ok", "runtime_detail", "node", "seconds",
           "floor_psnr")


class CoreAIStore:
    def __init__(self, storage: Storage):
        self.scope = storage.session_scope

    def put(self, search_id: str, b: CoreAIBundleInfo) -> None:
        """The latest folder of a recipe wins (building again replaces the row)."""
        values = dict(search_id=search_id, recipe_key=b.recipe_key, created_at=utcnow(),
                      comparison_json=None if b.comparison is None else json.dumps(b.comparison, sort_keys=True),
                      **{f: getattr(b, f) for f in _FIELDS})
        stmt = insert(s.CoreAIBundleRow).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["search_id", "recipe_key"],
                                          set_={k: stmt.excluded[k] for k in values
                                                if k not in ("search_id", "recipe_key")})
        with self.scope() as db:
            db.execute(stmt)

    def bundles(self, search_id: str) -> dict[str, CoreAIBundleInfo]:
        with self.scope() as db:
            rows = db.scalars(select(s.CoreAIBundleRow).where(s.CoreAIBundleRow.search_id == search_id)
                              .order_by(s.CoreAIBundleRow.id))
            return {r.recipe_key: CoreAIBundleInfo(
                r.recipe_key, **{f: getattr(r, f) for f in _FIELDS},
                comparison=None if r.comparison_json is None else json.loads(r.comparison_json)) for r in rows}


TARGETS = ("coreml", "coreai")


def search_target(search) -> str:
    """The target a search was submitted with (its config; coreml when it has none)."""
    return (search.config or {}).get("target") or "coreml"


def set_job_target(storage: Storage, search_id: str, target: str, compare_4bit: bool = True) -> None:
    """What the search's next Core ML phase builds (`POST /searches/{id}/coreml` with ``target``;
    ``compare_4bit``: Core AI folders also get the table against Apple's 4bit preset)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    values = dict(search_id=search_id, target=target, compare_4bit=bool(compare_4bit), updated_at=utcnow())
    stmt = insert(s.CoreMLJobTargetRow).values(**values)
    stmt = stmt.on_conflict_do_update(index_elements=["search_id"], set_={k: stmt.excluded[k] for k in values
                                                                           if k != "search_id"})
    with storage.session_scope() as db:
        db.execute(stmt)


def job_target(storage: Storage, search) -> str:
    """What the search's Core ML phase builds: the target its last request named, else its own."""
    with storage.session_scope() as db:
        stored = db.scalar(select(s.CoreMLJobTargetRow.target).where(s.CoreMLJobTargetRow.search_id == search.id))
    return stored or search_target(search)


def compares_4bit(storage: Storage, search_id: str) -> bool:
    """Whether the phase's Core AI folders get the 4bit table (True unless a request said no)."""
    with storage.session_scope() as db:
        stored = db.scalar(select(s.CoreMLJobTargetRow.compare_4bit).where(s.CoreMLJobTargetRow.search_id == search_id))
    return stored is not False


def from_result(key: str, result, *, status: str, path: str | None, sha256: str = "", zip_bytes: int = 0,
                node: str = "") -> CoreAIBundleInfo:
    """The row of a `workers.coreai.bundle.CoreAIResult` (plain attributes only: no import of workers)."""
    return CoreAIBundleInfo(key, status, summary(result), path,
                            result.total_bytes, sha256, zip_bytes, result.luts_ok, result.luts_detail,
                            result.runtime_psnr, result.measured_psnr, result.runtime_ok, result.runtime_detail,
                            result.comparison, node, result.seconds, getattr(result, "floor_psnr", None))


def summary(r) -> str:
    """The checks of a Core AI folder in one line, as stored and shown."""
    luts = f"{r.palettized_layers} layers' LUTs bit for bit {'ok' if r.luts_ok else 'FAILED: ' + r.luts_detail}"
    return f"{luts}; {r.runtime_detail}"


def failed(key: str, why: str, measured_psnr: float | None = None, node: str = "") -> CoreAIBundleInfo:
    """The row of a recipe whose Core AI folder could not be built (why: one line)."""
    return CoreAIBundleInfo(key, "failed", why, None, 0, "", 0, None, "", None, measured_psnr, None, "", None, node, 0.0)
