"""GPU throughput of a real search, projected to a full SDXL analysis.

    python benchmarks/gpu_throughput.py                  # sdxl-arch at 768 px, ~7 min budget, on the GPU
    python benchmarks/gpu_throughput.py --budget-s 900 --compile
    python benchmarks/gpu_throughput.py --quick          # CPU, built-in tiny-sdxl, ~1-2 min

Runs `search submit` (the CLI, Ray, the driver, the evaluators: nothing is bypassed) on
``sdxl-arch`` (SDXL's real UNet/VAE, random weights) with a subset of the candidates (the
largest ones) and bit depths sized so the search fits the time budget: the evaluation time is
estimated from the UNet's FLOPs (counted on the meta device) and a matmul rate measured here.
Then prints evaluations/s, achieved TFLOP/s (executed, i.e. after prefix reuse, and effective,
as if every evaluation ran the full forward), per-phase wall time, and the projected time of a
full SDXL search (792 candidates x 5 depths) on this machine for Apple's protocol and for the
fast optimal mode: evaluations from the FLOPs each one executes (prefix reuse included) at the
measured rate, palettes from k-means fits timed here at every depth, spread over the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.flop_model import flop_model  # noqa: E402

FULL_DEPTHS = (1, 2, 4, 6, 8)
PROMPTS = 8  # Apple's protocol: 8 prompts x CFG in one call


def matmul_rate(device: str) -> float:
    """Dense matmul FLOP/s on the device (fp16 on a GPU, fp32 on a CPU)."""
    n, dtype = (8192, torch.float16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    reps = 20 if device == "cuda" else 3
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def fit_seconds(numel: int) -> dict[int, float]:
    """One k-means palette fit of a normal fp16 tensor of ``numel`` elements at each depth."""
    from workers.palettize import fp16_histogram, palette_from_histogram

    w = (np.random.default_rng(0).standard_normal(numel) * 0.02).astype(np.float16)
    counts = fp16_histogram(w)
    palette_from_histogram(counts, 1)  # warm-up (imports)
    out = {}
    for b in FULL_DEPTHS:
        t0 = time.perf_counter()
        palette_from_histogram(counts, b)
        out[b] = time.perf_counter() - t0
    return out


def flops(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli.app", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True)


def parse_run(stderr: str) -> dict:
    text = " ".join(stderr.split())
    out = {}
    m = re.search(r"one pipeline run takes ([\d.]+) s warm \(first run ([\d.]+) s, model load ([\d.]+) s\)", text)
    if m:
        out.update(warm_s=float(m[1]), first_s=float(m[2]), load_s=float(m[3]))
    m = re.search(r"timings \(wall s[^)]*\): (.*?)(?: recipes of| ┏|$)", text)
    if m:
        out["timings"] = {k: float(v) for k, v in re.findall(r"([a-z]+) ([\d.]+)", m[1])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU, built-in tiny-sdxl, small budget")
    ap.add_argument("--model", default=None, help="default: sdxl-arch (--quick: tiny-sdxl)")
    ap.add_argument("--budget-s", type=float, default=None, help="search wall budget [default 420; --quick 60]")
    ap.add_argument("--resolution", type=int, default=None, help="default 768 (Apple); --quick: the model's own")
    ap.add_argument("--nbits", default="2,4", help="bit depths of the measured subset")
    ap.add_argument("--compile", action="store_true", help="pass --compile to the search")
    ap.add_argument("--no-prefix-reuse", action="store_true", help="pass --no-prefix-reuse to the search")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    model = args.model or ("tiny-sdxl" if args.quick else "sdxl-arch")
    budget = args.budget_s or (60.0 if args.quick else 420.0)
    depths = tuple(int(b) for b in args.nbits.split(","))

    from workers.arch_models import meta_unet
    from workers.models import candidate_layers, load_denoiser, resolve_model

    print(f"model {model} on {device}; building/loading it (built once, cached)...", flush=True)
    spec = resolve_model(model)
    resolution = args.resolution or (spec.default_resolution if spec.tiny else 768)
    unet = meta_unet(model) if model.endswith("-arch") else load_denoiser(spec)
    cands = candidate_layers(unet, spec.default_min_size)
    names = [c.name for c in cands]
    fm = flop_model(unet, resolution, 2 * PROMPTS)
    full_sdxl = flop_model(meta_unet("sdxl-arch"), 768, 2 * PROMPTS)
    sdxl_names = [c.name for c in candidate_layers(meta_unet("sdxl-arch"), 100_000)]
    rate = matmul_rate(device)
    est_eval = fm.total / (0.4 * rate) + (0.02 if device == "cuda" else 0.05)
    startup = 90.0 if device == "cuda" else 40.0
    per_cand = 2 * len(depths) * est_eval * 0.75 + len(depths) * 0.3 / max(1, (os.cpu_count() or 2) - 1)
    k = int(max(2, min(len(cands), (budget - startup - 10 * est_eval) / per_cand)))
    by_size = sorted(cands, key=lambda c: -c.numel)
    min_size = by_size[k - 1].numel - 1 if k < len(cands) else spec.default_min_size
    subset = [c for c in cands if c.numel > min_size]
    print(f"UNet forward at {resolution} px, batch {2 * PROMPTS}: {flops(fm.total)}; matmul rate "
          f"{flops(rate)}/s; estimated evaluation {est_eval:.3f} s -> {len(subset)} of {len(cands)} "
          f"candidates (> {min_size} elements) at {args.nbits} bits", flush=True)

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory(prefix="mbp-bench-") as tmp:
        db = str(Path(tmp) / "bench.db")
        flags = ["--model", model, "--db", db, "--nbits", args.nbits, "--min-size", str(min_size),
                 "--num-recipes", "2", "--resolution", str(resolution)]
        flags += ["--compile"] if args.compile else []
        flags += ["--no-prefix-reuse"] if args.no_prefix_reuse else []
        flags += ["--workers", str(args.workers)] if args.workers else []
        t0 = time.perf_counter()
        run = cli("submit", *flags, env=env)
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            print(run.stderr[-4000:], file=sys.stderr)
            return 1
        sid = run.stdout.split()[1]
        status = json.loads(cli("status", sid, "--db", db, "--json", env=env).stdout)
    info = parse_run(run.stderr)
    t = info.get("timings", {})
    counts = status.get("measurements", {})
    n_iso, n_cum = counts.get("isolated", 0), counts.get("cumulative", 0)
    n_other = 2 + 2  # baselines + recipes
    eval_wall = t.get("isolated", 0) + t.get("cumulative", 0) + t.get("recipes", 0)
    n_evals = n_iso + n_cum + n_other
    sub_names = [c.name for c in subset]
    executed = sum(fm.executed([l]) for l in sub_names) * len(depths)
    executed += sum(fm.executed(sub_names[-p:]) for p in range(1, len(sub_names) + 1)) * len(depths)  # ~order
    executed += n_other * fm.total
    if args.no_prefix_reuse:
        executed = n_evals * fm.total
    exec_rate = executed / eval_wall if eval_wall else float("nan")
    print(f"\nsearch {sid}: {wall:.1f} s wall through the CLI; per phase (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    if "warm_s" in info:
        print(f"one pipeline run: {info['warm_s']:.3f} s warm (first {info['first_s']:.2f} s, load {info['load_s']:.1f} s)")
    print(f"evaluations: {n_evals} in {eval_wall:.1f} s = {n_evals / eval_wall:.2f} evaluations/s; "
          f"{eval_wall / n_evals:.3f} s each")
    print(f"achieved: {flops(exec_rate)}/s executed, {flops(n_evals * fm.total / eval_wall)}/s "
          f"effective (full-forward equivalent); palettes: {t.get('palettes', 0):.1f} s for "
          f"{len(subset) * len(depths)} fits")

    # Projection: the full SDXL architecture at 768 px on this machine.
    per_eval_overhead = 0.0
    iso = [full_sdxl.executed([l]) for l in sdxl_names]
    order = list(np.random.default_rng(0).permutation(sdxl_names))  # cumulative order: unknown, shuffled
    cum = [full_sdxl.executed(order[:p]) for p in range(1, len(order) + 1)]
    reuse = not args.no_prefix_reuse
    flops_iso = (sum(iso) if reuse else len(iso) * full_sdxl.total)
    flops_cum = (sum(cum) if reuse else len(cum) * full_sdxl.total)
    eval_s = lambda flops, n: flops / exec_rate + n * per_eval_overhead  # noqa: E731
    fits = fit_seconds(1_600_000)  # the median SDXL candidate
    cores = max(1, (os.cpu_count() or 2) - (0 if device == "cpu" else 1))
    palettes_s = len(sdxl_names) * sum(fits.values()) / cores
    start_s = t.get("start", 0.0)
    extra = 9 * full_sdxl.total  # 2 baselines + 7 recipes
    iso_s = eval_s(len(FULL_DEPTHS) * flops_iso + extra, 0)
    apple = start_s + max(palettes_s, iso_s) + eval_s(len(FULL_DEPTHS) * flops_cum, 0)
    fast = start_s + palettes_s + eval_s(1.1 * flops_iso + extra, 0)  # anchor depth + ~10 % refinement
    print(f"\nprojected full SDXL search (792 candidates x {len(FULL_DEPTHS)} depths, 768 px, batch 16) on this "
          f"machine ({cores} cores for palettes; fits {', '.join(f'{b}b {s:.2f}s' for b, s in fits.items())}):")
    print(f"  Apple's protocol: {apple / 60:.1f} min (palettes {palettes_s / 60:.1f} min, overlapped with isolated "
          f"{iso_s / 60:.1f} min; cumulative {eval_s(len(FULL_DEPTHS) * flops_cum, 0) / 60:.1f} min)")
    print(f"  fast optimal mode: {fast / 60:.1f} min (palettes first, then ~{int(1.1 * len(iso)) + 9} evaluations)")
    if device == "cpu":
        print("  (a CPU projection from a tiny model's FLOP rate: the tiny model is overhead-bound, so this only "
              "shows the arithmetic; run without --quick on a GPU for real figures)")
    print(f"  isolated evaluation on average: {eval_s(flops_iso / len(iso), 0):.3f} s "
          f"({flops_iso / len(iso) / full_sdxl.total:.0%} of a full forward's FLOPs with prefix reuse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
