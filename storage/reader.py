"""Read-only access for watchers (the service's dashboard): the same read API as `Storage`, on
connections opened with SQLite's ``mode=ro`` whose transactions are plain deferred ``BEGIN``s.

Why: `Storage` begins every transaction IMMEDIATE (it takes the write lock up front, so writers
queue instead of failing on a read->write upgrade). A page polling every 2 s through it would
queue behind the driver's inserts and make them queue behind it. In WAL mode a deferred read
transaction takes no write lock at all: watchers never slow the driver, whatever they poll.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine

from storage import schema as s
from storage.api import Storage
from storage.engine import BUSY_TIMEOUT_MS, SessionFactory


def make_reader_engine(path: Path) -> Engine:
    """Read-only connections (``mode=ro``): a write through them fails, and none can lock."""
    engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true",
                           connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every dashboard request
        dbapi_conn.isolation_level = None
        dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN")  # deferred: a snapshot for reading, never the write lock

    return engine


class ReadOnlyStorage(Storage):
    """`Storage`'s read methods on read-only connections (its write methods fail). The database
    must exist and be migrated already: the service's writing `Storage` opens it first."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.engine = make_reader_engine(self.path)
        self.session_scope = SessionFactory(self.engine, self.path).scope

    def recent_evaluations(self, since: datetime, search_ids: list[str]) -> list[tuple]:
        """Measurements of these searches stored since ``since``, per (search, node, worker):
        (search id, node, worker, count, first stored, last stored): what the evaluators achieve
        right now. Only the searches asked for are read (through the search_id index)."""
        if not search_ids:
            return []
        m = s.MeasurementRow
        q = select(m.search_id, m.node, m.worker, func.count(), func.min(m.created_at), func.max(m.created_at)).where(
            m.search_id.in_(search_ids), m.created_at >= since).group_by(m.search_id, m.node, m.worker)
        with self.session_scope() as db:
            return [tuple(r) for r in db.execute(q)]
