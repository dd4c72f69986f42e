"""Every new family end to end (real Ray, 2 evaluators, real SQLite, the CLI) against the serial
reference of Apple's script (`apple_serial.py`, which imports nothing of this project), CPU
float32 (bit-exact): the SDXL refiner through Apple's image-to-image branch (local images: no
network in tests), and the three transformer denoisers (SD3, Flux, PixArt-Σ) at a reduced step
count. `single_layer`, `cumulative`, `baselines` and `recipes` of the downloaded JSON must
agree value for value (to Apple's 0.1 dB rounding), and the recipes re-derive from the JSON by
the reference rule. One search per family, 2 prompts, 2 formats (2 and 8 bits: the other depths
take the same k-means and pipeline code; 4 bits was a third of the refiner's measurements, 63
candidates at 4 steps, in the search and again in the serial reference). The refiner's search takes
`--min-size 9000`: its nine 9,216-element layers are candidates too, which Apple's call palettizes
with scikit-learn's k-means (under 10,000 elements), so they must agree value for value as well,
and the recipe applied to Core ML palettizes some of them."""
from __future__ import annotations

import numpy as np
import pytest

from tests.cli_helpers import download, run_cli
from tests.reference.apple_serial import SignalRunner, run_apple_pre_analysis
from tests.reference.json_checks import check_apple_recipes_from_json
from tests.reference.local_images import image_bytes, write_images

pytestmark = pytest.mark.slow

PROMPTS = ("a black and brown dog standing outside a door.", "a white cat sitting under a white umbrella")
TOL_DB = 0.1 + 1e-9
# name -> (formats, steps: None for the model's own, i.e. Apple's 4 for image-to-image, --min-size: None
# for the model's own, 10,000)
FAMILIES = {"tiny-sdxl-refiner": ("2,8", None, 9000), "tiny-sd3": ("2,8", 2, None), "tiny-flux": ("2,8", 2, None),
            "tiny-pixart": ("2,8", 2, None)}
SKLEARN_BELOW = 10_000  # coremltools' k-means call sends float16 tensors this small to scikit-learn


def _search(name: str, tmp_path, model_cache) -> dict:
    nbits, steps, min_size = FAMILIES[name]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["submit", "--model", name, "--workers", "2", "--db", tmp_path / "s.db", "--nbits", nbits,
            "--prompts", prompts]
    if steps:
        args += ["--steps", str(steps)]
    if min_size:
        args += ["--min-size", str(min_size)]
    if name == "tiny-sdxl-refiner":
        args += ["--images", write_images(tmp_path / "images", 2)]
    proc = run_cli(*args, model_cache=model_cache, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.split()[1]
    return {**download(tmp_path / "s.db", sid, model_cache), "id": sid}


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
    min_size = FAMILIES[name][2] or spec.default_min_size
    assert config["min_size"] == min_size
    ref = run_apple_pre_analysis(spec.location, nbits=nbits, resolution=spec.protocol_resolution,
                                 min_size=min_size, prompts=PROMPTS, num_inference_steps=config["steps"],
                                 images=image_bytes(2) if spec.img2img else (), num_threads=1, model_version=name)
    exact = total = 0
    for n in map(str, nbits):
        single = {k: v for k, v in ours["single_layer"][n].items() if k != "metadata"}
        exact += _agree(single, ref["single_layer"][n], f"single_layer[{n}]")
        cum = {k: v for k, v in ours["cumulative"][n].items() if k != "metadata"}
        exact += _agree(cum, {k: v for k, v in ref["cumulative"][n].items() if k != "metadata"}, f"cumulative[{n}]")
        assert ours["cumulative"][n]["metadata"]["candidates"] == ref["cumulative"][n]["metadata"]["candidates"]
        assert ours["cumulative"][n]["metadata"]["sizes"] == ref["cumulative"][n]["metadata"]["sizes"]
        total += len(single) + len(cum)
    sizes = dict(zip(ref["reference"]["candidates"], ref["reference"]["sizes"]))
    small = {layer for layer, size in sizes.items() if size < SKLEARN_BELOW}
    assert bool(small) == (min_size < SKLEARN_BELOW), sorted(small)[:3]  # scikit-learn's k-means is measured
    assert ref["reference"]["kmeans1d_forced"] == []  # ... by the reference too (scikit-learn installed)
    print(f"\n[{name}] {exact}/{total} per-prompt lists identical to the reference")
    assert exact >= 0.98 * total
    for key in ("original", "linear_8bit", *ref["recipes"]):
        assert abs(ours["baselines"][key] - ref["baselines"][key]) <= TOL_DB, key
    assert ours["recipes"] == ref["recipes"]
    assert check_apple_recipes_from_json(ours) >= 1
    # module names of the denoiser are the JSON's keys, as in Apple's format
    prefix = "transformer_blocks." if spec.denoiser == "transformer" else ("down_blocks.", "up_blocks.", "mid_block")
    assert any(k.startswith(prefix) for k in single)
    applied = _apply_one_recipe(ours, tmp_path, model_cache,
                                SignalRunner(PROMPTS, spec.protocol_resolution, config["steps"],
                                             image_bytes(2) if spec.img2img else ()))
    assert bool(applied & small) == bool(small), "the Core ML recipe palettizes none of the small layers"


def _apply_one_recipe(ours: dict, tmp_path, model_cache, runner: SignalRunner) -> set[str]:
    """`search apply` of the recipe with the fewest bits, checked without the project's own checks: every
    palettized weight is a LUT op with exactly the LUT and indices of the palette stored for the
    search, at the recipe's bit depth (read with coremltools, `tests.coreml_helpers`), and the
    weights coremltools decompresses from the package, run in a diffusers pipeline by the serial
    reference's signal runner, give the stored recipe PSNR (plain numpy PSNR, Apple's rounding)."""
    from storage import Storage
    from tests.coreml_helpers import check_search_luts, package_psnr

    key = min(ours["recipes"], key=lambda k: ours["mbp_search"]["recipe_info"][k]["avg_bits"])  # most palettized
    proc = run_cli("apply", ours["id"], "--recipe", key, "-o", tmp_path / "coreml", "--db", tmp_path / "s.db",
                   model_cache=model_cache, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Storage(tmp_path / "s.db") as st:
        v = st.validations(ours["id"])[key]
        stored = {r.key: r for r in st.recipes(ours["id"])}[key]
    detail = check_search_luts(v.mlpackage, tmp_path / "s.db", ours["id"])
    print(f"\n[{key}] {detail}")
    assert not detail.startswith("0 "), detail  # a recipe that palettizes something
    per_prompt, mean = package_psnr(v.mlpackage, tmp_path / "s.db", ours["id"], runner)
    print(f"[{key}] package {per_prompt} mean {mean:.3f} dB; stored {list(stored.per_prompt)} "
          f"mean {stored.psnr:.3f} dB")
    diff = np.abs(np.asarray(per_prompt) - np.asarray(stored.per_prompt))
    assert diff.max() <= TOL_DB, (per_prompt, stored.per_prompt)
    assert abs(mean - stored.psnr) <= TOL_DB and abs(mean - ours["baselines"][key]) <= TOL_DB, (mean, stored.psnr)
    return {layer for layer, b in ours["recipes"][key].items() if int(b) != 16}  # the palettized layers
