"""Opening a database safely: refuse foreign/corrupt/newer files before writing a byte."""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from common.errors import first_line
from storage.errors import StorageError, disk_error
from storage.migrations import LATEST_VERSION, migrate

SQLITE_MAGIC = b"SQLite format 3\x00"
APPLICATION_ID = 0x4D425053  # "MBPS": marks files this project created
BUSY_TIMEOUT_MS = 60_000


# Databases this process holds engines on. Closing *any* descriptor of a file drops the
# process's POSIX locks on it, so their headers are never read with a plain open() (SQLite
# would then let another process delete the WAL under our feet).
_LIVE: dict[str, int] = {}


def check_database_file(path: Path) -> None:
    """Inspect an existing file read-only; raise StorageError unless it is ours (or empty)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise StorageError(f"database path {path} is a directory, not a file")
    if not path.exists() or path.stat().st_size == 0:
        return
    if str(path.resolve()) not in _LIVE:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head != SQLITE_MAGIC:
            raise StorageError(f"{path} is not an SQLite database; pass another --db path (the file was left unchanged)")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{path} is corrupt or unreadable ({exc}); the file was left unchanged") from None
    if ok != "ok":
        raise StorageError(f"{path} failed SQLite's integrity check ({ok}); the file was left unchanged")
    if app_id != APPLICATION_ID and tables:
        raise StorageError(f"{path} is an SQLite database of another application; pass another --db path (the file was left unchanged)")
    if version > LATEST_VERSION:
        raise StorageError(
            f"{path} has schema version {version}, newer than this mbp-search understands ({LATEST_VERSION}); upgrade mbp-search"
        )


def make_engine(path: Path) -> Engine:
    """An engine whose transactions all BEGIN IMMEDIATE: concurrent writers queue on the busy
    timeout instead of failing with 'database is locked' on a read->write upgrade."""
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every test
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def open_engine(path: Path) -> Engine:
    path = Path(path).expanduser()
    check_database_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the database directory {path.parent}: {exc.strerror}") from None
    engine = make_engine(path)
    try:
        with engine.begin() as conn:
            migrate(conn, APPLICATION_ID)
    except Exception as exc:  # e.g. read-only file system, disk full
        engine.dispose()
        if isinstance(exc, StorageError):
            raise
        if (disk := disk_error(path, exc)) is not None:
            raise disk from None
        raise StorageError(f"cannot open database {path}: {first_line(exc)}") from None
    key = str(path.resolve())
    _LIVE[key] = _LIVE.get(key, 0) + 1
    event.listen(engine, "engine_disposed", lambda _e: _release(key))
    return engine


def _release(key: str) -> None:
    if _LIVE.get(key, 0) <= 1:
        _LIVE.pop(key, None)
    else:
        _LIVE[key] -= 1


class SessionFactory:
    def __init__(self, engine: Engine, path: Path):
        self._maker = sessionmaker(engine, expire_on_commit=False)
        self.path = path

    @contextmanager
    def scope(self) -> Iterator[Session]:
        """One short transaction: commit on success, roll back on any error, always close. A write
        the disk refuses (full, read-only) is a `DiskError` naming it; SQLite has rolled it back."""
        session = self._maker()
        try:
            yield session
            session.commit()
        except BaseException as exc:
            try:
                session.rollback()
            except Exception:  # the disk that refused the write may refuse the rollback's cleanup too
                pass
            if isinstance(exc, Exception) and (disk := disk_error(self.path, exc)) is not None:
                raise disk from None
            raise
        finally:
            session.close()
