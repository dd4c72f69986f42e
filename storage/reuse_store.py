"""Stored results found by their key (``storage.measurement_keys``) in any search of the database,
and copied into another search in one transaction (docs/reuse.md).

A lookup is an ``IN`` on the indexed ``reuse_key`` column, a few hundred keys per statement,
never a scan: start-up costs the same with ten stored SDXL searches as with none
(benchmarks/reuse_startup.py). Rows with a NULL key (stored before keys existed) never match.
Also the search's result counters (`count_results`: reused vs evaluations), which every insert bumps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.dialects.sqlite import insert

from common.clock import utcnow
from common.formats import PaletteFormat
from storage import schema as s
from storage.records import Baseline, Measurement, PaletteInfo, stored_format

CHUNK = 500  # keys per statement (SQLite allows 32,766 parameters; small statements stay fast)


@dataclass(frozen=True)
class Found:
    """A stored result and where it came from: the search that measured it (a copy's source)."""
    source: str
    psnr: float
    per_prompt: tuple[float, ...]
    node: str
    worker: str
    duration_s: float
    device: str | None


def _find(storage, table, columns, keys, *, exclude: str, device: str | None) -> dict[str, tuple]:
    """key -> (source search, *columns) of the first stored row with that key outside ``exclude``."""
    keys, out = sorted(set(k for k in keys if k)), {}
    with storage.session_scope() as db:
        for i in range(0, len(keys), CHUNK):
            q = select(table.reuse_key, table.search_id, table.reused_from, *columns).where(
                table.reuse_key.in_(keys[i:i + CHUNK]), table.search_id != exclude)
            if device is not None and hasattr(table, "reuse_device"):
                q = q.where(table.reuse_device == device)
            for key, sid, source, *values in db.execute(q.order_by(table.id)):
                out.setdefault(key, (source or sid, *values))
    return out


def find_measurements(storage, keys, *, exclude: str, device: str | None) -> dict[str, Found]:
    """Stored measurements (any phase) by key; ``device`` None: from any device class."""
    m = s.MeasurementRow
    rows = _find(storage, m, (m.psnr, m.per_prompt_json, m.node, m.worker, m.duration_s, m.reuse_device), keys,
                 exclude=exclude, device=device)
    return {k: Found(src, psnr, tuple(json.loads(pp)), node, worker, dur, dev)
            for k, (src, psnr, pp, node, worker, dur, dev) in rows.items()}


def find_baselines(storage, keys, *, exclude: str, device: str | None) -> dict[str, Found]:
    b = s.BaselineRow
    rows = _find(storage, b, (b.psnr, b.per_prompt_json, b.node, b.duration_s, b.reuse_device), keys,
                 exclude=exclude, device=device)
    return {k: Found(src, psnr, tuple(json.loads(pp)), node, "", dur, dev)
            for k, (src, psnr, pp, node, dur, dev) in rows.items()}


def find_palettes(storage, keys, *, exclude: str) -> dict[str, PaletteInfo]:
    """Stored palettes by key, as this search would store them (same file, same digest)."""
    p = s.PaletteRow
    rows = _find(storage, p, (p.layer, p.bits, p.group_size, p.digest, p.weight_mse, p.path), keys,
                 exclude=exclude, device=None)
    return {k: PaletteInfo(layer, stored_format(bits, group), digest, mse, path, reuse_key=k, reused_from=src)
            for k, (src, layer, bits, group, digest, mse, path) in rows.items()}


def copy_results(storage, search_id: str, measurements: list[Measurement], baselines: list[Baseline],
                 palettes: list[PaletteInfo] = ()) -> int:
    """Insert copied results (each with ``reused_from``) in one transaction; rows the search
    already has are left alone. Adds the inserted measurements and baselines to the search's
    ``reused`` (palettes are not results) and returns that count."""
    def fmt(bits):
        return None if bits is None else PaletteFormat.of(bits)

    m_rows = [dict(search_id=search_id, key=m.key, phase=m.phase, bits=fmt(m.bits) and fmt(m.bits).bits,
                   group_size=fmt(m.bits) and fmt(m.bits).group_size or 0, layer=m.layer, position=m.position,
                   psnr=m.psnr, per_prompt_json=json.dumps(list(m.per_prompt)), node=m.node, worker=m.worker,
                   duration_s=m.duration_s, reuse_key=m.reuse_key, reuse_device=m.reuse_device,
                   reused_from=m.reused_from) for m in measurements]
    b_rows = [dict(search_id=search_id, name=b.name, psnr=b.psnr, per_prompt_json=json.dumps(list(b.per_prompt)),
                   node=b.node, duration_s=b.duration_s, reuse_key=b.reuse_key, reuse_device=b.reuse_device,
                   reused_from=b.reused_from) for b in baselines]
    p_rows = [dict(search_id=search_id, layer=p.layer, bits=fmt(p.bits).bits, group_size=fmt(p.bits).group_size or 0,
                   digest=p.digest, weight_mse=p.weight_mse, path=p.path, reuse_key=p.reuse_key,
                   reused_from=p.reused_from) for p in palettes]
    inserted = 0
    with storage.session_scope() as db:
        for table, rows in ((s.PaletteRow, p_rows), (s.MeasurementRow, m_rows), (s.BaselineRow, b_rows)):
            if not rows:
                continue
            count = select(func.count()).select_from(table).where(table.search_id == search_id)
            before = db.scalar(count)
            db.execute(insert(table).on_conflict_do_nothing(), rows)  # one executemany
            if table is not s.PaletteRow:  # rows the search already had were left alone: not counted
                inserted += db.scalar(count) - before
        if inserted:
            count_results(db, search_id, reused=True, n=inserted)
    return inserted


def count_results(db, search_id: str, *, reused: bool, n: int = 1, heartbeat: bool = False) -> None:
    """Add ``n`` stored results to the search's counters, in the caller's transaction: ``reused``
    (copied from another search, docs/reuse.md) or ``evaluations`` (pipeline runs of its own).
    One place for both, since every insert of a result (`storage.api.Storage`, `copy_results`) bumps one."""
    counter = "reused" if reused else "evaluations"
    values = {counter: getattr(s.SearchRow, counter) + n}
    if heartbeat:
        values["heartbeat_at"] = utcnow()
    db.execute(update(s.SearchRow).where(s.SearchRow.id == search_id).values(values))
