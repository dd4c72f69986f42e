"""Measurement protocols: what a stored PSNR means.

``apple`` (the default) is Apple's pre-analysis script
(`apple/ml-stable-diffusion`, ``mixed_bit_compression_pre_analysis.py``) row by row, so numbers
stored under Apple's names mean what Apple's script means by them:

* its 8 COCO-style captions, negative prompt ``""``, all prompts in one pipeline call;
* one CPU ``torch.Generator()`` with its default seed, its state restored before every run and
  handed to the pipeline, so the pipeline draws the latents (here: drawn the same way, once);
* 768 px for every Hub / local model (the built-in tiny models keep their small size);
* ``compute_psnr(ref, test)``: peak = max |test| + 1e-5, rmse + 1e-10, each per-prompt value
  rounded to 0.1 dB (``f"{x:.1f}"``) and averaged with a plain ``sum / len``;
* ``linear_8bit``: coremltools' int8 "LINEAR" fake quantization (0 forced into the range) of
  every UNet module that has a ``weight``. Apple calls it with ``axis=-1`` and builds the reduce
  axes as ``i != axis`` over ``range(ndim)``, which never equals -1: the min/max are taken over
  *all* axes, i.e. one scale per tensor. That is what the script computes, so it is what we do.

``classic`` is this project's first protocol (own prompts, latents from ``--seed``, peak of the
reference, unrounded, a per-output-channel uint8 baseline over the candidates stored as
``linear_8bit_per_channel``), kept for searches that want finer-grained numbers.
"""
from __future__ import annotations

import numpy as np

PROTOCOLS = ("apple", "classic")
APPLE_RESOLUTION = 768

APPLE_PROMPTS: tuple[str, ...] = (
    "a black and brown dog standing outside a door.",
    "a person on a motorcycle makes a turn on the track.",
    "inflatable boats sit on the arizona river, and on the bank",
    "a white cat sitting under a white umbrella",
    "black bear standing in a field of grass under a tree.",
    "a train that is parked on tracks and has graffiti writing on it, with a mountain range in the background.",
    "a cake inside of a pan sitting in an oven.",
    "a table with paper plates and flowers in a home",
)

CLASSIC_PROMPTS: tuple[str, ...] = (
    "a golden retriever puppy running across a wet beach at sunset, photograph",
    "an old fisherman mending nets in a small harbour, black and white portrait",
    "a watercolor illustration of a fox reading a book under a tree",
    "a busy night market street in the rain with neon signs, 35mm photo",
    "a bowl of ramen on a wooden table, top-down food photography",
    "a snowy mountain range above a frozen lake, early morning light",
    "a cartoon robot watering flowers on a balcony, flat vector art",
    "the interior of a sunlit library with tall shelves and a spiral staircase",
)

# The name each protocol stores its 8-bit baseline under (Apple's recipe rule reads it).
LINEAR8_BASELINE = {"apple": "linear_8bit", "classic": "linear_8bit_per_channel"}


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; choose from {', '.join(PROTOCOLS)}")
    return protocol


def default_prompts(protocol: str) -> tuple[str, ...]:
    return APPLE_PROMPTS if check_protocol(protocol) == "apple" else CLASSIC_PROMPTS


def round_db(value: float) -> float:
    """Apple's rounding of a PSNR: to 0.1 dB through its decimal text (``f"{x:.1f}"``)."""
    return float(f"{value:.1f}")


def mean_db(values) -> float:
    """Apple's average: a plain left-to-right ``sum / len`` of Python floats (not numpy's
    pairwise sum), so a threshold compared with ``>`` sees exactly Apple's number."""
    values = [float(v) for v in values]
    return sum(values) / len(values)


def _per_prompt(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (torch is not imported here: recipe code reads this module)
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1)


def psnr_per_prompt(ref, test, protocol: str) -> tuple[float, ...]:
    """PSNR of every prompt (first axis) in dB, as the protocol defines it.

    apple: peak of the *test* output, computed in the outputs' own dtype as numpy does for
    Apple's script, rounded to 0.1 dB. classic: peak of the reference, float64, unrounded.
    """
    ref, test = _per_prompt(ref), _per_prompt(test)
    if ref.shape != test.shape:
        raise ValueError(f"psnr: shapes differ {ref.shape} vs {test.shape}")
    if check_protocol(protocol) == "classic":
        r, t = ref.astype(np.float64), test.astype(np.float64)
        peak = np.abs(r).max(axis=1) + 1e-5
        rmse = np.sqrt(np.mean((r - t) ** 2, axis=1))
        return tuple(float(v) for v in 20 * np.log10(peak / (rmse + 1e-10)))
    out = []
    for r, t in zip(ref, test):
        peak = np.abs(t).max()
        rmse = np.sqrt(((r - t) * (r - t)).sum() / t.size)
        out.append(round_db(float(20 * np.log10((peak + 1e-5) / (rmse + 1e-10)))))
    return tuple(out)


def fake_int8_per_tensor(weight: np.ndarray) -> np.ndarray:
    """Apple's ``linear_8bit`` of one weight, in the weight's own dtype: int8 "LINEAR" with the
    range widened to contain 0, one scale and zero point for the whole tensor (see the module
    docstring for why per tensor), returned dequantized."""
    val = np.asarray(weight)
    dtype = val.dtype
    lo = np.minimum(np.zeros((), dtype), val.min())
    hi = np.maximum(np.zeros((), dtype), val.max())
    if hi == lo:  # an all-zero tensor: nothing to quantize (Apple's script would divide by zero)
        return val.copy()
    qmin, qmax = -128, 127
    zero = np.clip(np.round((qmin * hi - qmax * lo) / (hi - lo)), qmin, qmax).astype(np.int8)
    scale = ((hi - lo) / (qmax - qmin)).astype(dtype)
    q = np.round(val * (qmax - qmin) / (hi - lo)) + zero
    q = np.clip(q, qmin, qmax).astype(np.int8)
    return (q.astype(dtype) - zero.astype(dtype)) * scale
