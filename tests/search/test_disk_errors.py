"""A full disk and a database that became read-only, in the middle of a real search (real
driver process, real Ray, real SQLite on a real ext4 file system in a loop-mounted image): the
search stops with one line naming the disk and the way back, nothing committed is lost or
corrupt (SQLite's integrity check, the stored rows), and a resume once the disk takes writes
again ends with the uninterrupted run's JSON.

Needs root (mount, chattr); skipped with the reason elsewhere.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cli_helpers import comparable, counts, download, error_line, evaluations_this_run, run_cli, start_cli, submit_ok

pytestmark = pytest.mark.slow

ARGS = ["--model", "tiny-sdxl", "--nbits", "8", "--min-size", "16384", "--num-recipes", "3", "--workers", "2"]


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@contextmanager
def loop_mount(where: Path, size_mb: int):
    """A fresh ext4 file system of ``size_mb`` mounted at ``where`` (skips without root/loop devices)."""
    image, mnt = where / "disk.img", where / "mnt"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(size_mb << 20)
    for cmd in (("mkfs.ext4", "-q", "-F", str(image)), ("mount", "-o", "loop", str(image), str(mnt))):
        if shutil.which(cmd[0]) is None or (res := _sh(*cmd)).returncode != 0:
            pytest.skip(f"cannot make a test file system here ({' '.join(cmd[:2])}: "
                        f"{'not installed' if shutil.which(cmd[0]) is None else res.stderr.strip()[:200]})")
    try:
        yield mnt
    finally:
        _sh("chattr", "-R", "-i", str(mnt))
        for _ in range(20):
            if _sh("umount", str(mnt)).returncode == 0:
                break
            time.sleep(0.5)
        else:
            _sh("umount", "-l", str(mnt))
        image.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_cache):
    db = tmp_path_factory.mktemp("ref") / "s.db"
    _, sid = submit_ok(*ARGS, "--db", db, model_cache=model_cache)
    return dict(report=download(db, sid, model_cache), total=counts(db)["evaluations"])


def rows(db: Path) -> dict[str, float]:
    """Every result the file holds, by key: measurements, baselines, measured recipes (PSNR)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {**dict(con.execute("SELECT key, psnr FROM measurements")),
                **{f"baseline/{n}": v for n, v in con.execute("SELECT name, psnr FROM baselines")},
                **{f"recipe/{k}": v for k, v in con.execute("SELECT key, psnr FROM recipes WHERE psnr IS NOT NULL")}}
    finally:
        con.close()


def check_nothing_lost(db: Path, seen: dict[str, float]) -> dict[str, float]:
    """After the stop: every result stored before it is still there with its value, and the
    search's evaluation counter counts exactly the results the file holds."""
    after = rows(db)
    assert {k: after.get(k) for k in seen} == seen
    assert counts(db)["evaluations"] == len(after), (counts(db), len(after))
    return after


def start_until(db: Path, model_cache, condition, timeout: float = 600):
    """Start a search; once ``condition(counts)`` holds, return it with the results stored by then."""
    proc = start_cli("submit", *ARGS, "--db", db, model_cache=model_cache)
    sid = proc.stdout.readline().split()[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = counts(db)
        if c and condition(c):
            return proc, sid, rows(db)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, 9)
    pytest.fail(f"condition never met: {counts(db)}")


def stopped_line(proc) -> str:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    return error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr))


def integrity(db: Path) -> str:
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def resume_matches(db: Path, sid: str, model_cache, reference) -> int:
    stored = counts(db)["evaluations"]
    res = run_cli("resume", sid, "--workers", "2", "--db", db, model_cache=model_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert evaluations_this_run(res.stderr) == reference["total"] - stored  # only what was missing
    assert counts(db)["evaluations"] == reference["total"]
    assert comparable(download(db, sid, model_cache)) == comparable(reference["report"])
    return stored


def test_full_disk_stops_the_search_and_a_resume_finishes_it(tmp_path, model_cache, reference):
    with loop_mount(tmp_path, 32) as mnt:
        db = mnt / "s.db"
        proc, sid, seen = start_until(db, model_cache, lambda c: c.get("isolated", 0) >= 10)
        filler = mnt / "filler"
        with open(filler, "wb") as fh:  # the disk fills up while the search writes
            try:
                while True:
                    fh.write(b"\0" * (1 << 16))
                    fh.flush()
            except OSError:
                pass
        line = stopped_line(proc)
        assert f"the disk at {mnt} is full" in line and f"search resume {sid}" in line, line
        filler.unlink()  # space freed
        assert integrity(db) == "ok"
        check_nothing_lost(db, seen)
        stored = resume_matches(db, sid, model_cache, reference)
        print(f"\nfull disk: {line}\n  {stored} of {reference['total']} evaluations stored; the resume redid none")


def test_read_only_database_stops_the_search_and_a_resume_finishes_it(tmp_path, model_cache, reference):
    with loop_mount(tmp_path, 64) as mnt:
        db = mnt / "s.db"
        proc, sid, seen = start_until(db, model_cache, lambda c: c.get("cumulative", 0) >= 10)
        locked = [db, Path(f"{db}-wal"), mnt / "s.db.palettes"]
        res = _sh("chattr", "+i", *map(str, locked))  # the database becomes read-only under the driver
        if res.returncode != 0:
            os.killpg(proc.pid, 9)
            pytest.skip(f"chattr +i is refused here: {res.stderr.strip()[:200]}")
        line = stopped_line(proc)
        assert str(db) in line and "read-only" in line and f"search resume {sid}" in line, line
        _sh("chattr", "-i", *map(str, locked))
        assert integrity(db) == "ok"
        check_nothing_lost(db, seen)
        stored = resume_matches(db, sid, model_cache, reference)
        print(f"\nread-only database: {line}\n  {stored} of {reference['total']} evaluations stored; the resume redid none")
