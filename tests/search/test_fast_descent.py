"""Fast mode under an evaluation floor: layers whose anchor measurement the floor hides are
measured one depth lower until their own noise shows, and predictions come from such a depth."""
import numpy as np
import pytest

from common.formats import PaletteFormat
from search.recipes.fast_plan import floor_descent
from search.recipes.noise_model import NoiseTable

F = PaletteFormat.of
FLOOR_DB = 80.0
FLOOR = np.full(2, 10 ** (-FLOOR_DB / 10))
SIZES = {"a": 64, "b": 64, "c": 64, "d": 64}
NBITS = (1, 2, 4, 6, 8)
MSE = {F(b): {l: 10.0 ** (-b) for l in SIZES} for b in NBITS}


def power(db):
    return np.full(2, 10 ** (-db / 10))


def test_descent_goes_one_depth_lower_until_the_noise_shows():
    measured = {("a", F(4)): power(FLOOR_DB - 6),            # 6 dB over the floor: shows
                ("b", F(4)): power(FLOOR_DB - 1),            # hidden, 2 bits not measured yet
                ("c", F(4)): power(FLOOR_DB - 1), ("c", F(2)): power(FLOOR_DB - 2),   # hidden twice
                ("d", F(4)): power(FLOOR_DB), ("d", F(2)): power(FLOOR_DB), ("d", F(1)): power(FLOOR_DB - 1)}
    first = [(l, F(4)) for l in SIZES]
    chain, todo = floor_descent(measured, MSE, SIZES, NBITS, first, FLOOR)
    assert sorted(todo) == [("b", F(2)), ("c", F(1))]
    assert sorted(chain) == [("c", F(2)), ("d", F(1)), ("d", F(2))]  # d: nothing lower than 1 bit
    # bit-exact arithmetic (no floor): nothing descends
    assert floor_descent(measured, MSE, SIZES, NBITS, first, None) == ([], [])


def test_descent_stops_where_the_rest_is_a_short_extrapolation():
    """A palette's weight MSE falls ~6 dB per bit (bench model: 1 -> 2 bits 5.9 dB, 2 -> 4 bits
    11.5 dB). A bound from a hidden 2-bit run predicts 1 bit across ~6 dB, within the 9 dB
    (8x) limit, so the descent stops at 2 bits; from 4 or 6 bits the gap to 1 bit is wider."""
    mse = {F(b): {l: 4.0 ** (-b) for l in SIZES} for b in NBITS}  # 6.02 dB per bit
    hidden = power(FLOOR_DB - 1)
    measured = {("a", F(4)): hidden, ("a", F(2)): hidden,  # stops: 1 bit is 4x the 2-bit MSE
                ("b", F(6)): hidden,                       # next: 4 bits (1 bit is 1024x)
                ("c", F(6)): hidden, ("c", F(4)): hidden}  # next: 2 bits (1 bit is 64x)
    first = [("a", F(4)), ("b", F(6)), ("c", F(6))]
    chain, todo = floor_descent(measured, mse, SIZES, NBITS, first, FLOOR)
    assert sorted(chain) == [("a", F(2)), ("c", F(4))]
    assert sorted(todo) == [("b", F(4)), ("c", F(2))]
    # the limit sits between one bit (4x) and two (16x): at 16x per bit the 2-bit bound goes on
    steep = {F(b): {l: 16.0 ** (-b) for l in SIZES} for b in NBITS}
    assert ("a", F(1)) in floor_descent(measured, steep, SIZES, NBITS, first, FLOOR)[1]


@pytest.mark.parametrize("shown_db", [FLOOR_DB - 10.0, FLOOR_DB - 1.0])
def test_predictions_come_from_a_depth_whose_noise_shows(shown_db):
    iso = {4: {l: [FLOOR_DB - 0.5] * 2 for l in SIZES}, 1: {l: [shown_db] * 2 for l in SIZES}}
    table = NoiseTable.from_anchors(iso, MSE, [210.0, 210.0], list(SIZES), NBITS, FLOOR)
    raw1 = 10 ** (-shown_db / 10)
    # 1 bit shows (10 dB over the floor): its noise above the floor, scaled by the MSE ratio;
    # 1 dB over: no depth shows, so the lowest one (1 bit) is the base, as half its raw power
    base = raw1 - FLOOR[0] if shown_db == FLOOR_DB - 10.0 else raw1 / 2
    for b in (6, 8):
        expect = base * MSE[F(b)]["a"] / MSE[F(1)]["a"]
        assert table.noise[F(b)][0] == pytest.approx(np.full(2, expect), rel=1e-12)
