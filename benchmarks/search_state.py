"""A search's state read from its SQLite file, read-only, while something else runs it: what it
has stored, its phase, its evaluations (the crash campaign's view of a search it kills)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path


def query(db: Path, sql: str) -> list:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def stored_keys(db: Path) -> set[str]:
    """Everything a search stores as it goes: measurements, baselines, palettes, measured recipes."""
    return ({k for (k,) in query(db, "SELECT key FROM measurements")}
            | {f"baseline/{n}" for (n,) in query(db, "SELECT name FROM baselines")}
            | {f"palette/{l}/{b}/{g}" for l, b, g in query(db, "SELECT layer, bits, group_size FROM palettes")}
            | {f"recipe/{k}" for (k,) in query(db, "SELECT key FROM recipes WHERE psnr IS NOT NULL")})


def phase_of(db: Path) -> str:
    rows = query(db, "SELECT phase, fingerprint, config_json FROM searches")
    if not rows:
        return "preparing"
    phase, fingerprint, config = rows[0]
    if not fingerprint:
        return "preparing"
    if phase == "isolated":
        pairs = query(db, "SELECT COUNT(*) FROM layers")[0][0] * len(json.loads(config)["nbits"])
        if query(db, "SELECT COUNT(*) FROM palettes")[0][0] < pairs:
            return "palettes"  # fitted while the isolated phase runs
    return {"candidates": "refinement", "setup": "preparing"}.get(phase, phase)


def evaluations(db: Path) -> int:
    rows = query(db, "SELECT SUM(evaluations) FROM searches")
    return (rows[0][0] or 0) if rows else 0
