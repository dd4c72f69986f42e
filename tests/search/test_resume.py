"""Interrupted searches resume exactly: real driver processes killed with real signals,
real Ray, real SQLite. Each resumed search must end equal to an uninterrupted one (the
`reference` fixture, shared with test_resume_signals.py)."""
import json
import os
import re
import signal
import time

import pytest

from tests.cli_helpers import (STALE, comparable, counts, download, error_line, evaluations_this_run, run_cli,
                               submit_ok)
from tests.search.resume_helpers import MIN_SIZE, SMALL, start_and_wait

pytestmark = pytest.mark.slow


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
    config = resolve_config(spec, nbits=(2, 8), min_size=MIN_SIZE, num_recipes=25)  # SMALL's search
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


def test_same_seed_and_config_twice_gives_identical_results(tmp_path, model_cache, reference):
    """A second, separate, uninterrupted run reproduces every measurement and recipe exactly."""
    db = tmp_path / "s.db"
    again = download(db, submit_ok(*SMALL, "--db", db, model_cache=model_cache)[1], model_cache)
    assert again["recipes"] == reference["report"]["recipes"]
    assert comparable(again) == comparable(reference["report"])
