"""Parts the built-in tiny pipelines share (`workers.tiny_models`, `workers.tiny_transformers`):
deterministic seeding, fp16-representable weights, a small CLIP tokenizer learned from a word
list, a T5 tokenizer and encoder, tiny CLIP text encoders and a tiny VAE. All built locally."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

TINY_RESOLUTION = 64  # pixels; the VAE scale factor is 8, so latents are 8x8
_SEEDS = {"text_encoder": 11, "text_encoder_2": 12, "unet": 13, "vae": 14, "text_encoder_3": 15, "transformer": 16}

# Words that become whole tokens; every other word falls back to byte-level pieces.
_WORDS = (
    "a an the of and in on with at by from to for under over near next is are "
    "photo portrait painting drawing illustration watercolor sketch render style "
    "cat dog bird horse fox bear fish tree forest mountain river lake sea beach city "
    "street house room kitchen table window car train boat bicycle road sky sun moon "
    "night light red blue green yellow white black old small large sitting standing"
).split()


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


def _vae(**extra):
    from diffusers import AutoencoderKL

    with _seeded("vae"):
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, sample_size=TINY_RESOLUTION, **extra,
        )
    return _round_to_fp16(vae.eval())


def _write_vocab_files(folder: Path) -> None:
    """Also write the classic vocab.json/merges.txt pair (slow tokenizers, transformers 4.x)."""
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over the same word list: whole words, else single characters."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(_WORDS)]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def t5_encoder(d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with _seeded("text_encoder_3"):
        return _round_to_fp16(T5EncoderModel(cfg).eval())
