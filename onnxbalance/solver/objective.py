"""The convex objective every solver minimises, and the loads that drive Algorithm 1.

With log-scales u (u = 0 for fixed units), r = q / p and the coupling matrices c of a unit graph,

    rho_o  = exp(p u_o) * sum_i c[o, i] exp(-p u_i)          (one row o of one layer)
    F(u)   = sum_o rho_o^r                                     = ||W||_{p,q}^q
    in_g   = sum of rho_o^r over the rows o of group g
    out_g  = sum over the columns i of group g of exp(-p u_i) * sum_o c[o, i] rho_o^(r-1) exp(p u_o)

and dF/du_g = q (in_g - out_g) (ALGORITHM.md §3, §6). One evaluation costs two passes over every
coupling matrix: c @ x for rho and c.T @ y for the outgoing loads.

Columns whose group is fixed have scale 1, so they are summed once into a per-row constant and
never enter the matrix-vector products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..unitgraph import FIXED, UnitGraph


@dataclass(frozen=True)
class Loads:
    """F(u) and the per-group incoming and outgoing loads at one point."""

    value: float
    incoming: np.ndarray
    outgoing: np.ndarray

    def gradient(self, q: float) -> np.ndarray:
        return q * (self.incoming - self.outgoing)


@dataclass(frozen=True)
class _PreparedLayer:
    free: np.ndarray  # coupling restricted to columns of movable groups, C-contiguous float64
    fixed_row_sum: np.ndarray  # per row: sum of the coupling over fixed columns
    row_groups: np.ndarray
    col_groups: np.ndarray  # groups of the columns of ``free``


def _prepare(graph: UnitGraph) -> tuple[_PreparedLayer, ...]:
    prepared = []
    for layer in graph.layers:
        coupling = np.asarray(layer.coupling, dtype=np.float64)
        if not np.all(np.isfinite(coupling)):
            raise ValueError(f"layer {layer.name!r} has NaN or infinite weights")
        col_groups = np.asarray(layer.col_groups, dtype=np.int64)
        movable = col_groups != FIXED
        prepared.append(
            _PreparedLayer(
                free=np.ascontiguousarray(coupling[:, movable]),
                fixed_row_sum=coupling[:, ~movable].sum(axis=1),
                row_groups=np.asarray(layer.row_groups, dtype=np.int64),
                col_groups=col_groups[movable],
            )
        )
    return tuple(prepared)


def _scales_of(log_scales: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """u of each unit: the group's log-scale, or 0 for fixed units."""
    return np.where(groups == FIXED, 0.0, log_scales[np.maximum(groups, 0)])


def _accumulate(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    movable = groups != FIXED
    return np.bincount(groups[movable], weights=values[movable], minlength=n_groups)


def _safe_power(base: np.ndarray, exponent: float) -> np.ndarray:
    """base**exponent with 0**negative taken as 0: such a row has only zero couplings."""
    with np.errstate(divide="ignore"):
        powered = np.power(base, exponent)
    return np.where(base > 0, powered, 0.0)


class Objective:
    """F(u) and its loads on one unit graph, for one (p, q); counts passes over the couplings."""

    def __init__(self, graph: UnitGraph, p: float, q: float) -> None:
        if not (p > 0 and q > 0 and np.isfinite(p) and np.isfinite(q)):
            raise ValueError(f"p and q must be positive and finite, got p={p}, q={q}")
        self.p = float(p)
        self.q = float(q)
        self.r = self.q / self.p
        self.n_groups = graph.n_groups
        self.layers = _prepare(graph)
        self.passes = 0

    def row_sums(self, log_scales: np.ndarray) -> list[np.ndarray]:
        """rho_o of every row of every layer (one pass)."""
        self.passes += 1
        p = self.p
        sums = []
        for layer in self.layers:
            row_factor = np.exp(p * _scales_of(log_scales, layer.row_groups))
            col_factor = np.exp(-p * _scales_of(log_scales, layer.col_groups))
            sums.append(row_factor * (layer.free @ col_factor + layer.fixed_row_sum))
        return sums

    def value(self, log_scales: np.ndarray) -> float:
        """F(u) = ||W||_{p,q}^q after rescaling by exp(u) (one pass)."""
        return float(sum(np.sum(_safe_power(rho, self.r)) for rho in self.row_sums(log_scales)))

    def loads(self, log_scales: np.ndarray) -> Loads:
        """F(u), in_g and out_g at ``log_scales`` (two passes)."""
        p, r = self.p, self.r
        rows = self.row_sums(log_scales)
        self.passes += 1
        value = 0.0
        incoming = np.zeros(self.n_groups)
        outgoing = np.zeros(self.n_groups)
        for layer, rho in zip(self.layers, rows):
            row_load = _safe_power(rho, r)
            value += float(row_load.sum())
            incoming += _accumulate(row_load, layer.row_groups, self.n_groups)
            if layer.col_groups.size:
                row_factor = np.exp(p * _scales_of(log_scales, layer.row_groups))
                col_factor = np.exp(-p * _scales_of(log_scales, layer.col_groups))
                weighted = _safe_power(rho, r - 1.0) * row_factor
                outgoing += _accumulate(
                    col_factor * (layer.free.T @ weighted), layer.col_groups, self.n_groups
                )
        return Loads(value, incoming, outgoing)

    def norm(self, value: float) -> float:
        """||W||_{p,q} from F = ||W||^q, without overflowing for small q."""
        return float(np.exp(np.log(value) / self.q)) if value > 0 else 0.0
