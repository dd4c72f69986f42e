"""The sha256 of a (possibly multi-GB) file, computed once and remembered by (path, size, mtime).

A single-file checkpoint or LoRA is identified by its content (a search on a changed file is a
new search), but hashing 6.9 GB takes tens of seconds: every resume, `status` or submit of the
same file would pay it again. The digest is stored in ``<cache>/file-digests/<key>.json`` where
the key hashes the resolved path, the size and the modification time in nanoseconds, so an
edited or replaced file (new mtime or size) is hashed afresh and an untouched one never is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.files import atomic_write_text, sha256_of


def _stat_key(path: Path) -> tuple[str, dict]:
    st = path.stat()
    facts = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest(), facts


def file_digest(path: Path | str, cache_dir: Path) -> str:
    """sha256 of ``path``, from ``cache_dir`` when its path, size and mtime are unchanged."""
    path = Path(path)
    key, facts = _stat_key(path)
    entry = Path(cache_dir) / "file-digests" / f"{key}.json"
    try:
        stored = json.loads(entry.read_text())
        if {k: stored.get(k) for k in facts} == facts and len(stored.get("sha256", "")) == 64:
            return stored["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_of(path)
    if _stat_key(path)[0] == key:  # not changed while it was read
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry, json.dumps({**facts, "sha256": digest}))
    return digest


__all__ = ["file_digest", "sha256_of"]
