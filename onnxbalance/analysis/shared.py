"""Private copies of shared and derived constants, so that each layer's factors have a tensor.

Exporters store bit-identical tensors once (zero-initialised biases read by many nodes, often
through ``Identity`` nodes) and write some constants as small subexpressions of stored ones
(paddle2onnx adds a conv bias as ``Reshape(bias, [1, C, 1, 1])``). Editing such a tensor in
place rescales every reader alike, so analysis first gives every reader its own *virtual* copy
(:func:`plan`): the reader's input is renamed, and the copy holds the source's value (folded
through the subexpression). After the units are known, :func:`settle` keeps only what the file
needs:

* a subexpression read by one layer alone, from a stored vector read by nothing else, is
  rescaled at that stored vector (paddle's ``Reshape(bias, [1, C, 1, 1])``);
* a copy whose reader needs no change is dropped (the reader keeps its original input);
* readers whose edits are identical share one copy; when all readers of a stored tensor agree
  and nothing else reads it (no graph output, no subgraph capture, no reader left without a
  copy), the tensor itself is edited once and no copy is made (unrolled steps, one layer
  applied twice);
* otherwise each distinct edit gets one private copy named ``<source>.<reader node>``.

Copies are made automatically for *small* tensors: at most one dimension longer than 1 (biases,
BatchNormalization parameters, per-channel constants) and at most :data:`SMALL_BYTES`. Larger
tensors (weight matrices) are copied only with ``copy_weights``; without it, a weight whose
readers need different factors stays shared, and :func:`settle` names it so that analysis runs
again with that weight refused. Subexpressions are folded for small results only. A constant
that is also a graph input (overridable at run time) is never copied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import onnx

from .. import tensors
from ..unitgraph import LinearUnits, ModelUnits, TensorCopy, TensorEdit
from .graph import FLOAT_TYPES, GraphIndex, fresh_name
from .ops import STANDARD_DOMAINS, attr

SMALL_BYTES = 4 << 20
"""Largest tensor copied without ``copy_weights`` (4 MiB: a million float32 channels)."""


def is_small(shape: Sequence[int], itemsize: int) -> bool:
    """A vector (at most one dimension longer than 1) of at most :data:`SMALL_BYTES`."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    return sum(d != 1 for d in shape) <= 1 and nbytes <= SMALL_BYTES


def _small_tensor(value: onnx.TensorProto) -> bool:
    return is_small(value.dims, tensors.numpy_dtype(value.data_type).itemsize)


def plan(graph: GraphIndex, refused: frozenset[str]) -> list[TensorCopy]:
    """One virtual copy per explicit node input that reads a shared or derived float constant
    (large ones too: :func:`settle` decides which copies the file keeps).

    ``refused``: stored tensors that stay shared (their readers need different factors and
    copying them is not allowed).
    """
    taken = _names(graph)
    copies = []
    for name, uses in list(graph.consumers.items()):
        readers = [(i, s) for i, s in uses if s >= 0 and i not in graph.with_subgraphs]
        if not readers or name in refused:
            continue
        found = _constant_value(graph, name)
        if found is None:
            continue
        value, derived = found  # a derived value is always small (see _constant_value)
        shared = len(uses) > 1 or name in graph.graph_outputs
        if value.data_type not in FLOAT_TYPES or not (derived or shared):
            continue
        for i, slot in readers:
            copy_name = fresh_name(f"{name}.{graph.names[i]}", taken)
            copies.append(TensorCopy(copy_name, name, ((i, slot),), value, stored=not derived))
    return copies


def settle(
    graph: GraphIndex,
    units: ModelUnits,
    weights: Sequence[str],
    copies: Sequence[TensorCopy],
    copy_weights: bool,
) -> tuple[ModelUnits, frozenset[str]]:
    """The copies the balanced file needs, with every edit renamed to the tensor it changes.
    ``weights`` names each layer's weight tensor (parallel to ``units.layers``).

    Returns the settled units and the stored tensors that need copies which are not allowed
    (large, without ``copy_weights``): analysis must run again with those refused.
    """
    edits = _edits_by_tensor(units)
    by_source: dict[str, list[TensorCopy]] = {}
    for copy in copies:
        by_source.setdefault(copy.source, []).append(copy)
    rename: dict[str, str | None] = {}  # copy name -> the tensor its edits go to (None: none)
    row_axes: dict[str, int] = {}  # copy name -> its edits' axis in that tensor, if another
    kept: list[TensorCopy] = []
    conflicts = set()
    for source, group in by_source.items():
        if _all_zero(group[0].value):  # zero biases: every factor leaves them as they are
            rename.update(dict.fromkeys((copy.name for copy in group), None))
            continue
        signatures: dict[tuple, list[TensorCopy]] = {}
        for copy in group:
            signature = _signature(edits.get(copy.name, []))
            if signature:
                signatures.setdefault(signature, []).append(copy)
            else:
                rename[copy.name] = source
        if not signatures:
            continue
        in_place = (
            len(signatures) == 1
            and len(next(iter(signatures.values()))) == len(group)
            and group[0].stored
            and len(group) == graph.n_uses(source)
            and source not in graph.graph_outputs
        )
        if in_place:
            for copy in group:
                rename[copy.name] = source
            continue
        origin = _exclusive_origin(graph, group, edits) if len(signatures) == 1 else None
        if origin is not None:
            tensor, axis = origin
            for copy in group:
                rename[copy.name] = tensor
                row_axes[copy.name] = axis
            continue
        if not copy_weights and not _small_tensor(group[0].value):
            conflicts.add(source)
            continue
        for same in signatures.values():
            first = same[0]
            readers = tuple(r for copy in same for r in copy.readers)
            kept.append(replace(first, readers=readers))
            rename.update({copy.name: first.name for copy in same})
    if conflicts:
        return units, frozenset(conflicts)
    return _renamed(units, weights, rename, row_axes, tuple(kept)), frozenset()


def _all_zero(value: onnx.TensorProto) -> bool:
    return not np.any(tensors.read_array(value))


def _exclusive_origin(
    graph: GraphIndex, group: Sequence[TensorCopy], edits: dict[str, list[TensorEdit]]
) -> tuple[str, int] | None:
    """(stored tensor, axis) where a derived vector's row edit can be made in place: the readers
    agree, every link from the stored vector to them has no other reader, no link is a graph
    output, and the vector keeps its entries in order (Reshape, Unsqueeze, Squeeze, Flatten,
    Identity, Cast and Transpose of a vector do; Expand does not). None otherwise."""
    first = group[0]
    if first.stored or len(group) != 1:
        return None
    if any(e.col_groups is not None or e.expand_to is not None for e in edits[first.name]):
        return None
    name = first.source
    while not graph.is_constant(name):
        if graph.n_uses(name) != 1 or name in graph.graph_outputs:
            return None
        node = graph.producer_of(name)
        if node is None or node.op_type not in FOLDS or node.op_type == "Expand":
            return None
        name = node.input[0]
    if graph.n_uses(name) != 1 or name in graph.graph_outputs or graph.is_overridable(name):
        return None
    dims = graph.shape(name) or ()
    if graph.tensor_proto(name) is None or not dims or not is_small(dims, 1):
        return None
    if int(np.prod(dims)) != int(np.prod(first.value.dims)):
        return None
    longer = [k for k, d in enumerate(dims) if d != 1]
    return name, longer[0] if longer else 0


def _renamed(
    units: ModelUnits,
    weights: Sequence[str],
    rename: dict[str, str | None],
    row_axes: dict[str, int],
    copies: tuple,
) -> ModelUnits:
    """Edits moved to their settled tensor; copies merged into one keep the first one's edits
    (they are identical); a layer that reads the same stored weight with the same units as an
    earlier one counts once in the norm, as the weight is stored once."""
    origin: dict[str, str] = {}  # settled tensor -> the copy (or tensor) whose edits it takes

    def settled(edits: Sequence[TensorEdit]) -> list[TensorEdit]:
        out = []
        for edit in edits:
            tensor = rename.get(edit.tensor, edit.tensor)
            if tensor is not None and origin.setdefault(tensor, edit.tensor) == edit.tensor:
                axis = row_axes.get(edit.tensor, edit.row_axis)
                out.append(replace(edit, tensor=tensor, row_axis=axis))
        return out

    layers: list[LinearUnits] = []
    moved: list[TensorEdit] = []
    by_weight: dict[str, LinearUnits] = {}
    for layer, weight in zip(units.layers, weights, strict=True):
        edits = settled(layer.edits)
        weight = rename.get(weight, weight) or weight
        twin = by_weight.setdefault(weight, layer)
        if twin is not layer and _same_layer(twin, layer):
            moved.extend(edits)
            continue
        layers.append(replace(layer, edits=tuple(edits)))
    return replace(
        units,
        layers=tuple(layers),
        edits=tuple(moved + settled(units.edits)),
        copies=units.copies + copies,
    )


def _same_layer(a: LinearUnits, b: LinearUnits) -> bool:
    return (
        np.array_equal(a.row_groups, b.row_groups)
        and np.array_equal(a.col_groups, b.col_groups)
        and a.weight.shape == b.weight.shape
        and (a.weight is b.weight or np.array_equal(a.weight, b.weight))
    )


def _edits_by_tensor(units: ModelUnits) -> dict[str, list[TensorEdit]]:
    edits: dict[str, list[TensorEdit]] = {}
    for edit in [e for layer in units.layers for e in layer.edits] + list(units.edits):
        edits.setdefault(edit.tensor, []).append(edit)
    return edits


def _signature(edits: Sequence[TensorEdit]) -> tuple:
    """What the edits do to their tensor, comparable across copies (empty: nothing moves)."""
    parts = []
    for edit in edits:
        rows = None if edit.row_groups is None else np.asarray(edit.row_groups)
        cols = None if edit.col_groups is None else np.asarray(edit.col_groups)
        if not any(g is not None and (g >= 0).any() for g in (rows, cols)):
            continue
        parts.append(
            (
                edit.row_axis,
                None if rows is None else rows.tobytes(),
                edit.col_axis,
                None if cols is None else (cols.shape, cols.tobytes()),
                edit.expand_to,
            )
        )
    return tuple(sorted(parts, key=repr))


def _names(graph: GraphIndex) -> set[str]:
    names = set(graph.producer) | set(graph.consumers) | set(graph.graph_inputs)
    names |= {t.name for t in graph.graph.initializer} | set(graph.graph_outputs)
    return names


# ------------------------------------------------------------------ constant subexpressions


_FOLDED_LINKS = 16
"""Most ops between a stored constant and a value folded from it: exporters write one or two
(paddle2onnx's Reshape of a bias, Identity nodes of de-duplicated constants)."""


def _constant_value(
    graph: GraphIndex, name: str, links: int = 0
) -> tuple[onnx.TensorProto, bool] | None:
    """(value, derived) of a constant: a stored one (derived False), or a small subexpression of
    one that :data:`FOLDS` computes in at most :data:`_FOLDED_LINKS` ops (derived True); None
    for anything computed from data, or longer chains."""
    if graph.is_constant(name):
        if graph.is_overridable(name) or name in graph.sparse:
            return None
        proto = graph.tensor_proto(name)
        return None if proto is None else (proto, False)
    node = graph.producer_of(name)
    if node is None or node.domain not in STANDARD_DOMAINS or node.op_type not in FOLDS:
        return None
    if name in graph.graph_outputs or not node.input or not node.input[0]:
        return None
    if links == _FOLDED_LINKS:
        return None
    found = _constant_value(graph, node.input[0], links + 1)
    if found is None:
        return None
    source = found[0]
    if not _small_tensor(source):
        return None
    operands = []
    for extra in node.input[1:]:
        if extra and not (graph.is_constant(extra) and not graph.is_overridable(extra)):
            return None
        operands.append(graph.array(extra) if extra else None)
    try:
        folded = FOLDS[node.op_type](node, tensors.read_array(source), operands)
    except (ValueError, IndexError, TypeError):
        return None  # a shape the op would refuse at run time: leave it to the runtime
    if folded is None:
        return None
    elem = source.data_type
    if node.op_type == "Cast":
        elem = int(attr(node, "to", 0))
        if elem not in FLOAT_TYPES:
            return None
    folded = np.ascontiguousarray(folded, dtype=tensors.numpy_dtype(elem))
    if not is_small(folded.shape, folded.dtype.itemsize):
        return None
    return tensors.make_tensor(name, folded, elem), True


def _reshape(node, x, operands):
    shape = [int(d) for d in np.asarray(operands[0]).ravel()]
    if not int(attr(node, "allowzero", 0)):
        shape = [x.shape[k] if d == 0 and k < x.ndim else d for k, d in enumerate(shape)]
    return x.reshape(shape)


def _axes(node, operands) -> list[int] | None:
    if operands and operands[0] is not None:
        return [int(a) for a in np.asarray(operands[0]).ravel()]
    axes = attr(node, "axes", None)
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(node, x, operands):
    axes = _axes(node, operands)
    if axes is None:
        return None
    rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(a % rank for a in axes)))


def _squeeze(node, x, operands):
    axes = _axes(node, operands)
    return np.squeeze(x) if axes is None else np.squeeze(x, tuple(a % x.ndim for a in axes))


def _transpose(node, x, operands):
    perm = attr(node, "perm", None)
    return np.transpose(x, None if perm is None else [int(p) for p in perm])


def _expand(node, x, operands):
    shape = tuple(int(d) for d in np.asarray(operands[0]).ravel())
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, shape))


def _flatten(node, x, operands):
    axis = int(attr(node, "axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


FOLDS: dict[str, Callable] = {
    "Identity": lambda node, x, operands: x,
    "Cast": lambda node, x, operands: x,  # the target dtype is applied by the caller
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Transpose": _transpose,
    "Expand": _expand,
    "Flatten": _flatten,
}
"""Shape-only ops folded over constants: op -> f(node, value, other constant inputs)."""
