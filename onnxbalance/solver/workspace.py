"""What one solve prepares once on top of the objective: per-layer structure, the rows and
columns of all layers concatenated, the coarse aggregates (one per layer) and the layout of the
Hessian model (lowrank.py)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..unitgraph import FIXED
from . import lowrank
from .objective import Bins, Objective, distinct


def _group_values(values: np.ndarray, index: np.ndarray, movable: np.ndarray) -> np.ndarray:
    return np.where(movable, values[index], 0.0)


@dataclass(frozen=True)
class _LayerStructure:
    """What a solve needs of one layer besides the float64 couplings (fixed per solve)."""

    row_movable: np.ndarray  # row_groups != FIXED
    row_index: np.ndarray  # row_groups with FIXED replaced by 0
    free32: np.ndarray | None  # float32 copy of free (couplings.py), None if the range is too wide


@dataclass(frozen=True)
class _CoarseStructure:
    """One layer's coarse (aggregate) coordinates, for the block products of build_coarse."""

    local: np.ndarray  # aggregates touched by this layer (global indices)
    row_onehot: np.ndarray  # (rows, len(local)): row's aggregate, zero row if it cannot move
    col_indicator: np.ndarray  # (movable cols, k): column's aggregate among ``col_local``
    col_local: np.ndarray  # positions in ``local`` of the columns' aggregates


SMALL_LAYER = 256
"""Layers with at most this many couplings multiply as one scatter over all of them (a
np.bincount per product for all such layers together) instead of one BLAS call each: a call
costs microseconds, which is most of an evaluation of a deep chain of small layers."""


@dataclass(frozen=True)
class _SmallLayers:
    """The couplings of the small layers (with movable columns), as coordinates into the rows
    and columns of all layers; and which layers are not small."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    large: tuple[int, ...]

    @staticmethod
    def of(layers, row_stops: np.ndarray, col_stops: np.ndarray) -> _SmallLayers:
        rows, cols, values, large = [], [], [], []
        for index, layer in enumerate(layers):
            if not layer.col_groups.size:
                continue
            if layer.free.size > SMALL_LAYER:
                large.append(index)
                continue
            row, col = np.nonzero(layer.free)
            rows.append(row + row_stops[index])
            cols.append(col + col_stops[index])
            values.append(layer.free[row, col])
        empty = [np.zeros(0, dtype=np.int64)]
        return _SmallLayers(
            np.concatenate(empty + rows),
            np.concatenate(empty + cols),
            np.concatenate([np.zeros(0), *values]),
            tuple(large),
        )

    def products(self, x: np.ndarray, n_rows: int) -> np.ndarray:
        """c @ x of every small layer, in the rows of all layers (0 in the others)."""
        if not self.values.size:
            return np.zeros(n_rows)
        return np.bincount(self.rows, self.values * x[self.cols], n_rows)

    def back(self, y: np.ndarray, n_cols: int) -> np.ndarray:
        """y @ c of every small layer, in the columns of all layers (0 in the others)."""
        if not self.values.size:
            return np.zeros(n_cols)
        return np.bincount(self.cols, self.values * y[self.rows], n_cols)


@dataclass(frozen=True)
class _Rows:
    """The rows and the movable columns of all layers, concatenated in layer order."""

    row_groups: np.ndarray  # FIXED replaced by n_groups (a pad entry)
    col_groups: np.ndarray
    fixed_row_sum: np.ndarray
    row_slices: tuple[slice, ...]  # each layer's part
    col_slices: tuple[slice, ...]
    row_counts: np.ndarray  # each layer's number of rows
    col_counts: np.ndarray  # and of movable columns
    incoming: Bins  # rows into groups (n_groups + 1 bins: the last one takes FIXED)
    outgoing: Bins  # columns into groups
    row_layers: Bins  # rows into layers
    col_layers: Bins
    small: _SmallLayers

    @staticmethod
    def of(objective: Objective) -> _Rows:
        n = objective.n_groups
        layers = objective.layers
        row_counts = np.array([layer.row_groups.size for layer in layers], dtype=np.int64)
        col_counts = np.array([layer.col_groups.size for layer in layers], dtype=np.int64)
        row_stops = np.concatenate([[0], np.cumsum(row_counts)])
        col_stops = np.concatenate([[0], np.cumsum(col_counts)])
        row_groups = np.concatenate([layer.row_groups for layer in layers] + [[]]).astype(np.int64)
        row_groups[row_groups == FIXED] = n
        col_groups = np.concatenate([layer.col_groups for layer in layers] + [[]]).astype(np.int64)
        return _Rows(
            row_groups,
            col_groups,
            np.concatenate([layer.fixed_row_sum for layer in layers] + [[]]),
            tuple(
                slice(int(a), int(b)) for a, b in zip(row_stops[:-1], row_stops[1:], strict=True)
            ),
            tuple(
                slice(int(a), int(b)) for a, b in zip(col_stops[:-1], col_stops[1:], strict=True)
            ),
            row_counts,
            col_counts,
            Bins(row_groups, n + 1),
            Bins(col_groups, n),
            Bins.consecutive(row_counts),
            Bins.consecutive(col_counts),
            _SmallLayers.of(layers, row_stops, col_stops),
        )


def aggregates(objective: Objective, movable: np.ndarray) -> np.ndarray:
    """Coarse aggregate of every group: the first layer whose rows it is (-1: cannot move)."""
    layers = objective.layers
    n, count = objective.n_groups, len(layers)
    aggregate = np.full(n + 1, count + 1, dtype=np.int64)  # count + 1: in no layer; pad at -1
    rows = np.concatenate([layer.row_groups for layer in layers] + [np.zeros(0, np.int64)])
    owners = np.repeat(np.arange(count), [layer.row_groups.size for layer in layers])
    np.minimum.at(aggregate, rows, owners)
    # a group that is never a row: one aggregate of its own kind
    cols = np.concatenate([layer.col_groups for layer in layers] + [np.zeros(0, np.int64)])
    aggregate[cols] = np.minimum(aggregate[cols], count)
    aggregate = np.where((aggregate[:n] <= count) & movable, aggregate[:n], -1)
    used = np.zeros(count + 1, dtype=bool)
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
        self.rows = _Rows.of(objective)
        self._coarse: tuple[tuple[_CoarseStructure, ...], int] | None = None
        self.simple: tuple[np.ndarray, np.ndarray] | None = None
        self.uniform: list[tuple[int, int]] | None = None
        # per movable column of all layers: its layer's row and column aggregates
        self.uniform_columns: tuple[np.ndarray, np.ndarray] | None = None
        self._find_simple_layers()
        self.has_single = any(layer.single is not None for layer in objective.layers)
        self.layout = lowrank.layout(
            [layer.row_groups for layer in objective.layers],
            [layer.col_groups for layer in objective.layers],
            self.movable,
            [(layer.rows.first, layer.cols.first) for layer in objective.layers],
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
            local = distinct(np.concatenate([row_agg, col_agg]), m)
            row_onehot = np.zeros((row_agg.size, local.size))
            live_rows = np.nonzero(row_agg >= 0)[0]
            row_onehot[live_rows, np.searchsorted(local, row_agg[live_rows])] = 1.0
            col_used = distinct(col_agg, m)
            col_indicator = np.zeros((col_agg.size, col_used.size))
            live_cols = np.nonzero(col_agg >= 0)[0]
            col_indicator[live_cols, np.searchsorted(col_used, col_agg[live_cols])] = 1.0
            block_passes = max(block_passes, col_used.size)
            coarse.append(
                _CoarseStructure(local, row_onehot, col_indicator, np.searchsorted(local, col_used))
            )
        self._coarse = (tuple(coarse), block_passes)
        return self._coarse

    @cached_property
    def structures(self) -> tuple[_LayerStructure, ...]:
        """Per layer what the log-domain path, Hessian products and block coarse products
        read (built on first use)."""
        structures = []
        for layer in self.objective.layers:
            row_movable = layer.row_groups != FIXED
            structures.append(
                _LayerStructure(
                    row_movable, np.where(row_movable, layer.row_groups, 0), layer.single
                )
            )
        return tuple(structures)

    def _find_simple_layers(self) -> None:
        """:attr:`simple`: per row of every layer (concatenated) its aggregate and its layer's
        column aggregate (n_coarse where there is none), if every layer's movable columns lie
        in one aggregate. :attr:`uniform`: per layer (row aggregate, column aggregate) if
        moreover all its rows share one (n_coarse: none, z = 0); and :attr:`uniform_columns`."""
        rows, m = self.rows, self.n_coarse
        if not self.objective.layers:
            return
        # FIXED rows index the pad at n (rows.row_groups), which takes aggregate m
        padded = np.append(np.where(self.aggregate >= 0, self.aggregate, m), m)
        col_agg = padded[rows.col_groups]
        column = _per_layer(col_agg, rows.col_counts, m, np.minimum.reduceat)  # m: none
        if not np.all((col_agg == m) | (col_agg == np.repeat(column, rows.col_counts))):
            return
        row_agg = padded[rows.row_groups]
        self.simple = row_agg, np.repeat(column, rows.row_counts)
        first = _per_layer(row_agg, rows.row_counts, m, np.take)
        if not np.array_equal(row_agg, np.repeat(first, rows.row_counts)):
            return
        column = np.where(rows.row_counts > 0, column, m)
        self.uniform = list(zip(first.tolist(), column.tolist(), strict=True))
        self.uniform_columns = (
            np.repeat(first, rows.col_counts),
            np.repeat(column, rows.col_counts),
        )


def _per_layer(values: np.ndarray, counts: np.ndarray, empty: int, take) -> np.ndarray:
    """take(values, starts) over the layers with entries (consecutive parts of ``values`` with
    these sizes), e.g. np.take for each one's first entry or np.minimum.reduceat for its
    smallest; ``empty`` for the others."""
    out = np.full(counts.size, empty, dtype=np.int64)
    nonempty = counts > 0
    if nonempty.any():
        out[nonempty] = take(values, (np.cumsum(counts) - counts)[nonempty])
    return out
