"""The optimal strategy end to end: fast evaluations, targets, `search recipe`, cancel."""
import json
import re
import time

import pytest

from common.formats import average_bits
from search.recipes.refine import candidate_key
from tests.cli_helpers import (download, error_line, floor_probes, invoke_cli, refined_lines, run_cli, start_cli,
                               status_json, submit_ok)
from tests.reference.floor_reference import plain_floor
from tests.reference.json_checks import check_apple_recipes_from_json

pytestmark = pytest.mark.slow

FAST = ["--model", "tiny-sdxl", "--nbits", "2,4,8", "--min-size", "16384", "--strategy", "optimal", "--evals", "fast",
        "--targets", "3,4,6", "--workers", "2"]


@pytest.fixture(scope="module")
def fast(tmp_path_factory, model_cache):
    db = tmp_path_factory.mktemp("fast") / "s.db"
    proc, sid = submit_ok(*FAST, "--db", db, model_cache=model_cache)
    return dict(db=db, id=sid, stderr=proc.stderr, status=status_json(sid, db, model_cache))


def test_fast_mode_measures_anchors_plus_refinements_only(fast):
    status = fast["status"]
    n = status["candidates"]
    refined = int(re.search(r"fast mode: (\d+) more isolated", fast["stderr"]).group(1))
    m, probes = status["measurements"], floor_probes(n)
    # anchor 4 bits for every layer, no curves; the evaluation floor's probes; refinement candidates
    assert m == {"isolated": n + refined, "floor": probes, "candidate": m["candidate"]}
    assert refined < 2 * n
    recipes = status["recipes"]
    assert [r["strategy"] for r in recipes if r["strategy"] != "refined"] == ["optimal"] * 3
    # each target: its knapsack recipe (a recipe run) + the candidates its refinement measured;
    # a candidate is measured once even if two targets reach it
    per_target = refined_lines(fast["stderr"])
    assert sorted(t for t, _ in per_target) == [3.0, 4.0, 6.0]
    assert all(1 < used <= status["config"]["refine_evals"] for _, used in per_target)
    assert 0 < m["candidate"] <= sum(used - 1 for _, used in per_target)
    assert status["evaluations"] == n + refined + probes + 2 + 3 + m["candidate"]  # + 2 baselines + 3 recipe runs


def test_status_floor_is_the_two_magnitude_estimate_of_the_stored_probes(fast, model_cache):
    """Reference: (16 p1 - p4) / 15 per prompt, from the stored probes by a plain loop; on bit-exact
    CPU float32 the 4-ulp probes read ~12 dB below the 1-ulp ones, so the floor is far below p1."""
    import math

    from storage import Storage

    with Storage(fast["db"]) as st:
        probes = st.measurements(fast["id"], phase="floor")
    counts, per_prompt = plain_floor(probes)
    assert counts[1] == counts[4] == floor_probes(fast["status"]["candidates"]) // 2
    ref = []
    for p1, p4, f in per_prompt:
        assert 10 < 10 * math.log10(p4 / p1) < 14  # a linear response: 12.04 dB
        ref.append(f)
        assert ref[-1] <= 0.2 * p1
    floor = fast["status"]["eval_floor"]
    assert floor["probes"] == floor_probes(fast["status"]["candidates"])
    if min(ref) > 0:
        assert floor["psnr"] == pytest.approx(sum(-10 * math.log10(r) for r in ref) / len(ref))
    else:
        assert floor["psnr"] is None
    text = invoke_cli("status", fast["id"], "--db", fast["db"], model_cache=model_cache).stdout
    level = "none (the probes' response is linear)" if floor["psnr"] is None else f"{floor['psnr']:.2f} dB"
    assert f"evaluation floor {level} ({floor['probes']} probes: one layer's float16 weights moved by 1 or 4 ulps)" \
        in " ".join(text.split())


def test_targets_are_met_exactly_and_predicted(fast, model_cache, tiny_sdxl_spec):
    report = download(fast["db"], fast["id"], model_cache)
    # optimal recipes only: keys and average bits checked against the model's own layer sizes
    assert check_apple_recipes_from_json(report, model_dir=tiny_sdxl_spec.location) == 0
    sizes = None
    from storage import Storage

    with Storage(fast["db"]) as st:
        sizes = {l.name: l.numel for l in st.layers(fast["id"])}
        stored = st.recipes(fast["id"])
    one_shot = [r for r in stored if r.strategy == "optimal"]
    assert sorted(r.target["avg_bits"] for r in one_shot) == [3.0, 4.0, 6.0]
    for r in stored:
        assert average_bits(r.bits, sizes) <= r.target["avg_bits"] + 1e-12
        assert r.avg_bits > r.target["avg_bits"] - 0.25  # spends the budget
        assert r.predicted_psnr is not None and r.psnr is not None
        # Apple's protocol (the default): the download rounds a recipe's PSNR to 0.1 dB, as Apple's script.
        assert report["recipes"][r.key] == r.bits and report["baselines"][r.key] == float(f"{r.psnr:.1f}")
        assert set(r.bits.values()) <= {2, 4, 8, 16}
    by_target = sorted(one_shot, key=lambda r: r.target["avg_bits"])
    assert [r.psnr for r in by_target] == sorted(r.psnr for r in by_target)  # more bits, more PSNR
    # measured refinement: a refined recipe is stored only when a child measured strictly better
    # than its start (the knapsack recipe, measured on its own as a recipe run); its PSNR is the
    # stored measurement of its own bit map; it stays within the same budget
    with Storage(fast["db"]) as st:
        candidates = {m.key: m.psnr for m in st.measurements(fast["id"], phase="candidate")}
    for o in one_shot:
        refined = [r for r in stored if r.strategy == "refined" and r.target["avg_bits"] == o.target["avg_bits"]]
        assert len(refined) <= 1
        for r in refined:
            assert r.target["start"] == "knapsack" and r.target["evals_used"] <= r.target["refine_evals"]
            assert r.target["start_psnr"] == {"knapsack": o.psnr}  # no curves: the knapsack is the only start
            assert r.psnr > o.psnr and r.psnr == candidates[candidate_key(r.bits)]
            assert r.avg_bits <= o.target["avg_bits"] + 1e-12


def test_recipe_command_builds_and_measures_a_target(fast, model_cache):
    proc = run_cli("recipe", fast["id"], "--bits", "5", "--db", fast["db"], model_cache=model_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted PSNR" in proc.stdout
    assert "refined with" in " ".join(proc.stdout.split())  # refinement by default
    status = status_json(fast["id"], fast["db"], model_cache)
    new = [r for r in status["recipes"] if 4.0 < r["avg_bits"] <= 5.0]
    one_shot = [r for r in new if r["strategy"] == "optimal"]
    assert len(one_shot) == 1 and all(r["psnr"] is not None for r in new)
    # the table's start is the stored one-shot recipe's measurement; what it shows as measured is
    # a refined recipe strictly better than that start, or the start itself when nothing was better
    text = " ".join(proc.stdout.split())
    start = one_shot[0]["psnr"]
    assert f"starting points knapsack {start:.2f} dB" in text
    refined = [r for r in new if r["strategy"] == "refined"]
    assert len(refined) <= 1
    shown = refined[0]["psnr"] if refined else start
    assert not refined or shown > start
    assert f" {shown:.2f} " in text
    for args, expected in ((["--bits", "0.5"], "below"), (["--psnr", "5000"], "unreachable"),
                           (["--bits", "4", "--psnr", "40"], "exactly one"),
                           (["--bits", "4", "--refine-evals", "-1"], "--refine-evals")):
        bad = invoke_cli("recipe", fast["id"], *args, "--db", fast["db"], model_cache=model_cache)
        assert bad.returncode == 2 and expected in error_line(bad)


def test_cancel_stops_a_running_search_and_it_resumes(tmp_path, model_cache):
    db = tmp_path / "s.db"
    proc = start_cli("submit", "--model", "tiny-sdxl", "--nbits", "2,8", "--min-size", "16384", "--db", db,
                     model_cache=model_cache)
    sid = proc.stdout.readline().split()[1]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        res = run_cli("cancel", sid, "--db", db, model_cache=model_cache)
        if res.returncode == 0:
            break
        time.sleep(0.5)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    rows = json.loads(invoke_cli("list", "--json", "--db", db, model_cache=model_cache).stdout)
    assert rows[0]["status"] == "cancelled"
    again = invoke_cli("cancel", sid, "--db", db, model_cache=model_cache)
    assert again.returncode == 2 and "not running" in error_line(again)
    res = run_cli("resume", sid, "--db", db, model_cache=model_cache)
    assert res.returncode == 0, res.stderr[-2000:]
    assert status_json(sid, db, model_cache)["status"] == "completed"
