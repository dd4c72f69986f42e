"""From stored measurements to recipes, for both strategies. Pure: tables in, recipes out."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from common.formats import fits, is_palettized
from search.config import SearchConfig
from search.recipes.apple_rule import Recipe, apple_recipes, thresholds
from search.recipes.apple_rule import apple_thresholds as exact_apple_thresholds
from workers.evaluation.protocol import LINEAR8_BASELINE
from search.recipes.calibration import Calibration, calibrate
from search.recipes.fast_plan import fast_plan, floor_descent, refine_candidates
from search.recipes.knapsack import optimal_for_budget, optimal_for_psnr
from search.recipes.noise_model import NoiseTable, floor_noise, floor_probe_plan, predict_psnr, psnr_of_noise
from search.recipes.tables import Tables, probe_ulps
from storage import Measurement

REFINE_MARGIN_DB = 1.0  # fast mode: measure a predicted entry if an error this large would change a choice


@dataclass(frozen=True)
class Planned:
    recipe: Recipe
    predicted: float | None
    target: dict | None = None


def unfit(config: SearchConfig, sizes: dict[str, int]) -> list[tuple[str, object]]:
    """(layer, format) pairs the search skips: group sizes that do not divide the layer's channels."""
    return [(l, b) for b in config.nbits for l in sizes if not fits(sizes, l, b)]


def skipped_note(config: SearchConfig, sizes: dict[str, int]) -> str | None:
    """The one line that says which formats skip which layers (None: none skipped)."""
    pairs = unfit(config, sizes)
    if not pairs:
        return None
    by_format: dict = {}
    for l, b in pairs:
        by_format.setdefault(b, []).append(l)
    return "skipped (group size does not divide the output channels): " + "; ".join(
        f"{b} for {len(ls)} layer(s), e.g. {ls[0]}" for b, ls in by_format.items())


def isolated_plan(config: SearchConfig, sizes: dict[str, int], weight_mse: dict[int, dict[str, float]]) -> list[tuple[str, int]]:
    """(layer, bits) the isolated phase measures first: everything, or fast mode's anchors."""
    if config.evals == "full":
        return [(l, b) for b in config.nbits for l in sizes if fits(sizes, l, b)]
    plan = fast_plan(weight_mse, sizes, config.nbits, config.anchors)
    return [(l, b) for b, layers in plan.items() for l in layers]


def floor_plan(tables: Tables) -> list[tuple[str, str, int | None]]:
    """(key, layer, position) of the evaluation-floor probes (``noise_model.floor_probe_plan``) not
    stored yet; position: the probe's ulps, None for 1 (``tables.probe_ulps``), which also keeps
    the 1-ulp probe's key from before 4 ulps."""
    done = {m.key for m in tables.floor_probes.values()}
    plan = [(f"floor/{layer}" + (f"/x{u}" if u != 1 else ""), layer, u if u != 1 else None)
            for layer, u in floor_probe_plan(list(tables.sizes))]
    return [p for p in plan if p[0] not in done]


def _descent(config: SearchConfig, tables: Tables, weight_mse):
    first = isolated_plan(config, tables.sizes, weight_mse)
    measured = {(l, b): 10.0 ** (-np.array(m.per_prompt) / 10) for b, per in tables.isolated.items()
                for l, m in per.items()}
    chain, todo = floor_descent(measured, weight_mse, tables.sizes, config.nbits, first, eval_floor(tables))
    return first, chain, todo


def descent_plan(config: SearchConfig, tables: Tables, weight_mse) -> list[tuple[str, int]]:
    """Fast mode: the next depth down for layers whose measurements the evaluation floor hides
    (``fast_plan.floor_descent``); run until it is empty."""
    return [] if config.evals == "full" else _descent(config, tables, weight_mse)[2]


def refinement_plan(config: SearchConfig, tables: Tables, weight_mse) -> list[tuple[str, int]]:
    """Fast mode's second round, computed from the first round's measurements (and the floor
    descent's) only so that a resumed search plans exactly the same items."""
    if config.evals == "full":
        return []
    first, chain, _ = _descent(config, tables, weight_mse)
    first = set(first) | set(chain)
    iso = {b: {l: m.per_prompt for l, m in per.items() if (l, b) in first} for b, per in tables.isolated.items()}
    table = NoiseTable.from_anchors({b: v for b, v in iso.items() if v}, weight_mse, _original(tables),
                                    list(tables.sizes), config.nbits, eval_floor(tables), unfit(config, tables.sizes))
    todo = refine_candidates(table, tables.sizes, config.optimal_targets(), REFINE_MARGIN_DB)
    return sorted(todo, key=lambda lb: (lb[1], list(tables.sizes).index(lb[0])))


def _original(tables: Tables) -> tuple[float, ...]:
    return tables.baseline_per_prompt["original"]


def eval_floor(tables: Tables):
    """Per-prompt noise power of the evaluation floor from the stored probes (None: not measured)."""
    return probes_floor(tables.floor_probes.values())


def probes_floor(probes: Iterable[Measurement]):
    """``noise_model.floor_noise`` of stored floor-probe measurements, by their ulps (None: no 1-ulp
    probe stored yet; while probes run on several evaluators a 4-ulp one can be stored first, and
    `search status` reads this mid-search)."""
    by_ulps: dict[int, list] = {}
    for m in probes:
        by_ulps.setdefault(probe_ulps(m), []).append(m.per_prompt)
    return floor_noise(by_ulps) if 1 in by_ulps else None


def noise_table(config: SearchConfig, tables: Tables, weight_mse) -> NoiseTable:
    iso = {b: {l: m.per_prompt for l, m in per.items()} for b, per in tables.isolated.items() if per}
    skip = unfit(config, tables.sizes)
    if config.evals == "full":
        return NoiseTable.from_isolated(iso, _original(tables), list(tables.sizes), eval_floor(tables), skip)
    return NoiseTable.from_anchors(iso, weight_mse, _original(tables), list(tables.sizes), config.nbits,
                                   eval_floor(tables), skip)


def calibration(tables: Tables, table: NoiseTable) -> Calibration:
    """``calibration.calibrate`` on every end-to-end measurement whose bit map is known: the points
    of the cumulative curves (their order re-derived and checked against the stored layer) and
    the measured recipes."""
    pairs = []
    index = {l: i for i, l in enumerate(table.layers)}
    for b, per in tables.cumulative.items():
        if b not in table.noise or len(tables.isolated.get(b, {})) != len(tables.sizes):
            continue
        order = tables.order(b)
        # the curve's predictions at once: the floor plus the running sum in cumulative order
        curve = psnr_of_noise(table.floor + np.cumsum(table.noise[b][[index[l] for l in order]], axis=0))
        pairs += [(float(curve[pos - 1]), m.psnr) for pos, m in per.items()
                  if pos <= len(order) and order[pos - 1] == m.layer]
    for bits, psnr in tables.recipes:
        if not any(is_palettized(b) for b in bits.values()):
            continue  # every layer in float16: a re-run of the reference (bit-exact: ~209 dB), no palette noise
        try:
            pairs.append((predict_psnr(table, bits), psnr))
        except ValueError:  # a recipe with a format this table has no entry for
            continue
    return calibrate(pairs)


def apple_thresholds(config: SearchConfig, tables: Tables) -> tuple[list[float], str | None]:
    """The thresholds of Apple's rule. Apple's protocol: exactly Apple's linspace. Classic:
    Apple's range, capped when `original` is bit-exact; widened when linear_8bit + 5 dB is
    above the top (so the range would be empty)."""
    original, linear8 = tables.baselines["original"], tables.baselines[LINEAR8_BASELINE[config.protocol]]
    if config.protocol == "apple":
        note = None
        if original > 200.0:
            note = (f"original is {original:.1f} dB (bit-exact arithmetic): as in Apple's script, the top "
                    "thresholds keep layers in float16 (the classic protocol caps them instead)")
        return exact_apple_thresholds(original, linear8, config.num_recipes), note
    firsts = [tables.cumulative[b][1].psnr for b in config.nbits if 1 in tables.cumulative.get(b, {})]
    cap = max(firsts) - 1.0 if firsts else None
    note = None
    if cap is not None and original - 1.0 > cap:
        note = (f"original is {original:.1f} dB (bit-exact arithmetic); thresholds start at {cap:.2f} dB, "
                "1 dB below the best single palettized layer")
    upper = min(original - 1.0, cap) if cap is not None else original - 1.0
    if upper > linear8 + 5.0:
        return thresholds(original, linear8, config.num_recipes, cap=cap), note
    lowest = min(m.psnr for b in config.nbits for m in tables.cumulative.get(b, {}).values())
    note = (note + "; " if note else "") + (f"linear_8bit + 5 dB ({linear8 + 5:.2f}) is above the top threshold, so "
                                            f"thresholds end at the lowest cumulative PSNR measured ({lowest:.2f} dB)")
    n = config.num_recipes
    return [upper + (lowest - upper) * i / max(n - 1, 1) for i in range(n)], note


def plan_apple_recipes(config: SearchConfig, tables: Tables, weight_mse) -> tuple[list[Planned], list[str]]:
    """Apple's recipes, if the config asks for them, with calibrated predicted PSNRs. The optimal
    size targets are planned one at a time by ``plan_target``, after these are measured."""
    if "apple" not in config.strategy:
        return [], []
    table = noise_table(config, tables, weight_mse)
    cal = calibration(tables, table)
    ts, note = apple_thresholds(config, tables)
    cumulative = {b: tables.cumulative_by_layer(b) for b in config.nbits}
    recipes = apple_recipes(cumulative, tables.sizes, ts, default_bits=config.default_nbits)
    return [Planned(r, cal.apply(predict_psnr(table, r.bits))) for r in recipes], [note] if note else []


def plan_target(config: SearchConfig, tables: Tables, weight_mse, bits: float) -> tuple[Planned | None, str | None]:
    """One optimal size target of the config (``target_recipe``), or the note saying why it is skipped."""
    try:
        return target_recipe(config, tables, weight_mse, bits=bits), None
    except ValueError as exc:
        return None, f"target {bits:g} bits skipped: {exc}"


def target_recipe(config: SearchConfig, tables: Tables, weight_mse, *, bits: float | None = None,
                  size_mb: float | None = None, psnr: float | None = None) -> Planned:
    """`search recipe`: one optimal recipe for a size or quality target."""
    given = [(k, v) for k, v in (("avg_bits", bits), ("size_mb", size_mb), ("psnr", psnr)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --bits, --size-mb, --psnr")
    kind, value = given[0]
    option = {"avg_bits": "--bits", "size_mb": "--size-mb", "psnr": "--psnr"}[kind]
    if not math.isfinite(value):
        raise ValueError(f"{option} must be a finite number")
    table = noise_table(config, tables, weight_mse)
    cal = calibration(tables, table)
    if kind == "avg_bits":
        r = optimal_for_budget(table, tables.sizes, max_avg_bits=value)
    elif kind == "size_mb":
        r = optimal_for_budget(table, tables.sizes, max_size_mb=value)
    else:
        best = cal.apply(predict_psnr(table, {}))  # every layer in float16
        if value > best:
            raise ValueError(f"--psnr {value:g} dB is unreachable: even every layer in float16 is predicted {best:.2f} dB")
        r = optimal_for_psnr(table, tables.sizes, cal.invert(value))
    return Planned(r, cal.apply(predict_psnr(table, r.bits)), {kind: value})



def apple_at_budget(config: SearchConfig, tables: Tables, *, max_avg_bits: float | None = None,
                    max_size_mb: float | None = None) -> Recipe | None:
    """Apple's rule at the threshold giving its largest recipe within the budget (every distinct
    recipe of the measured cumulative curves is considered); None without complete curves."""
    if any(len(tables.cumulative.get(b, {})) != len(tables.sizes) for b in config.nbits):
        return None
    cumulative = {b: tables.cumulative_by_layer(b) for b in config.nbits}
    values = sorted({v for per in cumulative.values() for v in per.values() if math.isfinite(v)})
    if not values:
        return None
    ts = sorted([(a + b) / 2 for a, b in zip(values, values[1:])] + [values[0] - 1.0, values[-1] + 1.0], reverse=True)
    fits = [r for r in apple_recipes(cumulative, tables.sizes, ts, default_bits=config.default_nbits)
            if (r.avg_bits <= max_avg_bits if max_size_mb is None else r.size_mb <= max_size_mb)]
    return max(fits, key=lambda r: (r.size_mb, r.threshold)) if fits else None
