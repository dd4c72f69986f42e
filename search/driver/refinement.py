"""Measured refinement in the driver: candidates measured on the pool, each stored as a
``candidate`` measurement (key: the bit map's digest) the moment it arrives, looked up before
anything is run, so a resumed refinement replays its path without repeating a measurement."""
from __future__ import annotations

from common.formats import is_palettized
from search.recipes.apple_rule import make_recipe
from search.recipes.noise_model import predict_psnr
from search.recipes.refine import Refined, candidate_key, refine
from search.recipes.strategy import Planned, apple_at_budget, calibration, noise_table
from search.recipes.tables import load_tables, weight_mse
from workers.evaluation.items import WorkItem


def _measurer(driver):
    """``measure(bit maps) -> PSNRs`` for the refinement: stored candidates and measured stored
    recipes with the same bit map are reused; the rest run on the pool and are stored."""
    sid = driver.search.id

    def known() -> dict[str, float]:
        out = {candidate_key(r.bits): r.psnr for r in driver.storage.recipes(sid) if r.psnr is not None}
        out.update({m.key: m.psnr for m in driver.storage.measurements(sid, phase="candidate")})
        return out

    def measure(maps):
        have, keys = known(), [candidate_key(m) for m in maps]
        items = {k: WorkItem(k, "candidate", name=k, assignment=tuple(sorted((l, b) for l, b in m.items()
                                                                              if is_palettized(b))))
                 for k, m in zip(keys, maps) if k not in have}
        if items:
            driver._run_items("candidates", list(items.values()), driver._submit_eval, driver._store_measurement)
            have = known()
        return [have[k] for k in keys]

    return measure


def refine_target(driver, config, weight_mse, one_shot: Planned, evals: int, *, max_avg_bits: float | None = None,
                  max_size_mb: float | None = None) -> tuple[str, Refined]:
    """Refine from the better measured of the knapsack's recipe (``one_shot``, already stored)
    and Apple's rule at the budget (where curves exist); store the best measured recipe with its
    measurement (no new run) and return its key."""
    tables = load_tables(driver.storage, driver.search.id)
    table = noise_table(config, tables, weight_mse)
    budget = dict(max_avg_bits=max_avg_bits, max_size_mb=max_size_mb)
    starts = {"knapsack": one_shot.recipe.bits}
    apple = apple_at_budget(config, tables, **budget)
    if apple is not None:
        starts["apple"] = apple.bits
    result = refine(table, tables.sizes, starts, _measurer(driver), evals=max(evals, len(starts)), **budget)
    recipe = make_recipe(result.bits, tables.sizes, None, "refined")
    target = dict(one_shot.target or {}, refine_evals=evals, evals_used=result.evals, start=result.start,
                  start_psnr=result.start_psnr)
    key = driver.store_recipe(Planned(recipe, calibration(tables, table).apply(predict_psnr(table, recipe.bits)), target))
    stored = next(r for r in driver.storage.recipes(driver.search.id) if r.key == key)
    if stored.psnr is None:
        m = next(m for m in driver.storage.measurements(driver.search.id, phase="candidate")
                 if m.key == candidate_key(result.bits))
        driver.storage.set_recipe_result(driver.search.id, key, psnr=m.psnr, per_prompt=m.per_prompt, node=m.node,
                                         duration_s=m.duration_s, count=False)
    return key, result


def refine_targets(driver, planned) -> None:
    """The recipes phase's refinement: every optimal size target (average bits) refined with the
    search's ``refine_evals`` measurements, one line each on the reporter."""
    mse = weight_mse(driver.storage, driver.search.id)
    for p in planned:
        if p.target and "avg_bits" in p.target:
            key, r = refine_target(driver, driver.config, mse, p, driver.config.refine_evals,
                                   max_avg_bits=p.target["avg_bits"])
            driver.reporter.message(f"target {p.target['avg_bits']:g} bits: refined {key} {r.psnr:.2f} dB after "
                                    f"{r.evals} measurement(s) (from {r.start}, "
                                    + ", ".join(f"{n} {v:.2f}" for n, v in r.start_psnr.items()) + " dB)")
