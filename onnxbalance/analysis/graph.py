"""A read-only index over the main graph of an ONNX model.

Answers the questions every matching rule asks: who produces a tensor, who reads it (including
implicit reads from inside If/Loop/Scan bodies, which name outer tensors without listing them as
inputs), whether it is a constant (an initializer or the ``value`` of a Constant node), whether
such a constant can be overridden at run time (an initializer that is also a graph input), and
how many node inputs use it. Tensor data is read only on request and cached; shapes and dtypes
come from the protos without touching (possibly external) data. Shapes of computed tensors come
from :func:`onnxbalance.analysis.shapes.infer_shapes` when the caller passes them.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence

import numpy as np
import onnx

from .. import tensors
from ..unitgraph import TensorCopy

FLOAT_TYPES = frozenset(tensors.FLOAT_TYPES)


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable stand-in for unnamed nodes."""
    return node.name or f"{node.op_type}#{index}"


def dtype_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


_LISTED_VALUES = {
    "value_int": (onnx.TensorProto.INT64, False),
    "value_ints": (onnx.TensorProto.INT64, True),
    "value_float": (onnx.TensorProto.FLOAT, False),
    "value_floats": (onnx.TensorProto.FLOAT, True),
}
"""A Constant's attributes that hold numbers instead of a tensor: (dtype, a list or one)."""


def constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a Constant node holds in its ``value`` attribute, or one made of its
    ``value_int(s)``/``value_float(s)`` (the dynamo exporter without its optimiser writes sizes
    and scalars so; :func:`onnxbalance.rewrite.rewrite` turns an edited one into a ``value``);
    None for other nodes and other attributes (strings, sparse values)."""
    if node.op_type != "Constant" or not node.output:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
        if attr.name in _LISTED_VALUES:
            data_type, listed = _LISTED_VALUES[attr.name]
            values = onnx.helper.get_attribute_value(attr)
            values = list(values) if listed else [values]
            dims = [len(values)] if listed else []
            return onnx.helper.make_tensor(node.output[0], data_type, dims, values)
    return None


def bodies(graph: onnx.GraphProto) -> Iterator[tuple[int, int, str, onnx.GraphProto]]:
    """Every If/Loop/Scan body directly under ``graph``: (position among the nodes that hold
    bodies, the node's index, the attribute's name with ``[k]`` for a list of graphs, the body).
    Positions stay the same when Constant nodes are taken out (:mod:`.shapes`)."""
    position = 0
    for index, node in enumerate(graph.node):
        found = False
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found = True
                yield position, index, attr.name, attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                found = True
                for k, body in enumerate(attr.graphs):
                    yield position, index, f"{attr.name}[{k}]", body
        position += found


def fresh_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name.2``, ``name.3``, ... : the first that is not in ``taken``, which
    then holds it too."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}.{n}"
    taken.add(candidate)
    return candidate


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads but does not define itself: its implicit outer-scope inputs."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in subgraphs(node):
            used |= outer_names(sub)
        defined.update(node.output)
    used.update(v.name for v in graph.output)
    return used - defined


class GraphIndex:
    """Producers, consumers and constants of one (main) graph. Never mutates the graph.

    With ``copies``, the index describes the graph as it will be once they are made: each
    reader names its copy, which is a constant (the nodes renamed are copies of the protos).
    """

    def __init__(
        self,
        graph: onnx.GraphProto,
        shapes: dict[str, tuple[int | None, ...]] | None = None,
        copies: Sequence[TensorCopy] = (),
    ) -> None:
        self.graph = graph
        self.shapes = shapes or {}
        self.symbols: dict[str, tuple[str | None, ...]] = getattr(shapes, "symbols", {})
        self.nodes = list(graph.node)
        for copy in copies:
            for i, slot in copy.readers:
                if self.nodes[i] is graph.node[i]:
                    self.nodes[i] = onnx.NodeProto()
                    self.nodes[i].CopyFrom(graph.node[i])
                self.nodes[i].input[slot] = copy.name
        self.names = [node_name(node, i) for i, node in enumerate(self.nodes)]
        self.graph_inputs = frozenset(v.name for v in graph.input)
        self.graph_outputs = frozenset(v.name for v in graph.output)
        self.producer: dict[str, int] = {}
        # (node index, input slot); slot -1 marks a read from inside the node's subgraphs
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        self.with_subgraphs: list[int] = []
        self.implicit: dict[int, list[str]] = {}  # outer tensors read inside a node's subgraphs
        self._initializers = {t.name: t for t in graph.initializer}
        self._initializers.update((copy.name, copy.value) for copy in copies)
        self._sources = {copy.name: copy.source for copy in copies}
        self._copied_reads = collections.Counter(
            copy.source for copy in copies for _ in copy.readers
        )
        self.sparse = frozenset(t.values.name for t in graph.sparse_initializer)
        self._constant_values: dict[str, onnx.TensorProto] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._order: list[int] | None = None
        for i, node in enumerate(self.nodes):
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((i, slot))
            implicit: set[str] = set()
            for sub in subgraphs(node):
                implicit |= outer_names(sub)
            if any(True for _ in subgraphs(node)):
                self.with_subgraphs.append(i)
            for name in sorted(implicit):
                self.consumers.setdefault(name, []).append((i, -1))
            if implicit:
                self.implicit[i] = sorted(implicit)
            for name in node.output:
                if name:
                    self.producer[name] = i
            value = constant_value(node)
            if value is not None:
                self._constant_values[node.output[0]] = value

    def topological_order(self) -> list[int]:
        """Node indices, producers first. ONNX requires the stored order to be one; the runtime
        does not, so a graph stored out of order is analysed in an order that is."""
        if self._order is not None:
            return self._order
        self._order = self._sorted()
        return self._order

    def _sorted(self) -> list[int]:
        inputs = [
            {name for name in node.input if name in self.producer}
            | {name for name in self.implicit.get(i, ()) if name in self.producer}
            for i, node in enumerate(self.nodes)
        ]
        if all(self.producer[name] < i for i, names in enumerate(inputs) for name in names):
            return list(range(len(self.nodes)))
        waiting = [len(names) for names in inputs]
        ready = [i for i, count in enumerate(waiting) if count == 0]
        order: list[int] = []
        while ready:
            i = ready.pop()
            order.append(i)
            for name in self.nodes[i].output:
                for j in {j for j, _ in self.uses(name)} if name else ():
                    waiting[j] -= 1
                    if waiting[j] == 0:
                        ready.append(j)
        placed = set(order)
        return order + [i for i in range(len(self.nodes)) if i not in placed]  # cycles: invalid

    def uses(self, name: str) -> list[tuple[int, int]]:
        return self.consumers.get(name, [])

    def n_uses(self, name: str) -> int:
        """Node inputs reading ``name`` (a node reading it twice counts twice)."""
        return len(self.uses(name))

    def stored_name(self, name: str) -> str:
        """The tensor a private copy was made of (``name`` itself for any other)."""
        return self._sources.get(name, name)

    def n_stored_uses(self, name: str) -> int:
        """Node inputs that read the stored tensor ``name`` in the file, those given private
        copies of it included."""
        return self.n_uses(name) + self._copied_reads[name]

    def is_constant(self, name: str) -> bool:
        return name in self._initializers or name in self._constant_values

    def tensor_proto(self, name: str) -> onnx.TensorProto | None:
        """The stored tensor behind a constant: an initializer or a Constant node's value
        (:func:`constant_value`)."""
        if name in self._initializers:
            return self._initializers[name]
        return self._constant_values.get(name)

    def is_overridable(self, name: str) -> bool:
        """An initializer that is also a graph input: its stored value is only a default."""
        return name in self._initializers and name in self.graph_inputs

    def dims(self, name: str) -> tuple[int | None, ...] | None:
        """A computed or stored tensor's shape (None per unknown dimension), None if unknown."""
        shape = self.shape(name)
        return shape if shape is not None else self.shapes.get(name)

    def symbol(self, name: str, axis: int) -> str | None:
        """The name shape inference gives an unknown size of a tensor (``shapes`` a
        :class:`~onnxbalance.analysis.shapes.Shapes`), None if it has none."""
        symbols = self.symbols.get(name, ())
        return symbols[axis] if -len(symbols) <= axis < len(symbols) else None

    def rank(self, name: str) -> int | None:
        dims = self.dims(name)
        return None if dims is None else len(dims)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """A constant's stored shape (None for computed tensors)."""
        proto = self.tensor_proto(name)
        return None if proto is None else tuple(int(d) for d in proto.dims)

    def elem_type(self, name: str) -> int | None:
        proto = self.tensor_proto(name)
        return None if proto is None else proto.data_type

    def array(self, name: str) -> np.ndarray:
        """The constant's value (read once, cached). Raises KeyError for non-constants."""
        if name not in self._arrays:
            proto = self.tensor_proto(name)
            if proto is None:
                raise KeyError(name)
            # external data stays on disk, memory-mapped, until a computation reads it
            array = tensors.read_array(proto)
            array.setflags(write=False)  # handed out as views (layer weights): keep it intact
            self._arrays[name] = array
        return self._arrays[name]

    def producer_of(self, name: str) -> onnx.NodeProto | None:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i]
