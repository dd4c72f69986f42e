"""Every new family end to end (real Ray, 2 evaluators, real SQLite, the CLI) against the serial
reference of Apple's script (`apple_serial.py`, which imports nothing of this project), CPU
float32 (bit-exact): the SDXL refiner through Apple's image-to-image branch (local images: no
network in tests), and the three transformer denoisers (SD3, Flux, PixArt-Σ) at a reduced step
count. `single_layer`, `cumulative`, `baselines` and `recipes` of the downloaded JSON must
agree value for value (to Apple's 0.1 dB rounding), and the recipes re-derive from the JSON by
the reference rule. One search per family, 2 prompts, 2-3 formats."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli_helpers import run_cli
from tests.reference.apple_serial import run_apple_pre_analysis
from tests.reference.json_checks import check_apple_recipes_from_json
from tests.reference.local_images import image_bytes, write_images

pytestmark = pytest.mark.slow

PROMPTS = ("a black and brown dog standing outside a door.", "a white cat sitting under a white umbrella")
TOL_DB = 0.1 + 1e-9
# name -> (formats, steps: None for the model's own, i.e. Apple's 4 for image-to-image)
FAMILIES = {"tiny-sdxl-refiner": ("2,4,8", None), "tiny-sd3": ("2,8", 2), "tiny-flux": ("2,8", 2),
            "tiny-pixart": ("2,8", 2)}


def _search(name: str, tmp_path, model_cache) -> dict:
    nbits, steps = FAMILIES[name]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["submit", "--model", name, "--workers", "2", "--db", tmp_path / "s.db", "--nbits", nbits,
            "--prompts", prompts]
    if steps:
        args += ["--steps", str(steps)]
    if name == "tiny-sdxl-refiner":
        args += ["--images", write_images(tmp_path / "images", 2)]
    proc = run_cli(*args, model_cache=model_cache, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.split()[1]
    out = run_cli("download", sid, "-o", "-", "--db", tmp_path / "s.db", model_cache=model_cache)
    assert out.returncode == 0, out.stderr[-2000:]
    return {**json.loads(out.stdout), "id": sid}


def _agree(ours: dict, ref: dict, what: str) -> int:
    assert list(ours) == list(ref), f"{what}: layers or their order differ"
    exact = 0
    for layer, values in ref.items():
        mine = ours[layer]
        assert len(mine) == len(values) == len(PROMPTS), (what, layer)
        assert np.abs(np.asarray(mine) - np.asarray(values)).max() <= TOL_DB, (what, layer, mine, values)
        exact += int(mine == values)
    return exact


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_search_equals_serial_reference(name, tmp_path, model_cache):
    from workers.models import resolve_model

    spec = resolve_model(name, model_cache)
    ours = _search(name, tmp_path, model_cache)
    config = ours["mbp_search"]["config"]
    assert config["protocol"] == "apple" and config["steps"] == (FAMILIES[name][1] or spec.default_steps)
    assert bool(config.get("images")) == spec.img2img
    nbits = tuple(int(n) for n in FAMILIES[name][0].split(","))
    ref = run_apple_pre_analysis(spec.location, nbits=nbits, resolution=spec.protocol_resolution,
                                 min_size=spec.default_min_size, prompts=PROMPTS, num_inference_steps=config["steps"],
                                 images=image_bytes(2) if spec.img2img else (), num_threads=1, model_version=name)
    exact = total = 0
    for n in map(str, nbits):
        single = {k: v for k, v in ours["single_layer"][n].items() if k != "metadata"}
        exact += _agree(single, ref["single_layer"][n], f"single_layer[{n}]")
        cum = {k: v for k, v in ours["cumulative"][n].items() if k != "metadata"}
        exact += _agree(cum, {k: v for k, v in ref["cumulative"][n].items() if k != "metadata"}, f"cumulative[{n}]")
        assert ours["cumulative"][n]["metadata"]["candidates"] == ref["cumulative"][n]["metadata"]["candidates"]
        total += len(single) + len(cum)
    print(f"\n[{name}] {exact}/{total} per-prompt lists identical to the reference")
    assert exact >= 0.98 * total
    for key in ("original", "linear_8bit", *ref["recipes"]):
        assert abs(ours["baselines"][key] - ref["baselines"][key]) <= TOL_DB, key
    assert ours["recipes"] == ref["recipes"]
    assert check_apple_recipes_from_json(ours) >= 1
    # module names of the denoiser are the JSON's keys, as in Apple's format
    prefix = "transformer_blocks." if spec.denoiser == "transformer" else ("down_blocks.", "up_blocks.", "mid_block")
    assert any(k.startswith(prefix) for k in single)
    _apply_one_recipe(ours, tmp_path, model_cache)


def _apply_one_recipe(ours: dict, tmp_path, model_cache) -> None:
    """`search apply` of the lowest recipe: converted to Core ML, every palettized weight a LUT op
    with exactly the search's LUT and indices (read back from the package by the test's own
    helper), the torch run on the decompressed weights within 0.1 dB of the measured PSNR."""
    from storage import Storage
    from tests.coreml_helpers import check_search_luts

    key = sorted(ours["recipes"])[0]
    proc = run_cli("apply", ours["id"], "--recipe", key, "-o", tmp_path / "coreml", "--db", tmp_path / "s.db",
                   model_cache=model_cache, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Storage(tmp_path / "s.db") as st:
        v = st.validations(ours["id"])[key]
    assert v.structural_ok and v.numeric_ok is True, (v.structural_detail, v.numeric_psnr)
    assert "search's LUTs and indices" in check_search_luts(v.mlpackage, tmp_path / "s.db", ours["id"])
