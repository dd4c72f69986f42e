"""Fast mode under float16 arithmetic, end to end: the floor descent, and a search killed mid-way
that resumes to exactly the uninterrupted result.

`--precision float16` on CPU puts tiny-sdxl's 4-bit layers under the evaluation floor, so the
descent runs. Fast mode plans its later rounds from stored rows (the descent, the second round
of isolated runs, each target's refinement path): these are where a resume could plan
differently from the first run. Real driver processes, SIGKILL, real Ray and SQLite."""
import os
import re
import signal
import time

import pytest

from tests.cli_helpers import (STALE, comparable, counts, download, evaluations_this_run, run_cli, start_cli,
                               status_json, submit_ok)
from tests.reference.floor_reference import plain_floor
from tests.search.test_strategies import FAST

pytestmark = pytest.mark.slow

FAST16 = [*FAST, "--precision", "float16"]


@pytest.fixture(scope="module")
def fast16(tmp_path_factory, model_cache):
    db = tmp_path_factory.mktemp("fast16") / "s.db"
    proc, sid = submit_ok(*FAST16, "--db", db, model_cache=model_cache)
    c = counts(db)
    assert c["evaluations"] == evaluations_this_run(proc.stderr)
    return dict(db=db, id=sid, stderr=proc.stderr, counts=c, report=download(db, sid, model_cache),
                layers=status_json(sid, db, model_cache)["candidates"])


def test_float16_fast_mode_measures_layers_the_floor_hides_one_depth_lower(fast16):
    """Reference, by a plain loop over the stored rows: the floor per prompt from the probes
    ((16 p1 - p4) / 15), and a layer is hidden when its 4-bit isolated noise power (mean over
    prompts) is under twice the floor's. Every hidden layer, and only those, gets a 2-bit run
    before the second round (nbits 2,4,8: 2 is the lowest depth, so the descent stops there)."""
    from storage import Storage

    with Storage(fast16["db"]) as st:
        probes = st.measurements(fast16["id"], phase="floor")
        isolated = st.measurements(fast16["id"], phase="isolated")
    floor = [f for _, _, f in plain_floor(probes)[1]]
    mean_floor = sum(floor) / len(floor)
    at4 = {m.layer: m.per_prompt for m in isolated if str(m.bits) == "4"}
    hidden = {l for l, ps in at4.items() if sum(10 ** (-v / 10) for v in ps) / len(ps) < 2 * mean_floor}
    assert hidden, "tiny-sdxl in float16 has 4-bit layers under its evaluation floor"
    stderr = " ".join(fast16["stderr"].split())
    descended = re.search(r"fast mode: (\d+) layer\(s\) hidden by the evaluation floor", stderr)
    assert descended and int(descended.group(1)) == len(hidden)
    second = int(re.search(r"fast mode: (\d+) more isolated", stderr).group(1))
    at2 = {m.layer for m in isolated if str(m.bits) == "2"}
    assert hidden <= at2 and len(isolated) == len(at4) + len(hidden) + second


# kill points: inside the floor descent (past the first round's one 4-bit run per layer, before
# the last hidden layer's 2-bit run), and inside the refinement (a few candidates measured)
KILL = {"descent": lambda c, ref: ref["layers"] < c.get("isolated", 0) < ref["layers"] + _descended(ref),
        "candidates": lambda c, ref: 2 <= c.get("candidate", 0)}


def _descended(ref) -> int:
    return int(re.search(r"fast mode: (\d+) layer\(s\) hidden", " ".join(ref["stderr"].split())).group(1))


@pytest.mark.parametrize("point", list(KILL))
def test_killed_fast_float16_search_resumes_to_the_same_result(tmp_path, model_cache, fast16, point):
    db = tmp_path / "s.db"
    proc = start_cli("submit", *FAST16, "--db", db, model_cache=model_cache)
    sid = proc.stdout.readline().split()[1]
    deadline = time.monotonic() + 300
    while not (counts(db) and KILL[point](counts(db), fast16)):
        assert proc.poll() is None and time.monotonic() < deadline, f"never reached {point}: {counts(db)}"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    stored_before = counts(db)["evaluations"]
    assert 0 < stored_before < fast16["counts"]["evaluations"]
    time.sleep(2.5)  # let the heartbeat go stale
    res = run_cli("resume", sid, "--workers", "2", "--db", db, model_cache=model_cache, **STALE)
    assert res.returncode == 0, res.stderr[-3000:]
    # nothing stored is measured again, nothing the first run would not have measured is added
    assert evaluations_this_run(res.stderr) == fast16["counts"]["evaluations"] - stored_before
    assert counts(db) == fast16["counts"]
    assert comparable(download(db, sid, model_cache)) == comparable(fast16["report"])
