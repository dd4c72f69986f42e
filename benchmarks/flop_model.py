"""FLOPs of a UNet forward and what prefix reuse skips, counted on the meta device (no memory,
no weights): `torch.utils.flop_counter.FlopCounterMode` around one forward of the UNet at a
resolution and CFG batch, with the prefix cache's own checkpoints and execution order
(`workers.evaluation.prefix.PrefixCache`), so "resumed at layer L" costs exactly the FLOPs of
the checkpoints a real evaluation would still run."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from workers.evaluation.prefix import PrefixCache


@dataclass
class FlopModel:
    total: float  # FLOPs of one full UNet forward
    prefix: PrefixCache
    flops: dict[str, float]  # checkpoint -> FLOPs inside it

    def executed(self, changed) -> float:
        """FLOPs an evaluation changing the modules ``changed`` runs with prefix reuse."""
        skip = self.prefix.plan(changed)
        top = [n for n in skip if not any(n.startswith(o + ".") for o in skip)]
        return self.total - sum(self.flops[n] for n in top)


def flop_model(unet, resolution: int, batch: int) -> FlopModel:
    """``unet`` (any device: it is moved to meta, so pass a copy you no longer need)."""
    unet = unet.to("meta", torch.float32).eval()
    cfg = unet.config
    h = resolution // 8
    sample = torch.empty(batch, cfg.in_channels, h, h, device="meta")
    text = torch.empty(batch, 77, cfg.cross_attention_dim, device="meta")
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, device="meta"),
                                       "time_ids": torch.empty(batch, 6, device="meta")}
    prefix = PrefixCache(unet, reuse=True)
    counter = FlopCounterMode(display=False)
    at_start: dict[str, float] = {}
    flops: dict[str, float] = {}
    handles = []

    def pre(name):
        def hook(*_):
            at_start.setdefault(name, counter.get_total_flops())
        return hook

    def post(name):
        def hook(*_):
            flops[name] = counter.get_total_flops() - at_start[name]
        return hook

    for name, module in prefix.modules.items():
        handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    prefix.before_call(0)
    with torch.no_grad(), counter, prefix.ordering(), prefix.recording():
        unet(sample, torch.full((batch,), 999, device="meta"), encoder_hidden_states=text, **kwargs)
    for handle in handles:
        handle.remove()
    return FlopModel(float(counter.get_total_flops()), prefix, {k: float(v) for k, v in flops.items()})
