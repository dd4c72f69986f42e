"""Versioned schema steps keyed on SQLite's `PRAGMA user_version`.

Each step runs once, in order, inside the opening transaction; a database from an older
release is upgraded in place, one from a newer release is refused by the engine check.
Never edit a released step: add a new one.
"""
from __future__ import annotations

from typing import Callable

from sqlalchemy import Connection, text

from storage import schema
from storage.errors import StorageError


def _v1_initial(conn: Connection) -> None:
    schema.Base.metadata.create_all(conn, tables=[t.__table__ for t in schema.V1_TABLES])


def _v2_validations(conn: Connection) -> None:
    schema.Base.metadata.create_all(conn, tables=[t.__table__ for t in schema.V2_TABLES])


def _v3_preparing(conn: Connection) -> None:
    """Searches that exist before their model is fetched: the submitted request's hash (duplicates
    while preparing) and the bytes of weights fetched so far. A database created by this release
    already has the columns (v1 creates the current table), so only missing ones are added."""
    have = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(searches)")}
    for name, sql_type in (("request_hash", "VARCHAR(64)"), ("prepare_done", "INTEGER"),
                           ("prepare_total", "INTEGER")):
        if name not in have:
            conn.exec_driver_sql(f"ALTER TABLE searches ADD COLUMN {name} {sql_type}")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_searches_request_hash ON searches (request_hash)")


def _v4_palette_formats(conn: Connection) -> None:
    """Grouped palette formats (``4g16``): palettes and measurements get a ``group_size`` column,
    0 for per tensor, so every existing row reads as the per-tensor format it was. The palettes'
    uniqueness must include it (4 and 4g16 of one layer are two palettes), and SQLite cannot
    alter a constraint, so that table is rebuilt with its rows (ids kept)."""
    def columns(table: str) -> set[str]:
        return {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}

    if "group_size" not in columns("measurements"):
        conn.exec_driver_sql("ALTER TABLE measurements ADD COLUMN group_size INTEGER NOT NULL DEFAULT 0")
    if "group_size" not in columns("palettes"):
        conn.exec_driver_sql("ALTER TABLE palettes RENAME TO palettes_v3")
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_palettes_search_id")
        schema.Base.metadata.create_all(conn, tables=[schema.PaletteRow.__table__])
        conn.exec_driver_sql("INSERT INTO palettes (id, search_id, layer, bits, group_size, digest, weight_mse, path) "
                             "SELECT id, search_id, layer, bits, 0, digest, weight_mse, path FROM palettes_v3")
        conn.exec_driver_sql("DROP TABLE palettes_v3")


def _v5_coreml(conn: Connection) -> None:
    """The Core ML stage on a cluster: the job asked of a search and the packages shipped back."""
    schema.Base.metadata.create_all(conn, tables=[t.__table__ for t in schema.V5_TABLES])


def _v6_bundles(conn: Connection) -> None:
    """Resources folders for Apple's Swift pipeline (`search bundle`), one row per recipe."""
    schema.Base.metadata.create_all(conn, tables=[t.__table__ for t in schema.V6_TABLES])


def _measurement_reuse(conn: Connection) -> None:
    """Measurements shared across searches (docs/reuse.md): the key of what determines a value
    (``storage.measurement_keys``), indexed, on measurements, baselines and palettes; where a
    reused value came from; a search's count of reused results. Rows stored before this step
    keep a NULL key (which evaluator dtype measured them is not stored): they are never reused."""
    def columns(table: str) -> set[str]:
        return {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}

    if "reused" not in columns("searches"):
        conn.exec_driver_sql("ALTER TABLE searches ADD COLUMN reused INTEGER NOT NULL DEFAULT 0")
    for table, extra in (("measurements", ("reuse_device",)), ("baselines", ("reuse_device",)), ("palettes", ())):
        have = columns(table)
        for name in ("reuse_key", *extra, "reused_from"):
            if name not in have:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} VARCHAR(64)")
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS ix_{table}_reuse_key ON {table} (reuse_key)")


def _gallery_images(conn: Connection) -> None:
    """The gallery's images per recipe and prompt (issue 31)."""
    schema.Base.metadata.create_all(conn, tables=[t.__table__ for t in schema.GALLERY_TABLES])


def _coreai_bundles(conn: Connection) -> None:
    """Core AI folders per recipe (issue 36): their checks and the comparison with Apple's 4bit preset."""
    schema.Base.metadata.create_all(conn, tables=[t.__table__ for t in schema.COREAI_TABLES])


def _coreml_job_targets(conn: Connection) -> None:
    """What a queued Core ML phase builds when it is not the search's own target (issue 36)."""
    schema.Base.metadata.create_all(conn, tables=[t.__table__ for t in schema.JOB_TARGET_TABLES])


def _coreai_floor(conn: Connection) -> None:
    """Core AI folders keep the float16 floor their runtime check measured (issue 36): a nullable
    column, added only where missing (a database whose coreai_bundles came from this release has it)."""
    have = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(coreai_bundles)")}
    if "floor_psnr" not in have:
        conn.exec_driver_sql("ALTER TABLE coreai_bundles ADD COLUMN floor_psnr FLOAT")


STEPS: list[Callable[[Connection], None]] = [_v1_initial, _v2_validations, _v3_preparing, _v4_palette_formats,
                                             _v5_coreml, _v6_bundles, _measurement_reuse,
                                             _gallery_images, _coreai_bundles, _coreml_job_targets, _coreai_floor]
LATEST_VERSION = len(STEPS)


def current_version(conn: Connection) -> int:
    return int(conn.exec_driver_sql("PRAGMA user_version").scalar())


def migrate(conn: Connection, application_id: int) -> int:
    version = current_version(conn)
    if version > LATEST_VERSION:  # re-checked under the write lock
        raise StorageError(f"database schema version {version} is newer than this release ({LATEST_VERSION})")
    for number in range(version + 1, LATEST_VERSION + 1):
        STEPS[number - 1](conn)
        conn.exec_driver_sql(f"PRAGMA user_version={number}")
    if version == 0:
        conn.exec_driver_sql(f"PRAGMA application_id={application_id}")
    return LATEST_VERSION


__all__ = ["LATEST_VERSION", "migrate", "current_version", "text"]
