"""Keeping resident memory near the size of the weights (numpy only; no ONNX here).

Weights read from external data are memory maps: pages are read when a computation touches
them and then count towards the process's resident set until unmapped. :func:`release` hands
them back once a computation is done (they stay in the page cache and are re-read
transparently if touched again). :func:`float64_blocks` hands out a matrix a block of rows at a
time in float64 (converted into one reused buffer when it is stored narrower), so that a float64
computation on a float32 matrix needs no full-size float64 copy.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence

import ml_dtypes
import numpy as np

from . import floatbits

BLOCK_BYTES = 2**20
"""Float64 bytes converted per block: small enough that a block stays in cache through the
few passes made over it, large enough that the Python loop costs nothing."""


def mapped_buffer(array: np.ndarray) -> mmap.mmap | None:
    """The memory map an array's data lives in, if any (following views and memoryviews)."""
    base = array
    while base is not None:
        if isinstance(base, memoryview):
            base = base.obj
        if isinstance(base, mmap.mmap):
            return base
        base = getattr(base, "base", None)
    return None


class DroppableMap(mmap.mmap):
    """A read-only file mapping whose resident pages :func:`release` may drop: weights in
    external data, read once per computation. A model file mapped while it is parsed and
    balanced is an ordinary ``mmap``: its pages are wanted again by the next stage."""


def release(array: np.ndarray) -> None:
    """Drop the resident pages of a :class:`DroppableMap`; a no-op for anything else.

    Dropping the pages of a writable anonymous map, like :func:`empty_populated`'s, would zero
    its contents; the pages of a file map are read back from the file when touched again.
    """
    mapped = mapped_buffer(array)
    if not isinstance(mapped, DroppableMap):
        return
    if hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed, or not supported here: nothing to give back
            pass


POPULATE_BYTES = 64 * 2**20
"""Arrays at least this large get their pages in one call (:func:`empty_populated`)."""


def empty_populated(shape: tuple[int, ...], dtype: np.typing.DTypeLike) -> np.ndarray:
    """``np.empty(shape, dtype)``, with the pages of a large array faulted in up front.

    A fresh page costs a fault on its first touch; on virtual machines whose host backs guest
    memory lazily, that fault is expensive, and faulting a gigabyte page by page takes seconds.
    ``MAP_POPULATE`` maps it in one call, several times faster. It also avoids the huge pages
    numpy asks for: when memory is fragmented (after reading a large model) the kernel compacts
    it before handing them out, and the float32 copies of a 1 GB model took 0.7-2 s longer
    that way (fresh processes, alternated). Elsewhere (or small arrays): ``np.empty``. The
    mapping is released when the array is.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes < POPULATE_BYTES or not populate:
        return np.empty(shape, dtype=dtype)
    try:
        mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    except (OSError, ValueError, AttributeError):
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(mapped, dtype=dtype).reshape(shape)


def empty_arrays(shapes: Sequence[tuple[int, ...]], dtype: np.typing.DTypeLike) -> list[np.ndarray]:
    """Uninitialised C-ordered arrays of these shapes.

    Below :data:`POPULATE_BYTES` in total they share one allocation: numpy asks the kernel for
    huge pages for blocks of 4 MB and more, and first touching a few of them costs far less
    than thousands of small pages (on a virtual machine each fault takes microseconds; the
    coupling matrices of a 9 MB model in a fresh process: 5.6-8.7 ms instead of 9.4-11.4).
    Larger sets get an allocation each, its pages mapped in one call (:func:`empty_populated`):
    one mapping of several GB measured slower than one per array.
    """
    dtype = np.dtype(dtype)
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    if sum(sizes) * dtype.itemsize >= POPULATE_BYTES:
        return [empty_populated(tuple(shape), dtype) for shape in shapes]
    block = np.empty(sum(sizes), dtype=dtype)
    offsets = np.cumsum([0, *sizes])
    return [
        block[start:stop].reshape(shape)
        for shape, start, stop in zip(shapes, offsets[:-1], offsets[1:], strict=True)
    ]


def row_blocks(n_rows: int, row_bytes: int, block_bytes: int | None = None) -> Iterator[slice]:
    """Slices of about ``block_bytes`` (default :data:`BLOCK_BYTES`) each along the first axis."""
    step = max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // max(1, row_bytes))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def float64_blocks(
    matrix: np.ndarray, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, ``matrix[rows]`` in float64) over blocks of about ``block_bytes`` float64 bytes.

    A float64 matrix's blocks are views; any other is converted into one buffer that every
    block reuses (a block is only valid until the next one is asked for).
    """
    n_rows, n_cols = matrix.shape
    buffer = None
    for rows in row_blocks(n_rows, 8 * n_cols, block_bytes):
        if matrix.dtype == np.float64:
            yield rows, matrix[rows]
            continue
        if buffer is None:  # the first block is the largest
            buffer = np.empty((rows.stop - rows.start, n_cols))
        block = buffer[: rows.stop - rows.start]
        np.copyto(block, matrix[rows])
        yield rows, block


_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# |w| of a bfloat16 weight, read as the bits of its float32 value with the sign cleared (their
# order is that of |w|): from 2^-63 (biased exponent 64) up to below 2^64 (exponent 191), w^2
# is a normal float32
_SQUARES_FROM = np.uint32(64 << 23)
_SQUARES_BELOW = np.uint32(191 << 23)
_INFINITE_BITS = {2: 0x7C00, 4: 0x7F800000}  # |w|'s bits from here on: inf or NaN (float16, 32)


def squares_fit_float32(dtype: np.typing.DTypeLike) -> bool:
    """Whether w^2 of weights of this dtype may be exact in float32 (:func:`float32_squares`):
    float16 always (11 significant bits square into 22, from 2^-48 to 2^32), bfloat16 (8 bits
    into 16) while |w| stays in the range where the square is a normal float32."""
    return np.dtype(dtype) in (np.dtype(np.float16), _BFLOAT16)


def _squares_exact(block: np.ndarray) -> bool:
    """Whether every non-zero |w| of a float32 block (bfloat16 weights, converted exactly) lies
    in [2^-63, 2^64): no NaN or inf, no square that overflows float32 or falls below its normal
    range."""
    return _in_range(block.view(np.uint32) & np.uint32(0x7FFFFFFF), _SQUARES_FROM, _SQUARES_BELOW)


def _in_range(magnitude: np.ndarray, low, high) -> bool:
    """Whether every non-zero entry of an unsigned array lies in [low, high)."""
    if magnitude.max(initial=0) >= high:
        return False
    # zeros wrap round to the largest unsigned integer here: the minimum is that of the others
    wrapped = magnitude - magnitude.dtype.type(1)
    return bool(wrapped.min(initial=np.iinfo(magnitude.dtype).max) >= low - 1)


_TILE = 128
"""Columns of a transposed weight cast at a time: a tile spans few enough pages of the stored
rows to stay in the TLB while all its rows are read (8192 x 8192 float16: 3x faster)."""


def _cast_into(block: np.ndarray, source: np.ndarray) -> None:
    """block[...] = source, the cast to block's dtype included. A source whose rows lie closer
    together than its columns (a MatMul's [in, out] weight seen as [out, in]) is read in tiles
    of columns: row by row it would touch a page per element."""
    if source.ndim == 2 and abs(source.strides[0]) < abs(source.strides[1]):
        for start in range(0, source.shape[1], _TILE):
            block[:, start : start + _TILE] = source[:, start : start + _TILE]
    else:
        block[...] = source


def _square_rows(block: np.ndarray, maxima: np.ndarray | None) -> None:
    """block **= 2 in place and, if wanted, each row's largest |w| into ``maxima``: the square
    root of an exact square is exact, so no abs pass is needed for it."""
    np.square(block, out=block)  # the sign goes anyway: no abs pass
    if maxima is not None:
        maxima[...] = np.sqrt(block.reshape(len(block), -1).max(axis=1))


def _power_into(
    source: np.ndarray, block: np.ndarray, p: float, squares_only: bool, maxima: np.ndarray | None
) -> None:
    """block = |source| ** p in float64 and, if wanted, each row's largest |w| into
    ``maxima`` (:func:`abs_power`'s work on one block of rows)."""
    _cast_into(block, source)  # to float64, one block at a time
    if squares_only:
        _square_rows(block, maxima)
        return
    np.abs(block, out=block)
    if maxima is not None:
        maxima[...] = block.reshape(len(block), -1).max(axis=1)
    if p == 2.0:
        np.square(block, out=block)
    elif p != 1.0:
        np.power(block, p, out=block)


def _rows_of(unit_max: np.ndarray | None, rows: slice) -> np.ndarray | None:
    return None if unit_max is None else unit_max[rows]


def float32_squares(
    weight: np.ndarray, out: np.ndarray, unit_max: np.ndarray | None = None
) -> bool:
    """``weight ** 2`` into the float32 array ``out``, block by block, where every square is
    exact in float32 (:func:`squares_fit_float32`): True then. False, at the first block of a
    bfloat16 weight outside that range (``out`` and ``unit_max`` are then partly written).

    >>> out = np.empty((1, 2), np.float32)
    >>> float32_squares(np.array([[-3.0, 0.5]], np.float16), out), out.tolist()
    (True, [[9.0, 0.25]])
    """
    weight = np.asarray(weight)
    checked = weight.dtype == _BFLOAT16
    with np.errstate(over="ignore", invalid="ignore"):  # float16 inf and NaN: refused later
        for rows in row_blocks(len(out), out[:1].nbytes):
            block = out[rows]
            _cast_into(block, weight[rows])  # exact: float32 holds every float16 and bfloat16
            if checked and not _squares_exact(block):
                return False
            _square_rows(block, _rows_of(unit_max, rows))
    release(weight)
    return True


def _is_narrow_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" and dtype.itemsize <= 4


def abs_power(
    weight: np.ndarray,
    p: float,
    out: np.ndarray | None = None,
    unit_max: np.ndarray | None = None,
) -> np.ndarray:
    """``|weight| ** p`` in float64, computed block by block in the result's own memory
    (``out`` if given: a float64 array of the weight's shape).

    ``unit_max``: a float64 array with one entry per row (first axis), filled with the row's
    largest magnitude |w| while its block is in cache, so the report's statistics of the
    weights as they are need no pass of their own.

    >>> abs_power(np.array([[-2.0, 3.0]], dtype=np.float32), 2.0).tolist()
    [[4.0, 9.0]]
    """
    weight = np.asarray(weight)
    if out is None:
        out = empty_populated(weight.shape, np.float64)
    if out.size == 0:
        if unit_max is not None:
            unit_max[...] = 0.0  # rows without entries
        return out
    if weight.ndim == 0:
        with np.errstate(over="ignore", invalid="ignore"):
            out[...] = np.abs(weight.astype(np.float64)) ** p
        return out
    squares_only = _squares_only(p, weight.dtype, unit_max)
    # huge weights give inf here, and NaN weights (signalling ones too) NaN, which the solver
    # refuses with the layer's name: no warning
    with np.errstate(over="ignore", invalid="ignore"):
        for rows in row_blocks(len(out), out[0].nbytes):
            _power_into(weight[rows], out[rows], p, squares_only, _rows_of(unit_max, rows))
    release(weight)
    return out


def _squares_only(p: float, dtype: np.dtype, unit_max: np.ndarray | None) -> bool:
    """Whether |w|^p is w^2 with nothing else wanted: float32 and narrower weights square
    exactly in float64 (no overflow, no underflow), and the square root of an exact square is
    exact, so their largest |w| needs no abs pass."""
    return p == 2.0 and (unit_max is None or _is_narrow_float(dtype))


def abs_power_runs(
    weight: np.ndarray,
    p: float,
    starts: np.ndarray,
    out: np.ndarray,
    order: np.ndarray | None = None,
    unit_max: np.ndarray | None = None,
) -> np.ndarray:
    """Sums of ``|weight| ** p`` over runs of columns, into the float64 ``out`` (rows, runs):
    run k takes columns starts[k] up to starts[k + 1] of the 2-D weight, its columns first put
    in ``order`` if given (``np.add.reduceat``). Block by block like :func:`abs_power`, so the
    powers never exist whole: one block of rows at a time, in one reused buffer.

    >>> out = np.empty((1, 2))
    >>> abs_power_runs(np.array([[1.0, -2.0, 3.0]]), 2.0, np.array([0, 1]), out).tolist()
    [[1.0, 13.0]]
    """
    weight = np.asarray(weight)
    n_rows, n_cols = weight.shape
    squares_only = _squares_only(p, weight.dtype, unit_max)
    buffer = None
    with np.errstate(over="ignore", invalid="ignore"):  # as in abs_power
        for rows in row_blocks(n_rows, 8 * n_cols):
            if buffer is None:
                buffer = np.empty((rows.stop - rows.start, n_cols))
            block = buffer[: rows.stop - rows.start]
            _power_into(weight[rows], block, p, squares_only, _rows_of(unit_max, rows))
            ordered = block if order is None else block[:, order]
            np.add.reduceat(ordered, starts, axis=1, out=out[rows])
    release(weight)
    return out


_SINGLE_RANGE = 2.0**60  # column factors for which float32 products of weights stay normal


def row_max_abs(weight: np.ndarray, row_log: np.ndarray, col_log: np.ndarray) -> np.ndarray:
    """``max_i |W[o, i]| * exp(row_log[o] - col_log[..., i])`` per row o, a block at a time.

    ``col_log`` is 1-D (one per column) or 2-D (rows, cols). No full-size temporary, and mapped
    pages are given back afterwards. (The rows' largest magnitudes as they are come from
    :func:`abs_power`.) Narrow weights are scaled in float32, half the bytes of float64 and
    within 1e-7 of it; the rows whose float32 maximum overflowed or underflowed to zero are
    redone in float64.

    >>> row_max_abs(np.array([[1.0, -3.0], [0.5, 0.0]]), np.zeros(2), np.log([1.0, 2.0])).tolist()
    [1.5, 0.5]
    """
    weight = np.asarray(weight)
    rows = weight.reshape(weight.shape[0], -1) if weight.ndim != 2 else weight
    out = np.zeros(rows.shape[0])
    if rows.shape[1] == 0:
        return out
    col_factor = np.exp(-np.asarray(col_log, dtype=np.float64))
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):  # NaN weights: NaN maxima
        if _is_narrow_float(rows.dtype) and np.all(
            (col_factor > _SINGLE_RANGE**-1) & (col_factor < _SINGLE_RANGE)
        ):
            out[...] = _scaled_maxima(rows, col_factor.astype(np.float32), np.float32)
            redo = np.flatnonzero(~((out > 0) & (out < np.inf)))
            for part in row_blocks(len(redo), 8 * rows.shape[1]):
                chosen = redo[part]
                factor = col_factor[chosen] if col_factor.ndim == 2 else col_factor
                out[chosen] = _scaled_maxima(rows[chosen], factor, np.float64)
        else:
            out[...] = _scaled_maxima(rows, col_factor, np.float64)
        out *= np.exp(np.asarray(row_log, dtype=np.float64))
    release(weight)
    return out


def _scaled_maxima(rows: np.ndarray, col_factor: np.ndarray, dtype: type) -> np.ndarray:
    """``max_i |rows[o, i]| * col_factor[..., i]`` per row o in ``dtype``, a block at a time in
    the order the weights lie in memory: a MatMul's [in, out] weight, seen as [out, in], is
    read a block of its stored rows at a time, each block's maxima joining those of the
    blocks before (reading it by rows would take a few bytes from every page per row, about
    six times slower)."""
    by_columns = rows.ndim == 2 and abs(rows.strides[0]) < abs(rows.strides[1])
    maxima = np.zeros(len(rows), dtype) if by_columns else np.empty(len(rows), dtype)
    itemsize = np.dtype(dtype).itemsize
    if by_columns:
        for cols in row_blocks(rows.shape[1], itemsize * rows.shape[0]):
            block = _abs_in(rows[:, cols].T, dtype)
            block *= col_factor[:, cols].T if col_factor.ndim == 2 else col_factor[cols, None]
            np.maximum(maxima, block.max(axis=0), out=maxima)
        return maxima
    for part in row_blocks(len(rows), itemsize * rows.shape[1]):
        block = _abs_in(rows[part], dtype)
        block *= col_factor[part] if col_factor.ndim == 2 else col_factor
        maxima[part] = block.max(axis=1)
    return maxima


def _abs_in(values: np.ndarray, dtype: type) -> np.ndarray:
    """``|values|`` as a new array of ``dtype``."""
    if np.dtype(dtype) == np.float32 and values.dtype.itemsize < 4:
        widened = floatbits.to_float32(values)  # numpy's cast of 16-bit floats is the slower
        return np.abs(widened, out=widened)
    return np.abs(values, dtype=dtype)


class LazySquares:
    """The coupling matrix ``weight ** 2`` of a float16, bfloat16 or float32 weight, never
    stored: it holds the weight (a memory map is not copied) and hands its squares out a tile
    at a time (:meth:`tiles`), so a pass over it costs no memory beyond one tile. Its mapped
    pages are given back after every pass (:func:`release`). The squares are exact in
    ``dtype``: float32 for 16-bit weights whose squares fit it (checked by
    :func:`check_lazy_squares`), float64 for float32 weights (24 significant bits square into
    48); the float32 tiles of a float32 weight are its squares rounded, as a float32 copy of
    stored couplings would hold them.

    It looks like a read-only matrix of the weight's shape to the solver: ``shape``, ``dtype``
    and indexing (``matrix[rows]``, ``matrix[:, cols]``: those squares only, for the rare rows
    and columns redone exactly). ``np.asarray`` builds the whole matrix.
    """

    ndim = 2

    def __init__(self, weight: np.ndarray) -> None:
        self.weight = weight
        self.shape = tuple(weight.shape)
        self.size = int(weight.size)
        self.dtype = np.dtype(np.float32 if weight.dtype.itemsize < 4 else np.float64)

    @property
    def transposed(self) -> bool:
        """Whether the weight's rows lie closer together than its columns (a MatMul's [in, out]
        weight seen as [out, in]): tiles are then columns of the matrix, rows of the stored
        weight."""
        return abs(self.weight.strides[0]) < abs(self.weight.strides[1])

    def _parts(self, element_bytes: int) -> Iterator[tuple[tuple[slice, slice], np.ndarray]]:
        """(rows, columns, the stored weights of the matrix's tile there, as they are stored:
        transposed for a transposed weight) over tiles of about :data:`BLOCK_BYTES` once each
        is widened to ``element_bytes``; the mapped pages are released afterwards."""
        everything = slice(0, None)
        source = self.weight.T if self.transposed else self.weight
        try:
            for part in row_blocks(len(source), element_bytes * source.shape[1]):
                yield (everything, part) if self.transposed else (part, everything), source[part]
        finally:  # also when a caller stops early
            release(self.weight)

    def tiles(
        self, dtype: np.typing.DTypeLike = np.float32
    ) -> Iterator[tuple[slice, slice, np.ndarray]]:
        """(rows, columns, the squares there in float32 or float64 ``dtype``) over tiles of
        about :data:`BLOCK_BYTES` that cover the matrix: blocks of rows, or of columns for a
        transposed weight (each read from contiguous stored rows). Reused buffers: a tile is
        valid until the next one is asked for."""
        dtype = np.dtype(dtype)
        single = wide = None
        for (rows, cols), stored in self._parts(dtype.itemsize):
            if single is None:
                single = np.empty(stored.shape, np.float32)
                wide = np.empty(stored.shape) if dtype == np.float64 else None
            if stored.dtype == np.float32:  # exact in float64, rounded in float32 (steering)
                block = (single if wide is None else wide)[: len(stored)]
                np.square(stored, out=block, dtype=block.dtype)
            else:  # exact, and finite (checked when the matrix was built)
                block = floatbits.to_float32(stored, single[: len(stored)], finite=True)
                if wide is not None:  # widened while squared: one pass less
                    block = np.square(block, out=wide[: len(stored)])
                else:
                    np.square(block, out=block)  # exact in float32
            yield rows, cols, block.T if self.transposed else block

    def __getitem__(self, key) -> np.ndarray:
        return np.square(np.asarray(self.weight[key], dtype=self.dtype))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)


def check_lazy_squares(squares: LazySquares, unit_max: np.ndarray | None = None) -> bool:
    """Whether every square of ``squares`` is finite and exact in its dtype (for bfloat16
    :func:`float32_squares`'s check; a float16 or float32 weight fails only with infinities or
    NaN, which the float64 couplings then carry to the solver's error), each row's largest |w|
    into ``unit_max`` on the way if given. One pass over the stored bits, nothing widened or
    stored: |w|'s order is that of its bits with the sign cleared."""
    dtype = squares.weight.dtype
    bits = np.dtype(np.uint16 if dtype.itemsize == 2 else np.uint32)
    if dtype == _BFLOAT16:  # the top halves of float32 bits
        low, high = int(_SQUARES_FROM >> 16), int(_SQUARES_BELOW >> 16)
    else:  # any finite value squares exactly
        low, high = 1, _INFINITE_BITS[dtype.itemsize]
    largest = None if unit_max is None else np.zeros(len(unit_max), bits)
    along = 0 if squares.transposed else 1  # the stored tile holds the rows along this axis
    sign_cleared = bits.type(np.iinfo(bits).max >> 1)
    for (rows, _), stored in squares._parts(dtype.itemsize):
        magnitude = stored.view(bits) & sign_cleared
        if not _in_range(magnitude, bits.type(low), bits.type(high)):
            return False
        if largest is not None:
            np.maximum(largest[rows], magnitude.max(axis=along), out=largest[rows])
    if unit_max is not None:
        unit_max[...] = largest.view(squares.weight.dtype)
    return True
