"""Where the exact LUTs of a search live on disk: next to the database, keyed by search,
layer and palette format (``<layer>.4bit.npz``, ``<layer>.4g16bit.npz``), so the Core ML step
can reuse what was measured bit for bit."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from storage.errors import disk_error

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class PaletteStore:
    def __init__(self, db_path: Path):
        db_path = Path(db_path).expanduser()
        self.root = db_path.parent / f"{db_path.name}.palettes"

    def relative_path(self, search_id: str, layer: str, bits: int) -> str:
        return f"{search_id}/{_SAFE.sub('_', layer)}.{bits}bit.npz"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def path_for(self, search_id: str, layer: str, bits: int) -> Path:
        p = self.path(self.relative_path(search_id, layer, bits))
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write(self, search_id: str, layer: str, bits: int, save: Callable[[Path], None]) -> str:
        """``save(path)`` for this palette's file; returns its relative path. A full or read-only
        disk is a `DiskError` naming it (the file is written atomically: no half file is left)."""
        relative = self.relative_path(search_id, layer, bits)
        try:
            save(self.path_for(search_id, layer, bits))
        except OSError as exc:
            raise disk_error(self.root, exc, "palette store") or exc
        return relative
