"""A denoiser call flattened to Core ML's named inputs and rebuilt gives the call's own output.

For each tiny family (UNet and the three transformers) the first denoiser call of the search's
own pipeline run is recorded as it happened (args and kwargs, by a forward pre-hook); the
reference is the denoiser called with exactly those; `flatten_call` + `call_kwargs` (what the
Core ML conversion traces and the runtime check feeds) must give the identical tensor.
"""
from __future__ import annotations

import pytest
import torch

from workers.coreml.call_inputs import flatten_call


def first_call(name: str, model_cache):
    from search.config import SearchConfig
    from workers.evaluation.evaluator import Evaluator
    from workers.evaluation.signal import DEFAULT_PROMPTS
    from workers.models import resolve_model

    spec = resolve_model(name, model_cache)
    config = SearchConfig(nbits=(8,), min_size=spec.default_min_size, resolution=spec.default_resolution,
                          prompts=DEFAULT_PROMPTS[:1], steps=1)
    ev = Evaluator(spec, config.signal_spec(), precision=config.precision, min_size=config.min_size)
    calls = []

    def hook(_module, args, kwargs):
        if not calls:
            calls.append((args, dict(kwargs)))

    handle = ev.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ev.runner.run()
    finally:
        handle.remove()
    return ev.denoiser, calls[0]


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_flattened_call_rebuilds_the_same_output(name, model_cache):
    denoiser, (args, kwargs) = first_call(name, model_cache)
    with torch.no_grad():
        expected = denoiser(*args, **{**kwargs, "return_dict": False})[0]
        flat = flatten_call(denoiser.forward, args, kwargs)
        assert flat.names and len(flat.names) == len(set(flat.names)) == len(flat.arrays)
        assert all(a.dtype.name == "float32" and a.ndim >= 1 for a in flat.arrays)
        rebuilt = flat.call_kwargs(tuple(torch.from_numpy(a).to(expected.dtype) for a in flat.arrays))
        got = denoiser(**rebuilt, return_dict=False)[0]
    assert torch.equal(got, expected)
    if name == "tiny-sdxl":  # SDXL's added conditioning keeps the names the cached conversions use
        assert {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"} <= set(flat.names)


def test_non_tensor_arguments_are_kept_as_they_were():
    def forward(hidden_states, timestep, added_cond_kwargs=None, joint_attention_kwargs=None, return_dict=True):
        raise AssertionError("not called")

    x, t = torch.ones(2, 3), torch.tensor(5.0)
    flat = flatten_call(forward, (x,), {"timestep": t, "added_cond_kwargs": {"resolution": None, "scale": x[:, :1]},
                                        "joint_attention_kwargs": None, "return_dict": False})
    assert flat.names == ("hidden_states", "timestep", "scale")
    assert flat.arrays[1].tolist() == [5.0, 5.0]  # one step for the batch, given per sample
    kw = flat.call_kwargs(tuple(torch.from_numpy(a) for a in flat.arrays))
    assert kw["added_cond_kwargs"]["resolution"] is None and kw["joint_attention_kwargs"] is None
    assert torch.equal(kw["added_cond_kwargs"]["scale"], x[:, :1]) and "return_dict" not in kw
