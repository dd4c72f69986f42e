"""`search submit` start-up with 10 stored SDXL-size searches in the database vs an empty one
(issue 33: the reuse lookup must be an index, not a scan; target ratio <= 1.1x).

    python benchmarks/reuse_startup.py [--searches 10] [--layers 500] [--repeats 5]

Each stored search is inserted directly (rows, not runs): ``--layers`` candidates, 4 formats,
an isolated and a cumulative measurement per (layer, format) (4,000 at 500 layers), a palette per
(layer, format), 2 baselines and 16 floor probes, every row with its key, as a search of another
model (its own fingerprint) would store them.

What is timed is every database step `search submit` takes before its evaluators get work, the
same code the driver runs: open the database, the duplicate checks, storing the search with its
candidates, ``Reuse`` (the key space), and ``Reuse.take`` / ``take_palettes`` on the isolated
phase's items (2 baselines, 16 floor probes, 4 x layers isolated items, 4 x layers palettes).
Loading the model and starting Ray are left out: they do not depend on the database (seconds to
minutes, the same with or without stored searches), so leaving them out only makes the ratio
stricter. A second table times the same steps when one stored search *does* match (the new search
copies its 4,000 + 2,000 rows instead of measuring them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.formats import PaletteFormat  # noqa: E402
from search.config import SearchConfig  # noqa: E402
from search.driver.reuse import Reuse  # noqa: E402
from storage import Layer, Storage  # noqa: E402
from storage.measurement_keys import KeySpace  # noqa: E402
from workers.evaluation.items import WorkItem  # noqa: E402

FORMATS = (2, 4, 6, 8)
INFOS = [{"device": "cuda", "dtype": "float16"}]


def layers(n: int) -> list[Layer]:
    return [Layer(f"down_blocks.{i // 50}.attentions.{i % 50}.proj", 1_638_400, (1280, 1280), "linear")
            for i in range(n)]


def config() -> SearchConfig:
    return SearchConfig(nbits=FORMATS, resolution=768)


def fill(db: Path, fingerprint: str, cands: list[Layer]) -> None:
    """One stored SDXL-size search of the model ``fingerprint``, rows inserted in one transaction."""
    import sqlite3

    cfg = config()
    with Storage(db) as st:
        search = st.create_search(model="m", model_version="stabilityai/sdxl", model_location="/m", model_source="hub",
                                  fingerprint=fingerprint, config=cfg.to_dict(), config_hash=cfg.fingerprint(),
                                  layers=cands)
        st.update_search(search.id, status="completed", phase="done", finished=True)
    space = KeySpace.of(fingerprint=fingerprint, model_version="stabilityai/sdxl", config=cfg.to_dict(),
                        dtype="float16", candidates=[c.name for c in cands])
    names = [c.name for c in cands]
    m_rows, p_rows = [], []
    for b in FORMATS:
        for pos, name in enumerate(names, 1):
            m_rows.append((search.id, f"isolated/{b}/{name}", "isolated", b, name, None,
                           space.measurement("isolated", layer=name, bits=b, assignment=((name, b),))))
            m_rows.append((search.id, f"cumulative/{b}/{pos:05d}", "cumulative", b, name, pos,
                           space.measurement("cumulative", assignment=tuple((n, b) for n in names[:pos]))))
            p_rows.append((search.id, name, b, "0" * 64, 1e-6, f"{search.id}/{name}.{b}bit.npz", space.palette(name, b)))
    for u in (1, 4):
        for name in names[:8]:
            m_rows.append((search.id, f"floor/{name}/x{u}", "floor", None, name, u,
                           space.measurement("floor", layer=name, position=u)))
    con = sqlite3.connect(db, timeout=60)
    with con:
        con.executemany("INSERT INTO measurements (search_id, key, phase, bits, group_size, layer, position, psnr, "
                        "per_prompt_json, node, worker, duration_s, created_at, reuse_key, reuse_device) VALUES "
                        "(?, ?, ?, ?, 0, ?, ?, 30.0, '[30.0]', 'n', 'w', 1.0, '2026-01-01', ?, 'cuda')", m_rows)
        con.executemany("INSERT INTO palettes (search_id, layer, bits, group_size, digest, weight_mse, path, reuse_key) "
                        "VALUES (?, ?, ?, 0, ?, ?, ?, ?)", p_rows)
        con.executemany("INSERT INTO baselines (search_id, name, psnr, per_prompt_json, node, duration_s, reuse_key, "
                        "reuse_device) VALUES (?, ?, 30.0, '[30.0]', 'n', 1.0, ?, 'cuda')",
                        [(search.id, n, space.measurement("baseline", name=n)) for n in ("original", "linear_8bit")])
    con.close()


def startup(db: Path, fingerprint: str, cands: list[Layer]) -> tuple[float, int, float]:
    """The database steps of a submit up to the evaluators' first work item: (wall seconds, rows
    copied, CPU seconds of this process: on a busy machine the steadier of the two)."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = config()
    with Storage(db) as st:
        st.find_unfinished_request("x" * 64)
        st.find_unfinished("/m", cfg.fingerprint())
        search = st.create_search(model="m", model_version="stabilityai/sdxl", model_location="/m", model_source="hub",
                                  fingerprint=fingerprint, config=cfg.to_dict(), config_hash=cfg.fingerprint(),
                                  layers=cands)
        search = st.claim(search.id, "bench", lambda s: True)
        reuse = Reuse(st, search, cfg, INFOS)
        names = [c.name for c in cands]
        items = [WorkItem(f"baseline/{n}", "baseline", name=n, linear8=n == "linear_8bit")
                 for n in ("original", "linear_8bit")]
        items += [WorkItem(f"floor/{n}/x{u}", "floor", layer=n, position=u) for u in (1, 4) for n in names[:8]]
        items += [WorkItem(f"isolated/{b}/{n}", "isolated", bits=PaletteFormat.of(b), layer=n,
                           assignment=((n, PaletteFormat.of(b)),)) for b in FORMATS for n in names]
        reuse.take(items)
        reuse.take_palettes([(n, PaletteFormat.of(b)) for n in names for b in FORMATS])
        copied = st.get_search(search.id).reused
    return time.perf_counter() - t0, copied, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--searches", type=int, default=10)
    ap.add_argument("--layers", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cands = layers(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        empty, full = Path(tmp) / "empty.db", Path(tmp) / "full.db"
        Storage(empty).close()
        t0 = time.perf_counter()
        for i in range(args.searches):
            fill(full, f"{i:064x}", cands)
        fill_s = time.perf_counter() - t0
        import sqlite3

        con = sqlite3.connect(full)
        stored = con.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
        plan = " ".join(r[-1] for r in con.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM measurements WHERE reuse_key IN ('a', 'b') AND search_id != 'x'"))
        con.close()
        startup(empty, "f" * 64, cands), startup(full, "f" * 64, cands)  # warm both (imports, page cache)
        runs: dict[str, list] = {"empty": [], "full": []}
        for _ in range(args.repeats):  # interleaved: a busy machine slows both alike
            for name, db in (("empty", empty), ("full", full)):
                runs[name].append(startup(db, "f" * 64, cands))
        base, loaded = (min(r[0] for r in runs[n]) for n in ("empty", "full"))
        med = {n: statistics.median(r[0] for r in runs[n]) for n in runs}
        cpu = {n: statistics.median(r[2] for r in runs[n]) for n in runs}
        copied = runs["full"][-1][1]
        match_s, match_copied, _ = startup(full, f"{0:064x}", cands)  # the same model as stored search 0
    print(json.dumps({"stored_searches": args.searches, "stored_measurements": stored, "fill_s": round(fill_s, 2),
                      "lookup_plan": plan}))
    print(f"{'database':<40} {'wall s (min)':>12} {'median':>8} {'CPU s (median)':>14} {'copied':>8}")
    print(f"{'empty':<40} {base:>12.3f} {med['empty']:>8.3f} {cpu['empty']:>14.3f} {0:>8}")
    print(f"{f'{args.searches} stored searches, other models':<40} {loaded:>12.3f} {med['full']:>8.3f} "
          f"{cpu['full']:>14.3f} {copied:>8}")
    print(f"{f'{args.searches} stored searches, one the same model':<40} {match_s:>12.3f} {'':>8} {'':>14} "
          f"{match_copied:>8}")
    print(f"ratio (stored / empty), {args.repeats} interleaved runs each (target <= 1.1x): CPU time "
          f"{cpu['full'] / cpu['empty']:.3f}x; wall {loaded / base:.3f}x of the fastest, "
          f"{med['full'] / med['empty']:.3f}x of the medians")


if __name__ == "__main__":
    main()
