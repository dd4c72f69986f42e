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
    return [sys.executable, "-m", "search.cli.app", *map(str, args)]


def run_cli(*args: str, model_cache: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), cwd=ROOT, env=cli_env(model_cache, **env), capture_output=True, text=True,
                          timeout=timeout)


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


def submit_ok(*args, model_cache: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess, str]:
    """`search submit ARGS` run to the end; fails the test unless it succeeded. (process, search id)"""
    proc = run_cli("submit", *args, model_cache=model_cache, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, proc.stdout.split()[1]


def status_json(sid: str, db: Path, model_cache: Path) -> dict:
    return json.loads(run_cli("status", sid, "--db", db, "--json", model_cache=model_cache).stdout)


def download(db, sid, model_cache) -> dict:
    proc = run_cli("download", sid, "-o", "-", "--db", db, model_cache=model_cache)
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
