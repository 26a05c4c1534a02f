"""Second-order information of F(u) on a unit graph: Hessian-vector products, a two-level
preconditioner and the exact objective on the coarse (per-layer) space.

Notation of objective.py: for one row o of one layer, t_oi = c[o, i] exp(p (u_o - u_i)) over its
movable columns, rho_o = exp(p u_o) (fixed_o + sum_i c[o, i] exp(-p u_i)), s_o = rho_o - sum_i t_oi
and F(u) = sum_o rho_o^r. With e_o / e_i the indicator vector of the group of a row / column
(zero for units that cannot move),

    grad rho_o   = p (rho_o e_o - sum_i t_oi e_i)
    hess rho_o   = p^2 (sum_i t_oi (e_o - e_i)(e_o - e_i)^T + s_o e_o e_o^T)
    H            = sum_o r (r-1) rho_o^(r-2) grad rho_o grad rho_o^T + r rho_o^(r-1) hess rho_o.

With D_o = grad rho_o . v / rho_o = p (v_o - (t v)_o / rho_o) the two row terms add up to
p r^2 rho_o^r D_o on the row's group, and the column terms to

    (H v)_i  +=  r p^2 v_i out_i - (t^T y)_i,     y_o = rho_o^(r-1) (p r (r-1) D_o + r p^2 v_o)

where out_i = (t^T rho^(r-1))_i is the column's outgoing load (known from the gradient). So one
Hessian-vector product costs two passes over every coupling matrix: t v and t^T y. Everything is
written with bounded quantities (loads rho^r <= F, ratios t/rho in [0, 1], vectors shifted by
their largest log-entry as in objective.py), so scales of 1e+-100 do not overflow; while every
coupling times every factor stays within exp(+-600) (objective.py's condition), evaluate() takes
the plain factors exp(-+p u) instead, for all layers' rows at once. Layers whose couplings span
less than 1e30 use their float32 copy (couplings.py) for Hessian products while the factors
stay within 1e+-15, and for evaluate(fast=True) points: such points and products only steer;
F and its gradient, which decide acceptance and convergence, come from float64 evaluations.

F is convex in u, so H is positive semi-definite; for r < 1 its first term is negative and only
the sum is guaranteed non-negative, which is why the Newton solver guards against non-positive
curvature.

Coarse space. Aggregates group the movable scale groups by the first layer whose rows they are;
P is the 0/1 matrix (group, aggregate). In a deep narrow network the slow mode is the per-layer
mean of u (a 1-D Laplacian along depth that Algorithm 1 and Jacobi resolve slowly). Shifting u by
P z multiplies t_oi by exp(p (z_A(o) - z_b(i))), so with the per-row fractions
T_ob = (sum of t_oi over the columns of aggregate b) / rho_o (one product of each coupling matrix
with a block of k_l indicator columns, k_l = number of aggregates among the layer's columns, 1 in
an MLP),

    rho_o(u + P z) = rho_o exp(p z_A(o)) (1 - sum_b T_ob + sum_b T_ob exp(-p z_b))

is known exactly for every z without touching c again. This gives both the Galerkin matrix
P^T H P of the two-level preconditioner (Jacobi p^2 r (r in_g + out_g) plus P (P^T H P)^-1 P^T)
and the exact minimiser of F over the coarse space, used to move u to the right per-layer scales
before Newton starts. We count a block product as k_l passes (max over layers), which
over-counts (one product with a k-column block is cheaper than k products).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..unitgraph import FIXED
from . import lowrank
from .couplings import SINGLE_FACTORS
from .objective import _DIRECT_LIMIT, _TINY, Bins, Objective, _accumulate

FAST_LIMIT = 30.0  # largest |p u| for which evaluate(fast=True) uses the float32 copies
# (exp(30) < SINGLE_FACTORS: the products stay normal float32 numbers)
COARSE_RTOL = 1e-9  # the coarse solve stops when its Newton step would gain less (relative)


def _group_values(values: np.ndarray, index: np.ndarray, movable: np.ndarray) -> np.ndarray:
    return np.where(movable, values[index], 0.0)


@dataclass(frozen=True)
class _LayerStructure:
    """What a solve needs of one layer besides the float64 couplings (fixed per solve)."""

    row_movable: np.ndarray  # row_groups != FIXED
    row_index: np.ndarray  # row_groups with FIXED replaced by 0
    free32: np.ndarray | None  # float32 copy of free (couplings.py), None if the range is too wide
    ones: np.ndarray  # per row, for layers without fixed columns (every row moves entirely)
    empty: np.ndarray  # no columns


@dataclass(frozen=True)
class _CoarseStructure:
    """One layer's coarse (aggregate) coordinates, for the block products of build_coarse."""

    local: np.ndarray  # aggregates touched by this layer (global indices)
    row_onehot: np.ndarray  # (rows, len(local)): row's aggregate, zero row if it cannot move
    col_indicator: np.ndarray  # (movable cols, k): column's aggregate among ``col_local``
    col_local: np.ndarray  # positions in ``local`` of the columns' aggregates


@dataclass(frozen=True)
class _Rows:
    """The rows and the movable columns of all layers, concatenated in layer order."""

    row_groups: np.ndarray  # FIXED replaced by n_groups (a pad entry)
    col_groups: np.ndarray
    fixed_row_sum: np.ndarray
    row_slices: tuple[slice, ...]  # each layer's part
    col_slices: tuple[slice, ...]
    incoming: Bins  # rows into groups (n_groups + 1 bins: the last one takes FIXED)
    outgoing: Bins  # columns into groups
    row_layers: Bins  # rows into layers
    col_layers: Bins

    @staticmethod
    def of(objective: Objective) -> _Rows:
        n = objective.n_groups
        layers = objective.layers
        row_stops = np.cumsum([0] + [layer.row_groups.size for layer in layers])
        col_stops = np.cumsum([0] + [layer.col_groups.size for layer in layers])
        row_groups = np.concatenate([layer.row_groups for layer in layers] + [[]])
        return _Rows(
            np.where(row_groups == FIXED, n, row_groups).astype(np.int64),
            np.concatenate([layer.col_groups for layer in layers] + [[]]).astype(np.int64),
            np.concatenate([layer.fixed_row_sum for layer in layers] + [[]]),
            tuple(
                slice(int(a), int(b)) for a, b in zip(row_stops[:-1], row_stops[1:], strict=True)
            ),
            tuple(
                slice(int(a), int(b)) for a, b in zip(col_stops[:-1], col_stops[1:], strict=True)
            ),
            Bins(np.where(row_groups == FIXED, n, row_groups), n + 1),
            Bins(np.concatenate([layer.col_groups for layer in layers] + [[]]), n),
            Bins(np.repeat(np.arange(len(layers)), np.diff(row_stops)), len(layers)),
            Bins(np.repeat(np.arange(len(layers)), np.diff(col_stops)), len(layers)),
        )


def _present(values: np.ndarray, size: int) -> np.ndarray:
    """Sorted distinct entries of ``values`` in [0, size) (np.unique without sorting)."""
    seen = np.zeros(size + 1, dtype=bool)
    seen[np.where((values >= 0) & (values < size), values, size)] = True
    return np.flatnonzero(seen[:size])


def aggregates(objective: Objective, movable: np.ndarray) -> np.ndarray:
    """Coarse aggregate of every group: the first layer whose rows it is (-1: cannot move)."""
    aggregate = np.full(objective.n_groups, -1, dtype=np.int64)
    for index, layer in enumerate(objective.layers):
        groups = layer.row_groups[layer.row_groups != FIXED]
        aggregate[groups[aggregate[groups] < 0]] = index
    for layer in objective.layers:  # a group that is never a row: one aggregate of its own kind
        groups = layer.col_groups[aggregate[layer.col_groups] < 0]
        aggregate[groups] = len(objective.layers)
    aggregate[~movable] = -1
    used = np.zeros(len(objective.layers) + 1, dtype=bool)
    used[aggregate[aggregate >= 0]] = True
    number = np.cumsum(used) - 1  # consecutive numbers for the aggregates in use
    return np.where(aggregate >= 0, number[aggregate], -1)


class Workspace:
    """The objective, the movable mask and the per-layer structure shared by all iterations."""

    def __init__(self, objective: Objective, movable: np.ndarray) -> None:
        self.objective = objective
        self.movable = np.asarray(movable, dtype=bool)
        self.aggregate = aggregates(objective, self.movable)
        self.n_coarse = max(int(self.aggregate.max()) + 1, 0) if self.aggregate.size else 0
        structures = []
        for layer in objective.layers:
            row_movable = layer.row_groups != FIXED
            structures.append(
                _LayerStructure(
                    row_movable,
                    np.where(row_movable, layer.row_groups, 0),
                    layer.single,
                    np.ones(layer.fixed_row_sum.size),
                    np.zeros(0),
                )
            )
        self.structures = tuple(structures)
        self.rows = _Rows.of(objective)
        self._coarse: tuple[tuple[_CoarseStructure, ...], int] | None = None
        self.simple = self._simple_rows()
        self.uniform = self._uniform_layers()
        self.has_single = any(structure.free32 is not None for structure in structures)
        self.layout = lowrank.layout(
            [layer.row_groups for layer in objective.layers],
            [layer.col_groups for layer in objective.layers],
            self.movable,
        )
        self.model_layers = np.array([side[0] for side in self.layout.sides], dtype=np.int64)

    def coarse_structures(self) -> tuple[tuple[_CoarseStructure, ...], int]:
        """Per layer its coarse coordinates, and the passes one block product costs (the
        largest number of aggregates among one layer's columns); built on first use."""
        if self._coarse is not None:
            return self._coarse
        block_passes = 0
        coarse = []
        m = self.n_coarse
        for layer, structure in zip(self.objective.layers, self.structures, strict=True):
            row_agg = np.where(structure.row_movable, self.aggregate[structure.row_index], -1)
            col_agg = self.aggregate[layer.col_groups]
            local = _present(np.concatenate([row_agg, col_agg]), m)
            row_onehot = np.zeros((row_agg.size, local.size))
            live_rows = np.nonzero(row_agg >= 0)[0]
            row_onehot[live_rows, np.searchsorted(local, row_agg[live_rows])] = 1.0
            col_used = _present(col_agg, m)
            col_indicator = np.zeros((col_agg.size, col_used.size))
            live_cols = np.nonzero(col_agg >= 0)[0]
            col_indicator[live_cols, np.searchsorted(col_used, col_agg[live_cols])] = 1.0
            block_passes = max(block_passes, col_used.size)
            coarse.append(
                _CoarseStructure(local, row_onehot, col_indicator, np.searchsorted(local, col_used))
            )
        self._coarse = (tuple(coarse), block_passes)
        return self._coarse

    def _uniform_layers(self) -> list[tuple[int, int]] | None:
        """Per layer (row aggregate, column aggregate) if all its rows share one (n_coarse:
        none, z = 0) on top of :attr:`simple`; else None."""
        if self.simple is None:
            return None
        rows, cols = self.simple
        uniform = []
        start = 0
        for layer in self.objective.layers:
            stop = start + layer.row_groups.size
            if stop > start and np.any(rows[start:stop] != rows[start]):
                return None
            a = int(rows[start]) if stop > start else self.n_coarse
            b = int(cols[start]) if stop > start else self.n_coarse
            uniform.append((a, b))
            start = stop
        return uniform

    def _simple_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per row of every layer (concatenated): its aggregate and its layer's column
        aggregate (n_coarse where there is none), if every layer's movable columns lie in one
        aggregate; else None."""
        m = self.n_coarse
        padded = np.append(np.where(self.aggregate >= 0, self.aggregate, m), m)
        rows, cols = [], []
        for layer in self.objective.layers:
            col_agg = _present(padded[layer.col_groups], m)
            if col_agg.size > 1:
                return None
            rows.append(padded[layer.row_groups])  # FIXED = -1 picks the pad
            cols.append(np.full(layer.row_groups.size, col_agg[0] if col_agg.size else m))
        if not rows:
            return None
        return np.concatenate(rows), np.concatenate(cols)


@dataclass(frozen=True)
class LayerState:
    """Per-row and per-column quantities of one layer at one point u (all bounded)."""

    load: np.ndarray  # rho_o^r
    sums: np.ndarray  # (c @ col_factor)_o + fixed_o exp(-top): rho_o = exp(p u_o + top) sums_o
    col_factor: np.ndarray  # exp(-p u_i - top), in (0, 1]
    row_weight: np.ndarray  # rho_o^(r-1) exp(p u_o - top2), in [0, 1]
    col_scale: np.ndarray  # exp(-p u_i + top2): out_i = col_scale_i (c^T row_weight)_i
    col_out: np.ndarray  # out_i per movable column
    moving: np.ndarray  # share of rho_o from movable columns (0 for rows with rho_o = 0)


@dataclass(frozen=True)
class Point:
    """F, its loads and the layer states at one point u (two passes to compute)."""

    log_scales: np.ndarray
    value: float
    incoming: np.ndarray
    outgoing: np.ndarray
    layers: tuple[LayerState, ...]
    exact: bool = True  # False: some products ran on the float32 copies (evaluate(fast=True))
    rows: tuple[np.ndarray, ...] | None = None  # load, moving, col_out of all layers at once

    def gradient(self, q: float) -> np.ndarray:
        return q * (self.incoming - self.outgoing)


def evaluate(workspace: Workspace, log_scales: np.ndarray, fast: bool = False) -> Point:
    """F(u), in_g and out_g like :meth:`Objective.loads` (two passes), keeping the layer states.

    While every coupling times every factor exp(+-p u) stays within exp(+-600) (the condition of
    :meth:`Objective.loads`), the products take the plain factors exp(-p u_i) and
    rho_o^(r-1) exp(p u_o); with ``fast`` and factors within exp(+-FAST_LIMIT), layers that
    have a float32 copy (couplings.py) multiply with it: about 1e-7 relative error in every
    load, so such a point (``exact=False``) only steers, it never certifies.
    """
    objective = workspace.objective
    scaled = objective.p * np.asarray(log_scales, dtype=np.float64)
    largest = float(max(scaled.max(), -scaled.min())) if scaled.size else 0.0
    if objective._log_range + 2.0 * largest < _DIRECT_LIMIT:
        return _evaluate_direct(workspace, log_scales, scaled, fast and largest <= FAST_LIMIT)
    return _evaluate_shifted(workspace, log_scales)


def start(workspace: Workspace) -> Point:
    """evaluate() at u = 0 (two passes, like any evaluation), mostly from the coupling summary:
    there rho_o is the row sum of c and, for r = 1, out_i its column sum; only for r != 1 do
    the outgoing loads need products, rho^(r-1) @ c."""
    objective = workspace.objective
    rows, r, n = workspace.rows, objective.r, objective.n_groups
    if not objective._log_range < _DIRECT_LIMIT:
        return evaluate(workspace, np.zeros(n))
    objective.passes += 2
    sums = np.concatenate([layer.row_sums for layer in objective.layers] + [[]])
    col_factor = np.ones(rows.col_groups.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        if r == 1.0:
            load, row_weight = sums, np.ones(sums.size)
            back = np.concatenate([layer.free_col_sums for layer in objective.layers] + [[]])
        else:
            load = sums**r
            row_weight = np.where(sums > 0, load / sums, 0.0)
            back = np.empty(col_factor.size)
            for layer, row_part, col_part in zip(
                objective.layers, rows.row_slices, rows.col_slices, strict=True
            ):
                if col_part.start < col_part.stop:
                    np.dot(row_weight[row_part], layer.free, out=back[col_part])
        moving = np.where(sums > 0, 1.0 - rows.fixed_row_sum / sums, 0.0)
    return _point(workspace, np.zeros(n), load, sums, col_factor, row_weight, back, moving, True)


def _point(workspace, log_scales, load, sums, col_factor, row_weight, back, moving, exact):
    """The Point of the plain-factor path from its concatenated per-row and per-column parts."""
    rows, n = workspace.rows, workspace.objective.n_groups
    col_out = back * col_factor
    states = tuple(
        LayerState(
            load[row_part],
            sums[row_part],
            col_factor[col_part],
            row_weight[row_part],
            col_factor[col_part],
            col_out[col_part],
            moving[row_part],
        )
        for row_part, col_part in zip(rows.row_slices, rows.col_slices, strict=True)
    )
    return Point(
        np.array(log_scales, dtype=np.float64),
        float(load.sum()),
        rows.incoming(load)[:n],
        rows.outgoing(col_out),
        states,
        exact,
        (load, moving, col_out),
    )


def _evaluate_direct(
    workspace: Workspace, log_scales: np.ndarray, scaled: np.ndarray, fast: bool
) -> Point:
    """evaluate() with plain factors, on the rows and columns of all layers at once (the
    concatenation of Workspace.rows): per layer only its two products remain."""
    objective = workspace.objective
    rows, r, n = workspace.rows, objective.r, objective.n_groups
    objective.passes += 2
    factor = np.empty(n + 1)  # exp(p u) per group, 1 for FIXED (index -1)
    np.exp(scaled, out=factor[:-1])
    factor[-1] = 1.0
    inverse = 1.0 / factor
    col_factor = inverse[rows.col_groups]
    row_factor = factor[rows.row_groups]
    sums = rows.fixed_row_sum.copy()
    singles = [structure.free32 if fast else None for structure in workspace.structures]
    exact = not any(single is not None for single in singles)
    if exact and r == 1.0:
        # rho^(r-1) = 1: both products are known up front, so each block of rows is read
        # from memory once for both
        back = np.zeros(col_factor.size)
        for layer, row_part, col_part in zip(
            objective.layers, rows.row_slices, rows.col_slices, strict=True
        ):
            if col_part.start < col_part.stop:
                _both_products(
                    layer.free,
                    col_factor[col_part],
                    row_factor[row_part],
                    sums[row_part],
                    back[col_part],
                )
        with np.errstate(divide="ignore", invalid="ignore"):
            moving = np.where(sums > 0, 1.0 - rows.fixed_row_sum / sums, 0.0)
        load = sums * row_factor
        return _point(workspace, log_scales, load, sums, col_factor, row_factor, back, moving, True)
    x32 = None if exact else col_factor.astype(np.float32)
    sums32 = None if exact else np.zeros(sums.size, dtype=np.float32)
    for layer, single, row_part, col_part in zip(
        objective.layers, singles, rows.row_slices, rows.col_slices, strict=True
    ):
        if col_part.start == col_part.stop:
            continue
        if single is not None:
            np.dot(single, x32[col_part], out=sums32[row_part])
        else:
            sums[row_part] += layer.free @ col_factor[col_part]
    if sums32 is not None:
        sums += sums32
    rho = sums * row_factor
    with np.errstate(divide="ignore", invalid="ignore"):
        if r == 1.0:
            load, row_weight = rho, row_factor
        else:
            load = rho**r
            # rho^(r-1) without a second power; rho = 0 rows carry nothing back
            row_weight = np.where(rho > 0, load / rho, 0.0) * row_factor
        moving = np.where(sums > 0, 1.0 - rows.fixed_row_sum / sums, 0.0)
    back = np.empty(col_factor.size)
    y32 = back32 = None
    if not exact and (r == 1.0 or row_weight.max(initial=0.0) < SINGLE_FACTORS):
        y32 = row_weight.astype(np.float32)
        back32 = np.zeros(col_factor.size, dtype=np.float32)
    for layer, single, row_part, col_part in zip(
        objective.layers, singles, rows.row_slices, rows.col_slices, strict=True
    ):
        if col_part.start == col_part.stop:
            continue
        if single is not None and y32 is not None:
            np.dot(y32[row_part], single, out=back32[col_part])
        else:
            np.dot(row_weight[row_part], layer.free, out=back[col_part])
    if back32 is not None:
        # float32 layers' columns from back32, the others (float64) already in back
        used = np.zeros(col_factor.size, dtype=bool)
        for single, col_part in zip(singles, rows.col_slices, strict=True):
            used[col_part] = single is not None
        back = np.where(used, back32, back) if not used.all() else back32.astype(np.float64)
    return _point(workspace, log_scales, load, sums, col_factor, row_weight, back, moving, exact)


_BLOCK_BYTES = 1 << 19  # rows of float64 couplings per block (half a typical L2 cache)


def _both_products(
    matrix: np.ndarray, x: np.ndarray, y: np.ndarray, rows_out: np.ndarray, cols_out: np.ndarray
) -> None:
    """rows_out += matrix @ x and cols_out += y @ matrix, block of rows by block of rows."""
    step = max(1, _BLOCK_BYTES // (8 * max(matrix.shape[1], 1)))
    for start in range(0, matrix.shape[0], step):
        block = matrix[start : start + step]
        rows_out[start : start + step] += block @ x
        cols_out += y[start : start + step] @ block


def _evaluate_shifted(workspace: Workspace, log_scales: np.ndarray) -> Point:
    """evaluate() for any magnitudes: the vectors are shifted by one largest log-entry per layer.

    If that leaves a row or column
    sum below objective.py's underflow threshold (a row far below the rest of its layer), F and
    the loads are taken from :meth:`Objective.loads` instead (two more passes, counted), which
    redoes such rows exactly; the layer states then only steer the Hessian.
    """
    objective = workspace.objective
    p, r, n = objective.p, objective.r, objective.n_groups
    objective.passes += 2
    suspect = False
    value = 0.0
    incoming = np.zeros(n)
    outgoing = np.zeros(n)
    states = []
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        for layer, structure in zip(objective.layers, workspace.structures, strict=True):
            row_log = p * _group_values(log_scales, structure.row_index, structure.row_movable)
            col_log = -p * log_scales[layer.col_groups]
            top = max(float(col_log.max()) if col_log.size else 0.0, 0.0)
            col_factor = np.exp(col_log - top)
            fixed = layer.fixed_row_sum * np.exp(-top)
            sums = fixed + layer.free @ col_factor if col_log.size else fixed
            moving = np.where(sums > 0, 1.0 - fixed / sums, 0.0)
            log_rho = row_log + top + np.log(sums)  # -inf for rows with only zero couplings
            suspect = suspect or bool(np.any((sums < _TINY) & ~layer.empty_rows))
            load = np.exp(r * log_rho)
            value += float(load.sum())
            incoming += _accumulate(load, layer.row_groups, n)
            live = np.isfinite(log_rho)
            log_weight = np.where(live, (r - 1.0) * log_rho + row_log, -np.inf)
            top2 = float(log_weight.max()) if log_weight.size else -np.inf
            if col_log.size and np.isfinite(top2):
                row_weight = np.exp(log_weight - top2)
                col_scale = np.exp(col_log + top2)
                back = layer.free.T @ row_weight
                suspect = suspect or bool(np.any((back < _TINY) & ~layer.zero_cols))
                col_out = np.where(back > 0, np.exp(col_log + top2 + np.log(back)), 0.0)
                outgoing += np.bincount(layer.col_groups, weights=col_out, minlength=n)
            else:
                row_weight = np.zeros_like(load)
                col_scale = np.zeros_like(col_log)
                col_out = np.zeros_like(col_log)
            states.append(
                LayerState(load, sums, col_factor, row_weight, col_scale, col_out, moving)
            )
    if suspect:
        with np.errstate(over="ignore"):  # an overflowing trial point is rejected, not an error
            exact = objective.loads(log_scales)
        value, incoming, outgoing = exact.value, exact.incoming, exact.outgoing
    return Point(np.array(log_scales, dtype=np.float64), value, incoming, outgoing, tuple(states))


def _fractions(
    structure: _LayerStructure, free: np.ndarray, state: LayerState, block: np.ndarray, use32: bool
) -> np.ndarray:
    """(t @ block)_o / rho_o for a block of column vectors (one pass per column of the block)."""
    if use32:
        product = structure.free32 @ (state.col_factor[:, None] * block).astype(np.float32)
        product = product.astype(np.float64)
    else:
        product = free @ (state.col_factor[:, None] * block)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(state.sums[:, None] > 0, product / state.sums[:, None], 0.0)


def _coarse_terms(
    load: np.ndarray, fractions: np.ndarray, onehot: np.ndarray, p: float, r: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """sum_o rho_o^r with its gradient and Hessian in one layer's local coarse coordinates.

    ``fractions`` holds T_ob (see the module docstring); grad rho_o / rho_o = p (onehot_o - T_o).
    """
    direction = p * (onehot - fractions)
    gradient = r * (load @ direction)
    hessian = r * (r - 1.0) * (direction.T @ (load[:, None] * direction))
    cross = onehot.T @ (load[:, None] * fractions)
    hessian += r * p * p * (onehot.T @ (load[:, None] * onehot) - cross - cross.T)
    hessian += r * p * p * np.diag(load @ fractions)
    return float(load.sum()), gradient, hessian


def _shifted(
    load: np.ndarray, fractions: np.ndarray, onehot: np.ndarray, z: np.ndarray, p: float, r: float
) -> tuple[np.ndarray, np.ndarray]:
    """Loads and fractions after u += P z (exact, no pass over c)."""
    col_log = -p * z
    top = max(float(col_log.max()), 0.0)
    moved = fractions * np.exp(col_log - top)[None, :]
    rest = np.maximum(1.0 - fractions.sum(axis=1), 0.0) * np.exp(-top)  # fixed/pinned columns
    total = rest + moved.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        factor = np.exp(r * (p * (onehot @ z) + top + np.log(total)))
        new_load = np.where(load > 0, load * factor, 0.0)
        new_fractions = np.where(total[:, None] > 0, moved / total[:, None], 0.0)
    return new_load, new_fractions


class Curvature:
    """Hessian of F at one point, restricted to the movable groups, and its preconditioner."""

    def __init__(self, workspace: Workspace, point: Point) -> None:
        self.workspace = workspace
        self.point = point
        objective = workspace.objective
        p, r = objective.p, objective.r
        self._prepared: tuple[list[bool], list[tuple]] | None = None
        diagonal = p * p * r * (r * point.incoming + point.outgoing)
        self.diagonal = np.where(workspace.movable & (diagonal > 0), diagonal, 1.0)
        self.fractions: list[np.ndarray] | None = None
        self.coarse_shift: np.ndarray | None = None  # z of the last simple coarse solve
        self._coarse_factor: np.ndarray | None = None

    def _products(self) -> tuple[list[bool], list[tuple]]:
        """Per layer: whether its products may run in float32, and (matrix, column factor,
        1 / sums, scale) for them; prepared on first use (only CG and build_coarse need it)."""
        if self._prepared is not None:
            return self._prepared
        use = []
        products = []
        for layer, structure, state in zip(
            self.workspace.objective.layers,
            self.workspace.structures,
            self.point.layers,
            strict=True,
        ):
            use32 = bool(
                structure.free32 is not None
                and state.col_factor.size
                and state.col_factor.min() > 1.0 / SINGLE_FACTORS
                and state.row_weight.min(initial=1.0) > 1.0 / SINGLE_FACTORS
                and state.col_factor.max() < SINGLE_FACTORS
                and state.row_weight.max(initial=0.0) < SINGLE_FACTORS
            )
            use.append(use32)
            with np.errstate(divide="ignore"):
                inverse = np.where(state.sums > 0, 1.0 / state.sums, 0.0)
            if use32:
                factor = state.col_factor.astype(np.float32)
                products.append((structure.free32, factor, inverse, 1.0))
            else:
                products.append((layer.free, state.col_factor, inverse, 1.0))
        self._prepared = (use, products)
        return self._prepared

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """H v (two passes); entries of groups that cannot move are held at zero."""
        workspace = self.workspace
        objective = workspace.objective
        p, r, n = objective.p, objective.r, objective.n_groups
        v = np.where(workspace.movable, v, 0.0)
        result = np.zeros(n)
        objective.passes += 2
        size = float(np.max(np.abs(v), initial=0.0))
        if not size > 0:
            return result
        v = v / size  # H is linear; a unit-size v keeps every float32 intermediate in range
        for layer, structure, state, (matrix, col_factor, inverse, scale) in zip(
            objective.layers,
            workspace.structures,
            self.point.layers,
            self._products()[1],
            strict=True,
        ):
            v_rows = _group_values(v, structure.row_index, structure.row_movable)
            if not layer.col_groups.size:  # rows fed by fixed units only
                result += _accumulate(p * p * r * r * state.load * v_rows, layer.row_groups, n)
                continue
            v_cols = v[layer.col_groups]
            d = p * (v_rows - inverse * (matrix @ (col_factor * v_cols.astype(matrix.dtype))))
            result += _accumulate(p * r * r * state.load * d, layer.row_groups, n)
            y = state.row_weight * (p * r * (r - 1.0) * d + r * p * p * v_rows)
            back = scale * (matrix.T @ y.astype(matrix.dtype)).astype(np.float64)
            column = r * p * p * v_cols * state.col_out - state.col_scale * back
            result += np.bincount(layer.col_groups, weights=column, minlength=n)
        return np.where(workspace.movable, result * size, 0.0)

    def build_coarse(self) -> None:
        """P^T H P for the layer aggregates, Cholesky-factored (see the module docstring)."""
        workspace = self.workspace
        if workspace.n_coarse == 0:
            return
        objective = workspace.objective
        p, r = objective.p, objective.r
        structures, block_passes = workspace.coarse_structures()
        objective.passes += block_passes
        self.fractions = []
        coarse = np.zeros((workspace.n_coarse, workspace.n_coarse))
        for layer, plain, structure, state, use32 in zip(
            objective.layers,
            workspace.structures,
            structures,
            self.point.layers,
            self._products()[0],
            strict=True,
        ):
            fractions = np.zeros((state.load.size, structure.local.size))
            if structure.col_indicator.shape[1]:
                fractions[:, structure.col_local] = _fractions(
                    plain, layer.free, state, structure.col_indicator, use32
                )
            self.fractions.append(fractions)
            if structure.local.size:
                _, _, hessian = _coarse_terms(state.load, fractions, structure.row_onehot, p, r)
                coarse[np.ix_(structure.local, structure.local)] += hessian
        try:
            self._coarse_factor = np.linalg.cholesky(coarse)
        except np.linalg.LinAlgError:
            self._coarse_factor = None  # keep the Jacobi part alone

    def model(self) -> lowrank.Model | None:
        """The diagonal plus per-layer rank-one model of H (lowrank.py), None if it is not
        positive definite (no pass)."""
        workspace = self.workspace
        objective = workspace.objective
        rows = workspace.rows
        layers = self.point.layers
        if self.point.rows is not None:
            load, moving, col_out = self.point.rows
        else:
            load = np.concatenate([state.load for state in layers] + [[]])
            moving = np.concatenate([state.moving for state in layers] + [[]])
            col_out = np.concatenate([state.col_out for state in layers] + [[]])
        alpha = load * moving
        totals = rows.col_layers(col_out)[workspace.model_layers]
        gammas = rows.row_layers(alpha * moving)[workspace.model_layers]
        return lowrank.build(
            workspace.layout,
            self.diagonal,
            workspace.movable,
            alpha,
            col_out,
            totals,
            gammas,
            objective.p,
            objective.r,
        )

    def precondition(self, residual: np.ndarray) -> np.ndarray:
        movable = self.workspace.movable
        z = np.where(movable, residual / self.diagonal, 0.0)
        if self._coarse_factor is not None:
            aggregate = self.workspace.aggregate
            live = aggregate >= 0
            restricted = np.bincount(
                aggregate[live], weights=residual[live], minlength=self.workspace.n_coarse
            )
            lower = self._coarse_factor
            solved = np.linalg.solve(lower.T, np.linalg.solve(lower, restricted))
            z[live] += solved[aggregate[live]]
        return z

    def coarse_minimiser(self, max_iter: int = 200, rtol: float = COARSE_RTOL) -> np.ndarray:
        """P z with z minimising F(u + P z) (damped Newton on the coarse space, no passes).

        Zero if the coarse space is empty. When every layer's movable columns lie in one
        aggregate, T_o is the row's movable share (known from the point) and the whole coarse
        objective is one vectorised sum over the rows (:meth:`_simple_terms`); otherwise the
        block products of :meth:`build_coarse` give T.
        """
        workspace = self.workspace
        if workspace.n_coarse == 0:
            return np.zeros(workspace.objective.n_groups)
        if workspace.simple is not None:
            z = _damped_newton(self._simple_terms(), workspace.n_coarse, max_iter, rtol)
            self.coarse_shift = z
            return self._prolong(z)
        if self.fractions is None:
            self.build_coarse()
        assert self.fractions is not None
        p, r = workspace.objective.p, workspace.objective.r
        layers = [
            (state.load, fractions, structure)
            for state, fractions, structure in zip(
                self.point.layers, self.fractions, workspace.coarse_structures()[0], strict=True
            )
        ]

        def terms(z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
            value = 0.0
            gradient = np.zeros(workspace.n_coarse)
            hessian = np.zeros((workspace.n_coarse, workspace.n_coarse))
            for load, fractions, structure in layers:
                if not structure.local.size:
                    value += float(load.sum())
                    continue
                moved = _shifted(load, fractions, structure.row_onehot, z[structure.local], p, r)
                v, g, h = _coarse_terms(moved[0], moved[1], structure.row_onehot, p, r)
                value += v
                gradient[structure.local] += g
                hessian[np.ix_(structure.local, structure.local)] += h
            return value, gradient, hessian

        return self._prolong(_damped_newton(terms, workspace.n_coarse, max_iter, rtol))

    def shifted_point(self) -> Point | None:
        """The point u + P z of the last coarse solve, without a pass: for r = 1 and layers
        whose rows share one aggregate (a) and whose movable columns share one (b), every
        row sum scales as rho_o (1 - T_o + T_o e^(-p z_b)) e^(p z_a) and every outgoing load as
        out_i e^(p (z_a - z_b)). None where that does not hold."""
        workspace = self.workspace
        objective = workspace.objective
        z = self.coarse_shift
        if z is None or objective.r != 1.0 or workspace.uniform is None:
            return None
        p, n = objective.p, objective.n_groups
        padded = np.append(z, 0.0)
        value = 0.0
        incoming = np.zeros(n)
        outgoing = np.zeros(n)
        states = []
        for layer, state, (a, b) in zip(
            objective.layers, self.point.layers, workspace.uniform, strict=True
        ):
            rise, fall = float(np.exp(p * padded[a])), float(np.exp(-p * padded[b]))
            kept = 1.0 - state.moving + state.moving * fall
            load = state.load * (rise * kept)
            with np.errstate(divide="ignore", invalid="ignore"):
                moving = np.where(kept > 0, state.moving * fall / kept, 0.0)
            col_out = state.col_out * (rise * fall)
            value += float(load.sum())
            layer.rows.scatter(incoming, load)
            layer.cols.scatter(outgoing, col_out)
            states.append(
                LayerState(
                    load,
                    state.sums * kept,
                    state.col_factor * fall,
                    state.row_weight * rise,
                    state.col_scale * fall,
                    col_out,
                    moving,
                )
            )
        if not np.isfinite(value):
            return None
        shifted = self.point.log_scales + self._prolong(z)
        return Point(shifted, value, incoming, outgoing, tuple(states), self.point.exact)

    def _prolong(self, z: np.ndarray) -> np.ndarray:
        workspace = self.workspace
        shift = np.zeros(workspace.objective.n_groups)
        live = workspace.aggregate >= 0
        shift[live] = z[workspace.aggregate[live]]
        return shift

    def _simple_terms(self):
        """F(u + P z) with gradient and Hessian in z, vectorised over every row of every layer:
        phi_o = rho_o^r exp(r p z_a) s_o^r, s_o = 1 - T_o + T_o exp(-p z_b), where a is the
        row's aggregate and b that of its layer's columns (index m: not movable, z = 0)."""
        workspace = self.workspace
        p, r = workspace.objective.p, workspace.objective.r
        m = workspace.n_coarse
        rows, cols = workspace.simple
        load = np.concatenate([state.load for state in self.point.layers])
        share = np.concatenate([state.moving for state in self.point.layers])
        if r == 1.0:
            # phi_o = rho_o (1 - T_o) e^(p z_a) + rho_o T_o e^(p (z_a - z_b)): only the sums of
            # both coefficients over the rows of one (a, b) pair matter.
            pair, inverse = np.unique(rows * (m + 1) + cols, return_inverse=True)
            rows, cols = pair // (m + 1), pair % (m + 1)
            share_load = load * share
            staying = np.bincount(inverse, load - share_load, pair.size)
            load = np.bincount(inverse, load, pair.size)
            share = np.where(load > 0, 1.0 - staying / np.where(load > 0, load, 1.0), 0.0)
        pairs = {
            "aa": rows * (m + 1) + rows,
            "ab": rows * (m + 1) + cols,
            "ba": cols * (m + 1) + rows,
            "bb": cols * (m + 1) + cols,
        }

        def terms(z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
            padded = np.append(z, 0.0)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                fall = share * np.exp(-p * padded[cols])
                moved = np.maximum(1.0 - share + fall, 0.0)
                phi = load * np.exp(r * p * padded[rows]) * moved**r
                phi = np.where(load > 0, phi, 0.0)
                w = np.where(moved > 0, fall / moved, 0.0)
            value = float(phi.sum())
            pw = phi * w
            size = m + 1
            gradient = r * p * (np.bincount(rows, phi, size) - np.bincount(cols, pw, size))
            k = r * r * p * p
            hessian = (
                np.bincount(pairs["aa"], k * phi, size * size)
                - np.bincount(pairs["ab"], k * pw, size * size)
                - np.bincount(pairs["ba"], k * pw, size * size)
                + np.bincount(pairs["bb"], k * pw * w + r * p * p * pw * (1.0 - w), size * size)
            ).reshape(size, size)
            return value, gradient[:m], hessian[:m, :m]

        return terms


def _damped_newton(terms, size: int, max_iter: int, rtol: float) -> np.ndarray:
    """Minimise a smooth convex function given as terms(z) -> (value, gradient, Hessian) from
    z = 0 by Newton steps with Armijo backtracking; stop when a step would gain less than
    ``rtol`` of the value."""
    z = np.zeros(size)
    value, gradient, hessian = terms(z)
    for _ in range(max_iter):
        try:
            step = -np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            break
        slope = float(gradient @ step)
        if not (np.isfinite(slope) and slope < -rtol * value):
            break
        length = 1.0
        for _ in range(60):
            trial = terms(z + length * step)
            if trial[0] <= value + 1e-4 * length * slope:
                break
            length *= 0.5
        else:
            break
        z = z + length * step
        value, gradient, hessian = trial
    return z
