"""Float64 products with a coupling matrix, whatever its storage.

A coupling matrix is float64, or float32 where that holds it exactly (the squares of float16
weights, unitgraph.py). numpy's ``float32_matrix @ float64_vector`` casts the whole matrix to a
float64 temporary, the very copy that float32 storage saves; here such a matrix is multiplied a
block of rows at a time, each block converted to float64 while it stays in cache, so the result
is the float64 product of the exact couplings. :func:`times` and :func:`transposed_times` hand
float64 matrices, and products asked in float32 (float32 vectors: the solver's steering phase),
to BLAS as one call; :func:`both_times` reads each block of rows once for its two products.

A big layer's couplings may not be stored at all (:class:`onnxbalance.memory.LazySquares`):
every product then squares the weight a tile at a time (a block of rows, or of columns), in
float64 for float64 vectors and in float32 for float32 ones, and adds up the tiles' products.
No other code reads such a matrix whole.
"""

from __future__ import annotations

import numpy as np

from ..memory import LazySquares, float64_blocks, row_blocks

BLOCK_BYTES = 1 << 19
"""Float64 bytes of a block of rows (half a typical L2 cache): converted, then read from cache
by one or two products."""


def _widens(matrix: np.ndarray, vector: np.ndarray) -> bool:
    """Whether numpy would cast ``matrix`` whole to multiply it with ``vector``."""
    return matrix.dtype != np.float64 and np.result_type(matrix, vector) == np.float64


def times(matrix: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``matrix @ x`` (x a vector, or a matrix of column vectors), into ``out`` if given.

    >>> times(np.array([[1.0, 2.0]], np.float32), np.array([0.5, 0.25])).tolist()
    [1.0]
    """
    if isinstance(matrix, LazySquares):
        out = _zeros(out, (matrix.shape[0], *np.shape(x)[1:]), x)
        for rows, cols, tile in _tiles(matrix, x):
            out[rows] += tile @ x[cols]
        return out
    if not _widens(matrix, x):
        return np.dot(matrix, x, out=out)
    if out is None:
        out = np.empty((matrix.shape[0], *np.shape(x)[1:]))
    for rows, block in float64_blocks(matrix, BLOCK_BYTES):
        np.dot(block, x, out=out[rows])
    return out


def transposed_times(
    matrix: np.ndarray, y: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``matrix.T @ y`` for a vector y, into ``out`` if given.

    >>> transposed_times(np.array([[1.0, 2.0]], np.float32), np.array([0.5])).tolist()
    [0.5, 1.0]
    """
    if isinstance(matrix, LazySquares):
        out = _zeros(out, (matrix.shape[1],), y)
        for rows, cols, tile in _tiles(matrix, y):
            out[cols] += y[rows] @ tile
        return out
    if not _widens(matrix, y):
        return np.dot(y, matrix, out=out)
    if out is None:
        out = np.empty(matrix.shape[1])
    out[...] = 0.0
    for rows, block in float64_blocks(matrix, BLOCK_BYTES):
        out += y[rows] @ block
    return out


def both_times(
    matrix: np.ndarray, x: np.ndarray, y: np.ndarray, rows_out: np.ndarray, cols_out: np.ndarray
) -> None:
    """rows_out += matrix @ x and cols_out += matrix.T @ y, each block of rows read from memory
    once for both (and converted once, for a float32 matrix with float64 vectors). With float32
    vectors the products are float32 ones, each block's added into the outputs (float64 ones
    sum the blocks' float32 products without further rounding)."""
    for rows, cols, block in _tiles(matrix, x):
        rows_out[rows] += block @ x[cols]
        cols_out[cols] += y[rows] @ block


def _zeros(out: np.ndarray | None, shape: tuple[int, ...], vector: np.ndarray) -> np.ndarray:
    """``out`` zeroed, or a new zero array of this shape in the product's dtype."""
    if out is None:
        return np.zeros(shape, np.result_type(np.float32, vector))
    out[...] = 0.0
    return out


def _tiles(matrix, vector: np.ndarray):
    """(rows, columns, tile) over tiles of about BLOCK_BYTES that cover the matrix, in float64
    if the product is float64: blocks of rows, or a LazySquares's own tiles."""
    if isinstance(matrix, LazySquares):
        yield from matrix.tiles(np.result_type(np.float32, vector))
        return
    every = slice(None)
    if _widens(matrix, vector):
        for rows, block in float64_blocks(matrix, BLOCK_BYTES):
            yield rows, every, block
        return
    n_rows, n_cols = matrix.shape
    for rows in row_blocks(n_rows, matrix.itemsize * n_cols, BLOCK_BYTES):
        yield rows, every, matrix[rows]
