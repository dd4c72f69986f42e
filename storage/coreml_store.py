"""The Core ML stage's rows: the job asked of a search (`CoreMLRequest`) and the packages shipped
back to the head (`PackageInfo`). Kept apart from `storage.api` (one job, one module); it uses
the same engine, one short transaction per call."""
from __future__ import annotations

import json

from sqlalchemy import select, update
from sqlalchemy.dialects.sqlite import insert

from common.clock import utcnow
from storage import schema as s
from storage.api import Storage
from storage.records import BundleInfo, CoreMLRequest, PackageInfo

JOB_STATES = ("queued", "running", "completed", "failed", "interrupted")


def _request(row: s.CoreMLJobRow) -> CoreMLRequest:
    return CoreMLRequest(row.search_id, row.recipes, row.coreml_node, row.status, row.error, row.node, row.seconds,
                         row.updated_at)


class CoreMLStore:
    def __init__(self, storage: Storage):
        self.scope = storage.session_scope

    def request(self, search_id: str, recipes: str, coreml_node: str) -> CoreMLRequest:
        """Ask for (or ask again for) the Core ML stage; packages already shipped are kept."""
        values = dict(search_id=search_id, recipes=recipes, coreml_node=coreml_node, status="queued", error=None,
                      updated_at=utcnow())
        stmt = insert(s.CoreMLJobRow).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["search_id"],
                                          set_={k: stmt.excluded[k] for k in values if k != "search_id"})
        with self.scope() as db:
            db.execute(stmt)
        return self.job(search_id)

    def job(self, search_id: str) -> CoreMLRequest | None:
        with self.scope() as db:
            row = db.scalar(select(s.CoreMLJobRow).where(s.CoreMLJobRow.search_id == search_id))
            return _request(row) if row else None

    def update(self, search_id: str, *, status: str | None = None, error: str | None = None,
               node: str | None = None, add_seconds: float = 0.0) -> None:
        """Also the heartbeat of a running job (``updated_at``). A new status clears the error."""
        assert status is None or status in JOB_STATES, status
        values: dict = {"updated_at": utcnow(), "seconds": s.CoreMLJobRow.seconds + add_seconds}
        if status is not None:
            values.update(status=status, error=error)
        if node is not None:
            values["node"] = node
        with self.scope() as db:
            db.execute(update(s.CoreMLJobRow).where(s.CoreMLJobRow.search_id == search_id).values(**values))

    def put_package(self, search_id: str, p: PackageInfo) -> None:
        """Stored only once the zip is complete and in place; a later one for the recipe replaces it."""
        values = dict(search_id=search_id, recipe_key=p.recipe_key, status=p.status, detail=p.detail, path=p.path,
                      size_bytes=p.size_bytes, sha256=p.sha256, node=p.node, ship_s=p.ship_s, created_at=utcnow())
        stmt = insert(s.CoreMLPackageRow).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["search_id", "recipe_key"],
                                          set_={k: stmt.excluded[k] for k in values
                                                if k not in ("search_id", "recipe_key")})
        with self.scope() as db:
            db.execute(stmt)

    def packages(self, search_id: str) -> dict[str, PackageInfo]:
        with self.scope() as db:
            rows = db.scalars(select(s.CoreMLPackageRow).where(s.CoreMLPackageRow.search_id == search_id)
                              .order_by(s.CoreMLPackageRow.id))
            return {r.recipe_key: PackageInfo(r.recipe_key, r.status, r.detail, r.path, r.size_bytes, r.sha256,
                                              r.node, r.ship_s) for r in rows}

    def put_bundle(self, search_id: str, b: BundleInfo) -> None:
        """The latest bundle of a recipe wins (re-building replaces the row)."""
        values = dict(search_id=search_id, recipe_key=b.recipe_key, status=b.status, detail=b.detail, path=b.path,
                      total_bytes=b.total_bytes, sha256=b.sha256, options_json=json.dumps(b.options, sort_keys=True),
                      node=b.node, seconds=b.seconds, zip_bytes=b.zip_bytes, created_at=utcnow())
        stmt = insert(s.BundleRow).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["search_id", "recipe_key"],
                                          set_={k: stmt.excluded[k] for k in values
                                                if k not in ("search_id", "recipe_key")})
        with self.scope() as db:
            db.execute(stmt)

    def bundles(self, search_id: str) -> dict[str, BundleInfo]:
        with self.scope() as db:
            rows = db.scalars(select(s.BundleRow).where(s.BundleRow.search_id == search_id).order_by(s.BundleRow.id))
            return {r.recipe_key: BundleInfo(r.recipe_key, r.status, r.detail, r.path, r.total_bytes, r.sha256,
                                             json.loads(r.options_json), r.node, r.seconds, r.zip_bytes) for r in rows}
