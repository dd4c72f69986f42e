"""A small search against the serial reference loop, side by side in one run on this machine.

    python benchmarks/small_search_speed.py [--model tiny-sd] [--workers 2] [--repeats 1]

Both do the same job: Apple's protocol on the built-in tiny model, 5 bit depths (1, 2, 4, 6, 8),
7 recipes, each in a fresh process (imports included), CPU float32:

- the project: ``search submit --model M --workers W`` (the CLI, a local Ray instance, SQLite);
- the reference: ``tests/reference/apple_serial.py`` (one process, one thing at a time, the
  project's test oracle).

Prints both wall times, their ratio (target: the project >= 1.5x faster), the load average
before and after (the machine may be shared), and where the project's time went: the moment
each line of its log arrived (imports, preparing, Ray and the evaluators' start, each phase, the
exit), from the log it writes without a terminal (one line per phase).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MILESTONES = (  # (label, start of a log line)
    ("imports + submit stored", "search "),
    ("model prepared (fingerprint)", "model ready"),
    ("Ray started, evaluators starting", "starting "),
    ("evaluators ready (model load + reference)", "evaluators ready"),
    ("isolated + palettes done", "isolated impact"),
    ("cumulative done", "cumulative curves:"),
    ("recipes measured", "measure recipes:"),
    ("driver finished", "search "),  # "search ID completed"
)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_project(model: str, workers: int, env: dict, work: Path) -> tuple[float, list[tuple[float, str]]]:
    """Wall seconds of `search submit`, and (seconds since start, line) of its log."""
    db = work / f"s-{time.monotonic_ns()}.db"
    cmd = [sys.executable, "-m", "search.cli.app", "submit", "--model", model, "--workers", str(workers), "--db", str(db)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.monotonic() - t0, line.rstrip()) for line in proc.stdout]
    proc.wait()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit("search submit failed:\n" + "\n".join(line for _, line in lines[-30:]))
    return wall, lines


def run_reference(location: str, resolution: int, min_size: int, env: dict, work: Path) -> float:
    out = work / f"ref-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(ROOT / "tests" / "reference" / "apple_serial.py"), location, "--resolution",
           str(resolution), "--min-size", str(min_size), "-o", str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit("the serial reference failed:\n" + proc.stderr[-3000:])
    return wall


def timeline(lines: list[tuple[float, str]]) -> list[tuple[str, float]]:
    out, i = [], 0
    for label, start in MILESTONES:
        while i < len(lines) and not lines[i][1].startswith(start):
            i += 1
        if i == len(lines):
            break
        out.append((label, lines[i][0]))
        i += 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()

    from workers.models import resolve_model

    with tempfile.TemporaryDirectory(prefix="mbp-bench-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, MBP_SEARCH_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        os.environ["MBP_SEARCH_CACHE"] = env["MBP_SEARCH_CACHE"]
        spec = resolve_model(a.model)  # built once, before either is timed
        print(f"{a.model}: Apple's protocol, 5 bit depths, 7 recipes, {spec.default_resolution} px, min size "
              f"{spec.default_min_size}; {os.cpu_count()} CPUs; load average before: {load()}")
        project, reference = [], []
        for _ in range(a.repeats):
            wall, lines = run_project(a.model, a.workers, env, work)
            project.append(wall)
            reference.append(run_reference(spec.location, spec.default_resolution, spec.default_min_size, env, work))
        print(f"load average after: {load()}")
        print("\nwhere the project's time went (seconds since the command started):")
        for label, t in timeline(lines):
            print(f"  {t:7.1f}  {label}")
        print(f"  {project[-1]:7.1f}  process exited")
        for line in (ln for _, ln in lines if ln.startswith("timings")):
            print(f"  driver {line}")
        best_p, best_r = min(project), min(reference)
        print(f"\n{'':24}{'wall s':>10}")
        print(f"{'search submit':24}{best_p:10.1f}   (runs: {', '.join(f'{t:.1f}' for t in project)})")
        print(f"{'serial reference':24}{best_r:10.1f}   (runs: {', '.join(f'{t:.1f}' for t in reference)})")
        print(f"speed-up: {best_r / best_p:.2f}x (target >= 1.5x: {'MET' if best_r / best_p >= 1.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
