"""Issue 35: Apple's k-means for tensors under 10,000 elements. Apple's script calls coremltools'
``_get_kmeans_lookup_table_and_weight(nbits, fp16)``, which sends those to scikit-learn's
heuristic k-means; under Apple's protocol the search must palettize them to the very values that
call gives (the reference here: coremltools' own function, called as `apple_serial` calls it),
and keep the exact kmeans1d for larger tensors, grouped formats and the classic protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference.apple_serial import kmeans_palettize_array
from workers.palette_formats import fit_palette, palette_from_histograms, palette_from_sample
from workers.palettize import fp16_histogram, kmeans_palette


def _weights(n: int, seed: int = 0, shape=None) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal(n) * 0.05).astype(np.float16)
    w[:3] = -0.0
    return w.reshape(shape or (n,))


def _apple(w: np.ndarray, nbits: int) -> np.ndarray:
    """The weight as Apple's fake_palettize leaves it (coremltools' own call)."""
    lut, idx, forced = kmeans_palettize_array(w, nbits)
    assert not forced  # scikit-learn is installed: the call itself ran
    return lut[idx].reshape(w.shape)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("n,shape", [(9216, (64, 16, 3, 3)), (4096, (64, 64)), (1152, (4, 32, 3, 3)), (200, None)])
@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_small_tensor_takes_apples_call_value_for_value(n, shape, nbits):
    w = _weights(n, n + nbits, shape)
    pal = fit_palette(w, nbits, apple=True)
    assert _same(pal.dequantize(w), _apple(w, nbits))
    assert np.all(np.diff(pal.lut.astype(np.float64)) >= 0)  # a Palette: ascending LUT, indices renumbered
    assert np.array_equal(pal.lut[pal.indices(w)], pal.dequantize(w))
    exact = np.mean((kmeans_palette(w, nbits).dequantize(w).astype(np.float64) - w) ** 2)
    mse = np.mean((pal.dequantize(w).astype(np.float64) - w) ** 2)
    assert pal.weight_mse == pytest.approx(mse, rel=1e-9) and mse >= exact * (1 - 1e-9)  # kmeans1d is optimal


def test_the_heuristic_differs_from_kmeans1d_where_the_rule_applies():
    """Why the rule matters: scikit-learn's clusters are not kmeans1d's for a 9,216-element layer."""
    w = _weights(9216, 7, (64, 16, 3, 3))
    differs = [b for b in (2, 4, 8) if not _same(kmeans_palette(w, b).dequantize(w), _apple(w, b))]
    assert differs == [2, 4, 8]
    assert all(_same(fit_palette(w, b).dequantize(w), kmeans_palette(w, b).dequantize(w)) for b in differs)


def test_large_tensors_grouped_formats_and_classic_keep_kmeans1d():
    big = _weights(10_000, 1, (100, 100))  # coremltools: kmeans1d from 10,000 elements on
    for b in (2, 4):
        assert fit_palette(big, b, apple=True) == kmeans_palette(big, b)
        assert _same(fit_palette(big, b, apple=True).dequantize(big), _apple(big, b))
    small = _weights(2048, 2, (64, 32))
    grouped = fit_palette(small, "4g16", apple=True)  # the optimal strategy's own format: exact per group
    rows = small.reshape(4, -1)
    assert [g.digest for g in grouped.groups] == [kmeans_palette(r, 4).digest for r in rows]
    assert fit_palette(small, 4) == kmeans_palette(small, 4)  # classic protocol


def test_cpu_task_input_dispatch():
    """What the CPU palette tasks receive: the fp16 weight itself (Apple's small tensors) or counts."""
    w = _weights(4096, 3, (64, 64))
    assert _same(palette_from_sample(w, 4).dequantize(w), _apple(w, 4))
    counts = fp16_histogram(w)
    assert palette_from_sample(counts, 4) == palette_from_histograms(counts, 4) == kmeans_palette(w, 4)


def test_evaluator_sends_small_weights_under_apples_protocol(tiny_sdxl_spec):
    """An evaluator at --min-size 9000 (Apple's protocol): the 9,216-element candidates come back
    as their float16 weights, their palettes give Apple's values, in the actor and from the CPU
    task alike; the large candidates still come back as histograms."""
    from workers.evaluation.evaluator import Evaluator
    from workers.evaluation.items import WorkItem
    from workers.evaluation.signal import SignalSpec

    ev = Evaluator(tiny_sdxl_spec, SignalSpec(prompts=("a cat",)), device="cpu", min_size=9000, prefix_reuse=False)
    sizes = {layer: m.weight.numel() for layer, m in ev.modules.items()}
    small = [layer for layer, n in sizes.items() if n < 10_000]
    large = next(layer for layer, n in sizes.items() if n >= 10_000)
    assert len(small) == 8 and all(sizes[layer] == 9216 for layer in small)
    for layer in small[:2] + [large]:
        w16 = ev.modules[layer].weight.data.to(torch.float16).numpy()
        sample = ev.histogram(WorkItem(f"histogram/{layer}", "palette", layer=layer))
        assert sample.dtype == (np.float16 if layer in small else np.int64)
        for bits in (2, 8):
            task = palette_from_sample(sample, bits)
            in_actor = ev.fit_palette(WorkItem(f"palette/{bits}/{layer}", "palette", bits=bits, layer=layer)).palette
            assert task == in_actor and _same(task.dequantize(w16), _apple(w16, bits)), (layer, bits)
