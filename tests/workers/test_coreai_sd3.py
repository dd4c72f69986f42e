"""tiny-sd3 through the Core AI target (in-process, without the 4bit comparison): Apple's SD3
layout (T5-less: two CLIP text encoders, MMDiT with 154 text tokens, VAE decoder only), the
search's LUTs bit for bit, and the Core AI runtime's PSNR equal to the search's measured one.
The search's own pipeline passes 77 + T5's tokens, so that run uses the same weights exported
at its length (checked too); the shipped asset keeps Apple's shapes.
"""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import build_completed_search
from workers import coreai

pytestmark = [pytest.mark.skipif(not coreai.available(), reason=coreai.INSTALL_HINT), pytest.mark.slow]

# apple/coreai-models diffusion/components.py SD3_COMPONENTS: {file: (input names, output names)}
APPLE_SD3 = {
    "TextEncoder.aimodel": (["input_ids"], ["hidden_embeds", "pooled_outputs"]),
    "TextEncoder2.aimodel": (["input_ids"], ["hidden_embeds", "pooled_outputs"]),
    "MMDiT.aimodel": (["sample", "timestep", "encoder_hidden_states", "pooled_projections"], ["noise_pred"]),
    "VAEDecoder.aimodel": (["z"], ["image"]),
}


@pytest.fixture(scope="module")
def built(model_cache, tmp_path_factory):
    from search.driver.bundle_jobs import bundle_coreai
    from storage import Storage
    from workers.models import resolve_model

    db = tmp_path_factory.mktemp("coreai-sd3") / "searches.db"
    s = build_completed_search(resolve_model("tiny-sd3"), "tiny-sd3", db, cycles=((4, 16, 2, 16, 6, 16),),
                               prompts=1, with_8bit=False)
    folder = tmp_path_factory.mktemp("coreai-sd3-out") / "sd3"
    with Storage(db) as st:
        report = bundle_coreai(st, s["search_id"], recipe=None, out_dir=folder, compare_4bit=False)
    return s, folder, report.result


def test_sd3_layout_luts_and_runtime_psnr(built):
    from coreai.authoring import AIModelAsset

    s, folder, r = built
    assert {p.name for p in folder.iterdir()} == set(APPLE_SD3) | {"tokenizer", "tokenizer_2", "metadata.json",
                                                                  "mbp-coreai.json"}
    for name, (inputs, outputs) in APPLE_SD3.items():
        summary = AIModelAsset.load(str(folder / name)).summary(include_statistics=False)
        assert [n for n, _ in summary.function_inputs("main")] == inputs, name
        assert [n for n, _ in summary.function_outputs("main")] == outputs, name
    ctx = dict(AIModelAsset.load(str(folder / "MMDiT.aimodel")).summary(include_statistics=False)
               .function_inputs("main"))["encoder_hidden_states"]
    assert re.search(r"\b2 × 154 × \d+\)", ctx), ctx
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["assets"] == {"text_encoder": "TextEncoder.aimodel", "text_encoder_2": "TextEncoder2.aimodel",
                              "transformer": "MMDiT.aimodel", "vae_decoder": "VAEDecoder.aimodel"}
    assert meta["diffusion"]["type"] == "stable-diffusion-3" and meta["diffusion"]["prediction_type"] == "flow"
    (_, (formats, measured)), = s["recipes"].items()
    assert r.palettized_layers == sum(1 for b in formats.values() if int(b) != 16)
    assert r.luts_ok, r.luts_detail
    # within one 0.1 dB rounding step of Apple's protocol plus fp16
    assert r.runtime_ok is True and abs(r.runtime_psnr - measured) <= 0.15, r.runtime_detail
