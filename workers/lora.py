"""LoRAs fused into a single-file checkpoint's weights before it is searched (``--lora FILE[:SCALE]``).

The file is read by diffusers' own LoRA reader (``lora_state_dict``: kohya / A1111 ``lora_unet_*``
names, SGM block numbers of SDXL LoRAs, and diffusers / PEFT names), so every format diffusers
loads is read the same way here. Fusing is done here, without PEFT: for each adapted layer
``W += scale * (alpha / rank) * up @ down`` (alpha = rank when the file has none, as diffusers),
computed in float32 and stored in the weight's dtype, on the modules before they are saved. A LoRA
whose layers are not in the model, or do not fit their shapes (a LoRA for another family), is one
ModelError line.
"""
from __future__ import annotations

from pathlib import Path

from common.errors import typed_line
from workers.model_spec import ModelError

# (down, up) suffixes of the names lora_state_dict returns: PEFT, diffusers, kohya converted (attention
# processors, text encoder linear layers), raw kohya
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"), ("_lora.down.weight", "_lora.up.weight"),
          (".lora_down.weight", ".lora_up.weight"))
_ATTN = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
         "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLPipeline"}


def parse_lora(text: str) -> tuple[Path, float]:
    """'FILE[:SCALE]' -> (path, scale); scale 1.0 by default. A missing file is one ConfigError-like line."""
    text = str(text).strip()
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = text
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ModelError(f"--lora '{text}': the scale must be a finite number")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"--lora '{text}': no such file")
    if p.suffix.lower() not in (".safetensors", ".bin"):
        raise ModelError(f"--lora '{text}': LoRAs are read from .safetensors (or diffusers' .bin) files")
    return p.resolve(), scale


def lora_layers(path: Path, family: str, unet_config=None) -> dict[tuple[str, str], tuple]:
    """``{(component, module name): (down, up, alpha or None)}`` of a LoRA file, in diffusers names."""
    import diffusers

    cls = getattr(diffusers, _PIPELINES.get(family, "StableDiffusionPipeline"))
    try:
        state, alphas = cls.lora_state_dict(str(path), unet_config=unet_config)
    except Exception as exc:
        raise ModelError(f"LoRA '{path.name}' cannot be read ({typed_line(exc, 160)})") from None
    alphas = dict(alphas or {})
    alphas.update({k: v for k, v in state.items() if k.endswith(".alpha")})
    layers = {}
    for key, down in state.items():
        pair = next((p for p in _PAIRS if key.endswith(p[0])), None)
        if pair is None:
            continue
        base = key[:-len(pair[0])]
        up = state.get(base + pair[1])
        if up is None:
            raise ModelError(f"LoRA '{path.name}': {base} has a down weight but no up weight")
        alpha = alphas.get(base + ".alpha", alphas.get(key + ".alpha"))
        component, _, module = base.partition(".")
        head, _, last = module.rpartition(".")
        if last in _ATTN["unet"] and pair[0] == "_lora.down.weight":  # attention processors' names
            head = head.removesuffix(".processor")
            module = f"{head}.{_ATTN['unet' if component == 'unet' else 'text'][last]}"
        layers[(component, module)] = (down, up, float(alpha) if alpha is not None else None)
    if not layers:
        raise ModelError(f"LoRA '{path.name}' has no LoRA weights in a format diffusers reads (kohya, A1111, "
                         "diffusers/PEFT)")
    return layers


def _find(model, name: str):
    """The module ``name`` of ``model`` (text encoders: with or without the text_model. wrapper)."""
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def fuse_loras(modules: dict, specs: list[tuple[Path, float]], family: str) -> None:
    """Fuse every LoRA of ``specs`` ((path, scale)) into ``modules`` ({component: torch module}) in place."""
    import torch

    unet_config = getattr(modules.get("unet"), "config", None)
    for path, scale in specs:
        layers = lora_layers(path, family, unet_config)
        misfits = []
        plan = []
        for (component, name), (down, up, alpha) in layers.items():
            target = _find(modules[component], name) if component in modules else None
            weight = getattr(target, "weight", None)
            rank = down.shape[0]
            if weight is None or up.shape[0] != weight.shape[0] or up.shape[1] != rank or \
                    up.shape[0] * down[0].numel() != weight.numel():
                misfits.append(f"{component}.{name}")
                continue
            plan.append((weight, down, up, scale * (alpha / rank if alpha is not None else 1.0)))
        if misfits:
            raise ModelError(f"LoRA '{path.name}' does not fit this {family} checkpoint: {len(misfits)} of its "
                             f"{len(layers)} layers are not in it or have other shapes (e.g. {misfits[0]})")
        with torch.no_grad():
            for weight, down, up, factor in plan:
                delta = up.flatten(1).float() @ down.flatten(1).float()
                weight.copy_(weight.float() + factor * delta.reshape(weight.shape))  # rounded to its dtype


__all__ = ["fuse_loras", "lora_layers", "parse_lora"]
