"""Single-file checkpoints (``.safetensors`` / ``.ckpt`` in the original Stable Diffusion layout),
with LoRAs fused, turned once into a diffusers pipeline directory that everything downstream
treats as a local model (weights shipped through Ray, Core ML stage, bundles).

`materialize` reads the file, detects its family (`workers.family_configs`), converts the UNet and
VAE with diffusers' own single-file converters and the CLIP text encoders here (HF layout: a
prefix; OpenCLIP: the fused q/k/v split), loads every component strictly (a missing or misshapen
weight is a one-line refusal, never a silently random layer), fuses the LoRAs (`workers.lora`) and
saves the pipeline into ``<cache>/single-file/<key>``, keyed by the file's sha256, each LoRA's
sha256 and scale and the configs used: a changed file or LoRA is a new model, an unchanged one
is found again (resume) without converting twice. ``.ckpt`` files are pickles: they are read
with ``torch.load(weights_only=True)``, which refuses any pickle that needs arbitrary code.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from common.errors import typed_line
from common.files import publish_dir
from workers.family_configs import FAMILIES, detect_family, write_family_config
from workers.file_digest import file_digest
from workers.model_spec import PIPELINES, ModelError, read_json

SUFFIXES = (".safetensors", ".ckpt")
FORMAT = "2"  # bump when a materialized directory changes
MARKER = ".mbp-single-file"
_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# (checkpoint prefix of a text encoder, its layout): HF CLIP keys or OpenCLIP's text tower
_ENCODER_PREFIXES = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip")},
    "sdxl-refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", "open_clip")},
}


def is_single_file(name: str) -> bool:
    return Path(name).suffix.lower() in SUFFIXES


def read_checkpoint(path: Path, name: str) -> dict:
    """The file's tensors; a truncated or corrupt file, or a pickle needing code, is one ModelError line."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelError(f"'{name}' is not a readable safetensors file (truncated or corrupt): "
                             f"{typed_line(exc, 160)}") from None
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"'{name}' is a pickle that needs arbitrary code to load, refused (.ckpt files are read "
                         f"with torch.load(weights_only=True)): {typed_line(exc, 120)}") from None
    except Exception as exc:
        raise ModelError(f"'{name}' is not a readable .ckpt file (truncated or corrupt): {typed_line(exc, 160)}"
                         ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"'{name}' holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _hf_clip(sd: dict, prefix: str) -> dict:
    """Hugging Face CLIP keys under ``prefix`` (text_model.* and text_projection.*)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            out[rest if rest.startswith(("text_model.", "text_projection")) else "text_model." + rest] = value
    return out


def _open_clip(sd: dict, prefix: str, layers: int) -> dict:
    """OpenCLIP's text tower -> Hugging Face CLIP keys (the first ``layers`` blocks)."""
    t, out = "text_model.", {}
    simple = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    for src, dst in simple.items():
        if prefix + src in sd:
            out[t + dst] = sd[prefix + src]
    if prefix + "text_projection" in sd:
        out["text_projection.weight"] = sd[prefix + "text_projection"].T.contiguous()
    parts = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(layers):
        oc, hf = f"{prefix}transformer.resblocks.{i}.", f"{t}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = sd.get(oc + f"attn.in_proj_{kind}")
            if qkv is not None:
                for p, chunk in zip("qkv", qkv.chunk(3, dim=0)):
                    out[hf + f"self_attn.{p}_proj.{kind}"] = chunk.contiguous()
            for src, dst in parts.items():
                if oc + f"{src}.{kind}" in sd:
                    out[hf + f"{dst}.{kind}"] = sd[oc + f"{src}.{kind}"]
    return out


def _load_strict(build, state: dict, what: str, name: str, optional=("position_ids",)):
    """The module ``build()`` makes, holding ``state``: every weight must come from the file and fit
    its shape. Checked on the meta device first (no memory, no random init of a 2.6 B UNet); the
    tensors are then assigned, and only a module left with meta buffers is built for real."""
    import torch

    with torch.device("meta"):
        module = build()
    own = module.state_dict()
    if not any(k in own for k in state) and all(k.startswith("text_model.") for k in state):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}  # transformers >= 5: no wrapper
    missing = [k for k in own if k not in state and not k.endswith(optional)]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        k = (wrong or missing)[0]
        detail = (f"{k} is {tuple(state[k].shape)}, the config says {tuple(own[k].shape)}" if wrong
                  else f"{len(missing)} weights missing, e.g. {k}")
        raise ModelError(f"'{name}': its {what} does not match the configs it is loaded with ({detail}); "
                         "pass --config DIR with a diffusers pipeline of its shape")
    state, storages = {k: v for k, v in state.items() if k in own}, set()
    for k, v in state.items():  # the file's tensors are assigned, not copied: one storage each (safetensors)
        ptr = v.untyped_storage().data_ptr()
        state[k] = v.clone() if ptr in storages else v
        storages.add(ptr)
    module.load_state_dict(state, strict=False, assign=True)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        module = build()
        module.load_state_dict(state, strict=False)
    return module


def build_meta(build):
    import torch

    with torch.device("meta"):
        return build()


def _components(sd: dict, family: str, config_dir: Path, name: str) -> dict:
    """The file's UNet, VAE and text encoders, built from ``config_dir``'s configs, holding the file's
    own tensors (no copy: an SDXL file needs about its own size in memory, not twice or four times)."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    index = read_json(config_dir / "model_index.json") or {}
    given = PIPELINES.get(str(index.get("_class_name")))
    if given != ("sdxl" if family.startswith("sdxl") else "sd"):
        raise ModelError(f"'{name}' is {FAMILIES[family][1]}, but its configs are a {index.get('_class_name')}; "
                         "pass --config DIR with a pipeline of its family")
    out = {}
    for folder in _COMPONENTS:
        lib_cls = index.get(folder) or [None, None]
        if not lib_cls[0]:
            continue
        cfg_path = config_dir / folder / "config.json"
        if folder in ("unet", "vae"):
            cls = getattr(diffusers, lib_cls[1])
            config = cls.load_config(str(cfg_path.parent))
            build = (lambda cls=cls, config=config: cls.from_config(config))
            convert = convert_ldm_unet_checkpoint if folder == "unet" else convert_ldm_vae_checkpoint
            try:
                state = convert(dict(sd), build_meta(build).config)
            except Exception as exc:
                raise ModelError(f"'{name}': its {folder} could not be converted ({typed_line(exc, 120)}); pass "
                                 "--config DIR with a diffusers pipeline of its shape") from None
        else:
            prefix, layout = (_ENCODER_PREFIXES.get(family) or {}).get(folder, (None, None))
            if prefix is None:
                raise ModelError(f"'{name}' is {FAMILIES[family][1]}, which has no {folder}; the configs given "
                                 "with --config are for another family")
            cls = getattr(transformers, lib_cls[1])
            config = cls.config_class.from_pretrained(str(cfg_path.parent))
            build = (lambda cls=cls, config=config: cls(config))
            state = (_hf_clip(sd, prefix) if layout == "hf" else _open_clip(sd, prefix, config.num_hidden_layers))
        out[folder] = _load_strict(build, state, folder, name).eval()  # the file's tensors, its dtype
    return out


def _config_digest(config_dir: Path) -> str:
    body = {p.relative_to(config_dir).as_posix(): p.read_text(errors="replace")
            for p in sorted(config_dir.rglob("*.json")) if p.name != "tokenizer.json"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_dir(tmp: Path, config_dir: Path, modules: dict, dtype) -> None:
    """Configs, scheduler and tokenizers from ``config_dir``, the components saved in ``dtype`` and as
    the fp16 variant, as a Hub model or a built-in one: a search loads that variant (what it measures
    is the float16 model) into fresh, aligned memory, as it does every directory with one; components
    the file does not hold (safety checker, image encoder) are left out."""
    index = dict(read_json(config_dir / "model_index.json") or {})
    for folder in ("scheduler", "tokenizer", "tokenizer_2"):
        if (config_dir / folder).is_dir() and (index.get(folder) or [None])[0]:
            shutil.copytree(config_dir / folder, tmp / folder)
    for key, value in list(index.items()):
        if isinstance(value, list) and len(value) == 2 and value[0] and key not in modules \
                and key not in ("scheduler", "tokenizer", "tokenizer_2"):
            index[key] = [None, None]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    import torch

    for folder, module in modules.items():
        module.to(dtype).save_pretrained(tmp / folder, safe_serialization=True)
        plain = sorted((tmp / folder).glob("*.safetensors"))
        if dtype == torch.float16 and len(plain) == 1:  # the same bytes: a link, no second copy
            os.link(plain[0], plain[0].with_name(plain[0].name.replace(".safetensors", ".fp16.safetensors")))
        else:
            module.to(torch.float16).save_pretrained(tmp / folder, safe_serialization=True, variant="fp16")


def materialize(path: Path | str, name: str, cache_dir: Path, loras: tuple[str, ...] = (),
                config_dir: str | None = None) -> tuple[Path, dict]:
    """The pipeline directory of a single file with ``loras`` ("FILE[:SCALE]") fused, built once;
    returns it and its facts (family, file name, sha256, LoRAs) for ``model_version``."""
    from workers.lora import fuse_loras, parse_lora
    from workers.tiny_models import _build_lock, quiet_hf

    path = Path(path).expanduser()
    specs = [parse_lora(text) for text in loras]
    digest = file_digest(path, cache_dir)
    lora_facts = [{"file": p.name, "sha256": file_digest(p, cache_dir), "scale": s} for p, s in specs]
    given = Path(config_dir).expanduser() if config_dir else None
    if given is not None and not (given / "model_index.json").is_file():
        raise ModelError(f"--config '{config_dir}' is not a diffusers pipeline directory (no model_index.json)")
    key = hashlib.sha256(json.dumps({"format": FORMAT, "sha256": digest, "loras": lora_facts,
                                     "config": _config_digest(given) if given else None}).encode()).hexdigest()
    root = Path(cache_dir) / "single-file"
    final = root / key[:24]
    facts = read_json(final / MARKER)
    if facts is not None:
        return final, facts
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{key[:24]}.lock"):
        facts = read_json(final / MARKER)
        if facts is not None:
            return final, facts
        import torch

        sd = read_checkpoint(path, name)
        family = detect_family({k: tuple(v.shape) for k, v in sd.items()}, name)
        if family == "sd3":
            raise ModelError(f"'{name}' is an SD3 single file (joint_blocks): not supported yet; pass the "
                             "diffusers pipeline directory instead")
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:24]}-", dir=root))
        try:
            configs = given
            if configs is None:
                configs = tmp / ".configs"
                write_family_config(family, configs)
            with quiet_hf():
                modules = _components(sd, family, configs, name)
                unet_dtypes = {v.dtype for k, v in sd.items() if k.startswith("model.diffusion_model.")}
                dtype = next(iter(unet_dtypes)) if len(unet_dtypes) == 1 else torch.float32
                del sd
                fuse_loras(modules, specs, family)
                out = tmp / "pipeline"
                out.mkdir()
                _write_dir(out, configs, modules, dtype)
            facts = {"family": family, "file": path.name, "sha256": digest, "loras": lora_facts,
                     "config": str(given) if given else f"shipped {family}"}
            (out / MARKER).write_text(json.dumps(facts))
            publish_dir(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, facts


def version_line(facts: dict) -> str:
    """``model_version`` of a search on a single file: what was searched, exactly."""
    loras = "".join(f" + LoRA {lo['file']} x{lo['scale']:g} (sha256 {lo['sha256']})" for lo in facts["loras"])
    return f"{facts['file']} (sha256 {facts['sha256']}){loras}"


__all__ = ["SUFFIXES", "is_single_file", "materialize", "read_checkpoint", "version_line"]
