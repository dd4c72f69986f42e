"""The published contract holds: schemathesis (every check, the stateful phase included) drives a
real `search serve` on loopback from its own /openapi.json and finds no failure: every status a
route answers is documented with the body it really has, no 5xx, token enforced where published.

Bounded (a few dozen examples per operation, about a minute of requests). The server's Ray runs
the drivers of the searches schemathesis submits; their models are Hub ids that fail at once
offline (preparing), so no search runs a pipeline. MBP_SEARCH_CONTRACT_EXAMPLES / _SEED widen
or vary the run by hand.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.search.test_service import ServiceProcess, ray_env

pytestmark = pytest.mark.slow

pytest.importorskip("schemathesis", reason="schemathesis is in the test extras: pip install -e '.[test]'")

EXAMPLES = int(os.environ.get("MBP_SEARCH_CONTRACT_EXAMPLES", "25"))
SEED = int(os.environ.get("MBP_SEARCH_CONTRACT_SEED", "24"))

# Schema-valid bodies the search itself refuses (an unknown model name, options that contradict
# each other: what JSON Schema cannot say) answer the documented 422 with its one line; that is
# the one status schemathesis' positive-data check must accept besides its defaults, and only there.
CONFIG = """
[[operations]]
include-path = "/searches"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory, model_cache):
    base = tmp_path_factory.mktemp("contract")
    raytmp = tempfile.mkdtemp(prefix="mbpct", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = ray_env(model_cache, secrets.token_hex(16), tmpdir=raytmp)
    srv = ServiceProcess(base / "searches.db", env, secrets.token_urlsafe(24), base / "serve.log")
    srv.base = base
    try:
        yield srv.start()
    finally:
        srv.stop()
        shutil.rmtree(raytmp, ignore_errors=True)


def schemathesis(service, schema: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The schemathesis command line against ``service``, ``schema`` a URL or a file."""
    config = service.base / "schemathesis.toml"
    config.write_text(CONFIG)
    return subprocess.run([str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config), "run",
                           schema, "--url", service.url, "-H", f"Authorization: Bearer {service.token}", *args],
                          cwd=service.base, capture_output=True, text=True, timeout=timeout,
                          env={**service.env, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"})


def test_schemathesis_finds_no_contract_failure(service):
    proc = schemathesis(service, f"{service.url}/openapi.json", "--checks", "all",
                        "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(EXAMPLES),
                        "--seed", str(SEED), "--request-timeout", "60")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out[out.rfind("SUMMARY"):]
    assert re.search(r"Stateful", summary) and "Failures:" not in summary, summary
    generated = int(re.search(r"(\d+) generated", summary).group(1))
    assert generated >= 9 * EXAMPLES, summary  # every operation really exercised
    print(f"\nschemathesis: {generated} cases, seed {SEED}: no failure")
    assert "Traceback" not in service.log_tail(1_000_000)


def test_the_run_catches_an_undocumented_status(service):
    """What the issue found, put back: a copy of the published schema without GET
    /searches/{search_id}'s 404. The same narrow run passes on the live schema and fails on it."""
    schema = httpx.get(f"{service.url}/openapi.json", headers={"Authorization": f"Bearer {service.token}"}).json()
    del schema["paths"]["/searches/{search_id}"]["get"]["responses"]["404"]
    broken = service.base / "openapi-without-404.json"
    broken.write_text(json.dumps(schema))
    narrow = ("--include-operation-id", "get_search", "--checks", "status_code_conformance", "--phases", "fuzzing",
              "--max-examples", "10", "--seed", str(SEED))
    live = schemathesis(service, f"{service.url}/openapi.json", *narrow)
    assert live.returncode == 0, live.stdout[-3000:]
    proc = schemathesis(service, str(broken), *narrow)
    assert proc.returncode != 0 and "Undocumented status code" in proc.stdout, proc.stdout[-3000:]
