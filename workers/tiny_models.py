"""Built-in tiny pipelines ("tiny-sdxl", "tiny-sd") for demos and tests without network.

They are complete diffusers pipeline directories with deterministic random weights, written
with ``save_pretrained`` and then loaded through the same ``from_pretrained`` path as a Hub
model, so nothing downstream special-cases them. The structure mirrors the real families
(SDXL: two CLIP encoders, pooled embeddings, ``text_time`` conditioning, linear attention
projections; SD-1.5: one encoder, conv projections, PNDM) at a size where one 1-step call
on a batch of 8 takes a fraction of a second on one CPU core.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from common.files import publish_dir

BUILTIN_MODELS = ("tiny-sdxl", "tiny-sd")
TINY_MIN_SIZE = 10_000  # > 10,000 elements: coremltools' kmeans1d path, as every SDXL candidate (> 1e5)
TINY_RESOLUTION = 64  # pixels; the VAE scale factor is 8, so latents are 8x8
FORMAT_VERSION = "1"  # bump when the built directory changes: forces a rebuild
MARKER = ".mbp-tiny-model"
_SEEDS = {"text_encoder": 11, "text_encoder_2": 12, "unet": 13, "vae": 14}
_SAMPLE_SIZE = TINY_RESOLUTION // 8

# Words that become whole tokens; every other word falls back to byte-level pieces.
_WORDS = (
    "a an the of and in on with at by from to for under over near next is are "
    "photo portrait painting drawing illustration watercolor sketch render style "
    "cat dog bird horse fox bear fish tree forest mountain river lake sea beach city "
    "street house room kitchen table window car train boat bicycle road sky sun moon "
    "night light red blue green yellow white black old small large sitting standing"
).split()


def default_cache_dir() -> Path:
    """Per-user cache (``MBP_SEARCH_CACHE`` overrides) so builds survive between runs."""
    env = os.environ.get("MBP_SEARCH_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mbp-search"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(words) -> list[tuple[str, str]]:
    """Plain BPE training on ``words`` until each is one symbol (deterministic tie-break)."""
    table = _bytes_to_unicode()
    seqs = []
    for word in words:
        chars = [table[b] for b in word.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + "</w>"])
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary: all bytes (plain and word-final), learned merges, specials."""
    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_merges(_WORDS)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _seeded(component: str):
    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(_SEEDS[component])
    return stack


def _round_to_fp16(module):
    """Make every float weight exactly fp16-representable so the fp16 variant is lossless."""
    import torch

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.float16).to(t.dtype))
    return module


def _text_encoder(component: str, vocab_size: int, eos_id: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        hidden_act="gelu", bos_token_id=eos_id - 1, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _seeded(component):
        return _round_to_fp16(cls(cfg).eval())


def _vae():
    from diffusers import AutoencoderKL

    with _seeded("vae"):
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, sample_size=TINY_RESOLUTION,
        )
    return _round_to_fp16(vae.eval())


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
    )
    if family == "sdxl":
        kw = dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
            cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    else:
        kw = dict(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, cross_attention_dim=32, use_linear_projection=False,
        )
    with _seeded("unet"):
        unet = UNet2DConditionModel(**common, **kw)
    return _round_to_fp16(unet.eval())


def build_tiny_pipeline(name: str):
    """Construct the pipeline object in memory (float32, fp16-representable weights)."""
    from diffusers import (EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {BUILTIN_MODELS}")
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, steps_offset=1)
    tok = _tokenizer("<|endoftext|>")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    if name == "tiny-sdxl":
        return StableDiffusionXLPipeline(
            vae=_vae(), unet=_unet("sdxl"), tokenizer=tok, tokenizer_2=_tokenizer("!"),
            text_encoder=_text_encoder("text_encoder", len(tok), eos, projection=False),
            text_encoder_2=_text_encoder("text_encoder_2", len(tok), eos, projection=True),
            scheduler=EulerDiscreteScheduler(**sched, timestep_spacing="leading",
                                             prediction_type="epsilon", interpolation_type="linear"),
        )
    return StableDiffusionPipeline(
        vae=_vae(), unet=_unet("sd"), tokenizer=tok,
        text_encoder=_text_encoder("text_encoder", len(tok), eos, projection=False),
        scheduler=PNDMScheduler(**sched, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _write_vocab_files(folder: Path) -> None:
    """Also write the classic vocab.json/merges.txt pair (slow tokenizers, transformers 4.x)."""
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@contextlib.contextmanager
def quiet_hf():
    """Hide diffusers/transformers progress bars and warnings for internal load/save steps."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for mod in (dlog, tlog):
        mod.set_verbosity_error()
        mod.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub dropped
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        for mod, verbosity, bars in saved:
            mod.set_verbosity(verbosity)
            if bars:
                mod.enable_progress_bar()


def _marker_text(name: str) -> str:
    return json.dumps({"name": name, "format": FORMAT_VERSION})


def _is_current(path: Path, name: str) -> bool:
    try:
        return (path / MARKER).read_text() == _marker_text(name)
    except OSError:
        return False


@contextlib.contextmanager
def _build_lock(lock_path: Path):
    """Serialise builders across processes (best effort where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_tiny_model(name: str, cache_dir: Path | None = None) -> Path:
    """Build ``name`` into ``cache_dir`` once and return its pipeline directory.

    The build happens in a temporary sibling directory that is renamed into place, so a
    crash never leaves a half-written model, and the marker file (written last) records the
    format version so an outdated build is replaced.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {BUILTIN_MODELS}")
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    root = root / "builtin"
    final = root / name
    if _is_current(final, name):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{name}.lock"):
        if _is_current(final, name):
            return final
        import torch

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            with quiet_hf():
                pipe = build_tiny_pipeline(name)
                pipe.save_pretrained(tmp, safe_serialization=True)
                pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True,
                                                       variant="fp16")
            for sub in ("tokenizer", "tokenizer_2"):
                if (tmp / sub).is_dir():
                    _write_vocab_files(tmp / sub)
            (tmp / MARKER).write_text(_marker_text(name))
            publish_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final

