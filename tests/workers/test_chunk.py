"""The denoiser in two chunks, checked against what Swift's ``Unet(chunksAt:)`` does with them.

tiny-sdxl's UNet is converted with the project's converter, once as is and once palettized by
coremltools' own ``palettize_weights`` (k-means, 4 bits), then cut by ``chunk_package``. The
packages are read here with coremltools' spec API and the raw ``weight.bin`` bytes, not with
``chunk.py``: the wiring rule below is written from Apple's Swift sources, and every weight,
LUT and index array of the whole must be in exactly one chunk, byte for byte.
"""
from __future__ import annotations

import hashlib
import logging
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from workers.coreml.bundle.chunk import chunk_package
from workers.coreml.bundle.chunk_check import check_chunks
from workers.coreml.common import CoreMLError

logging.getLogger("coremltools").setLevel(logging.ERROR)
MACOS_ONLY = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction (MLModel.predict) needs macOS")
BLOB_SENTINEL = 0xDEADBEEF  # MIL weight-file blob header: sentinel, dtype, size in bytes, data offset (uint32/32/64/64)


@pytest.fixture(scope="module")
def wholes(tiny_sdxl_spec, tmp_path_factory):
    """tiny-sdxl's UNet as the project converts it (inputs the pipeline really passes), and the
    same package palettized by coremltools (k-means 4-bit on weights of 8192+ elements)."""
    import coremltools as ct
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    from workers.coreml.convert import capture_inputs, convert_denoiser
    from workers.denoiser import denoiser_of
    from workers.evaluation.signal import SignalRunner, SignalSpec
    from workers.models import load_pipeline

    pipe = load_pipeline(tiny_sdxl_spec)
    inputs, _ = capture_inputs(pipe, SignalRunner(pipe, SignalSpec(prompts=("a cat",), steps=1), "cpu"))
    out = tmp_path_factory.mktemp("chunk-wholes")
    plain = out / "Unet.mlpackage"
    convert_denoiser(denoiser_of(pipe), inputs, plain)
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=8192))
    palettized = out / "UnetPalettized.mlpackage"
    palettize_weights(ct.models.MLModel(str(plain), skip_model_load=True), config).save(str(palettized))
    return {"plain": plain, "palettized": palettized}, inputs


@pytest.fixture(scope="module")
def all_chunks(wholes, tmp_path_factory):
    """kind -> (kind, whole, chunk 1, chunk 2), both kinds cut once for the module."""
    found = {}
    for kind, whole in wholes[0].items():
        t0 = time.perf_counter()
        found[kind] = (kind, whole, *chunk_package(whole, tmp_path_factory.mktemp(f"chunks-{kind}"), "Unet"))
        print(f"\n{kind}: chunk_package {time.perf_counter() - t0:.1f} s")
    return found


@pytest.fixture(params=["plain", "palettized"])
def chunked(request, all_chunks):
    return all_chunks[request.param]


# -- reading packages with coremltools' spec API ---------------------------------------------------
def spec_of(package: Path):
    import coremltools as ct

    return ct.models.MLModel(str(package), skip_model_load=True).get_spec()


def features(described) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {f.name: (f.type.multiArrayType.dataType, tuple(f.type.multiArrayType.shape)) for f in described}


def blob(weights: bytes, offset: int) -> bytes:
    sentinel, _dtype, size, data = struct.unpack_from("<IIQQ", weights, offset)
    assert sentinel == BLOB_SENTINEL
    return weights[data:data + size]


def stored_weights(package: Path) -> tuple[Counter, Counter]:
    """(count, bytes) per weight: every value a const or constexpr op stores in the weight file
    (constants, LUTs, indices; as an attribute, or bound to an input from iOS 18 on) and every
    float const of rank >= 1 stored inline (small biases), keyed by the op's output name, the
    slot, dtype, shape and the sha256 of the stored bytes."""
    from coremltools.proto import MIL_pb2

    floats = {MIL_pb2.DataType.Value(n) for n in ("FLOAT16", "FLOAT32", "FLOAT64")}
    spec = spec_of(package)
    weight_file = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    raw = weight_file.read_bytes() if weight_file.exists() else b""
    fn = spec.mlProgram.functions["main"]
    counts, sizes = Counter(), Counter()
    for op in fn.block_specializations[fn.opset].operations:
        if not op.type.startswith("const"):
            continue
        values = list(op.attributes.items()) + [(name, arg.value) for name, binding in op.inputs.items()
                                                  for arg in binding.arguments if arg.HasField("value")]
        for slot, value in values:
            tensor = value.type.tensorType
            if value.WhichOneof("value") == "blobFileValue":
                data = blob(raw, value.blobFileValue.offset)
            elif op.type == "const" and slot == "val" and tensor.rank >= 1 and tensor.dataType in floats:
                data = value.immediateValue.SerializeToString()
            else:
                continue
            key = (op.outputs[0].name, slot, tensor.dataType, tuple(d.constant.size for d in tensor.dimensions),
                   hashlib.sha256(data).hexdigest())
            counts[key] += 1
            sizes[key] += len(data)
    return counts, sizes


# -- the contract Swift relies on -------------------------------------------------------------------
def test_wiring_is_what_swift_feeds(chunked):
    """Unet.swift / ManagedMLModel.swift: chunk 1 (models.first) gets the pipeline's inputs and
    must describe ``sample`` (latentSampleShape) and SDXL's ``time_ids`` (latentTimeIdShape);
    chunk 2 gets ``results.merging(inputs) { out, _ in out }`` (chunk 1's outputs over the
    inputs, chunk 1's winning); the noise is ``featureNames.first!`` of chunk 2's output."""
    _, whole, chunk1, chunk2 = chunked
    w, c1, c2 = spec_of(whole), spec_of(chunk1), spec_of(chunk2)
    w_in, w_out = features(w.description.input), features(w.description.output)
    c1_in, c1_out = features(c1.description.input), features(c1.description.output)
    c2_in, c2_out = features(c2.description.input), features(c2.description.output)
    assert set(w_in) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    assert c1_in.items() <= w_in.items() and {"sample", "time_ids"} <= set(c1_in)
    fed = {**w_in, **c1_out}  # the merged dictionary chunk 2 is predicted from
    assert c2_in and all(fed.get(name) == kind for name, kind in c2_in.items()), (c2_in, fed)
    assert set(c2_in) & set(c1_out), "chunk 2 must continue from chunk 1"
    assert c2_out == w_out and list(c2_out) == ["noise_pred"]
    assert w.specificationVersion == c1.specificationVersion == c2.specificationVersion


def test_every_weight_is_in_exactly_one_chunk(chunked):
    kind, whole, chunk1, chunk2 = chunked
    (w, w_bytes), (a, a_bytes), (b, b_bytes) = (stored_weights(p) for p in (whole, chunk1, chunk2))
    assert max(w.values()) == 1 and a + b == w  # each const of the whole: same name, dtype, shape and bytes
    assert not set(a) & set(b)
    luts = [k for k in w if k[1] in ("lut", "indices")]
    assert bool(luts) == (kind == "palettized")
    if luts:  # 4-bit: 16-entry LUTs and half a byte per index
        assert {k[1] for k in luts} == {"lut", "indices"} and all(np.prod(k[3]) == 16 for k in luts if k[1] == "lut")
    share = sum(a_bytes.values()) / sum(w_bytes.values())
    print(f"\n{kind}: chunk 1 holds {100 * share:.1f} % of {sum(w_bytes.values())} weight bytes")
    assert 0.35 <= share <= 0.65


def test_check_chunks_accepts_the_chunks(chunked):
    _, whole, chunk1, chunk2 = chunked
    assert check_chunks(whole, chunk1, chunk2) == []


def test_check_chunks_reports_broken_wiring(all_chunks, tmp_path):
    """A chunk 1 that lost one output, chunks in the wrong order, chunks of another package."""
    import coremltools as ct

    _, whole, chunk1, chunk2 = all_chunks["palettized"]
    model = ct.models.MLModel(str(chunk1), skip_model_load=True)
    spec = model.get_spec()
    dropped = spec.description.output[0].name
    del spec.description.output[0]
    fn = spec.mlProgram.functions["main"]
    fn.block_specializations[fn.opset].outputs.remove(dropped)
    broken = tmp_path / "Broken.mlpackage"
    ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(str(broken))
    problems = check_chunks(whole, broken, chunk2)
    assert len(problems) == 1 and dropped in problems[0] and "neither a chunk 1 output" in problems[0], problems
    swapped = check_chunks(whole, chunk2, chunk1)
    assert any("chunk 1 input" in p for p in swapped) and any("chunk 2 outputs" in p for p in swapped), swapped
    other = check_chunks(all_chunks["plain"][1], chunk1, chunk2)  # the palettized chunks, the float16 whole
    assert any(p.startswith("weights:") for p in other), other


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))])
    def no_weights(x):
        return mb.relu(x=mb.add(x=x, y=x))

    path = tmp_path / "NoWeights.mlpackage"
    ct.convert(no_weights, convert_to="mlprogram", skip_model_load=True).save(str(path))
    out = tmp_path / "out"
    for package, message in ((path, "no weights"), (tmp_path / "absent.mlpackage", "does not exist")):
        with pytest.raises(CoreMLError, match=message) as err:
            chunk_package(package, out, "Unet")
        assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())


@MACOS_ONLY
def test_chunk1_then_chunk2_predicts_what_the_whole_does(chunked, wholes):
    import coremltools as ct

    _, whole, chunk1, chunk2 = chunked
    inputs = wholes[1]
    feed = {n: a.astype(np.float32) for n, a in zip(inputs.names, inputs.arrays)}
    load = lambda p: ct.models.MLModel(str(p), compute_units=ct.ComputeUnit.CPU_ONLY)  # noqa: E731
    expected = load(whole).predict(feed)["noise_pred"]
    first = load(chunk1).predict(feed)
    second = load(chunk2)
    merged = {**feed, **first}  # Swift: chunk 1's outputs merged over the inputs
    got = second.predict({f.name: merged[f.name] for f in second.get_spec().description.input})["noise_pred"]
    assert got.shape == expected.shape
    # float16 tensors cross the cut as float16, while Core ML's CPU may keep them float32 inside the
    # whole: a few float16 roundings apart, not more
    got, expected = got.astype(np.float32), expected.astype(np.float32)
    assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()
