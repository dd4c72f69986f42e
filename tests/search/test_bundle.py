"""`search bundle`: the Resources folder checked against what Apple's Swift pipeline loads.

The contract below is written from Apple's sources (apple/ml-stable-diffusion at e12202c:
``torch2coreml.py`` convert_unet / convert_text_encoder / convert_vae_*, ``*+Resources.swift``,
``Unet.swift``, ``TextEncoder*.swift``, ``MultiModalDiffusionTransformer.swift``,
``StableDiffusion3Pipeline.swift``), not from this project's code: each package is read with
coremltools' own API and compared with it. LUTs are checked against the palettes the search
stored (read from its database) and against a plain numpy nearest-centroid assignment of the
torch weights; nothing here calls the functions that built the package.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from search.driver.bundle_jobs import bundle_recipe
from search.driver.coreml_jobs import ApplyError
from storage import Storage
from storage.coreml_store import CoreMLStore
from storage.palette_store import PaletteStore
from tests.conftest import build_completed_search
from workers.coreml.bundle.contract import BundleOptions
from workers.coreml.task import run_job

TOKENS = 77  # CLIP's context (max_position_embeddings of every Apple text encoder)
FP16, FP32 = "FLOAT16", "FLOAT32"
ONE_RECIPE = ((4, 16, 2, 16),)  # cheap palettes: 4- and 2-bit only


def in_process(job, _node):
    return run_job(job)


# -- Apple's contract, per family ------------------------------------------------------------
def apple_files(family: str) -> set[str]:
    """What StableDiffusion(XL|3)Pipeline's ResourceURLs look for (chunks aside), as .mlpackage off macOS."""
    models = {"sd": {"TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"},
              "sdxl": {"TextEncoder", "TextEncoder2", "Unet", "VAEDecoder", "VAEEncoder"},
              "sdxl-refiner": {"TextEncoder2", "UnetRefiner", "VAEDecoder", "VAEEncoder"},
              "sd3": {"TextEncoder", "TextEncoder2", "MultiModalDiffusionTransformer", "VAEDecoder",
                      "VAEEncoder"}}[family]
    return {f"{m}.mlpackage" for m in models} | {"vocab.json", "merges.txt"}


def apple_contract(family: str, pipe, batch: int = 2) -> dict[str, tuple[list, list]]:
    """{model: ([(input, shape, dtype)], [(output, dtype)])} from convert_unet / convert_text_encoder /
    convert_vae_* (inputs from the sample tensors; every output TensorType is float32) and, for SD3, the
    shapes Swift's StableDiffusion3Pipeline builds."""
    den = pipe.transformer if family == "sd3" else pipe.unet
    cfg = den.config
    h = w = cfg.sample_size
    lat = pipe.vae.config.latent_channels
    px = (h * 2 ** (len(pipe.vae.config.block_out_channels) - 1), w * 2 ** (len(pipe.vae.config.block_out_channels) - 1))
    vae_dtype = FP32 if family in ("sdxl", "sdxl-refiner") else FP16  # convert_vae_*: SDXL's VAE in float32
    out = {"VAEDecoder": ([("z", (1, lat, h, w), vae_dtype)], [("image", FP32)]),
           "VAEEncoder": ([("x", (1, 3, *px), vae_dtype)], [("latent", FP32)])}
    xl_outputs = [("hidden_embeds", FP32), ("pooled_outputs", FP32)]
    text = {"sd": {"TextEncoder": [("last_hidden_state", FP32), ("pooled_outputs", FP32)]},
            "sdxl": {"TextEncoder": xl_outputs, "TextEncoder2": xl_outputs},
            "sdxl-refiner": {"TextEncoder2": xl_outputs},
            "sd3": {"TextEncoder": xl_outputs, "TextEncoder2": xl_outputs}}[family]
    for name, outputs in text.items():
        out[name] = ([("input_ids", (1, TOKENS), FP32)], outputs)
    if family == "sd3":
        out["MultiModalDiffusionTransformer"] = (
            [("latent_image_embeddings", (batch, cfg.in_channels, h, w), FP16), ("timestep", (batch,), FP16),
             ("token_level_text_embeddings", (batch, cfg.joint_attention_dim, 1, 2 * TOKENS), FP16),
             ("pooled_text_embeddings", (batch, cfg.pooled_projection_dim, 1, 1), FP16)],
            [("denoiser_output", FP32)])
        return out
    inputs = [("sample", (batch, cfg.in_channels, h, w), FP16), ("timestep", (batch,), FP16),
              ("encoder_hidden_states", (batch, cfg.cross_attention_dim, 1, TOKENS), FP16)]
    if family in ("sdxl", "sdxl-refiner"):
        n_ids = 5 if family == "sdxl-refiner" else 6  # original size, crop, target size | aesthetic score
        inputs += [("time_ids", (batch, n_ids), FP16),
                   ("text_embeds", (batch, pipe.text_encoder_2.config.hidden_size), FP16)]
    out["UnetRefiner" if family == "sdxl-refiner" else "Unet"] = (inputs, [("noise_pred", FP32)])
    return out


def package_signature(path: Path) -> tuple[list, list]:
    """Inputs (name, shape, dtype) and outputs (name, dtype) as Core ML describes the package."""
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2 as ft

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    dtype = {ft.ArrayFeatureType.FLOAT16: FP16, ft.ArrayFeatureType.FLOAT32: FP32}

    def arr(f):
        return dtype.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType))

    ins = [(f.name, tuple(int(d) for d in f.type.multiArrayType.shape), arr(f)) for f in spec.description.input]
    outs = [(f.name, arr(f)) for f in spec.description.output]
    return ins, outs


def mil_ops(path: Path) -> list:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    prog = milproto.load(spec, spec.specificationVersion, model.weights_dir)
    out = []

    def walk(block):
        for op in block.operations:
            out.append(op)
            for b in op.blocks:
                walk(b)

    for fn in prog.functions.values():
        walk(fn)
    return out


def lut_ops(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(LUT, dense weight) of every constexpr_lut_to_dense in the package, decompressed here with numpy."""
    from coremltools.optimize import _utils as optimize_utils

    out = []
    for op in mil_ops(path):
        if op.op_type != "constexpr_lut_to_dense":
            continue
        lut = np.asarray(op.lut.val)
        if "shape" in op.inputs:  # iOS16 form: packed indices
            shape = tuple(int(d) for d in op.shape.val)
            idx = optimize_utils.restore_elements_from_packed_bits(op.indices.val, int(np.log2(lut.size)),
                                                                   int(np.prod(shape)))
            out.append((lut.reshape(-1), lut.reshape(-1)[np.asarray(idx).astype(np.int64)].reshape(shape)))
    return out


# -- fixtures: one finished search per family, one bundle each ------------------------------
@pytest.fixture(scope="module")
def searches(model_cache, tmp_path_factory):
    from workers.models import resolve_model

    out = {}
    for name in ("tiny-sd", "tiny-sdxl", "tiny-sdxl-refiner", "tiny-sd3"):
        db = tmp_path_factory.mktemp(f"bundle-{name}") / "searches.db"
        out[name] = build_completed_search(resolve_model(name), name, db, cycles=ONE_RECIPE,
                                           with_8bit=False)
    return out


CHUNKED = "tiny-sd"  # built with --chunk (one conversion fewer than a separate chunked bundle)


@pytest.fixture(scope="module")
def bundles(searches, tmp_path_factory):
    """{model: (bundle folder, report)} built through the driver with default options (tiny-sd: --chunk),
    in-process."""
    out = {}
    for name, s in searches.items():
        with Storage(s["db"]) as st:
            folder = tmp_path_factory.mktemp(f"out-{name}") / "Resources"
            out[name] = (folder, bundle_recipe(st, s["search_id"], recipe=None, out_dir=folder,
                                               options=BundleOptions(chunk=name == CHUNKED), execute=in_process))
    return out


FAMILY = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-sdxl-refiner": "sdxl-refiner", "tiny-sd3": "sd3"}
DENOISER = {"sd": "Unet", "sdxl": "Unet", "sdxl-refiner": "UnetRefiner", "sd3": "MultiModalDiffusionTransformer"}


def denoiser_packages(name: str, folder: Path) -> list[Path]:
    base = DENOISER[FAMILY[name]]
    if name == CHUNKED:
        return [folder / f"{base}Chunk1.mlpackage", folder / f"{base}Chunk2.mlpackage"]
    return [folder / f"{base}.mlpackage"]


@pytest.mark.parametrize("name", list(FAMILY))
def test_bundle_has_apples_files_names_shapes_and_dtypes(name, bundles):
    from workers.models import load_pipeline, resolve_model

    folder, report = bundles[name]
    family = FAMILY[name]
    assert report.result.family == family
    have = {p.name for p in folder.iterdir()}
    expected = apple_files(family)
    if name == CHUNKED:  # Swift's Unet(chunksAt:) when both chunks exist
        expected = expected - {"Unet.mlpackage"} | {"UnetChunk1.mlpackage", "UnetChunk2.mlpackage"}
    assert have == expected | {"bundle.json", "README.txt"}, sorted(have)
    pipe = load_pipeline(resolve_model(name))
    for model, (inputs, outputs) in apple_contract(family, pipe).items():
        if name == CHUNKED and model == DENOISER[family]:
            check_chunk_wiring(folder, model, inputs, outputs)
            continue
        got_in, got_out = package_signature(folder / f"{model}.mlpackage")
        assert got_in == inputs, model
        assert [(n, d) for n, d in got_out] == outputs, model


def check_chunk_wiring(folder: Path, model: str, inputs: list, outputs: list) -> None:
    """Unet.swift: chunk 1 is fed the pipeline's inputs (and the sample shape is read from it); chunk 2
    gets chunk 1's outputs merged over those inputs; the noise is chunk 2's first output."""
    in1, out1 = package_signature(folder / f"{model}Chunk1.mlpackage")
    in2, out2 = package_signature(folder / f"{model}Chunk2.mlpackage")
    assert set(in1) <= set(inputs) and "sample" in {n for n, _, _ in in1}, in1
    fed = {n: (shape, d) for n, shape, d in inputs}
    for n, shape, d in in2:
        if n in fed and n not in {o for o, _ in out1}:
            assert (shape, d) == fed[n], n
        else:
            assert n in {o for o, _ in out1}, f"chunk 2 input {n} is neither an input nor a chunk 1 output"
    assert out2 == outputs


@pytest.mark.parametrize("name", list(FAMILY))
def test_denoiser_holds_the_searchs_exact_luts(name, searches, bundles):
    """Every palettized recipe layer is one constexpr_lut_to_dense whose LUT is the stored palette's,
    bit for bit, and whose decompressed weight is the stored palette's entry for each torch weight
    (its code table indexed by the float16 bit pattern, plain numpy)."""
    import torch

    from workers.models import load_denoiser, resolve_model
    from workers.palettize import load_palette

    folder, report = bundles[name]
    s = searches[name]
    bits = next(iter(s["recipes"].values()))[0]
    palettized = {l: int(b) for l, b in bits.items() if int(b) != 16}
    with Storage(s["db"]) as st:
        stored = st.palettes(s["search_id"])
    store = PaletteStore(s["db"])
    den = load_denoiser(resolve_model(name))
    ops = [op for package in denoiser_packages(name, folder) for op in lut_ops(package)]
    assert len(ops) == len(palettized) == report.result.palettized_layers
    by_lut = {}
    for lut, dense in ops:
        by_lut.setdefault(lut.tobytes(), []).append(dense)
    for layer, b in palettized.items():
        pal = load_palette(store.path(stored[(layer, b)].path))
        lut = np.asarray(pal.lut, dtype=np.float16)
        assert lut.size == 2 ** b
        dense_list = by_lut.get(lut.tobytes())
        assert dense_list, f"{layer}: the stored {b}-bit LUT is not in the package"
        w = den.get_submodule(layer).weight.detach().to(torch.float16).numpy()
        expected = lut[np.asarray(pal.code)[w.reshape(-1).view(np.uint16)]]
        assert any(d.size == w.size and np.array_equal(d.reshape(-1).view(np.uint16), expected.view(np.uint16))
                   for d in dense_list), layer


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_denoiser_attention_is_split_einsum_by_default(name, bundles):
    folder, _ = bundles[name]
    kinds = [op.op_type for package in denoiser_packages(name, folder) for op in mil_ops(package)]
    assert kinds.count("einsum") > 0 and kinds.count("linear") == 0, {k: kinds.count(k) for k in set(kinds)}


def test_manifest_lists_every_file_with_its_sha256(bundles, searches):
    folder, report = bundles["tiny-sdxl"]
    data = json.loads((folder / "bundle.json").read_text())
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p.name != "bundle.json"}
    assert {f["path"] for f in data["files"]} == set(files)
    for f in data["files"]:
        raw = files[f["path"]].read_bytes()
        assert f["bytes"] == len(raw) and f["sha256"] == hashlib.sha256(raw).hexdigest()
    assert data["total_bytes"] == sum(p.stat().st_size for p in files.values())
    s = searches["tiny-sdxl"]
    assert (data["search_id"], data["model"], data["attention"]) == (s["search_id"], "tiny-sdxl", "split-einsum")
    assert data["deployment_target"] == "macOS13" and data["latent_size"] == [8, 8]
    assert data["formats"] == next(iter(s["recipes"].values()))[0]
    with Storage(s["db"]) as st:
        row = CoreMLStore(st).bundles(s["search_id"])[data["recipe_key"]]
    assert row.status == "built" and row.total_bytes == data["total_bytes"] and row.path == str(folder)
    assert report.result.structural_ok and report.result.numeric_ok, report.info.detail


def test_chunks_hold_every_weight_of_the_whole_once(bundles, searches):
    """The chunks of tiny-sd's Unet together hold the search's LUT of every palettized layer once,
    and every float weight of the denoiser exactly once (content compared, plain numpy)."""
    import torch

    from workers.models import load_denoiser, resolve_model

    folder, report = bundles[CHUNKED]
    c1, c2 = denoiser_packages(CHUNKED, folder)
    n1, n2 = len(lut_ops(c1)), len(lut_ops(c2))
    assert n1 > 0 and n2 > 0 and n1 + n2 == report.result.palettized_layers
    bits = next(iter(searches[CHUNKED]["recipes"].values()))[0]
    den = load_denoiser(resolve_model(CHUNKED))
    float_layers = [l for l, b in bits.items() if int(b) == 16]

    def fp16_consts(path):
        return [np.asarray(op.outputs[0].val).astype(np.float16).tobytes() for op in mil_ops(path)
                if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
                and op.outputs[0].val.dtype == np.float16 and op.outputs[0].val.size > 1]

    held = fp16_consts(c1) + fp16_consts(c2)
    for layer in float_layers:
        w = den.get_submodule(layer).weight.detach().to(torch.float16).numpy().tobytes()
        assert held.count(w) == 1, layer


def test_bad_requests_are_one_line_and_touch_nothing(searches, tmp_path):
    s = searches["tiny-sd"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    with Storage(s["db"]) as st:
        with pytest.raises(ApplyError, match="not empty"):
            bundle_recipe(st, s["search_id"], recipe=None, out_dir=busy, options=BundleOptions(), execute=in_process)
        with pytest.raises(ApplyError, match="no recipe 'nope'"):
            bundle_recipe(st, s["search_id"], recipe="nope", out_dir=tmp_path / "a", options=BundleOptions(),
                          execute=in_process)
        if sys.platform != "darwin":
            with pytest.raises(ApplyError, match="--compile needs macOS"):
                bundle_recipe(st, s["search_id"], recipe=None, out_dir=tmp_path / "b",
                              options=BundleOptions(compile=True), execute=in_process)
    assert (busy / "x").read_text() == "keep" and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for bad in (dict(attention="flash"), dict(encoders_nbits=3), dict(latent_size=(7, 8))):
        with pytest.raises(ValueError):
            BundleOptions(**bad)


def test_cli_refuses_bad_options_in_one_line(searches, model_cache, tmp_path):
    from tests.cli_helpers import error_line, invoke_cli

    s = searches["tiny-sdxl"]
    cases = [(["--attention", "flash"], "--attention must be one of"),
             (["--latent-size", "8y8"], "--latent-size must be H or HxW"),
             (["--encoders-nbits", "3"], "--encoders-nbits must be one of"),
             (["--recipe", "nope"], "no recipe 'nope'")]
    if sys.platform != "darwin":
        cases.append((["--compile"], "--compile needs macOS"))
    for extra, message in cases:
        proc = invoke_cli("bundle", s["search_id"], "-o", tmp_path / "R", "--db", s["db"], *extra,
                          model_cache=model_cache)  # the command's words and exit code, not the process
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in error_line(proc), (extra, proc.stderr)
        assert not (tmp_path / "R").exists() and not (tmp_path / "R.partial").exists()


def test_download_says_when_apples_script_cannot_load_the_model(searches, model_cache, tmp_path):
    from tests.cli_helpers import run_cli

    s = searches["tiny-sdxl"]
    proc = run_cli("download", s["search_id"], "-o", tmp_path / "r.json", "--db", s["db"], model_cache=model_cache)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["model_version"] == "tiny-sdxl"
    notes = [l for l in proc.stderr.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "built-in model" in notes[0] and "search bundle" in notes[0], proc.stderr
