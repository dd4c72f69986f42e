"""Candidates, parameters and Apple's default analysis size of real denoisers, counted from their
published configs on the meta device (no download, no memory): the table of docs/readme/23.md.

    python benchmarks/meta_counts.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.real_configs import REAL_DENOISERS, analysis_size  # noqa: E402


def main() -> None:
    print("| model | denoiser parameters | candidates | default analysis (pipeline runs) | denoiser calls per run "
          "| resolution |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in REAL_DENOISERS:
        a = analysis_size(name)
        print(f"| {name} ({a['repo']}) | {a['params']:,} | {a['candidates']:,} | {a['pipeline_runs']:,} | "
              f"{a['steps_per_run']} | {a['resolution']} |")


if __name__ == "__main__":
    main()
