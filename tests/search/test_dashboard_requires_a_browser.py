"""Without a browser the dashboard's tests cannot run: on a developer's machine they are skipped
with the reason, under CI (CI=true) the run fails, so a CI image that lost Chromium cannot let a
broken dashboard through green. Runs pytest on tests/search/test_dashboard.py (collection only)
with MBP_TEST_CHROMIUM pointing at a path where there is no browser."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cli_helpers import ROOT


def test_a_missing_browser_fails_the_run_under_ci(tmp_path):
    missing = tmp_path / "no-chromium"
    env = {**os.environ, "CI": "true", "MBP_TEST_CHROMIUM": str(missing)}
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/search/test_dashboard.py", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "-o", "addopts=", "--noconftest"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode not in (0, 5), run.stdout[-3000:]  # 5: nothing collected (all skipped)
    assert f"no Chromium at {missing}" in run.stdout and "CI=true" in run.stdout, run.stdout[-3000:]
    assert "error" in run.stdout.splitlines()[-1], run.stdout[-1000:]


def test_a_missing_browser_is_a_skip_with_its_reason_elsewhere(monkeypatch):
    from tests.search.test_dashboard import browser_missing

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium at /nowhere"):
        browser_missing("no Chromium at /nowhere")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        browser_missing("no Chromium at /nowhere")
