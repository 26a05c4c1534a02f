"""If/Loop/Scan bodies, analysed like the main graph and merged into one ModelUnits.

A body is a graph of its own. Its inputs (a Loop's iteration count and carried state, a Scan's
slices) and its outputs are boundaries like a graph's inputs and outputs: units reaching them
stay fixed. So every reader of a hidden unit found in a body lies in that body, and rescaling it
there is exact for the same reason as in the main graph (docs/algorithm.md §1); a Loop or Scan
runs the same rescaled function at every iteration.

Tensors a body reads from enclosing scopes (captures): an outer activation carries no unit into
the body (the outer analysis fixes its units, "used inside the subgraph"); an outer constant is a
weight like a local one, but shared: it is edited in place only when the one layer being
rescaled is its only reader in the whole model. Uses are counted over the whole model, by name,
for that reason: sibling bodies may define the same name, and such a name, read in two places,
is never edited.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import onnx

from ..protos import weight_inputs
from ..unitgraph import FIXED, ModelUnits, TensorEdit
from .graph import GraphIndex, bodies, constant_value, node_name
from .shapes import ScopeKey, Shape


class BodyIndex(GraphIndex):
    """A body's index that also sees the constants of its enclosing scopes, and counts every
    tensor's uses over the whole model."""

    def __init__(
        self,
        body: onnx.GraphProto,
        shapes: dict[str, Shape],
        captured: dict[str, onnx.TensorProto],
        overridable: frozenset[str],
        model_uses: collections.Counter[str],
    ) -> None:
        super().__init__(body, shapes)
        defined = set(self.producer) | set(self.graph_inputs) | set(self._initializers)
        self._captured = {k: v for k, v in captured.items() if k not in defined}
        self._overridable = overridable
        self._model_uses = model_uses

    def is_constant(self, name: str) -> bool:
        return super().is_constant(name) or name in self._captured

    def tensor_proto(self, name: str) -> onnx.TensorProto | None:
        proto = super().tensor_proto(name)
        return proto if proto is not None else self._captured.get(name)

    def is_overridable(self, name: str) -> bool:
        return super().is_overridable(name) or (
            name in self._captured and name in self._overridable
        )

    def n_uses(self, name: str) -> int:
        return max(super().n_uses(name), self._model_uses[name])


def body_indexes(
    model: onnx.ModelProto, shapes: dict[ScopeKey, dict[str, Shape]]
) -> Iterator[tuple[str, BodyIndex]]:
    """Every body of the model, nested ones too, with its path (``If 'name'/then_branch``)."""
    graph = model.graph
    if next(bodies(graph), None) is None:
        return  # no body: no need to count the uses of every tensor
    overridable = frozenset(weight_inputs(graph))
    scope = _Scope(shapes, overridable, model_uses(graph))
    yield from _walk(graph, (), "", _constants(graph, {}), shapes[()], scope)


@dataclasses.dataclass(frozen=True)
class _Scope:
    shapes: dict[ScopeKey, dict[str, Shape]]
    overridable: frozenset[str]
    uses: collections.Counter[str]


def _walk(
    graph: onnx.GraphProto,
    key: ScopeKey,
    prefix: str,
    visible: dict[str, onnx.TensorProto],
    visible_shapes: dict[str, Shape],
    scope: _Scope,
) -> Iterator[tuple[str, BodyIndex]]:
    for position, i, label, body in bodies(graph):
        node = graph.node[i]
        inner = (*key, (position, label))
        shapes = {**visible_shapes, **scope.shapes.get(inner, {})}
        path = f"{prefix}{node.op_type} '{node_name(node, i)}'/{label}"
        yield path, BodyIndex(body, shapes, visible, scope.overridable, scope.uses)
        yield from _walk(body, inner, f"{path}/", _constants(body, visible), shapes, scope)


def _constants(
    graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto]
) -> dict[str, onnx.TensorProto]:
    """The constants visible inside ``graph``'s bodies: its own and those of enclosing scopes
    it does not shadow."""
    shadowed = {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    visible = {k: v for k, v in outer.items() if k not in shadowed}
    visible.update((t.name, t) for t in graph.initializer)
    for node in graph.node:
        value = constant_value(node)
        if value is not None:
            visible[node.output[0]] = value
    return visible


def model_uses(graph: onnx.GraphProto) -> collections.Counter[str]:
    """Node inputs and graph outputs naming each tensor, in ``graph`` and all its bodies."""
    uses: collections.Counter[str] = collections.Counter(v.name for v in graph.output)
    for node in graph.node:
        uses.update(name for name in node.input if name)
    for _, _, _, body in bodies(graph):
        uses.update(model_uses(body))
    return uses


def merged(parts: Sequence[tuple[str, ModelUnits]]) -> ModelUnits:
    """One ModelUnits from the main graph's (prefix "") and each body's, the body's layers,
    groups and skips named after the body, its group indices shifted after the previous ones."""
    if len(parts) == 1:
        return parts[0][1]
    layers, skipped, edits, names = [], [], [], []
    offset = 0
    for prefix, units in parts:
        names.append((prefix, units.group_names))
        for layer in units.layers:
            layers.append(
                dataclasses.replace(
                    layer,
                    name=prefix + layer.name,
                    row_groups=_shifted(layer.row_groups, offset),
                    col_groups=_shifted(layer.col_groups, offset),
                    edits=tuple(_shifted_edit(e, offset) for e in layer.edits),
                )
            )
        skipped += [dataclasses.replace(s, node=prefix + s.node) for s in units.skipped]
        edits += [_shifted_edit(e, offset) for e in units.edits]
        offset += units.n_groups
    # clips are replaced in the main graph only (``parts[0]``, whose groups are not shifted)
    clips = parts[0][1].clips
    behind = sum(units.units_behind_clips for _, units in parts)
    copies = parts[0][1].copies  # the main graph's (bodies get none)
    return ModelUnits(
        tuple(layers), _Chained(names), tuple(skipped), tuple(edits), clips, behind, copies
    )


def _shifted(groups: np.ndarray | None, offset: int) -> np.ndarray | None:
    if groups is None or offset == 0:
        return groups
    groups = np.asarray(groups, dtype=np.int64)
    return np.where(groups == FIXED, FIXED, groups + offset)


def _shifted_edit(edit: TensorEdit, offset: int) -> TensorEdit:
    return dataclasses.replace(
        edit,
        row_groups=_shifted(edit.row_groups, offset),
        col_groups=_shifted(edit.col_groups, offset),
    )


class NameSequence(Sequence[str]):
    """Scale-group names made when read, equal to any sequence of the same strings."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


class _Chained(NameSequence):
    """The group names of all scopes one after the other, each with its scope's path in front,
    made when read (a model may have millions of groups)."""

    def __init__(self, parts: list[tuple[str, Sequence[str]]]) -> None:
        self._parts = parts
        self._ends = np.cumsum([len(names) for _, names in parts])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[k] for k in range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self._ends, index, side="right"))
        prefix, names = self._parts[part]
        return prefix + names[index - (int(self._ends[part - 1]) if part else 0)]
