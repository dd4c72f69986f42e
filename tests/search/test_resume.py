"""Interrupted searches resume exactly: real driver processes killed with real signals,
real Ray, real SQLite. Each resumed search must end equal to an uninterrupted one."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import time

import pytest

from tests.cli_helpers import (STALE, comparable, counts, download, error_line, evaluations_this_run, floor_probes,
                               run_cli, start_cli, submit_ok)
from tests.reference.json_checks import check_apple_recipes_from_json
from tests.search.test_service import alive, descendants

pytestmark = pytest.mark.slow

SMALL = ["--model", "tiny-sdxl", "--nbits", "2,8", "--min-size", "16384", "--num-recipes", "25", "--workers", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_cache):
    db = tmp_path_factory.mktemp("ref") / "s.db"
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


KILL_POINTS = {
    "isolated": lambda c: c.get("isolated", 0) >= 10,
    "cumulative": lambda c: c.get("cumulative", 0) >= 10,
    "recipes": lambda c: c.get("recipes_measured", 0) >= 1,
}


@pytest.mark.parametrize("phase", list(KILL_POINTS))
def test_sigkill_then_resume_recomputes_only_missing(tmp_path, model_cache, reference, phase):
    db = tmp_path / "s.db"
    proc, sid = start_and_wait(db, model_cache, KILL_POINTS[phase])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    before = counts(db)
    stored_before = before["evaluations"]
    assert 0 < stored_before < reference["total"], before
    time.sleep(2.5)  # let the heartbeat go stale

    rows = json.loads(run_cli("list", "--json", "--db", db, model_cache=model_cache, **STALE).stdout)
    assert rows[0]["status"] == "interrupted"
    # Submitting the same search again is refused with the way out...
    dup = run_cli("submit", *SMALL, "--db", db, model_cache=model_cache, **STALE)
    assert dup.returncode == 1 and f"search resume {sid}" in error_line(dup)

    # ...and resume (here via `submit --resume` for one case) computes exactly what is missing.
    args = ["submit", *SMALL, "--resume"] if phase == "recipes" else ["resume", sid, "--workers", "2"]
    res = run_cli(*args, "--db", db, model_cache=model_cache, **STALE)
    assert res.returncode == 0, res.stderr[-3000:]
    after = counts(db)
    assert after["evaluations"] == reference["total"]
    assert evaluations_this_run(res.stderr) == reference["total"] - stored_before
    for key in ("isolated", "cumulative", "baseline", "recipes", "recipes_measured"):
        assert after[key] == reference["counts"][key]
    m = re.search(r"first new result after ([\d.]+) s", res.stderr)
    print(f"\n[{phase}] stored before resume {stored_before}, recomputed {reference['total'] - stored_before}, "
          f"first new result {m.group(1) if m else '-'} s after resume start")
    assert comparable(download(db, sid, model_cache)) == comparable(reference["report"])


def test_sigkill_then_immediate_resume_takes_over(tmp_path, model_cache, reference):
    """As a new user would: `kill -9` the submit, then `search resume ID` at once, with the
    default 60 s heartbeat timeout. The driver ran on this host and its process is gone, so the
    search is interrupted now and the resume takes over instead of saying "already running"."""
    db = tmp_path / "s.db"
    proc, sid = start_and_wait(db, model_cache, lambda c: c.get("isolated", 0) >= 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    rows = json.loads(run_cli("list", "--json", "--db", db, model_cache=model_cache).stdout)
    assert rows[0]["status"] == "interrupted"
    res = run_cli("resume", sid, "--workers", "2", "--db", db, model_cache=model_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert counts(db)["evaluations"] == reference["total"]
    assert comparable(download(db, sid, model_cache)) == comparable(reference["report"])


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


@pytest.mark.timeout(1800)  # seven commands in a row
def test_ctrl_c_and_sigterm_in_every_phase_then_resume(tmp_path, model_cache, reference):
    """Ctrl-C or SIGTERM in each phase (start-up made slow on purpose by the MBP_SEARCH_SLOW_*
    test hooks): exit 130 within seconds, the search stored as interrupted, no process left
    (evaluators, raylet, agents); a second signal exits at once; every resume continues, and the
    search ends equal to an uninterrupted one. Also `search recipe` interrupted in its refinement."""
    db = tmp_path / "s.db"

    def status() -> str:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute("SELECT status FROM searches").fetchone()[0]
        finally:
            con.close()

    times = {}
    slow = {"MBP_SEARCH_SLOW_EVAL_S": "0.05"}  # each phase lasts long enough to be seen
    steps = [  # (label, command, when to signal, signals, test hooks)
        ("preparing", ["submit", *SMALL], lambda db, pid: phase_of(db) == "preparing" and status() == "running",
         (signal.SIGINT,), {"MBP_SEARCH_SLOW_LOAD_S": "600"}),
        ("starting", ["resume"], lambda db, pid: phase_of(db) == "starting" and has_evaluators(pid),
         (signal.SIGTERM,), {"MBP_SEARCH_SLOW_START_S": "600"}),
        ("isolated", ["resume"], at_phase("isolated"), (signal.SIGINT,), slow),
        ("cumulative", ["resume"], at_phase("cumulative"), (signal.SIGTERM, signal.SIGINT), slow),  # second: at once
        ("recipes", ["resume"], at_phase("recipes"), (signal.SIGTERM,), slow),
    ]
    sid = None
    for label, args, ready, sigs, env in steps:
        args = [*args, sid, "--workers", "2"] if args == ["resume"] else args
        stderr, times[label] = interrupt(db, model_cache, args, ready, sigs, **env)
        sid = sid or re.search(r"search resume (\w+)", stderr).group(1)
        if len(sigs) > 1:  # the second signal: no waiting for anything, not even the status update
            assert "interrupted again: exiting now" in stderr, stderr[-2000:]
        else:
            assert f"search resume {sid}" in stderr, stderr[-2000:]
            assert status() == "interrupted"  # marked at once, no heartbeat wait
    stored_before = counts(db)["evaluations"]
    res = run_cli("resume", sid, "--db", db, model_cache=model_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert evaluations_this_run(res.stderr) == reference["total"] - stored_before
    assert comparable(download(db, sid, model_cache)) == comparable(reference["report"])

    stderr, times["refinement"] = interrupt(
        db, model_cache, ["recipe", sid, "--bits", "5", "--refine-evals", "50"],
        lambda db, pid: counts(db).get("candidate", 0) >= 1, (signal.SIGINT,), **slow)
    assert error_line(subprocess.CompletedProcess([], 130, "", stderr)).startswith("error: interrupted")
    assert status() == "completed"
    print("\nseconds from the signal to the exit: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    assert max(times.values()) < 30, times  # minutes before this change; seconds on an idle machine


def test_item_failing_three_times_fails_the_search_then_resumes(tmp_path, model_cache, reference):
    db = tmp_path / "s.db"
    layer = reference["report"]["cumulative"]["8"]["metadata"]["candidates"][3]
    proc = run_cli("submit", *SMALL, "--db", db, model_cache=model_cache, MBP_SEARCH_FAIL_KEYS=f"isolated/8/{layer}")
    assert proc.returncode == 1
    line = error_line(proc)
    assert layer in line and "8 bits" in line and "3 times" in line and "search resume" in line
    status = json.loads(run_cli("list", "--json", "--db", db, model_cache=model_cache).stdout)[0]
    assert status["status"] == "failed" and layer in status["error"]
    sid = status["id"]
    res = run_cli("resume", sid, "--db", db, model_cache=model_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert comparable(download(db, sid, model_cache)) == comparable(reference["report"])


def test_killed_evaluator_is_replaced(tmp_path, model_cache, reference):
    """SIGKILL one evaluator process mid-run (as the OOM killer would): the search completes."""
    import ray

    from search.config import SearchConfig
    from search.driver.driver import SearchDriver
    from search.driver.jobs import prepare_search, resolve_config
    from search.driver.progress import NullReporter
    from storage import Storage
    from workers.models import resolve_model

    class KillOnce(NullReporter):
        driver = None
        killed = 0

        def advance(self, phase, n=1):
            if phase == "isolated" and not self.killed:
                self.killed = ray.get(self.driver.pool.slots[0].actor.pid.remote())
                os.kill(self.killed, signal.SIGKILL)

    spec = resolve_model("tiny-sdxl")
    config = resolve_config(spec, nbits=(2, 8), min_size=16384, num_recipes=25)
    assert isinstance(config, SearchConfig)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with Storage(tmp_path / "s.db") as st:
            prepared = prepare_search(st, "tiny-sdxl", config, spec)
            reporter = KillOnce()
            driver = SearchDriver(st, st.claim(prepared.search.id, "test", lambda s: True), spec, workers=2,
                                  reporter=reporter)
            reporter.driver = driver
            done = driver.run()
            assert reporter.killed and driver.pool.replacements >= 1
            assert done.status == "completed"
            assert done.evaluations == reference["total"]
    finally:
        ray.shutdown()


def test_resume_refuses_a_changed_model(tmp_path, model_cache, tiny_sdxl_spec):
    import shutil

    from safetensors.torch import load_file, save_file

    from search.driver.jobs import prepare_search, resolve_config
    from storage import Storage
    from workers.models import resolve_model

    model_dir = tmp_path / "my-model"
    shutil.copytree(tiny_sdxl_spec.location, model_dir)
    spec = resolve_model(str(model_dir))
    with Storage(tmp_path / "s.db") as st:
        sid = prepare_search(st, str(model_dir), resolve_config(spec, nbits=(8,), min_size=8192), spec).search.id
    for f in (model_dir / "unet").glob("*.safetensors"):
        tensors = load_file(f)
        name = next(k for k in tensors if k.endswith("conv_in.weight"))
        tensors[name] = tensors[name] * 1.5
        save_file(tensors, f)
    proc = run_cli("resume", sid, "--db", tmp_path / "s.db", model_cache=model_cache, **STALE)
    assert proc.returncode == 2 and "changed since" in error_line(proc)


def test_two_concurrent_searches_on_one_database(tmp_path, model_cache):
    db = tmp_path / "s.db"
    base = ["--model", "tiny-sdxl", "--min-size", "16384", "--num-recipes", "3", "--workers", "1"]
    procs = [start_cli("submit", *base, "--nbits", nbits, "--db", db, model_cache=model_cache) for nbits in ("8", "2")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
        assert "locked" not in stderr
    rows = json.loads(run_cli("list", "--json", "--db", db, model_cache=model_cache).stdout)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    for r in rows:
        assert r["measurements"] == {"isolated": 47, "cumulative": 47, "floor": floor_probes(47)}


def test_same_seed_and_config_twice_gives_identical_results(tmp_path, model_cache, reference):
    """A second, separate, uninterrupted run reproduces every measurement and recipe exactly."""
    db = tmp_path / "s.db"
    again = download(db, submit_ok(*SMALL, "--db", db, model_cache=model_cache)[1], model_cache)
    assert again["recipes"] == reference["report"]["recipes"]
    assert comparable(again) == comparable(reference["report"])
