"""The storage package's one error type (its own module, so every storage module can raise it),
and the one line for a write that failed because of the disk under it."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path


class StorageError(Exception):
    """A database that cannot be used; the message is one line for the user."""


class DiskError(StorageError):
    """A write refused by the file system (full, read-only): nothing committed is lost, and the
    search resumes once the disk takes writes again."""


# What SQLite says when the disk refuses a write (SQLITE_FULL, SQLITE_READONLY, SQLITE_IOERR,
# SQLITE_CANTOPEN for a journal it cannot create), and the errnos of the same for plain files.
_SQLITE_DISK = ("database or disk is full", "attempt to write a readonly database", "disk i/o error",
                "unable to open database file")
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EPERM, errno.EACCES)
_LOW_SPACE = 1 << 20


def mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def _read_only_fs(directory: Path) -> bool:
    """The file system refuses writes (remounted read-only, or read-only after an error)."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return True
        with tempfile.TemporaryFile(dir=directory):
            return False
    except OSError as exc:
        return exc.errno == errno.EROFS


def disk_error(path: Path | str, exc: BaseException, what: str = "database") -> DiskError | None:
    """The one line naming the disk when ``exc`` (an sqlite3 / SQLAlchemy error or an OSError
    while writing ``path``) comes from a full or read-only disk or file; None otherwise."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in _DISK_ERRNOS and not any(m in text for m in _SQLITE_DISK):
        return None
    path = Path(os.path.abspath(path))
    mount = mount_point(path)
    directory = path if path.is_dir() else path.parent
    if code == errno.EROFS or _read_only_fs(directory if directory.exists() else mount):
        return DiskError(f"cannot write the {what} {path}: the file system at {mount} is read-only; make it "
                         "writable again")
    files = [path] if path.is_dir() else [path, Path(f"{path}-wal"), Path(f"{path}-journal")]
    locked = [f for f in files if f.exists() and not os.access(f, os.W_OK)]
    if locked:
        return DiskError(f"cannot write the {what} {path}: {locked[0]} became read-only (permissions or an "
                         "immutable flag); make it writable again")
    free = shutil.disk_usage(mount).free
    if free < _LOW_SPACE or "full" in text or code in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(f"cannot write the {what} {path}: the disk at {mount} is full ({free / 1e6:.1f} MB "
                         "free); free space there")
    return None  # an I/O error on a disk that takes writes and has room: not ours to explain
