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

from functools import cached_property

import numpy as np

from . import lowrank
from .couplings import SINGLE_FACTORS
from .objective import _accumulate
from .points import LayerState, Parts, Point, _point, evaluate, start
from .products import times, transposed_times
from .sparse import Coordinates, Factor
from .workspace import Workspace, _group_values, _LayerStructure, aggregates

__all__ = ["Curvature", "LayerState", "Point", "Workspace", "aggregates", "evaluate", "start"]

COARSE_RTOL = 1e-9  # the coarse solve stops when its Newton step would gain less (relative)


def _fractions(
    structure: _LayerStructure, free: np.ndarray, state: LayerState, block: np.ndarray, use32: bool
) -> np.ndarray:
    """(t @ block)_o / rho_o for a block of column vectors (one pass per column of the block)."""
    if use32:
        factors = (state.col_factor[:, None] * block).astype(np.float32)
        product = times(structure.free32, factors).astype(np.float64)
    else:
        product = times(free, state.col_factor[:, None] * block)
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
        self._prepared: tuple[list[bool], list[tuple]] | None = None
        self.fractions: list[np.ndarray] | None = None
        self.coarse_shift: np.ndarray | None = None  # z of the last simple coarse solve
        self._coarse_factor: Factor | None = None

    @cached_property
    def _jacobi(self) -> tuple[np.ndarray, np.ndarray]:
        """Jacobi's diagonal p^2 r (r in_g + out_g), 1 where it is zero or the group cannot
        move, and its inverse, 0 there. Built on first use: a step that reuses an earlier
        Hessian model needs neither."""
        p, r = self.workspace.objective.p, self.workspace.objective.r
        diagonal = p * p * r * (r * self.point.incoming + self.point.outgoing)
        usable = self.workspace.movable & (diagonal > 0)
        diagonal = np.where(usable, diagonal, 1.0)
        return diagonal, np.where(usable, 1.0 / diagonal, 0.0)

    @property
    def diagonal(self) -> np.ndarray:
        return self._jacobi[0]

    @property
    def inverse_diagonal(self) -> np.ndarray:
        return self._jacobi[1]

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
            # in float32 where col_factor is (the copy's products), else in float64
            x = col_factor * v_cols.astype(col_factor.dtype)
            d = p * (v_rows - inverse * times(matrix, x))
            result += _accumulate(p * r * r * state.load * d, layer.row_groups, n)
            y = state.row_weight * (p * r * (r - 1.0) * d + r * p * p * v_rows)
            back = scale * transposed_times(matrix, y.astype(col_factor.dtype)).astype(np.float64)
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
        coarse = Coordinates()
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
                coarse.add_block(structure.local, hessian)
        factored = coarse.factor(workspace.n_coarse)
        # not positive definite: keep the Jacobi part alone
        positive = factored is not None and factored.positive == workspace.n_coarse
        self._coarse_factor = factored if positive else None

    def model(self) -> lowrank.Model | None:
        """The diagonal plus per-layer rank-one model of H (lowrank.py), None if it is not
        positive definite (no pass)."""
        workspace = self.workspace
        objective = workspace.objective
        rows = workspace.rows
        if self.point.rows is not None:
            load, moving, col_out = (
                self.point.rows.load,
                self.point.rows.moving,
                self.point.rows.col_out,
            )
        else:
            layers = self.point.layers
            load = np.concatenate([state.load for state in layers] + [[]])
            moving = np.concatenate([state.moving for state in layers] + [[]])
            col_out = np.concatenate([state.col_out for state in layers] + [[]])
        alpha = load * moving
        totals = rows.col_layers(col_out)[workspace.model_layers]
        if objective.r == 1.0:  # gamma enters the model times r - 1
            gammas = np.zeros(workspace.model_layers.size)
        else:
            gammas = rows.row_layers(alpha * moving)[workspace.model_layers]
        return lowrank.build(
            workspace.layout,
            self.inverse_diagonal,
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
            z[live] += self._coarse_factor.solve(restricted)[aggregate[live]]
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

        def terms(z: np.ndarray) -> tuple[float, np.ndarray, Coordinates]:
            value = 0.0
            gradient = np.zeros(workspace.n_coarse)
            hessian = Coordinates()
            for load, fractions, structure in layers:
                if not structure.local.size:
                    value += float(load.sum())
                    continue
                moved = _shifted(load, fractions, structure.row_onehot, z[structure.local], p, r)
                v, g, h = _coarse_terms(moved[0], moved[1], structure.row_onehot, p, r)
                value += v
                gradient[structure.local] += g
                hessian.add_block(structure.local, h)
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
        shifted = self.point.log_scales + self._prolong(z)
        parts = self.point.rows
        if parts is not None:  # all layers at once
            row_agg, col_agg = workspace.simple
            rise, fall = np.exp(p * padded[row_agg]), np.exp(-p * padded[col_agg])
            kept = 1.0 - parts.moving + parts.moving * fall
            with np.errstate(divide="ignore", invalid="ignore"):
                moving = np.where(kept > 0, parts.moving * fall / kept, 0.0)
            column_rise, column_fall = workspace.uniform_columns
            col_factor = parts.col_factor * np.exp(-p * padded[column_fall])
            moved = Parts(
                parts.load * (rise * kept),
                parts.sums * kept,
                col_factor,
                parts.row_weight * rise,
                parts.col_out * np.exp(p * (padded[column_rise] - padded[column_fall])),
                moving,
            )
            point = _point(workspace, shifted, moved, self.point.exact)
            return point if np.isfinite(point.value) else None
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
        if self.point.rows is not None:
            load, share = self.point.rows.load, self.point.rows.moving
        else:
            load = np.concatenate([state.load for state in self.point.layers])
            share = np.concatenate([state.moving for state in self.point.layers])
        if r == 1.0:
            return _exponential_terms(load, share, rows, cols, m, p)
        # Hessian entries (a, a), (a, b), (b, a), (b, b) of every row, those on m dropped
        first = np.concatenate([rows, rows, cols, cols])
        second = np.concatenate([rows, cols, rows, cols])
        entries = (first < m) & (second < m)
        first, second = first[entries], second[entries]

        def terms(z: np.ndarray) -> tuple[float, np.ndarray, Coordinates]:
            padded = np.append(z, 0.0)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                fall = share * np.exp(-p * padded[cols])
                moved = np.maximum(1.0 - share + fall, 0.0)
                phi = load * np.exp(r * p * padded[rows]) * moved**r
                phi = np.where(load > 0, phi, 0.0)
                w = np.where(moved > 0, fall / moved, 0.0)
                # an overflowing trial point is rejected: its infinities may meet zeros here
                pw = phi * w
                k = r * r * p * p
                values = np.concatenate(
                    [k * phi, -k * pw, -k * pw, k * pw * w + r * p * p * pw * (1.0 - w)]
                )
            value = float(phi.sum())
            size = m + 1
            gradient = r * p * (np.bincount(rows, phi, size) - np.bincount(cols, pw, size))
            hessian = Coordinates()
            hessian.add(first, second, values[entries])
            return value, gradient[:m], hessian

        return terms


def _exponential_terms(
    load: np.ndarray, share: np.ndarray, rows: np.ndarray, cols: np.ndarray, m: int, p: float
):
    """For r = 1, F(u + P z) with gradient and Hessian in z as a sum of exponentials:
    phi_o = rho_o (1 - T_o) e^(p z_a) + rho_o T_o e^(p (z_a - z_b)), so only the sums of both
    coefficients over the rows of one (a, b) pair matter, and F(z) = sum_j w_j exp(p e_j . z)
    with e_j = 1_a - 1_b, b = m for the first kind (index m: not movable, z = 0). Each e_j has
    at most two entries: the Hessian sum_j w_j e_j e_j^T is assembled as coordinates."""
    pair, inverse = np.unique(rows * (m + 1) + cols, return_inverse=True)
    inverse = inverse.ravel()
    moving = np.bincount(inverse, load * share, pair.size)
    weights = np.concatenate([np.bincount(inverse, load, pair.size) - moving, moving])
    plus = np.concatenate([pair // (m + 1), pair // (m + 1)])
    minus = np.concatenate([np.full(pair.size, m), pair % (m + 1)])
    kept = weights > 0
    weights, plus, minus = weights[kept], plus[kept], minus[kept]
    first = np.concatenate([plus, minus, plus, minus])
    second = np.concatenate([plus, minus, minus, plus])
    signs = np.repeat([1.0, 1.0, -1.0, -1.0], weights.size)
    entries = (first < m) & (second < m) & np.tile(plus != minus, 4)  # e_j = 0 when a = b
    first, second, signs = first[entries], second[entries], signs[entries]
    size = m + 1

    def terms(z: np.ndarray) -> tuple[float, np.ndarray, Coordinates]:
        padded = np.append(z, 0.0)
        # an overflowing trial (inf terms, inf - inf in its gradient) is rejected by its value
        with np.errstate(over="ignore", invalid="ignore"):
            phi = weights * np.exp(p * (padded[plus] - padded[minus]))
            gradient = p * (np.bincount(plus, phi, size) - np.bincount(minus, phi, size))
            hessian = Coordinates()
            hessian.add(first, second, p * p * signs * np.tile(phi, 4)[entries])
        return float(phi.sum()), gradient[:m], hessian

    return terms


def _damped_newton(terms, size: int, max_iter: int, rtol: float) -> np.ndarray:
    """Minimise a smooth convex function given as terms(z) -> (value, gradient, Hessian) from
    z = 0 by Newton steps with Armijo backtracking; stop when a step would gain less than
    ``rtol`` of the value."""
    z = np.zeros(size)
    value, gradient, hessian = terms(z)
    for _ in range(max_iter):
        solved = hessian.solve(size, gradient)
        if solved is None:
            break
        step = -solved
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
