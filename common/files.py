"""Atomic file writes (readers never see a half-written file or directory, a crash leaves the old one),
and a file's sha256 read in blocks."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` next to ``path`` under a private name, flush it to disk, then rename it into place."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # unique per writer
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_dir(tmp: Path | str, final: Path | str) -> None:
    """Put a fully built directory ``tmp`` in place as ``final`` (same file system): an existing
    one is moved aside, then deleted, so readers never see a half-written directory."""
    tmp, final = Path(tmp), Path(final)
    os.chmod(tmp, 0o755)
    if final.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{final.name}-stale-", dir=final.parent))
        os.replace(final, stale / final.name)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)


def sha256_of(path: Path | str, block: int = 8 * 2**20) -> str:
    """The file's sha256, read ``block`` bytes at a time (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()
