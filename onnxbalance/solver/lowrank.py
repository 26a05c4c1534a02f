"""A model of the Hessian of F that costs no pass over the couplings: diagonal plus one rank-one
term per layer, inverted exactly by the Woodbury identity.

Notation of curvature.py: t_oi = c[o, i] exp(p (u_o - u_i)) over the movable columns of one layer,
rho_o its row sums (fixed columns included), out_i = sum_o rho_o^(r-1) t_oi. In unit coordinates
one layer adds to the Hessian

    row-row   p^2 r^2 rho_o^r                                   (diagonal)
    row-col   -p^2 r^2 rho_o^(r-1) t_oi
    col-col   p^2 r out_i (diagonal) + p^2 r (r-1) sum_o rho_o^(r-2) t_oi t_oi'.

Replace the layer's matrix rho_o^(r-1) t_oi by its rank-one part alpha_o out_i / S, with
alpha_o = rho_o^(r-1) sum_i t_oi (row sums), out_i (column sums) and S = sum_o alpha_o =
sum_i out_i: the same row and column sums, so the model and H agree on every vector that is
constant over a layer (the slow, per-layer modes; exactly for r = 1 when each layer's rows and
columns belong to one layer of groups, approximately otherwise), and t_oi ~ a_o out_i / S with
a_o = sum_i t_oi gives the col-col term gamma out_i out_i' / S^2, gamma = sum_o rho_o^(r-2) a_o^2.
Everything is known from the loads at the point. With the diagonal D = p^2 r (r in_g + out_g)
of Jacobi, and per layer the group vectors x = (alpha summed into row groups) and
y = (out summed into column groups),

    M = D + U K U^T,   U = [x_1 y_1 x_2 y_2 ...],
    K_l = p^2 [[0, -r^2 / S], [-r^2 / S, r (r-1) gamma / S^2]]

For r = 1, M is the graph Laplacian of the layers' rank-one couplings, which is positive definite
when every group is anchored. In general K_l has one positive and one negative eigenvalue
(det = -p^4 r^4 / S^2 < 0), and by the inertia of the Schur complements of
[[D, U], [U^T, -K^-1]], M is positive definite exactly when K^-1 + U^T D^-1 U has as many positive
eigenvalues as there are layer terms and none zero; :func:`build` checks this and returns None
otherwise. Then

    M^-1 = D^-1 - D^-1 U (K^-1 + U^T D^-1 U)^-1 U^T D^-1

costs a few operations per group (U has one or two non-zeros per group in a layered network).
On random dense layers the error of the model is the fluctuation of t_oi about its rank-one
part, of relative size about 1/sqrt(width): M^-1 g is then a Newton step accurate to a few
per cent, at no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import sparse
from .objective import Bins, consecutive_start, distinct, stable_order


@dataclass(frozen=True)
class _Side:
    """How one side (rows or movable columns) of a layer sums into its vector's support."""

    support: np.ndarray  # distinct movable groups, sorted
    units: np.ndarray | None  # units that count (None: every unit, one per support entry)
    position: np.ndarray | None  # their positions in ``support``

    @staticmethod
    def of(groups: np.ndarray, movable: np.ndarray, start: int | None, all_move: bool) -> _Side:
        """``start``: g if groups are g, g + 1, ... (else None); ``all_move``: movable.all()."""
        if start is not None and (all_move or movable[start : start + groups.size].all()):
            return _Side(groups, None, None)  # a plain layer: unit k is group k + start
        present = distinct(groups, movable.size)
        support = present[movable[present]]
        if not support.size:  # e.g. the output rows: nothing to sum
            return _Side(support, None, None)
        if np.array_equal(groups, support):  # a plain layer: unit k is group support[k]
            return _Side(support, None, None)
        units = np.flatnonzero(np.append(movable, False)[groups])
        return _Side(support, units, np.searchsorted(support, groups[units]))

    def sums(self, values: np.ndarray) -> np.ndarray:
        """values (per unit) summed into the support's groups."""
        if self.units is None:
            return values if self.support.size else self.support.astype(values.dtype)
        return np.bincount(self.position, values[self.units], self.support.size)


@dataclass(frozen=True)
class Layout:
    """Where the model's vectors live (fixed per solve): per layer term its row and column
    sides; the cells of U^T D^-1 U that each product of two entries on one group adds to; and,
    when every side is plain, where each entry comes from among the concatenated row and
    column values of all layers."""

    # (layer, row side, column side, its rows and its columns among all layers')
    sides: tuple[tuple[int, _Side, _Side, slice, slice], ...]
    vector: np.ndarray  # vector of each entry
    group: np.ndarray  # group of each entry
    left: np.ndarray  # entry pairs on one group (each entry with itself too), whose
    right: np.ndarray  # products sum into the cells of U^T D^-1 U (by_cell)
    size: int  # number of vectors (2 per layer term)
    source: np.ndarray | None  # entry k = concatenate([rows, columns])[source[k]], or None
    term: np.ndarray  # layer term of each entry
    by_vector: Bins  # entries into vectors
    by_group: Bins  # entries into groups
    by_cell: Bins  # entry pairs into the non-zero cells of U^T D^-1 U, sorted by cell
    cell_rows: np.ndarray  # row and column of each non-zero cell
    cell_cols: np.ndarray


def layout(row_groups, col_groups, movable: np.ndarray, starts=None) -> Layout:
    """Supports of the model's vectors for layers with these row and movable-column groups.

    ``starts``: per layer (g, h) where its row groups are g, g + 1, ... and its column groups
    h, h + 1, ... (None where they are not), if the caller knows them already.
    """
    if starts is None:
        starts = [
            (consecutive_start(rows), consecutive_start(cols))
            for rows, cols in zip(row_groups, col_groups, strict=True)
        ]
    all_move = bool(movable.all())
    sides = []
    groups, sizes, source_starts = [], [], []
    row_start = col_start = 0
    total_rows = sum(rows.size for rows in row_groups)
    plain = True
    for index, (rows, cols, (row_first, col_first)) in enumerate(
        zip(row_groups, col_groups, starts, strict=True)
    ):
        if cols.size:
            row_side = _Side.of(rows, movable, row_first, all_move)
            col_side = _Side.of(cols, movable, col_first, all_move)
            sides.append(
                (
                    index,
                    row_side,
                    col_side,
                    slice(row_start, row_start + rows.size),
                    slice(col_start, col_start + cols.size),
                )
            )
            for side, start in ((row_side, row_start), (col_side, total_rows + col_start)):
                groups.append(side.support)
                sizes.append(side.support.size)
                source_starts.append(start)
                plain = plain and side.units is None
        row_start += rows.size
        col_start += cols.size
    size = len(sizes)  # vectors 2t and 2t + 1 are the row and column vectors of term t
    vector = np.repeat(np.arange(size), sizes)
    group = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    source = None
    if plain and size:
        first_entries = np.cumsum(sizes) - sizes
        source = np.arange(vector.size) + np.repeat(
            np.subtract(source_starts, first_entries), sizes
        )
    # Pairs of entries on the same group: the runs of the entries sorted by group.
    by_group = Bins(group, movable.size, stable_order(group, movable.size))
    order, starts = by_group.order, by_group.starts
    lengths = np.diff(np.append(starts, group.size))
    first, second = [], []
    for length in range(2, int(lengths.max(initial=0)) + 1):
        runs = starts[lengths == length]
        if not runs.size:
            continue
        for a in range(length):
            for b in range(length):
                if a != b:
                    first.append(order[runs + a])
                    second.append(order[runs + b])
    entries = np.arange(vector.size)
    left, right = np.concatenate([entries, *first]), np.concatenate([entries, *second])
    # pairs in the order of their cells: each build sums runs without reordering the products;
    # only the cells that occur are numbered (vectors meet only where their layers share groups)
    cell = vector[left] * size + vector[right]
    by_cell = stable_order(cell, size * size)
    ordered = cell[by_cell]
    first_of_cell = np.ones(ordered.size, dtype=bool)
    np.not_equal(ordered[1:], ordered[:-1], out=first_of_cell[1:])
    cells = ordered[first_of_cell]
    return Layout(
        tuple(sides),
        vector,
        group,
        left[by_cell],
        right[by_cell],
        size,
        source,
        vector >> 1,
        Bins.consecutive(sizes),
        by_group,
        Bins(np.cumsum(first_of_cell) - 1, cells.size),
        cells // max(size, 1),
        cells % max(size, 1),
    )


@dataclass(frozen=True)
class Model:
    """M^-1 of the module docstring at one point."""

    inverse_diagonal: np.ndarray  # 1 / D on movable groups, 0 elsewhere
    layout: Layout
    values: np.ndarray  # U's entries, in layout order
    capacitance: sparse.Factor  # K^-1 + U^T D^-1 U, factored

    def solve(self, residual: np.ndarray) -> np.ndarray:
        """M^-1 residual (zero on groups that cannot move)."""
        scaled = residual * self.inverse_diagonal
        layout = self.layout
        if not layout.size:
            return scaled
        projected = layout.by_vector(self.values * scaled[layout.group])
        weights = self.capacitance.solve(projected)
        spread = layout.by_group(self.values * weights[layout.vector])
        return scaled - self.inverse_diagonal * spread


def build(
    layout: Layout,
    inverse_diagonal: np.ndarray,
    alpha: np.ndarray,
    out: np.ndarray,
    totals: np.ndarray,
    gammas: np.ndarray,
    p: float,
    r: float,
) -> Model | None:
    """The model from 1 / D (0 on groups that cannot move), alpha of every row and out of
    every movable column of all layers (concatenated in layer order), and per layer term S and
    gamma; None if M is not positive definite."""
    size = layout.size
    live = (totals > 0) & np.isfinite(totals)
    safe_totals = np.where(live, totals, 1.0)
    # Each layer's vectors are divided by sqrt(S) (and K_l multiplied by S): the same M, with
    # entries of order one even when the layers' loads differ by many orders of magnitude. Then
    # K_l^-1 = [[-(r-1) (gamma / S) / (p^2 r^3), -1 / (p^2 r^2)], [-1 / (p^2 r^2), 0]]. A layer
    # with S = 0 couples nothing: U = 0 there, and K^-1 = [[0, 1], [1, 0]] keeps the count of
    # positive eigenvalues without changing M.
    if layout.source is not None:
        values = np.concatenate([alpha, out])[layout.source]
    else:
        values = np.empty(layout.group.size)
        position = 0
        for _, row_side, col_side, rows, cols in layout.sides:
            middle = position + row_side.support.size
            end = middle + col_side.support.size
            values[position:middle] = row_side.sums(alpha[rows])
            values[middle:end] = col_side.sums(out[cols])
            position = end
    values *= (live / np.sqrt(safe_totals))[layout.term]
    weighted = values * inverse_diagonal[layout.group]
    products = layout.by_cell(weighted[layout.left] * values[layout.right])
    rows, cols = 2 * np.arange(size // 2), 2 * np.arange(size // 2) + 1  # each term's (2l, 2l + 1)
    off = np.where(live, -1.0 / (p * p * r * r), 1.0)
    capacitance = sparse.factor(
        size,
        np.concatenate([layout.cell_rows, rows, rows, cols]),
        np.concatenate([layout.cell_cols, rows, cols, rows]),
        np.concatenate(
            [
                products,
                -np.where(live, (r - 1.0) * gammas / safe_totals, 0.0) / (p * p * r**3),
                off,
                off,
            ]
        ),
        floor=1e-12,
    )
    if capacitance is None or capacitance.positive != size // 2:
        return None
    return Model(inverse_diagonal, layout, values, capacitance)
