"""The crash campaign (benchmarks/crash_campaign.py) as CI runs it: one search SIGKILLed once per
target at moments drawn from a seed (an evaluator, its driver, the resume that follows within
its first seconds, the `search serve` that resumes it next), ends with the uninterrupted run's
JSON; nothing stored before a kill is missing or changed in the final database, and the
completing run computes exactly what was missing. The large campaign's figures are in
docs/reliability.md."""
from __future__ import annotations

import json

import pytest

from benchmarks.crash_campaign import TARGETS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_one_kill_per_target_loses_nothing_and_ends_with_the_uninterrupted_json(tmp_path, model_cache):
    from benchmarks.crash_campaign import main

    out = tmp_path / "figures.json"
    rc = main(["--cover", "--seed", "7", "--small", "--work", str(tmp_path / "work"), "--out", str(out)])
    figures = json.loads(out.read_text())
    print(f"\n{ {k: v for k, v in figures.items() if k != 'kill_log'} }")
    # every target hit in this run: evaluator, driver, resume, service
    assert figures["by_target"] == {target: 1 for target in TARGETS} and figures["searches"] == 1
    assert [k["target"] for k in figures["kill_log"]] == ["evaluator", "driver", "resume", "service"]
    assert figures["lost"] == 0 and all(k["lost"] == 0 for k in figures["kill_log"])
    assert figures["redone"] == 0
    assert figures["differences"] == 0  # the final JSON is the uninterrupted run's
    assert rc == 0
