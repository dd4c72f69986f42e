"""What the recipe benchmarks share: the real CLI as a subprocess, a search's stored results read
through the storage API, Apple's rule at extra thresholds, and `search recipe` lookups.

Used by ``recipe_quality.py`` (strategies) and ``grouped_quality.py`` (issue 13's formats).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RANGE = (3.0, 8.0)  # matched average bits compared
COVER = 0.5  # an Apple recipe within this many bits of a grid point covers it

def within(avg_bits: float, lo_hi) -> bool:
    """Range test on the recipe key's value (2 decimals): recipe_5.00_... counts as 5 bits."""
    return lo_hi[0] <= float(f"{avg_bits:.2f}") <= lo_hi[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the CLI ------------------------------------------------------------------------------
def cli(*args: str, db: Path) -> str:
    """Run ``python -m search.cli.app`` and return its stdout; on failure show everything and stop."""
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "search.cli.app", *args, "--db", str(db)]
    started = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    log(f"  {' '.join(args[:2])} ... done in {time.monotonic() - started:.0f} s")
    return p.stdout


def submit(db: Path, *args: str) -> str:
    out = cli("submit", *args, db=db)
    first = next(line for line in out.splitlines() if line.startswith("search "))
    return first.split()[1]


def status(db: Path, sid: str) -> dict:
    return json.loads(cli("status", sid, "--json", db=db))


# -- stored results (read through the storage API, same tables the CLI uses) --------------
def load(db: Path, sid: str):
    from search.config import SearchConfig
    from search.recipes.tables import load_tables, weight_mse

    storage = _storage(db)
    search = storage.get_search(sid)
    return storage, search, SearchConfig.from_dict(search.config), load_tables(storage, sid), weight_mse(storage, sid)


_OPEN: dict = {}


def _storage(db: Path):
    """One Storage per database for the whole run. Opening a second one in this process would run
    storage.engine.check_database_file again, whose plain open()/close() of the database file drops
    this process's SQLite (POSIX) locks; a CLI subprocess then believes it is the last user and
    deletes the -wal/-shm files under us (seen as 'database disk image is malformed')."""
    from storage import Storage

    if db not in _OPEN:
        _OPEN[db] = Storage(db)
    return _OPEN[db]


def stored_with_bits(storage, sid: str, bits: dict) -> object:
    """The stored recipe with exactly this bit map (the CLI stores a bit map once, under one key)."""
    return next(r for r in storage.recipes(sid) if r.bits == bits)


def add_apple_recipes(db: Path, sid: str, grid, workers: int) -> list[str]:
    """Apple's rule at extra thresholds (see the module docstring); store and measure end to end."""
    import ray

    from search.driver.driver import SearchDriver, ensure_ray
    from search.recipes.apple_rule import apple_recipes
    from search.recipes.strategy import Planned, noise_table
    from search.recipes.noise_model import predict_psnr
    from workers.models import resolve_model

    storage, search, config, tables, wmse = load(db, sid)
    have = [r.avg_bits for r in storage.recipes(sid) if r.strategy == "apple" and within(r.avg_bits, RANGE)]
    todo = [g for g in grid if not any(abs(g - a) <= COVER for a in have)]
    if not todo:
        return []
    cumulative = {b: tables.cumulative_by_layer(b) for b in config.nbits}
    values = sorted({v for per in cumulative.values() for v in per.values() if math.isfinite(v)})
    ts = [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[0] - 1.0]  # every distinct recipe
    candidates = [r for r in apple_recipes(cumulative, tables.sizes, sorted(ts, reverse=True))
                  if within(r.avg_bits, RANGE)]
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
        started = time.monotonic()
        driver.run_recipes(keys)
        log(f"  {len(keys)} extra Apple-rule recipe(s) at {', '.join(f'{r.avg_bits:.2f}' for r in picks)} bits "
            f"(thresholds {', '.join(f'{r.threshold:.2f}' for r in picks)} dB) measured in "
            f"{time.monotonic() - started:.0f} s")
    finally:
        ray.shutdown()
    return keys


def optimal_for(db: Path, sid: str, **target):
    """Run ``search recipe`` and return the stored recipe it built (found by its bit map, computed with
    the same pure function the command calls)."""
    from search.recipes.strategy import target_recipe

    flag, value = next(iter(target.items()))
    cli("recipe", sid, f"--{flag.replace('_', '-')}", repr(float(value)), "--workers", "1", db=db)
    storage, _, config, tables, wmse = load(db, sid)
    kw = {"bits" if flag == "bits" else flag: value}
    planned = target_recipe(config, tables, wmse, **kw)
    return stored_with_bits(storage, sid, planned.recipe.bits)


def fast_for(db: Path, sid: str, targets) -> dict[float, object]:
    from search.recipes.knapsack import optimal_for_budget
    from search.recipes.strategy import noise_table

    storage, _, config, tables, wmse = load(db, sid)
    table = noise_table(config, tables, wmse)
    return {t: stored_with_bits(storage, sid, optimal_for_budget(table, tables.sizes, max_avg_bits=t).bits)
            for t in targets}


def loo(pairs: list[tuple[float, float]], i: int) -> float:
    """Leave-one-out calibrated prediction for pair i (fitted on the others)."""
    from search.recipes.noise_model import calibrate

    return calibrate([p for j, p in enumerate(pairs) if j != i]).apply(pairs[i][0])
