"""Issue 11 through the real CLI and Ray: palettes fitted by CPU tasks from the evaluators'
histograms equal today's in-actor fits digest for digest, and a search with prefix reuse stores
exactly the numbers of one without it."""
import json

import pytest
import torch

from tests.cli_helpers import run_cli

pytestmark = pytest.mark.slow


def _search(tmp_path, model_cache, *extra):
    db = tmp_path / "searches.db"
    proc = run_cli("submit", "--model", "tiny-sdxl", "--db", db, "--workers", "2", "--nbits", "2,4",
                   "--num-recipes", "2", "--min-size", "30000", *extra, model_cache=model_cache, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.splitlines()[0].split()[1]
    assert "fitted by CPU tasks" in proc.stderr and "timings (wall s" in proc.stderr
    return db, sid


def test_cpu_palette_tasks_and_prefix_reuse_match(tmp_path, model_cache, tiny_sdxl_spec):
    from storage import Storage
    from storage.palette_store import PaletteStore
    from workers.models import load_denoiser
    from workers.palettize import kmeans_palette, load_palette

    db_on, sid_on = _search(tmp_path / "on", model_cache)
    db_off, sid_off = _search(tmp_path / "off", model_cache, "--no-prefix-reuse")
    unet = load_denoiser(tiny_sdxl_spec)
    with Storage(db_on) as on, Storage(db_off) as off:
        pals = on.palettes(sid_on)
        assert pals and pals.keys() == off.palettes(sid_off).keys()
        store = PaletteStore(db_on)
        for (layer, bits), info in pals.items():
            w = unet.get_submodule(layer).weight.data.to(torch.float16).numpy()
            assert info.digest == kmeans_palette(w, bits).digest == off.palettes(sid_off)[(layer, bits)].digest
            assert load_palette(store.path(info.path)).digest == info.digest
        a = {m.key: m.per_prompt for m in on.measurements(sid_on)}
        b = {m.key: m.per_prompt for m in off.measurements(sid_off)}
        assert a and a == b
        assert [(r.key, r.psnr) for r in on.recipes(sid_on)] == [(r.key, r.psnr) for r in off.recipes(sid_off)]
        cfg = on.get_search(sid_on).config
        assert cfg["prefix_reuse"] is True and off.get_search(sid_off).config["prefix_reuse"] is False
    status = json.loads(run_cli("status", sid_on, "--db", db_on, "--json", model_cache=model_cache).stdout)
    assert status["status"] == "completed"
