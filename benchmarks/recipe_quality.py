"""Recipe quality: Apple's recipes vs one-shot optimal vs measured refinement, on a trained model.

    python benchmarks/recipe_quality.py [--precision float32|float16] [--quick] [--refine-evals N] [--db PATH]

On the bench model (``benchmarks/bench_model.py``: tiny-sdxl's UNet trained on scikit-image
photographs, built once and cached) it runs, through the real CLI (``python -m search.cli.app``):

1. ``search submit --strategy apple`` (Apple's full analysis: isolated + cumulative + its recipes;
   every search also measures the evaluation-floor probes: 8 layers at 1 and 4 ulps);
2. Apple's recipes with average bits in [3, 8]; where Apple's default thresholds leave a grid point
   (3, 4, ..., 8 bits) uncovered (on bit-exact CPU float32 they all lie above 8 bits), Apple's own
   rule at further thresholds on the same cumulative curves, measured end to end (marked ``+``);
3. for each of those Apple recipes, ``search recipe ID --bits <its average bits> --refine-evals N``
   on the same search: the one-shot optimal recipe (knapsack on the floor-aware noise model; its
   prediction calibrated on the search's end-to-end measurements so far, then measured) and the refined one (evolutionary search from the better measured of Apple's
   recipe at that budget and the knapsack's); ``--refine-evals 0`` above 6 bits (one-shot only);
4. ``search submit --strategy optimal --evals fast --targets <the matched bits up to 6>``: refined
   fast mode (isolated at the anchor depth, predicted elsewhere, refinement included).

It prints a markdown table at matched average bits and PASS/MISS for each target of issue 12:
refined >= Apple + 1 dB at 3, 4 and 5 bits; refined never below Apple at a matched size;
|predicted - measured| <= 1 dB for one-shot recipes at 3-8 bits; refined fast mode <= 1/3 of
Apple's pipeline runs. Deterministic (fixed seeds, one CPU arithmetic); only timings vary.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import MIN_SIZE, ensure_bench_model  # noqa: E402
from quality_runs import (RANGE, add_apple_recipes, fast_results, load, log, resolution_args, status,  # noqa: E402
                          submit, target_run, within)
from search.defaults import REFINE_EVALS  # noqa: E402
from search.recipes.strategy import apple_thresholds  # noqa: E402

GRID = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0)  # extra Apple thresholds aim at these average bits
QUICK_GRID = (3.0, 4.0, 5.0)
REFINED = (3.0, 6.0)      # matched sizes refined (and targeted by the fast search)
GAIN_AT = (3.0, 4.0, 5.0)  # refined >= Apple + GAIN_DB at the matched size nearest each
GAIN_DB, PRED_DB, FAST_RATIO = 1.0, 1.0, 1 / 3


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=None, help="SQLite database [default: a fresh temporary one]")
    ap.add_argument("--quick", action="store_true", help="bit depths 2,4,8 and matched sizes near 3, 4, 5 bits only")
    ap.add_argument("--workers", type=int, default=2, help="evaluators of every run [2]")
    ap.add_argument("--model", default=None, help="another model, e.g. tiny-sdxl [default: the trained bench model]")
    ap.add_argument("--precision", default="float32", choices=("float32", "float16"),
                    help="compute precision of every evaluation (float16 has an evaluation floor, as GPUs) [float32]")
    ap.add_argument("--apple", default=None, help="reuse this completed Apple search of --db (skips step 2)")
    ap.add_argument("--fast", default=None, help="reuse this completed fast search of --db with these targets: its "
                    "refinement is extended to --refine-evals by `search recipe` (the same seeded path)")
    ap.add_argument("--refine-evals", type=int, default=REFINE_EVALS,
                    help=f"measured refinement per matched size [{REFINE_EVALS}, the search default]")
    ap.add_argument("--grouped", action="store_true", help="issue 13: the grouped-channel + 3-bit search space "
                    "against Apple's per-tensor recipes at matched size (benchmarks/grouped_quality.py)")
    ap.add_argument("--formats", default=None, help="with --grouped: the formats searched")
    ap.add_argument("--min-size", type=int, default=MIN_SIZE, help="with --grouped: candidate threshold")
    ap.add_argument("--prompts", type=int, default=None, help="with --grouped: Apple's first K prompts only")
    ap.add_argument("--resolution", type=int, default=None, help="image size of every run [64 for the bench model, "
                    "which it was trained at; the search's default for --model]")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    db = args.db or Path(tempfile.mkdtemp(prefix="recipe-quality-")) / "searches.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    if args.grouped:
        from grouped_quality import FORMATS, run_grouped

        return run_grouped(db, args.workers, args.formats or FORMATS, args.model, args.min_size, args.prompts,
                           args.resolution)
    common = ["--workers", str(args.workers), "--min-size", str(MIN_SIZE), *resolution_args(args.model, args.resolution),
              "--precision", args.precision,
              *(["--nbits", "2,4,8"] if args.quick else [])]

    log("[1/5] bench model")
    model = args.model or ensure_bench_model(log=log)
    log(f"[2/5] Apple search on {model} ({args.precision}, db {db})")
    apple_id = args.apple or submit(db, "--model", str(model), "--strategy", "apple", *common)
    log("[3/5] Apple recipes in [3, 8] bits")
    extra = set(add_apple_recipes(db, apple_id, QUICK_GRID if args.quick else GRID, args.workers))
    storage, _, apple_cfg, apple_tables, _ = load(db, apple_id)
    apple = sorted((r for r in storage.recipes(apple_id) if r.strategy == "apple" and within(r.avg_bits, RANGE)
                    and r.psnr is not None), key=lambda r: -r.avg_bits)
    if not apple:
        raise SystemExit("no Apple recipe in [3, 8] bits, even with extra thresholds")
    defaults = apple_thresholds(apple_cfg, apple_tables)[0]  # '+': a threshold of our own (also when reused)
    extra |= {a.key for a in apple if all(abs(a.threshold - t) > 1e-9 for t in defaults)}

    log(f"[4/5] one-shot and refined recipes on the same measurements (search recipe x {len(apple)})")
    runs = {a.key: target_run(db, apple_id, a.avg_bits, args.refine_evals if within(a.avg_bits, REFINED) else 0,
                              args.workers) for a in apple}
    targets = [a.avg_bits for a in apple if within(a.avg_bits, REFINED)]
    log(f"[5/5] fast-mode search, refined, targets {', '.join(f'{t:.2f}' for t in targets)}")
    fast_id = args.fast or submit(db, "--model", str(model), "--strategy", "optimal", "--evals", "fast",
                                  "--refine-evals", str(args.refine_evals), "--targets",
                                  ",".join(repr(t) for t in targets), *common)
    if args.fast:
        for t in targets:
            target_run(db, fast_id, t, args.refine_evals, args.workers)
    fast = fast_results(db, fast_id, targets)
    st_apple, st_fast = status(db, apple_id), status(db, fast_id)

    # -- pipeline runs: Apple's analysis as Apple's script runs it (no floor probes), its matched recipes
    m = st_apple["measurements"]
    apple_evals = m.get("isolated", 0) + m.get("cumulative", 0) + len(st_apple["baselines"]) + len(apple)
    fast_evals, fm = st_fast["evaluations"], st_fast["measurements"]
    floor = st_apple.get("eval_floor") or {}
    level = "none (the probes respond linearly)" if floor.get("psnr") is None else f"{floor['psnr']:.2f} dB"

    print(f"\n### {args.precision}: {model if args.model else 'bench model (tiny-sdxl trained)'}\n")
    print(f"searches apple {apple_id}, fast {fast_id}; {len(apple_tables.sizes)} candidates, nbits "
          f"{','.join(map(str, apple_cfg.nbits))}; original {st_apple['baselines']['original']:.2f} dB, linear_8bit "
          f"{st_apple['baselines']['linear_8bit']:.2f} dB; evaluation floor {level} "
          f"({floor.get('probes', 0)} probes); refine-evals {args.refine_evals}\n")
    print("| Apple bits | Apple dB | one-shot bits | one-shot dB | pred dB | \\|pred − meas\\| | refined bits | "
          "refined dB | vs Apple | evals (start) | fast one-shot dB (\\|err\\|) | fast refined dB | fast vs Apple |")
    print("|" + "---|" * 13)
    for a in apple:
        r = runs[a.key]
        o, res = r["one_shot"], r["result"]
        refined = within(a.avg_bits, REFINED)
        f = fast.get(a.avg_bits)
        print(f"| {a.avg_bits:.2f}{'+' if a.key in extra else ''} | {a.psnr:.2f} | {o.avg_bits:.2f} | {o.psnr:.2f} | "
              f"{o.predicted_psnr:.2f} | {abs(o.predicted_psnr - o.psnr):.2f} | "
              + (f"{res.avg_bits:.2f} | {res.psnr:.2f} | {res.psnr - a.psnr:+.2f} | {r['evals']} ({r['start']}) | "
                 if refined else "– | – | – | – | ")
              + (f"{f['one_shot'].psnr:.2f} ({abs(f['one_shot'].predicted_psnr - f['one_shot'].psnr):.2f}) | "
                 f"{f['result'].psnr:.2f} | {f['result'].psnr - a.psnr:+.2f} |" if f else "– | – | – |"))
    print(f"\npipeline runs: Apple {apple_evals} (isolated {m.get('isolated', 0)} + cumulative {m.get('cumulative', 0)}"
          f" + baselines {len(st_apple['baselines'])} + {len(apple)} matched recipes); refinement on the Apple "
          f"search: {sum(runs[a.key]['evals'] for a in apple if within(a.avg_bits, REFINED))} for {len(targets)} "
          f"sizes (starting points included); fast refined {fast_evals} (isolated {fm.get('isolated', 0)} + floor "
          f"probes {fm.get('floor', 0)} + baselines {len(st_fast['baselines'])} + recipes "
          f"{sum(1 for r in st_fast['recipes'] if r['strategy'] == 'optimal')} + candidates {fm.get('candidate', 0)})"
          f" = {fast_evals / apple_evals:.3f} of Apple's")

    print("\ntargets:")
    for g in GAIN_AT:
        near = [a for a in apple if abs(a.avg_bits - g) <= 0.5 and within(a.avg_bits, REFINED)]
        if not near:
            print(f"- refined >= Apple + {GAIN_DB:g} dB at {g:g} bits: no matched Apple recipe near {g:g} bits  MISS")
            continue
        a = min(near, key=lambda a: abs(a.avg_bits - g))
        gain = runs[a.key]["result"].psnr - a.psnr
        print(f"- refined >= Apple + {GAIN_DB:g} dB at {g:g} bits ({a.avg_bits:.2f}): {gain:+.2f} dB  "
              f"{verdict(gain >= GAIN_DB)}")
    refined_rows = [a for a in apple if within(a.avg_bits, REFINED)]
    worst = min(runs[a.key]["result"].psnr - a.psnr for a in refined_rows)
    print(f"- refined never below Apple ({len(refined_rows)} matched sizes): worst {worst:+.2f} dB  "
          f"{verdict(worst >= 0)}")
    errs = [abs(runs[a.key]["one_shot"].predicted_psnr - runs[a.key]["one_shot"].psnr) for a in apple]
    print(f"- |predicted - measured| <= {PRED_DB:g} dB for one-shot recipes at 3-8 bits ({len(errs)} recipes): "
          f"worst {max(errs):.2f} dB  {verdict(max(errs) <= PRED_DB)}")
    ferrs = [abs(f["one_shot"].predicted_psnr - f["one_shot"].psnr) for f in fast.values()]
    print(f"  (fast one-shot: worst {max(ferrs):.2f} dB over {len(ferrs)})")
    print(f"- refined fast mode <= 1/3 of Apple's runs: {fast_evals} vs {apple_evals} / 3 = {apple_evals / 3:.1f}  "
          f"{verdict(fast_evals <= apple_evals * FAST_RATIO)}")
    print(f"\ndatabase {db}; total {time.monotonic() - t0:.0f} s")
    rows = [{"apple_bits": a.avg_bits, "apple": a.psnr, "one_shot": runs[a.key]["one_shot"].psnr,
             "pred": runs[a.key]["one_shot"].predicted_psnr, "result": runs[a.key]["result"].psnr,
             "evals": runs[a.key]["evals"]} for a in apple]
    print("json " + json.dumps({"precision": args.precision, "apple_evals": apple_evals, "fast_evals": fast_evals,
                                "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
