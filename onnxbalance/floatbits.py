"""Exact float16/bfloat16 <-> float32 conversions by bit manipulation (numpy only).

numpy converts float16 one element at a time (measured here: 1 ns an element from float16,
2 ns to it, 4-5 ns when a few percent of the values are subnormal) and ml_dtypes converts
bfloat16 almost as slowly; a dozen whole-array integer operations on blocks that stay in cache
do the same in well under half of that, with bit-identical results. Widening:

* bfloat16 is the top half of a float32: shifting its 16 bits up by 16 is the conversion, NaN
  payloads and all.
* float16 (1 sign, 5 exponent, 10 mantissa bits): the sign moves to bit 31 and exponent and
  mantissa to bits 13-27, which reads as the float32 ``value * 2**-112`` for normal and
  subnormal numbers alike; one multiplication by ``2**112`` (exact) restores the value. Infinity
  and NaN (exponent 31) would come out finite (``|x| >= 2**16``, beyond float16's largest
  65504), so a block holding one is converted by numpy instead; so is everything when the
  processor flushes float32 subnormals to zero (a flag some libraries set), which would lose the
  float16 subnormals on their way through ``2**-112``. On x86 each float16 subnormal costs that
  multiplication a microcode assist: with 1.5% of them (the weights of
  ``benchmarks/big_model.py``) widening is only as fast as numpy's; with the usual few per
  thousand, nearly twice as fast.

Narrowing (round to nearest, ties to even, as numpy and ml_dtypes round), for finite values
within the narrow type's range (the caller checks that; anything else goes to numpy):

* bfloat16: adding ``0x7FFF`` plus the lowest kept bit to the float32 bits carries exactly
  when the dropped half is above the midpoint, or at it with the kept part odd.
* float16 (the branch-free method of M. Dukhan's FP16 library): adding ``4|x|`` to 2^15 times
  x's power of two (at least float16's smallest normal, 2^-14) makes float32's own round to
  nearest even round |x| to float16's precision, subnormals included (a carry out of the
  mantissa moves into the exponent as float16's does); the sum's low bits then hold float16's
  exponent and mantissa, read off with shifts and masks. A flush-to-zero processor changes
  nothing: float32's subnormals lie far below float16's, where every result is a signed zero.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT16 = np.dtype(np.float16)
_FLOAT16_IN_FLOAT32 = 0x8FFFE000  # sign bit and the 15 bits of exponent and mantissa, shifted
_REBIAS = np.float32(2.0**112)  # float32's exponent bias 127 minus float16's 15, as a factor
_BEYOND_FLOAT16 = np.float32(2.0**16)  # what infinity and NaN become without their fix-up
_EXPONENT = 0x7F800000
_FLOAT16_SMALLEST_NORMAL = 0x38800000  # 2**-14, as float32 bits
_TIMES_2_TO_15 = 0x07800000  # added to float32 bits: the value times 2**15


def _subnormals_kept() -> bool:
    """Whether float32 arithmetic on subnormal operands is exact here (no denormals-are-zero)."""
    tiny = np.array([2.0**-140], dtype=np.float32)  # a float32 subnormal
    return bool(tiny[0] * _REBIAS == np.float32(2.0**-28))


def to_float32(
    values: np.ndarray, out: np.ndarray | None = None, finite: bool = False
) -> np.ndarray:
    """A new C-ordered float32 array with the values of ``values`` (any float dtype), exactly as
    ``values.astype(np.float32)`` gives them, bit for bit; into ``out`` (a float32 array of the
    same shape) if given. ``finite``: the caller has checked that no value is infinite or NaN
    (float16's fix-up for them, two reductions, is skipped)."""
    dtype = values.dtype
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if not dtype.isnative or dtype not in (_FLOAT16, _BFLOAT16):
        np.copyto(out, values, casting="unsafe")
        return out
    bits = out.view(np.uint32)
    if dtype == _BFLOAT16:
        np.copyto(bits, values.view(np.uint16))
        np.left_shift(bits, 16, out=bits)
        return out
    if not _subnormals_kept():
        np.copyto(out, values)
        return out
    np.copyto(bits, values.view(np.int16), casting="unsafe")  # the sign fills bits 15-31
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _FLOAT16_IN_FLOAT32, out=bits)
    np.multiply(out, _REBIAS, out=out)
    if finite or not out.size:
        return out
    if out.max() >= _BEYOND_FLOAT16 or out.min() <= -_BEYOND_FLOAT16:
        np.copyto(out, values)  # infinity or NaN among them
    return out


def from_float32(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values.astype(dtype, copy=False)``, bit for bit, for ``values`` whose magnitudes are
    all at most ``dtype``'s largest finite value (no NaN): the caller has checked that."""
    dtype = np.dtype(dtype)
    if values.dtype != np.float32 or dtype not in (_FLOAT16, _BFLOAT16) or not dtype.isnative:
        return values.astype(dtype, copy=False)
    values = values if values.flags.c_contiguous else values.copy()  # a scalar stays one
    bits = values.view(np.uint32)
    rounded = np.empty(values.shape, dtype=np.uint32)
    out = np.empty(values.shape, dtype=dtype)
    if dtype == _BFLOAT16:
        np.right_shift(bits, 16, out=rounded)
        np.bitwise_and(rounded, 1, out=rounded)  # the lowest kept bit: ties go to even
        np.add(rounded, bits, out=rounded)
        np.add(rounded, 0x7FFF, out=rounded)
        np.right_shift(rounded, 16, out=rounded)
        np.copyto(out.view(np.uint16), rounded, casting="unsafe")
        return out
    magic = np.empty(values.shape, dtype=np.uint32)
    np.bitwise_and(bits, _EXPONENT, out=magic)
    np.maximum(magic, _FLOAT16_SMALLEST_NORMAL, out=magic)
    np.add(magic, _TIMES_2_TO_15, out=magic)
    total = rounded.view(np.float32)
    np.abs(values, out=total)
    np.multiply(total, np.float32(4.0), out=total)
    np.add(magic.view(np.float32), total, out=total)  # the rounding happens here
    np.right_shift(rounded, 13, out=magic)
    np.bitwise_and(magic, 0x7C00, out=magic)  # exponent
    np.bitwise_and(rounded, 0x0FFF, out=rounded)  # mantissa, its carry into the exponent
    np.add(rounded, magic, out=rounded)
    np.right_shift(bits, 16, out=magic)
    np.bitwise_and(magic, 0x8000, out=magic)  # sign
    np.bitwise_or(rounded, magic, out=rounded)
    np.copyto(out.view(np.uint16), rounded, casting="unsafe")
    return out


_NARROW_FORMATS = {_FLOAT16: (10, 0x1F), _BFLOAT16: (7, 0xFF)}
"""Mantissa bits and the all-ones exponent field of the 16-bit formats."""
_STEP_CHUNK = 1 << 15  # elements per round of :func:`moved_by_round_off`: its buffers stay in L2


def moved_by_round_off(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """A new array of ``values`` (float16 or bfloat16) each rounded from ``v * (1 + delta)``,
    delta uniform in [-u, u] (u the format's unit round-off), as 16 random bits per value
    (``draws``, uint16, as many) decide; values that would leave the range, infinities and NaN
    stay as they are.

    Such a rounding gives v or a neighbour of it. For a normal v with mantissa m in [1, 2) (its
    t fraction bits f read as the integer K = 2^t + f, m = K / 2^t), v * delta passes half the
    gap to the next magnitude (one unit in the last place) when |delta| m > u: probability
    (1 - 2^t / K) / 2 each way. The gap below is the same, except below a power of two (f = 0,
    not the smallest normal), where it is half as wide: probability 1/4 down, which K = 2^(t+1)
    gives. A subnormal never moves (v u stays below half its gap); with K = f it cannot. The
    draw's top bit picks the direction and its other 15 bits s set |delta| = u s / 2^15, so
    the value steps when s K > 2^(15+t): the exact probabilities to within 2^-15. Stepping the
    stored bits by one moves the magnitude to its neighbour, for either sign and across powers
    of two. About 2 ns a value (the float route, widen, multiply, round, costs 8-10).
    """
    mantissa_bits, top_exponent = _NARROW_FORMATS[values.dtype]
    bits = np.ascontiguousarray(values).reshape(-1).view(np.uint16)
    draws = draws.reshape(-1)
    moved = np.empty_like(bits)
    one = 1 << mantissa_bits  # 2^t, and the lowest bit of the exponent field
    size = min(_STEP_CHUNK, bits.size)
    exponent, scale = np.empty(size, np.uint16), np.empty(size, np.uint16)
    below, down = np.empty(size, np.bool_), np.empty(size, np.bool_)
    reach = np.empty(size, np.uint32)
    for start in range(0, bits.size, _STEP_CHUNK):
        chunk, drawn, out = (a[start : start + _STEP_CHUNK] for a in (bits, draws, moved))
        n = len(chunk)
        e, k, b, d, r = exponent[:n], scale[:n], below[:n], down[:n], reach[:n]
        np.bitwise_and(chunk, top_exponent * one, out=e)
        # the largest finite magnitude, infinity or NaN among them: the range's edge in reach
        at_edge = int(e.max()) >= (top_exponent - 1) * one
        np.bitwise_and(chunk, one - 1, out=k)
        np.greater_equal(drawn, 1 << 15, out=d)
        np.equal(k, 0, out=b)
        b &= d
        b &= e > one
        np.minimum(e, one, out=e)  # 2^t for a normal value, 0 for a subnormal or zero
        k += e
        np.left_shift(k, b, out=k, casting="unsafe")  # below a power of two, downwards
        np.bitwise_and(drawn, 0x7FFF, out=r, casting="unsafe")
        r *= k
        np.greater(r, 1 << (15 + mantissa_bits), out=b)  # steps
        np.add(chunk, b, out=out, casting="unsafe")
        b &= d
        np.subtract(out, b, out=out, casting="unsafe")
        np.subtract(out, b, out=out, casting="unsafe")
        if at_edge:
            edge = top_exponent * one
            kept = (chunk & 0x7FFF >= edge) | (out & 0x7FFF >= edge)
            np.copyto(out, chunk, where=kept)
    return moved.reshape(values.shape).view(values.dtype)
