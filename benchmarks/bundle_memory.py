"""Peak memory and wall time of `search bundle` on full-size architectures, one model at a time.

    python benchmarks/bundle_memory.py [--model sd15-arch] [--model sdxl-arch] [--layers 40] [--chunk]

For each model (the built-in full-architecture pipelines: real SD 1.5 / SDXL configs, random
weights, built once into the model cache):

1. a finished search is stored directly (no Ray): the candidate layers, real k-means palettes for
   the ``--layers`` largest candidates at 4 bits (the rest float16), and that recipe measured end
   to end by the real Evaluator at 256 px, 1 step, 1 prompt (the bundle's numeric check re-runs
   that signal; the protocol does not change what a bundle holds);
2. in a fresh process, the Core ML worker builds the bundle exactly as `search bundle` does
   (``bundle_recipe`` with the job run in that process rather than in a Ray task: Ray's own
   processes are not what is measured), printing each step's seconds as it ends;
3. the child's peak RSS (``ru_maxrss`` of the process) and wall time are printed, with the bundle's
   files and sizes.

A model whose bundle fails (e.g. killed for memory on a small machine) is reported with how far it
got (the last step printed) and the exit status; the next model still runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(model: str, db: Path, layers: int) -> tuple[str, str]:
    """Store a finished search of ``model`` with one measured recipe; returns (search id, recipe key)."""
    from search.config import SearchConfig
    from search.recipes.apple_rule import make_recipe
    from storage import Layer, PaletteInfo, Storage, StoredRecipe
    from storage.palette_store import PaletteStore
    from workers.evaluation.evaluator import Evaluator
    from workers.evaluation.items import WorkItem
    from workers.evaluation.signal import DEFAULT_PROMPTS
    from workers.models import candidate_layers, denoiser_fingerprint, load_denoiser, resolve_model
    from workers.palettize import kmeans_palette, save_palette

    spec = resolve_model(model)
    den = load_denoiser(spec)
    cands = candidate_layers(den, spec.default_min_size)
    chosen = {c.name for c in sorted(cands, key=lambda c: -c.numel)[:layers]}
    config = SearchConfig(nbits=(4,), num_recipes=1, min_size=spec.default_min_size, resolution=256, steps=1,
                          prompts=DEFAULT_PROMPTS[:1])
    storage = Storage(db)
    fingerprint = denoiser_fingerprint(den)
    search = storage.create_search(
        model=model, model_version=model, model_location=spec.location, model_source=spec.source,
        fingerprint=fingerprint, config=config.to_dict(), config_hash=config.fingerprint(),
        layers=[Layer(c.name, c.numel, c.shape, c.kind) for c in cands])
    recipe = make_recipe({c.name: 4 if c.name in chosen else 16 for c in cands}, {c.name: c.numel for c in cands})
    store, palettes = PaletteStore(db), {}
    for layer in sorted(chosen):
        pal = kmeans_palette(den.get_submodule(layer).weight.data.numpy(), 4)
        save_palette(store.path_for(search.id, layer, 4), pal)
        storage.add_palette(search.id, PaletteInfo(layer, 4, pal.digest, float(pal.weight_mse),
                                                   store.relative_path(search.id, layer, 4)))
        palettes[(layer, 4)] = pal
    del den
    ev = Evaluator(spec, config.signal_spec(), fingerprint=fingerprint, device="cpu", min_size=config.min_size)
    storage.add_recipe(search.id, StoredRecipe(recipe.key, recipe.strategy, recipe.threshold, None, recipe.bits,
                                               recipe.avg_bits, recipe.size_mb, None, None, None, None, None))
    item = WorkItem(f"recipe/{recipe.key}", "recipe", name=recipe.key,
                    assignment=tuple(sorted((l, b) for l, b in recipe.bits.items() if b != 16)))
    res = ev.evaluate(item, palettes)
    storage.set_recipe_result(search.id, recipe.key, psnr=res.psnr, per_prompt=res.per_prompt, node=res.node,
                              duration_s=res.duration_s)
    storage.update_search(search.id, status="completed", phase="done", finished=True)
    storage.close()
    return search.id, recipe.key


def child(db: str, search_id: str, out: str, chunk: bool) -> None:
    """The measured process: `search bundle` in-process."""
    from search.driver.bundle_jobs import bundle_recipe
    from storage import Storage
    from workers.coreml.bundle.contract import BundleOptions
    from workers.coreml.task import run_job

    t0 = time.monotonic()
    with Storage(db) as st:
        report = bundle_recipe(st, search_id, recipe=None, out_dir=out, options=BundleOptions(chunk=chunk),
                               execute=lambda job, _node: run_job(job))
    r = report.result
    print(json.dumps({"wall_s": round(time.monotonic() - t0, 1), "total_mb": round(r.total_bytes / 1e6, 1),
                      "files": {f.path.split("/")[0]: 0 for f in r.files}, "detail": report.info.detail}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="sd15-arch and/or sdxl-arch [default: both]")
    ap.add_argument("--layers", type=int, default=40, help="largest candidates palettized at 4 bits")
    ap.add_argument("--chunk", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.chunk)
    work = Path(tempfile.mkdtemp(prefix="bundle-bench-"))
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; work dir {work}")
    for model in args.model or ["sd15-arch", "sdxl-arch"]:
        db = work / f"{model}.db"
        t0 = time.monotonic()
        sid, key = prepare(model, db, args.layers)
        print(f"{model}: search stored in {time.monotonic() - t0:.0f} s (recipe {key})", flush=True)
        out = work / f"{model}-Resources"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.monotonic()
        cmd = [sys.executable, __file__, "--child", str(db), sid, str(out)] + (["--chunk"] if args.chunk else [])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.monotonic() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        print(f"{model}: exit {proc.returncode}, wall {wall:.0f} s, peak RSS {max(peak, before) / 2**20:.2f} GiB "
              f"(the bundle process, ru_maxrss)")
        for line in tail:
            print(f"  {line[:400]}")
        if out.is_dir():
            for p in sorted(out.iterdir()):
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
                print(f"  {p.name:40s} {size / 1e6:10.1f} MB")


if __name__ == "__main__":
    main()
