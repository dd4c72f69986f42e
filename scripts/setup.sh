#!/usr/bin/env bash
# Create .venv (if needed) and install this project with its test extras.
# torch is installed first and explicitly: on Linux CPU machines an unpinned `torch`
# would pull a multi-GB CUDA build. Set TORCH_SPEC to choose another build (e.g. on GPU
# machines: TORCH_SPEC=torch), or pre-install torch in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! "$VENV/bin/python" -c "import search, workers, storage, ray, coremltools, pytest" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.mbp-installed" ]; then
  $PIP install -q -e ".[test]"
  touch "$VENV/.mbp-installed"
fi
# Compile the k-means once (numba caches it next to the module), so the first search and every
# palette task load it in a fraction of a second instead of compiling it each.
"$VENV/bin/python" -m workers.kmeans1d_fast
# The dashboard's browser tests drive Debian's chromium (tests/search/test_dashboard.py skips
# without it); installed here when missing and we may (root with apt-get).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "setup: could not install chromium; the dashboard's browser tests will be skipped" >&2
fi
