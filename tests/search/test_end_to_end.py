"""Whole searches through the real CLI, real local Ray (2 evaluators), real SQLite."""
import json

import pytest

from search.recipes.apple_rule import ALLOWED_BITS, average_bits
from tests.cli_helpers import default_search, floor_probes, run_cli
from tests.reference.json_checks import check_apple_recipes_from_json

pytestmark = pytest.mark.slow


def _finished(db, stdout, model_cache):
    first = stdout.splitlines()[0]
    assert first.startswith("search ")
    sid = first.split()[1]
    status = json.loads(run_cli("status", sid, "--db", db, "--json", model_cache=model_cache).stdout)
    out = db.parent / "recipes.json"
    assert run_cli("download", sid, "-o", out, "--db", db, model_cache=model_cache).returncode == 0
    return dict(db=db, id=sid, stdout=stdout, status=status, report=json.loads(out.read_text()))


# Both searches are the models' default searches, run once per session (a copy each): the same
# commands, and searches, as tests/reference/test_search_matches_reference.py's.
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, model_cache):
    run = default_search(tmp_path_factory, "tiny-sdxl", model_cache)
    return _finished(run["db"], run["stdout"], model_cache)


@pytest.fixture(scope="module")
def sd(tmp_path_factory, model_cache):
    run = default_search(tmp_path_factory, "tiny-sd", model_cache)
    return _finished(run["db"], run["stdout"], model_cache)


def _check_search(run, nbits):
    status, report = run["status"], run["report"]
    assert status["status"] == "completed" and status["phase"] == "done"
    n = status["candidates"]
    assert n >= 30
    assert status["measurements"] == {"isolated": n * len(nbits), "cumulative": n * len(nbits),
                                      "floor": floor_probes(n)}  # Apple's strategy: no refinement
    assert set(report) == {"model_version", "baselines", "recipes", "single_layer", "cumulative", "mbp_search"}
    assert sorted(map(int, report["single_layer"])) == nbits == sorted(map(int, report["cumulative"]))
    sizes = None
    for b in map(str, nbits):
        meta = report["cumulative"][b]["metadata"]
        layers = [k for k in report["cumulative"][b] if k != "metadata"]
        assert layers == meta["candidates"] and len(layers) == n
        iso = {k: sum(v) for k, v in report["single_layer"][b].items() if k != "metadata"}
        # least harmful first; ties keep the single_layer (module) order, as Apple's stable sort
        assert meta["candidates"] == sorted(iso, key=lambda k: -iso[k])
        sizes = dict(zip(meta["candidates"], meta["sizes"]))
        assert all(len(v) == len(status["config"]["prompts"]) for k, v in report["single_layer"][b].items()
                   if k != "metadata")
    assert {"original", "linear_8bit"} <= set(report["baselines"])
    recipes = report["recipes"]
    assert recipes, "no recipes"
    details = report["mbp_search"]["recipe_details"]
    ordered = sorted(recipes, key=lambda k: -details[k]["threshold"])
    avgs = []
    for key in ordered:
        bits = recipes[key]
        assert set(bits) == set(sizes) and set(bits.values()) <= ALLOWED_BITS
        assert set(bits.values()) <= set(nbits) | {16}
        avg = average_bits(bits, sizes)
        assert key == f"recipe_{avg:.2f}_bit_mixedpalette"
        assert report["baselines"][key] > 0  # measured end to end
        avgs.append(avg)
    assert avgs == sorted(avgs, reverse=True) and avgs[0] > avgs[-1]  # bits fall as thresholds fall
    json.dumps(report, allow_nan=False)  # strict JSON
    # Re-derived from the JSON alone with the serial reference's Apple rule: thresholds,
    # recipes, average bits and keys.
    assert check_apple_recipes_from_json(report) == len(recipes)



def test_tiny_sdxl_end_to_end(sdxl, model_cache):
    _check_search(sdxl, [1, 2, 4, 6, 8])
    assert "recipe_" in sdxl["stdout"] and "PSNR dB" in sdxl["stdout"]  # the recipe table
    # every result says where it ran; both evaluators did work
    from storage import Storage

    with Storage(sdxl["db"]) as st:
        ms = st.measurements(sdxl["id"])
        assert len({m.worker for m in ms}) == 2 and all(m.node for m in ms)
        assert st.get_search(sdxl["id"]).evaluations == len(ms) + 2 + len(st.recipes(sdxl["id"]))
        pal = st.palettes(sdxl["id"])
        assert len(pal) == sdxl["status"]["candidates"] * 5
    png = sdxl["db"].parent / "psnr.png"
    assert run_cli("plot", sdxl["id"], "-o", png, "--db", sdxl["db"], model_cache=model_cache).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_tiny_sd_end_to_end(sd):
    _check_search(sd, [1, 2, 4, 6, 8])
    assert sd["report"]["model_version"] == "tiny-sd"


def test_listing(sd, model_cache):
    rows = json.loads(run_cli("list", "--json", "--db", sd["db"], model_cache=model_cache).stdout)
    assert any(r["id"] == sd["id"] and r["status"] == "completed" and r["model"] == "tiny-sd" for r in rows)
    assert all({"id", "model", "status", "phase"} <= set(r) for r in rows)
