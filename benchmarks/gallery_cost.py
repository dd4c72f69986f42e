"""The gallery's cost against the search's own at the default settings (issue 31), counted in
denoiser forwards per prompt from the real architectures on the meta device (no download, no memory).

    python benchmarks/gallery_cost.py

Counted, not timed: on one device every forward of a model at one resolution costs the same, so the
ratio of forwards is the ratio of GPU time up to the VAE decodes, which are listed apart (the search
decodes nothing: it compares latents). The search's count is a lower bound: Apple's analysis only
(isolated and cumulative runs of every default format), without baselines, floor probes, recipe
measurements or refinement, so the printed ratio is an upper bound of the gallery's share, except
that prefix reuse (docs/gpu-throughput.md) makes an isolated run cheaper than a full forward: even if it
halved every search forward, the ratio would only double.
"""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.formats import PALETTE_NBITS  # noqa: E402
from search.config import SearchConfig  # noqa: E402
from workers.arch_models import meta_unet  # noqa: E402
from workers.denoiser import candidate_layers  # noqa: E402
from workers.evaluation.gallery import DEFAULT_STEPS  # noqa: E402
from workers.model_spec import APPLE_RESOLUTION, REAL_MIN_SIZE  # noqa: E402

NATIVE = {"sdxl-arch": 1024, "sd15-arch": 512}  # the gallery's default resolution: the model's own


def default(name: str):
    return next(f.default for f in fields(SearchConfig) if f.name == name)


def main() -> None:
    steps, recipes, formats = default("steps"), default("num_recipes"), len(PALETTE_NBITS)
    print(f"defaults: {formats} formats {PALETTE_NBITS}, {steps} denoising step(s) per search run, "
          f"{recipes} recipes, gallery {DEFAULT_STEPS} steps; per prompt (both batch the same prompts)")
    print(f"search runs at Apple's {APPLE_RESOLUTION} px, the gallery at the model's own size: a gallery forward "
          f"counts (native / {APPLE_RESOLUTION})^2 search forwards (pixels; attention grows a little faster)")
    print("| model | candidates | search runs (analysis only) | search forwards | gallery rows | gallery forwards "
          "| in search forwards | VAE decodes | gallery / search |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("sdxl-arch", "sd15-arch"):
        candidates = len(candidate_layers(meta_unet(name), REAL_MIN_SIZE))
        runs = 2 * formats * candidates  # isolated + cumulative, every format
        search = runs * steps
        rows = 2 + recipes  # float16, linear_8bit, every recipe (the 16-bit recipe's images are copied: counted anyway)
        gallery = rows * DEFAULT_STEPS
        scaled = gallery * (NATIVE[name] / APPLE_RESOLUTION) ** 2
        print(f"| {name} | {candidates} | {runs:,} | {search:,} | {rows} | {gallery:,} | {scaled:,.0f} | {rows} | "
              f"{scaled / search:.3f} |")


if __name__ == "__main__":
    main()
