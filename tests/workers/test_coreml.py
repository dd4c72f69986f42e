"""The Core ML worker with real coremltools (Linux: everything but Core ML prediction).

Converts tiny-sdxl's UNet, applies the completed search's recipes with its exact palettes,
and checks the structural and numeric validations; Apple-style packages (other weight
names, Linear as 1x1 conv) are matched by content; a package of another model fails with
the unmatched layers named. Core ML prediction is tested on macOS only.
"""
from __future__ import annotations

import logging
import sys
import warnings

import numpy as np
import pytest
import torch

from storage import Storage
from search.driver.coreml_jobs import evaluator_settings
from storage.palette_store import PaletteStore
from workers.coreml.common import CoreMLError, describe_program, fp16_digest, iter_ops, match_layers, package_size, read_program
from workers.coreml.apply import LayerLut, read_manifest
from workers.coreml.task import CoreMLJob, RecipeJob, run_job
from workers.coreml.validate import CoreMLDenoiser, check_structure, run_with_coreml
from workers.palettize import load_palette
from workers.evaluation.signal import psnr

logging.getLogger("coremltools").setLevel(logging.ERROR)
MACOS_ONLY = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction (MLModel.predict) needs macOS; "
                                "elsewhere the stored result says runtime validation was not run")


def make_job(info, out_dir, *, mlpackage=None, keys=None) -> CoreMLJob:
    """The job search.apply would ship for the fixture search's recipes and exact palettes."""
    storage = Storage(info["db"])
    search = storage.get_search(info["search_id"])
    recipes = [r for r in storage.recipes(search.id) if keys is None or r.key in keys]
    store, stored = PaletteStore(info["db"]), storage.palettes(search.id)
    palettes = {k: load_palette(store.path(v.path)) for k, v in stored.items()}
    storage.close()
    return CoreMLJob("apply", search.id, search.model, search.fingerprint, evaluator_settings(search),
                     tuple(RecipeJob(r.key, r.bits, r.avg_bits, r.psnr) for r in recipes), palettes, "search",
                     str(out_dir), str(mlpackage) if mlpackage else None)


def apple_like_package(unet, layers, path, perturb=()):
    """A package like Apple's torch2coreml makes: other weight names, every Linear a 1x1 conv.
    Layers in ``perturb`` get slightly different weights (a "fine-tuned" model)."""
    import coremltools as ct

    convs = torch.nn.ModuleList()
    for name in layers:
        w = unet.get_submodule(name).weight.data.float().clone()
        w = w if w.ndim == 4 else w[:, :, None, None]
        if name in perturb:
            w = w + 1e-2
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False)
        conv.weight.data = w
        convs.append(conv)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = convs

        def forward(self, x):
            return torch.cat([c(x[:, :c.in_channels]).reshape(-1) for c in self.blocks])

    x = torch.zeros(1, max(c.in_channels for c in convs), 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation, output renamed
        traced = torch.jit.trace(Net().eval(), x)
        model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape)], convert_to="mlprogram",
                           compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.macOS14,
                           skip_model_load=True)
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def applied(completed_tiny_search, coreml_out_dir):
    job = make_job(completed_tiny_search, coreml_out_dir)
    return job, run_job(job)


@pytest.fixture(scope="module")
def tiny_unet(tiny_sdxl_spec):
    from workers.models import load_denoiser

    return load_denoiser(tiny_sdxl_spec)


# -- content matching ----------------------------------------------------------------------
def _described(consts: dict) -> dict:
    return {n: (fp16_digest(v), v.shape) for n, v in consts.items()}


def test_match_by_content_linear_as_conv():
    rng = np.random.default_rng(0)
    lin, conv = rng.standard_normal((8, 5)).astype(np.float16), rng.standard_normal((4, 2, 3, 3)).astype(np.float16)
    consts = {"w_a": conv.copy(), "unrelated": rng.standard_normal((8, 5)).astype(np.float16),
              "w_b": lin.reshape(8, 5, 1, 1).copy()}
    m = match_layers({"attn.to_q": lin, "conv1": conv}, _described(consts))
    assert (m["attn.to_q"].const, m["attn.to_q"].shape) == ("w_b", (8, 5, 1, 1))
    assert m["conv1"].const == "w_a"


def test_match_errors_name_the_layers():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 6)).astype(np.float16), rng.standard_normal((6, 6)).astype(np.float16)
    with pytest.raises(CoreMLError, match=r"1 of 2 recipe layers have no float16 weight.*: layer\.b;"):
        match_layers({"layer.a": a, "layer.b": b}, _described({"x": a}))
    with pytest.raises(CoreMLError, match=r"several Core ML weights.*layer\.a \(x, y\)"):
        match_layers({"layer.a": a}, _described({"x": a, "y": a.copy()}))
    with pytest.raises(CoreMLError, match=r"several.*one, two -> x"):
        match_layers({"one": a, "two": a.copy()}, _described({"x": a}))


# -- apply the search's recipes --------------------------------------------------------------
def test_apply_converts_and_uses_the_search_luts(applied, completed_tiny_search):
    job, result = applied
    assert result.base_converted and result.base_mlpackage.endswith(".mlpackage")
    assert {o.key for o in result.outcomes} == set(completed_tiny_search["recipes"])
    for o in result.outcomes:
        bits, measured = completed_tiny_search["recipes"][o.key]
        assert o.structural_ok, o.structural_detail
        assert "search's LUTs and indices" in o.structural_detail and "other weights are unchanged" in o.structural_detail
        assert o.numeric_ok is True and abs(o.numeric_psnr - measured) <= 0.1, (o.numeric_psnr, measured)
        assert o.size_bytes == package_size(o.mlpackage) > 0
        assert o.palettized_layers == sum(b != 16 for b in bits.values())
        assert read_manifest(o.mlpackage).bits == bits
        # independently of the validator: the saved LUT of a layer is the stored palette's LUT
        m = read_manifest(o.mlpackage)
        layer = next(l for l in m.layers)
        op = next(op for op in iter_ops(read_program(o.mlpackage)) if op.name == m.layers[layer] + "_palettized")
        assert op.op_type == "constexpr_lut_to_dense"
        assert np.array_equal(op.lut.val, job.palettes[(layer, bits[layer])].lut)
    sizes = {o.key: o.size_bytes for o in result.outcomes}
    assert all(s < package_size(result.base_mlpackage) for s in sizes.values())


def test_runtime_not_run_off_macos(applied):
    if sys.platform == "darwin":
        pytest.skip("on macOS the runtime validation runs (see test_runtime_prediction_macos)")
    for o in applied[1].outcomes:
        assert o.runtime is None
        assert o.runtime_note.startswith("not run") and "macOS" in o.runtime_note


@MACOS_ONLY
def test_runtime_prediction_macos(applied):
    for o in applied[1].outcomes:
        assert set(o.runtime) == {"CPU_AND_GPU", "CPU_AND_NE"}, o.runtime_note
        assert all(np.isfinite(v) and v > 10 for v in o.runtime.values())


def test_base_model_is_cached(completed_tiny_search, coreml_out_dir, applied):
    key = next(iter(completed_tiny_search["recipes"]))
    result = run_job(make_job(completed_tiny_search, coreml_out_dir, keys={key}))
    assert result.base_cached and result.base_mlpackage == applied[1].base_mlpackage
    assert result.outcomes[0].structural_ok and result.outcomes[0].numeric_ok


def test_structural_check_detects_changes(applied, tiny_unet):
    from workers.coreml.common import LayerMatch
    from workers.coreml.apply import layer_luts, torch_weights

    job, result = applied
    m = read_manifest(result.outcomes[0].mlpackage)
    program = read_program(result.outcomes[0].mlpackage)
    base_consts, _ = describe_program(read_program(result.base_mlpackage))
    luts = layer_luts(torch_weights(tiny_unet, list(m.layers)), m.bits,
                      {l: LayerMatch(l, c, ()) for l, c in m.layers.items()}, job.palettes)
    good, dense = check_structure(program, base_consts, luts)
    assert good.ok, good.detail
    assert set(dense) == set(m.layers)
    e = next(iter(luts.values()))
    for lut, indices, words in ((e.lut[::-1].copy(), e.indices, "LUT differs"),
                                (e.lut, (e.indices + 1) % (1 << e.bits.bits), "indices differ")):
        wrong = {**luts, e.const: LayerLut(e.layer, e.const, e.bits, lut, indices.astype(np.uint8), "", None)}
        bad, _ = check_structure(program, base_consts, wrong)
        assert not bad.ok and f"{e.layer}: {words}" in bad.detail
    other = next(n for n in base_consts if n not in luts)
    changed, _ = check_structure(program, {**base_consts, other: "0" * 64}, luts)
    assert not changed.ok and "1 other weights changed" in changed.detail and other in changed.detail
    fewer = dict(list(luts.items())[1:])  # a compressed weight the recipe does not have
    extra, _ = check_structure(program, base_consts, fewer)
    assert not extra.ok and "other weights are compressed too" in extra.detail


# -- the user's own package -------------------------------------------------------------------
def test_apple_like_package_matches_by_content(completed_tiny_search, tiny_unet, tmp_path):
    key, (bits, measured) = next(iter(completed_tiny_search["recipes"].items()))
    package = apple_like_package(tiny_unet, list(bits), tmp_path / "Unet.mlpackage")
    result = run_job(make_job(completed_tiny_search, tmp_path / "out", mlpackage=package, keys={key}))
    assert not result.base_converted and result.base_mlpackage == str(package)
    o = result.outcomes[0]
    assert o.structural_ok, o.structural_detail
    assert o.numeric_ok and abs(o.numeric_psnr - measured) <= 0.1
    assert all(c.startswith("blocks_") for c in read_manifest(o.mlpackage).layers.values())


def test_package_of_another_model_names_unmatched_layers(completed_tiny_search, tiny_unet, tmp_path):
    key, (bits, _) = next(iter(completed_tiny_search["recipes"].items()))
    palettized = [l for l, b in bits.items() if b != 16]
    changed = palettized[:2]
    package = apple_like_package(tiny_unet, list(bits), tmp_path / "Other.mlpackage", perturb=changed)
    with pytest.raises(CoreMLError) as info:
        run_job(make_job(completed_tiny_search, tmp_path / "out", mlpackage=package, keys={key}))
    msg = str(info.value)
    assert f"2 of {len(palettized)} recipe layers have no float16 weight" in msg and "Other.mlpackage" in msg
    assert all(name in msg for name in changed) and "\n" not in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.mlpackage"))


# -- the runtime path's plumbing, without Core ML ------------------------------------------
class TorchBackedModel:
    """A real converted package's spec (input names, shapes, types) whose predict runs the torch
    UNet: checks on Linux that CoreMLDenoiser feeds the pipeline's UNet calls correctly."""

    def __init__(self, package, unet):
        from workers.coreml.common import load_mlmodel

        self.spec = load_mlmodel(package).get_spec()
        self.forward = type(unet).forward.__get__(unet)  # the original, not the patched one

    def get_spec(self):
        return self.spec

    def predict(self, feeds):
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            out = self.forward(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                               added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
                               return_dict=False)[0]
        return {"noise_pred": out.numpy()}


def test_coreml_unet_adapter_feeds_the_pipeline(applied):
    from workers.coreml.task import _evaluator

    job, result = applied
    ev = _evaluator(job)
    unet = ev.pipe.unet
    out = run_with_coreml(ev, CoreMLDenoiser(TorchBackedModel(result.base_mlpackage, unet), unet.forward))
    assert "forward" not in vars(unet)  # restored
    assert float(np.mean(psnr(ev.reference, out))) > 100
