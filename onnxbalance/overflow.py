"""Units whose rescaled weights would not fit their tensor's dtype, and pinning them.

Balancing multiplies a stored entry by ``exp(u_o - u_i)`` (docs/algorithm.md §1, log-scales u). In
float16 (largest finite 65504) or bfloat16 the product can exceed the dtype's range even when
the optimum is perfectly fine in float64. An entry overflows when

    log|W[o, i]| + u_o - u_i > log(max_finite(dtype))

and the units responsible are its row unit when ``u_o > 0`` and its column unit when
``u_i < 0``. Those units are refused: :func:`pin_groups` fixes them at scale 1 (with a skip
record saying why), and the caller solves again without them. Each round pins at least one
group, so repeating until nothing overflows ends; the norm found is the optimum over the units
that can be stored.

Tensors are read one block of rows at a time, and a block whose bound
``max|W| * exp(max row factor - min column factor)`` fits is not examined further, so checking
costs one pass over the edited tensors.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx

from onnxbalance import memory, tensors
from onnxbalance.analysis.graph import bodies, constant_value
from onnxbalance.rewrite import clip_bounds
from onnxbalance.unitgraph import FIXED, ModelUnits, Skip, TensorEdit

log = logging.getLogger(__name__)

_INDEX_SUFFIX = re.compile(r"(\[\d+\]|[:#/]\d+)$")


def stored_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant node values of the main graph and its If/Loop/Scan bodies, by
    name (a name the main graph stores is the main graph's)."""
    found: dict[str, onnx.TensorProto] = {}
    _add_stored(model.graph, found)
    return found


def _add_stored(graph: onnx.GraphProto, found: dict[str, onnx.TensorProto]) -> None:
    for tensor in graph.initializer:
        found.setdefault(tensor.name, tensor)
    for node in graph.node:
        value = constant_value(node)
        if value is not None:
            found.setdefault(node.output[0], value)
    for _, _, _, body in bodies(graph):
        _add_stored(body, found)


def _log_u(groups: np.ndarray, u: np.ndarray) -> np.ndarray:
    groups = np.asarray(groups, dtype=np.int64)
    padded = np.append(u, 0.0)  # FIXED units read the trailing 0
    return padded[np.where(groups == FIXED, len(u), groups)]


def _placed(values: np.ndarray, axes: tuple[int, ...], ndim: int, rows: slice) -> np.ndarray:
    """``values`` laid along ``axes`` of an ndim array, sliced to ``rows`` on axis 0."""
    order = np.argsort(axes)
    values = np.transpose(values, order) if values.ndim > 1 else values
    shape = [1] * ndim
    for axis, size in zip(sorted(axes), values.shape, strict=True):
        shape[axis] = size
    values = values.reshape(shape)
    if 0 in axes:
        values = values[rows]
    return values


def _edit_terms(edit: TensorEdit, u: np.ndarray, ndim: int, rows: slice):
    """(row term, column term) log-factors of one edit for a block, broadcastable to it."""
    row = col = None
    if edit.row_axis is not None and edit.row_groups is not None:
        row = _placed(_log_u(edit.row_groups, u), (edit.row_axis,), ndim, rows)
    if edit.col_axis is not None and edit.col_groups is not None:
        values = -_log_u(edit.col_groups, u)
        axes = (edit.col_axis,) if values.ndim == 1 else (edit.row_axis, edit.col_axis)
        col = _placed(values, axes, ndim, rows)
    return row, col


def _responsible(
    edit: TensorEdit, u: np.ndarray, index: tuple[np.ndarray, ...], start: int
) -> set[int]:
    """Groups that pushed the overflowing entries ``index`` (block coordinates) up."""
    full = list(index)
    full[0] = full[0] + start
    groups: set[int] = set()
    if edit.row_axis is not None and edit.row_groups is not None:
        found = np.asarray(edit.row_groups, dtype=np.int64)[full[edit.row_axis]]
        groups.update(int(g) for g in np.unique(found) if g != FIXED and u[g] > 0)
    if edit.col_axis is not None and edit.col_groups is not None:
        col_groups = np.asarray(edit.col_groups, dtype=np.int64)
        if col_groups.ndim == 1:
            found = col_groups[full[edit.col_axis]]
        else:
            found = col_groups[full[edit.row_axis], full[edit.col_axis]]
        groups.update(int(g) for g in np.unique(found) if g != FIXED and u[g] < 0)
    return groups


def overflowing_groups(
    model: onnx.ModelProto,
    units: ModelUnits,
    log_scales: np.ndarray,
    base_dir=None,
) -> dict[int, str]:
    """Scale groups to refuse because some rescaled entry would not fit its dtype.

    Returns {group: reason}; empty when every rescaled tensor fits.
    """
    u = np.asarray(log_scales, dtype=np.float64)
    by_tensor: dict[str, list[TensorEdit]] = defaultdict(list)
    for edit in [e for layer in units.layers for e in layer.edits] + list(units.edits):
        by_tensor[edit.tensor].append(edit)
    stored = stored_tensors(model)
    stored.update((t.name, t) for t in clip_bounds(units.clips))  # created by the rewrite
    stored.update((copy.name, copy.value) for copy in units.copies)
    reasons: dict[int, str] = {}
    for name, edits in by_tensor.items():
        proto = stored.get(name)
        if proto is None or proto.data_type not in tensors.FLOAT_TYPES:
            continue
        dtype = tensors.FLOAT_TYPES[proto.data_type]
        limit = math.log(tensors.max_finite(dtype))
        values = tensors.read_array(proto, base_dir)
        expand = next((e.expand_to for e in edits if e.expand_to is not None), None)
        if expand is not None and values.shape != tuple(expand):
            values = np.broadcast_to(values, tuple(expand))
        if values.ndim == 0:
            values = values.reshape(1)
        row_bytes = values[0].size * 8 if len(values) else 8
        for rows in memory.row_blocks(len(values), row_bytes):
            block = np.abs(values[rows].astype(np.float64))
            finite = np.isfinite(block)
            top = float(block[finite].max()) if finite.any() else 0.0
            if top == 0.0:
                continue
            terms = [_edit_terms(e, u, values.ndim, rows) for e in edits]
            bound = math.log(top) + sum(
                float(np.max(t)) for pair in terms for t in pair if t is not None
            )
            if bound <= limit:
                continue
            with np.errstate(divide="ignore"):
                logs = np.log(block)
            for pair in terms:
                for term in pair:
                    if term is not None:
                        logs = logs + term
            over = (logs > limit) & finite
            if not over.any():
                continue
            index = np.nonzero(over)
            for edit in edits:
                for group in _responsible(edit, u, index, rows.start):
                    reasons.setdefault(
                        group, f"rescaled weights of '{name}' would overflow {dtype.name}"
                    )
        memory.release(values)
    if reasons:
        log.info("%d scale groups would overflow their dtype", len(reasons))
    return reasons


def _renumber(groups, mapping: np.ndarray):
    if groups is None:
        return None
    groups = np.asarray(groups, dtype=np.int64)
    return np.where(groups == FIXED, FIXED, mapping[np.where(groups == FIXED, 0, groups)])


def layer_of(group_name: str) -> str:
    """The layer part of a scale group's name ("relu1[17]" or "relu1:17" -> "relu1")."""
    return _INDEX_SUFFIX.sub("", group_name) or group_name


def pin_groups(units: ModelUnits, reasons: Mapping[int, str]) -> ModelUnits:
    """``units`` with the given groups fixed at scale 1 and listed as skipped (with reasons)."""
    if not reasons:
        return units
    keep = [g for g in range(units.n_groups) if g not in reasons]
    mapping = np.full(units.n_groups, FIXED, dtype=np.int64)
    mapping[keep] = np.arange(len(keep))

    def renumbered(edits):
        return tuple(
            replace(
                e,
                row_groups=_renumber(e.row_groups, mapping),
                col_groups=_renumber(e.col_groups, mapping),
            )
            for e in edits
        )

    layers = []
    for layer in units.layers:
        edits = renumbered(layer.edits)
        layers.append(
            replace(
                layer,
                row_groups=_renumber(layer.row_groups, mapping),
                col_groups=_renumber(layer.col_groups, mapping),
                edits=edits,
            )
        )
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for group, reason in sorted(reasons.items()):
        counts[(layer_of(units.group_names[group]), reason)] += 1
    skipped = units.skipped + tuple(
        Skip(node=node, count=count, reason=reason) for (node, reason), count in counts.items()
    )
    names = tuple(units.group_names[g] for g in keep)
    return replace(
        units, layers=tuple(layers), group_names=names, skipped=skipped,
        edits=renumbered(units.edits),
    )  # fmt: skip
