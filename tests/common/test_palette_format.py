"""PaletteFormat: spellings, validation, order, equality with Apple's int depths, and what a
format costs (indices plus one float16 LUT per group), checked against arithmetic by hand."""
import pytest

from common.formats import (FLOAT16, LayerSizes, PaletteFormat, average_bits, check_bits, fits, parse_formats,
                            size_mb)


@pytest.mark.parametrize("text, bits, group", [("4", 4, None), ("4g16", 4, 16), ("3g8", 3, 8), (" 8 ", 8, None),
                                               ("16", 16, None), ("1g1", 1, 1)])
def test_spellings_round_trip(text, bits, group):
    f = PaletteFormat.of(text)
    assert (f.bits, f.group_size) == (bits, group)
    assert PaletteFormat.of(str(f)) == f and str(f) == text.strip()
    assert PaletteFormat.of(f.to_json()) == f


@pytest.mark.parametrize("text, message", [("4g0", "group size 0"), ("5", "bits 5"), ("4g", "'4g' is not"),
                                           ("x", "'x' is not"), ("16g4", "float16"), ("4g-2", "is not"),
                                           ("", "is not")])
def test_bad_spellings(text, message):
    with pytest.raises(ValueError, match=message):
        PaletteFormat.of(text)


def test_per_tensor_formats_are_their_int_depths():
    assert PaletteFormat(4) == 4 and hash(PaletteFormat(4)) == hash(4) and {4: "x"}[PaletteFormat(4)] == "x"
    assert PaletteFormat(4, 16) != 4 and PaletteFormat(4, 16) != PaletteFormat(4, 8)
    assert PaletteFormat(4).to_json() == 4 and PaletteFormat(4, 16).to_json() == "4g16"
    assert FLOAT16 == 16 and not FLOAT16.palettized


def test_order_is_bits_then_lut_count():
    given = parse_formats("8,4g16,4,3g16,4g32,2,16".replace(",16", ""))
    assert [str(f) for f in sorted(given)] == ["2", "3g16", "4", "4g32", "4g16", "8"]
    with pytest.raises(ValueError, match="float16 is always a choice"):
        parse_formats("4,16")


def test_sizes_count_one_lut_per_group():
    # a: 64 out channels x 100 = 6400 weights; b: 48 x 50 = 2400 weights (16 divides 48, 32 does not).
    sizes = LayerSizes({"a": 6400, "b": 2400}, {"a": 64, "b": 48})
    recipe = {"a": PaletteFormat(4, 16), "b": 3}
    by_hand_bits = (6400 * 4 + 4 * 16 * 2**4) + (2400 * 3 + 1 * 16 * 2**3)  # a: 64/16 = 4 LUTs; b: 1 LUT
    assert size_mb(recipe, sizes) == pytest.approx(by_hand_bits / 8 / 1e6)
    # Average bits: Apple's count leaves out a per-tensor LUT, a grouped format pays for its LUTs.
    assert average_bits(recipe, sizes) == pytest.approx((6400 * 4 + 4 * 16 * 16 + 2400 * 3) / 8800)
    assert average_bits({"a": 4, "b": 8}, sizes) == pytest.approx((6400 * 4 + 2400 * 8) / 8800)
    assert fits(sizes, "b", "4g16") and not fits(sizes, "b", "4g32")
    with pytest.raises(ValueError, match="does not divide 48"):
        check_bits({"b": "4g32"}, sizes)
    with pytest.raises(ValueError, match="output-channel count"):
        size_mb({"a": "4g16"}, {"a": 6400, "b": 2400})  # plain sizes: grouped costs are unknown
