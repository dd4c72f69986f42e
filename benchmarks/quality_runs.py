"""What ``recipe_quality.py`` runs: the real CLI in subprocesses, and the stored results read back
through the same storage API and pure functions the CLI uses."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANGE = (3.0, 8.0)  # matched average bits compared
COVER = 0.5  # an Apple recipe within this many bits of a grid point covers it


def within(avg_bits: float, lo_hi) -> bool:
    """Range test on the recipe key's value (2 decimals): recipe_5.00_... counts as 5 bits."""
    return lo_hi[0] <= float(f"{avg_bits:.2f}") <= lo_hi[1]


def resolution_args(model: str | None, resolution: int | None) -> list[str]:
    """``--resolution``: as given; else 64 px for the bench model (``model`` None), the size it was
    trained at (a local model directory would otherwise get Apple's 768 px: 100x the work, on a
    model that never saw that size); else none, so another ``--model`` gets the search's default."""
    from workers.tiny_models import TINY_RESOLUTION

    size = resolution or (None if model else TINY_RESOLUTION)
    return ["--resolution", str(size)] if size else []


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli(*args: str, db: Path) -> str:
    """Run ``python -m search.cli.app`` and return its stdout; on failure show everything and stop."""
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "search.cli.app", *args, "--db", str(db)]
    started = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    log(f"  {' '.join(args[:4])} ... done in {time.monotonic() - started:.0f} s")
    return p.stdout


def submit(db: Path, *args: str) -> str:
    out = cli("submit", *args, db=db)
    return next(line for line in out.splitlines() if line.startswith("search ")).split()[1]


def status(db: Path, sid: str) -> dict:
    return json.loads(cli("status", sid, "--json", db=db))


_OPEN: dict = {}


def storage_of(db: Path):
    """One Storage per database for the whole run. Opening a second one in this process would run
    storage.engine.check_database_file again, whose plain open()/close() of the database file drops
    this process's SQLite (POSIX) locks; a CLI subprocess then believes it is the last user and
    deletes the -wal/-shm files under us (seen as 'database disk image is malformed')."""
    from storage import Storage

    if db not in _OPEN:
        _OPEN[db] = Storage(db)
    return _OPEN[db]


def load(db: Path, sid: str):
    from search.config import SearchConfig
    from search.recipes.tables import load_tables, weight_mse

    storage = storage_of(db)
    search = storage.get_search(sid)
    return storage, search, SearchConfig.from_dict(search.config), load_tables(storage, sid), weight_mse(storage, sid)


def add_apple_recipes(db: Path, sid: str, grid, workers: int) -> list[str]:
    """Apple's rule at extra thresholds on the same cumulative curves, for the grid points Apple's
    default thresholds leave uncovered: the recipe nearest each, stored and measured end to end."""
    import ray

    from search.driver.driver import SearchDriver, ensure_ray
    from search.recipes.apple_rule import apple_recipes
    from search.recipes.noise_model import predict_psnr
    from search.recipes.strategy import Planned, noise_table
    from workers.models import resolve_model

    storage, search, config, tables, wmse = load(db, sid)
    have = [r.avg_bits for r in storage.recipes(sid) if r.strategy == "apple" and within(r.avg_bits, RANGE)]
    todo = [g for g in grid if not any(abs(g - a) <= COVER for a in have)]
    if not todo:
        return []
    cumulative = {b: tables.cumulative_by_layer(b) for b in config.nbits}
    values = sorted({v for per in cumulative.values() for v in per.values() if math.isfinite(v)})
    ts = [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[0] - 1.0]  # every distinct recipe
    candidates = [r for r in apple_recipes(cumulative, tables.sizes, sorted(ts, reverse=True),
                                           default_bits=config.default_nbits) if within(r.avg_bits, RANGE)]
    picks = []
    for g in todo:
        if candidates:
            best = min(candidates, key=lambda r: (abs(r.avg_bits - g), -r.threshold))
            if best not in picks:
                picks.append(best)
    if not picks:
        return []
    table = noise_table(config, tables, wmse)
    ensure_ray(None)
    try:
        driver = SearchDriver(storage, search, resolve_model(search.model), workers=workers)
        keys = [driver.store_recipe(Planned(r, predict_psnr(table, r.bits))) for r in picks]
        driver.run_recipes(keys)
        log(f"  {len(keys)} extra Apple-rule recipe(s) at {', '.join(f'{r.avg_bits:.2f}' for r in picks)} bits")
    finally:
        ray.shutdown()
    return keys


def target_run(db: Path, sid: str, bits: float, evals: int, workers: int) -> dict:
    """``search recipe ID --bits X --refine-evals N``: the one-shot recipe (the knapsack's, measured
    first) and the recipe it returns (the refined one; the one-shot itself with N = 0)."""
    from search.recipes.strategy import target_recipe

    text = cli("recipe", sid, "--bits", repr(float(bits)), "--workers", str(workers), "--refine-evals", str(evals),
               db=db)
    flat = " ".join(text.replace("│", " ").split())
    key = next(tok for tok in flat.split() if tok.startswith("recipe_"))
    used = re.search(r"refined with (\d+) end-to-end measurement\(s\) from the (\w+) recipe", flat)
    storage, _, config, tables, wmse = load(db, sid)
    planned = target_recipe(config, tables, wmse, bits=bits)
    recipes = storage.recipes(sid)
    return {"one_shot": next(r for r in recipes if r.bits == planned.recipe.bits),
            "result": next(r for r in recipes if r.key == key),
            "evals": int(used.group(1)) if used else 1, "start": used.group(2) if used else "knapsack"}


def fast_results(db: Path, sid: str, targets) -> dict[float, dict]:
    """Per target of a fast search: its one-shot (knapsack) recipe and the best measured one (refined)."""
    storage = storage_of(db)
    out = {}
    for t in targets:
        mine = [r for r in storage.recipes(sid)
                if r.target and abs(r.target.get("avg_bits", -1) - t) < 1e-9 and r.psnr is not None]
        one = next(r for r in mine if r.strategy == "optimal")
        out[t] = {"one_shot": one, "result": max(mine, key=lambda r: r.psnr)}
    return out
