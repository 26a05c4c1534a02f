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

Scales may span hundreds of orders of magnitude (weights from 1e-30 to 1e30, p up to 4), so the
vectors fed to the products are shifted by their largest log-entry (every entry in (0, 1]) and
the shift is added back in the log domain. Every load is bounded by F itself (each term of rho_o
is at most rho_o), so once the inputs are finite nothing overflows.
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
    name: str
    free: np.ndarray  # coupling restricted to columns of movable groups, C-contiguous float64
    fixed_row_sum: np.ndarray  # per row: sum of the coupling over fixed columns
    row_groups: np.ndarray
    col_groups: np.ndarray  # groups of the columns of ``free`` (never FIXED)
    row_movable: np.ndarray  # row_groups != FIXED
    has_fixed_columns: bool


def check_graph(graph: UnitGraph) -> None:
    """Raise ValueError naming the layer if a coupling matrix is unusable (NaN, Inf, negative,
    or not matching its group arrays)."""
    for layer in graph.layers:
        coupling = np.asarray(layer.coupling)
        if coupling.ndim != 2:
            raise ValueError(f"layer {layer.name!r}: coupling matrix must be 2-D")
        if not np.all(np.isfinite(coupling)):
            raise ValueError(f"layer {layer.name!r} has NaN or infinite weights")
        if np.any(coupling < 0):
            raise ValueError(f"layer {layer.name!r}: coupling matrix has negative entries")
        rows, cols = coupling.shape
        for what, groups, size in (
            ("row", layer.row_groups, rows),
            ("column", layer.col_groups, cols),
        ):
            groups = np.asarray(groups)
            if groups.shape != (size,):
                raise ValueError(
                    f"layer {layer.name!r}: {what} groups have shape {groups.shape}, "
                    f"expected ({size},)"
                )
            if groups.size and (groups.min() < FIXED or groups.max() >= graph.n_groups):
                raise ValueError(f"layer {layer.name!r}: {what} group index out of range")


def _prepare(graph: UnitGraph) -> tuple[_PreparedLayer, ...]:
    check_graph(graph)
    prepared = []
    for layer in graph.layers:
        coupling = np.asarray(layer.coupling, dtype=np.float64)
        col_groups = np.asarray(layer.col_groups, dtype=np.int64)
        row_groups = np.asarray(layer.row_groups, dtype=np.int64)
        movable = col_groups != FIXED
        row_movable = row_groups != FIXED
        prepared.append(
            _PreparedLayer(
                name=layer.name,
                free=np.ascontiguousarray(coupling[:, movable]),
                fixed_row_sum=coupling[:, ~movable].sum(axis=1),
                row_groups=row_groups,
                col_groups=col_groups[movable],
                row_movable=row_movable,
                has_fixed_columns=bool((~movable).any()),
            )
        )
    return tuple(prepared)


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

    def _log_row_sums(self, log_scales: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer: (p u_o of each row, log rho_o); -inf where a row has only zero couplings."""
        self.passes += 1
        p = self.p
        # FIXED is -1, so indexing this with a unit's group gives 0 for fixed units.
        padded = np.append(log_scales, 0.0)
        out = []
        with np.errstate(divide="ignore"):
            for layer in self.layers:
                row_shift = p * padded[layer.row_groups]
                if layer.col_groups.size:
                    col_log = -p * log_scales[layer.col_groups]
                    top = float(col_log.max())
                    if layer.has_fixed_columns:
                        top = max(top, 0.0)
                    sums = layer.free @ np.exp(col_log - top)
                    if layer.has_fixed_columns:
                        sums += layer.fixed_row_sum * np.exp(-top)
                    log_rho = row_shift + top + np.log(sums)
                else:
                    log_rho = row_shift + np.log(layer.fixed_row_sum)
                out.append((row_shift, log_rho))
        return out

    def row_sums(self, log_scales: np.ndarray) -> list[np.ndarray]:
        """rho_o of every row of every layer (one pass)."""
        return [np.exp(log_rho) for _, log_rho in self._log_row_sums(log_scales)]

    def value(self, log_scales: np.ndarray) -> float:
        """F(u) = ||W||_{p,q}^q after rescaling by exp(u) (one pass)."""
        r = self.r
        return float(
            sum(np.exp(r * log_rho).sum() for _, log_rho in self._log_row_sums(log_scales))
        )

    def loads(self, log_scales: np.ndarray) -> Loads:
        """F(u), in_g and out_g at ``log_scales`` (two passes)."""
        p, r = self.p, self.r
        rows = self._log_row_sums(log_scales)
        self.passes += 1
        value = 0.0
        incoming = np.zeros(self.n_groups)
        outgoing = np.zeros(self.n_groups)
        with np.errstate(divide="ignore", invalid="ignore"):
            for layer, (row_shift, log_rho) in zip(self.layers, rows, strict=True):
                row_load = np.exp(r * log_rho)
                value += float(row_load.sum())
                incoming += _accumulate(row_load, layer.row_groups, self.n_groups)
                if not layer.col_groups.size:
                    continue
                live = np.isfinite(log_rho)  # rows with only zero couplings carry nothing back
                log_weight = np.where(live, (r - 1.0) * log_rho + row_shift, -np.inf)
                top = float(log_weight.max())
                if not np.isfinite(top):
                    continue
                back = layer.free.T @ np.exp(log_weight - top)
                col_log = -p * log_scales[layer.col_groups]
                outgoing += np.bincount(
                    layer.col_groups, np.exp(col_log + top + np.log(back)), self.n_groups
                )
        return Loads(value, incoming, outgoing)

    def norm(self, value: float) -> float:
        """||W||_{p,q} from F = ||W||^q, without overflowing for small q."""
        return float(np.exp(np.log(value) / self.q)) if value > 0 else 0.0
