"""Where the Core ML packages shipped to the head live: ``<root>/<search>/<key>.mlpackage.zip``,
and beside each the recipe's Resources folder for Apple's Swift pipeline, ``<key>.bundle.zip``.

A zip arrives in pieces into a private ``.partial`` file next to its final name and is renamed
into place only when complete and its digest checked (`commit`); the row that makes it visible
is written after that, so a partial file is never taken for a package.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
SUFFIX = ".mlpackage.zip"
BUNDLE_SUFFIX = ".bundle.zip"
COREAI_SUFFIX = ".coreai.zip"  # a recipe's Core AI folder (issue 36): one top folder CoreAI/
SUFFIXES = (SUFFIX, BUNDLE_SUFFIX, COREAI_SUFFIX)


def safe_name(key: str) -> str:
    """A recipe key as one file name (a stored key is already one; anything else is replaced)."""
    return _SAFE.sub("_", key)


def zip_name(key: str, suffix: str = SUFFIX) -> str:
    if suffix not in SUFFIXES:
        raise ValueError(f"unknown package suffix {suffix!r}")
    return f"{safe_name(key)}{suffix}"


class PackageWriter:
    """One package arriving in pieces: written and hashed as it comes."""

    def __init__(self, final: Path):
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        self.tmp, self.fh = Path(name), os.fdopen(fd, "wb")
        self.sha, self.size = hashlib.sha256(), 0

    def write(self, piece: bytes) -> None:
        self.fh.write(piece)
        self.sha.update(piece)
        self.size += len(piece)

    def commit(self, size: int, sha256: str) -> None:
        """Rename into place if what arrived is what the sender made; else drop it."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if (self.size, self.sha.hexdigest()) != (size, sha256):
            self.abort()
            raise OSError(f"{self.final.name} arrived damaged: {self.size} bytes, sha256 {self.sha.hexdigest()[:12]}"
                          f"..., sent {size} bytes, sha256 {sha256[:12]}...")
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


class PackageStore:
    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()

    @classmethod
    def beside(cls, db_path: Path | str) -> "PackageStore":
        """The local command line's store: next to the database, as the palettes are."""
        db_path = Path(db_path).expanduser()
        return cls(db_path.parent / f"{db_path.name}.packages")

    def relative_path(self, search_id: str, key: str, suffix: str = SUFFIX) -> str:
        return f"{search_id}/{zip_name(key, suffix)}"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def writer(self, search_id: str, key: str, suffix: str = SUFFIX) -> PackageWriter:
        return PackageWriter(self.path(self.relative_path(search_id, key, suffix)))

    def complete(self, relative: str | None, size: int) -> bool:
        """The stored zip is there, whole."""
        if not relative:
            return False
        p = self.path(relative)
        return p.is_file() and p.stat().st_size == size
