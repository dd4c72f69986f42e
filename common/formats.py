"""Palette formats: the one place that says which formats exist and what a stored weight costs.

A layer of a recipe is stored in one *format* (`PaletteFormat`): ``bits`` per weight index into
float16 look-up tables (LUTs) of ``2**bits`` entries, either one LUT for the whole tensor
(per tensor, Apple's only kind, spelled ``4``) or one LUT per ``group_size`` output channels
(axis 0 of a conv/linear weight, spelled ``4g16``); ``16`` is the layer left in float16.

A per-tensor format *is* its bit depth: it equals and hashes like that ``int``, so Apple's
integer recipes, older stored rows and JSON files compare equal to the formats they spell and
an Apple-style search is the same computation as before formats existed. Grouped formats
equal only themselves. Every rule that depends on the format (which are valid, what a layer
costs, whether it has a LUT) goes through this module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from numbers import Integral
from typing import Mapping

PALETTE_NBITS = (1, 2, 4, 6, 8)  # Apple's per-tensor depths (the Neural Engine's; the default search space)
LUT_NBITS = (1, 2, 3, 4, 6, 8)  # every depth coremltools 9 palettizes (3 bits needs iOS 18 / macOS 15)
FLOAT16_BITS = 16  # "not palettized": the layer stays in float16
RECIPE_BITS = frozenset(PALETTE_NBITS + (FLOAT16_BITS,))  # Apple's per-tensor recipe values
LUT_ENTRY_BITS = 16  # LUT entries are float16
_SPELLING = re.compile(r"(\d+)(?:g(\d+))?")
# The spellings of palettized formats exactly, as a JSON Schema pattern (published by the routes).
LUT_SPELLING_PATTERN = rf"^({'|'.join(map(str, LUT_NBITS))})(g0*[1-9][0-9]*)?$"


@dataclass(frozen=True, eq=False)
class PaletteFormat:
    """Bits per index and LUT granularity: ``group_size=None`` is one LUT per tensor, an int is
    one LUT per that many output channels. Validated at construction; ``str`` is its spelling."""

    bits: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        b, g = self.bits, self.group_size
        if isinstance(b, bool) or not isinstance(b, Integral) or int(b) not in LUT_NBITS + (FLOAT16_BITS,):
            raise ValueError(f"bits {b!r} is not a palette depth: choose from {','.join(map(str, LUT_NBITS))} "
                             f"(or {FLOAT16_BITS}: float16)")
        if g is not None and (isinstance(g, bool) or not isinstance(g, Integral) or int(g) < 1):
            raise ValueError(f"group size {g!r} must be a positive integer")
        if g is not None and int(b) == FLOAT16_BITS:
            raise ValueError("float16 (16) has no LUT to group")
        object.__setattr__(self, "bits", int(b))
        object.__setattr__(self, "group_size", None if g is None else int(g))

    @classmethod
    def of(cls, value) -> "PaletteFormat":
        """A format from its spelling (``4``, ``"4"``, ``"4g16"``), an int depth or a format."""
        if isinstance(value, PaletteFormat):
            return value
        if isinstance(value, Integral) and not isinstance(value, bool):
            return cls(int(value))
        m = _SPELLING.fullmatch(value.strip()) if isinstance(value, str) else None
        if m is None:
            raise ValueError(f"'{value}' is not a palette format: write bits (e.g. 4) or bits g group size "
                             f"(e.g. 4g16), bits from {','.join(map(str, LUT_NBITS))}")
        return cls(int(m[1]), None if m[2] is None else int(m[2]))

    @property
    def palettized(self) -> bool:
        return self.bits != FLOAT16_BITS

    @property
    def grouped(self) -> bool:
        return self.group_size is not None

    @property
    def needs_ios18(self) -> bool:
        """Core ML has grouped LUTs and 3-bit indices from iOS 18 / macOS 15 on."""
        return self.grouped or self.bits == 3

    def lut_count(self, channels: int | None) -> int:
        """LUTs a layer with ``channels`` output channels needs (0 in float16)."""
        if not self.palettized:
            return 0
        if not self.grouped:
            return 1
        if channels is None:
            raise ValueError(f"format {self} needs the layer's output-channel count")
        if not self.fits(channels):
            raise ValueError(f"format {self}: group size does not divide {channels} output channels")
        return channels // self.group_size

    def fits(self, channels: int) -> bool:
        """Whether a layer with ``channels`` output channels can take this format."""
        return not self.grouped or channels % self.group_size == 0

    def to_json(self):
        """The JSON value: an int for per-tensor formats (Apple's), the spelling string otherwise."""
        return str(self) if self.grouped else self.bits

    def _key(self):
        # Order: fewer bits first, then fewer LUTs (per tensor, then larger groups): "lowest" is cheapest.
        return (self.bits, 0.0 if self.group_size is None else 1.0 / self.group_size)

    def __str__(self) -> str:
        return f"{self.bits}g{self.group_size}" if self.grouped else str(self.bits)

    def __repr__(self) -> str:
        return f"PaletteFormat({self})"

    def __eq__(self, other) -> bool:
        if isinstance(other, PaletteFormat):
            return (self.bits, self.group_size) == (other.bits, other.group_size)
        if isinstance(other, Integral) and not isinstance(other, bool):
            return not self.grouped and self.bits == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.bits) if not self.grouped else hash((self.bits, self.group_size))

    def __lt__(self, other) -> bool:
        return self._key() < PaletteFormat.of(other)._key()

    def __le__(self, other) -> bool:
        return self._key() <= PaletteFormat.of(other)._key()

    def __gt__(self, other) -> bool:
        return self._key() > PaletteFormat.of(other)._key()

    def __ge__(self, other) -> bool:
        return self._key() >= PaletteFormat.of(other)._key()


FLOAT16 = PaletteFormat(FLOAT16_BITS)
APPLE_FORMATS = tuple(PaletteFormat(b) for b in PALETTE_NBITS)


def parse_formats(text: str) -> tuple[PaletteFormat, ...]:
    """``"2,3g16,4"`` -> formats in the order given (one-line ValueError for a bad spelling)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    out = []
    for p in parts:
        f = PaletteFormat.of(p)
        if not f.palettized:
            raise ValueError(f"'{p}': float16 is always a choice; list palette formats only")
        out.append(f)
    return tuple(out)


def palettized_format(value) -> PaletteFormat | None:
    """``value`` as a palettized format (int depths and spellings accepted), or None for float16
    and anything that is not a format: callers word the error for their own input."""
    try:
        fmt = PaletteFormat.of(value)
    except (ValueError, AttributeError):
        return None
    return fmt if fmt.palettized else None


def is_palettized(fmt) -> bool:
    """Whether a layer in ``fmt`` is palettized (has a LUT), i.e. not left in float16."""
    return PaletteFormat.of(fmt).palettized


def stored_bits(numel, bits, luts: int = 1):
    """Bits a layer of ``numel`` weights takes at ``bits``: indices plus ``luts`` float16 LUTs of
    ``2**bits`` entries, or ``16 * numel`` in float16. Works on ints and numpy arrays alike."""
    return numel * bits + (bits != FLOAT16_BITS) * LUT_ENTRY_BITS * 2**bits * luts


def out_channels(sizes: Mapping[str, int], layer: str) -> int | None:
    """A candidate's output-channel count, where ``sizes`` carries it (`LayerSizes`)."""
    return getattr(sizes, "channels", {}).get(layer)


def fits(sizes: Mapping[str, int], layer: str, fmt) -> bool:
    """Whether ``layer`` can take ``fmt`` (its output channels split into whole groups); a layer
    whose channel count ``sizes`` does not carry is assumed to (per-tensor formats always do)."""
    channels = out_channels(sizes, layer)
    return channels is None or PaletteFormat.of(fmt).fits(channels)


class LayerSizes(dict):
    """``{layer: numel}`` of the candidates plus ``channels`` (``{layer: output channels}``),
    which grouped formats need to count their LUTs (one per group). A plain dict works as
    sizes wherever no grouped format appears."""

    def __init__(self, numel: Mapping[str, int], channels: Mapping[str, int]):
        super().__init__(numel)
        self.channels = dict(channels)


def layer_bits(sizes: Mapping[str, int], layer: str, fmt, all_luts: bool = True) -> int:
    """Bits ``layer`` takes in ``fmt``: indices plus LUTs. ``all_luts=False`` is Apple's average
    bits: a per-tensor format's single LUT is left out (negligible, Apple never counts it), while
    a grouped format's LUTs, one per group, are counted since they are what grouping costs."""
    f = PaletteFormat.of(fmt)
    luts = f.lut_count(out_channels(sizes, layer))
    if not all_luts and not f.grouped:
        luts = 0
    return stored_bits(int(sizes[layer]), f.bits, luts)


def check_sizes(sizes: Mapping[str, int]) -> None:
    """``sizes`` ({layer: numel}) must be non-empty, string names, positive integer sizes."""
    if not sizes:
        raise ValueError("sizes is empty: no candidate layers")
    for layer, numel in sizes.items():
        if not isinstance(layer, str):
            raise ValueError(f"layer name {layer!r} is not a string")
        if isinstance(numel, bool) or not isinstance(numel, Integral) or numel <= 0:
            raise ValueError(f"size of layer {layer!r} must be a positive integer, got {numel!r}")


def check_bits(bits: Mapping[str, object], sizes: Mapping[str, int]) -> None:
    """Every layer of the recipe ``bits`` is a candidate of ``sizes`` in a valid format that fits it."""
    check_sizes(sizes)
    for layer, b in bits.items():
        if layer not in sizes:
            raise ValueError(f"layer {layer!r} in the recipe is not a candidate (not in sizes)")
        try:
            PaletteFormat.of(b).lut_count(out_channels(sizes, layer))
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"layer {layer!r}: {exc}") from None


def average_bits(bits: Mapping[str, object], sizes: Mapping[str, int]) -> float:
    """Numel-weighted mean bits per weight over all candidates (missing layers count as 16, as
    Apple's apply does): Apple's index bits, plus the LUTs of grouped formats (`layer_bits`)."""
    check_bits(bits, sizes)
    total = sum(sizes.values())
    return sum(layer_bits(sizes, layer, bits.get(layer, FLOAT16_BITS), False) for layer in sizes) / total


def size_mb(bits: Mapping[str, object], sizes: Mapping[str, int]) -> float:
    """Compressed bytes of the candidates / 1e6: indices (numel*b/8) plus every float16 LUT.

    Apple reports ``numel*b/8`` only; the LUTs are added here because they are what ships.
    """
    check_bits(bits, sizes)
    return sum(layer_bits(sizes, layer, bits.get(layer, FLOAT16_BITS)) for layer in sizes) / 8 / 1e6


def formats_json(bits: Mapping[str, object]) -> dict:
    """A recipe map as JSON values: ints for per-tensor formats, spellings for grouped ones."""
    return {layer: PaletteFormat.of(b).to_json() for layer, b in bits.items()}


def recipe_formats(bits: Mapping[str, object]) -> dict[str, PaletteFormat]:
    """A recipe map read from JSON or storage (ints and spellings) as formats."""
    return {layer: PaletteFormat.of(b) for layer, b in bits.items()}
