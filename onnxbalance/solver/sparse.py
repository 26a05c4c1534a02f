"""Symmetric linear systems with the sparsity of the network: factored once, solved many times,
with the inertia (how many positive and negative eigenvalues) that the Newton solver's checks
need (docs/algorithm.md §7).

The per-layer systems of the solver (the coarse Hessian over aggregates, the capacitance matrix
of the low-rank Hessian model) couple only layers that share scale groups: a chain gives a
banded matrix, a DAG a sparse one. A dense factorization costs the cube of the number of layers
(minutes at a few thousand layers) and inside LAPACK no signal handler runs until it returns.
Small systems still go to LAPACK (an eigendecomposition: exact inertia, no pivoting question);
larger ones to an LDL^T factorization without pivoting in the given order, whose fill stays
within the band of a layered network, as a Python loop that costs O(entries of the factor) and
lets SIGINT/SIGTERM act between its steps. By Sylvester's law of inertia the signs of the
pivots D are the signs of the eigenvalues. Without pivoting a pivot may vanish where the
matrix is not singular; the factorization then reports failure and the caller falls back as it
does for a singular matrix.
"""

from __future__ import annotations

import numpy as np

DENSE_LIMIT = 64
"""Systems up to this size are factored densely. Beyond it the sparse loop wins even alone on
the machine, and by far when other processes keep the BLAS threads waiting (measured: a
500-vector eigendecomposition 0.5 s on a loaded 2-core machine, its LDL^T 15 ms)."""

ROUND_OFF = 64 * np.finfo(np.float64).eps
"""Eigenvalues or pivots this small relative to the largest are round-off: singular."""


class Factor:
    """A factored symmetric matrix: solve() and its numbers of positive / negative eigenvalues."""

    positive: int
    negative: int

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _Eigen(Factor):
    def __init__(self, eigenvalues: np.ndarray, basis: np.ndarray) -> None:
        self.basis = basis
        self.inverse_eigenvalues = 1.0 / eigenvalues
        self.positive = int(np.count_nonzero(eigenvalues > 0))
        self.negative = eigenvalues.size - self.positive

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        return self.basis @ (self.inverse_eigenvalues * (self.basis.T @ rhs))


class _LDL(Factor):
    def __init__(
        self, order: list[int], pivots: list[float], lower: list[list[tuple[int, float]]]
    ) -> None:
        self.order = order  # the index eliminated at each step
        self.pivots = pivots  # its pivot
        self.lower = lower  # its column of L: (later index i, L[i, k])
        self.positive = sum(1 for pivot in pivots if pivot > 0)
        self.negative = len(pivots) - self.positive

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        x = rhs.tolist()
        steps = list(zip(self.order, self.pivots, self.lower, strict=True))
        for k, _, column in steps:
            value = x[k]
            if value:
                for i, entry in column:
                    x[i] -= entry * value
        for k, pivot, _ in steps:
            x[k] /= pivot
        for k, _, column in reversed(steps):
            total = x[k]
            for i, entry in column:
                total -= entry * x[i]
            x[k] = total
        return np.array(x)


def factor(
    size: int,
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    floor: float = ROUND_OFF,
    dense_limit: int | None = None,
) -> Factor | None:
    """The symmetric matrix with these coordinate entries (duplicates add up; both triangles
    given), factored; None if it is not finite or (relative to its largest diagonal entry or
    eigenvalue) an eigenvalue or pivot is at most ``floor`` in magnitude."""
    if not np.all(np.isfinite(values)):
        return None
    limit = DENSE_LIMIT if dense_limit is None else dense_limit
    if size <= limit:
        matrix = np.bincount(rows * size + cols, values, size * size).reshape(size, size)
        try:
            eigenvalues, basis = np.linalg.eigh(matrix)
        except np.linalg.LinAlgError:
            return None
        magnitudes = np.abs(eigenvalues)
        if magnitudes.min(initial=np.inf) <= floor * magnitudes.max(initial=0.0):
            return None
        return _Eigen(eigenvalues, basis)
    # duplicates summed in numpy: the loop below then touches each entry once
    cells, position = np.unique(rows * size + cols, return_inverse=True)
    summed = np.bincount(position.ravel(), values, cells.size)
    return _ldl(size, cells // size, cells % size, summed, floor)


def _ldl(
    size: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, floor: float
) -> _LDL | None:
    """Right-looking LDL^T (of distinct entries) on rows of dicts, in the natural order except
    that of two neighbours the one with the larger pivot goes first: in the capacitance matrix
    of lowrank.py an index and the next one are one layer term's two vectors, and one of them
    may have a zero diagonal (a layer whose rows or columns cannot move) while their 2x2 block
    is regular."""
    off = rows != cols
    diagonal = np.bincount(rows[~off], values[~off], size)
    neighbours: list[dict[int, float]] = [{} for _ in range(size)]
    for i, j, value in zip(
        rows[off].tolist(), cols[off].tolist(), values[off].tolist(), strict=True
    ):
        neighbours[i][j] = value
    threshold = floor * float(np.abs(diagonal).max(initial=0.0))
    pivots = diagonal.tolist()
    done = [False] * size
    order: list[int] = []
    kept: list[float] = []
    lower: list[list[tuple[int, float]]] = []
    first = 0
    while len(order) < size:
        while done[first]:
            first += 1
        k = first
        if k + 1 < size and not done[k + 1] and abs(pivots[k + 1]) > abs(pivots[k]):
            k += 1
        pivot = pivots[k]
        if not abs(pivot) > threshold:  # also NaN
            return None
        done[k] = True
        entries = [(j, value) for j, value in neighbours[k].items() if value]
        neighbours[k] = {}
        column = [(j, value / pivot) for j, value in entries]
        for a, (i, value_i) in enumerate(entries):
            row = neighbours[i]
            del row[k]
            scaled = column[a][1]
            pivots[i] -= scaled * value_i
            for b, (j, value_j) in enumerate(entries):
                if b != a:
                    row[j] = row.get(j, 0.0) - scaled * value_j
        order.append(k)
        kept.append(pivot)
        lower.append(column)
    return _LDL(order, kept, lower)


class Coordinates:
    """A symmetric matrix assembled from blocks and coordinate entries (duplicates add up)."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        self.rows.append(rows)
        self.cols.append(cols)
        self.values.append(values)

    def add_block(self, indices: np.ndarray, block: np.ndarray) -> None:
        """block[a, b] added at (indices[a], indices[b])."""
        self.add(np.repeat(indices, indices.size), np.tile(indices, indices.size), block.ravel())

    def factor(self, size: int, floor: float = ROUND_OFF) -> Factor | None:
        return factor(size, *self._entries(), floor)

    def solve(self, size: int, rhs: np.ndarray) -> np.ndarray | None:
        """The matrix's solution for ``rhs``, None if it is singular or not finite. Small ones
        by one LU solve: no factor to keep, and no inertia wanted."""
        rows, cols, values = self._entries()
        if size > DENSE_LIMIT:
            factored = factor(size, rows, cols, values)
            return None if factored is None else factored.solve(rhs)
        matrix = np.bincount(rows * size + cols, values, size * size).reshape(size, size)
        try:
            return np.linalg.solve(matrix, rhs)
        except np.linalg.LinAlgError:
            return None

    def _entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.concatenate([np.zeros(0, dtype=np.int64), *self.rows]),
            np.concatenate([np.zeros(0, dtype=np.int64), *self.cols]),
            np.concatenate([np.zeros(0), *self.values]),
        )
