"""Palettes of any format: per tensor (`Palette`) or grouped along the output channels
(`GroupedPalette`), fitted, applied, saved and loaded through one set of functions.

A grouped format (``4g16``) gives every ``group_size`` consecutive output channels (axis 0 of a
conv/linear weight, as coremltools' ``per_grouped_channel`` with ``channel_axis=0``) their own
LUT. Each group's LUT is the exact k-means of that group's fp16 values, i.e. `kmeans_palette`
applied to the group: the histogram method works per group unchanged. (coremltools' own
``per_grouped_channel`` k-means does the same with ``kmeans1d`` for groups of 10,000 elements
and more, and falls back to scikit-learn's heuristic k-means below that; ours stays exact.)

Per-tensor palettes are that exact k-means too, except under Apple's protocol for a tensor under
10,000 elements (``apple=True``): Apple's script hands those to scikit-learn through coremltools,
so they get coremltools' own call (`workers.apple_kmeans`). Grouped formats are not Apple's and
keep the exact k-means under every protocol.
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
from common.formats import PaletteFormat
from workers.apple_kmeans import apple_palette, takes_sklearn
from workers.palettize import Palette, PaletteError, _bits, dequantize_torch as _dequantize_tensor
from workers.palettize import kmeans_palette, load_palette as _load_tensor_palette, palette_from_histogram
from workers.palettize import save_palette as _save_tensor_palette


@dataclass(frozen=True, eq=False)
class GroupedPalette:
    """One `Palette` per group of ``group_size`` output channels, in channel order."""

    group_size: int
    groups: tuple[Palette, ...]

    def __post_init__(self):
        groups = tuple(self.groups)
        if not groups or not all(isinstance(g, Palette) for g in groups):
            raise PaletteError("a grouped palette needs at least one per-group Palette")
        if len({g.nbits for g in groups}) != 1:
            raise PaletteError("the groups of a grouped palette must have the same bits")
        PaletteFormat(groups[0].nbits, self.group_size)  # validates the group size
        object.__setattr__(self, "groups", groups)

    @property
    def nbits(self) -> int:
        return self.groups[0].nbits

    @property
    def format(self) -> PaletteFormat:
        return PaletteFormat(self.nbits, self.group_size)

    @property
    def weight_mse(self) -> float:
        """Groups have equal sizes, so the mean of the group MSEs is the tensor's MSE."""
        return float(np.mean([g.weight_mse for g in self.groups]))

    @property
    def luts(self) -> np.ndarray:
        """(groups, 2**bits) float16: row g is the LUT of channels [g*group_size, (g+1)*group_size)."""
        return np.stack([g.lut for g in self.groups])

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(str(self.format).encode())
        for g in self.groups:
            h.update(g.digest.encode())
        return h.hexdigest()

    def __eq__(self, other):
        return isinstance(other, GroupedPalette) and self.digest == other.digest

    def __hash__(self):
        return hash(self.digest)

    def split(self, weights: np.ndarray) -> np.ndarray:
        """(groups, elements per group) view of ``weights`` (axis 0 split into the groups)."""
        _bits(weights)
        if weights.ndim < 1 or weights.shape[0] != self.group_size * len(self.groups):
            raise PaletteError(f"weights with {weights.shape[0] if weights.ndim else 0} output channels do not "
                               f"match {len(self.groups)} groups of {self.group_size}")
        return np.ascontiguousarray(weights).reshape(len(self.groups), -1)

    def indices(self, weights: np.ndarray) -> np.ndarray:
        """Index of every weight in its group's LUT, shaped like ``weights``."""
        rows = self.split(weights)
        return np.stack([g.indices(r) for g, r in zip(self.groups, rows)]).reshape(weights.shape)

    def dequantize(self, weights: np.ndarray) -> np.ndarray:
        rows = self.split(weights)
        return np.stack([g.dequantize(r) for g, r in zip(self.groups, rows)]).reshape(weights.shape)


PALETTES = (Palette, GroupedPalette)


def fit_palette(weights: np.ndarray, fmt, *, apple: bool = False) -> Palette | GroupedPalette:
    """The k-means palette of an fp16 weight in ``fmt`` (per tensor, or per channel group): the
    exact one, or with ``apple`` (Apple's protocol) coremltools' own call for a per-tensor format
    of a weight under 10,000 elements, as Apple's script palettizes it."""
    f = PaletteFormat.of(fmt)
    if not f.palettized:
        raise PaletteError("float16 has no palette")
    if not f.grouped:
        if apple and takes_sklearn(np.size(weights)):
            return apple_palette(weights, f.bits)
        return kmeans_palette(weights, f.bits)
    _bits(weights)
    channels = weights.shape[0] if weights.ndim else 0
    if not channels or not f.fits(channels):
        raise PaletteError(f"format {f}: group size does not divide {channels} output channels")
    rows = np.ascontiguousarray(weights).reshape(channels // f.group_size, -1)
    return GroupedPalette(f.group_size, tuple(kmeans_palette(r, f.bits) for r in rows))


def palette_from_histograms(counts: np.ndarray, fmt) -> Palette | GroupedPalette:
    """`fit_palette` from bit-pattern histograms (what the CPU palette tasks run): one row of
    65,536 counts per tensor, or per channel group for a grouped format, in channel order."""
    f = PaletteFormat.of(fmt)
    if not f.grouped:
        return palette_from_histogram(counts, f.bits)
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise PaletteError(f"format {f} needs one histogram per channel group")
    return GroupedPalette(f.group_size, tuple(palette_from_histogram(c, f.bits) for c in counts))


def palette_from_sample(sample: np.ndarray, fmt) -> Palette | GroupedPalette:
    """What the CPU palette tasks run on what an evaluator sent for a layer: its histogram(s)
    (integer counts, `palette_from_histograms`), or, under Apple's protocol for a weight under
    10,000 elements, the float16 weight itself, whose scikit-learn k-means depends on more than
    its histogram (`fit_palette` with ``apple=True``)."""
    sample = np.asarray(sample)
    if sample.dtype == np.float16:
        return fit_palette(sample, fmt, apple=True)
    return palette_from_histograms(sample, fmt)


def dequantize_torch(weight, palette):
    """The palettized weight with torch ops on the weight's own device: per group, one gather."""
    if isinstance(palette, Palette):
        return _dequantize_tensor(weight, palette)
    import torch

    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float16:
        raise PaletteError(f"weight must be a torch float16 tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    n = len(palette.groups)
    if weight.ndim < 1 or weight.shape[0] != n * palette.group_size:
        raise PaletteError(f"weight with shape {tuple(weight.shape)} does not match {n} groups of {palette.group_size}")
    tables = torch.from_numpy(np.stack([g.table for g in palette.groups])).to(weight.device)
    idx = (weight.contiguous().reshape(n, -1).view(torch.int16).to(torch.int64)) & 0xFFFF
    return torch.gather(tables, 1, idx).view(weight.shape)


def save_palette(path, palette) -> None:
    """Compressed .npz, written atomically; a grouped palette stores its groups' LUTs and tables stacked."""
    if isinstance(palette, Palette):
        return _save_tensor_palette(path, palette)
    buf = io.BytesIO()
    np.savez_compressed(buf, nbits=np.int64(palette.nbits), group_size=np.int64(palette.group_size),
                        lut=palette.luts, code=np.stack([g.code for g in palette.groups]),
                        weight_mse=np.array([g.weight_mse for g in palette.groups]), digest=np.str_(palette.digest))
    atomic_write_bytes(os.fspath(path), buf.getvalue())


def load_palette(path) -> Palette | GroupedPalette:
    """Read a palette written by `save_palette`; the stored digest guards against corruption."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            if "group_size" not in z.files:
                grouped = None
            else:
                nbits, size = int(z["nbits"]), int(z["group_size"])
                groups = tuple(Palette(nbits, lut, code, mse) for lut, code, mse in
                               zip(z["lut"], z["code"], z["weight_mse"], strict=True))
                grouped, digest = GroupedPalette(size, groups), str(z["digest"])
    except FileNotFoundError:
        raise PaletteError(f"palette file not found: {path}") from None
    except (PaletteError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise PaletteError(f"corrupt palette file {path}: {e}") from None
    if grouped is None:
        return _load_tensor_palette(path)
    if digest != grouped.digest:
        raise PaletteError(f"corrupt palette file {path}: digest mismatch")
    return grouped
