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

from ..unitgraph import FIXED


@dataclass(frozen=True)
class Layout:
    """Where the model's vectors live (fixed per solve): per vector its support (groups), and
    every pair of entries of two vectors on the same group, for U^T D^-1 U."""

    sides: tuple[tuple[int, np.ndarray, np.ndarray], ...]  # (layer, row support, col support)
    vector: np.ndarray  # vector of each entry
    group: np.ndarray  # group of each entry
    first: np.ndarray  # entry pairs on one group: U^T D^-1 U gathers val[first] val[second]
    second: np.ndarray
    size: int  # number of vectors (2 per layer term)


def layout(row_groups, col_groups, n_groups: int, movable: np.ndarray) -> Layout:
    """Supports of the model's vectors for layers with these row and movable-column groups."""
    sides = []
    vectors, groups = [], []
    for index, (rows, cols) in enumerate(zip(row_groups, col_groups, strict=True)):
        if not cols.size:
            continue
        row_support = np.unique(rows[rows != FIXED])
        row_support = row_support[movable[row_support]]
        col_support = np.unique(cols)
        col_support = col_support[movable[col_support]]
        sides.append((index, row_support, col_support))
        for support in (row_support, col_support):
            vectors.append(np.full(support.size, len(vectors), dtype=np.int64))
            groups.append(support)
    vector = np.concatenate(vectors) if vectors else np.zeros(0, dtype=np.int64)
    group = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    # Pairs of entries on the same group: sort by group, then pair up within each run.
    order = np.argsort(group, kind="stable")
    sorted_groups = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    lengths = np.diff(np.r_[starts, sorted_groups.size])
    first, second = [], []
    for length in np.unique(lengths):
        runs = starts[lengths == length]
        for a in range(length):
            for b in range(length):
                first.append(order[runs + a])
                second.append(order[runs + b])
    return Layout(
        tuple(sides),
        vector,
        group,
        np.concatenate(first) if first else np.zeros(0, dtype=np.int64),
        np.concatenate(second) if second else np.zeros(0, dtype=np.int64),
        len(vectors),
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
    """The model from the diagonal D (groups) and, per layer of ``layout.sides``, the row vector
    alpha (units), the column vector out (units), S and gamma; None if M is not positive
    definite. ``terms[k]`` holds (alpha summed into groups, out summed into groups, S, gamma)."""
    inverse_diagonal = np.where(
        movable & (diagonal > 0), 1.0 / np.where(diagonal > 0, diagonal, 1.0), 0.0
    )
    size = layout.size
    values = np.empty(layout.group.size)
    inverse_k = np.zeros((size, size))
    position = 0
    # Each layer's vectors are divided by sqrt(S) (and K_l multiplied by S): the same M, with
    # entries of order one even when the layers' loads differ by many orders of magnitude. Then
    # K_l^-1 = [[-(r-1) (gamma / S) / (p^2 r^3), -1 / (p^2 r^2)], [-1 / (p^2 r^2), 0]].
    for k, ((_, row_support, col_support), (rows, cols, total, gamma)) in enumerate(
        zip(layout.sides, terms, strict=True)
    ):
        block = slice(position, position + row_support.size + col_support.size)
        position = block.stop
        if not (total > 0 and np.isfinite(total)):
            # No coupling through this layer: U = 0 there, and K^-1 = [[0, 1], [1, 0]] keeps
            # the count of positive eigenvalues without changing M.
            values[block] = 0.0
            inverse_k[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = [[0.0, 1.0], [1.0, 0.0]]
            continue
        root = np.sqrt(total)
        values[block.start : block.start + row_support.size] = rows[row_support] / root
        values[block.start + row_support.size : block.stop] = cols[col_support] / root
        off = -1.0 / (p * p * r * r)
        inverse_k[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = [
            [-(r - 1.0) * (gamma / total) / (p * p * r**3), off],
            [off, 0.0],
        ]
    capacitance = inverse_k
    if layout.first.size:
        weights = (
            values[layout.first]
            * values[layout.second]
            * inverse_diagonal[layout.group[layout.first]]
        )
        capacitance += np.bincount(
            layout.vector[layout.first] * size + layout.vector[layout.second],
            weights,
            minlength=size * size,
        ).reshape(size, size)
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
