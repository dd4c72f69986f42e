"""A few kills of the randomized crash campaign (benchmarks/crash_campaign.py), as CI runs it: a
search SIGKILLed at moments drawn from a seed (its driver, an evaluator, a driver during its own
resume), resumed each time, ends with the uninterrupted run's JSON; nothing stored is lost and
no completing run recomputes a stored measurement. The large campaign's figures are in
docs/reliability.md."""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_random_kills_lose_nothing_and_end_with_the_uninterrupted_json(tmp_path, model_cache):
    from benchmarks.crash_campaign import main

    out = tmp_path / "figures.json"
    rc = main(["--kills", "3", "--per-search", "3", "--targets", "driver,evaluator,resume", "--seed", "7", "--small",
               "--work", str(tmp_path / "work"), "--out", str(out)])
    figures = json.loads(out.read_text())
    print(f"\n{ {k: v for k, v in figures.items() if k != 'kill_log'} }")
    assert figures["kills"] == 3 and figures["searches"] == 1
    assert figures["lost"] == 0 and figures["redone"] == 0
    assert figures["differences"] == 0  # the final JSON is the uninterrupted run's
    assert rc == 0
