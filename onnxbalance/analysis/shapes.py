"""Static shapes of every tensor, from ONNX shape inference on a weight-free copy of the model.

Pass-through rules need shapes to map channels exactly (a Flatten spreads channel c over the
columns c*H*W .. (c+1)*H*W - 1, so H*W must be known) and ranks to read axis attributes. Shape
inference only needs the *values* of small integer tensors (Reshape targets, Slice bounds, ...),
so large floating-point initializers are replaced by graph inputs of the same type and shape:
no weight is copied and external data is never read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx

from .. import tensors
from .graph import bodies, constant_value

log = logging.getLogger(__name__)

Shape = tuple[int | None, ...]


class Shapes(dict[str, Shape]):
    """Tensor name -> shape, and in ``symbols`` the names shape inference gives a tensor's
    unknown sizes (None where it has none). One name means one size whatever the inputs are:
    ONNX names a graph input's dynamic sizes and carries the names along the ops that keep
    them, and calls each size it cannot tell ``unk__N``, a new name every time."""

    def __init__(self) -> None:
        super().__init__()
        self.symbols: dict[str, tuple[str | None, ...]] = {}


ScopeKey = tuple[tuple[int, str], ...]
"""Where a body sits: per nesting level, (position among its graph's nodes that hold bodies,
attribute label) as :func:`onnxbalance.analysis.graph.bodies` numbers them; () is the main
graph."""


def infer_shapes(model: onnx.ModelProto) -> Shapes:
    """Tensor name -> shape, None for each dimension that is not a known constant.

    Tensors whose rank cannot be inferred are absent. Never raises: a model that shape
    inference rejects yields the shapes it declares itself.
    """
    return infer_scoped_shapes(model)[()]


def infer_scoped_shapes(
    model: onnx.ModelProto, hints: Mapping[str, Shape] | None = None
) -> dict[ScopeKey, Shapes]:
    """:func:`infer_shapes` for the main graph (key ``()``) and for every If/Loop/Scan body
    (each holding the names the body declares itself; sibling bodies may reuse names).

    ``hints``: shapes of main-graph tensors that inference cannot work out alone (a Reshape
    whose target it cannot evaluate), from which it infers the shapes after them."""
    light = tensors.without_weights(model)
    data_prop = not _asks_for_absurd_sizes(model.graph)
    if not data_prop and not hints:  # said once, in the first round
        log.warning("a size of more than 2**40 is asked for: shapes inferred without their values")
    if hints:
        declared = [v for v in light.graph.value_info if v.name not in hints]
        del light.graph.value_info[:]
        light.graph.value_info.extend(declared)
        for name, shape in hints.items():
            light.graph.value_info.append(onnx.helper.make_tensor_value_info(name, 0, shape))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=data_prop)
    except Exception as error:  # noqa: BLE001 - inference is an aid; its failure is not fatal
        log.warning("shape inference failed (%s); using the shapes the model declares", error)
        inferred = light
    scoped = {(): _declared(inferred.graph, model.graph.initializer)}
    _add_bodies(inferred.graph, (), scoped)
    placeholders = _placeholders(model.graph)
    for shapes in scoped.values():
        for name, symbols in shapes.symbols.items():
            shapes.symbols[name] = tuple(None if s in placeholders else s for s in symbols)
    return scoped


def _placeholders(graph: onnx.GraphProto) -> set[str]:
    """Names a graph input gives two of its sizes: a word some exporters write for every
    dynamic size ('?', 'None'), which says nothing about which sizes are equal."""
    found = set()
    for value in graph.input:
        names = [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
        found.update(name for name in names if names.count(name) > 1)
    return found


_ABSURD_SIZE = 2**40
"""More entries along one axis than any tensor has. ONNX's data propagation builds the shapes
that targets ask for, so one flipped bit in a Reshape target (2**57 + 1, from a fuzzed model)
takes all memory before anything could refuse the model."""

# per op, the inputs that ask for sizes (or, for Range, make as many entries as they say)
_SIZE_INPUTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "Resize": (3,),
}
_SMALL = 64  # entries of a constant that can be a size list


def _asks_for_absurd_sizes(graph: onnx.GraphProto) -> bool:
    """Whether a constant given to an input in :data:`_SIZE_INPUTS`, in ``graph`` or its bodies,
    holds a size beyond :data:`_ABSURD_SIZE`."""
    constants = {t.name: t for t in graph.initializer}
    constants.update((n.output[0], v) for n in graph.node if (v := constant_value(n)) is not None)
    for node in graph.node:
        for slot in _SIZE_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            tensor = constants.get(node.input[slot]) if slot < len(node.input) else None
            if (
                tensor is None
                or tensor.data_type not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64)
                or tensors.is_external(tensor)
                or np.prod(tensor.dims) > _SMALL
            ):
                continue
            values = onnx.numpy_helper.to_array(tensor).astype(np.float64)
            if (np.abs(values) > _ABSURD_SIZE).any():
                return True
    return any(_asks_for_absurd_sizes(body) for _, _, _, body in bodies(graph))


def _add_bodies(graph: onnx.GraphProto, key: ScopeKey, scoped: dict[ScopeKey, Shapes]) -> None:
    for position, _, label, body in bodies(graph):
        inner = (*key, (position, label))
        scoped[inner] = _declared(body, body.initializer)
        _add_bodies(body, inner, scoped)


def _declared(graph: onnx.GraphProto, initializers) -> Shapes:
    shapes = Shapes()
    for value in (*graph.input, *graph.value_info, *graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            # a negative size is a dynamic one to onnxruntime (paddle2onnx writes -1)
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in dims
            )
            shapes.symbols[value.name] = tuple(d.dim_param or None for d in dims)
    for tensor in initializers:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes
