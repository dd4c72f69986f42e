"""`search bundle ID --target coreai` on a finished tiny-sd search, as a user runs it (a subprocess):
the folder is Apple's Core AI exporter layout (a table written here from apple/coreai-models'
sources), the denoiser holds the search's palettes from SQLite bit for bit, the Linux Core AI
runtime gives the PSNR the search measured (a recipe measured near the runtime's float16 floor:
that PSNR combined with the floor), the 4bit comparison's numbers are what the assets store, and
refusals are one line with exit 2 and nothing written.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import error_line, run_cli
from tests.conftest import build_completed_search
from workers import coreai

pytestmark = pytest.mark.skipif(not coreai.available(), reason=coreai.INSTALL_HINT)

# apple/coreai-models python/src/coreai_models/diffusion/components.py (SD_COMPONENTS) and pipeline.py:
# {asset file: (inputs, outputs)} with the dummy shapes Apple exports (denoiser batch 2, input_ids 1x77).
APPLE_SD = {
    "TextEncoder.aimodel": ([("input_ids", "1 × 77")], [("last_hidden_state", "1 × 77 × {D}")]),
    "Unet.aimodel": ([("sample", "2 × 4 × {H} × {H}"), ("timestep", "2"), ("encoder_hidden_states", "2 × 77 × {D}")],
                     [("noise_pred", "2 × 4 × {H} × {H}")]),
    "VAEDecoder.aimodel": ([("z", "1 × 4 × {H} × {H}")], [("image", "1 × 3 × {P} × {P}")]),
    "VAEEncoder.aimodel": ([("image", "1 × 3 × {P} × {P}")], [("latent_params", "1 × 8 × {H} × {H}")]),
}
APPLE_ASSET_KEYS = {"text_encoder": "TextEncoder.aimodel", "unet": "Unet.aimodel", "vae_decoder": "VAEDecoder.aimodel",
                    "vae_encoder": "VAEEncoder.aimodel"}
ASSET_FILES = {"main.mlirb", "main.hash", "metadata.json"}  # what AIProgram.save_asset writes
WIDTH = {"Float16": 16, "Float32": 32, "Int4": 4, "UInt1": 1, "UInt2": 2, "UInt4": 4, "UInt6": 6, "UInt8": 8,
         "Int8": 8, "Int32": 32, "UInt32": 32, "UInt64": 64, "Int64": 64}


@pytest.fixture(scope="module")
def search(model_cache, tmp_path_factory):
    from workers.models import resolve_model

    db = tmp_path_factory.mktemp("coreai-search") / "searches.db"
    return build_completed_search(resolve_model("tiny-sd"), "tiny-sd", db, cycles=((4, 16, 2, 16, 6, 16, 1, 16),),
                                  with_8bit=False)


@pytest.fixture(scope="module")
def built(search, model_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("coreai-out") / "sd-coreai"
    key = next(iter(search["recipes"]))  # named: other tests add recipes to this search
    proc = run_cli("bundle", search["search_id"], "--recipe", key, "--target", "coreai", "-o", folder, "--db",
                   search["db"], "--json", model_cache=model_cache, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return folder, report


def test_layout_is_apples_exporter_layout(built, model_cache):
    from coreai.authoring import AIModelAsset

    from workers.models import load_pipeline, resolve_model

    folder, report = built
    pipe = load_pipeline(resolve_model("tiny-sd"))
    h = pipe.unet.config.sample_size
    dims = {"H": h, "D": pipe.text_encoder.config.hidden_size, "P": h * 8}
    top = {p.name for p in folder.iterdir()}
    assert top == set(APPLE_SD) | {"tokenizer", "metadata.json", "mbp-coreai.json"}
    assert {p.name for p in (folder / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}  # Swift's BPETokenizer
    for name, (inputs, outputs) in APPLE_SD.items():
        assert {p.name for p in (folder / name).iterdir()} == ASSET_FILES, name
        summary = AIModelAsset.load(str(folder / name)).summary(include_statistics=False)
        assert summary.function_names == ["main"]
        got_in = [(n, re.sub(r"^NDArray \(\w+, |\)$", "", t)) for n, t in summary.function_inputs("main")]
        got_out = [(n, re.sub(r"^NDArray \(\w+, |\)$", "", t)) for n, t in summary.function_outputs("main")]
        assert got_in == [(n, s.format(**dims)) for n, s in inputs], name
        assert got_out == [(n, s.format(**dims)) for n, s in outputs], name
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["metadata_version"] == "0.2" and meta["kind"] == "diffusion" and meta["assets"] == APPLE_ASSET_KEYS
    d = meta["diffusion"]
    assert d["type"] == "stable-diffusion" and d["image_size"] == h * 8  # Swift: sample H x 8 must equal it
    assert d["prediction_type"] == pipe.scheduler.config.prediction_type
    assert d["decoder_scale_factor"] == pipe.vae.config.scaling_factor
    assert d["scheduler"]["training_steps"] == pipe.scheduler.config.num_train_timesteps


def test_denoiser_holds_the_palettes_stored_in_sqlite_bit_for_bit(built, search):
    """Palettes from the search's database and palette store; indices recomputed from the model's
    own float16 weights; the asset read with Core AI's API and a serial bit reader."""
    from tests.workers.test_coreai_luts import reference_read
    from search.driver.palettes import load_stored_palette
    from storage import Storage
    from storage.palette_store import PaletteStore
    from workers.models import load_denoiser, resolve_model

    folder, report = built
    unet = load_denoiser(resolve_model("tiny-sd"))
    found = reference_read(folder / "Unet.aimodel")
    with Storage(search["db"]) as st:
        recipe = next(iter(st.recipes(search["search_id"])))
        stored, store = st.palettes(search["search_id"]), PaletteStore(st.path)
        layers = {l: b for l, b in recipe.bits.items() if b != 16}
        assert len(found) == len(layers) == report["palettized_layers"]
        for layer, bits in layers.items():
            pal = load_stored_palette(store, stored[(layer, bits)])
            w = unet.get_submodule(layer).weight.detach().half().numpy()
            hits = [f for f in found if f[0] == w.shape and np.array_equal(f[1].reshape(-1).view(np.uint16),
                                                                             np.asarray(pal.lut).view(np.uint16))]
            assert len(hits) == 1, layer
            assert np.array_equal(hits[0][2].reshape(-1), np.asarray(pal.indices(w)).reshape(-1)), layer
    assert report["luts_ok"] is True


def test_runtime_psnr_equals_the_searchs_measured_psnr(built, search):
    folder, report = built
    (key, (_, measured)), = search["recipes"].items()
    assert report["recipe"] == key and report["measured_psnr"] == pytest.approx(measured)
    # within one 0.1 dB rounding step of Apple's protocol plus fp16
    assert np.isfinite(report["runtime_psnr"]) and abs(report["runtime_psnr"] - measured) <= 0.15
    assert report["runtime_ok"] is True and report["ok"] is True
    # the plain check passed, so the float16 floor was not measured (it costs an export and a run)
    assert report["floor_psnr"] is None and report["expected_psnr"] == report["measured_psnr"]


def test_comparison_numbers_are_what_the_assets_store(built, search):
    from coreai.authoring import AIModelAsset

    from workers.models import load_denoiser, resolve_model

    folder, report = built
    unet = load_denoiser(resolve_model("tiny-sd"))
    weights = sum(p.numel() for p in unet.parameters())
    comp = report["comparison"]
    assert comp["weights"] == weights
    recipe_row, preset_row = comp["rows"][:2]
    for row in (recipe_row, preset_row):
        assert row["bits_per_weight"] == pytest.approx(sum(WIDTH[t] * n for t, n in row["storage"].items()) / weights)
    summary = AIModelAsset.load(str(folder / "Unet.aimodel")).summary(include_statistics=True)
    assert dict(summary.storage_types) == recipe_row["storage"]
    assert recipe_row["asset_bytes"] == sum(p.stat().st_size for p in (folder / "Unet.aimodel").iterdir())
    (_, (formats, _)), = search["recipes"].items()
    per_depth = {}
    for layer, b in formats.items():
        if int(b) != 16:
            per_depth[f"UInt{int(b)}"] = per_depth.get(f"UInt{int(b)}", 0) + unet.get_submodule(layer).weight.numel()
    assert {t: n for t, n in recipe_row["storage"].items() if t.startswith("UInt") and t[4:] in "1 2 4 6 8"} == per_depth
    q = preset_row["quantized_weights"]
    assert q > 0 and preset_row["storage"]["Int4"] == q and preset_row["storage"]["Float16"] >= q // 32
    assert comp["delta_db"] == pytest.approx(recipe_row["psnr"] - preset_row["psnr"])


def test_refusals_are_one_line_exit_2_and_write_nothing(search, model_cache, tmp_path):
    from storage import Storage, StoredRecipe

    with Storage(search["db"]) as st:
        r = next(iter(st.recipes(search["search_id"])))
        three = {l: (3 if b != 16 else 16) for l, b in r.bits.items()}
        st.add_recipe(search["search_id"], StoredRecipe("three-bit", "manual", None, None, three, 3.0, 0.1,
                                                        None, None, None, None, None))
    from typer.testing import CliRunner

    from search.cli.app import app

    out, sid, db = tmp_path / "R", search["search_id"], str(search["db"])
    cases = [(["--recipe", "three-bit"], "Core AI cannot export 3-bit palettes"),
             (["--chunk"], "--chunk apply to --target coreml only")]
    for extra, message in cases:  # in-process: the same command, without a new interpreter each
        res = CliRunner().invoke(app, ["bundle", sid, "--target", "coreai", "-o", str(out), "--db", db, *extra])
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert res.exit_code == 2 and lines[-1].startswith("error:") and message in lines[-1], res.output
        assert sum(ln.startswith("error:") for ln in lines) == 1 and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["bundle", sid, "--target", "nope", "-o", str(out), "--db", db])
    assert res.exit_code == 2 and "--target must be one of coreml, coreai" in res.output
    shadow = tmp_path / "no-coreai"
    (shadow / "coreai_torch").mkdir(parents=True)
    (shadow / "coreai_torch" / "__init__.py").write_text("raise ImportError('not installed')\n")
    proc = run_cli("bundle", search["search_id"], "--target", "coreai", "-o", out, "--db", search["db"],
                   model_cache=model_cache, timeout=300, PYTHONPATH=f"{shadow}:{Path(__file__).resolve().parents[2]}")
    assert proc.returncode == 2 and "pip install coreai-torch==0.4.3 coreai-opt==0.4.0 coreai-core==1.0.0b3" in error_line(proc)
    assert not out.exists() and not out.with_name("R.partial").exists()


# One of the search's 6-bit palettes alone: the search measures ~93 dB for it, about tiny-sd's
# float16 floor on the Core AI runtime, so both errors count and the runtime reads ~3 dB lower.
FLOOR_LAYER = "up_blocks.1.resnets.0.conv2"


@pytest.fixture(scope="module")
def floor_case(search, model_cache, tmp_path_factory):
    """That recipe, measured by the search's own evaluator and stored as the search stores recipes,
    then built and stored with the same evaluator as the service's Core AI worker does (one
    evaluator, no 4bit table: the floor's own export and run are what this adds)."""
    import socket

    from typer.testing import CliRunner

    from search.cli.app import app
    from search.driver.bundle_jobs import evaluator_settings
    from search.driver.palettes import load_stored_palette
    from storage import Storage, StoredRecipe
    from storage.coreai_store import CoreAIStore, from_result
    from storage.palette_store import PaletteStore
    from workers.coreai.bundle import CoreAIJob, build
    from workers.evaluation.evaluator import Evaluator
    from workers.evaluation.items import WorkItem
    from workers.models import resolve_model

    sid, db = search["search_id"], str(search["db"])
    with Storage(db) as st:
        s = st.get_search(sid)
        first = next(iter(st.recipes(sid)))
        assert first.bits[FLOOR_LAYER] == 6
        pal = load_stored_palette(PaletteStore(st.path), st.palettes(sid)[(FLOOR_LAYER, 6)])
        bits = {l: 6 if l == FLOOR_LAYER else 16 for l in first.bits}
        st.add_recipe(sid, StoredRecipe("floor-case", "manual", None, None, bits, 16.0, 0.1, None, None, None, None,
                                        None))
        settings = evaluator_settings(s)
        ev = Evaluator(resolve_model("tiny-sd"), settings.signal, precision=settings.precision,
                       fingerprint=s.fingerprint, device="cpu", min_size=settings.min_size)
        measured = ev.evaluate(WorkItem("recipe/floor-case", "recipe", name="floor-case",
                                        assignment=((FLOOR_LAYER, 6),)), {(FLOOR_LAYER, 6): pal})
        st.set_recipe_result(sid, "floor-case", psnr=measured.psnr, per_prompt=measured.per_prompt,
                             node=measured.node, duration_s=measured.duration_s)
        folder = tmp_path_factory.mktemp("coreai-floor") / "floor"
        job = CoreAIJob(sid, s.model, s.fingerprint, "floor-case", bits, 16.0, measured.psnr,
                        {(FLOOR_LAYER, 6): pal}, str(folder), s.model_version, compare_4bit=False)
        result = build(job, ev)
        CoreAIStore(st).put(sid, from_result("floor-case", result, status="built" if result.runtime_ok else "failed",
                                             path=result.path, node=socket.gethostname()))
        del ev
    runner = CliRunner()
    status = runner.invoke(app, ["status", sid, "--db", db])
    as_json = runner.invoke(app, ["status", sid, "--db", db, "--json"])
    return {"measured": measured.psnr, "result": result, "status": status.output,
            "json": json.loads(as_json.output[as_json.output.index("{"):]),
            "report": json.loads((folder / "mbp-coreai.json").read_text())}


def test_near_the_float16_floor_the_runtime_is_checked_against_measured_and_floor_combined(floor_case, search):
    from storage import Storage
    from storage.coreai_store import CoreAIStore

    m, report = floor_case["measured"], floor_case["report"]
    assert m > 88  # the recipe measures near the runtime's floor: the case the plain rule got wrong
    assert report["luts_ok"] is True and report["runtime_ok"] is True, report["runtime_detail"]
    assert floor_case["result"].floor_psnr == report["floor_psnr"]
    runtime, floor = report["runtime_psnr"], report["floor_psnr"]
    assert report["measured_psnr"] == m and floor is not None
    assert abs(runtime - m) > 1.0  # the plain 0.15 dB rule fails here (runtime_ok False, the folder not shipped)
    assert runtime <= floor + 0.15  # no asset measures above what float16 alone allows
    both = -10 * math.log10(10 ** (-m / 10) + 10 ** (-floor / 10))  # two independent noises' MSEs add
    assert report["expected_psnr"] == pytest.approx(both, abs=1e-9)
    assert abs(runtime - both) <= 0.5 and report["runtime_ok"] is True
    assert "so the float16 floor was measured" in report["runtime_detail"]
    assert f"{floor:.2f} dB" in report["runtime_detail"] and f"{both:.2f} dB, within 0.5 dB" in report["runtime_detail"]
    with Storage(search["db"]) as st:
        row = CoreAIStore(st).bundles(search["search_id"])["floor-case"]
    assert (row.status, row.ok, row.runtime_ok, row.floor_psnr) == ("built", True, True, floor)
    assert row.runtime_detail == report["runtime_detail"] and row.runtime_psnr == runtime
    line = next(ln for ln in floor_case["status"].splitlines() if ln.startswith("Core AI floor-case"))
    assert f"runtime PSNR {runtime:.2f} dB vs measured {m:.2f} dB" in line and f"float16 floor {floor:.2f} dB" in line
    assert line.endswith("; ok") and "so the float16 floor was measured" in floor_case["status"]
    shown = floor_case["json"]["coreai"]["floor-case"]
    assert shown["floor_psnr"] == floor and shown["runtime_ok"] is True and shown["ok"] is True
