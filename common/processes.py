"""Who runs a search: a token naming this process (host, pid and the process's start time), and
whether the process a token names is gone.

A search records its driver's token. When that driver was killed (``kill -9``, a crash) its
heartbeat only goes stale after a minute; but on the same host we can tell at once: the pid no
longer exists, or it exists with another start time (the pid was reused by a new process).
"""
from __future__ import annotations

import os
import socket


def _start_time(pid: int) -> str | None:
    """The process's start time as an opaque, stable string (None if unknown or no process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:  # Linux: field 22, clock ticks since boot
            stat = fh.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.3f}"
    except Exception:
        return None


def process_token() -> str:
    """``host:pid:start`` of this process (``host:pid`` where the start time is unknown)."""
    pid = os.getpid()
    start = _start_time(pid)
    return f"{socket.gethostname()}:{pid}" + (f":{start}" if start else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def process_gone(token: str | None) -> bool:
    """True only when ``token`` names a process on this host that no longer runs (its pid is
    free, or now belongs to a process started at another time). Other hosts: False (unknown)."""
    if not token:
        return False
    parts = token.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    if not _alive(pid):
        return True
    if len(parts) >= 3:
        start = _start_time(pid)
        return start is not None and start != parts[2]
    return False
