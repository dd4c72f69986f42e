"""One row per phase from a driver's progress file (search.service.progress_file): what the
dashboard's phase table and `search status` both show, so a search run by the CLI and one run by
the service read the same.

The driver starts some phases many times (each step of the measured refinement is a phase start
of its own): the file then holds one entry per start, and a table of them is dozens of rows of
"measured refinement 1/1 0 s". Here the entries of one phase become one row, in the order the
phases first started, with the counts and wall times summed and the number of starts kept
(``runs``), so the refinement reads "measured refinement (12 steps)".
"""
from __future__ import annotations

from datetime import datetime

from search.driver.progress import PHASE_LABELS

STEPPED = {"candidates": "steps"}  # phases started once per step: their row says how many steps


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.rstrip("Z")) if text else None


def entry_wall(entry: dict, now: datetime | None) -> float | None:
    """Seconds from an entry's start to its end, or to ``now`` while it runs (None: not known)."""
    start, end = _time(entry.get("started_at")), _time(entry.get("ended_at"))
    stop = end or now
    return (stop - start).total_seconds() if start and stop else None


def phase_rows(progress: dict | None, now: datetime | None = None) -> list[dict]:
    """``[{"phase", "label", "done", "total", "runs", "wall_s"}]``, one per phase. ``now``: the
    time that an unfinished entry runs until (None: a search that no longer runs, whose unfinished
    entries count for nothing)."""
    rows: dict[str, dict] = {}
    for entry in (progress or {}).get("phases", []):
        phase = entry["phase"]
        row = rows.setdefault(phase, {"phase": phase, "done": 0, "total": 0, "runs": 0, "wall_s": None})
        row["done"] += int(entry.get("done", 0))
        row["total"] += int(entry.get("total", 0))
        row["runs"] += 1
        wall = entry_wall(entry, now)
        if wall is not None:
            row["wall_s"] = (row["wall_s"] or 0.0) + wall
    for row in rows.values():
        label = PHASE_LABELS.get(row["phase"], row["phase"])
        unit = STEPPED.get(row["phase"])
        row["label"] = f"{label} ({row['runs']} {unit})" if unit and row["runs"] > 1 else label
    return list(rows.values())


def count_rows(counts: dict) -> list[dict]:
    """The same rows from the database's per-phase counts (search.read_models.phase_counts), for
    a search without a progress file: labels as the driver names its phases, wall times unknown."""
    return [{"phase": p, "label": PHASE_LABELS.get(p, p), "done": c["done"], "total": c["total"], "runs": None,
             "wall_s": None} for p, c in counts.items()]


__all__ = ["phase_rows", "count_rows", "entry_wall"]
