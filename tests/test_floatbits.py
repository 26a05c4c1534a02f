"""The bit-level float16/bfloat16 <-> float32 conversions give numpy's (and ml_dtypes') results
bit for bit: every narrow bit pattern widened, and every rounding boundary narrowed."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from onnxbalance import floatbits

NARROW = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
ALL_PATTERNS = np.arange(2**16, dtype=np.uint16)


def bits32(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


def finite_values(dtype: np.dtype) -> np.ndarray:
    """Every finite value of ``dtype``, as float32 (exact), in increasing order."""
    values = ALL_PATTERNS.view(dtype).astype(np.float32)
    return np.unique(values[np.isfinite(values)])


def boundaries(dtype: np.dtype) -> np.ndarray:
    """Every finite value of ``dtype``, every midpoint between neighbours (where ties are
    decided), and the float32 numbers on either side of each: all within ``dtype``'s range."""
    values = finite_values(dtype).astype(np.float64)
    midpoints = (values[:-1] + values[1:]) / 2  # exact: a bit more than the narrow precision
    points = np.concatenate([values, midpoints]).astype(np.float32)
    assert (points.astype(np.float64) == np.concatenate([values, midpoints])).all()
    around = [points, np.nextafter(points, np.float32(np.inf)), np.nextafter(points, -np.inf)]
    found = np.concatenate(around)
    return found[np.abs(found) <= values.max()]


@pytest.mark.parametrize("name", NARROW)
def test_widening_matches_numpy_on_every_bit_pattern(name):
    narrow = ALL_PATTERNS.view(NARROW[name])  # NaN payloads, infinities, subnormals, -0 too
    expected = bits32(narrow.astype(np.float32))
    np.testing.assert_array_equal(bits32(floatbits.to_float32(narrow)), expected)
    finite = narrow[np.isfinite(narrow.astype(np.float32))]  # no block that needs numpy
    np.testing.assert_array_equal(
        bits32(floatbits.to_float32(finite)), bits32(finite.astype(np.float32))
    )
    # into a given array; ``finite`` (no fix-up for infinity and NaN) on finite values alike
    out = np.full(finite.shape, np.nan, np.float32)
    assert floatbits.to_float32(finite, out, finite=True) is out
    np.testing.assert_array_equal(bits32(out), bits32(finite.astype(np.float32)))
    strided = narrow.reshape(256, 256)[::3, 1::2]  # any view, and a C-ordered result
    widened = floatbits.to_float32(strided)
    assert widened.flags.c_contiguous and widened.shape == strided.shape
    np.testing.assert_array_equal(bits32(widened), bits32(strided.astype(np.float32)))


def test_float16_widening_without_subnormal_arithmetic_falls_back_exactly(monkeypatch):
    # a processor flushing float32 subnormals would zero float16's through the 2**-112 path
    monkeypatch.setattr(floatbits, "_subnormals_kept", lambda: False)
    narrow = ALL_PATTERNS.view(np.float16)
    np.testing.assert_array_equal(
        bits32(floatbits.to_float32(narrow)), bits32(narrow.astype(np.float32))
    )


def test_subnormal_arithmetic_is_kept_in_this_process():
    assert floatbits._subnormals_kept()  # else the tests above never reach the fast path


@pytest.mark.parametrize("name", NARROW)
def test_widening_is_exact_across_blocks_and_into_any_layout(name):
    """Long arrays, views of any layout, and results into a strided ``out``."""
    narrow = ALL_PATTERNS.view(NARROW[name])
    finite = narrow[np.isfinite(narrow.astype(np.float32))]
    rng = np.random.default_rng(3)
    long = rng.permutation(np.tile(finite, 3))[: 3 * 2**15 + 17]
    np.testing.assert_array_equal(
        bits32(floatbits.to_float32(long)), bits32(long.astype(np.float32))
    )
    square = long[: 300 * 300].reshape(300, 300)
    out = np.full((300, 301), np.nan, np.float32)[:, :300]  # no flat view of it exists
    assert floatbits.to_float32(square, out) is out
    np.testing.assert_array_equal(bits32(out), bits32(square.astype(np.float32)))
    for view in (square.T, square[::-7, 3:250:5], long[:0].reshape(0, 4), long[5]):
        widened = floatbits.to_float32(view)
        assert widened.flags.c_contiguous and widened.shape == view.shape
        np.testing.assert_array_equal(bits32(widened), bits32(view.astype(np.float32)))


@pytest.mark.parametrize("name", NARROW)
def test_narrowing_rounds_like_numpy_at_every_boundary(name):
    dtype = NARROW[name]
    points = boundaries(dtype)
    points = np.concatenate([points, -points, [np.float32(0.0), np.float32(-0.0)]])
    got = floatbits.from_float32(points.astype(np.float32), dtype)
    assert got.dtype == dtype and got.shape == points.shape
    np.testing.assert_array_equal(got.view(np.uint16), points.astype(dtype).view(np.uint16))


@pytest.mark.parametrize(
    ("name", "start", "stop", "step"),
    [
        ("float16", 0, 0x38800000, 997),  # zero up to float16's smallest normal, 2**-14
        ("float16", 0x38800000, 0x477FE000, 1009),  # the normal range up to 65504
        ("bfloat16", 0, 0x7F7F0000, 4099),  # zero up to bfloat16's largest finite value
    ],
)
def test_narrowing_matches_numpy_across_the_range(name, start, stop, step):
    values = np.arange(start, stop, step, dtype=np.uint32).view(np.float32)
    values = np.concatenate([values, -values]).reshape(2, -1)
    got = floatbits.from_float32(values, NARROW[name])
    assert got.shape == values.shape
    np.testing.assert_array_equal(got.view(np.uint16), values.astype(NARROW[name]).view(np.uint16))


def test_other_dtypes_are_cast_by_numpy():
    values = np.array([1.5, -2.25], dtype=np.float32)
    assert floatbits.from_float32(values, np.float32) is values  # nothing to do: no copy
    np.testing.assert_array_equal(floatbits.from_float32(values, np.float64), [1.5, -2.25])
    doubles = np.array([1.0 + 2.0**-40], dtype=np.float64)  # double to half: rounded once
    assert (
        floatbits.from_float32(doubles, np.float16).tobytes()
        == doubles.astype(np.float16).tobytes()
    )
    np.testing.assert_array_equal(floatbits.to_float32(np.array([3.0])), [3.0])


def test_byte_swapped_arrays_are_converted_by_numpy():
    values = np.array([1.5, -(2.0**-20), 65504.0], dtype=">f2")  # big-endian float16
    assert floatbits.to_float32(values).tolist() == [1.5, -(2.0**-20), 65504.0]
    narrow = floatbits.from_float32(np.array([1.5, -3.0], dtype=np.float32), np.dtype(">f2"))
    assert narrow.dtype == np.dtype(">f2") and narrow.tolist() == [1.5, -3.0]


@pytest.mark.parametrize("name", NARROW)
def test_scalars_and_views_keep_their_shape(name):
    dtype = NARROW[name]
    scalar = np.array(-0.75, dtype=np.float32)
    assert floatbits.from_float32(scalar, dtype).shape == ()
    assert floatbits.from_float32(scalar, dtype).item() == -0.75
    assert floatbits.to_float32(np.array(3.5, dtype=dtype)).shape == ()
    columns = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous
    np.testing.assert_array_equal(floatbits.from_float32(columns, dtype), columns.astype(dtype))


@pytest.mark.parametrize(("name", "unit_round_off"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_round_off_steps_are_the_roundings_of_v_times_one_plus_delta(name, unit_round_off):
    # Every bit pattern, with 64 independent random draws each: the value must land exactly
    # where rounding v * (1 + delta) to nearest would, delta = +-u * s / 2^15 as the draw sets
    # it; the reference compares |v delta| with half the gap to each neighbour in float64
    # (exact: the neighbours come from the patterns next to v, whatever the binade), and
    # values that would leave the range, infinities and NaN stay.
    dtype = NARROW[name]
    values = ALL_PATTERNS.view(dtype)
    with np.errstate(invalid="ignore"):  # NaN patterns
        wide = values.astype(np.float64)
        gap_up = np.abs((ALL_PATTERNS + np.uint16(1)).view(dtype).astype(np.float64)) - np.abs(wide)
        gap_down = np.abs(wide) - np.abs(
            (ALL_PATTERNS - np.uint16(1)).view(dtype).astype(np.float64)
        )
    magnitude = ALL_PATTERNS & 0x7FFF
    finite = np.isfinite(wide)
    rng = np.random.default_rng(3)
    ties = steps = 0
    for _ in range(64):
        draws = rng.integers(0, 2**16, ALL_PATTERNS.size, dtype=np.uint16)
        down = draws >= 2**15
        gap = np.where(down, gap_down, gap_up)
        with np.errstate(invalid="ignore"):
            reach = np.abs(wide) * unit_round_off * (draws & 0x7FFF) / 2.0**15  # |v delta|
            step = finite & (magnitude > 0) & (reach > gap / 2)
            step &= np.isfinite(np.where(down, wide, wide + np.sign(wide) * gap_up))
            tie = finite & (reach == gap / 2) & (reach > 0)
        expected = np.where(step, np.where(down, ALL_PATTERNS - 1, ALL_PATTERNS + 1), ALL_PATTERNS)
        moved = floatbits.moved_by_round_off(values, draws).view(np.uint16)
        assert (moved == expected)[~tie].all()
        assert (moved[tie] == ALL_PATTERNS[tie]).all()  # exactly half the gap: a null set
        ties += int(tie.sum())
        steps += int(step.sum())
    assert steps > 64 * 2**14  # a good share of the values moved (each binade's upper half)
    assert moved.dtype == np.uint16 and floatbits.moved_by_round_off(values, draws).dtype == dtype


def test_round_off_steps_keep_the_shape():
    values = np.arange(12, dtype=np.float16).reshape(3, 4)[:, 1:] + np.float16(0.5)
    moved = floatbits.moved_by_round_off(values, np.full(values.shape, 0xFFFF, np.uint16))
    assert moved.shape == (3, 3) and moved.dtype == np.float16
    # the largest |delta| downwards moves every normal value whose mantissa exceeds 1 + 2^-15
    assert (moved < values).all()
