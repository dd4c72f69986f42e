#!/usr/bin/env bash
# Set up, then run a demo search on the built-in tiny SDXL-shaped model (embedded Ray +
# SQLite). Ends with the recipe table; writes demo/recipes.json, demo/psnr.png and the images of
# every recipe beside the float16 model's (demo/images/grid.png, made by the search's gallery phase).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p demo
# The search goes into the default database (MBP_SEARCH_DB if set): the README's next commands
# (`search list`, `search status ID`, `search serve`) show it without a --db.
# Apple's recipes (its thresholds) and optimal recipes at 3-6 average bits, side by side.
.venv/bin/search submit --model tiny-sdxl --strategy both --targets 3,4,5,6 --resume "$@" | tee demo/submit.log
id=$(head -n1 demo/submit.log | awk '{print $2}')
.venv/bin/search download "$id" -o demo/recipes.json
.venv/bin/search plot "$id" -o demo/psnr.png
.venv/bin/search images "$id" -o demo/images
