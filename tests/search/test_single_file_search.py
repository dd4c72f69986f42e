"""A search on a single-file checkpoint measures exactly what a search on the diffusers directory
it was written from measures (issue 32): every per-layer PSNR (isolated and cumulative), every
baseline, per prompt. A search with a LoRA fused measures the weights the test computes by hand
(W + scale * B @ A): its fingerprint, which every evaluator checks against what it loaded, is that
of the UNet the test fused by hand.

The searches are the smallest that still measure something: 5 candidates (--min-size 70000),
4-bit palettes, one prompt, 64 px, one evaluator, no gallery, all in one Ray instance; each search
has its own database, so no measurement is copied from another search.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cli_helpers import error_line, run_cli
from tests.workers.test_single_file import by_hand, load_dir, module_of, write_checkpoint, write_lora

SMALL = dict(nbits="4", min_size=70_000, resolution=64, num_recipes=1, refine_evals=0, prompts=["a photo of a cat"])
LORA_LAYERS = ("up_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
LORA_SCALE = 0.8


def _search(model: str, db: Path, **extra) -> dict:
    """Run one search through submit -> prepare -> driver; returns its stored tables as plain dicts."""
    from search.driver.jobs import run_search, submit_search
    from search.recipes.tables import load_tables
    from search.submit_options import parse_search_options
    from storage import Storage

    from search.submit_options import SEARCH_OPTIONS

    quiet = {"gallery": False} if any(o.name == "gallery" for o in SEARCH_OPTIONS) else {}  # images: not measured
    options = parse_search_options({**SMALL, **quiet, **extra})
    with Storage(db) as st:
        prepared = submit_search(st, model, options)
        search, _ = run_search(st, prepared, workers=1)
        assert search.status == "completed", search.error
        t = load_tables(st, search.id)
        return {"isolated": {(int(b.bits), layer): m.psnr for b, row in t.isolated.items() for layer, m in row.items()},
                "cumulative": {(int(b.bits), pos, m.layer): m.psnr for b, row in t.cumulative.items()
                               for pos, m in row.items()},
                "baselines": t.baselines, "per_prompt": t.baseline_per_prompt,
                "version": search.model_version, "fingerprint": search.fingerprint, "source": search.model_source,
                "model": search.model, "location": search.model_location, "config": search.config}


@pytest.fixture(scope="module")
def searches(model_cache, tmp_path_factory):
    import ray

    from workers.denoiser import denoiser_fingerprint
    from workers.tiny_models import ensure_tiny_model

    out = tmp_path_factory.mktemp("single-file-search")
    results = {}
    try:
        for name in ("tiny-sd", "tiny-sdxl"):
            folder = ensure_tiny_model(name, model_cache)
            path = write_checkpoint(name, model_cache, out)
            results[name, "dir"] = _search(str(folder), out / f"{name}-dir.db")
            results[name, "file"] = _search(str(path), out / f"{name}-file.db", config_dir=str(folder))
        folder = ensure_tiny_model("tiny-sd", model_cache)
        base = load_dir(folder)
        lora = out / "lora.safetensors"
        written = write_lora(lora, {("unet", m): (4, None, module_of(base.unet, m).weight.shape) for m in LORA_LAYERS})
        with torch.no_grad():  # the UNet with the LoRA fused by hand
            for (_, module), factors in written.items():
                weight = module_of(base.unet, module).weight
                weight.copy_(by_hand(weight, *factors, LORA_SCALE))
        results["lora", "by hand"] = denoiser_fingerprint(base.unet.half())
        results["lora", "file"] = _search(str(out / "tiny-sd.safetensors"), out / "lora-file.db",
                                          config_dir=str(folder), loras=[f"{lora}:{LORA_SCALE}"])
    finally:
        ray.shutdown()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_file_search_measures_what_the_directory_search_measures(searches, name):
    on_dir, on_file = searches[name, "dir"], searches[name, "file"]
    assert on_file["source"] == "file" and on_dir["source"] == "local"
    assert len(on_dir["isolated"]) == 5 and len(on_dir["cumulative"]) == 5
    assert set(on_dir["baselines"]) >= {"original", "linear_8bit"}
    for table in ("isolated", "cumulative", "baselines", "per_prompt"):
        assert on_file[table] == on_dir[table], table
    assert on_file["fingerprint"] == on_dir["fingerprint"]
    assert "sha256 " in on_file["version"] and on_file["version"].startswith(("tiny-sd", "tiny-sdxl"))


@pytest.mark.slow
def test_lora_search_measures_the_weights_fused_by_hand(searches):
    """Every evaluator checks the UNet it loaded against the stored fingerprint: the LoRA search's is
    the fingerprint of the base UNet with W + scale * B @ A computed by the test; and the fused
    layer's measured PSNR differs from the base's."""
    base, fused = searches["tiny-sd", "file"], searches["lora", "file"]
    assert "LoRA lora.safetensors x0.8" in fused["version"]
    assert fused["fingerprint"] == searches["lora", "by hand"] != base["fingerprint"]
    assert fused["isolated"][4, LORA_LAYERS[0]] != base["isolated"][4, LORA_LAYERS[0]]


@pytest.mark.slow
def test_stored_search_finds_its_model_again(searches):
    """What resume, `search recipe` and the Core ML stage do: the stored model name and config resolve
    to the same materialized directory (LoRA and --config included), without converting again."""
    from workers.models import model_options, resolve_model

    for key in (("lora", "file"), ("tiny-sdxl", "file")):
        stored = searches[key]
        marker = Path(stored["location"]) / ".mbp-single-file"
        before = marker.stat().st_mtime_ns
        spec = resolve_model(stored["model"], **model_options(stored["config"]))
        assert spec.location == stored["location"] and spec.version == stored["version"]
        assert marker.stat().st_mtime_ns == before
    assert model_options(searches["lora", "file"]["config"])["loras"]


def test_bad_inputs_exit_2_with_one_line(tmp_path, model_cache):
    from search.config import ConfigError
    from search.submit_options import parse_search_options

    db = tmp_path / "s.db"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    proc = run_cli("submit", "--model", cut, "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and "not a readable safetensors file" in error_line(proc)
    proc = run_cli("submit", "--model", "tiny-sd", "--lora", cut, "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and "apply to single-file checkpoints" in error_line(proc)
    assert not db.exists()
    for bad, message in ((dict(loras=[str(tmp_path / "none.safetensors")]), "no such file"),
                         (dict(loras=[f"{cut}:x2"]), "no such file"), (dict(config_dir=str(tmp_path)), "no model_index")):
        with pytest.raises(ConfigError, match=message):
            parse_search_options(bad)
    assert parse_search_options(dict(loras=[f"{cut}:0.5"]))["loras"] == (f"{cut.resolve()}:0.5",)
