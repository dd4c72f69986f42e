"""Single-file checkpoints and LoRAs (issue 32), checked against references written here.

The original Stable Diffusion layout is written by this file's own key mapping (from the published
ldm/sgm module names: CompVis' UNet ``input_blocks`` / ``middle_block`` / ``output_blocks``, the
VAE's ``encoder.down.N.block.M``, HF CLIP under ``cond_stage_model.transformer.`` /
``conditioner.embedders.0.transformer.``, OpenCLIP's ``resblocks`` with fused q/k/v), so the loader
under test never writes the files it reads. A file made from the tiny pipelines must come back as
exactly those pipelines' weights; a LoRA written here must be fused to ``W + scale * B @ A``
computed here, value for value.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


# ---- the original layout, written from the published module names -------------------------------------------

def unet_to_ldm(sd: dict, cfg: dict, prefix="model.diffusion_model.") -> dict:
    lpb, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    ren = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    for i in range(n):
        for j in range(lpb):
            ren[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * (lpb + 1) + j + 1}.0"
            ren[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * (lpb + 1) + j + 1}.1"
        ren[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op"
        has_attn = "CrossAttn" in cfg["up_block_types"][i]
        for j in range(lpb + 1):
            ren[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (lpb + 1) + j}.0"
            ren[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (lpb + 1) + j}.1"
        ren[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}"
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    out = {}
    for key, value in sd.items():
        head = max((h for h in ren if key.startswith(h + ".")), key=len)
        rest = key[len(head) + 1:]
        if ".resnets." in head:
            first, _, tail = rest.partition(".")
            rest = f"{res[first]}.{tail}"
        out[prefix + ren[head] + "." + rest] = value
    return out


def vae_to_ldm(sd: dict, cfg: dict, prefix="first_stage_model.") -> dict:
    n = len(cfg["block_out_channels"])
    ren = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        ren.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                    f"{part}.conv_norm_out": f"{part}.norm_out", f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                    f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
                    f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"})
    for i in range(n):
        for j in range(cfg["layers_per_block"] + 1):
            ren[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            ren[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        ren[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        ren[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        head = max((h for h in ren if key.startswith(h + ".")), key=len)
        rest = key[len(head) + 1:]
        if ".resnets." in head:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        if head.endswith("attentions.0"):
            sub, _, tail = rest.rpartition(".")
            rest = f"{attn[sub]}.{tail}"
            if sub != "group_norm" and tail == "weight":
                value = value.reshape(*value.shape, 1, 1)  # ldm: 1x1 convolutions
        out[prefix + ren[head] + "." + rest] = value
    return out


def hf_clip_keys(sd: dict) -> dict:
    """The published Hugging Face CLIP keys (text_model.*; transformers 5 drops the prefix in state_dict)."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()
            if not k.endswith("position_ids")}


def clip_to_open_clip(sd: dict, layers: int, prefix="conditioner.embedders.1.model.") -> dict:
    """Hugging Face CLIPTextModelWithProjection -> OpenCLIP's text tower (SDXL's second encoder)."""
    t, sd = "text_model.", hf_clip_keys(sd)
    out = {prefix + "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd[t + "final_layer_norm.weight"],
           prefix + "ln_final.bias": sd[t + "final_layer_norm.bias"],
           **({prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
              if "text_projection.weight" in sd else {})}
    for i in range(layers):
        hf, oc = f"{t}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat([sd[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[oc + f"attn.out_proj.{kind}"] = sd[hf + f"self_attn.out_proj.{kind}"]
            out[oc + f"ln_1.{kind}"] = sd[hf + f"layer_norm1.{kind}"]
            out[oc + f"ln_2.{kind}"] = sd[hf + f"layer_norm2.{kind}"]
            out[oc + f"mlp.c_fc.{kind}"] = sd[hf + f"mlp.fc1.{kind}"]
            out[oc + f"mlp.c_proj.{kind}"] = sd[hf + f"mlp.fc2.{kind}"]
    return out


def original_checkpoint(pipe) -> dict:
    """The whole pipeline in the original single-file layout."""
    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd.update({"conditioner.embedders.0.transformer." + k: v
                   for k, v in hf_clip_keys(pipe.text_encoder.state_dict()).items()})
        sd.update(clip_to_open_clip(pipe.text_encoder_2.state_dict(), pipe.text_encoder_2.config.num_hidden_layers))
    else:
        sd.update({"cond_stage_model.transformer." + k: v
                   for k, v in hf_clip_keys(pipe.text_encoder.state_dict()).items()})
    return {k: v.contiguous() for k, v in sd.items()}


def load_dir(path) -> object:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)


def write_checkpoint(name: str, model_cache: Path, out: Path) -> Path:
    """The built-in ``name`` (float32, its fp16-exact weights) as an original-layout .safetensors."""
    from workers.tiny_models import ensure_tiny_model

    path = out / f"{name}.safetensors"
    save_file(original_checkpoint(load_dir(ensure_tiny_model(name, model_cache))), str(path))
    return path


def write_lora(path: Path, layers: dict, kohya: bool = False) -> dict:
    """A LoRA with known factors: ``layers`` {(component, module): (rank, alpha or None)}; returns
    {(component, module): (A = down, B = up, alpha)} as written."""
    gen = torch.Generator().manual_seed(7)
    written, sd = {}, {}
    for (component, module), (rank, alpha, w_shape) in layers.items():
        down = torch.randn(rank, *w_shape[1:], generator=gen) * 0.1
        up = torch.randn(w_shape[0], rank, *([1, 1] if len(w_shape) == 4 else []), generator=gen) * 0.1
        if kohya:
            name = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
            sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
            if alpha is not None:
                sd[name + ".alpha"] = torch.tensor(float(alpha))
        else:
            sd[f"{component}.{module}.lora_A.weight"], sd[f"{component}.{module}.lora_B.weight"] = down, up
        written[(component, module)] = (down, up, alpha)
    save_file(sd, str(path))
    return written


def module_of(model, name: str):
    """A module by its published name (transformers >= 5 flattens CLIPTextModel's text_model)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(name.removeprefix("text_model."))


def by_hand(weight: torch.Tensor, down, up, alpha, scale: float) -> torch.Tensor:
    """W + scale * (alpha / rank) * B @ A, B and A as matrices (a conv's kernel flattened)."""
    rank = down.shape[0]
    b, a = up.reshape(up.shape[0], rank), down.reshape(rank, -1)
    factor = scale * (alpha / rank if alpha is not None else 1.0)
    return weight + factor * (b @ a).reshape(weight.shape)


@pytest.fixture(scope="module")
def files(model_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("single-files")
    return {name: write_checkpoint(name, model_cache, out) for name in ("tiny-sd", "tiny-sdxl")}


def _tiny_dir(model_cache, name):
    from workers.tiny_models import ensure_tiny_model

    return ensure_tiny_model(name, model_cache)


@pytest.mark.parametrize("name, family", [("tiny-sd", "sd"), ("tiny-sdxl", "sdxl")])
def test_file_loads_as_the_pipeline_it_was_written_from(files, model_cache, name, family):
    from workers.models import resolve_model

    spec = resolve_model(str(files[name]), config_dir=str(_tiny_dir(model_cache, name)))
    assert spec.source == "file" and spec.family == family and Path(spec.location).is_dir()
    sha = hashlib.sha256(files[name].read_bytes()).hexdigest()
    assert spec.version == f"{name}.safetensors (sha256 {sha})"
    want, got = load_dir(_tiny_dir(model_cache, name)), load_dir(spec.location)
    compared = 0
    for comp in COMPONENTS:
        if getattr(want, comp, None) is None:
            assert getattr(got, comp, None) is None
            continue
        a, b = want.__getattribute__(comp).state_dict(), got.__getattribute__(comp).state_dict()
        assert set(a) == set(b), comp
        for key in a:
            assert torch.equal(a[key], b[key]), f"{comp}.{key}"
            compared += 1
    assert compared > 700
    assert dict(want.scheduler.config) == dict(got.scheduler.config)
    assert want.tokenizer("a photo of a cat").input_ids == got.tokenizer("a photo of a cat").input_ids
    again = resolve_model(str(files[name]), config_dir=str(_tiny_dir(model_cache, name)))
    assert again.location == spec.location  # found again, not converted twice


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_fp16_ckpt_is_read_with_weights_only(files, model_cache, tmp_path, name):
    """A .ckpt of the same tensors in float16 gives the same weights, kept in float16."""
    from safetensors.torch import load_file

    from workers.models import resolve_model

    ckpt = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": {k: v.half() for k, v in load_file(str(files[name])).items()}, "global_step": 1}, ckpt)
    config = str(_tiny_dir(model_cache, name))
    location = resolve_model(str(ckpt), config_dir=config).location
    got, want = load_dir(location), load_dir(_tiny_dir(model_cache, name))
    for comp in COMPONENTS:
        if getattr(want, comp, None) is not None:
            a, b = getattr(got, comp).state_dict(), getattr(want, comp).state_dict()
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), comp
    from safetensors import safe_open

    with safe_open(str(Path(location) / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_pickle_that_runs_code_is_refused(model_cache, tmp_path):
    from workers.models import ModelError, resolve_model

    config = str(_tiny_dir(model_cache, "tiny-sd"))
    witness = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, bad)
    with pytest.raises(ModelError, match="needs arbitrary code.*weights_only=True"):
        resolve_model(str(bad), config_dir=config)
    assert not witness.exists()  # nothing ran


def test_lora_is_fused_as_computed_by_hand(files, model_cache, tmp_path):
    """A PEFT-format LoRA (scale 0.75) and a kohya one with alpha (scale 1.5): the materialized
    weights are W + scale * (alpha / rank) * B @ A, value for value, where W is the file's weight."""
    from workers.models import resolve_model

    config = str(_tiny_dir(model_cache, "tiny-sd"))
    base = load_dir(_tiny_dir(model_cache, "tiny-sd"))
    shape = {("unet", m): module_of(base.unet, m).weight.shape for m in (
        "up_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.resnets.1.conv1")}
    shape[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")] = \
        module_of(base.text_encoder, "text_model.encoder.layers.0.self_attn.q_proj").weight.shape
    peft = write_lora(tmp_path / "peft.safetensors", {k: (4, None, s) for k, s in shape.items() if k[1] !=
                                                      "up_blocks.1.resnets.1.conv1"})
    kohya = write_lora(tmp_path / "kohya.safetensors", {("unet", "up_blocks.1.resnets.1.conv1"): (
        4, 2.0, shape[("unet", "up_blocks.1.resnets.1.conv1")]), ("unet", "up_blocks.0.resnets.0.conv1"): (
        2, 8.0, shape[("unet", "up_blocks.0.resnets.0.conv1")])}, kohya=True)
    spec = resolve_model(str(files["tiny-sd"]), config_dir=config,
                         loras=(f"{tmp_path / 'peft.safetensors'}:0.75", f"{tmp_path / 'kohya.safetensors'}:1.5"))
    assert "LoRA peft.safetensors x0.75" in spec.version and "LoRA kohya.safetensors x1.5" in spec.version
    fused = load_dir(spec.location)
    for (component, module) in shape:
        want = module_of(getattr(base, component), module).weight.detach()
        for written, scale in ((peft, 0.75), (kohya, 1.5)):
            if (component, module) in written:
                want = by_hand(want, *written[(component, module)], scale)
        got = module_of(getattr(fused, component), module).weight.detach()
        assert torch.equal(got, want), (component, module)
        assert not torch.equal(got, module_of(getattr(base, component), module).weight)
    untouched = "up_blocks.0.resnets.1.conv1"
    assert torch.equal(fused.unet.get_submodule(untouched).weight, base.unet.get_submodule(untouched).weight)


def test_shipped_clip_tokenizer_is_clips():
    """The tokenizer shipped for real checkpoints: OpenAI CLIP's published ids."""
    from transformers import CLIPTokenizer

    from workers.family_configs import clip_vocab, write_tokenizer

    vocab, merges = clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(Path(d), "<|endoftext|>")
        tok = CLIPTokenizer.from_pretrained(d)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def _meta_checkpoint(family: str) -> dict:
    """A real-size checkpoint of ``family`` on the meta device (no memory), written with this file's
    mapping from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from workers.family_configs import family_configs

    cfgs = family_configs(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfgs["unet/config.json"])
        vae = AutoencoderKL.from_config(cfgs["vae/config.json"])
        encoders = {k.split("/")[0]: (CLIPTextModelWithProjection if "Projection" in v["architectures"][0]
                                      else CLIPTextModel)(CLIPTextConfig(**v)) for k, v in cfgs.items()
                    if k.startswith("text_encoder")}
    sd = {**unet_to_ldm(unet.state_dict(), dict(unet.config)), **vae_to_ldm(vae.state_dict(), dict(vae.config))}
    if family in ("sd1", "sdxl"):
        prefix = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
        sd.update({prefix + k: v for k, v in hf_clip_keys(encoders["text_encoder"].state_dict()).items()})
    if family == "sd2":
        sd.update(clip_to_open_clip(encoders["text_encoder"].state_dict(), 23, "cond_stage_model.model."))
    if "text_encoder_2" in encoders:
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
        sd.update(clip_to_open_clip(encoders["text_encoder_2"].state_dict(), 32, prefix))
    return sd


# parameters of the published models (UNets: SD 1.5, SDXL base and refiner; text encoders: CLIP-L, OpenCLIP bigG)
PUBLISHED = {"sd1": {"unet": 859_520_964, "text_encoder": 123_060_480},
             "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
             "sdxl-refiner": {"unet": 2_259_526_660, "text_encoder_2": 694_659_840}, "sd2": {}}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_real_shapes_are_detected_and_load_with_the_shipped_configs(family, tmp_path):
    """Real-size checkpoints (meta device: shapes only) are detected as their family and pass the
    whole conversion and strict load with the configs that ship; the UNets and text encoders have
    the published parameter counts."""
    from workers.family_configs import detect_family, family_configs
    from workers.single_file import _components

    sd = _meta_checkpoint(family)
    assert tuple(sd["model.diffusion_model.input_blocks.0.0.weight"].shape)[1] == 4
    assert detect_family({k: tuple(v.shape) for k, v in sd.items()}, "x.safetensors") == family
    for rel, cfg in family_configs(family).items():  # the configs (the tokenizers: their own test)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(cfg))
    with torch.device("meta"):
        modules = _components(sd, family, tmp_path, "x.safetensors")
    for name, count in PUBLISHED[family].items():
        assert sum(p.numel() for p in modules[name].parameters()) == count, name
    assert {"unet", "vae"} <= set(modules)


def test_family_detection_refusals():
    from workers.family_configs import detect_family
    from workers.models import ModelError

    vae_only = {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    with pytest.raises(ModelError, match=r"has no UNet .*found: 1 first_stage_model\.\*"):
        detect_family(vae_only, "vae.safetensors")
    with pytest.raises(ModelError, match="is a LoRA, not a checkpoint"):
        detect_family({"lora_unet_x.lora_down.weight": (4, 8)}, "l.safetensors")
    unet_only = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    with pytest.raises(ModelError, match="no text encoder of SD 1.x, SD 2.x or SDXL"):
        detect_family(unet_only, "u.safetensors")
    inpaint = {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    with pytest.raises(ModelError, match="9 input channels"):
        detect_family(inpaint, "i.safetensors")
    assert detect_family({"model.diffusion_model.joint_blocks.0.x": (1,)}, "s.safetensors") == "sd3"


def test_bad_files_are_one_line_refusals(files, model_cache, tmp_path):
    from workers.models import ModelError, resolve_model

    config = str(_tiny_dir(model_cache, "tiny-sd"))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(files["tiny-sd"].read_bytes()[:100_000])
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        resolve_model(str(truncated), config_dir=config)
    # the tiny SD file against SDXL's configs: its UNet has other shapes
    with pytest.raises(ModelError, match="is SD 1.x, but its configs are a StableDiffusionXLPipeline"):
        resolve_model(str(files["tiny-sd"]), config_dir=str(_tiny_dir(model_cache, "tiny-sdxl")))
    # an SD 1.x file without --config is loaded with the real SD 1.5 shapes: refused, naming why
    with pytest.raises(ModelError, match="unet does not match the configs .*--config DIR"):
        resolve_model(str(files["tiny-sd"]))
    other = write_lora(tmp_path / "xl.safetensors", {("unet", "down_blocks.1.attentions.0.transformer_blocks.0."
                                                      "attn2.to_k"): (4, None, (64, 64))})
    assert other
    with pytest.raises(ModelError, match="does not fit this sd1 checkpoint"):
        resolve_model(str(files["tiny-sd"]), config_dir=config, loras=(str(tmp_path / "xl.safetensors"),))
    with pytest.raises(ModelError, match="apply to single-file checkpoints"):
        resolve_model("tiny-sd", loras=(str(tmp_path / "xl.safetensors"),))
    for err in (ModelError,):
        msg = ""
        try:
            resolve_model(str(truncated), config_dir=config)
        except err as exc:
            msg = str(exc)
        assert "\n" not in msg and msg


def test_digest_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    from workers import file_digest as fd

    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * 8 * 2**20 + 5))
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fd.file_digest(path, tmp_path / "cache") == want
    monkeypatch.setattr(fd, "sha256_of", lambda p: pytest.fail("re-hashed an unchanged file"))
    assert fd.file_digest(path, tmp_path / "cache") == want
    monkeypatch.undo()
    path.write_bytes(b"x" + path.read_bytes()[1:])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert fd.file_digest(path, tmp_path / "cache") == hashlib.sha256(path.read_bytes()).hexdigest() != want
    stored = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "file-digests").iterdir()]
    assert {s["sha256"] for s in stored} == {want, hashlib.sha256(path.read_bytes()).hexdigest()}
