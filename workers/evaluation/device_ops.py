"""Weight transforms computed with torch on the weights' own device (GPU), equal bit for bit to
their numpy definitions: the fp16 bit-pattern histogram the palettes are fitted on
(`workers.palettize.fp16_histogram`) and Apple's per-tensor int8 ``linear_8bit``
(`workers.evaluation.protocol.fake_int8_per_tensor`); and the floor probes' weights."""
from __future__ import annotations

import numpy as np
import torch


def histogram_torch(weight: torch.Tensor, groups: int | None = None) -> np.ndarray:
    """Counts of the 65,536 fp16 bit patterns of ``weight`` (rounded to fp16 first), computed
    with ``torch.bincount`` where the weight is; int64 numpy, as `fp16_histogram` returns.
    ``groups``: one row of counts per group of output channels (axis 0 split evenly; shape
    (groups, 65536)), in one bincount over offset patterns."""
    if groups is None:
        w16 = weight.detach().to(torch.float16).reshape(-1)
        idx = w16.view(torch.int16).to(torch.int32) & 0xFFFF
        return torch.bincount(idx, minlength=1 << 16).to("cpu", torch.int64).numpy()
    w16 = weight.detach().to(torch.float16).contiguous().reshape(groups, -1)
    offset = torch.arange(groups, device=w16.device, dtype=torch.int64)[:, None] << 16
    idx = (w16.view(torch.int16).to(torch.int64) & 0xFFFF) + offset
    counts = torch.bincount(idx.reshape(-1), minlength=groups << 16)
    return counts.reshape(groups, 1 << 16).to("cpu", torch.int64).numpy()


def fake_int8_per_tensor_torch(weight: torch.Tensor) -> torch.Tensor:
    """`fake_int8_per_tensor` with torch ops in the weight's dtype (fp16 in a search).

    Every step is one elementwise op rounded to the dtype, as numpy's float16 arithmetic is
    (computed in float32, rounded to half; for +, -, *, / float32 is wide enough that the result
    is the correctly rounded half either way), ``torch.round`` rounds half to even like
    ``np.round``, and min/max are exact, so the result equals the numpy version bit for bit.
    """
    val = weight.detach()
    zero_t = torch.zeros((), dtype=val.dtype, device=val.device)
    lo = torch.minimum(zero_t, val.min())
    hi = torch.maximum(zero_t, val.max())
    if bool(hi == lo):
        return val.clone()
    qmin, qmax = -128, 127
    span = hi - lo
    zero = torch.clamp(torch.round((hi * qmin - lo * qmax) / span), qmin, qmax).to(torch.int8)
    scale = span / (qmax - qmin)
    q = torch.round(val * (qmax - qmin) / span) + zero.to(val.dtype)
    q = torch.clamp(q, qmin, qmax).to(torch.int8)
    return (q.to(val.dtype) - zero.to(val.dtype)) * scale


def floor_probe_weight(weight: torch.Tensor, ulps: int = 1) -> torch.Tensor:
    """A floor probe's float16 weight: every element moved by ``ulps`` float16 ulps, the direction
    set by its lowest mantissa bit (flipping that bit is the 1-ulp move). Probes of 1 and 4 ulps
    share their signs, so a linear response grows exactly 16x in power between them."""
    w16 = weight.to(torch.float16)
    one = (w16.view(torch.int16) ^ 1).view(torch.float16)
    if ulps == 1:
        return one
    return (w16.float() + ulps * (one.float() - w16.float())).to(torch.float16)
