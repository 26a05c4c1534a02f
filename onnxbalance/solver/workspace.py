"""What one solve prepares once on top of the objective: per-layer structure, the rows and
columns of all layers concatenated, the coarse aggregates (one per layer) and the layout of the
Hessian model (lowrank.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..unitgraph import FIXED
from . import lowrank
from .objective import Bins, Objective


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
                )
            )
        self.structures = tuple(structures)
        self.rows = _Rows.of(objective)
        self._coarse: tuple[tuple[_CoarseStructure, ...], int] | None = None
        self.simple = self._simple_rows()
        self.uniform = self._uniform_layers()
        # per movable column of all layers: its layer's row and column aggregates
        self.uniform_columns = None
        if self.uniform is not None:
            counts = [layer.col_groups.size for layer in objective.layers]
            self.uniform_columns = tuple(
                np.repeat(np.array([pair[k] for pair in self.uniform], dtype=np.int64), counts)
                for k in (0, 1)
            )
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
