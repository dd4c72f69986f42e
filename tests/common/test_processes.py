"""common.processes: telling at once that a search's driver process is gone."""
import os
import socket
import subprocess
import sys

from common.processes import process_gone, process_token


def test_token_names_this_process():
    host, pid, *start = process_token().split(":")
    assert host == socket.gethostname() and int(pid) == os.getpid()
    assert not process_gone(process_token())


def test_live_dead_reused_and_foreign_processes():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from common.processes import _start_time

        start = _start_time(child.pid)
        token = f"{socket.gethostname()}:{child.pid}" + (f":{start}" if start else "")
        assert not process_gone(token)  # running
        if start:  # the same pid with another start time: a reused pid, not our driver
            assert process_gone(f"{socket.gethostname()}:{child.pid}:{start}9")
        assert not process_gone(f"{socket.gethostname()}:{child.pid}")  # old tokens without a start time
    finally:
        child.kill()
        child.wait()
    assert process_gone(token)  # killed: gone at once
    assert not process_gone(f"another-host-{socket.gethostname()}:{child.pid}:1")  # other hosts: unknown
    assert not process_gone(None) and not process_gone("garbage")


def test_descendants_and_end_processes():
    """A child with a grandchild: both found below this process; ended (SIGTERM ignored by both:
    SIGKILL after the grace period); pids of another start time (reused) are left alone."""
    import signal
    import time

    from common.processes import descendants, end_processes, snapshot

    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while len(descendants(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = [child.pid, *descendants(child.pid)]
        assert len(tree) == 2 and child.pid in descendants(os.getpid())
        procs = snapshot(tree)
        stale = {pid: f"{start}9" for pid, start in procs.items() if start}  # as if the pids were reused
        assert end_processes(stale, grace_s=0) == []
        t0 = time.monotonic()
        assert sorted(end_processes(procs, grace_s=0.5)) == sorted(tree)  # both ignored SIGTERM
        assert time.monotonic() - t0 < 5
        child.wait(10)
        assert child.returncode == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
