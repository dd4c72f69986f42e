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
