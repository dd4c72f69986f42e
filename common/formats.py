"""Bit depths: the one place that says which depths exist and what a stored weight costs.

A layer of a recipe is stored in one *format*. Today a format is just its bit depth: a
per-tensor palette (LUT) of ``2**bits`` float16 entries plus a ``bits``-bit index per weight,
or ``FLOAT16_BITS`` for a layer left in float16 (not palettized). Every rule that depends on
the format (which depths are valid, what a layer costs, whether it has a LUT) goes through
the functions below, so a richer format (bits plus a granularity: per tensor or grouped
channels, each group with its own LUT) can replace the plain ``int`` here without the
search, the workers or storage re-deriving the arithmetic.
"""
from __future__ import annotations

from numbers import Integral
from typing import Mapping

PALETTE_NBITS = (1, 2, 4, 6, 8)  # palettized depths the Neural Engine accelerates (the searchable ones)
FLOAT16_BITS = 16  # "not palettized": the layer stays in float16
RECIPE_BITS = frozenset(PALETTE_NBITS + (FLOAT16_BITS,))  # what a recipe may give a layer
LUT_ENTRY_BITS = 16  # LUT entries are float16


def is_palettized(bits) -> bool:
    """Whether a layer at ``bits`` is palettized (has a LUT), i.e. not left in float16."""
    return bits != FLOAT16_BITS


def stored_bits(numel, bits):
    """Bits a layer of ``numel`` weights takes at ``bits``: indices plus a float16 LUT of
    ``2**bits`` entries, or ``16 * numel`` in float16. Works on ints and numpy arrays alike."""
    return numel * bits + (bits != FLOAT16_BITS) * LUT_ENTRY_BITS * 2**bits


def check_sizes(sizes: Mapping[str, int]) -> None:
    """``sizes`` ({layer: numel}) must be non-empty, string names, positive integer sizes."""
    if not sizes:
        raise ValueError("sizes is empty: no candidate layers")
    for layer, numel in sizes.items():
        if not isinstance(layer, str):
            raise ValueError(f"layer name {layer!r} is not a string")
        if isinstance(numel, bool) or not isinstance(numel, Integral) or numel <= 0:
            raise ValueError(f"size of layer {layer!r} must be a positive integer, got {numel!r}")


def check_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> None:
    """Every layer of the recipe ``bits`` is a candidate of ``sizes`` at a depth in RECIPE_BITS."""
    check_sizes(sizes)
    for layer, b in bits.items():
        if layer not in sizes:
            raise ValueError(f"layer {layer!r} in the recipe is not a candidate (not in sizes)")
        if isinstance(b, bool) or b not in RECIPE_BITS:
            raise ValueError(f"layer {layer!r}: bits {b!r} not in {sorted(RECIPE_BITS)}")


def average_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Numel-weighted mean bits per weight over all candidates (missing layers count as 16, as Apple's apply does)."""
    check_bits(bits, sizes)
    total = sum(sizes.values())
    return sum(bits.get(layer, FLOAT16_BITS) * n for layer, n in sizes.items()) / total


def size_mb(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Compressed bytes of the candidates / 1e6: indices (numel*b/8) plus a float16 LUT of 2**b entries.

    Apple reports ``numel*b/8`` only; the LUT is added here because it is what ships.
    """
    check_bits(bits, sizes)
    return sum(stored_bits(n, bits.get(layer, FLOAT16_BITS)) for layer, n in sizes.items()) / 8 / 1e6
