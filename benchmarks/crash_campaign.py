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
cumulative, recipes, refinement = `candidates`); measurements lost (a key stored just before a
kill and missing after it: must be 0); measurements redone (a completing run's "N evaluations this
run" above what was missing when it started: must be 0); in-flight items re-queued after evaluator
kills (work redone by design: the killed evaluator's current item); final JSON differences (0).

    python benchmarks/crash_campaign.py --kills 60 --seed 1 --out crash.json   (CI: test_crash_campaign.py)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cli_helpers import cli_cmd, cli_env, comparable  # noqa: E402  the tests' way of running the CLI
from tests.search.test_service import descendants, kill_tree  # noqa: E402
from benchmarks.search_state import evaluations, phase_of, query, stored_keys  # noqa: E402

CONFIG = ["--model", "tiny-sdxl", "--nbits", "2,8", "--min-size", "16384", "--strategy", "both", "--targets", "4",
          "--refine-evals", "4", "--num-recipes", "3", "--curves"]
SMALL = ["--model", "tiny-sdxl", "--nbits", "8", "--min-size", "16384", "--num-recipes", "3"]  # CI: one depth, Apple's rule
TARGETS = ("driver", "evaluator", "resume", "service")
WORKERS = "2"
RESUME_S = 15.0  # a resume killed this soon after it started was killed during its own resume


# -- processes ---------------------------------------------------------------------------------
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
        self.lost = self.redone = self.requeued = 0
        self.differences, self.phase = 0, phase

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

    def record(self, target: str, db: Path, before: set[str], phase: str) -> None:
        lost = len(before - stored_keys(db))
        self.lost += lost
        self.kills.append({"target": target, "phase": phase, "stored": len(before), "lost": lost})
        self.log(f"  kill {len(self.kills)}: {target} in {phase}, {len(before)} stored, {lost} lost", flush=True)

    def finished(self, proc: subprocess.Popen, db: Path, stored_at_start: int, total: int) -> bool:
        """A run that ended by itself: it must have completed, computing exactly what was missing."""
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"a run failed (exit {proc.returncode}): {err[-3000:]}")
        m = re.search(r"(\d+) evaluations this run", err)
        self.redone += int(m.group(1)) - (total - stored_at_start) if m else 0
        self.requeued += sum(int(n) for n in re.findall(r"re-queued (\d+) item", err))
        return True

    def moment(self, db: Path, ended, quick: bool, mark: int | str) -> bool:
        """Wait for the kill's moment: RESUME_S-bounded random seconds into a (re)start when
        ``quick``, else the moment the search has stored ``mark`` results (plus up to 2 random
        seconds) or, ``mark`` a phase (--phase), has entered it (plus up to 0.3 s). False if the
        run ended first."""
        until = time.monotonic() + (self.rng.uniform(1.0, RESUME_S) if quick else 1e9)
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
            if not marks or not self.moment(db, lambda: proc.poll() is not None, quick, marks[0]):
                self.finished(proc, db, start_stored, total)
                return db, sid
            target = "resume" if quick else self.rng.choice(targets)
            before, phase = stored_keys(db), phase_of(db)
            if target == "evaluator":
                if pids := evaluators(proc.pid):  # none while preparing or starting: a driver kill then
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.record(target, db, before, phase)
                    marks.pop(0)
                    continue
            kill_tree(proc.pid)  # the driver and its local Ray, collected before anything dies
            proc.wait(60)
            own_resume = is_resume and time.monotonic() - started < RESUME_S
            self.record("resume" if own_resume else "driver", db, before, phase)
            marks.pop(0)
            if query(db, "SELECT status FROM searches") == [("completed",)]:
                return db, sid  # killed after it stored its completion: nothing is left to resume
            quick = "resume" in targets and not quick and not self.phase and self.rng.random() < 0.3  # next: early in the resume
            start_stored = evaluations(db)
            proc, started, is_resume = self.start("resume", sid, "--workers", WORKERS, "--db", db), time.monotonic(), True

    def service_search(self, name: str, kills: int, total: int) -> tuple[Path, str, dict]:
        """One search on a `search serve`, whose whole process tree is killed ``kills`` times."""
        import httpx

        db, token = self.work / f"{name}.db", secrets.token_urlsafe(24)
        raytmp = tempfile.mkdtemp(prefix="mbpcc", dir="/tmp")
        env = {**self.env, "RAY_TMPDIR": raytmp}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}

        def serve() -> subprocess.Popen:
            proc = subprocess.Popen(cli_cmd("serve", "--port", port, "--db", db, "--token", token, "--log-level",
                                            "warning"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=open(self.work / f"{name}-serve.log", "a"), start_new_session=True)
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        return proc
                except httpx.HTTPError:
                    time.sleep(0.5)
            raise SystemExit(f"search serve did not start: see {self.work / f'{name}-serve.log'}")

        proc = serve()
        body = {"model": "tiny-sdxl", "nbits": "2,8", "min_size": 16384, "strategy": "both", "targets": "4",
                "refine_evals": 4, "num_recipes": 3, "curves": True, "workers": int(WORKERS)}
        sid = httpx.post(url + "/searches", json=body, headers=headers, timeout=120).json()["id"]
        status = lambda: httpx.get(f"{url}/searches/{sid}", headers=headers, timeout=120).json()["status"]  # noqa: E731
        for mark in self.marks(kills, total):
            if not self.moment(db, lambda: status() == "completed", False, mark):
                break
            before, phase = stored_keys(db), phase_of(db)
            kill_tree(proc.pid)
            proc.wait(60)
            self.record("service", db, before, phase)
            proc = serve()  # resumes the interrupted search itself
        while status() != "completed":
            time.sleep(2)
        report = json.loads(httpx.get(f"{url}/searches/{sid}/recipes.json", headers=headers, timeout=300).text)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
        return db, sid, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=60, help="kills in all")
    ap.add_argument("--per-search", type=int, default=6, help="kills of one search before the next starts")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--small", action="store_true", help="one bit depth, Apple's rule only (local targets): what CI runs")
    ap.add_argument("--phase", default="", help="kill every time the search enters this phase (e.g. recipes)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    targets, work = args.targets.split(","), args.work or Path(tempfile.mkdtemp(prefix="crash-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.small and "service" in targets:
        ap.error("--small is for the local targets (driver, evaluator, resume)")
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
    while len(c.kills) < args.kills:
        want = min(args.per_search, args.kills - len(c.kills))
        kind = "service" if "service" in targets and (not local_targets or n % 3 == 1) else "local"
        print(f"search {n} ({kind}): {want} kill(s)", flush=True)
        if kind == "service":
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
