"""The convex objective every solver minimises, and the loads that drive Algorithm 1.

With log-scales u (u = 0 for fixed units), r = q / p and the coupling matrices c of a unit graph,

    rho_o  = exp(p u_o) * sum_i c[o, i] exp(-p u_i)          (one row o of one layer)
    F(u)   = sum_o rho_o^r                                     = ||W||_{p,q}^q
    in_g   = sum of rho_o^r over the rows o of group g
    out_g  = sum over the columns i of group g of exp(-p u_i) * sum_o c[o, i] rho_o^(r-1) exp(p u_o)

and dF/du_g = q (in_g - out_g) (docs/algorithm.md §3, §6). One evaluation costs two passes over
every coupling matrix: c @ x for rho and c.T @ y for the outgoing loads.

Columns whose group is fixed have scale 1, so they are summed once into a per-row constant and
never enter the matrix-vector products.

Two numeric paths give the same loads. While every coupling times every factor exp(+-p u)
stays within exp(+-600), loads() uses plain factors exp(p u), computed once per call for all
groups; for r = 1 that leaves no exp or power per layer, so a sweep costs little more than its
matrix-vector products. Beyond that (weights from 1e-30 to 1e30 with p = 4, scales far from 1)
it switches to the log domain: the vectors fed to the products are shifted by their largest
log-entry (every entry in (0, 1]) and the shift is added back in logs; a row or column whose
shifted sum falls below exp(-600) may have lost its terms to underflow and is redone by
log-sum-exp within itself. Every load is bounded by F itself (each term of rho_o is at most
rho_o), so once the inputs are finite nothing overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..memory import LazySquares
from ..unitgraph import FIXED, UnitGraph
from .couplings import Coupling, check_graph, summarise_graph
from .products import times, transposed_times

__all__ = ["Loads", "Objective", "check_graph", "movable_groups"]


@dataclass(frozen=True)
class Loads:
    """F(u) and the per-group incoming and outgoing loads at one point."""

    value: float
    incoming: np.ndarray
    outgoing: np.ndarray

    def gradient(self, q: float) -> np.ndarray:
        return q * (self.incoming - self.outgoing)


@dataclass(frozen=True)
class _Side:
    """How the rows (or the movable columns) of one layer map onto scale groups.

    A side whose groups are one contiguous run start, start+1, ... (every plain hidden layer)
    gathers and scatters by slicing, which keeps the per-sweep overhead near the cost of the
    matrix-vector products themselves.
    """

    groups: np.ndarray
    movable: np.ndarray | None  # groups != FIXED (None with a span: every unit moves)
    span: slice | None  # set when groups == arange(start, stop)
    all_fixed: bool
    all_movable: bool

    @staticmethod
    def of(groups: np.ndarray) -> _Side:
        start = consecutive_start(groups)  # every unit movable (FIXED = -1 is never a start)
        if start is not None:
            return _Side(groups, None, slice(start, start + groups.size), False, True)
        movable = groups != FIXED
        return _Side(groups, movable, None, not movable.any(), bool(movable.all()))

    @property
    def first(self) -> int | None:
        """g if the groups are g, g + 1, ... (else None)."""
        return None if self.span is None else self.span.start

    def gather(self, padded: np.ndarray) -> np.ndarray:
        """Each unit's value from ``padded`` (group values with a trailing 0 for FIXED = -1)."""
        return padded[self.span] if self.span is not None else padded[self.groups]

    def scatter(self, target: np.ndarray, values: np.ndarray) -> None:
        """target[g] += sum of values over the units of group g (fixed units dropped)."""
        if self.all_fixed:
            return
        if self.span is not None:
            target[self.span] += values
        elif self.all_movable:
            target += np.bincount(self.groups, values, target.size)
        else:
            target += np.bincount(self.groups[self.movable], values[self.movable], target.size)


@dataclass(frozen=True)
class _PreparedLayer:
    name: str
    free: np.ndarray | LazySquares  # coupling restricted to columns of movable groups,
    # C-contiguous (float64, or float32 holding it exactly, or never stored: multiplied
    # through products.py)
    fixed_row_sum: np.ndarray  # per row: sum of the coupling over fixed columns
    row_groups: np.ndarray
    col_groups: np.ndarray  # groups of the columns of ``free`` (never FIXED)
    rows: _Side
    cols: _Side
    has_fixed_columns: bool
    free_col_sums: np.ndarray  # c.T @ 1 over the free columns
    row_sums: np.ndarray  # c @ 1 over all columns (rho at u = 0)
    log_range: float  # largest |log| of a non-zero coupling
    single: np.ndarray | None  # float32 copy of free (couplings.py; ``free`` itself if that is
    # float32), or None

    # Masks and logs that only the log-domain path and r != 1 read, made on first use.
    @cached_property
    def empty_rows(self) -> np.ndarray:
        """Rows with only zero couplings (rho = 0)."""
        return self.row_sums == 0

    @cached_property
    def has_empty_rows(self) -> bool:
        return bool(self.empty_rows.any())

    @cached_property
    def zero_cols(self) -> np.ndarray:
        """Free columns with only zero couplings."""
        return self.free_col_sums == 0

    @cached_property
    def log_fixed_row_sum(self) -> np.ndarray:
        """log of fixed_row_sum (-inf where 0)."""
        with np.errstate(divide="ignore"):
            return np.log(self.fixed_row_sum)


def _prepare(
    graph: UnitGraph, couplings: tuple[Coupling, ...] | None
) -> tuple[_PreparedLayer, ...]:
    if couplings is None:  # evaluated in float64 only: no float32 copy
        couplings = summarise_graph(graph, single=False)
    prepared = []
    for layer, summary in zip(graph.layers, couplings, strict=True):
        coupling = summary.matrix
        col_groups = np.asarray(layer.col_groups, dtype=np.int64)
        row_groups = np.asarray(layer.row_groups, dtype=np.int64)
        movable = col_groups != FIXED
        if movable.all():
            # No copy (unless not C-ordered): the sweep reads the caller's matrix itself.
            fixed_row_sum = np.zeros(coupling.shape[0])
            free, single = _contiguous(coupling), summary.single
            free_col_sums = summary.col_sums
            log_range = summary.log_range
        else:
            col_groups = col_groups[movable]
            fixed_row_sum = coupling[:, ~movable].sum(axis=1, dtype=np.float64)
            # a matrix never stored is stored here: layers with fixed columns among movable
            # ones (a pinned input unit) are few, and then need no gather per product
            free = np.ascontiguousarray(coupling[:, movable])
            if summary.single is coupling:  # its own copy (couplings.py), and so is free
                single = free.astype(np.float32, copy=False) if free.shape[1] else None
            else:
                single = _single_columns(summary, movable)
            # Row and column sums come with the summary: empty rows and columns cost no pass.
            free_col_sums = summary.col_sums[movable]
            log_range = max(summary.log_range, _log_range(fixed_row_sum))
        prepared.append(
            _PreparedLayer(
                name=layer.name,
                free=free,
                fixed_row_sum=fixed_row_sum,
                row_groups=row_groups,
                col_groups=col_groups,
                rows=_Side.of(row_groups),
                cols=_Side.of(col_groups),
                has_fixed_columns=free.shape[1] < coupling.shape[1],
                free_col_sums=free_col_sums,
                row_sums=summary.row_sums,
                log_range=log_range,
                single=single,
            )
        )
    return tuple(prepared)


def _contiguous(coupling: np.ndarray | LazySquares) -> np.ndarray | LazySquares:
    """The coupling C-ordered (a matrix never stored is read through products.py as it is)."""
    return coupling if isinstance(coupling, LazySquares) else np.ascontiguousarray(coupling)


def _log_range(values: np.ndarray) -> float:
    positive = values[values > 0]
    return float(np.abs(np.log(positive)).max()) if positive.size else 0.0


def _single_columns(summary: Coupling, movable: np.ndarray) -> np.ndarray | None:
    """The float32 copy restricted to the movable columns (some are fixed), like ``free``."""
    if summary.single is None or not movable.any():
        return None
    return np.ascontiguousarray(summary.single[:, movable])


@dataclass(frozen=True)
class _RowSums:
    log_rho: np.ndarray
    row_log: np.ndarray | None  # p u_o of each row (None: every row fixed)
    col_log: np.ndarray | None  # -p u_i of each movable column (None: no movable column)


def imbalance(incoming: np.ndarray, outgoing: np.ndarray, movable: np.ndarray) -> float:
    """max |in_g - out_g| / (in_g + out_g) over the movable groups that carry any load: 0 at
    the optimum (every group balanced), up to 1 for a group that only receives or only sends."""
    total = incoming + outgoing
    carrying = movable & (total > 0)
    if not carrying.any():
        return 0.0
    return float((np.abs(incoming - outgoing)[carrying] / total[carrying]).max())


def movable_groups(graph: UnitGraph) -> np.ndarray:
    """Boolean mask of groups that some layer row or column maps to (the others never move)."""
    used = np.zeros(graph.n_groups, dtype=bool)
    for layer in graph.layers:
        for groups in (layer.row_groups, layer.col_groups):
            groups = np.asarray(groups, dtype=np.int64)
            used[groups[groups != FIXED]] = True
    return used


_TINY = float(np.exp(-600.0))
"""A shifted sum below this may have lost its terms to underflow (they were measured against
the largest entry of the whole layer, not of their own row): such rows are redone exactly."""


def _log_sum_terms(block: np.ndarray, log_factors: np.ndarray, extra: np.ndarray | None):
    """log sum_j block[k, j] exp(log_factors[j]) for every row k of ``block``, by log-sum-exp
    within the row; ``extra`` is the log of one more term per row (fixed columns) or None."""
    terms = np.log(block, dtype=np.float64)  # float32 couplings too: their logs in float64
    terms += log_factors[None, :]
    if extra is not None:
        terms = np.concatenate([terms, extra[:, None]], axis=1)
    top = terms.max(axis=1)
    top = np.where(np.isfinite(top), top, 0.0)  # rows without terms stay at log 0 = -inf
    return top + np.log(np.exp(terms - top[:, None]).sum(axis=1))


def stable_order(keys: np.ndarray, size: int) -> np.ndarray:
    """np.argsort(keys, kind="stable") for keys in [0, size): numpy radix-sorts 16-bit keys,
    an order of magnitude faster than its merge sort of 64-bit ones."""
    if size <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return np.argsort(keys, kind="stable")


def distinct(values: np.ndarray, size: int) -> np.ndarray:
    """Sorted distinct entries of ``values`` in [0, size) (np.unique without sorting)."""
    seen = np.zeros(size + 1, dtype=bool)
    seen[np.where((values >= 0) & (values < size), values, size)] = True
    return np.flatnonzero(seen[:size])


def consecutive_start(groups: np.ndarray) -> int | None:
    """g if ``groups`` is g, g + 1, ..., g + len - 1 (g >= 0), else None."""
    if not groups.size:
        return None
    first = int(groups[0])
    if first < 0 or int(groups[-1]) - first != groups.size - 1:
        return None
    # strictly increasing integers spanning exactly len - 1 steps are consecutive
    return first if np.greater(groups[1:], groups[:-1]).all() else None


class Bins:
    """Sums of values into ``size`` bins by a fixed index array, prepared once: a scatter when
    no two entries share a bin; sums over runs of the stably sorted index (np.add.reduceat) when
    the runs are long (layers: several times faster than a weighted np.bincount); a weighted
    np.bincount when they are short (reduceat pays per run: groups with one or two entries)."""

    def __init__(self, index: np.ndarray, size: int, order: np.ndarray | None = None) -> None:
        """``order``: a stable argsort of ``index`` if the caller has one."""
        index = np.asarray(index, dtype=np.int64)
        self.size = size
        self.index = index
        if order is None and np.all(index[1:] >= index[:-1]):  # sorted: no argsort needed
            ordered = index
        else:
            order = stable_order(index, size) if order is None else order
            ordered = index[order]
        boundary = np.ones(ordered.size, dtype=bool)
        np.not_equal(ordered[1:], ordered[:-1], out=boundary[1:])
        self.unique = bool(boundary.all())
        self.order = order
        self.starts = np.flatnonzero(boundary)
        self.targets = ordered[self.starts]
        self.short_runs = _SHORT_RUNS * self.starts.size > index.size

    @classmethod
    def consecutive(cls, counts: np.ndarray) -> Bins:
        """Bin k takes the next counts[k] values (layers or vectors laid end to end): sums over
        runs, prepared without looking at an index."""
        counts = np.asarray(counts, dtype=np.int64)
        bins = cls.__new__(cls)
        bins.size = counts.size
        bins.index = None  # only the run sums below are used
        bins.unique = bins.short_runs = False
        bins.order = None
        nonempty = counts > 0
        bins.starts = (np.cumsum(counts) - counts)[nonempty]
        bins.targets = np.flatnonzero(nonempty)
        return bins

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.short_runs and not self.unique:
            return np.bincount(self.index, values, self.size)
        out = np.zeros(self.size)
        if self.unique:
            out[self.index] = values
        elif self.starts.size:
            ordered = values if self.order is None else values[self.order]
            out[self.targets] = np.add.reduceat(ordered, self.starts)
        return out


_SHORT_RUNS = 4
"""Bins whose runs are shorter than this on average sum by np.bincount (measured: it wins at
one or two entries per bin, np.add.reduceat at thirty and more)."""


def _accumulate(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    movable = groups != FIXED
    return np.bincount(groups[movable], weights=values[movable], minlength=n_groups)


_DIRECT_LIMIT = 600.0
"""Largest log-magnitude of a scale factor times a coupling for which loads() skips the log
domain: exp(600) ~ 1e260 leaves room for row sums and powers below float64's 1e308."""


class Objective:
    """F(u) and its loads on one unit graph, for one (p, q); counts passes over the couplings."""

    def __init__(
        self,
        graph: UnitGraph,
        p: float,
        q: float,
        couplings: tuple[Coupling, ...] | None = None,
    ) -> None:
        if not (p > 0 and q > 0 and np.isfinite(p) and np.isfinite(q)):
            raise ValueError(f"p and q must be positive and finite, got p={p}, q={q}")
        self.p = float(p)
        self.q = float(q)
        self.r = self.q / self.p
        self.n_groups = graph.n_groups
        self.layers = _prepare(graph, couplings)
        self.passes = 0
        self._log_range = max((layer.log_range for layer in self.layers), default=0.0)

    def _log_row_sums(self, log_scales: np.ndarray) -> list[_RowSums]:
        """Per layer: log rho_o (-inf where a row has only zero couplings) and the log factors
        it used, for the outgoing pass. Call inside ``np.errstate(divide="ignore")``."""
        self.passes += 1
        # p u per group with a trailing 0: FIXED is -1, so a fixed unit gathers 0.
        scaled = np.empty(self.n_groups + 1)
        np.multiply(log_scales, self.p, out=scaled[:-1])
        scaled[-1] = 0.0
        negated = -scaled
        out = []
        for layer in self.layers:
            row_log = None if layer.rows.all_fixed else layer.rows.gather(scaled)
            col_log = None
            if layer.col_groups.size:
                col_log = layer.cols.gather(negated)
                top = float(col_log.max())
                if layer.has_fixed_columns and top < 0.0:
                    top = 0.0
                factors = col_log - top
                np.exp(factors, out=factors)
                sums = times(layer.free, factors)
                if layer.has_fixed_columns:
                    sums += layer.fixed_row_sum * np.exp(-top)
                redo = sums < _TINY
                if layer.has_empty_rows:
                    redo &= ~layer.empty_rows
                log_rho = np.log(sums, out=sums)
                log_rho += top
                if redo.any():
                    rows = np.flatnonzero(redo)
                    extra = layer.log_fixed_row_sum[rows] if layer.has_fixed_columns else None
                    log_rho[rows] = _log_sum_terms(layer.free[rows], col_log, extra)
            else:
                log_rho = layer.log_fixed_row_sum.copy()
            if row_log is not None:
                log_rho += row_log
            out.append(_RowSums(log_rho, row_log, col_log))
        return out

    def row_sums(self, log_scales: np.ndarray) -> list[np.ndarray]:
        """rho_o of every row of every layer (one pass)."""
        with np.errstate(divide="ignore"):
            return [np.exp(rows.log_rho) for rows in self._log_row_sums(log_scales)]

    def value(self, log_scales: np.ndarray) -> float:
        """F(u) = ||W||_{p,q}^q after rescaling by exp(u) (one pass; inf beyond float64)."""
        with np.errstate(over="ignore"):
            return float(np.exp(self.log_value(log_scales)))

    def log_value(self, log_scales: np.ndarray) -> float:
        """log F(u), also where F itself would overflow (one pass)."""
        with np.errstate(divide="ignore"):
            terms = [self.r * rows.log_rho for rows in self._log_row_sums(log_scales)]
        every = np.concatenate([*terms, np.zeros(0)])
        top = float(every.max(initial=-np.inf))
        if not np.isfinite(top):
            return top
        return top + float(np.log(np.exp(every - top).sum()))

    def loads(self, log_scales: np.ndarray) -> Loads:
        """F(u), in_g and out_g at ``log_scales`` (two passes; four where the plain products
        overflow: F or an outgoing load is infinite, and the products may have overflowed on
        the way to loads that do not, so the point is redone in the log domain)."""
        log_scales = np.asarray(log_scales, dtype=np.float64)
        scaled = self.p * log_scales
        largest = float(max(scaled.max(), -scaled.min())) if scaled.size else 0.0
        if self._log_range + 2.0 * largest < _DIRECT_LIMIT:
            loads = self._direct_loads(scaled)
            if np.isfinite(loads.value) and np.isfinite(loads.outgoing).all():
                return loads
        return self._log_loads(log_scales)

    def _direct_loads(self, scaled: np.ndarray) -> Loads:
        """loads() with plain factors exp(p u): every product stays within exp(+-_DIRECT_LIMIT)
        (the caller checked), and for r = 1 no exp or power is taken per layer at all."""
        r = self.r
        self.passes += 2
        factor = np.empty(self.n_groups + 1)  # exp(p u) per group, 1 for FIXED (index -1)
        np.exp(scaled, out=factor[:-1])
        factor[-1] = 1.0
        inverse = 1.0 / factor
        value = 0.0
        incoming = np.zeros(self.n_groups)
        outgoing = np.zeros(self.n_groups)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for layer in self.layers:
                row_factor = None if layer.rows.all_fixed else layer.rows.gather(factor)
                col_factor = None
                if layer.col_groups.size:
                    col_factor = layer.cols.gather(inverse)
                    sums = times(layer.free, col_factor)
                    if layer.has_fixed_columns:
                        sums += layer.fixed_row_sum
                else:
                    sums = layer.fixed_row_sum
                rho = sums if row_factor is None else sums * row_factor
                if r == 1.0:
                    row_load, weight = rho, row_factor
                else:
                    row_load = rho**r
                    weight = row_load / rho  # rho^(r-1) without a second power
                    if row_factor is not None:
                        weight *= row_factor
                    if layer.has_empty_rows:  # rho = 0 rows carry nothing back (not 0 / 0)
                        weight[layer.empty_rows] = 0.0
                value += float(row_load.sum())
                layer.rows.scatter(incoming, row_load)
                if col_factor is None:
                    continue
                back = (
                    layer.free_col_sums if weight is None else transposed_times(layer.free, weight)
                )
                layer.cols.scatter(outgoing, back * col_factor)
        return Loads(value, incoming, outgoing)

    def _log_loads(self, log_scales: np.ndarray) -> Loads:
        """loads() with every scale factor kept in the log domain (any magnitudes)."""
        r = self.r
        value = 0.0
        incoming = np.zeros(self.n_groups)
        outgoing = np.zeros(self.n_groups)
        # a load beyond float64 is inf, quietly: the callers compare it, the solver refuses it
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            per_layer = self._log_row_sums(log_scales)
            self.passes += 1
            for layer, rows in zip(self.layers, per_layer, strict=True):
                row_load = np.exp(r * rows.log_rho)
                value += float(row_load.sum())
                layer.rows.scatter(incoming, row_load)
                if rows.col_log is None:
                    continue
                # log of rho_o^(r-1) exp(p u_o): what row o sends back to its columns
                if r == 1.0:
                    log_weight = (
                        np.zeros_like(rows.log_rho) if rows.row_log is None else rows.row_log
                    )
                else:
                    log_weight = (r - 1.0) * rows.log_rho
                    if rows.row_log is not None:
                        log_weight += rows.row_log
                if layer.has_empty_rows:  # rho = 0 rows carry nothing back (avoid 0 * inf)
                    log_weight = np.where(np.isneginf(rows.log_rho), -np.inf, log_weight)
                top = float(log_weight.max())
                if not np.isfinite(top):
                    continue
                weights = log_weight - top
                back = transposed_times(layer.free, np.exp(weights, out=weights))
                redo = (back < _TINY) & ~layer.zero_cols
                log_back = np.log(back, out=back)
                if redo.any():
                    cols = np.flatnonzero(redo)
                    exact = _log_sum_terms(layer.free[:, cols].T, log_weight, None)
                    log_back[cols] = exact - top
                log_back += rows.col_log
                log_back += top
                layer.cols.scatter(outgoing, np.exp(log_back, out=log_back))
        return Loads(value, incoming, outgoing)

    def norm(self, value: float) -> float:
        """||W||_{p,q} from F = ||W||^q, without overflowing for small q."""
        return float(np.exp(np.log(value) / self.q)) if value > 0 else 0.0
