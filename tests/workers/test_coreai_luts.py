"""Core AI palettized export on a small conv + linear model: the LUTs and indices put in are the
ones read back from the saved asset (bit for bit, every exportable depth, per tensor and grouped),
the Linux Core AI runtime runs it as torch does, and 3-bit is refused in one line.

The reference reader here is a serial loop over the packed bits (Core AI's sub-byte layout: LSB
first, as ``coreai.runtime.NDArray`` unpacks), written apart from ``workers.coreai.luts``'
vectorised one; LUT values come from Core AI's own attribute reader (``np.array(attr)``).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from workers import coreai

pytestmark = pytest.mark.skipif(not coreai.available(), reason=coreai.INSTALL_HINT)


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 32, 3, padding=1)
        self.lin = torch.nn.Linear(32, 16)
        self.out = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.relu(self.lin(self.conv(x).mean((2, 3)))))


def serial_unpack(blob_hex: str, nbits: int, count: int) -> list[int]:
    data = bytes.fromhex(blob_hex)[4:]  # 4-byte alignment header
    out = []
    for i in range(count):
        v = 0
        for b in range(nbits):
            bit = i * nbits + b
            v |= ((data[bit // 8] >> (bit % 8)) & 1) << b
        out.append(v)
    return out


def reference_read(asset):
    """[(shape, lut (G, n), indices)] of every lut_to_dense, read independently."""
    from coreai.authoring import AIModelAsset

    module = AIModelAsset.load(str(asset)).program._module._mlir_module
    text = module.operation.get_asm(large_elements_limit=None)
    blobs = dict(re.findall(r"(resource_\d+): \"0x([0-9A-F]+)\"", text))
    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "coreai.lut_to_dense":
                        idx_attr, lut_attr = (v.owner.attributes["value"] for v in list(child.operation.operands)[:2])
                        lut_shape = tuple(lut_attr.type.shape)
                        blob = re.search(r"dense_resource<(resource_\d+)>", str(lut_attr))
                        lut = (np.frombuffer(bytes.fromhex(blobs[blob.group(1)])[4:], dtype=np.float16).reshape(lut_shape)
                               if blob else np.array(lut_attr))
                        n = lut_shape[-2]
                        shape = tuple(child.operation.results[0].type.shape)
                        name = re.search(r"dense_resource<(resource_\d+)>", str(idx_attr))
                        if name:
                            idx = np.array(serial_unpack(blobs[name.group(1)], n.bit_length() - 1,
                                                         int(np.prod(shape))), dtype=np.uint8)
                        else:
                            idx = np.array(idx_attr).astype(np.uint8)
                        found.append((shape, lut.reshape(lut.shape[0], n), idx.reshape(shape)))
                    walk(child.operation)

    walk(module.operation)
    return found


CASES = [({"conv": "4g16", "lin": "2", "out": "8"}), ({"conv": "6", "lin": "1", "out": "4g4"})]


@pytest.mark.parametrize("formats", CASES, ids=["4g16-2-8", "6-1-4g4"])
def test_put_luts_export_read_back_and_run(formats, tmp_path):
    from common.formats import PaletteFormat
    from workers.coreai.export import to_program
    from workers.coreai.layout import Component
    from workers.coreai.luts import CoreAILut, compare_luts, put_luts, read_luts
    from workers.coreai.runtime import LoadedAsset

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Small().half().eval()
    luts = {}
    for layer, spelling in formats.items():
        fmt = PaletteFormat.of(spelling)
        w = model.get_submodule(layer).weight
        groups = w.shape[0] // fmt.group_size if fmt.grouped else 1
        lut = np.sort(rng.standard_normal((groups, 1 << fmt.bits)).astype(np.float16), axis=1)
        idx = rng.integers(0, 1 << fmt.bits, size=tuple(w.shape), dtype=np.uint8)
        luts[layer] = CoreAILut(layer, fmt, lut, idx)
    x = torch.randn(1, 4, 8, 8).half()
    put_luts(model, luts)
    for layer, e in luts.items():  # the torch weight is lut[group, index], computed here by hand
        w = model.get_submodule(layer).weight.detach().numpy()
        per = w.shape[0] // e.lut.shape[0]
        for o in range(w.shape[0]):
            assert np.array_equal(w[o].reshape(-1).view(np.uint16),
                                  e.lut[o // per][e.indices[o].reshape(-1)].view(np.uint16)), layer
    with torch.no_grad():
        expected = model(x).float().numpy()
    comp = Component("m", "M", ("x",), ("y",))
    asset = tmp_path / "M.aimodel"
    to_program(model, (x,), comp).save_asset(asset)
    assert sorted(p.name for p in asset.iterdir()) == ["main.hash", "main.mlirb", "metadata.json"]

    ref = reference_read(asset)
    assert len(ref) == len(luts)
    for e in luts.values():
        hits = [r for r in ref if r[0] == e.indices.shape and np.array_equal(r[1].view(np.uint16), e.lut.view(np.uint16))]
        assert len(hits) == 1, e.layer
        assert np.array_equal(hits[0][2], e.indices), e.layer
    # the module's own reader agrees with the serial one, value by value
    mine = sorted(read_luts(asset), key=lambda r: r[0])
    assert len(mine) == len(ref)
    for a, b in zip(mine, sorted(ref, key=lambda r: r[0])):
        assert a[0] == b[0] and np.array_equal(a[1].view(np.uint16), b[1].view(np.uint16)) and np.array_equal(a[2], b[2])
    ok, detail = compare_luts(asset, luts)
    assert ok, detail
    wrong = dict(luts)
    e = wrong["lin"]
    flipped = e.indices.copy()
    flipped.flat[0] = (int(flipped.flat[0]) + 1) % e.lut.shape[1]
    wrong["lin"] = CoreAILut("lin", e.fmt, e.lut, flipped)
    assert compare_luts(asset, wrong)[0] is False  # one index off is seen

    with LoadedAsset(asset) as loaded:
        got = loaded({"x": x.numpy()})["y"].astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)  # fp16 arithmetic, two runtimes


def test_three_bits_and_other_families_are_refused_in_one_line():
    from workers.coreai import CoreAIError
    from workers.coreai.layout import check_formats, pipeline_type

    check_formats({"a": 4, "b": "6g16", "c": 16, "d": 1, "e": 8})
    with pytest.raises(CoreAIError, match="3-bit") as info:
        check_formats({"a": 4, "b": 3, "c": "3g16"})
    assert "\n" not in str(info.value)
    assert pipeline_type("sd") == "sd" and pipeline_type("sd3") == "sd3"
    for family in ("sdxl", "pixart", "flux"):
        with pytest.raises(CoreAIError, match="no pipeline"):
            pipeline_type(family)
