"""Who runs a search: a token naming this process (host, pid and the process's start time), and
whether the process a token names is gone.

A search records its driver's token. When that driver was killed (``kill -9``, a crash) its
heartbeat only goes stale after a minute; but on the same host we can tell at once: the pid no
longer exists, or it exists with another start time (the pid was reused by a new process).
"""
from __future__ import annotations

import os
import socket


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ..., start time)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().decode(errors="replace").rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    """The process's start time as an opaque, stable string (None if unknown or no process)."""
    try:
        return _stat(pid)[19]  # Linux: field 22, clock ticks since boot
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), read from /proc at once;
    [] where /proc is not there. A process reparented elsewhere (its parent died) is not below."""
    parents: dict[int, int] = {}
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for child in entries:
        try:
            parents[child] = int(_stat(child)[1])
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile
    found, generation = [], {pid}
    while generation:
        generation = {child for child, parent in parents.items() if parent in generation}
        found += sorted(generation)
    return found


def snapshot(pids) -> dict[int, str | None]:
    """pid -> start time, so that `end_processes` never signals a pid reused since."""
    return {pid: _start_time(pid) for pid in pids}


def _running(pid: int, start: str | None) -> bool:
    """``pid`` still runs and is the process of the snapshot (same start time; not a zombie)."""
    try:
        fields = _stat(pid)
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and (start is None or fields[19] == start)


def end_processes(procs: dict[int, str | None], grace_s: float = 3.0) -> list[int]:
    """SIGTERM the processes of a `snapshot` still running, SIGKILL those left after ``grace_s``
    (0: SIGKILL at once). Returns the pids that had to be killed."""
    import signal
    import time

    def signal_all(sig) -> list[int]:
        hit = []
        for pid, start in procs.items():
            if _running(pid, start):
                try:
                    os.kill(pid, sig)
                    hit.append(pid)
                except OSError:
                    pass
        return hit

    if grace_s > 0 and signal_all(signal.SIGTERM):
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_running(p, s) for p, s in procs.items()):
            time.sleep(0.05)
    return signal_all(signal.SIGKILL)
