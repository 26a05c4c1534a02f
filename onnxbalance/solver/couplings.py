"""One look at every coupling matrix per solve: validation, value range, sums, a float32 copy.

Everything the solvers and the liveness analysis need to know about a matrix c before they
iterate: that it is finite and non-negative (else ValueError naming the layer), whether every
entry is positive (then every coupling connects), a bound on |log c| over its non-zero
entries, its row and column sums (empty rows and columns, dead units, and F and the loads at
u = 0, see curvature.start), and a float32 copy of c for products that only steer (trial points
whose values are certified in float64 later, Hessian products).

A matrix stored in float32 (unitgraph.py: only where that holds it exactly) is its own copy;
its sums are still taken in float64, each block converted while it is in cache. So is a matrix
never stored (memory.LazySquares): its squares are formed in float64 a tile at a time for the
sums and minima, in that one look.

The float64 matrix is read once, in blocks of rows that stay in cache, for the copy and both
sums; the copy's minimum (float32, half the bytes), taken over a few megabytes at a time, settles
the rest. Rounding to float32 is monotone and keeps the sign, so a positive minimum of the copy
proves that every entry of that part is positive; a finite total of the row sums proves that
none is NaN or infinite, and the largest row sum bounds every entry from above. Only a part
whose copy has a minimum of zero or below (zeros, or negative or tiny entries that float32
rounds to -0.0 or flushes) is inspected in float64, while it is still in cache, for its exact
minimum and its smallest positive entry. |log c| is then bounded by the largest row sum and the
smallest positive entry (to float32 accuracy where that came from the copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..memory import LazySquares, empty_arrays, float64_blocks
from ..unitgraph import FIXED, Layer, UnitGraph

SINGLE_FACTORS = 1e15
"""A float32 copy has entries of at most this, and its rows and columns sum to at least the
inverse; vectors multiplied with it must have entries within [1 / this, this], so every
product and sum stays below 1e30 (float32 overflows at 3.4e38)."""

_BLOCK_BYTES = 1 << 19  # rows of float64 read per block (half a typical L2 cache)
_COPY_MIN_BYTES = 1 << 22  # float32 copy per reduction for its minimum (in a typical L3)
_LOG_SLACK = 1e-6  # float32 rounding of the extreme entries, relative in c, absolute in log c


@dataclass(frozen=True)
class Coupling:
    """One layer's coupling matrix as the solvers use it."""

    matrix: np.ndarray | LazySquares  # float64, or float32 holding c exactly, or its squares
    # formed on demand (multiplied via products.py)
    single: np.ndarray | None  # float32 copy (matrix itself if float32); None unless _single_fits
    positive: bool  # every entry > 0 (and the matrix is not empty)
    log_range: float  # bounds |log c| over the non-zero entries (0 if there are none)
    row_sums: np.ndarray  # c @ 1 in float64
    col_sums: np.ndarray  # 1 @ c in float64


def _check_shapes(layer, rows: int, cols: int) -> None:
    """ValueError naming the layer unless it has one row group per row and one column group
    per column."""
    for what, groups, size in (("row", layer.row_groups, rows), ("column", layer.col_groups, cols)):
        shape = np.shape(groups)
        if shape != (size,):
            raise ValueError(
                f"layer {layer.name!r}: {what} groups have shape {shape}, expected ({size},)"
            )


def _check_ranges(graph: UnitGraph) -> None:
    """ValueError naming the first layer with a group index outside [FIXED, n_groups): one
    look at all group arrays together, and per layer only to name the culprit."""
    sides = [
        (layer.name, what, np.asarray(groups))
        for layer in graph.layers
        for what, groups in (("row", layer.row_groups), ("column", layer.col_groups))
    ]
    every = np.concatenate([groups.ravel() for _, _, groups in sides] + [np.zeros(0, np.int64)])
    if not every.size or (every.min() >= FIXED and every.max() < graph.n_groups):
        return
    for name, what, groups in sides:
        if groups.size and (groups.min() < FIXED or groups.max() >= graph.n_groups):
            raise ValueError(f"layer {name!r}: {what} group index out of range")


LARGEST_TOTAL = 1e300
"""The most one layer's couplings may sum to: the loads, gradients and curvatures the solvers
form are small multiples of such sums, and must stay below float64's 1.8e308."""


def _check_values(name: str, total: float, least: float) -> None:
    """ValueError naming the layer unless the sum of all entries is finite (NaN or Inf anywhere
    makes it not) and at most LARGEST_TOTAL, and the smallest one is >= 0."""
    if not np.isfinite(total):
        raise ValueError(
            f"layer {name!r} has NaN or infinite weights (or weights so large that |w|^p "
            "overflows float64)"
        )
    if total > LARGEST_TOTAL:
        raise ValueError(
            f"layer {name!r}: weights too large to balance in float64 (|w|^p sums to "
            f"{total:.3g}, at most {LARGEST_TOTAL:g})"
        )
    if least < 0:
        raise ValueError(f"layer {name!r}: coupling matrix has negative entries")


def _fold_minima(
    part: np.ndarray, least: float, smallest: float, positive: float
) -> tuple[float, float]:
    """(smallest entry, smallest positive entry) so far, with one part of the matrix folded in;
    ``least`` is the part's minimum from its float32 copy (or itself). A NaN leaves both alone:
    it shows in the row sums."""
    if least > 0:
        return min(smallest, float(least)), min(positive, float(least))
    # zeros, negatives or entries below float32's range: the float64 entries decide
    lowest = float(part.min())
    lowest_positive = float(np.min(part, where=part > 0, initial=np.inf))
    return min(smallest, lowest), min(positive, lowest_positive)


def _single_fits(
    largest: float, row_sums: np.ndarray, col_sums: np.ndarray, positive: bool
) -> bool:
    """Whether the float32 copy can stand in for c: its entries, times factors within
    [1 / SINGLE_FACTORS, SINGLE_FACTORS], stay below float32's overflow, and every non-empty
    row and column sums to at least 1 / SINGLE_FACTORS, so a product keeps float32's relative
    accuracy however small single entries are (those below about 1e-23 may flush to zero,
    which changes no sum by more than 1e-5 of itself)."""
    if not 0 < largest <= SINGLE_FACTORS:
        return False
    for sums in (row_sums, col_sums):
        if positive:  # every sum is positive: no mask needed
            smallest = float(sums.min())
        else:
            smallest = float(np.min(sums, where=sums > 0, initial=np.inf))
        if smallest < 1.0 / SINGLE_FACTORS:
            return False
    return True


def _copy_and_sums(
    matrix: np.ndarray, single: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, float, float]:
    """The float32 copy (into ``single`` unless None or ``matrix`` itself), the row sums, the
    column sums, the smallest entry and the smallest positive entry (inf if none) of
    ``matrix``, in one sweep: blocks of rows small enough to stay in cache are read once from
    memory for all, in float64 (:func:`onnxbalance.memory.float64_blocks`). Where every entry
    is positive the minima come from the copy (float32 accuracy)."""
    rows, cols = matrix.shape
    row_sums = np.empty(rows)
    col_sums = np.zeros(cols)
    ones = np.ones(cols)
    step = max(1, _BLOCK_BYTES // (8 * cols))
    # the copy's minimum is taken over many blocks at once, while they are still in cache
    chunk = step * max(1, _COPY_MIN_BYTES // (4 * cols * step))
    lead = np.ones(min(step, rows))
    copying = single is not None and single is not matrix
    smallest = positive = np.inf
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, seen later
        for first in range(0, rows, chunk):
            part = slice(first, first + chunk)
            for block_rows, block in float64_blocks(matrix[part], _BLOCK_BYTES):
                if copying:
                    single[part][block_rows] = block
                elif single is None:
                    smallest, positive = _fold_minima(block, block.min(), smallest, positive)
                np.dot(block, ones, out=row_sums[part][block_rows])
                col_sums += lead[: block.shape[0]] @ block
            if single is not None:
                least = single[part].min()
                smallest, positive = _fold_minima(matrix[part], least, smallest, positive)
    return single, row_sums, col_sums, smallest, positive


def _lazy_sums(matrix: LazySquares) -> tuple[np.ndarray, np.ndarray, float, float]:
    """:func:`_copy_and_sums` for a matrix never stored: its row sums, column sums, smallest
    entry and smallest positive entry, from its float64 tiles (the squares, exact)."""
    row_sums = np.zeros(matrix.shape[0])
    col_sums = np.zeros(matrix.shape[1])
    smallest = positive = np.inf
    with np.errstate(over="ignore", invalid="ignore"):
        for rows, cols, tile in matrix.tiles(np.float64):
            row_sums[rows] += tile @ np.ones(tile.shape[1])  # BLAS: faster than a reduction
            col_sums[cols] += np.ones(tile.shape[0]) @ tile
            smallest, positive = _fold_minima(tile, tile.min(), smallest, positive)
    return row_sums, col_sums, smallest, positive


def _own_copy(matrix: np.ndarray | LazySquares) -> bool:
    """Whether the matrix is its own float32 copy: stored in float32, or never stored (its
    float32 tiles are the copy's values)."""
    return isinstance(matrix, LazySquares) or matrix.dtype == np.float32


def _as_matrix(coupling) -> np.ndarray | LazySquares:
    """The coupling as an array (a matrix never stored stays as it is)."""
    return coupling if isinstance(coupling, LazySquares) else np.asarray(coupling)


def summarise(layer_name: str, coupling, single: bool | np.ndarray = True) -> Coupling:
    """The :class:`Coupling` of one matrix; ValueError naming the layer if it is unusable.

    ``single``: make the float32 copy (only the Newton solver's trial points use it; an
    objective evaluated in float64 alone need not hold half the couplings' bytes again), into
    this array if one is given (its shape and float32 dtype).
    """
    matrix = _as_matrix(coupling)
    if not _own_copy(matrix):  # one stored in float32 holds its values exactly
        matrix = matrix.astype(np.float64, copy=False)
    if matrix.ndim != 2:
        raise ValueError(f"layer {layer_name!r}: coupling matrix must be 2-D")
    if not matrix.size:
        empty = np.zeros(matrix.shape[0]), np.zeros(matrix.shape[1])
        return Coupling(matrix, None, False, 0.0, *empty)
    if single is True:
        single = matrix if _own_copy(matrix) else np.empty(matrix.shape, np.float32)
    if isinstance(matrix, LazySquares):
        copy = matrix if single is not False else None
        row_sums, col_sums, smallest, smallest_positive = _lazy_sums(matrix)
    else:
        copy, row_sums, col_sums, smallest, smallest_positive = _copy_and_sums(
            matrix, single if single is not False else None
        )
    _check_values(layer_name, float(row_sums.sum()), smallest)
    # the largest row sum bounds every entry from above: no pass looks for the maximum
    largest = float(row_sums.max())
    log_range = 0.0
    if largest > 0:
        log_range = max(abs(np.log(largest)), abs(np.log(smallest_positive))) + _LOG_SLACK
    positive = smallest > 0
    if not _single_fits(largest, row_sums, col_sums, positive):
        copy = None
    return Coupling(matrix, copy, positive, log_range, row_sums, col_sums)


def summarise_graph(
    graph: UnitGraph, single: bool = True, copy_fixed_rows: bool = True
) -> tuple[Coupling, ...]:
    """:func:`summarise` for every layer, after checking the group arrays (the float32 copies
    are allocated together: :func:`onnxbalance.memory.empty_arrays`). ``copy_fixed_rows``
    False: no copy for a layer whose rows are all fixed (:func:`collapse_fixed_rows` will
    reduce it to its column sums)."""
    shapes = [np.shape(layer.coupling) for layer in graph.layers]
    # a layer whose columns are all fixed takes no product, so it needs no copy
    copied = [
        single
        and len(shape) == 2
        and bool(np.any(np.asarray(layer.col_groups) != FIXED))
        and (copy_fixed_rows or not _rows_fixed(layer))
        for layer, shape in zip(graph.layers, shapes, strict=True)
    ]
    own_copies = [_own_copy(_as_matrix(layer.coupling)) for layer in graph.layers]
    planes = [
        shape
        for shape, wanted, own in zip(shapes, copied, own_copies, strict=True)
        if wanted and not own
    ]
    copies = iter(empty_arrays(planes, np.float32))
    out = []
    for layer, wanted, own in zip(graph.layers, copied, own_copies, strict=True):
        copy = (own or next(copies)) if wanted else False
        coupling = summarise(layer.name, layer.coupling, copy)
        _check_shapes(layer, *coupling.matrix.shape)
        out.append(coupling)
    _check_ranges(graph)
    return tuple(out)


def _rows_fixed(layer: Layer) -> bool:
    rows = np.asarray(layer.row_groups)
    return rows.size > 1 and bool((rows == FIXED).all())


def collapse_fixed_rows(
    graph: UnitGraph, couplings: tuple[Coupling, ...]
) -> tuple[UnitGraph, tuple[Coupling, ...]]:
    """For q = p, F(u) = sum over rows o and columns i of c[o, i] exp(p u_o - p u_i): a layer
    whose rows all stay at scale 1 adds sum_i (sum_o c[o, i]) exp(-p u_i), as one row of its
    column sums would, and so do its loads and curvature. Such layers (a transformer's q, k
    and output projections, a FFN's second layer: their columns move, their rows feed a
    residual stream) become that one row, and no solver pass reads their matrices again."""
    layers, summaries = [], []
    for layer, coupling in zip(graph.layers, couplings, strict=True):
        if _rows_fixed(layer):
            sums = coupling.col_sums.reshape(1, -1)
            layer = Layer(layer.name, sums, np.full(1, FIXED, np.int64), layer.col_groups)
            coupling = summarise(layer.name, sums, single=False)
        layers.append(layer)
        summaries.append(coupling)
    return UnitGraph(tuple(layers), graph.group_names), tuple(summaries)


def check_power_range(
    graph: UnitGraph, couplings: tuple[Coupling, ...], p: float, q: float
) -> None:
    """ValueError naming the first layer whose share of ||W||_{p,q}^q at scale 1, the sum of its
    row sums to the power r = q / p, may exceed LARGEST_TOTAL: the solvers' values and loads are
    such powers. (For r <= 1 the row sums' own bound, _check_values, suffices.)"""
    r = q / p
    if r <= 1.0:
        return
    for layer, coupling in zip(graph.layers, couplings, strict=True):
        largest = float(coupling.row_sums.max(initial=0.0))
        if largest <= 0.0:
            continue
        exponent = (r * np.log(largest) + np.log(coupling.row_sums.size)) / np.log(10.0)
        if exponent > np.log10(LARGEST_TOTAL):
            raise ValueError(
                f"layer {layer.name!r}: ||W||_{{{p:g},{q:g}}}^{q:g} of its weights reaches "
                f"about 1e{exponent:.0f}, beyond float64 (at most {LARGEST_TOTAL:g}): choose a "
                "smaller q / p"
            )


def check_graph(graph: UnitGraph) -> None:
    """Raise ValueError naming the layer if a coupling matrix is unusable (NaN, Inf, negative,
    or not matching its group arrays)."""
    for layer in graph.layers:
        matrix = np.asarray(layer.coupling)
        if matrix.ndim != 2:
            raise ValueError(f"layer {layer.name!r}: coupling matrix must be 2-D")
        if matrix.size:
            _check_values(layer.name, float(matrix.sum(dtype=np.float64)), float(matrix.min()))
        _check_shapes(layer, *matrix.shape)
    _check_ranges(graph)
