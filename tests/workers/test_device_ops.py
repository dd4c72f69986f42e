"""Issue 11: the histogram and linear_8bit computed with torch on the device equal their numpy
definitions bit for bit, and palettes from an evaluator's histogram (what the CPU palette tasks
fit) equal the in-actor fit, digest for digest."""
from __future__ import annotations

import numpy as np
import torch

from workers.evaluation.device_ops import fake_int8_per_tensor_torch, histogram_torch
from workers.evaluation.evaluator import Evaluator
from workers.evaluation.items import WorkItem
from workers.evaluation.protocol import fake_int8_per_tensor
from workers.evaluation.signal import SignalSpec
from workers.palettize import PaletteError, fp16_histogram, kmeans_palette, palette_from_histogram


def _samples():
    rng = np.random.default_rng(3)
    for i in range(60):
        scale = 10 ** rng.uniform(-4, 1)
        w = (rng.standard_normal(int(rng.integers(1, 3000))) * scale).astype(np.float16)
        yield np.abs(w) if i % 5 == 0 else -np.abs(w) if i % 7 == 0 else w
    yield np.zeros(10, np.float16)
    yield np.array([-0.0, 0.0, 1.0], np.float16)


def test_linear8_and_histogram_match_numpy():
    for w in _samples():
        got = fake_int8_per_tensor_torch(torch.from_numpy(w)).numpy()
        assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), fake_int8_per_tensor(w).view(np.uint16))
        assert np.array_equal(histogram_torch(torch.from_numpy(w)), fp16_histogram(w))


def test_palette_from_histogram_equals_kmeans_palette():
    w = (np.random.default_rng(0).standard_normal(20_000) * 0.05).astype(np.float16)
    w[:7] = -0.0
    for bits in (1, 2, 4):
        assert palette_from_histogram(histogram_torch(torch.from_numpy(w)), bits).digest == kmeans_palette(w, bits).digest
    try:
        palette_from_histogram(np.zeros(1 << 16, np.int64), 2)
    except PaletteError:
        pass
    else:
        raise AssertionError("an empty histogram must be refused")


def test_evaluator_histograms_give_the_in_actor_palettes(tiny_sdxl_spec):
    ev = Evaluator(tiny_sdxl_spec, SignalSpec(prompts=("a cat",)), device="cpu",
                   min_size=tiny_sdxl_spec.default_min_size, prefix_reuse=False)
    layers = list(ev.modules)
    for layer in layers[:: max(1, len(layers) // 5)]:
        counts = ev.histogram(WorkItem(f"histogram/{layer}", "palette", layer=layer))
        for bits in (2, 4):
            in_actor = ev.fit_palette(WorkItem(f"palette/{bits}/{layer}", "palette", bits=bits, layer=layer)).palette
            assert palette_from_histogram(counts, bits).digest == in_actor.digest
    # linear_8bit on the device: the same weights as Apple's numpy per-tensor int8
    modules = dict(ev.pipe.unet.named_modules())
    for name in ("conv_in", layers[0], layers[-1]):
        w16 = modules[name].weight.data.to(torch.float16)
        assert np.array_equal(fake_int8_per_tensor_torch(w16).numpy().view(np.uint16),
                              fake_int8_per_tensor(w16.numpy()).view(np.uint16))
