"""Text encoders, VAE and tokenizer files against Apple's Swift contract (apple/ml-stable-diffusion e12202c).

- Every package's inputs and outputs (names, shapes, dtypes) equal a table written here from Apple's
  sources: ``torch2coreml.py`` (``convert_text_encoder``, ``convert_vae_decoder``, ``convert_vae_encoder``,
  ``_convert_to_coreml``: float32 outputs, macOS 13 = spec 7) and the Swift readers (``TextEncoder.swift``
  reads ``last_hidden_state``; ``TextEncoderXL.swift`` ``hidden_embeds`` and ``pooled_outputs``;
  ``Decoder.swift`` / ``Encoder.swift`` the single input and output).
- The torch function each package is traced from equals diffusers' own computation (``encode_prompt``,
  ``vae.decode``, ``vae.encode(...).latent_dist``) as Swift consumes it, in float32.
- With nbits=4 every weight above the palettizer's threshold is a 16-entry LUT (the token embedding
  table excepted, as Apple's converter does).
- vocab.json / merges.txt tokenize prompts to the pipeline tokenizers' ids, read the way Swift's
  ``BPETokenizer`` reads them (transliterated below) and by transformers' CLIPTokenizer.
Core ML prediction runs on macOS only.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time

import numpy as np
import pytest
import torch

from workers.coreml.bundle import packaging
from workers.coreml.bundle.contract import text_encoder_names
from workers.coreml.bundle.components import (convert_text_encoder, convert_vae_decoder, convert_vae_encoder,
                                              write_tokenizer)
from workers.coreml.bundle.text_encoders import swift_text_encoder
from workers.coreml.bundle.vae import SwiftVAEDecoder, SwiftVAEEncoder
from workers.coreml.common import LUT_OP, CoreMLError, const_value, iter_ops, load_mlmodel, read_program

logging.getLogger("coremltools").setLevel(logging.ERROR)
MACOS_ONLY = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")

MODELS = {"sd": "tiny-sd", "sdxl": "tiny-sdxl", "sdxl-refiner": "tiny-sdxl-refiner", "sd3": "tiny-sd3"}
LATENT = (8, 8)  # the tiny denoisers' sample_size
PROMPTS = ("an astronaut riding a horse on mars", "a red house with a yellow window", "Zebra  quietly   painting")

# -- Apple's contract, for the tiny models (CLIP hidden 32, projection 32; VAE 4 latent channels, 8x) ----------
F16, F32 = "FLOAT16", "FLOAT32"
IDS = {"input_ids": ((1, 77), F32)}  # token ids as float32 (coremltools issue 1423)
TE_SD = (IDS, {"last_hidden_state": ((1, 77, 32), F32), "pooled_outputs": ((1, 32), F32)})
TE_XL = (IDS, {"hidden_embeds": ((1, 77, 32), F32), "pooled_outputs": ((1, 32), F32)})
# SD / SD3 (DiffusionKit): float16 model, inputs float16; SDXL's stock VAE: float32 model and inputs.
DEC = {p: ({"z": ((1, 4, 8, 8), p)}, {"image": ((1, 3, 64, 64), F32)}) for p in (F16, F32)}
ENC = {p: ({"x": ((1, 3, 64, 64), p)}, {"latent": ((1, 8, 8, 8), F32)}) for p in (F16, F32)}
EXPECTED = {
    "sd": {"TextEncoder": TE_SD, "VAEDecoder": DEC[F16], "VAEEncoder": ENC[F16]},
    "sdxl": {"TextEncoder": TE_XL, "TextEncoder2": TE_XL, "VAEDecoder": DEC[F32], "VAEEncoder": ENC[F32]},
    "sdxl-refiner": {"TextEncoder2": TE_XL, "VAEDecoder": DEC[F32], "VAEEncoder": ENC[F32]},
    "sd3": {"TextEncoder": TE_XL, "TextEncoder2": TE_XL, "VAEDecoder": DEC[F16], "VAEEncoder": ENC[F16]},
}
MACOS13_SPEC = 7


@pytest.fixture(scope="module")
def pipes(model_cache):
    from workers.models import load_pipeline, resolve_model

    return {family: load_pipeline(resolve_model(name, model_cache)) for family, name in MODELS.items()}


def _convert(pipe, family, name, path, nbits=None):
    if name.startswith("TextEncoder"):
        return convert_text_encoder(pipe, family, name, path, nbits)
    convert = convert_vae_decoder if name == "VAEDecoder" else convert_vae_encoder
    return convert(pipe.vae, family, LATENT, path, nbits)


# Converted with nbits=4 (the rest as Apple makes them): one float16 and one float32 VAE, two text encoders.
# The tiny models' weights are all under coremltools' 2048-element default: the threshold is lowered to 256.
NBITS_CASES = [("sd", "VAEDecoder"), ("sd", "VAEEncoder"), ("sdxl", "TextEncoder2"), ("sdxl-refiner", "VAEDecoder"),
               ("sd3", "TextEncoder")]
THRESHOLD = 256


@pytest.fixture(scope="module")
def packages(pipes, tmp_path_factory):
    """NBITS_CASES palettized to 4 bits: {(family, name): Converted}. The float16 / float32 components of
    every family are checked in their bundles (tests/search/test_bundle.py), not converted again here."""
    out, done = tmp_path_factory.mktemp("components"), {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packaging, "PALETTE_MIN_ELEMENTS", THRESHOLD)
        for family, name in NBITS_CASES:
            done[family, name] = _convert(pipes[family], family, name, out / family / f"{name}.mlpackage", 4)
    print("conversion seconds:", {f"{f}/{n}{'/4-bit' if c.nbits else ''}": round(c.seconds, 1)
                                  for (f, n), c in done.items()})
    return done


def _features(desc):
    from coremltools.proto import FeatureTypes_pb2 as ft

    return {f.name: (tuple(f.type.multiArrayType.shape), ft.ArrayFeatureType.ArrayDataType.Name(
        f.type.multiArrayType.dataType)) for f in desc}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_packages_match_apples_contract(packages, family):
    assert set(text_encoder_names(family)) == {n for n in EXPECTED[family] if n.startswith("TextEncoder")}
    for name, (inputs, outputs) in EXPECTED[family].items():
        if (family, name) not in packages:
            continue  # float16 / float32 ones: tests/search/test_bundle.py
        spec = load_mlmodel(packages[family, name].path).get_spec()
        assert spec.WhichOneof("Type") == "mlProgram"
        assert spec.specificationVersion == MACOS13_SPEC, (family, name)
        assert _features(spec.description.input) == inputs, (family, name)
        assert _features(spec.description.output) == outputs, (family, name)


# -- the traced torch functions against diffusers ------------------------------------------------------------
def _ids(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _encode(pipe, family, name, prompt):
    attr = {"TextEncoder": "tokenizer", "TextEncoder2": "tokenizer_2"}[name]
    with torch.no_grad():
        return swift_text_encoder(pipe, family, name)(_ids(getattr(pipe, attr), prompt).float())


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_text_encoders_equal_diffusers(pipes, prompt):
    kw = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    with torch.no_grad():
        sd = pipes["sd"]
        hidden, pooled = _encode(sd, "sd", "TextEncoder", prompt)
        torch.testing.assert_close(hidden, sd.encode_prompt(prompt, **kw)[0], rtol=0, atol=0)
        torch.testing.assert_close(pooled, sd.text_encoder(_ids(sd.tokenizer, prompt)).pooler_output, rtol=0, atol=0)

        xl = pipes["sdxl"]  # Swift: concat(hidden 1, hidden 2) along channels, pool of TextEncoder2
        (h1, _p1), (h2, p2) = _encode(xl, "sdxl", "TextEncoder", prompt), _encode(xl, "sdxl", "TextEncoder2", prompt)
        embeds, _neg, pooled_ref, _negp = xl.encode_prompt(prompt, **kw)
        torch.testing.assert_close(torch.cat([h1, h2], dim=-1), embeds, rtol=0, atol=0)
        torch.testing.assert_close(p2, pooled_ref, rtol=0, atol=0)

        ref = pipes["sdxl-refiner"]  # Swift: TextEncoder2 alone
        h2, p2 = _encode(ref, "sdxl-refiner", "TextEncoder2", prompt)
        embeds, _neg, pooled_ref, _negp = ref.encode_prompt(prompt, **kw)
        torch.testing.assert_close(h2, embeds, rtol=0, atol=0)
        torch.testing.assert_close(p2, pooled_ref, rtol=0, atol=0)

        sd3 = pipes["sd3"]  # Swift: concat hiddens (then zero padding, then T5 tokens), concat pools
        (h1, p1), (h2, p2) = _encode(sd3, "sd3", "TextEncoder", prompt), _encode(sd3, "sd3", "TextEncoder2", prompt)
        embeds, _neg, pooled_ref, _negp = sd3.encode_prompt(prompt, None, None, **kw)
        clip = torch.cat([h1, h2], dim=-1)
        torch.testing.assert_close(embeds[:, :77, :clip.shape[-1]], clip, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p1, p2], dim=-1), pooled_ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_vae_equals_diffusers(pipes, family):
    vae = pipes[family].vae
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, *LATENT, generator=gen)
    x = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(SwiftVAEDecoder(vae)(z), vae.decode(z).sample, rtol=0, atol=0)
        moments = SwiftVAEEncoder(vae)(x)
        dist = vae.encode(x).latent_dist
    # Encoder.swift: mean = channels 0..<4, logvar = channels 4..<8 clipped to [-30, 20]
    torch.testing.assert_close(moments[:, :4], dist.mean, rtol=0, atol=0)
    torch.testing.assert_close(moments[:, 4:8].clamp(-30, 20), dist.logvar, rtol=0, atol=0)


# -- palettization ----------------------------------------------------------------------------------------------
def _torch_module(pipe, family, name):
    if name.startswith("TextEncoder"):
        return swift_text_encoder(pipe, family, name)
    return (SwiftVAEDecoder if name == "VAEDecoder" else SwiftVAEEncoder)(pipe.vae)


def _float_dtype(family, name):
    return np.float32 if family.startswith("sdxl") and name.startswith("VAE") else np.float16


@pytest.mark.parametrize("family,name", NBITS_CASES)
def test_nbits_palettizes_every_large_weight(pipes, packages, family, name):
    converted = packages[family, name]
    assert converted.nbits == 4
    ops = list(iter_ops(read_program(converted.path)))
    gather_tables = {op.inputs["x"].op.name for op in ops if op.op_type == "gather" and op.inputs["x"].op is not None}
    plain = [op.name for op in ops if op.op_type == "const" and op.name not in gather_tables
             and isinstance(const_value(op), np.ndarray) and const_value(op).dtype.kind == "f"
             and const_value(op).size > THRESHOLD]
    assert plain == [], f"weights left unpalettized: {plain}"
    luts = [op for op in ops if op.op_type == LUT_OP]
    for op in luts:
        lut = op.inputs["lut"].val
        assert lut.shape == (16,) and lut.dtype == _float_dtype(family, name), (op.name, lut.shape, lut.dtype)
    # every large torch weight became one of them (the token embedding table stays float16, as Apple's)
    big = [n for n, p in _torch_module(pipes[family], family, name).named_parameters()
           if p.numel() > THRESHOLD and "token_embedding" not in n]
    assert len(big) > 0 and len(luts) >= len(big), (len(luts), big)
    if name.startswith("TextEncoder"):
        assert [op.inputs["x"].val.shape for op in ops if op.op_type == "gather"] == [(696, 32)]


def test_bad_arguments_are_one_line_errors(pipes, tmp_path):
    sd, refiner = pipes["sd"], pipes["sdxl-refiner"]
    cases = [
        lambda: convert_text_encoder(refiner, "sdxl-refiner", "TextEncoder", tmp_path / "a.mlpackage"),
        lambda: convert_text_encoder(sd, "flux", "TextEncoder", tmp_path / "b.mlpackage"),
        lambda: convert_text_encoder(sd, "sd", "TextEncoder", tmp_path / "c.mlpackage", nbits=3),
        lambda: convert_vae_decoder(sd.vae, "sd", (8, 0), tmp_path / "d.mlpackage"),
        lambda: convert_vae_decoder(sd.text_encoder, "sd", (8, 8), tmp_path / "e.mlpackage"),
    ]
    for case in cases:
        with pytest.raises(CoreMLError) as err:
            case()
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_vae_encoder_refused_where_swift_cannot_encode(pipes, tmp_path):
    """SD3's real VAE (16 channels, shift 0.0609): Encoder.swift reads 4 channels and adds no shift."""
    vae = copy.deepcopy(pipes["sd3"].vae)
    vae.register_to_config(shift_factor=0.0609)
    with pytest.raises(CoreMLError, match="leave VAEEncoder out"):
        convert_vae_encoder(vae, "sd3", LATENT, tmp_path / "VAEEncoder.mlpackage")
    assert not (tmp_path / "VAEEncoder.mlpackage").exists()


# -- tokenizer files ---------------------------------------------------------------------------------------------
class SwiftBPE:
    """Swift's BPETokenizer (BPETokenizer.swift, BPETokenizer+Reading.swift), line for line in Python."""

    def __init__(self, vocab_path, merges_path, pad="<|endoftext|>"):
        with open(vocab_path, "rb") as fh:
            self.vocab = json.loads(fh.read())
        self.ranks = {}
        for index, line in enumerate(open(merges_path, "rb").read().split(b"\n")[:-1]):
            if not line or line.startswith(b"#"):
                continue
            pair = line.split(b" ")
            assert len(pair) == 2, f"invalidMergeFileLine({index + 1})"
            self.ranks[(pair[0].decode(), pair[1].decode())] = index
        self.pad = pad

    def encode_word(self, word):
        tokens = list(word)
        tokens[-1] += "</w>"
        while True:
            pairs = {(a, b) for a, b in zip(tokens, tokens[1:]) if (a, b) in self.ranks}
            if not pairs:
                return tokens
            first, second = min(pairs, key=self.ranks.get)
            merged, i = [], 0
            while i < len(tokens):
                if i < len(tokens) - 1 and tokens[i] == first and tokens[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(tokens[i])
                    i += 1
            tokens = merged

    def tokenize(self, text, min_count=77):
        words = text.strip().lower().split()
        tokens = ["<|startoftext|>"] + [t for w in words for t in self.encode_word(w)] + ["<|endoftext|>"]
        tokens += [self.pad] * (min_count - len(tokens))
        unknown = self.vocab.get("<|endoftext|>", 0)
        return [self.vocab.get(t, unknown) for t in tokens]


@pytest.mark.parametrize("family", list(EXPECTED))
def test_tokenizer_files_give_the_pipelines_ids(pipes, family, tmp_path):
    from transformers import CLIPTokenizer

    pipe = pipes[family]
    files = write_tokenizer(pipe, family, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    assert open(files.merges).readline().startswith("#version")
    assert files.notes == ()  # the tiny tokenizers pad as Swift does
    loaded = CLIPTokenizer.from_pretrained(str(tmp_path))
    for name in text_encoder_names(family):
        tokenizer = getattr(pipe, {"TextEncoder": "tokenizer", "TextEncoder2": "tokenizer_2"}[name])
        swift = SwiftBPE(files.vocab, files.merges, pad="!" if name == "TextEncoder2" else "<|endoftext|>")
        for prompt in PROMPTS:
            expected = _ids(tokenizer, prompt)[0].tolist()
            assert swift.tokenize(prompt) == expected, (name, prompt)
            assert loaded(prompt).input_ids == tokenizer(prompt).input_ids
    assert len(set(SwiftBPE(files.vocab, files.merges).tokenize(PROMPTS[0]))) > 10  # real merges, not characters


def test_tokenizers_that_differ_are_refused(pipes, tmp_path):
    from transformers import CLIPTokenizer

    pipe = copy.copy(pipes["sdxl"])
    files = write_tokenizer(pipe, "sdxl", tmp_path / "other")
    lines = open(files.merges).read().splitlines()
    with open(files.merges, "w") as fh:  # one merge less: a second tokenizer Swift's single merges.txt cannot be
        fh.write("\n".join(lines[:-1]) + "\n")
    pipe.tokenizer_2 = CLIPTokenizer.from_pretrained(str(tmp_path / "other"), pad_token="!")
    with pytest.raises(CoreMLError, match="different vocabularies or merges"):
        write_tokenizer(pipe, "sdxl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_added_tokens_are_noted(pipes, tmp_path):
    pipe = copy.copy(pipes["sd"])
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
    pipe.tokenizer.add_tokens(["<cat-toy>"])  # textual inversion: Swift's BPE never produces it
    files = write_tokenizer(pipe, "sd", tmp_path)
    assert len(files.notes) == 1 and "<cat-toy>" in files.notes[0]
    assert "<cat-toy>" not in json.load(open(files.vocab))


# -- macOS: the packages compute what the torch functions compute -------------------------------------------------
@MACOS_ONLY
@pytest.mark.parametrize("family", list(EXPECTED))
def test_coreml_prediction_matches_torch(pipes, family, tmp_path):
    import coremltools as ct

    pipe = pipes[family]
    gen = torch.Generator().manual_seed(1)
    for name, (inputs, _outputs) in EXPECTED[family].items():
        if (family, name) in NBITS_CASES:
            continue  # 4-bit weights: compared to float32 torch, only loosely equal
        (in_name, (shape, _dtype)), = inputs.items()
        if name.startswith("TextEncoder"):
            tok = pipe.tokenizer if name == "TextEncoder" else pipe.tokenizer_2
            x = _ids(tok, PROMPTS[0]).float()
        else:
            x = torch.rand(shape, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = _torch_module(pipe, family, name)(x)
        ref = ref if isinstance(ref, tuple) else (ref,)
        path = _convert(pipe, family, name, tmp_path / f"{name}.mlpackage").path
        model = ct.models.MLModel(path, compute_units=ct.ComputeUnit.CPU_ONLY)
        got = model.predict({in_name: x.numpy()})
        for out_name, expected in zip(EXPECTED[family][name][1], ref):
            np.testing.assert_allclose(got[out_name], expected.numpy(), atol=2e-2, rtol=2e-2)
