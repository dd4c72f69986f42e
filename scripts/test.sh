#!/usr/bin/env bash
# Set up (if needed), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two test files at a time (--dist loadfile keeps a file's shared searches in one process): most
# of a search test's time is Ray start-up and waiting, so two overlap well on 2 cores. Files are
# handed out longest first, in the order tests/conftest.py sorts them (--no-loadscope-reorder:
# pytest-xdist would otherwise sort files by their number of tests, and start one-test search
# files last). Every test process runs one OpenMP thread (tests/conftest.py: one_thread_per_process).
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
