"""The contract between graph analysis and the solver.

Analysis turns an ONNX graph into :class:`ModelUnits`: linear layers whose rows and columns are
units, each unit mapped to a *scale group* (a hidden unit, or several units tied to one factor,
docs/algorithm.md §6) or to :data:`FIXED` (inputs, outputs, every unit that cannot move), plus the
stored tensors that change when the groups are rescaled. :meth:`ModelUnits.unit_graph` turns that
into the solver's input, :class:`UnitGraph`, whose layers carry coupling matrices

    c[o, i] = sum over kernel taps / flattened positions of |W[o, i, ...]|^p

in float64, or in float32 where that is exact: p = 2, one raw column per unit, and float16 or
(in range) bfloat16 weights, whose squares float32 holds exactly (docs/algorithm.md §5); big
layers of that kind store none, their squares are formed a tile at a time when read.

Nothing here reads ONNX or knows about the balancing algorithm (a copy only holds a tensor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from onnxbalance.memory import (
    LazySquares,
    abs_power,
    abs_power_runs,
    check_lazy_squares,
    empty_arrays,
    empty_populated,
    float32_squares,
    squares_fit_float32,
)

if TYPE_CHECKING:
    from onnx import TensorProto

FIXED = -1
"""Group index of a unit whose scale is pinned to 1."""

LAZY_BYTES = 64 * 2**20
"""A layer whose couplings are exact in float32 and would take at least this many float32 bytes
is not stored: its coupling is a :class:`onnxbalance.memory.LazySquares` that squares the
weight a tile at a time whenever the solver reads it. That removes 4 bytes per 2-byte weight
from the peak and the pass that builds the squares, for a dearer pass after it (float16 is
widened every time, about 1 ns a weight; bfloat16 by a shift): the solve stage of 8192 x 8192
float16 layers takes about 1.3-1.5 times as long, of bfloat16 ones less. Below this size (a
4096 x 4096 layer) the squares are a small share of the memory and stay stored. Tests lower it
to send small layers down the same path."""

LAZY_FLOAT32_BYTES = 16 * 2**20
"""The same for float32 weights, in the float64 bytes their squares would take (exact there
only), stored along with a float32 copy for the solver's steering phase: 12 bytes per 4-byte
weight, three times the weights. Their squares need no widening: a pass squares a tile of
weights in float64 or float32, about as fast as it reads stored couplings, so from a 1448 x
1448 layer on they are not stored (smaller ones, as in models of a few megabytes, keep the
stored matrix and its solve times)."""


@dataclass(frozen=True)
class Layer:
    """One linear map between units, as the solver sees it.

    ``coupling`` is a non-negative matrix of shape (rows, cols), float64 or float32 (then its
    entries are exact: the solver multiplies it in float64 all the same), or the never stored
    float32 squares of a big layer (:class:`onnxbalance.memory.LazySquares`, multiplied through
    onnxbalance.solver.products); ``row_groups[o]`` and
    ``col_groups[i]`` are scale-group indices or :data:`FIXED`.
    """

    name: str
    coupling: np.ndarray | LazySquares
    row_groups: np.ndarray
    col_groups: np.ndarray


@dataclass(frozen=True)
class UnitGraph:
    """Scale groups and the layers that couple them: everything the solver needs."""

    layers: tuple[Layer, ...]
    group_names: Sequence[str]

    @property
    def n_groups(self) -> int:
        return len(self.group_names)


@dataclass(frozen=True)
class TensorEdit:
    """How one stored tensor changes when the scale groups move (log-scales ``u``).

    The tensor is multiplied elementwise by ``exp(u[row_groups])`` along ``row_axis`` and by
    ``exp(-u[col_groups])`` along ``col_axis`` (either may be None). ``col_groups`` is 1-D (one
    group per index along ``col_axis``) or 2-D with shape (len along row_axis, len along
    col_axis) when the column unit depends on the row (grouped convolutions). ``expand_to`` is
    the shape a broadcast tensor (a scalar bias) must take before its rows can differ.
    """

    tensor: str
    row_axis: int | None = None
    row_groups: np.ndarray | None = None
    col_axis: int | None = None
    col_groups: np.ndarray | None = None
    expand_to: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LinearUnits:
    """One linear layer found in the model.

    ``weight`` holds the layer's effective weights (alpha of a Gemm, a BatchNorm's per-channel
    factor already applied) as a 2-D array (rows, raw columns): kernel taps and flattened
    positions are separate raw columns that ``col_groups`` maps onto the same unit.
    ``col_groups`` is 1-D (raw columns) or 2-D (rows, raw columns), like in :class:`TensorEdit`.
    """

    name: str
    weight: np.ndarray
    row_groups: np.ndarray
    col_groups: np.ndarray
    edits: tuple[TensorEdit, ...] = ()


@dataclass(frozen=True)
class Skip:
    """Units that stay at scale 1, and why (one record per node and reason)."""

    node: str
    count: int
    reason: str


@dataclass(frozen=True)
class ClipReplacement:
    """A clip node whose scalar bounds become per-unit tensors that scale with the units.

    The node writing ``output`` (its name kept, so nothing downstream changes) is replaced by
    ``Min(Max(data, low), high)``, ``Min(Relu(data), high)`` when ``low`` is 0, or the one of
    Min and Max its finite bounds need; every new name starts with ``prefix + "/"``, a prefix no
    name in the model has. The bound tensors (:attr:`bound_tensors`) have ``shape`` (units
    along axis 0, ones after it: they broadcast along the unit axis) and ONNX element type
    ``data_type``; TensorEdits in ``ModelUnits.edits`` rescale them.
    """

    node: str
    output: str
    data: str
    low: float
    high: float
    prefix: str
    shape: tuple[int, ...]
    data_type: int

    @property
    def bound_tensors(self) -> tuple[tuple[str, float], ...]:
        """(name, value before rescaling) of each bound tensor; a lower bound of 0 is a Relu."""
        bounds = []
        if np.isfinite(self.low) and self.low != 0.0:
            bounds.append((f"{self.prefix}/low", self.low))
        if np.isfinite(self.high):
            bounds.append((f"{self.prefix}/high", self.high))
        return tuple(bounds)


@dataclass(frozen=True)
class TensorCopy:
    """A private copy of a constant for some node inputs of the main graph.

    The copy, an initializer named ``name`` holding ``value``, replaces ``source`` at
    ``readers`` ((node index, input slot) pairs); edits name the copy. ``value`` is the source's
    stored tensor, or the folded value of a constant subexpression (``stored`` False then: the
    subexpression's result has no tensor of its own that could be edited instead).
    """

    name: str
    source: str
    readers: tuple[tuple[int, int], ...]
    value: TensorProto
    stored: bool = True


@dataclass(frozen=True)
class ModelUnits:
    """What analysis found: the linear layers, the scale groups, and what it left alone.

    ``edits`` rescale stored tensors outside the linear layers' weights and biases: constants
    added to rescaled channels, and the mean and bias of a BatchNormalization they pass through,
    and the per-unit bounds of ``clips``, the clip nodes the rewrite replaces.
    ``units_behind_clips`` counts the units that clips with constant bounds other than a Relu's
    decide on: balanced when those clips are replaced, fixed when they are not.
    ``copies`` are the private copies the rewrite adds before any edit (edits may name them).
    """

    layers: tuple[LinearUnits, ...]
    group_names: Sequence[str]
    skipped: tuple[Skip, ...] = field(default=())
    edits: tuple[TensorEdit, ...] = field(default=())
    clips: tuple[ClipReplacement, ...] = field(default=())
    units_behind_clips: int = 0
    copies: tuple[TensorCopy, ...] = field(default=())

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def unit_graph(self, p: float, unit_max: list[np.ndarray] | None = None) -> UnitGraph:
        """The solver's view for the l_{p,q} norm with this ``p`` (the coupling matrices are
        allocated together: :func:`onnxbalance.memory.empty_arrays`).

        A layer whose couplings are squares exact in float32 (of float16 or bfloat16 weights,
        :meth:`_Columns.squares_alone`) stores them only there, half the bytes of float64, or
        from :data:`LAZY_BYTES` on does not store them at all, nor do big float32 layers
        (:data:`LAZY_FLOAT32_BYTES`) and layers whose rows all stay at scale 1 (:func:`_storage`);
        a bfloat16 weight found outside the range where that holds falls back to float64.

        ``unit_max``: if given, each layer's per-unit largest |w| is appended to it, found
        while the couplings are built (:func:`onnxbalance.memory.abs_power`).
        """
        columns = [_Columns.of(layer.col_groups) for layer in self.layers]
        shapes = [
            (np.shape(layer.weight)[0], column.groups.size)
            for layer, column in zip(self.layers, columns, strict=True)
        ]
        storage = [
            _storage(
                column.squares_alone(p),
                np.asarray(layer.weight).dtype,
                shape,
                rows_fixed=bool(np.all(np.asarray(layer.row_groups) == FIXED)),
            )
            for layer, column, shape in zip(self.layers, columns, shapes, strict=True)
        ]
        stores = {
            dtype: iter(
                empty_arrays([s for s, k in zip(shapes, storage, strict=True) if k is dtype], dtype)
            )
            for dtype in (np.float32, np.float64)
        }
        layers = []
        for layer, column, shape, kind in zip(self.layers, columns, shapes, storage, strict=True):
            maxima = None
            if unit_max is not None:
                maxima = np.empty(shape[0])
                unit_max.append(maxima)
            if kind is LazySquares:
                squares = LazySquares(np.asarray(layer.weight))
                if check_lazy_squares(squares, maxima):
                    layers.append(_layer(layer, squares, column))
                    continue
                # bfloat16 beyond the range, or an infinite or NaN float16 or float32 weight
                coupling, kind = empty_populated(shape, np.float64), np.float64
            else:
                coupling = next(stores[kind])
            if kind is np.float32 and not float32_squares(layer.weight, coupling, maxima):
                coupling, kind = empty_populated(shape, np.float64), np.float64  # bfloat16 beyond
            if kind is np.float64:
                coupling = column.couple(layer.weight, p, coupling, maxima)
            layers.append(_layer(layer, coupling, column))
        return UnitGraph(tuple(layers), self.group_names)


def _storage(
    squares_alone: bool, weight_dtype: np.dtype, shape: tuple[int, int], rows_fixed: bool = False
) -> type:
    """How a layer's coupling is kept: np.float64; np.float32 where its entries are squares
    of float16 or bfloat16 weights (exact in float32), or :class:`LazySquares` (not stored)
    from :data:`LAZY_BYTES` of them on; :class:`LazySquares` too for squares of float32
    weights from :data:`LAZY_FLOAT32_BYTES` on, and for the squares of a layer whose rows all
    stay at scale 1 (a transformer's q, k and output projections): for q = p the solver reads
    those once, for their column sums (``solver.couplings.collapse_fixed_rows``), and storing
    them first cost more than that read."""
    if not squares_alone:
        return np.float64
    size = shape[0] * shape[1]
    if squares_fit_float32(weight_dtype):
        return LazySquares if rows_fixed or 4 * size >= LAZY_BYTES else np.float32
    if weight_dtype == np.float32 and (rows_fixed or 8 * size >= LAZY_FLOAT32_BYTES):
        return LazySquares
    return np.float64


def _layer(layer: LinearUnits, coupling: np.ndarray | LazySquares, column: _Columns) -> Layer:
    return Layer(layer.name, coupling, np.asarray(layer.row_groups, np.int64), column.groups)


@dataclass(frozen=True)
class _Columns:
    """How the raw columns of one layer fold into its coupling matrix's columns."""

    raw: np.ndarray  # the raw columns' groups, 1-D or 2-D (rows, raw columns)
    groups: np.ndarray  # the coupling matrix's columns: the distinct groups, sorted
    column_of: np.ndarray  # each raw column's position in ``groups``

    @staticmethod
    def of(col_groups: np.ndarray) -> _Columns:
        raw = np.asarray(col_groups, dtype=np.int64)
        groups, column_of = np.unique(raw, return_inverse=True)
        if raw.ndim == 1 and groups.size == raw.size and np.array_equal(groups, raw):
            groups = raw  # every raw column is its own unit, in order
        return _Columns(raw, groups, column_of)

    def squares_alone(self, p: float) -> bool:
        """Whether each coupling is one weight's square: p = 2 and each coupling column one raw
        column (a sum of several squares is exact in no narrower type than float64)."""
        return p == 2.0 and self.groups is self.raw

    def couple(
        self, weight: np.ndarray, p: float, out: np.ndarray, unit_max: np.ndarray | None = None
    ) -> np.ndarray:
        """``|weight|^p`` summed over raw columns of one group, into ``out`` (``unit_max``: see
        :func:`onnxbalance.memory.abs_power`)."""
        raw, groups, column_of = self.raw, self.groups, self.column_of
        if groups is raw:
            return abs_power(weight, p, out, unit_max)  # block-wise: no full-size temporaries
        if raw.ndim == 1:
            order = np.argsort(column_of, kind="stable")
            starts = np.searchsorted(column_of[order], np.arange(len(groups)))
            if np.array_equal(order, np.arange(len(order))):
                order = None  # already grouped in runs (Flatten, all-fixed inputs): no copy
            # a block of rows at a time: the powers of all raw columns never exist whole
            return abs_power_runs(weight, p, starts, out, order, unit_max)
        powered = abs_power(weight, p, unit_max=unit_max)
        n_rows = powered.shape[0]
        flat_index = np.arange(n_rows)[:, None] * len(groups) + column_of.reshape(raw.shape)
        out.ravel()[:] = np.bincount(
            flat_index.ravel(), weights=powered.ravel(), minlength=n_rows * len(groups)
        )
        return out


def coupling_matrix(
    weight: np.ndarray, col_groups: np.ndarray, p: float
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate ``|weight|^p`` over raw columns that belong to the same unit.

    Returns the coupling matrix (rows, unique column groups) in float64 and the group of each
    of its columns. All :data:`FIXED` raw columns collapse into one column: their scale is 1,
    so only their sum matters.

    >>> c, g = coupling_matrix(np.array([[1.0, -2.0, 3.0]]), np.array([0, 0, FIXED]), 2.0)
    >>> c.tolist(), g.tolist()
    ([[9.0, 5.0]], [-1, 0])
    """
    columns = _Columns.of(col_groups)
    out = empty_populated((np.shape(weight)[0], columns.groups.size), np.float64)
    return columns.couple(weight, p, out), columns.groups
