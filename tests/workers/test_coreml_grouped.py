"""Core ML with grouped-channel and 3-bit formats (real coremltools, Linux): a recipe mixing 4g16,
2g8, 3 bits and float16 is applied to tiny-sdxl's UNet converted for iOS 18 / macOS 15; every
grouped layer holds one LUT per channel group, equal to the exact k-means of that group
(`fit_palette`, itself equal to coremltools' own per_grouped_channel k-means in
test_grouped_palette), and the structural and numeric checks pass. A package with an older
deployment target is refused with one line."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from common.formats import FLOAT16, recipe_formats
from search.driver.coreml_jobs import evaluator_settings
from storage import Storage
from tests.workers.test_coreml import apple_like_package
from workers.coreml.common import CoreMLError, iter_ops, read_program
from workers.coreml.convert import spec_version
from workers.coreml.task import CoreMLJob, RecipeJob, run_job
from workers.palette_formats import fit_palette

logging.getLogger("coremltools").setLevel(logging.ERROR)


def _job(info, out_dir, bits, mlpackage=None) -> CoreMLJob:
    storage = Storage(info["db"])
    search = storage.get_search(info["search_id"])
    storage.close()
    return CoreMLJob("apply", search.id, search.model, search.fingerprint, evaluator_settings(search),
                     (RecipeJob("grouped", bits, None, None),), {}, "kmeans", str(out_dir),
                     str(mlpackage) if mlpackage else None)


@pytest.fixture(scope="module")
def recipe(completed_tiny_search, tiny_sdxl_spec):
    from workers.models import load_denoiser

    storage = Storage(completed_tiny_search["db"])
    layers = storage.layers(completed_tiny_search["search_id"])
    storage.close()
    cycle = ("4g16", "3", "2g8", "16")
    bits = recipe_formats({l.name: cycle[i % 4] if l.shape[0] % 16 == 0 else "3" for i, l in enumerate(layers)})
    unet = load_denoiser(tiny_sdxl_spec)
    weights = {l: unet.get_submodule(l).weight.detach().half().numpy() for l, f in bits.items() if f != FLOAT16}
    return bits, weights


@pytest.fixture(scope="module")
def applied(completed_tiny_search, recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml-grouped")
    return run_job(_job(completed_tiny_search, out, recipe[0]))


def test_grouped_recipe_is_applied_with_one_lut_per_group(applied, recipe):
    bits, weights = recipe
    (outcome,) = applied.outcomes
    assert outcome.structural_ok, outcome.structural_detail
    assert "4g16" in outcome.structural_detail and "2g8" in outcome.structural_detail
    assert outcome.numeric_psnr is not None and np.isfinite(outcome.numeric_psnr)
    assert spec_version(outcome.mlpackage) >= 9  # iOS 18 / macOS 15
    ops = [op for op in iter_ops(read_program(outcome.mlpackage)) if op.op_type == "constexpr_lut_to_dense"]
    assert len(ops) == len(weights)
    by_content = {}
    for op in ops:  # which torch layer an op is: its decompressed values are the palettized weight
        lut, idx = np.asarray(op.lut.val), np.asarray(op.indices.val)
        rows = idx.reshape(lut.shape[0], -1).astype(np.int64)
        dense = np.take_along_axis(lut.reshape(lut.shape[0], -1), rows, 1).reshape(-1)
        by_content[dense.astype(np.float16).tobytes()] = lut.reshape(lut.shape[0], -1)
    for layer, w in weights.items():
        pal = fit_palette(w, bits[layer])
        lut = by_content[pal.dequantize(w).reshape(-1).tobytes()]
        expected = pal.luts if bits[layer].grouped else pal.lut[None]
        assert np.array_equal(lut.astype(np.float16).view(np.uint16), expected.view(np.uint16)), layer


def test_old_deployment_target_is_a_one_line_error(completed_tiny_search, recipe, tmp_path):
    bits, weights = recipe
    package = apple_like_package_of(weights, tmp_path / "Unet.mlpackage")
    with pytest.raises(CoreMLError, match=r"uses .*which Core ML has from iOS 18 / macOS 15 on.*Unet\.mlpackage") as e:
        run_job(_job(completed_tiny_search, tmp_path / "out", bits, package))
    assert "\n" not in str(e.value)


def apple_like_package_of(weights, path):
    """An Apple-style package (macOS 14 target) holding exactly these float16 weights."""
    import torch

    class Unet:  # the minimal surface apple_like_package reads
        def get_submodule(self, name):
            m = torch.nn.Module()
            m.weight = torch.nn.Parameter(torch.from_numpy(weights[name].astype(np.float32)))
            return m

    return apple_like_package(Unet(), list(weights), path)
