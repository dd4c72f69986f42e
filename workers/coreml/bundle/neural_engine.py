"""A diffusers UNet rewritten into the Neural-Engine layout Apple's converter uses, same weights.

Apple's ``torch2coreml`` does not convert diffusers' UNet but its own rewrite (``unet.py``):
activations as (B, C, 1, S) tensors, every Linear a 1x1 convolution, layer norm over the
channel axis, attention computed per head with einsums ("split einsum", the layout the Neural
Engine runs well; ``original`` for the GPU). This module builds that layout from the diffusers
modules themselves, on a deep copy, so the result computes diffusers' function.

Why weights are never touched: the project palettizes the converted package by finding each
diffusers layer's float16 weight as ONE Core ML const with identical content. So a Linear's
weight only gets viewed (out, in) -> (out, in, 1, 1) (same bytes), and scales, splits and
concatenations are applied to activations (per-head slices of q/k/v, GEGLU's chunk), never
to weights. ``neural_engine_sd3`` does the same for SD3's MMDiT with the pieces here.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from workers.coreml.bundle.attention import attend
from workers.coreml.common import CoreMLError

# -- layers ------------------------------------------------------------------------------------
def conv_from_linear(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 convolution holding the Linear's own weight viewed (out, in, 1, 1) and its bias."""
    out_f, in_f = linear.weight.shape
    conv = nn.Conv2d(in_f, out_f, 1, bias=linear.bias is not None)
    conv.weight = nn.Parameter(linear.weight.detach().view(out_f, in_f, 1, 1), requires_grad=False)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return conv


def pointwise(module: nn.Module) -> nn.Conv2d:
    """A projection as a 1x1 convolution: Linear converted, a 1x1 Conv2d kept as it is."""
    if isinstance(module, nn.Linear):
        return conv_from_linear(module)
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1):
        return module
    raise CoreMLError(f"cannot express a {type(module).__name__} as a 1x1 convolution")


class PointwiseLinear(nn.Module):
    """A Linear applied to (..., C) vectors (time and pooled-text embeddings) as a 1x1 convolution
    on (N, C, 1, 1), as Apple's rewrite does; returns (..., out) so diffusers' code around it runs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.conv = conv_from_linear(linear)

    def forward(self, x):
        lead = x.shape[:-1]
        y = self.conv(x.reshape(-1, x.shape[-1], 1, 1))
        return y.reshape(*lead, y.shape[1])


def replace_linears(module: nn.Module) -> nn.Module:
    """Every nn.Linear left inside ``module`` (in place) becomes a PointwiseLinear."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PointwiseLinear(child))
        else:
            replace_linears(child)
    return module


def channel_norm(x, eps: float, weight=None, bias=None, rms: bool = False, dim: int = 1):
    """Layer norm (or RMS norm) over axis ``dim`` (the channel axis), affine on that axis."""
    if rms:
        x = x * torch.rsqrt(x.pow(2).mean(dim=dim, keepdim=True) + eps)
    else:
        x = x - x.mean(dim=dim, keepdim=True)
        x = x * torch.rsqrt((x * x).mean(dim=dim, keepdim=True) + eps)
    shape = [1] * x.dim()
    shape[dim] = -1
    if weight is not None:
        x = x * weight.view(shape)
    if bias is not None:
        x = x + bias.view(shape)
    return x


class ChannelLayerNorm(nn.Module):
    """diffusers' nn.LayerNorm (its own weight and bias) over the channel axis of (B, C, 1, S)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise CoreMLError(f"expected a LayerNorm over one axis, got {type(norm).__name__}")
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias

    def forward(self, x):
        return channel_norm(x, self.eps, self.weight, self.bias)


class HeadRMSNorm(nn.Module):
    """diffusers' RMSNorm of each head's query/key channels (SD3.5's qk norm) on (B, C, 1, S)."""

    def __init__(self, norm: nn.Module, heads: int, head_dim: int):
        super().__init__()
        weight = getattr(norm, "weight", None)
        if type(norm).__name__ != "RMSNorm" or (weight is not None and weight.numel() != head_dim):
            raise CoreMLError(f"query/key norm {type(norm).__name__} is not supported (only a per-head RMSNorm)")
        self.eps, self.weight, self.heads = norm.eps, norm.weight, heads
        self.bias = getattr(norm, "bias", None)

    def forward(self, x):
        b, c, _, s = x.shape
        y = channel_norm(x.reshape(b, self.heads, c // self.heads, s), self.eps, self.weight, self.bias,
                         rms=True, dim=2)
        return y.reshape(b, c, 1, s)


def _head_norm(norm, heads: int, head_dim: int):
    return None if norm is None else HeadRMSNorm(norm, heads, head_dim)


class ANEAttention(nn.Module):
    """diffusers' Attention (self, cross, or SD3's joint attention with the context's own
    projections) on (B, C, 1, S) tensors."""

    def __init__(self, attn: nn.Module, impl: str):
        super().__init__()
        for bad in ("group_norm", "spatial_norm", "norm_cross"):
            if getattr(attn, bad, None) is not None:
                raise CoreMLError(f"attention with {bad} is not supported in the Neural-Engine layout")
        if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
            raise CoreMLError("attention with a residual connection or output rescaling is not supported")
        self.impl, self.heads = impl, attn.heads
        d = attn.to_q.out_features // attn.heads
        self.scale = d ** -0.5  # what diffusers' F.scaled_dot_product_attention uses
        self.to_q, self.to_k, self.to_v = (conv_from_linear(attn.to_q), conv_from_linear(attn.to_k),
                                           conv_from_linear(attn.to_v))
        self.to_out = conv_from_linear(attn.to_out[0])
        self.norm_q, self.norm_k = _head_norm(attn.norm_q, self.heads, d), _head_norm(attn.norm_k, self.heads, d)
        self.joint = getattr(attn, "add_q_proj", None) is not None
        if self.joint:
            self.add_q, self.add_k, self.add_v = (conv_from_linear(attn.add_q_proj), conv_from_linear(attn.add_k_proj),
                                                  conv_from_linear(attn.add_v_proj))
            self.to_add_out = None if attn.to_add_out is None else conv_from_linear(attn.to_add_out)
            self.norm_added_q = _head_norm(attn.norm_added_q, self.heads, d)
            self.norm_added_k = _head_norm(attn.norm_added_k, self.heads, d)

    @staticmethod
    def _qkv(x, to_q, to_k, to_v, norm_q, norm_k, kv_source=None):
        src = x if kv_source is None else kv_source
        q, k, v = to_q(x), to_k(src), to_v(src)
        return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v

    def forward(self, x, context=None):
        if not self.joint:
            q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, context)
            return self.to_out(attend(q, k, v, self.heads, self.scale, self.impl))
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is None:  # SD3.5's second (image-only) attention
            return self.to_out(attend(q, k, v, self.heads, self.scale, self.impl))
        cq, ck, cv = self._qkv(context, self.add_q, self.add_k, self.add_v, self.norm_added_q, self.norm_added_k)
        n = x.shape[3]  # image tokens first, then the text tokens (diffusers' order)
        out = attend(torch.cat([q, cq], 3), torch.cat([k, ck], 3), torch.cat([v, cv], 3),
                     self.heads, self.scale, self.impl)
        image, text = out[..., :n], out[..., n:]
        return self.to_out(image), (None if self.to_add_out is None else self.to_add_out(text))


class ANEFeedForward(nn.Module):
    """diffusers' FeedForward (GEGLU, GELU or tanh-GELU) with 1x1 convolutions; GEGLU's two
    halves are split from the projection's output, not from its weight."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        act = ff.net[0]
        kind = type(act).__name__
        if kind not in ("GEGLU", "GELU"):
            raise CoreMLError(f"feed-forward activation {kind} is not supported in the Neural-Engine layout")
        self.gated, self.approximate = kind == "GEGLU", getattr(act, "approximate", "none")
        self.proj_in = conv_from_linear(act.proj)
        linears = [m for m in ff.net[1:] if isinstance(m, nn.Linear)]
        if len(linears) != 1:
            raise CoreMLError("feed-forward without exactly one output Linear is not supported")
        self.proj_out = conv_from_linear(linears[0])

    def forward(self, x):
        h = self.proj_in(x)
        if self.gated:
            h, gate = h.chunk(2, dim=1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.proj_out(h)


class ANEBasicTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock with layer norms (SD, SDXL): self-attention, cross-attention
    on the (B, C_ctx, 1, 77) text embeddings, feed-forward, each with its residual."""

    def __init__(self, block: nn.Module, impl: str):
        super().__init__()
        if block.norm_type != "layer_norm" or block.only_cross_attention or block.pos_embed is not None \
                or block.attn2 is None:
            raise CoreMLError(f"transformer block (norm {block.norm_type}, only_cross_attention "
                              f"{block.only_cross_attention}) is not supported in the Neural-Engine layout")
        self.norm1, self.norm2, self.norm3 = (ChannelLayerNorm(block.norm1), ChannelLayerNorm(block.norm2),
                                              ChannelLayerNorm(block.norm3))
        self.attn1, self.attn2 = ANEAttention(block.attn1, impl), ANEAttention(block.attn2, impl)
        self.ff = ANEFeedForward(block.ff)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class ANETransformer2D(nn.Module):
    """diffusers' Transformer2DModel inside a UNet: group norm, 1x1 projection in, the blocks on
    (B, C, 1, H*W) (row-major pixels: diffusers' token order), projection out, residual.
    ``encoder_hidden_states`` arrives in Apple's (B, C_ctx, 1, 77) layout."""

    def __init__(self, t: nn.Module, impl: str):
        super().__init__()
        if not getattr(t, "is_input_continuous", False):
            raise CoreMLError(f"{type(t).__name__} with patched or discrete inputs is not supported in a UNet")
        self.norm = t.norm
        self.proj_in, self.proj_out = pointwise(t.proj_in), pointwise(t.proj_out)
        self.blocks = nn.ModuleList(ANEBasicTransformerBlock(b, impl) for b in t.transformer_blocks)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, encoder_attention_mask=None,
                **_ignored):
        if attention_mask is not None or encoder_attention_mask is not None:
            raise CoreMLError("attention masks are not supported in the Neural-Engine layout")
        b, _, h, w = hidden_states.shape
        x = self.proj_in(self.norm(hidden_states))
        c = x.shape[1]
        x = x.reshape(b, c, 1, h * w)
        for block in self.blocks:
            x = block(x, encoder_hidden_states)
        return (self.proj_out(x.reshape(b, c, h, w)) + hidden_states,)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def neural_engine_unet(unet: nn.Module, impl: str) -> nn.Module:
    """A deep copy of a diffusers UNet2DConditionModel in the Neural-Engine layout: every
    Transformer2DModel rewritten, every other Linear a 1x1 convolution. Call it like the UNet,
    with ``encoder_hidden_states`` in Apple's (B, C, 1, 77) layout."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    cfg = unet.config
    if getattr(unet, "encoder_hid_proj", None) is not None or cfg.addition_embed_type not in (None, "text_time"):
        raise CoreMLError("UNets with an encoder_hid_proj or an addition embedding other than text_time have no "
                          "Core ML layout in Apple's pipeline")
    ane = copy.deepcopy(unet).to("cpu", torch.float32).eval()
    for p in ane.parameters():
        p.requires_grad_(False)
    names = [n for n, m in ane.named_modules() if isinstance(m, Transformer2DModel)]
    for name in names:
        _replace(ane, name, ANETransformer2D(ane.get_submodule(name), impl))
    replace_linears(ane)
    return ane
