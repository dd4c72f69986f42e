"""Running the real `search` command in subprocesses, as a user would."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env(model_cache: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(MBP_SEARCH_CACHE=str(model_cache), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", COLUMNS="200")
    env.pop("MBP_SEARCH_DB", None)
    env.update(extra)
    return env


def cli_cmd(*args: str) -> list[str]:
    """The command line of `search ARGS`. A `submit` that says nothing of the gallery gets
    `--no-gallery`: full images cost a search ~20 % more and are the subject of
    tests/search/test_gallery.py only (searches through the service keep the default, so the phase
    also runs inside the service, multinode and dashboard tests)."""
    args = [str(a) for a in args]
    if args[:1] == ["submit"] and not any(a.startswith(("--gallery", "--no-gallery")) for a in args):
        args.append("--no-gallery")
    return [sys.executable, "-m", "search.cli.app", *args]


def run_cli(*args: str, model_cache: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), cwd=ROOT, env=cli_env(model_cache, **env), capture_output=True, text=True,
                          timeout=timeout)


def invoke_cli(*args: str, model_cache: Path, **env) -> subprocess.CompletedProcess:
    """`search ARGS` run in this process by typer's CliRunner (the same app, environment and
    error handling as `run_cli`, stdout and stderr kept apart), for tests of what a command says
    and its exit code, not of the process: a subprocess costs ~2 s of imports per call."""
    return invoke_with_env(cli_cmd(*args), cli_env(model_cache, **env))


def invoke_with_env(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """The command line ``argv`` (from `cli_cmd`) in this process with exactly the environment
    ``env`` while it runs (what is not in it is unset), as a CompletedProcess."""
    from typer.testing import CliRunner

    from search.cli import console
    from search.cli.app import app

    changes = {k: v for k, v in env.items() if os.environ.get(k) != v}
    changes.update({k: None for k in os.environ if k not in env})
    # rich fixes a console's width at creation when COLUMNS was set then; a subprocess reads env's
    widths = [(c, c._width) for c in (console.out, console.err)]
    for c, _ in widths:
        c._width = None
    try:
        res = CliRunner(env=changes).invoke(app, argv[3:])
    finally:
        for c, width in widths:
            c._width = width
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(argv, res.exit_code, res.stdout, res.stderr)


def start_cli(*args: str, model_cache: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(cli_cmd(*args), cwd=ROOT, env=cli_env(model_cache, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line a failing command prints (progress bars may precede it); fails the
    test on a traceback or on an error message spread over several lines."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    return errors[0]


def floor_probes(candidates: int) -> int:
    """How many evaluation-floor probes a search with this many candidates measures (each is one
    pipeline run, stored under the phase ``floor``): what search.recipes.noise_model picks."""
    from search.recipes.noise_model import floor_probe_plan

    return len(floor_probe_plan([f"layer{i}" for i in range(candidates)]))


def refined_lines(stderr: str) -> list[tuple[float, int]]:
    """(target bits, end-to-end measurements) of every 'target X bits: refined ... after N
    measurement(s)' line a search's refinement printed."""
    import re

    return [(float(b), int(n)) for b, n in
            re.findall(r"target ([\d.]+) bits: refined \S+ [\d.]+ dB after (\d+) measurement", " ".join(stderr.split()))]


STALE = {"MBP_SEARCH_STALE_S": "2"}  # a killed driver's heartbeat goes stale after 2 s, not 60


def session_dir(tmp_path_factory) -> Path:
    """The test session's own temp directory: under pytest-xdist the parent of each worker's
    basetemp, common to the session's workers (never to another session)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_search(tmp_path_factory, name: str, args: list, model_cache: Path, timeout: float = 900) -> dict:
    """`search submit ARGS --db DIR/searches.db` run to the end once per test session, by the first
    test (in any pytest-xdist worker) that asks for ``name``; the others wait for it. Files that
    ran the same search each ran it again (a default tiny-sdxl search: minutes). Each caller gets
    its own copy of the finished search's directory (database, palettes), so nothing one test
    does to it reaches another. Returns {"db", "id", "stdout", "stderr"}."""
    import shutil

    from filelock import FileLock

    shared = session_dir(tmp_path_factory) / f"shared-search-{name}"
    with FileLock(f"{shared}.lock"):
        done = shared / "submit.json"
        if not done.exists():
            shutil.rmtree(shared, ignore_errors=True)
            (shared / "run").mkdir(parents=True)
            proc = run_cli("submit", *args, "--db", shared / "run" / "searches.db", model_cache=model_cache,
                           timeout=timeout)
            assert proc.returncode == 0, proc.stderr[-3000:]
            done.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))
    mine = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(shared / "run", mine)
    out = json.loads(done.read_text())
    return {"db": mine / "searches.db", "id": out["stdout"].split()[1], **out}


def default_search(tmp_path_factory, model: str, model_cache: Path) -> dict:
    """`search submit --model MODEL --workers 2` with every other option at its default (Apple's
    analysis at 1, 2, 4, 6 and 8 bits), once per session: test_end_to_end.py and
    tests/reference/test_search_matches_reference.py check the same search."""
    return shared_search(tmp_path_factory, f"{model}-default", ["--model", model, "--workers", "2"], model_cache)


def submit_ok(*args, model_cache: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess, str]:
    """`search submit ARGS` run to the end; fails the test unless it succeeded. (process, search id)"""
    proc = run_cli("submit", *args, model_cache=model_cache, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, proc.stdout.split()[1]


def status_json(sid: str, db: Path, model_cache: Path) -> dict:
    """`search status SID --json` (in-process: the command's output, not its process)."""
    return json.loads(invoke_cli("status", sid, "--db", db, "--json", model_cache=model_cache).stdout)


def download(db, sid, model_cache) -> dict:
    """`search download SID -o -` (in-process: the JSON it writes, not its process)."""
    proc = invoke_cli("download", sid, "-o", "-", "--db", db, model_cache=model_cache)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def comparable(report: dict) -> dict:
    """Everything except this project's run-specific bookkeeping (ids, timings, status)."""
    r = dict(report)
    extra = r.pop("mbp_search")
    r["thresholds"] = extra["thresholds"]
    return r


def counts(db) -> dict:
    """Stored rows per phase, read directly from the SQLite file (read-only, while a driver writes)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        out = dict(con.execute("SELECT phase, COUNT(*) FROM measurements GROUP BY phase").fetchall())
        out["baseline"] = con.execute("SELECT COUNT(*) FROM baselines").fetchone()[0]
        out["recipes"] = con.execute("SELECT COUNT(*) FROM recipes").fetchone()[0]
        out["recipes_measured"] = con.execute("SELECT COUNT(*) FROM recipes WHERE psnr IS NOT NULL").fetchone()[0]
        out["evaluations"] = con.execute("SELECT SUM(evaluations) FROM searches").fetchone()[0] or 0
        return out
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    finally:
        con.close()


def evaluations_this_run(stderr: str) -> int:
    m = re.search(r"(\d+) evaluations this run", stderr)
    assert m, stderr[-2000:]
    return int(m.group(1))
