"""Floor probes at two magnitudes: the evaluator moves every float16 weight of the probed layer by
exactly 1 or 4 ulps with the same signs, and on bit-exact float32 arithmetic the response is
linear (16x power, 12.04 dB), which is what lets ``noise_model.floor_noise`` find no floor there."""
from __future__ import annotations

import math

import numpy as np
import torch

from search.recipes.noise_model import floor_noise
from workers.evaluation.evaluator import Evaluator
from workers.evaluation.items import WorkItem
from workers.evaluation.signal import SignalSpec


def _f16(module):
    return module.weight.data.to(torch.float16)


def test_probes_move_each_weight_by_one_or_four_ulps_and_respond_linearly_in_float32(tiny_sdxl_spec):
    ev = Evaluator(tiny_sdxl_spec, SignalSpec(prompts=("a cat", "a dog on a beach")), device="cpu",
                   min_size=tiny_sdxl_spec.default_min_size)
    layer = list(ev.modules)[len(ev.modules) // 2]
    before = _f16(ev.modules[layer]).clone()
    one = (before.view(torch.int16) ^ 1).view(torch.float16)  # reference: lowest mantissa bit flipped
    results = {}
    for ulps in (1, 4):
        item = WorkItem(f"floor/{layer}" + (f"/x{ulps}" if ulps != 1 else ""), "floor", layer=layer,
                        position=ulps if ulps != 1 else None)
        with ev._patched(item, {}):
            moved = _f16(ev.modules[layer]).float() - before.float()
        exact = moved == ulps * (one.float() - before.float())
        assert exact.float().mean() > 0.999, exact.float().mean()  # all but binade edges, exactly
        results[ulps] = ev.evaluate(item)
        assert torch.equal(_f16(ev.modules[layer]), before)  # restored
    gap = np.array(results[1].per_prompt) - np.array(results[4].per_prompt)
    # 16x power: a linear response (within the 0.1 dB rounding of both and float32's own floor, ~150 dB)
    assert np.allclose(gap, 10 * math.log10(16), atol=0.3), gap
    p1 = 10 ** (-np.array(results[1].per_prompt) / 10)
    # what is taken out is at least 10 dB below the 1-ulp probe (float32's own floor and the 0.1 dB rounding)
    assert np.all(floor_noise({u: [r.per_prompt] for u, r in results.items()}) <= 0.1 * p1)
