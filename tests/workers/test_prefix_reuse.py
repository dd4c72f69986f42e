"""Prefix reuse (issue 11): resuming the UNet forward from the reference run's cached
activations gives exactly the full forward's output, value by value, on both tiny models."""
from __future__ import annotations

import pytest
import torch

from workers.evaluation.evaluator import Evaluator
from workers.evaluation.items import WorkItem
from workers.evaluation.prefix import checkpoint_names
from workers.evaluation.signal import SignalSpec
from workers.palettize import kmeans_palette


def _pair(spec, signal, **kw):
    on = Evaluator(spec, signal, device="cpu", min_size=spec.default_min_size, prefix_reuse=True, **kw)
    off = Evaluator(spec, signal, device="cpu", min_size=spec.default_min_size, prefix_reuse=False, **kw)
    return on, off


def _output(ev, item, palettes):
    with ev._patched(item, palettes):
        return ev.runner.run()


def _items(layers, bits=4):
    step = max(1, len(layers) // 6)
    picked = sorted(set(layers[::step]) | {layers[0], layers[-1]}, key=layers.index)
    items = [WorkItem(f"isolated/{bits}/{l}", "isolated", bits=bits, layer=l, assignment=((l, bits),)) for l in picked]
    for pos in (1, len(layers) // 3, len(layers)):  # cumulative prefixes in an order ending late
        chosen = layers[-pos:]
        items.append(WorkItem(f"cumulative/{bits}/{pos}", "cumulative", bits=bits, layer=chosen[-1], position=pos,
                              assignment=tuple((l, bits) for l in chosen)))
    return items


@pytest.mark.parametrize("model,signal", [
    ("tiny_sdxl_spec", SignalSpec(prompts=("a cat", "a dog on a beach"))),
    ("tiny_sd_spec", SignalSpec(prompts=("a cat", "a dog", "a red house"), batch_size=2, steps=2)),
])
def test_prefix_reuse_is_bit_identical(model, signal, request):
    spec = request.getfixturevalue(model)
    on, off = _pair(spec, signal)
    assert on.deterministic and torch.equal(on.reference, off.reference)
    layers = list(on.modules)
    pals = {(l, 4): kmeans_palette(on.modules[l].weight.data.to(torch.float16).numpy(), 4) for l in layers}
    skipped = []
    for item in _items(layers):
        with on._patched(item, pals):
            skipped.append(len(on.prefix.skip))
            got = on.runner.run()
        assert torch.equal(got, _output(off, item, pals)), item.key
        assert on.evaluate(item, pals).per_prompt == off.evaluate(item, pals).per_prompt
    assert max(skipped) > 0  # late layers really resumed mid-way
    # the weights went back exactly: the reference is reproduced afterwards
    assert torch.equal(on.runner.run(), on.reference)
    for name in ("original", "linear_8bit"):
        item = WorkItem(f"baseline/{name}", "baseline", name=name, linear8=name == "linear_8bit")
        assert on.evaluate(item).per_prompt == off.evaluate(item).per_prompt


def test_plan_resumes_at_first_changed_module(tiny_sdxl_spec):
    on = Evaluator(tiny_sdxl_spec, SignalSpec(prompts=("a cat",)), device="cpu",
                   min_size=tiny_sdxl_spec.default_min_size)
    names = checkpoint_names(on.pipe.unet)
    assert "down_blocks.0" in names and "mid_block" in names and "up_blocks.0.attentions.0" in names
    assert any(".transformer_blocks.0" in n for n in names)
    up = next(l for l in on.modules if l.startswith("up_blocks.1"))
    skip = on.prefix.plan([up])
    assert {"down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0"} <= skip
    assert "up_blocks.1" not in skip and "conv_out" not in skip
    first = next(iter(on.modules))
    assert not any(n.startswith(("down_blocks.0.", "mid_block", "up_blocks")) for n in on.prefix.plan([first]))
    # the earliest of several changed modules decides
    assert on.prefix.plan([up, first]) == on.prefix.plan([first])


def test_compiled_blocks_match_eager(tiny_sdxl_spec, monkeypatch):
    """--compile: blocks through torch.compile (the 'eager' backend here: the plumbing, guards and
    in-place swaps without a C++ toolchain) give the same numbers and never recompile."""
    import workers.evaluation.prefix as prefix_mod

    monkeypatch.setattr(prefix_mod, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    before = counters["stats"].get("unique_graphs", 0)
    signal = SignalSpec(prompts=("a cat",))
    comp = Evaluator(tiny_sdxl_spec, signal, device="cpu", min_size=tiny_sdxl_spec.default_min_size, compile=True)
    plain = Evaluator(tiny_sdxl_spec, signal, device="cpu", min_size=tiny_sdxl_spec.default_min_size,
                      prefix_reuse=False)
    assert torch.equal(comp.reference, plain.reference)
    layers = list(comp.modules)
    pals = {(l, b): kmeans_palette(comp.modules[l].weight.data.to(torch.float16).numpy(), b)
            for l in layers[:3] for b in (2, 4)}
    compiled = counters["stats"].get("unique_graphs", 0)
    assert compiled > before  # the reference run compiled the blocks
    for bits in (2, 4):  # other values swapped into the same tensors: guards hold, nothing recompiles
        for item in _items(layers[:3], bits=bits):
            assert torch.equal(_output(comp, item, pals), _output(plain, item, pals)), item.key
    assert counters["stats"].get("unique_graphs", 0) == compiled, "a block recompiled after a weight swap"
    torch._dynamo.reset()


@pytest.mark.parametrize("name,steps", [("tiny-sd3", 2), ("tiny-flux", 2), ("tiny-pixart", 2),
                                        ("tiny-sdxl-refiner", 4)])
def test_prefix_reuse_is_bit_identical_on_every_family(name, steps, model_cache):
    """The same replay on transformer denoisers (checkpoints `transformer_blocks.k`) and on the
    image-to-image refiner: every output equal, value for value, to the full forward."""
    from tests.reference.local_images import image_bytes
    from workers.models import resolve_model

    spec = resolve_model(name, model_cache)
    images = image_bytes(2) if spec.img2img else ()
    # the family's search size (64 px), not the pipeline's default (1024 px for Flux: 4,096 image
    # tokens, 60 s of attention for the same replay)
    signal = SignalSpec(prompts=("a cat", "a dog on a beach"), steps=steps, images=images,
                        resolution=spec.default_resolution)
    on, off = _pair(spec, signal)
    assert on.deterministic and torch.equal(on.reference, off.reference)
    if spec.denoiser == "transformer":
        assert any(n.endswith("transformer_blocks.0") for n in checkpoint_names(on.denoiser))
    layers = list(on.modules)
    pals = {(l, 4): kmeans_palette(on.modules[l].weight.data.to(torch.float16).numpy(), 4) for l in layers}
    skipped = []
    for item in _items(layers):
        with on._patched(item, pals):
            skipped.append(len(on.prefix.skip))
            got = on.runner.run()
        assert torch.equal(got, _output(off, item, pals)), item.key
    assert max(skipped) > 0
    assert torch.equal(on.runner.run(), on.reference)
