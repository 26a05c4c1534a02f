"""F and the loads at one point u, keeping what the Hessian needs (the layer states).

Two numeric paths, as in objective.py: while every coupling times every factor exp(+-p u)
stays within exp(+-600), plain factors and the rows and columns of all layers at once
(evaluate, start); beyond that, vectors shifted by one largest log-entry per layer, with rows
lost to underflow redone exactly. With ``fast``, layers that have a float32 copy
(couplings.py) multiply with it: such points carry about 1e-7 relative error in every load and
only steer the Newton solver; they never certify a step or the stopping test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from .couplings import SINGLE_FACTORS
from .objective import _DIRECT_LIMIT, _TINY, _accumulate
from .products import both_times, times, transposed_times
from .workspace import Workspace, _group_values

FAST_LIMIT = 30.0  # largest |p u| for which evaluate(fast=True) uses the float32 copies
# (exp(30) < SINGLE_FACTORS: the products stay normal float32 numbers)


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


class Parts(NamedTuple):
    """The LayerState arrays of all layers concatenated (plain-factor points, col_scale equal
    to col_factor)."""

    load: np.ndarray
    sums: np.ndarray
    col_factor: np.ndarray
    row_weight: np.ndarray
    col_out: np.ndarray
    moving: np.ndarray


@dataclass(frozen=True)
class Point:
    """F, its loads and the layer states at one point u (two passes to compute)."""

    log_scales: np.ndarray
    value: float
    incoming: np.ndarray
    outgoing: np.ndarray
    states: tuple[LayerState, ...] | None  # None: cut from ``rows`` when first read
    exact: bool = True  # False: some products ran on the float32 copies (evaluate(fast=True))
    rows: Parts | None = None  # the layer states concatenated (plain factors only)
    slices: tuple[tuple[slice, ...], tuple[slice, ...]] | None = None  # each layer's part

    def gradient(self, q: float) -> np.ndarray:
        return q * (self.incoming - self.outgoing)

    @cached_property
    def layers(self) -> tuple[LayerState, ...]:
        """Per layer its LayerState (the solver mostly reads ``rows``: no per-layer views)."""
        if self.states is not None:
            return self.states
        load, sums, col_factor, row_weight, col_out, moving = self.rows
        return tuple(
            LayerState(
                load[row_part],
                sums[row_part],
                col_factor[col_part],
                row_weight[row_part],
                col_factor[col_part],
                col_out[col_part],
                moving[row_part],
            )
            for row_part, col_part in zip(*self.slices, strict=True)
        )

    @cached_property
    def log_ratio(self) -> np.ndarray:
        """log(out_g / in_g) per group: Algorithm 1's step direction and stopping measure
        (not finite where a load is zero)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            ratio = np.log(self.outgoing / self.incoming)
            if not np.all(np.isfinite(ratio)):  # the quotient may overflow where the logs do not
                ratio = np.log(self.outgoing) - np.log(self.incoming)
        return ratio


def evaluate(workspace: Workspace, log_scales: np.ndarray, fast: bool = False) -> Point:
    """F(u), in_g and out_g like :meth:`Objective.loads` (two passes), keeping the layer states.

    While every coupling times every factor exp(+-p u) stays within exp(+-600) (the condition of
    :meth:`Objective.loads`), the products take the plain factors exp(-p u_i) and
    rho_o^(r-1) exp(p u_o); with ``fast`` and factors within exp(+-FAST_LIMIT), layers that
    have a float32 copy (couplings.py) multiply with it: about 1e-7 relative error in every
    load, so such a point (``exact=False``) only steers, it never certifies.

    Where a load overflows, the plain products may overflow on the way to loads that do not
    (rho^r is infinite, rho^(r-1) or c rho^(r-1) e^(p u_o) e^(-p u_i) is not): such a float64
    point is evaluated again in the log domain, so that its loads are exact too.
    """
    objective = workspace.objective
    scaled = objective.p * np.asarray(log_scales, dtype=np.float64)
    largest = float(max(scaled.max(), -scaled.min())) if scaled.size else 0.0
    if objective._log_range + 2.0 * largest < _DIRECT_LIMIT:
        point = _evaluate_direct(workspace, log_scales, scaled, fast and largest <= FAST_LIMIT)
        if not point.exact or (np.isfinite(point.value) and np.isfinite(point.outgoing).all()):
            return point
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
                    transposed_times(layer.free, row_weight[row_part], out=back[col_part])
        moving = np.where(sums > 0, 1.0 - rows.fixed_row_sum / sums, 0.0)
    parts = Parts(load, sums, col_factor, row_weight, back * col_factor, moving)
    return _point(workspace, np.zeros(n), parts, True)


def _point(workspace, log_scales, parts: Parts, exact: bool) -> Point:
    """The Point of the plain-factor path from its concatenated per-row and per-column parts
    (col_scale = col_factor: no shift)."""
    rows, n = workspace.rows, workspace.objective.n_groups
    return Point(
        np.array(log_scales, dtype=np.float64),
        float(parts.load.sum()),
        rows.incoming(parts.load)[:n],
        rows.outgoing(parts.col_out),
        None,
        exact,
        parts,
        (rows.row_slices, rows.col_slices),
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
    singles = [layer.single if fast else None for layer in objective.layers]
    exact = not any(single is not None for single in singles)
    small = rows.small
    x32 = None if exact else col_factor.astype(np.float32)
    sums += small.products(col_factor, sums.size)
    if r == 1.0:
        # rho^(r-1) = 1: both products are known up front, so each block of rows is read
        # from memory once for both (from the float32 copy where there is one: fast)
        back = small.back(row_factor, col_factor.size)
        y32 = None if exact else row_factor.astype(np.float32)
        for index in small.large:
            row_part, col_part = rows.row_slices[index], rows.col_slices[index]
            single = singles[index]
            matrix, x, y = objective.layers[index].free, col_factor, row_factor
            if single is not None:
                matrix, x, y = single, x32, y32
            both_times(matrix, x[col_part], y[row_part], sums[row_part], back[col_part])
        with np.errstate(divide="ignore", invalid="ignore"):
            moving = np.where(sums > 0, 1.0 - rows.fixed_row_sum / sums, 0.0)
        load = sums * row_factor
        parts = Parts(load, sums, col_factor, row_factor, back * col_factor, moving)
        return _point(workspace, log_scales, parts, exact)
    sums32 = None if exact else np.zeros(sums.size, dtype=np.float32)
    for index in small.large:
        layer, single = objective.layers[index], singles[index]
        row_part, col_part = rows.row_slices[index], rows.col_slices[index]
        if single is not None:
            times(single, x32[col_part], out=sums32[row_part])
        else:
            sums[row_part] += times(layer.free, col_factor[col_part])
    if sums32 is not None:
        sums += sums32
    rho = sums * row_factor
    # a trial point far out may overflow: its F is then infinite and the step is refused
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        load = rho**r
        # rho^(r-1) without a second power; rho = 0 rows carry nothing back
        row_weight = np.where(rho > 0, load / rho, 0.0) * row_factor
        moving = np.where(sums > 0, 1.0 - rows.fixed_row_sum / sums, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        back = small.back(row_weight, col_factor.size)
    y32 = back32 = None
    if not exact and row_weight.max(initial=0.0) < SINGLE_FACTORS:
        y32 = row_weight.astype(np.float32)
        back32 = np.zeros(col_factor.size, dtype=np.float32)
    for index in small.large:
        layer, single = objective.layers[index], singles[index]
        row_part, col_part = rows.row_slices[index], rows.col_slices[index]
        if single is not None and y32 is not None:
            transposed_times(single, y32[row_part], out=back32[col_part])
        else:
            transposed_times(layer.free, row_weight[row_part], out=back[col_part])
    if back32 is not None:  # each column's product is in back32 or in back, 0 in the other
        back += back32
    with np.errstate(over="ignore"):  # an outgoing load may overflow where F does
        col_out = back * col_factor
    parts = Parts(load, sums, col_factor, row_weight, col_out, moving)
    return _point(workspace, log_scales, parts, exact)


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
            sums = fixed + times(layer.free, col_factor) if col_log.size else fixed
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
                back = transposed_times(layer.free, row_weight)
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
