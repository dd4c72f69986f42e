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
# The Core AI target (`search bundle --target coreai`, issue 36): the coreai extra, --no-deps because
# coreai-core declares numpy>=2.3 while this project pins numpy<2.3 (it runs with 2.2.6).
if ! "$VENV/bin/python" -c "import coreai.runtime, coreai_torch, coreai_opt" 2>/dev/null; then
  $PIP install -q --no-deps coreai-torch==0.4.3 coreai-opt==0.4.0 coreai-core==1.0.0b3 ml_dtypes==0.6.0 \
    torchao==0.18.0 StrEnum==0.5.0 yuvio==1.6 ninja==1.13.2 psutil==7.2.2
fi
# Compile the k-means once (numba caches it next to the module), so the first search and every
# palette task load it in a fraction of a second instead of compiling it each.
"$VENV/bin/python" -m workers.kmeans1d_fast
# The dashboard's browser tests drive Debian's chromium: without it tests/search/test_dashboard.py
# is skipped, and fails under CI=true. Installed here when missing and we may (root with apt-get);
# under CI a browser that is still missing stops the setup here, with the reason.
CHROMIUM=${MBP_TEST_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
      || echo "setup: apt-get install chromium failed" >&2
  fi
  if [ ! -x "$CHROMIUM" ]; then
    why="no Chromium at $CHROMIUM (setup installs Debian's chromium as root with apt-get; MBP_TEST_CHROMIUM names another)"
    case "${CI:-}" in
      true|1) echo "setup: $why; CI=true, so the dashboard's browser tests must run" >&2; exit 1 ;;
      *) echo "setup: $why; the dashboard's browser tests will be skipped" >&2 ;;
    esac
  fi
fi
