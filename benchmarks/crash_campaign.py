"""Randomized crash campaign: searches on a tiny model SIGKILLed again and again at random moments
drawn from a seed, then resumed; each final JSON compared with an uninterrupted run's.

A moment is a point in the search's progress (the k-th stored result, k drawn uniformly, plus up
to 2 random seconds), so kills fall in every phase however slow the machine; after a driver kill,
the next kill comes, drawn likewise, 1-15 s into the resume (its own preparing and starting).

What gets killed (each kill's target drawn from the seed):
  driver     the `search submit` / `search resume` process with its local Ray (its process group)
  evaluator  one Ray evaluator process; the search goes on (its pool replaces it, re-queuing)
  resume     a driver, then the resume that follows it, a few seconds into its own resume
  service    a whole `search serve` (its process tree); started again, it resumes the search itself

Counted: kills per target and per phase the search was in (preparing, palettes, isolated,
cumulative, recipes, refinement = `candidates`); results lost (a result stored just before a
kill that the search's *final* database lacks or holds with another value: must be 0, so a resume
that drops or rewrites what was stored is caught, not only the kill itself); results redone (a
completing run's "N evaluations this run" above what was missing when it started: must be 0; a
completing run that does not print that line is an error); in-flight items re-queued after
evaluator kills (work redone by design: the killed evaluator's current item); final JSON
differences (0).

``--cover`` (what CI runs) kills one search once per target, in the order evaluator, driver,
resume, service: the search is resumed by `search resume`, then by a `search serve` on its
database (which resumes interrupted searches by itself), whose whole tree is killed in turn; a
last `search resume` completes it.

    python benchmarks/crash_campaign.py --kills 60 --seed 1 --out crash.json
    python benchmarks/crash_campaign.py --cover --small --seed 7 --out crash.json   (CI: test_crash_campaign.py)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cli_helpers import cli_cmd, cli_env, comparable  # noqa: E402  the tests' way of running the CLI
from tests.search.test_service import LISTENING, descendants, kill_tree  # noqa: E402
from benchmarks.search_state import evaluations, phase_of, query  # noqa: E402

CONFIG = ["--model", "tiny-sdxl", "--nbits", "2,8", "--min-size", "16384", "--strategy", "both", "--targets", "4",
          "--refine-evals", "4", "--num-recipes", "3", "--curves"]
# CI's: 26 layers, one depth, Apple's rule
SMALL = ["--model", "tiny-sdxl", "--nbits", "8", "--min-size", "32768", "--num-recipes", "2"]
TARGETS = ("driver", "evaluator", "resume", "service")
WORKERS = "2"
RESUME_S = 15.0  # a resume killed this soon after it started was killed during its own resume


# -- state and processes -----------------------------------------------------------------------
def stored_rows(db: Path) -> dict[str, object]:
    """Everything a search stores as it goes, by key, with its value: measurements, baselines and
    measured recipes (PSNR), palettes (digest)."""
    return ({k: v for k, v in query(db, "SELECT key, psnr FROM measurements")}
            | {f"baseline/{n}": v for n, v in query(db, "SELECT name, psnr FROM baselines")}
            | {f"palette/{l}/{b}/{g}": d for l, b, g, d in query(db, "SELECT layer, bits, group_size, digest "
                                                                    "FROM palettes")}
            | {f"recipe/{k}": v for k, v in query(db, "SELECT key, psnr FROM recipes WHERE psnr IS NOT NULL")})


def request_body(config: list[str]) -> dict:
    """The search options as `POST /searches` takes them (JSON as typed): ["--min-size", "16384",
    "--nbits", "2,8", "--curves"] -> {"min_size": 16384, "nbits": "2,8", "curves": True}."""
    from typing import get_args

    from search.submit_options import SEARCH_OPTIONS

    accepts = {o.name: {o.json_type or o.cli_type, *get_args(o.json_type or o.cli_type)} for o in SEARCH_OPTIONS}
    body, i = {}, 0
    while i < len(config):
        name = config[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(config) and not config[i + 1].startswith("--"):
            value, kinds = config[i + 1], accepts.get(name, {str})
            body[name], i = value if str in kinds else int(value) if int in kinds else float(value), i + 2
        else:
            body[name], i = True, i + 1
    return body


def evaluators(pid: int) -> list[int]:
    found = []
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as fh:
                if b"Evaluator" in fh.read():
                    found.append(p)
        except OSError:
            pass
    return found


# -- runs ----------------------------------------------------------------------------------------
class Campaign:
    def __init__(self, work: Path, seed: int, model_cache: Path, config: list[str], log=print, phase: str = ""):
        self.work, self.rng, self.log, self.config = work, random.Random(seed), log, config
        self.env = cli_env(model_cache, RAY_USAGE_STATS_ENABLED="0", MBP_SEARCH_STALE_S="3")
        for name in ("MBP_SEARCH_SERVER", "MBP_SEARCH_TOKEN", "RAY_ADDRESS", "MBP_SEARCH_DB"):
            self.env.pop(name, None)
        self.kills: list[dict] = []
        self.before: list[tuple[dict, dict]] = []  # the current search's kills: (kill, rows stored just before it)
        self.lost = self.redone = self.requeued = 0
        self.differences, self.phase = 0, phase
        self.t0 = time.monotonic()

    def start(self, *args, **popen) -> subprocess.Popen:
        return subprocess.Popen(cli_cmd(*args), cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)

    def reference(self) -> tuple[dict, int]:
        db = self.work / "reference.db"
        done = query(db, "SELECT id FROM searches WHERE status = 'completed'")
        if done:  # a campaign run again in the same --work
            return self.download(db, done[0][0]), evaluations(db)
        proc = self.start("submit", *self.config, "--workers", WORKERS, "--db", db)
        out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"reference run failed: {err[-2000:]}")
        return self.download(db, out.split()[1]), evaluations(db)

    def download(self, db: Path, sid: str) -> dict:
        res = subprocess.run(cli_cmd("download", sid, "-o", "-", "--db", db), cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def record(self, target: str, before: dict, phase: str) -> None:
        """A kill, with what was stored just before it (checked against the final database by settle())."""
        kill = {"target": target, "phase": phase, "stored": len(before), "lost": None}
        self.kills.append(kill)
        self.before.append((kill, before))
        self.log(f"  kill {len(self.kills)}: {target} in {phase}, {len(before)} stored "
                 f"({time.monotonic() - self.t0:.0f} s into the campaign)", flush=True)

    def settle(self, db: Path) -> None:
        """The search is over: each of its kills lost what was stored before it and is not, with
        the same value, in the final database."""
        final = stored_rows(db)
        kept = lambda k, v: k in final and (final[k] == v or (v != v and final[k] != final[k]))  # noqa: E731  NaN
        for kill, before in self.before:
            kill["lost"] = sum(not kept(k, v) for k, v in before.items())
            self.lost += kill["lost"]
        if lost := [k["lost"] for k, _ in self.before if k["lost"]]:
            self.log(f"  LOST results stored before a kill: {lost}", flush=True)
        self.before = []

    def finished(self, proc: subprocess.Popen, db: Path, stored_at_start: int, total: int) -> bool:
        """A run that ended by itself: it must have completed, computing exactly what was missing."""
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"a run failed (exit {proc.returncode}): {err[-3000:]}")
        m = re.search(r"(\d+) evaluations this run", err)
        if m is None:
            raise SystemExit(f"a completed run did not say how many evaluations it ran: {err[-3000:]}")
        self.redone += int(m.group(1)) - (total - stored_at_start)
        self.requeued += sum(int(n) for n in re.findall(r"re-queued (\d+) item", err))
        return True

    def moment(self, db: Path, ended, quick: bool, mark: int | str, since: float | None = None) -> bool:
        """Wait for the kill's moment: 1 to RESUME_S - 1 random seconds after ``since`` (the run's
        start, default now) when ``quick``, else the moment the search has stored ``mark`` results
        (plus up to 2 random seconds) or, ``mark`` a phase (--phase), has entered it (plus up to
        0.3 s). False if the run ended first."""
        start = time.monotonic() if since is None else since
        until = (start + self.rng.uniform(1.0, RESUME_S - 1.0)) if quick else float("inf")
        extra = self.rng.uniform(0.0, 0.3 if isinstance(mark, str) else 2.0)
        while not ended():
            reached = phase_of(db) == mark if isinstance(mark, str) else evaluations(db) >= mark
            if time.monotonic() >= until or (not quick and reached):
                time.sleep(0 if quick else extra)
                return not ended()
            time.sleep(0.05)
        return False

    def marks(self, kills: int, total: int) -> list[int] | list[str]:
        """Where in the search (stored results) each kill falls: drawn from the seed, in order;
        with --phase, that phase each time (a resume enters it again)."""
        return [self.phase] * kills if self.phase else sorted(self.rng.randrange(0, total) for _ in range(kills))

    def local_search(self, name: str, kills: int, targets: list[str], total: int) -> tuple[Path, str]:
        """One search, killed ``kills`` times, resumed each time until it completes. A kill of a
        resume within its first RESUME_S seconds (loading the model, checking its fingerprint,
        starting evaluators) counts as a kill during its own resume."""
        db = self.work / f"{name}.db"
        proc, started, is_resume = self.start("submit", *self.config, "--workers", WORKERS, "--db", db), time.monotonic(), False
        sid = proc.stdout.readline().split()[1]
        start_stored, quick, marks = 0, False, self.marks(kills, total)
        while True:
            if not marks or not self.moment(db, lambda: proc.poll() is not None, quick, marks[0], started):
                self.finished(proc, db, start_stored, total)
                self.settle(db)
                return db, sid
            target = "resume" if quick else self.rng.choice(targets)
            before, phase = stored_rows(db), phase_of(db)
            if target == "evaluator":
                if pids := evaluators(proc.pid):  # none while preparing or starting: a driver kill then
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.record(target, before, phase)
                    marks.pop(0)
                    continue
            kill_tree(proc.pid)  # the driver and its local Ray, collected before anything dies
            proc.wait(60)
            own_resume = is_resume and time.monotonic() - started < RESUME_S
            self.record("resume" if own_resume else "driver", before, phase)
            marks.pop(0)
            if query(db, "SELECT status FROM searches") == [("completed",)]:
                self.settle(db)
                return db, sid  # killed after it stored its completion: nothing is left to resume
            quick = "resume" in targets and not quick and not self.phase and self.rng.random() < 0.3  # next: early in the resume
            start_stored = evaluations(db)
            proc, started, is_resume = self.start("resume", sid, "--workers", WORKERS, "--db", db), time.monotonic(), True

    def serve(self, db: Path, name: str) -> tuple[subprocess.Popen, str, dict]:
        """A `search serve` on ``db`` (it resumes the interrupted searches there by itself), once it
        answers; it binds port 0 and says which port it got. Returns (process, url, headers)."""
        import httpx

        token, log = secrets.token_urlsafe(24), self.work / f"{name}-serve.log"
        log.touch()
        offset = log.stat().st_size
        env = {**self.env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="mbpcc", dir="/tmp")}
        proc = subprocess.Popen(cli_cmd("serve", "--port", "0", "--db", db, "--token", token, "--log-level", "warning"),
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "a"),
                                start_new_session=True)
        url, headers = None, {"Authorization": f"Bearer {token}"}
        for _ in range(1200):
            if proc.poll() is not None:
                raise SystemExit(f"search serve exited with {proc.returncode}: see {log}")
            if url is None and (m := LISTENING.search(log.read_text(errors="replace")[offset:])):
                url = f"http://127.0.0.1:{m.group(1)}"
            try:
                if url and httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url, headers
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        kill_tree(proc.pid)
        raise SystemExit(f"search serve did not start: see {log}")

    def service_search(self, name: str, kills: int, total: int) -> tuple[Path, str, dict]:
        """One search on a `search serve`, whose whole process tree is killed ``kills`` times."""
        import httpx

        db = self.work / f"{name}.db"
        proc, url, headers = self.serve(db, name)
        body = {**request_body(self.config), "workers": int(WORKERS)}
        sid = httpx.post(url + "/searches", json=body, headers=headers, timeout=120).json()["id"]
        status = lambda: httpx.get(f"{url}/searches/{sid}", headers=headers, timeout=120).json()["status"]  # noqa: E731
        for mark in self.marks(kills, total):
            if not self.moment(db, lambda: status() == "completed", False, mark):
                break
            before, phase = stored_rows(db), phase_of(db)
            kill_tree(proc.pid)
            proc.wait(60)
            self.record("service", before, phase)
            proc, url, headers = self.serve(db, name)  # resumes the interrupted search itself
        while httpx.get(f"{url}/searches/{sid}", headers=headers, timeout=120).json()["status"] != "completed":
            time.sleep(2)
        report = json.loads(httpx.get(f"{url}/searches/{sid}/recipes.json", headers=headers, timeout=300).text)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
        self.settle(db)
        return db, sid, report

    def covering_search(self, name: str, total: int) -> tuple[Path, str]:
        """One search killed once per target (--cover), at moments drawn from the seed: an
        evaluator, then its driver, then the `search resume` that follows within its first
        seconds, then the `search serve` that resumes it next; a last `search resume` completes it.
        Fails if the search completes before a kill: every target must be hit."""
        db = self.work / f"{name}.db"
        evaluator_mark, driver_mark, service_mark = sorted(self.rng.randrange(0, total * 3 // 4) for _ in range(3))
        proc = self.start("submit", *self.config, "--workers", WORKERS, "--db", db)
        started, sid = time.monotonic(), proc.stdout.readline().split()[1]
        ended = lambda: proc.poll() is not None  # noqa: E731

        def missed(target: str):
            return SystemExit(f"search {name} completed before its {target} kill: lower the marks")

        if not self.moment(db, ended, False, evaluator_mark):
            raise missed("evaluator")
        while not (pids := evaluators(proc.pid)):  # none while preparing or starting
            if ended():
                raise missed("evaluator")
            time.sleep(0.05)
        before, phase = stored_rows(db), phase_of(db)
        os.kill(self.rng.choice(pids), signal.SIGKILL)
        self.record("evaluator", before, phase)
        for target, quick, mark in (("driver", False, driver_mark), ("resume", True, 0)):
            if not self.moment(db, ended, quick, mark, started):
                raise missed(target)
            before, phase = stored_rows(db), phase_of(db)
            kill_tree(proc.pid)  # the driver and its local Ray, collected before anything dies
            proc.wait(60)
            self.record(target, before, phase)
            if target == "driver":  # then a resume, killed within its first seconds
                proc, started = self.start("resume", sid, "--workers", WORKERS, "--db", db), time.monotonic()
        serve, _, _ = self.serve(db, name)
        if not self.moment(db, lambda: serve.poll() is not None or phase_of(db) == "done", False, service_mark):
            raise missed("service")
        before, phase = stored_rows(db), phase_of(db)
        kill_tree(serve.pid)
        serve.wait(60)
        self.record("service", before, phase)
        start_stored = evaluations(db)
        self.finished(self.start("resume", sid, "--workers", WORKERS, "--db", db), db, start_stored, total)
        self.settle(db)
        return db, sid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=60, help="kills in all")
    ap.add_argument("--per-search", type=int, default=6, help="kills of one search before the next starts")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--small", action="store_true", help="one bit depth, Apple's rule only: what CI runs")
    ap.add_argument("--cover", action="store_true", help="one search, killed once per target (evaluator, driver, "
                    "resume, service, in that order): what CI runs; --kills, --targets and --phase do not apply")
    ap.add_argument("--phase", default="", help="kill every time the search enters this phase (e.g. recipes)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    targets, work = args.targets.split(","), args.work or Path(tempfile.mkdtemp(prefix="crash-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.cover and args.phase:
        ap.error("--cover draws its own moments: no --phase")
    cache = Path(os.environ.get("MBP_SEARCH_CACHE") or work / "cache")
    c = Campaign(work, args.seed, cache, SMALL if args.small else CONFIG, phase=args.phase)
    t0 = time.monotonic()
    reference, total = c.reference()
    print(f"reference: {total} evaluations in {time.monotonic() - t0:.0f} s", flush=True)
    local_targets = [t for t in targets if t != "service"]

    def figures() -> dict:
        return {"seed": args.seed, "kills": len(c.kills), "searches": n, "differences": c.differences,
                "lost": c.lost, "redone": c.redone, "requeued_after_evaluator_kills": c.requeued,
                "by_target": dict(Counter(k["target"] for k in c.kills)),
                "by_phase": dict(Counter(k["phase"] for k in c.kills)), "wall_s": round(time.monotonic() - t0),
                "reference_evaluations": total, "kill_log": c.kills}

    n = 0
    while len(c.kills) < (len(TARGETS) if args.cover else args.kills):
        want = min(args.per_search, args.kills - len(c.kills))
        kind = "cover" if args.cover else \
            "service" if "service" in targets and (not local_targets or n % 3 == 1) else "local"
        print(f"search {n} ({kind}): {'one kill per target' if args.cover else f'{want} kill(s)'}", flush=True)
        if kind == "cover":
            db, sid = c.covering_search(f"s{n}", total)
            report = c.download(db, sid)
        elif kind == "service":
            db, sid, report = c.service_search(f"s{n}", want, total)
        else:
            db, sid = c.local_search(f"s{n}", want, local_targets, total)
            report = c.download(db, sid)
        same = comparable(report) == comparable(reference) and evaluations(db) == total
        c.differences += not same
        print(f"  final JSON {'identical to' if same else 'DIFFERENT from'} the uninterrupted run's", flush=True)
        n += 1
        if args.out:  # after every search: a campaign stopped early still leaves its figures
            args.out.write_text(json.dumps(figures(), indent=1))
    print(json.dumps({k: v for k, v in figures().items() if k != "kill_log"}, indent=1))
    return 0 if c.differences == c.lost == c.redone == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
