"""``vocab.json`` and ``merges.txt``: the CLIP BPE tokenizer Swift's ``BPETokenizer`` reads.

Swift reads the vocabulary as one JSON object {token: id} and the merges as lines "left right" whose
line number is the merge's rank (empty lines and lines starting with "#", such as the "#version"
header, are skipped but still counted, so only the order matters). One pair of files serves every CLIP
text encoder of a folder: SDXL's and SD3's second tokenizer differ only by their pad token, "!", which
Swift sets itself (``padToken: "!"`` for TextEncoder2; "<|endoftext|>" otherwise). Start, end and
unknown tokens are "<|startoftext|>" and "<|endoftext|>".

Apple's converter downloads openai/clip-vit-base-patch32's files; they are written here from the
pipeline's own tokenizer, so a model with another vocabulary gets its own. SD3's T5 tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``) are only read with ``TextEncoderT5``, which bundles
leave out, so they are not written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.files import atomic_write_text
from workers.coreml.bundle.contract import text_encoder_names
from workers.coreml.bundle.text_encoders import encoder_attributes
from workers.coreml.common import CoreMLError

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
MERGES_HEADER = "#version: 0.2"
SWIFT_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
SWIFT_PAD = {"TextEncoder": "<|endoftext|>", "TextEncoder2": "!"}  # BPETokenizer's padToken per encoder


@dataclass(frozen=True)
class TokenizerFiles:
    vocab: str
    merges: str
    notes: tuple[str, ...]  # where Swift's tokenization will differ from the pipeline's (pad, added tokens)


def bpe_tables(tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tokenizer's BPE vocabulary {token: id} and merges in rank order (fast or slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        if model.get("type") != "BPE":
            raise CoreMLError(f"{type(tokenizer).__name__} is not a BPE tokenizer; Swift's BPETokenizer reads CLIP's")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return dict(model["vocab"]), merges
    if hasattr(tokenizer, "encoder") and hasattr(tokenizer, "bpe_ranks"):  # transformers' Python CLIPTokenizer
        return dict(tokenizer.encoder), sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    raise CoreMLError(f"cannot read BPE vocabulary and merges from {type(tokenizer).__name__}")


def write_tokenizer(pipe, family: str, out_dir: str | os.PathLike) -> TokenizerFiles:
    """Write ``vocab.json`` and ``merges.txt`` of ``family``'s CLIP tokenizers into ``out_dir`` (atomically).

    Every CLIP tokenizer of the family must have the same vocabulary and merges (Swift reads one pair);
    a pad token other than Swift's is returned as a note, since Swift pads with its own.
    """
    tables, notes = {}, []
    for name in text_encoder_names(family):
        attr = encoder_attributes(family, name)[1]
        tokenizer = getattr(pipe, attr, None)
        if tokenizer is None:
            raise CoreMLError(f"the {type(pipe).__name__} has no {attr}, which {name} tokenizes with")
        tables[attr] = bpe_tables(tokenizer)
        added = sorted(set(tokenizer.get_vocab()) - set(tables[attr][0]))
        if added:
            notes.append(f"{attr}'s added tokens {', '.join(added[:3])}{' ...' if len(added) > 3 else ''} are not "
                         "in the BPE vocabulary: Swift's BPETokenizer splits them like any other word")
        if tokenizer.pad_token != SWIFT_PAD[name]:
            notes.append(f"{attr} pads with {tokenizer.pad_token!r} but Swift pads {name}'s input with "
                         f"{SWIFT_PAD[name]!r}: embeddings after the end token differ")
    (first, (vocab, merges)), *others = tables.items()
    for attr, table in others:
        if table != (vocab, merges):
            raise CoreMLError(f"{first} and {attr} have different vocabularies or merges; Swift reads one "
                              f"{VOCAB_FILE} and {MERGES_FILE} for all text encoders")
    _check_swift_readable(vocab, merges)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out / MERGES_FILE, "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n")
    return TokenizerFiles(str(out / VOCAB_FILE), str(out / MERGES_FILE), tuple(notes))


def _check_swift_readable(vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """What Swift would silently get wrong: missing special tokens, merges its line parser splits badly."""
    missing = [t for t in (*SWIFT_SPECIAL, SWIFT_PAD["TextEncoder2"]) if t not in vocab]
    if missing:
        raise CoreMLError(f"the vocabulary lacks {', '.join(missing)}, which Swift's BPETokenizer uses")
    bad = [f"{a!r} {b!r}" for a, b in merges if not a or not b or any(c in a + b for c in " \n")
           or a.startswith("#")]
    if bad:
        raise CoreMLError(f"{len(bad)} merges cannot be written as Swift's 'left right' lines, e.g. {bad[0]}")
