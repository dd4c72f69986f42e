"""The one persistence API. Every call is its own short transaction (see SessionFactory.scope),
so a killed driver loses at most the results it had not yet handed to storage."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.dialects.sqlite import insert

from common.clock import utcnow
from common.formats import PaletteFormat, formats_json, recipe_formats
from storage import schema as s
from storage.engine import SessionFactory, open_engine
from storage.errors import StorageError
from storage.records import (ACTIVE, Baseline, Layer, Measurement, PaletteInfo, Search, StoredRecipe, Validation,
                             stored_format)
from storage.reuse_store import count_results


def _search(row: s.SearchRow) -> Search:
    return Search(
        id=row.id, model=row.model, model_version=row.model_version, model_location=row.model_location,
        model_source=row.model_source, fingerprint=row.fingerprint, config=json.loads(row.config_json),
        config_hash=row.config_hash, status=row.status, phase=row.phase, error=row.error, owner=row.owner,
        created_at=row.created_at, updated_at=row.updated_at, heartbeat_at=row.heartbeat_at,
        finished_at=row.finished_at, evaluations=row.evaluations, elapsed_s=row.elapsed_s,
        request_hash=row.request_hash, prepare_done=row.prepare_done, prepare_total=row.prepare_total,
        reused=row.reused or 0)


def _recipe(row: s.RecipeRow) -> StoredRecipe:
    return StoredRecipe(
        key=row.key, strategy=row.strategy, threshold=row.threshold,
        target=json.loads(row.target_json) if row.target_json else None,
        bits=recipe_formats(json.loads(row.bits_json)), avg_bits=row.avg_bits, size_mb=row.size_mb,
        predicted_psnr=row.predicted_psnr, psnr=row.psnr,
        per_prompt=tuple(json.loads(row.per_prompt_json)) if row.per_prompt_json else None,
        node=row.node, duration_s=row.duration_s)


def _layer_rows(search_id: str, layers: list[Layer]) -> list[s.LayerRow]:
    return [s.LayerRow(search_id=search_id, ordinal=i, name=l.name, kind=l.kind, numel=l.numel,
                       shape_json=json.dumps(list(l.shape))) for i, l in enumerate(layers)]


_VALIDATION_FIELDS = ("recipe_key", "mlpackage", "size_bytes", "avg_bits", "structural_ok", "structural_detail",
                      "numeric_psnr", "numeric_ok", "runtime_note", "node")

class Storage:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.engine = open_engine(self.path)
        self.session_scope = SessionFactory(self.engine, self.path).scope

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- searches -------------------------------------------------------------------------
    def create_search(self, *, model: str, model_version: str, model_location: str, model_source: str,
                      fingerprint: str, config: dict, config_hash: str, layers: list[Layer],
                      owner: str | None = None, request_hash: str | None = None, phase: str = "setup") -> Search:
        """Search row and its candidate layers in one transaction: all or nothing. A search still
        to be prepared has fingerprint "" and no layers (phase "preparing"; see `set_prepared`)."""
        now = utcnow()
        row = s.SearchRow(
            id=uuid.uuid4().hex[:12], model=model, model_version=model_version, model_location=model_location,
            model_source=model_source, fingerprint=fingerprint, config_json=json.dumps(config, sort_keys=True),
            config_hash=config_hash, status="pending", phase=phase, owner=owner, created_at=now,
            updated_at=now, heartbeat_at=now, evaluations=0, elapsed_s=0.0, request_hash=request_hash,
        )
        with self.session_scope() as db:
            db.add(row)
            db.flush()
            db.add_all(_layer_rows(row.id, layers))
            return _search(row)

    def get_search(self, search_id: str) -> Search:
        """Exact id or an unambiguous prefix of one."""
        with self.session_scope() as db:
            row = db.get(s.SearchRow, search_id)
            if row is None and search_id:
                rows = db.scalars(select(s.SearchRow).where(s.SearchRow.id.startswith(search_id, autoescape=True))).all()
                if len(rows) > 1:
                    raise StorageError(f"search id prefix '{search_id}' is ambiguous ({len(rows)} searches); give more characters")
                row = rows[0] if rows else None
            if row is None:
                raise StorageError(f"no search '{search_id}' in {self.path}; `search list` shows the ids")
            return _search(row)

    def list_searches(self) -> list[Search]:
        with self.session_scope() as db:
            return [_search(r) for r in db.scalars(select(s.SearchRow).order_by(s.SearchRow.created_at))]

    def find_unfinished(self, model_location: str, config_hash: str) -> list[Search]:
        with self.session_scope() as db:
            rows = db.scalars(select(s.SearchRow).where(
                s.SearchRow.model_location == model_location, s.SearchRow.config_hash == config_hash,
                s.SearchRow.status != "completed"))
            return [_search(r) for r in rows]

    def find_unfinished_request(self, request_hash: str) -> list[Search]:
        """Unfinished searches submitted with the same model and options (prepared or not)."""
        with self.session_scope() as db:
            rows = db.scalars(select(s.SearchRow).where(s.SearchRow.request_hash == request_hash,
                                                        s.SearchRow.status != "completed"))
            return [_search(r) for r in rows]

    def set_prepared(self, search_id: str, *, model_version: str, model_location: str, model_source: str,
                     fingerprint: str, config: dict, config_hash: str, layers: list[Layer]) -> Search:
        """A preparing search's model facts, once its weights are fetched: all or nothing."""
        with self.session_scope() as db:
            row = db.get(s.SearchRow, search_id)
            if row is None:
                raise StorageError(f"no search '{search_id}'")
            if row.fingerprint:
                raise StorageError(f"search {search_id} is already prepared")
            row.model_version, row.model_location, row.model_source = model_version, model_location, model_source
            row.fingerprint, row.config_json = fingerprint, json.dumps(config, sort_keys=True)
            row.config_hash, row.updated_at = config_hash, utcnow()
            db.add_all(_layer_rows(row.id, layers))
            return _search(row)

    def set_prepare_progress(self, search_id: str, done: int, total: int) -> None:
        """Bytes of weights fetched so far (also a heartbeat)."""
        with self.session_scope() as db:
            db.execute(update(s.SearchRow).where(s.SearchRow.id == search_id).values(
                prepare_done=int(done), prepare_total=int(total), heartbeat_at=utcnow()))

    def claim(self, search_id: str, owner: str, now_is_stale) -> Search:
        """Take ownership of a search for a driver; refuse if another live driver holds it.
        `now_is_stale(search)` decides whether the current holder is dead."""
        with self.session_scope() as db:
            row = db.get(s.SearchRow, search_id)
            if row is None:
                raise StorageError(f"no search '{search_id}'")
            current = _search(row)
            if row.status in ACTIVE and row.owner and row.owner != owner and not now_is_stale(current):
                raise StorageError(f"search {search_id} is already running (driver {row.owner}); wait for it or stop it first")
            if row.status == "completed":
                raise StorageError(f"search {search_id} is already completed; nothing to resume")
            row.status, row.owner, row.error = "running", owner, None
            row.heartbeat_at = row.updated_at = utcnow()
            return _search(row)

    def update_search(self, search_id: str, *, status: str | None = None, phase: str | None = None,
                      error: str | None = None, finished: bool = False, add_elapsed: float = 0.0) -> None:
        values: dict = {"updated_at": utcnow(), "heartbeat_at": utcnow()}
        if status is not None:
            values["status"] = status
            values["error"] = error
        if phase is not None:
            values["phase"] = phase
        if finished:
            values["finished_at"] = utcnow()
        if add_elapsed:
            values["elapsed_s"] = s.SearchRow.elapsed_s + add_elapsed
        with self.session_scope() as db:
            db.execute(update(s.SearchRow).where(s.SearchRow.id == search_id).values(**values))

    def request_cancel(self, search_id: str) -> bool:
        """Ask the driver of a running search to stop (it checks at every heartbeat)."""
        with self.session_scope() as db:
            res = db.execute(update(s.SearchRow).where(s.SearchRow.id == search_id,
                                                       s.SearchRow.status.in_(ACTIVE)).values(status="cancelling"))
            return res.rowcount == 1

    def heartbeat(self, search_id: str) -> None:
        with self.session_scope() as db:
            db.execute(update(s.SearchRow).where(s.SearchRow.id == search_id).values(heartbeat_at=utcnow()))

    def layers(self, search_id: str) -> list[Layer]:
        with self.session_scope() as db:
            rows = db.scalars(select(s.LayerRow).where(s.LayerRow.search_id == search_id).order_by(s.LayerRow.ordinal))
            return [Layer(r.name, r.numel, tuple(json.loads(r.shape_json)), r.kind) for r in rows]

    # -- palettes -------------------------------------------------------------------------
    def add_palette(self, search_id: str, info: PaletteInfo) -> bool:
        fmt = PaletteFormat.of(info.bits)
        stmt = insert(s.PaletteRow).values(search_id=search_id, layer=info.layer, bits=fmt.bits,
                                           group_size=fmt.group_size or 0, digest=info.digest,
                                           weight_mse=info.weight_mse, path=info.path, reuse_key=info.reuse_key,
                                           reused_from=info.reused_from).on_conflict_do_nothing()
        with self.session_scope() as db:
            return db.execute(stmt).rowcount == 1

    def palettes(self, search_id: str) -> dict[tuple[str, int], PaletteInfo]:
        with self.session_scope() as db:
            rows = db.scalars(select(s.PaletteRow).where(s.PaletteRow.search_id == search_id))
            return {(r.layer, f): PaletteInfo(r.layer, f, r.digest, r.weight_mse, r.path)
                    for r in rows for f in [stored_format(r.bits, r.group_size)]}

    # -- measurements ---------------------------------------------------------------------
    def add_measurement(self, search_id: str, m: Measurement) -> bool:
        """Insert once; a second insert of the same key is a no-op (returns False). One copied from
        another search (``reused_from``) counts as reused, not as an evaluation."""
        fmt = None if m.bits is None else PaletteFormat.of(m.bits)
        stmt = insert(s.MeasurementRow).values(
            search_id=search_id, key=m.key, phase=m.phase, bits=fmt and fmt.bits, group_size=fmt and fmt.group_size or 0,
            layer=m.layer, position=m.position,
            psnr=m.psnr, per_prompt_json=json.dumps(list(m.per_prompt)), node=m.node, worker=m.worker,
            duration_s=m.duration_s, created_at=utcnow(), reuse_key=m.reuse_key, reuse_device=m.reuse_device,
            reused_from=m.reused_from).on_conflict_do_nothing()
        with self.session_scope() as db:
            inserted = db.execute(stmt).rowcount == 1
            if inserted:
                count_results(db, search_id, reused=bool(m.reused_from), heartbeat=True)
            return inserted

    def measurements(self, search_id: str, phase: str | None = None) -> list[Measurement]:
        m = s.MeasurementRow  # plain rows, not ORM objects: 3x faster on an SDXL search's ~8,000
        q = select(m.key, m.phase, m.bits, m.group_size, m.layer, m.position, m.psnr, m.per_prompt_json, m.node,
                   m.worker, m.duration_s).where(m.search_id == search_id)
        if phase:
            q = q.where(m.phase == phase)
        with self.session_scope() as db:
            return [Measurement(key, ph, stored_format(bits, group), layer, pos, psnr, tuple(json.loads(pp)), node,
                                worker, dur)
                    for key, ph, bits, group, layer, pos, psnr, pp, node, worker, dur in db.execute(q.order_by(m.id))]

    def count_measurements(self, search_id: str) -> dict[str, int]:
        with self.session_scope() as db:
            rows = db.execute(select(s.MeasurementRow.phase, func.count()).where(
                s.MeasurementRow.search_id == search_id).group_by(s.MeasurementRow.phase))
            return {phase: n for phase, n in rows}

    def measured_keys(self, search_id: str) -> set[str]:
        with self.session_scope() as db:
            return set(db.scalars(select(s.MeasurementRow.key).where(s.MeasurementRow.search_id == search_id)))

    # -- baselines ------------------------------------------------------------------------
    def add_baseline(self, search_id: str, b: Baseline) -> bool:
        stmt = insert(s.BaselineRow).values(search_id=search_id, name=b.name, psnr=b.psnr, node=b.node,
                                            per_prompt_json=json.dumps(list(b.per_prompt)), duration_s=b.duration_s,
                                            reuse_key=b.reuse_key, reuse_device=b.reuse_device,
                                            reused_from=b.reused_from).on_conflict_do_nothing()
        with self.session_scope() as db:
            inserted = db.execute(stmt).rowcount == 1
            if inserted:
                count_results(db, search_id, reused=bool(b.reused_from))  # as add_measurement
            return inserted

    def baselines(self, search_id: str) -> dict[str, Baseline]:
        with self.session_scope() as db:
            rows = db.scalars(select(s.BaselineRow).where(s.BaselineRow.search_id == search_id))
            return {r.name: Baseline(r.name, r.psnr, tuple(json.loads(r.per_prompt_json)), r.node, r.duration_s)
                    for r in rows}

    # -- recipes --------------------------------------------------------------------------
    def add_recipe(self, search_id: str, r: StoredRecipe) -> bool:
        stmt = insert(s.RecipeRow).values(
            search_id=search_id, key=r.key, strategy=r.strategy, threshold=r.threshold,
            target_json=json.dumps(r.target) if r.target is not None else None,
            bits_json=json.dumps(formats_json(r.bits), sort_keys=True), avg_bits=r.avg_bits, size_mb=r.size_mb,
            predicted_psnr=r.predicted_psnr, created_at=utcnow(),
        ).on_conflict_do_nothing()
        with self.session_scope() as db:
            return db.execute(stmt).rowcount == 1

    def set_recipe_result(self, search_id: str, key: str, *, psnr: float, per_prompt: tuple[float, ...],
                          node: str, duration_s: float, count: bool = True) -> bool:
        """Store a recipe's end-to-end PSNR once; an already measured recipe is left alone.
        ``count=False``: the value comes from a stored measurement (no new pipeline run)."""
        with self.session_scope() as db:
            res = db.execute(update(s.RecipeRow).where(
                s.RecipeRow.search_id == search_id, s.RecipeRow.key == key, s.RecipeRow.psnr.is_(None)).values(
                psnr=psnr, per_prompt_json=json.dumps(list(per_prompt)), node=node, duration_s=duration_s))
            if res.rowcount == 1 and count:
                count_results(db, search_id, reused=False)
            return res.rowcount == 1

    def recipes(self, search_id: str) -> list[StoredRecipe]:
        with self.session_scope() as db:
            rows = db.scalars(select(s.RecipeRow).where(s.RecipeRow.search_id == search_id).order_by(s.RecipeRow.id))
            return [_recipe(r) for r in rows]

    # -- Core ML validations (the Validation fields stored as they are; runtime as JSON) -----
    def put_validation(self, search_id: str, v: Validation) -> None:
        """Latest validation of a recipe wins: re-applying replaces the previous record."""
        values = dict(search_id=search_id, **{f: getattr(v, f) for f in _VALIDATION_FIELDS}, created_at=utcnow(),
                      runtime_json=json.dumps(v.runtime) if v.runtime is not None else None)
        stmt = insert(s.ValidationRow).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["search_id", "recipe_key"],
                                          set_={k: stmt.excluded[k] for k in values if k not in ("search_id", "recipe_key")})
        with self.session_scope() as db:
            db.execute(stmt)

    def validations(self, search_id: str) -> dict[str, Validation]:
        with self.session_scope() as db:
            rows = db.scalars(select(s.ValidationRow).where(s.ValidationRow.search_id == search_id))
            return {r.recipe_key: Validation(**{f: getattr(r, f) for f in _VALIDATION_FIELDS},
                                             runtime=json.loads(r.runtime_json) if r.runtime_json else None) for r in rows}
