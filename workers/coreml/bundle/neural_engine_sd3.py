"""SD3's MMDiT (diffusers' SD3Transformer2DModel) in the Neural-Engine layout, same weights.

Apple converts SD3 through DiffusionKit's own MMDiT; Swift's ``MultiModalDiffusionTransformer``
feeds it ``latent_image_embeddings`` (B, C, H, W), ``timestep`` (B) (sigma x 1000, as diffusers),
``token_level_text_embeddings`` (B, joint_attention_dim, 1, 154) and ``pooled_text_embeddings``
(B, pooled_projection_dim, 1, 1). Here the diffusers modules are rebuilt on (B, C, 1, S) tensors
with the pieces of ``neural_engine`` (1x1 convolutions holding the Linear weights as they are,
channel layer norms, split-einsum joint attention), so every diffusers weight stays one const.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from workers.coreml.bundle.neural_engine import (ANEAttention, ANEFeedForward, channel_norm, conv_from_linear,
                                                 replace_linears)
from workers.coreml.common import CoreMLError


def _layer_norm_eps(norm: nn.Module) -> float:
    if not isinstance(norm, nn.LayerNorm) or norm.weight is not None:
        raise CoreMLError(f"SD3 norm {type(norm).__name__} is not supported (expected a LayerNorm without affine)")
    return norm.eps


class ANEAdaNormZero(nn.Module):
    """AdaLayerNormZero (6 modulations) or SD3.5's SD35AdaLayerNormZeroX (9): the conditioning's
    projection as a 1x1 convolution on (B, D, 1, 1), the modulations chunked from its output."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        if getattr(norm, "emb", None) is not None:
            raise CoreMLError("AdaLayerNormZero with its own label embedding is not supported")
        self.linear, self.eps = conv_from_linear(norm.linear), _layer_norm_eps(norm.norm)
        self.chunks = norm.linear.out_features // norm.linear.in_features

    def forward(self, x, temb):
        mods = self.linear(F.silu(temb)).chunk(self.chunks, dim=1)
        normed = channel_norm(x, self.eps)
        out = [normed * (1 + mods[1]) + mods[0], mods[2], mods[3], mods[4], mods[5]]
        if self.chunks == 9:
            out += [normed * (1 + mods[7]) + mods[6], mods[8]]
        return out


class ANEAdaNormContinuous(nn.Module):
    """AdaLayerNormContinuous (scale first, then shift) over the channel axis."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        if not isinstance(norm.norm, nn.LayerNorm):
            raise CoreMLError(f"AdaLayerNormContinuous with {type(norm.norm).__name__} is not supported")
        self.linear, self.norm = conv_from_linear(norm.linear), norm.norm

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return channel_norm(x, self.norm.eps, self.norm.weight, self.norm.bias) * (1 + scale) + shift


class ANEJointBlock(nn.Module):
    """diffusers' JointTransformerBlock: image and text streams modulated by the conditioning,
    one joint attention over both, gated residuals, feed-forwards (none for the text stream of
    the last block)."""

    def __init__(self, block: nn.Module, impl: str):
        super().__init__()
        self.pre_only, self.dual = block.context_pre_only, block.use_dual_attention
        self.norm1 = ANEAdaNormZero(block.norm1)
        self.norm1_context = (ANEAdaNormContinuous(block.norm1_context) if self.pre_only
                              else ANEAdaNormZero(block.norm1_context))
        self.attn = ANEAttention(block.attn, impl)
        self.attn2 = ANEAttention(block.attn2, impl) if self.dual else None
        self.eps2, self.ff = _layer_norm_eps(block.norm2), ANEFeedForward(block.ff)
        if not self.pre_only:
            self.eps2_context, self.ff_context = _layer_norm_eps(block.norm2_context), ANEFeedForward(block.ff_context)

    def forward(self, x, c, temb):
        mods = self.norm1(x, temb)
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:5]
        if self.pre_only:
            nc = self.norm1_context(c, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
        attn_x, attn_c = self.attn(nx, nc)
        x = x + gate_msa * attn_x
        if self.dual:
            x = x + mods[6] * self.attn2(mods[5])
        x = x + gate_mlp * self.ff(channel_norm(x, self.eps2) * (1 + scale_mlp) + shift_mlp)
        if self.pre_only:
            return None, x
        c = c + c_gate_msa * attn_c
        c = c + c_gate_mlp * self.ff_context(channel_norm(c, self.eps2_context) * (1 + c_scale_mlp) + c_shift_mlp)
        return c, x


class ANESD3Transformer(nn.Module):
    """SD3Transformer2DModel on Apple's inputs; returns the prediction (B, C_out, H, W)."""

    def __init__(self, transformer: nn.Module, impl: str):
        super().__init__()
        t = copy.deepcopy(transformer).to("cpu", torch.float32).eval()
        for p in t.parameters():
            p.requires_grad_(False)
        pe = t.pos_embed
        if pe.layer_norm or not pe.flatten or pe.pos_embed is None or not pe.pos_embed_max_size:
            raise CoreMLError("SD3 patch embedding without cropped positional embeddings is not supported")
        self.patch, self.out_channels, self.dim = t.config.patch_size, t.out_channels, t.inner_dim
        self.pos_embed = pe  # its conv (kept) and cropped_pos_embed
        self.time_text_embed = replace_linears(t.time_text_embed)
        self.context_embedder = conv_from_linear(t.context_embedder)
        self.blocks = nn.ModuleList(ANEJointBlock(b, impl) for b in t.transformer_blocks)
        self.norm_out, self.proj_out = ANEAdaNormContinuous(t.norm_out), conv_from_linear(t.proj_out)

    def forward(self, latent, timestep, tokens, pooled):
        b, _, height, width = latent.shape
        x = self.pos_embed.proj(latent)  # (B, D, h, w)
        h, w = x.shape[2:]
        pos = self.pos_embed.cropped_pos_embed(height, width)  # (1, h*w, D), row-major like the pixels
        x = x.reshape(b, self.dim, 1, h * w) + pos.transpose(1, 2).unsqueeze(2)
        temb = self.time_text_embed(timestep, pooled.reshape(b, -1)).reshape(b, self.dim, 1, 1)
        c = self.context_embedder(tokens)
        for block in self.blocks:
            c, x = block(x, c, temb)
        x = self.proj_out(self.norm_out(x, temb))  # (B, p*p*C, 1, h*w), channels ordered (p, q, C)
        p = self.patch
        x = x.reshape(b, p, p, self.out_channels, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, self.out_channels, h * p, w * p)
