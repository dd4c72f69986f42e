"""What the resume tests share: the small search they interrupt, its uninterrupted reference
(computed once per test session, `tests/search/conftest.py`), and ways to start, watch and
signal a `search` command."""
import os
import signal
import sqlite3
import time

import pytest

from tests.cli_helpers import counts, download, evaluations_this_run, floor_probes, start_cli, submit_ok
from tests.reference.json_checks import check_apple_recipes_from_json
from tests.search.test_service import alive, descendants

# 26 candidate layers (--min-size 32768; 47 at 16384): enough for every kill point below (10
# isolated, 10 cumulative, a recipe measured) with about half the evaluations per search.
MIN_SIZE = 32768
SMALL = ["--model", "tiny-sdxl", "--nbits", "2,8", "--min-size", str(MIN_SIZE), "--num-recipes", "25", "--workers", "2"]


def uninterrupted_reference(db, model_cache) -> dict:
    """The small search run once without interruption: its JSON, stored counts and evaluations."""
    proc, sid = submit_ok(*SMALL, "--db", db, model_cache=model_cache)
    c = counts(db)
    total = c["isolated"] + c["cumulative"] + c["baseline"] + c["recipes"] + c["floor"]
    assert c["floor"] == floor_probes(c["isolated"] // 2)  # two bit depths
    assert c["evaluations"] == total == evaluations_this_run(proc.stderr)
    report = download(db, sid, model_cache)
    assert check_apple_recipes_from_json(report) == len(report["recipes"])
    return dict(report=report, counts=c, total=total)


def start_and_wait(db, model_cache, condition, timeout=300, **env):
    proc = start_cli("submit", *SMALL, "--db", db, model_cache=model_cache, **env)
    sid = proc.stdout.readline().split()[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = counts(db)
        if c and condition(c):
            return proc, sid
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"condition never met: {counts(db)}")



def phase_of(db) -> str | None:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            row = con.execute("SELECT phase FROM searches").fetchone()
        finally:
            con.close()
        return row and row[0]
    except sqlite3.OperationalError:  # not created yet
        return None


def has_evaluators(pid: int) -> bool:
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as fh:
                if b"Evaluator" in fh.read():
                    return True
        except OSError:
            pass
    return False


def interrupt(db, model_cache, args, ready, signals=(signal.SIGINT,), **env) -> tuple[str, float]:
    """Run `search ARGS`, wait until ``ready(db, pid)``, send ``signals``; the command must exit
    with 130 within seconds and no process it started (Ray's included) may be left.
    Returns (stderr, seconds from the signal to the exit)."""
    proc = start_cli(*args, "--db", db, model_cache=model_cache, **env)
    deadline = time.monotonic() + 300
    while not ready(db, proc.pid):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"never ready: phase {phase_of(db)}"
        time.sleep(0.05)
    tree = descendants(proc.pid)  # walked before the signal: everything the command started
    t0 = time.monotonic()
    for sig in signals:
        os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    exit_s = time.monotonic() - t0
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    wait_s = time.monotonic() + 3  # a SIGKILLed process may take a moment to be reaped
    while [p for p in tree if alive(p)] and time.monotonic() < wait_s:
        time.sleep(0.1)
    assert not [p for p in tree if alive(p)], f"left behind of {len(tree)}: {[p for p in tree if alive(p)]}"
    return stderr, exit_s


def at_phase(name):
    return lambda db, pid: phase_of(db) == name
