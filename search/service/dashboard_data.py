"""What the dashboard shows, as JSON-ready dicts built on search.read_models (the same rows and
details as ``GET /searches`` and `search status`), plus what only a live page needs: progress
with an ETA, the best recipe so far, the evaluators' rates, per-phase wall times, and the chart
data (the points `search plot` draws, from the same functions).

Everything here only reads: the service passes a `storage.reader.ReadOnlyStorage`, so a page
polling every 2 s never takes SQLite's write lock.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta

from common.clock import utcnow
from common.formats import PaletteFormat, layer_bits
from search.phase_rows import count_rows, phase_rows
from search.read_models import format_pairs, search_detail
from storage import Search
from storage.records import ACTIVE
from storage.reader import ReadOnlyStorage

RATE_WINDOW_S = 60.0  # evaluations per second: measured over the last minute
READY = re.compile(r"evaluators ready on (\S+) \(([^)]+)\)")  # the driver's message once its pool is up
EVAL_PHASES = ("isolated", "cumulative", "recipes")
ROW_KEYS = ("id", "model", "model_version", "status", "phase", "created_at", "evaluations", "measurements", "error",
            "preparing", "counts", "config")


def evaluators(rows: list[tuple], now: datetime, progress: dict | None) -> list[dict]:
    """One search's evaluators (node, worker, device) with their evaluations per second over the
    last RATE_WINDOW_S. The device is the one the driver's pool reported (a pool is homogeneous)."""
    device = None
    for _seq, text in (progress or {}).get("messages", []):
        if m := READY.search(text):
            device = f"{m.group(1)} ({m.group(2)})"
    out = []
    for _sid, node, worker, n, first, _last in sorted(rows, key=lambda r: (r[1], r[2])):
        span = max((now - first).total_seconds(), 1.0)
        out.append({"node": node, "worker": worker, "device": device, "evaluations": n, "per_s": n / span})
    return out


def best_recipe(detail_recipes: list[dict], baselines: dict) -> dict | None:
    """The smallest measured recipe at least as good as linear 8-bit quantization (either
    baseline name), else the measured recipe with the highest PSNR: what a user would pick now."""
    measured = [r for r in detail_recipes if r["psnr"] is not None]
    if not measured:
        return None
    bar = next((baselines[k] for k in ("linear_8bit", "linear_8bit_per_channel") if baselines.get(k) is not None),
               None)
    good = [r for r in measured if bar is not None and r["psnr"] >= bar]
    pick = min(good, key=lambda r: r["avg_bits"]) if good else max(measured, key=lambda r: r["psnr"])
    return {k: pick[k] for k in ("key", "strategy", "avg_bits", "size_mb", "psnr")}


def progress_of(s: Search, counts: dict, rate: float) -> dict:
    """Evaluations done (pipeline runs stored) / in all (plus what the isolated, cumulative and
    recipe phases still need, as far as their totals are known), the fraction of the work done
    (palettes included) and the ETA at the current rate (None: finished, stalled or a total unknown)."""
    done = sum(counts[p]["done"] for p in EVAL_PHASES)
    totals = [counts[p]["total"] for p in EVAL_PHASES]
    if not totals[2]:  # recipes not built yet: one per Apple threshold and per optimal target
        strategy = s.config.get("strategy") or ()
        totals[2] = (s.config.get("num_recipes", 0) if "apple" in strategy else 0) + \
            (len(s.config.get("targets") or ()) if "optimal" in strategy else 0)
    known = all(t is not None for t in totals)
    remaining = sum(max(t - counts[p]["done"], 0) for t, p in zip(totals, EVAL_PHASES) if t is not None)
    pal = counts["palettes"]
    work_done, work_total = done + pal["done"], done + remaining + pal["total"]
    done, total = s.evaluations, s.evaluations + remaining  # every pipeline run stored (floor probes too)
    if s.status == "completed":
        fraction = 1.0
    else:
        fraction = min(work_done / work_total, 1.0) if work_total else 0.0
    eta = remaining / rate if s.status in ACTIVE and known and rate > 0 else None
    return {"done": done, "total": total, "total_known": known, "fraction": fraction, "eta_s": eta, "per_s": rate}


def _rates(reader: ReadOnlyStorage, searches: list[Search], now: datetime) -> dict[str, list[tuple]]:
    rows = reader.recent_evaluations(now - timedelta(seconds=RATE_WINDOW_S),
                                     [s.id for s in searches if s.status in ACTIVE])
    out: dict[str, list[tuple]] = {}
    for row in rows:
        out.setdefault(row[0], []).append(row)
    return out


def searches_rows(reader: ReadOnlyStorage, cache: dict | None = None) -> list[dict]:
    """The searches page: every search (newest first) with progress, ETA and best recipe.
    ``cache`` (search id -> (version, row)) keeps the rows of searches that are not active: they
    change only through a status change, so a long list costs a poll no more than its active rows."""
    now = utcnow()
    searches = reader.list_searches()
    rates = _rates(reader, searches, now)
    cache = {} if cache is None else cache
    rows = []
    for s in reversed(searches):
        status = s.effective_status(now)
        version = (s.status, status, s.phase, s.evaluations, s.updated_at)
        if status not in ACTIVE and s.id in cache and cache[s.id][0] == version:
            rows.append(cache[s.id][1])
            continue
        detail = search_detail(reader, s, now)  # the summary's fields, and the counts the ETA needs
        ev = evaluators(rates.get(s.id, []), now, None)
        row = {**{k: detail[k] for k in ROW_KEYS},
               "progress": progress_of(s, detail["counts"], sum(e["per_s"] for e in ev)),
               "best": best_recipe(detail["recipes"], detail["baselines"])}
        cache[s.id] = (version, row)
        rows.append(row)
    return rows


def search_page(reader: ReadOnlyStorage, s: Search, progress: dict | None) -> dict:
    """The search page: `search status`'s detail plus phases with wall times, evaluators, progress."""
    now = utcnow()
    detail = search_detail(reader, s, now)
    ev = evaluators(_rates(reader, [s], now).get(s.id, []), now, progress)
    running = s.status in ACTIVE
    phases = phase_rows(progress, now if running else None) if progress else count_rows(detail["counts"])
    return {**detail, "phases": phases, "evaluators": ev,
            "progress": progress_of(s, detail["counts"], sum(e["per_s"] for e in ev)),
            "best": best_recipe(detail["recipes"], detail["baselines"]),
            "messages": [text for _seq, text in (progress or {}).get("messages", [])[-20:]]}


def chart_data(reader: ReadOnlyStorage, s: Search) -> dict:
    """The points of the search page's charts, computed as `search plot` computes them
    (search.recipes.plot): recipes (x: size reduction %, y: mean PSNR), the linear 8-bit line,
    each format's cumulative curve, and the isolated PSNR of every (layer, format) measured."""
    from search.recipes.plot import PLOT_MAX_PSNR, _mean, cumulative_curve, reduction_percent
    from search.recipes.tables import build_report
    from workers.evaluation.protocol import LINEAR8_BASELINE

    report = build_report(reader, s)
    formats = [PaletteFormat.of(b) for b in s.config.get("nbits", ())]
    layers = list(report.sizes)
    heat = []
    for fi, fmt in enumerate(formats):
        measured = report.single_layer.get(fmt, {})
        for li, layer in enumerate(layers):
            y = _mean(measured.get(layer))
            if y is not None:
                heat.append([li, fi, round(y, 4), round(layer_bits(report.sizes, layer, fmt) / 8e6, 5)])
    curves = {}
    for fmt in formats:
        xs, ys = cumulative_curve(report, fmt)
        curves[str(fmt)] = {"x": [round(x, 4) for x in xs], "y": [round(y, 3) for y in ys]}
    recipes = [{"key": r.key, "strategy": r.strategy, "avg_bits": r.avg_bits, "x": reduction_percent(r.avg_bits),
                "y": _mean(p), "capped": _capped(p)} for r, p in report.recipes if _mean(p) is not None]
    layer_map = [{"key": r.key, "strategy": r.strategy, "avg_bits": r.avg_bits,
                  "formats": [str(r.bits[layer]) if layer in r.bits else "16" for layer in layers]}
                 for r, _p in report.recipes]
    return {"id": s.id, "formats": [str(f) for f in formats], "layers": layers,
            "layer_mb": [round(n * 2 / 1e6, 4) for n in report.sizes.values()],
            "recipes": recipes, "linear8": _mean(report.baselines.get(LINEAR8_BASELINE[report.protocol])),
            "curves": curves, "isolated": heat, "pairs": format_pairs(reader, s), "model": s.model,
            "model_version": s.model_version, "layer_map": layer_map, "cap": PLOT_MAX_PSNR,
            "config": s.config, "status": s.status}


def _capped(per_prompt) -> bool:
    """The mean PSNR exceeds the charts' ceiling (bit-exact runs: ~200 dB or inf): drawn at the
    ceiling and marked so, never as if it were measured there."""
    from search.recipes.plot import PLOT_MAX_PSNR

    values = [float(per_prompt)] if isinstance(per_prompt, (int, float)) else [float(v) for v in per_prompt or ()]
    return bool(values) and sum(values) / len(values) > PLOT_MAX_PSNR


def chart_version(reader: ReadOnlyStorage, s: Search) -> str:
    """Changes whenever the chart data may: an ETag that lets polling pages skip unchanged data."""
    recipes = reader.recipes(s.id)
    return f'"{s.id}-{s.evaluations}-{len(recipes)}-{sum(r.psnr is not None for r in recipes)}-{s.status}"'


__all__ = ["searches_rows", "search_page", "chart_data", "chart_version", "best_recipe", "progress_of",
           "evaluators"]
