"""Ctrl-C and SIGTERM in every phase, a changed model, two searches on one database: real
`search` processes, real Ray, real SQLite (split from test_resume.py so the two files run side
by side)."""
import json
import re
import signal
import sqlite3
import subprocess

import pytest

from tests.cli_helpers import (STALE, comparable, counts, download, error_line, evaluations_this_run, floor_probes,
                               run_cli, start_cli)
from tests.search.resume_helpers import SMALL, at_phase, has_evaluators, interrupt, phase_of

pytestmark = pytest.mark.slow


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
    base = ["--model", "tiny-sdxl", "--min-size", "32768", "--num-recipes", "1", "--workers", "1"]  # 26 layers
    procs = [start_cli("submit", *base, "--nbits", nbits, "--db", db, model_cache=model_cache) for nbits in ("8", "2")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
        assert "locked" not in stderr
    rows = json.loads(run_cli("list", "--json", "--db", db, model_cache=model_cache).stdout)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    for r in rows:
        assert r["measurements"] == {"isolated": 26, "cumulative": 26, "floor": floor_probes(26)}
    # Concurrent for real: each search stored results while the other was storing its own.
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        times = {sid: [t for (t,) in con.execute("SELECT created_at FROM measurements WHERE search_id = ? "
                                                 "ORDER BY created_at", (sid,))] for sid in (r["id"] for r in rows)}
    finally:
        con.close()
    (a, ta), (b, tb) = times.items()
    a_in_b = sum(tb[0] <= t <= tb[-1] for t in ta)
    b_in_a = sum(ta[0] <= t <= ta[-1] for t in tb)
    assert a_in_b >= 5 and b_in_a >= 5, (a_in_b, b_in_a, ta[0], ta[-1], tb[0], tb[-1])
    print(f"\nresults stored within the other search's span: {a_in_b} of {len(ta)}, {b_in_a} of {len(tb)}")
