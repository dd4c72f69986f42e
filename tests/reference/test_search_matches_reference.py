"""The distributed search (real Ray, 2 evaluators, real SQLite, the CLI) against the serial
reference of Apple's script (`apple_serial.py`, which imports nothing of this project), on
both built-in models, CPU float32 (bit-exact), every bit depth: `single_layer`, `cumulative`,
`baselines` and `recipes` of the downloaded JSON must agree value for value, to Apple's
0.1 dB rounding.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.cli_helpers import default_search, download
from tests.reference.apple_serial import run_apple_pre_analysis
from tests.reference.json_checks import check_apple_recipes_from_json

pytestmark = pytest.mark.slow

NBITS = (1, 2, 4, 6, 8)
TOL_DB = 0.1 + 1e-9  # Apple rounds every per-prompt value to 0.1 dB


def _search(model: str, tmp_path_factory, model_cache) -> dict:
    """`search submit --model MODEL --workers 2`: the same search as tests/search/test_end_to_end.py's,
    run once per session (tests.cli_helpers.default_search); a copy of it is downloaded here."""
    run = default_search(tmp_path_factory, model, model_cache)
    return download(run["db"], run["id"], model_cache)


def _agree(ours: dict, ref: dict, what: str) -> int:
    """Same layers in the same order, per-prompt lists within 0.1 dB; returns exact matches."""
    assert list(ours) == list(ref), f"{what}: layers or their order differ"
    exact = 0
    for layer, values in ref.items():
        mine = ours[layer]
        assert len(mine) == len(values) == 8, (what, layer)
        diff = np.abs(np.asarray(mine) - np.asarray(values))
        assert diff.max() <= TOL_DB, (what, layer, mine, values)
        exact += int(mine == values)
    return exact


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_distributed_search_equals_serial_reference(model, tmp_path_factory, model_cache):
    from workers.models import resolve_model

    spec = resolve_model(model, model_cache)
    # the serial reference first: meanwhile another pytest-xdist worker may be running the search
    ref = run_apple_pre_analysis(spec.location, nbits=NBITS, resolution=spec.default_resolution,
                                 min_size=spec.default_min_size, num_threads=1, model_version=model)
    ours = _search(model, tmp_path_factory, model_cache)
    assert ours["mbp_search"]["config"]["protocol"] == "apple"

    exact = total = 0
    for n in map(str, NBITS):
        single = {k: v for k, v in ours["single_layer"][n].items() if k != "metadata"}
        exact += _agree(single, ref["single_layer"][n], f"single_layer[{n}]")
        cum = {k: v for k, v in ours["cumulative"][n].items() if k != "metadata"}
        exact += _agree(cum, {k: v for k, v in ref["cumulative"][n].items() if k != "metadata"}, f"cumulative[{n}]")
        assert ours["cumulative"][n]["metadata"]["candidates"] == ref["cumulative"][n]["metadata"]["candidates"]
        assert ours["cumulative"][n]["metadata"]["sizes"] == ref["cumulative"][n]["metadata"]["sizes"]
        total += len(single) + len(cum)
    # Bit-exact CPU arithmetic on both sides: every per-prompt list is expected to be identical;
    # the 0.1 dB tolerance above only covers a value rounded on the other side of a boundary.
    print(f"\n[{model}] {exact}/{total} per-prompt lists identical to the reference")
    assert exact >= 0.98 * total, f"only {exact}/{total} lists identical"

    for name in ("original", "linear_8bit"):
        assert abs(ours["baselines"][name] - ref["baselines"][name]) <= TOL_DB, name
    assert ours["recipes"] == ref["recipes"]
    for key in ref["recipes"]:
        assert abs(ours["baselines"][key] - ref["baselines"][key]) <= TOL_DB, key
    check_apple_recipes_from_json(ours)
