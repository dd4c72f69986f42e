"""Palettization primitives: exact fp16 k-means LUTs, 65,536-entry index tables, linear 8-bit.

A per-tensor format is one `Palette`; a grouped format (``4g16``) is a `GroupedPalette`, one
`Palette` per group of output channels (`workers.grouped_palette`). `fit_palette` fits either.
`kmeans_palette` computes what coremltools' ``mode="kmeans"`` computes for fp16 tensors
(optimal weighted 1-D k-means over the distinct values, weights = counts) but works on a
histogram of the 65,536 fp16 bit patterns, so it never sorts the tensor; the resulting
`Palette.code` table turns dequantization into a single gather on any device.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from common.files import atomic_write_bytes
from common.formats import LUT_NBITS, PaletteFormat
from workers import kmeans1d_fast

_PATTERNS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
_VALUES = _PATTERNS.view(np.float16).astype(np.float64)  # value of every fp16 bit pattern
_FINITE = np.isfinite(_VALUES)
_VALUES0 = np.where(_FINITE, _VALUES, 0.0)  # for error sums: non-finite patterns have count 0
# Finite patterns in ascending value order; -0.0 (0x8000) is folded into +0.0 beforehand.
_SORTED = np.flatnonzero(_FINITE & (_PATTERNS != 0x8000))
_SORTED = _SORTED[np.argsort(_VALUES[_SORTED], kind="stable")]
_SORTED_VALUES = _VALUES[_SORTED]


class PaletteError(ValueError):
    """Bad palettization input or palette file (concise one-line message)."""


def _check_nbits(nbits) -> int:
    if isinstance(nbits, PaletteFormat) and not nbits.grouped:  # a per-tensor format is its depth
        nbits = nbits.bits
    if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or int(nbits) not in LUT_NBITS:
        raise PaletteError(f"nbits must be one of {LUT_NBITS}, got {nbits!r}")
    return int(nbits)


def _bits(weights) -> np.ndarray:
    """uint16 view of a non-empty fp16 array (the bit patterns the tables are indexed by)."""
    if not isinstance(weights, np.ndarray) or weights.dtype != np.float16:
        raise PaletteError(f"weights must be a float16 numpy array, got {getattr(weights, 'dtype', type(weights).__name__)}")
    if weights.size == 0:
        raise PaletteError("weights are empty")
    return weights.view(np.uint16)


@dataclass(frozen=True, eq=False)
class Palette:
    """A fitted LUT plus the nearest-entry index of every fp16 bit pattern.

    Arrays are copied and made read-only so the digest stays valid; equality is by digest.
    """

    nbits: int
    lut: np.ndarray
    code: np.ndarray
    weight_mse: float

    def __post_init__(self):
        nbits = _check_nbits(self.nbits)
        lut, code = np.asarray(self.lut), np.asarray(self.code)
        if lut.dtype != np.float16 or lut.shape != (1 << nbits,):
            raise PaletteError(f"lut must be float16 of shape ({1 << nbits},), got {lut.dtype} {lut.shape}")
        if not np.isfinite(lut).all() or (np.diff(lut.astype(np.float64)) < 0).any():
            raise PaletteError("lut must be finite and ascending")
        if code.dtype != np.uint8 or code.shape != (1 << 16,) or int(code.max()) >= 1 << nbits:
            raise PaletteError(f"code must be uint8 of shape (65536,) with entries < {1 << nbits}")
        lut, code = lut.copy(), code.copy()
        lut.flags.writeable = code.flags.writeable = False
        for name, value in (("nbits", nbits), ("lut", lut), ("code", code), ("weight_mse", float(self.weight_mse))):
            object.__setattr__(self, name, value)

    @property
    def format(self) -> PaletteFormat:
        return PaletteFormat(self.nbits)

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(bytes([self.nbits]))
        h.update(self.lut.astype("<f2").tobytes())
        h.update(self.code.tobytes())
        return h.hexdigest()

    @cached_property
    def table(self) -> np.ndarray:
        """fp16 value for every bit pattern (lut[code]): dequantization is one gather."""
        t = self.lut[self.code]
        t.flags.writeable = False
        return t

    def __eq__(self, other):
        return isinstance(other, Palette) and self.digest == other.digest

    def __hash__(self):
        return hash(self.digest)

    def indices(self, weights: np.ndarray) -> np.ndarray:
        return self.code[_bits(weights)]

    def dequantize(self, weights: np.ndarray) -> np.ndarray:
        return self.table[_bits(weights)]


def kmeans_palette(weights: np.ndarray, nbits: int) -> Palette:
    """coremltools' k-means palette of an fp16 tensor (what Apple's script and Core ML compute),
    from the histogram of its bit patterns.

    coremltools sorts the tensor (``np.unique``) and hands the distinct values with their
    counts to its vendored ``kmeans1d`` (optimal weighted 1-D k-means). The histogram gives the
    same distinct values and counts without sorting, and `workers.kmeans1d_fast` (the same
    dynamic program, compiled with numba, ~4x faster) gives the same clusters and centroids, so
    LUT and indices equal coremltools' element for element, ties included (they also avoid
    numpy's float16 sort, which mis-sorts large arrays with many duplicates on some AVX-512 CPUs).
    """
    return palette_from_histogram(fp16_histogram(weights), nbits)


def fp16_histogram(weights: np.ndarray) -> np.ndarray:
    """Count of every fp16 bit pattern in ``weights`` (int64, 65,536 entries). The evaluators
    compute the same counts with ``torch.bincount`` where the weights are (GPU)."""
    return np.bincount(_bits(weights).ravel(), minlength=1 << 16)


def histogram_support(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values ascending, their counts as float64, their bit patterns) of a finite
    fp16 histogram: what coremltools' ``np.unique`` hands its k-means. -0.0 is counted as +0.0
    (one value, as in ``np.unique``)."""
    counts = np.array(counts, dtype=np.int64)
    counts[0] += counts[0x8000]
    counts[0x8000] = 0
    c = counts[_SORTED]
    nz = c > 0
    return _SORTED_VALUES[nz], c[nz].astype(np.float64), _SORTED[nz]


def palette_from_histogram(counts: np.ndarray, nbits: int) -> Palette:
    """`kmeans_palette` of the tensor whose bit-pattern histogram is ``counts``: the palette
    depends on the tensor only through it, so this is what the CPU palette tasks run."""
    nbits = _check_nbits(nbits)
    counts = np.array(counts, dtype=np.int64)
    if counts.shape != (1 << 16,) or (counts < 0).any() or counts.sum() == 0:
        raise PaletteError("counts must be a non-empty histogram of the 65,536 fp16 bit patterns")
    if counts[~_FINITE].any():
        raise PaletteError("weights contain NaN or inf")
    counts[0] += counts[0x8000]  # folded here too: the weight MSE below sums these counts
    counts[0x8000] = 0
    x, w, patterns = histogram_support(counts)
    k = min(1 << nbits, x.size)
    members, centroids = kmeans1d_fast.cluster(x, w, k)
    cent = centroids.astype(np.float16)
    lut = np.full(1 << nbits, cent[-1], dtype=np.float16)  # unused tail repeats the last centroid
    lut[: cent.size] = cent
    if (np.diff(lut.astype(np.float64)) < 0).any():
        raise PaletteError("k-means centroids came back unordered")
    # Values present: their cluster (not always the nearest fp16-rounded centroid at a
    # boundary, and that ~1 weight in 10^5 moves a PSNR by up to 0.3 dB). Absent patterns
    # (never looked up for this tensor): the nearest entry.
    code = nearest_code(cent)
    code[patterns] = members
    code[0x8000] = code[0]  # -0.0 was counted as +0.0
    code = code.astype(np.uint8)
    return Palette(nbits, lut, code, histogram_mse(counts, lut, code))


def nearest_code(lut: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of an ascending fp16 ``lut`` for every fp16 bit pattern (exact
    midpoints take the lower entry, NaN 0): what a palette's table holds for values the tensor
    does not contain (int64; the caller sets the present values to their clusters)."""
    c64 = np.asarray(lut, dtype=np.float16).astype(np.float64)
    code = np.searchsorted((c64[:-1] + c64[1:]) / 2, _VALUES, side="left")
    code[np.isnan(_VALUES)] = 0
    return code


def histogram_mse(counts: np.ndarray, lut: np.ndarray, code: np.ndarray) -> float:
    """Mean squared error of the palettized tensor whose bit-pattern histogram is ``counts``."""
    return float(np.dot(counts, (_VALUES0 - np.asarray(lut).astype(np.float64)[code]) ** 2) / int(counts.sum()))


def kmeans_lut(weights: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """(lut, indices) in the shape coremltools' custom ``lut_function`` returns."""
    pal = kmeans_palette(weights, nbits)
    return pal.lut.copy(), pal.indices(weights)


def dequantize_torch(weight, palette: Palette):
    """lut[code[bits]] with torch ops on the weight's own device (no numpy round trip)."""
    import torch

    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float16:
        raise PaletteError(f"weight must be a torch float16 tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    table = torch.from_numpy(palette.table.copy()).to(weight.device)
    idx = weight.reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.index_select(table, 0, idx).view(weight.shape)


def linear_8bit(weights: np.ndarray) -> np.ndarray:
    """Per-output-channel (axis 0) asymmetric uint8 quantization, returned dequantized as fp16.

    The "linear_8bit" baseline; a 1-D tensor is one channel (as in coremltools).
    """
    w = np.asarray(weights)
    if w.dtype.kind != "f" or w.size == 0:
        raise PaletteError(f"weights must be a non-empty float array, got {w.dtype} {w.shape}")
    if not np.isfinite(w).all():
        raise PaletteError("weights contain NaN or inf")
    flat = w.reshape(w.shape[0] if w.ndim > 1 else 1, -1).astype(np.float32)
    lo = flat.min(axis=1).astype(np.float64)
    scale = (flat.max(axis=1).astype(np.float64) - lo) / 255.0
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)  # constant channel: q = 0
    lo32, scale32, inv32 = (v.astype(np.float32)[:, None] for v in (lo, scale, inv))
    q = np.clip(np.rint((flat - lo32) * inv32), 0, 255)
    return (q * scale32 + lo32).astype(np.float16).reshape(w.shape)


_KEYS = ("nbits", "lut", "code", "weight_mse", "digest")


def save_palette(path, palette: Palette) -> None:
    """Compressed .npz, written atomically so readers never see half a file."""
    buf = io.BytesIO()
    np.savez_compressed(buf, nbits=np.int64(palette.nbits), lut=palette.lut, code=palette.code,
                        weight_mse=np.float64(palette.weight_mse), digest=np.str_(palette.digest))
    atomic_write_bytes(os.fspath(path), buf.getvalue())


def load_palette(path) -> Palette:
    """Read a palette written by `save_palette`; the stored digest guards against corruption."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise PaletteError(f"missing {', '.join(missing)}")
            pal = Palette(int(z["nbits"]), z["lut"], z["code"], float(z["weight_mse"]))
            digest = str(z["digest"])
    except FileNotFoundError:
        raise PaletteError(f"palette file not found: {path}") from None
    except (PaletteError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise PaletteError(f"corrupt palette file {path}: {e}") from None
    if digest != pal.digest:
        raise PaletteError(f"corrupt palette file {path}: digest mismatch")
    return pal
