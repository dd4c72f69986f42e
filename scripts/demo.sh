#!/usr/bin/env bash
# Set up, then run a demo search on the built-in tiny SDXL-shaped model (embedded Ray +
# SQLite). Ends with the recipe table; writes demo/recipes.json and demo/psnr.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p demo
export MBP_SEARCH_DB=${MBP_SEARCH_DB:-$PWD/demo/searches.db}
# Apple's recipes (its thresholds) and optimal recipes at 3-6 average bits, side by side.
.venv/bin/search submit --model tiny-sdxl --strategy both --targets 3,4,5,6 --resume "$@" | tee demo/submit.log
id=$(head -n1 demo/submit.log | awk '{print $2}')
.venv/bin/search download "$id" -o demo/recipes.json
.venv/bin/search plot "$id" -o demo/psnr.png
