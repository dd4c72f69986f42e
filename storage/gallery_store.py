"""The gallery's images (issue 31): PNG files under a root directory and one row each in SQLite.

Files: ``<root>/<search>/<row>/<prompt>.png`` (row: ``original``, ``linear_8bit`` or a recipe key,
made file-safe). The root is the service's data directory (``<data_dir>/gallery``) for searches
the service runs, and next to the database (``<db>.gallery``) for the command line's, as the
palettes are. A file is written atomically before its row, so a listed image is always whole;
a row is the resume point (an image is made once). Kept apart from `storage.api` (one job, one
module); it uses the same engine, one short transaction per call.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.dialects.sqlite import insert

from common.clock import utcnow
from common.files import atomic_write_bytes
from storage import schema as s
from storage.api import Storage
from storage.errors import disk_error

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class GalleryRecord:
    row: str          # original | linear_8bit | recipe key
    prompt: int       # prompt index, 0-based
    path: str         # relative to the gallery root
    sha256: str
    psnr: float | None  # dB against the float16 image; None: identical (infinite)
    ssim: float
    steps: int
    resolution: int
    node: str
    duration_s: float


def gallery_root_beside(db_path: Path | str) -> Path:
    """The command line's gallery: next to the database."""
    db_path = Path(db_path).expanduser()
    return db_path.parent / f"{db_path.name}.gallery"


def gallery_root(db_path: Path | str, data_dir: Path | str | None = None) -> Path:
    """``<data_dir>/gallery`` for the service, else next to the database."""
    return Path(data_dir) / "gallery" if data_dir is not None else gallery_root_beside(db_path)


def relative_path(search_id: str, row: str, prompt: int) -> str:
    return f"{search_id}/{_SAFE.sub('_', row)}/{int(prompt)}.png"


class GalleryFiles:
    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()

    def path(self, relative: str) -> Path:
        return self.root / relative

    def write(self, search_id: str, row: str, prompt: int, data: bytes) -> str:
        """Write one PNG atomically; returns its relative path. A full or read-only disk is a
        `DiskError` naming it."""
        rel = relative_path(search_id, row, prompt)
        path = self.path(rel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise disk_error(path, exc, "gallery image") or exc
        return rel

    def read(self, relative: str) -> bytes | None:
        """The file's bytes (None: missing, or a path outside the root)."""
        path = self.path(relative).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path.read_bytes()


class GalleryStore:
    def __init__(self, storage: Storage):
        self.scope = storage.session_scope

    def add(self, search_id: str, r: GalleryRecord) -> None:
        """Store (or replace) one image's row."""
        values = dict(search_id=search_id, row_key=r.row, prompt=r.prompt, path=r.path, sha256=r.sha256, psnr=r.psnr,
                      ssim=r.ssim, steps=r.steps, resolution=r.resolution, node=r.node, duration_s=r.duration_s,
                      created_at=utcnow())
        stmt = insert(s.GalleryImageRow).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["search_id", "row_key", "prompt"],
                                          set_={k: stmt.excluded[k] for k in values
                                                if k not in ("search_id", "row_key", "prompt")})
        with self.scope() as db:
            db.execute(stmt)

    def images(self, search_id: str) -> list[GalleryRecord]:
        """Every stored image of a search, by row key then prompt."""
        with self.scope() as db:
            rows = db.scalars(select(s.GalleryImageRow).where(s.GalleryImageRow.search_id == search_id)
                              .order_by(s.GalleryImageRow.row_key, s.GalleryImageRow.prompt)).all()
            return [GalleryRecord(r.row_key, r.prompt, r.path, r.sha256, r.psnr, r.ssim, r.steps, r.resolution, r.node,
                                  r.duration_s) for r in rows]

    def forget(self, search_id: str, rows: list[str] | None = None) -> int:
        """Drop the rows of ``rows`` (None: all) so they are made again; the files stay until then."""
        stmt = delete(s.GalleryImageRow).where(s.GalleryImageRow.search_id == search_id)
        if rows is not None:
            stmt = stmt.where(s.GalleryImageRow.row_key.in_(rows))
        with self.scope() as db:
            return db.execute(stmt).rowcount


__all__ = ["GalleryRecord", "GalleryFiles", "GalleryStore", "gallery_root", "gallery_root_beside", "relative_path"]
