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
constant over a layer (the slow, per-layer modes), and t_oi ~ a_o out_i / S with
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


@dataclass(frozen=True)
class _Side:
    """How one side (rows or movable columns) of a layer sums into its vector's support."""

    support: np.ndarray  # distinct movable groups, sorted
    units: np.ndarray | None  # units that count (None: every unit, one per support entry)
    position: np.ndarray | None  # their positions in ``support``

    @staticmethod
    def of(groups: np.ndarray, movable: np.ndarray) -> _Side:
        if groups.size and groups[0] >= 0 and groups[-1] - groups[0] == groups.size - 1:
            run = slice(int(groups[0]), int(groups[-1]) + 1)
            if movable[run].all() and np.array_equal(groups, np.arange(run.start, run.stop)):
                return _Side(groups, None, None)  # a plain layer: unit k is group k + start
        seen = np.zeros(movable.size + 1, dtype=bool)
        seen[groups] = True  # FIXED (-1) marks the pad
        support = np.flatnonzero(seen[:-1] & movable)
        if np.array_equal(groups, support):  # a plain layer: unit k is group support[k]
            return _Side(support, None, None)
        units = np.flatnonzero(np.append(movable, False)[groups])
        return _Side(support, units, np.searchsorted(support, groups[units]))

    def sums(self, values: np.ndarray) -> np.ndarray:
        """values (per unit) summed into the support's groups."""
        if self.units is None:
            return values
        return np.bincount(self.position, values[self.units], self.support.size)


@dataclass(frozen=True)
class Layout:
    """Where the model's vectors live (fixed per solve): per layer term its row and column
    sides, and every pair of entries of two vectors on one group, for U^T D^-1 U."""

    sides: tuple[tuple[int, _Side, _Side], ...]  # (layer, rows, columns)
    vector: np.ndarray  # vector of each entry
    group: np.ndarray  # group of each entry
    first: np.ndarray  # entry pairs on one group: U^T D^-1 U gathers val[first] val[second]
    second: np.ndarray
    pair_group: np.ndarray  # group[first]
    pair_cell: np.ndarray  # vector[first] * size + vector[second]
    size: int  # number of vectors (2 per layer term)


def layout(row_groups, col_groups, movable: np.ndarray) -> Layout:
    """Supports of the model's vectors for layers with these row and movable-column groups."""
    sides = []
    vectors, groups = [], []
    for index, (rows, cols) in enumerate(zip(row_groups, col_groups, strict=True)):
        if not cols.size:
            continue
        row_side, col_side = _Side.of(rows, movable), _Side.of(cols, movable)
        sides.append((index, row_side, col_side))
        for side in (row_side, col_side):
            vectors.append(np.full(side.support.size, len(vectors), dtype=np.int64))
            groups.append(side.support)
    vector = np.concatenate(vectors) if vectors else np.zeros(0, dtype=np.int64)
    group = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    # Pairs of entries on the same group: sort by group, then pair up within each run.
    order = np.argsort(group, kind="stable")
    sorted_groups = group[order]
    boundary = np.ones(sorted_groups.size, dtype=bool)
    np.not_equal(sorted_groups[1:], sorted_groups[:-1], out=boundary[1:])
    starts = np.flatnonzero(boundary)
    lengths = np.diff(np.append(starts, sorted_groups.size))
    first, second = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for length in range(1, int(lengths.max(initial=0)) + 1):
        runs = starts[lengths == length]
        if not runs.size:
            continue
        for a in range(length):
            for b in range(length):
                first.append(order[runs + a])
                second.append(order[runs + b])
    first_entries, second_entries = np.concatenate(first), np.concatenate(second)
    size = len(vectors)
    return Layout(
        tuple(sides),
        vector,
        group,
        first_entries,
        second_entries,
        group[first_entries],
        vector[first_entries] * size + vector[second_entries],
        size,
    )


@dataclass(frozen=True)
class Model:
    """M^-1 of the module docstring at one point."""

    inverse_diagonal: np.ndarray  # 1 / D on movable groups, 0 elsewhere
    layout: Layout
    values: np.ndarray  # U's entries, in layout order
    basis: np.ndarray  # eigenvectors of K^-1 + U^T D^-1 U
    inverse_eigenvalues: np.ndarray

    def solve(self, residual: np.ndarray) -> np.ndarray:
        """M^-1 residual (zero on groups that cannot move)."""
        scaled = residual * self.inverse_diagonal
        layout = self.layout
        if not layout.size:
            return scaled
        projected = np.bincount(
            layout.vector, self.values * scaled[layout.group], minlength=layout.size
        )
        weights = self.basis @ (self.inverse_eigenvalues * (self.basis.T @ projected))
        spread = np.bincount(
            layout.group, self.values * weights[layout.vector], minlength=scaled.size
        )
        return scaled - self.inverse_diagonal * spread


def build(
    layout: Layout,
    diagonal: np.ndarray,
    movable: np.ndarray,
    terms: list[tuple[np.ndarray, np.ndarray, float, float]],
    p: float,
    r: float,
) -> Model | None:
    """The model from the diagonal D (groups) and, per layer of ``layout.sides``, alpha (per
    row), out (per movable column), S and gamma; None if M is not positive definite."""
    inverse_diagonal = np.zeros(diagonal.size)
    usable = movable & (diagonal > 0)
    inverse_diagonal[usable] = 1.0 / diagonal[usable]
    size = layout.size
    values = np.empty(layout.group.size)
    inverse_k = np.zeros((size, size))
    position = 0
    off = -1.0 / (p * p * r * r)
    # Each layer's vectors are divided by sqrt(S) (and K_l multiplied by S): the same M, with
    # entries of order one even when the layers' loads differ by many orders of magnitude. Then
    # K_l^-1 = [[-(r-1) (gamma / S) / (p^2 r^3), -1 / (p^2 r^2)], [-1 / (p^2 r^2), 0]].
    for k, ((_, row_side, col_side), (alpha, out, total, gamma)) in enumerate(
        zip(layout.sides, terms, strict=True)
    ):
        middle = position + row_side.support.size
        end = middle + col_side.support.size
        if not (total > 0 and np.isfinite(total)):
            # No coupling through this layer: U = 0 there, and K^-1 = [[0, 1], [1, 0]] keeps
            # the count of positive eigenvalues without changing M.
            values[position:end] = 0.0
            inverse_k[2 * k, 2 * k + 1] = inverse_k[2 * k + 1, 2 * k] = 1.0
        else:
            root = 1.0 / np.sqrt(total)
            np.multiply(row_side.sums(alpha), root, out=values[position:middle])
            np.multiply(col_side.sums(out), root, out=values[middle:end])
            inverse_k[2 * k, 2 * k] = -(r - 1.0) * (gamma / total) / (p * p * r**3)
            inverse_k[2 * k, 2 * k + 1] = inverse_k[2 * k + 1, 2 * k] = off
        position = end
    capacitance = inverse_k
    if layout.first.size:
        weights = values[layout.first] * values[layout.second]
        weights *= inverse_diagonal[layout.pair_group]
        capacitance += np.bincount(layout.pair_cell, weights, size * size).reshape(size, size)
    if not np.all(np.isfinite(capacitance)):
        return None
    try:
        eigenvalues, basis = np.linalg.eigh(capacitance)
    except np.linalg.LinAlgError:
        return None
    largest = float(np.max(np.abs(eigenvalues), initial=0.0))
    if np.count_nonzero(eigenvalues > 0) != len(terms) or np.any(
        np.abs(eigenvalues) <= 1e-12 * largest
    ):
        return None
    return Model(inverse_diagonal, layout, values, basis, 1.0 / eigenvalues)
