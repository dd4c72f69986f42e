"""`search apply` / `search validate`: the driver side, with real storage and coremltools.

The completed search comes from the `completed_tiny_search` fixture (built without Ray);
the Core ML job runs in-process here, except one CLI test that goes through a real local Ray.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from search.driver.coreml_jobs import ApplyError, apply_recipes, validate_recipes
from storage import Storage
from storage.palette_store import PaletteStore
from tests.workers.test_coreml import apple_like_package
from workers.coreml.common import iter_ops, read_program
from workers.coreml.apply import read_manifest
from workers.coreml.task import run_job

ON_MACOS = sys.platform == "darwin"


def in_process(job, _coreml_node):
    return run_job(job)


def snapshot(db: Path, search_id: str) -> dict:
    """Everything of the search except its validations, palette files included (bytes)."""
    with Storage(db) as st:
        s = st.get_search(search_id)
        root = PaletteStore(db).root
        return {"search": (s.status, s.phase, s.evaluations, s.fingerprint, s.config, s.finished_at),
                "layers": st.layers(search_id), "recipes": st.recipes(search_id), "palettes": st.palettes(search_id),
                "measurements": st.measurements(search_id), "baselines": st.baselines(search_id),
                "files": {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(root.rglob("*")) if p.is_file()}}


@pytest.fixture
def storage(completed_tiny_search):
    with Storage(completed_tiny_search["db"]) as st:
        yield st


def _check_runtime(v):
    if ON_MACOS:
        assert set(v.runtime) == {"CPU_AND_GPU", "CPU_AND_NE"}, v.runtime_note
    else:
        assert v.runtime is None and v.runtime_note.startswith("not run") and "macOS" in v.runtime_note


def test_apply_all_then_validate(storage, completed_tiny_search, coreml_out_dir):
    sid = completed_tiny_search["search_id"]
    before = snapshot(storage.path, sid)
    report = apply_recipes(storage, sid[:6], out_dir=coreml_out_dir, recipe="all", execute=in_process)
    assert not report.failed and report.base_mlpackage
    rows = storage.validations(sid)
    recipes = {r.key: r for r in storage.recipes(sid)}
    assert set(completed_tiny_search["recipes"]) <= set(rows)
    for key, (bits, measured) in completed_tiny_search["recipes"].items():
        v = rows[key]
        assert v.structural_ok, v.structural_detail
        assert v.numeric_ok is True and abs(v.numeric_psnr - measured) <= 0.1
        assert v.avg_bits == pytest.approx(recipes[key].avg_bits)
        assert Path(v.mlpackage).is_dir() and Path(v.mlpackage).parent == Path(coreml_out_dir).resolve()
        assert v.size_bytes > 0 and v.node
        _check_runtime(v)
    assert snapshot(storage.path, sid) == before  # the search's own data is untouched

    again = validate_recipes(storage, sid, execute=in_process)
    assert not again.failed and again.base_mlpackage is None
    assert {v.recipe_key: v for v in again.validations} == {k: rows[k] for k in rows}
    assert snapshot(storage.path, sid) == before

    from rich.console import Console

    from search.cli.coreml_commands import validation_table

    console = Console(record=True, width=300)
    console.print(validation_table(storage, storage.get_search(sid)))
    text = console.export_text()
    assert all(key in text for key in completed_tiny_search["recipes"]) and "ok" in text


def test_apply_recipe_file_in_apple_format(storage, completed_tiny_search, coreml_out_dir, tmp_path):
    from search.recipes.apple_rule import average_bits
    from workers.models import load_denoiser, resolve_model
    from workers.palettize import kmeans_lut

    sid = completed_tiny_search["search_id"]
    before = snapshot(storage.path, sid)
    recipe = {"down_blocks.1.resnets.0.conv1": 4, "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": 2,
              "up_blocks.0.resnets.0.conv1": 6, "time_embedding.linear_2": 16}
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps({  # written by hand, as a user would exchange it
        "model_version": "stabilityai/stable-diffusion-xl-base-1.0",
        "baselines": {"original": 80.0, "linear_8bit": 60.0, "recipe_hand_mixedpalette": 55.0},
        "recipes": {"recipe_hand_mixedpalette": recipe}}))
    report = apply_recipes(storage, sid, out_dir=coreml_out_dir, recipe_file=path, execute=in_process)
    assert any("stabilityai/stable-diffusion-xl-base-1.0" in n for n in report.notes)
    v = storage.validations(sid)["recipe_hand_mixedpalette"]
    assert v.structural_ok and "k-means" in v.structural_detail and "3 weights" in v.structural_detail
    assert v.numeric_ok is None and np.isfinite(v.numeric_psnr)  # nothing measured to compare with
    sizes = {l.name: l.numel for l in storage.layers(sid)}
    assert v.avg_bits == pytest.approx(average_bits(recipe, sizes))
    _check_runtime(v)
    # the LUTs are workers.palettize.kmeans_lut's, looked up in the model being compressed
    unet = load_denoiser(resolve_model("tiny-sdxl"))
    m = read_manifest(v.mlpackage)
    assert m.lut_source == "kmeans" and set(m.layers) == {l for l, b in recipe.items() if b != 16}
    ops = {op.name: op for op in iter_ops(read_program(v.mlpackage))}
    for layer, const in m.layers.items():
        lut, _ = kmeans_lut(unet.get_submodule(layer).weight.data.numpy(), recipe[layer])
        assert np.array_equal(ops[const + "_palettized"].lut.val, lut)
    assert snapshot(storage.path, sid) == before


def test_recipe_file_with_the_search_bits_reuses_its_measured_psnr(storage, completed_tiny_search, coreml_out_dir,
                                                                   tmp_path):
    sid = completed_tiny_search["search_id"]
    key, (bits, measured) = next(iter(completed_tiny_search["recipes"].items()))
    path = tmp_path / "download.json"
    path.write_text(json.dumps({"model_version": "tiny-sdxl", "recipes": {"mine": bits}}))
    apply_recipes(storage, sid, out_dir=coreml_out_dir, recipe_file=path, recipe="mine", execute=in_process)
    v = storage.validations(sid)["mine"]
    assert v.structural_ok and v.numeric_ok is True and abs(v.numeric_psnr - measured) <= 0.1


def test_errors_are_one_line_and_store_nothing(storage, completed_tiny_search, tiny_sdxl_spec, tmp_path):
    from workers.models import load_denoiser

    sid = completed_tiny_search["search_id"]
    key, (bits, _) = next(iter(completed_tiny_search["recipes"].items()))
    before = (snapshot(storage.path, sid), storage.validations(sid))
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"recipes": {"r": {"down_blocks.9.nothing": 4, "time_embedding.linear_2": 8}}}))
    changed = [l for l, b in bits.items() if b != 16][:3]
    other = apple_like_package(load_denoiser(tiny_sdxl_spec), list(bits), tmp_path / "Other.mlpackage", perturb=changed)
    cases = [
        (dict(recipe="nope"), "no recipe 'nope'"),
        (dict(recipe=None), "pass --recipe KEY or --recipe all"),
        (dict(recipe=key, coreml_node="mac"), "--coreml-node must be one of"),
        (dict(recipe="r", recipe_file=bad_file), "down_blocks.9.nothing"),
        (dict(recipe=key, mlpackage=other), "3 of"),
        (dict(recipe=key, mlpackage=tmp_path / "missing.mlpackage"), "does not exist"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ApplyError) as info:
            apply_recipes(storage, sid, out_dir=tmp_path / "out", execute=in_process, **kwargs)
        assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
        if "mlpackage" in kwargs and kwargs["mlpackage"] == other:
            assert all(layer in str(info.value) for layer in changed)
    with pytest.raises(ApplyError, match="no search 'ffffffffff'"):
        apply_recipes(storage, "ffffffffff", out_dir=tmp_path / "out", recipe="all", execute=in_process)
    assert (snapshot(storage.path, sid), storage.validations(sid)) == before
    assert not list((tmp_path / "out").glob("*.mlpackage")) if (tmp_path / "out").exists() else True


@pytest.mark.slow
def test_cli_apply_and_validate_through_ray(completed_tiny_search, coreml_out_dir):
    """The real Ray task wrapper, through the `search` app's own apply/validate commands."""
    import ray
    from typer.testing import CliRunner

    from search.cli.app import app
    db, sid = str(completed_tiny_search["db"]), completed_tiny_search["search_id"]
    key = next(iter(completed_tiny_search["recipes"]))
    runner = CliRunner()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        res = runner.invoke(app, ["apply", sid, "--recipe", key, "-o", str(coreml_out_dir), "--db", db,
                                  "--coreml-node", "any"])
        assert res.exit_code == 0, res.output
        assert f"{key}: {Path(coreml_out_dir).resolve() / key}.mlpackage (" in res.output
        assert ("runtime validation not run: Core ML prediction needs macOS" in res.output) != ON_MACOS
        res = runner.invoke(app, ["validate", sid, "--recipe", key, "--db", db, "--coreml-node", "any"])
        assert res.exit_code == 0, res.output
        # an error inside the Ray task comes back as one red line and exit code 2
        res = runner.invoke(app, ["apply", sid, "--recipe", key, "-o", str(coreml_out_dir), "--db", db,
                                  "--coreml-node", "any", "--mlpackage", str(coreml_out_dir / "nope.mlpackage")])
        assert res.exit_code == 2 and "nope.mlpackage does not exist" in res.output, res.output
        assert "Traceback" not in res.output
        if not ON_MACOS:  # no node offers the coreml resource: a clear error, not a hang
            res = runner.invoke(app, ["apply", sid, "--recipe", key, "-o", str(coreml_out_dir), "--db", db,
                                      "--coreml-node", "coreml"])
            assert res.exit_code == 2 and "'coreml' resource" in res.output, res.output
        assert ray.is_initialized()  # the commands leave a Ray they did not start alone
    finally:
        ray.shutdown()
    with Storage(db) as st:
        v = st.validations(sid)[key]
    assert v.structural_ok and v.numeric_ok
