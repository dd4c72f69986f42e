"""The search's recipes against Apple's Core AI `4bit` preset, measured on the Linux Core AI runtime.

    python benchmarks/coreai_vs_4bit.py                       # tiny-sd, recipes made here (minutes on CPU)
    python benchmarks/coreai_vs_4bit.py --search-first        # tiny-sd searched first (hours on 2 CPU cores)
    python benchmarks/coreai_vs_4bit.py --db DB --search ID   # an existing search of an SD 1.x/2.x/SD3 model

For every recipe at or under ``--max-bits`` (the search's average bits) it builds the Core AI
folder (`search bundle --target coreai`: the search's exact LUTs, checked bit for bit and on the
runtime), and Apple's `4bit` preset once (INT4 per-block-32 symmetric on the same denoiser, as
Apple's exporter applies it), both run in the search's own signal against the float16 diffusers
reference. Prints a table and writes it as JSON (``-o``). ``--search-first`` runs the optimal
strategy at average-bit targets with 1/2/4/6/8-bit palettes (3 bits does not export to Core AI);
the default instead stores a few fixed recipes over every candidate (uniform 4 bits, and mixes
of 6/4/2 bits around 4 and 4.5 bits) with real k-means palettes and their PSNR measured by the
real evaluator (tests.conftest.build_completed_search): not searched, so not the search's best.

The bench model (benchmarks/bench_model.py) is SDXL-shaped, and Apple's Core AI exporter has no
SDXL pipeline, so this runs on tiny-sd (SD-1.5-shaped, random weights) unless given another
search.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_search(db: Path, model: str, targets: str) -> str:
    cmd = [sys.executable, "-m", "search.cli.app", "submit", "--model", model, "--strategy", "optimal",
           "--targets", targets, "--nbits", "1,2,4,6,8", "--workers", "1", "--db", str(db)]
    subprocess.run(cmd, check=True)
    from storage import Storage

    with Storage(db) as st:
        return st.list_searches()[0].id


QUICK_CYCLES = ((4,), (6, 4, 4, 4), (6, 4, 4, 2, 6, 4), (2, 4, 6, 4))


def quick_recipes(db: Path, model: str) -> str:
    from tests.conftest import build_completed_search
    from workers.models import resolve_model

    return build_completed_search(resolve_model(model), model, db, cycles=QUICK_CYCLES, prompts=2,
                                  with_8bit=False)["search_id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", type=Path)
    ap.add_argument("--search")
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--targets", default="3,3.5,4,4.5")
    ap.add_argument("--max-bits", type=float, default=4.5)
    ap.add_argument("--search-first", action="store_true", help="run a real optimal search first (slow on CPU)")
    ap.add_argument("-o", "--output", type=Path, default=Path("benchmarks/RESULTS-coreai.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mbp-coreai-bench-"))
    db = args.db or work / "searches.db"
    if args.db is not None:
        search_id = args.search
    elif args.search_first:
        search_id = run_search(db, args.model, args.targets)
    else:
        search_id = quick_recipes(db, args.model)

    from search.driver.bundle_jobs import bundle_coreai
    from storage import Storage

    with Storage(db) as st:
        search_id = search_id or st.list_searches()[0].id
        recipes = sorted((r for r in st.recipes(search_id) if r.avg_bits <= args.max_bits), key=lambda r: r.avg_bits)
        rows, preset = [], None
        for i, r in enumerate(recipes):
            report = bundle_coreai(st, search_id, recipe=r.key, out_dir=work / f"bundle-{i}", compare_4bit=preset is None)
            res = report.result
            if res.comparison:
                preset = res.comparison["rows"][1]
                weights = res.comparison["weights"]
                mine = res.comparison["rows"][0]
            else:
                from workers.coreai.compare import row

                mine = row(f"recipe {r.key}", Path(res.path) / res.assets.get("unet", res.assets.get("transformer")),
                           weights, res.runtime_psnr, {"search_avg_bits": r.avg_bits})
            rows.append({**mine, "search_avg_bits": r.avg_bits, "measured_psnr": r.psnr, "luts_ok": res.luts_ok,
                         "runtime_ok": res.runtime_ok, "delta_db": mine["psnr"] - preset["psnr"]})
    out = {"search_id": search_id, "db": str(db), "weights": weights if recipes else None, "preset_4bit": preset,
           "recipes": rows}
    args.output.write_text(json.dumps(out, indent=2))
    print(f"{'':40} {'avg bits':>8} {'bits/w':>7} {'MB':>6} {'PSNR':>7} {'vs 4bit':>8}")
    if preset:
        print(f"{'Apple 4bit preset':40} {4.5:8.2f} {preset['bits_per_weight']:7.3f} "
              f"{preset['asset_bytes'] / 1e6:6.3f} {preset['psnr']:7.2f}")
    for r in rows:
        print(f"{r['name'][:40]:40} {r['search_avg_bits']:8.2f} {r['bits_per_weight']:7.3f} "
              f"{r['asset_bytes'] / 1e6:6.3f} {r['psnr']:7.2f} {r['delta_db']:+8.2f}")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
