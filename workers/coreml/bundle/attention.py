"""Attention on Neural-Engine-layout (B, C, 1, S) tensors: Apple's three implementations.

``split-einsum`` (Apple's default, for the Neural Engine) computes each head with its own einsums;
``split-einsum-v2`` also processes the queries in chunks; ``original`` runs all heads at once
(the GPU's form). Kept apart from ``neural_engine`` (the layers) because the SD3 rewrite and the
tests use it on its own. Heads and chunks are split on activations, never on weights.
"""
from __future__ import annotations

import torch

from workers.coreml.common import CoreMLError

QUERY_CHUNK = 512  # split-einsum-v2: queries per chunk (Apple's CHUNK_SIZE)


# -- attention on (B, C, 1, S) tensors --------------------------------------------------------
def _split_einsum(q, k, v, heads: int, scale: float, chunk: int | None = None):
    """Per head: scores (B, Sk, 1, Sq) = einsum over the head's channels, softmax over keys,
    weighted sum of values; heads concatenated on the channel axis. With ``chunk``, queries
    are processed ``chunk`` at a time (v2; the last chunk takes the remainder)."""
    n = q.shape[3]
    queries = [q] if not chunk or n < chunk else q.split(chunk, dim=3)  # the last chunk takes the remainder
    # one split op per tensor (not a slice per head): fewer ops, the same values
    mh_q = [c.chunk(heads, dim=1) for c in queries]  # chunks x heads x (B, d, 1, Sq_chunk)
    mh_k = k.transpose(1, 3).chunk(heads, dim=3)  # heads x (B, Sk, 1, d)
    mh_v = v.chunk(heads, dim=1)  # heads x (B, d, 1, Sk)
    outs = []
    for h in range(heads):
        parts = []
        for qc in mh_q:
            w = torch.einsum("bchq,bkhc->bkhq", qc[h], mh_k[h]) * scale
            parts.append(torch.einsum("bkhq,bchk->bchq", w.softmax(dim=1), mh_v[h]))
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=3))
    return torch.cat(outs, dim=1)


def _original(q, k, v, heads: int, scale: float):
    """All heads at once (B, heads, d, S): the GPU-friendly form."""
    b, c = q.shape[:2]
    d = c // heads
    qh, kh, vh = (t.reshape(b, heads, d, -1) for t in (q, k, v))
    w = torch.einsum("bhcq,bhck->bhqk", qh, kh) * scale
    return torch.einsum("bhqk,bhck->bhcq", w.softmax(dim=3), vh).reshape(b, c, 1, -1)


def attend(q, k, v, heads: int, scale: float, impl: str):
    """Scaled dot-product attention of (B, C, 1, Sq) queries on (B, C, 1, Sk) keys/values."""
    if impl == "split-einsum":
        return _split_einsum(q, k, v, heads, scale)
    if impl == "split-einsum-v2":
        return _split_einsum(q, k, v, heads, scale, QUERY_CHUNK)
    if impl == "original":
        return _original(q, k, v, heads, scale)
    raise CoreMLError(f"unknown attention implementation {impl!r}")
