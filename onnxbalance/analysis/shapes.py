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

import onnx

from .. import tensors
from .graph import bodies

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
    if hints:
        declared = [v for v in light.graph.value_info if v.name not in hints]
        del light.graph.value_info[:]
        light.graph.value_info.extend(declared)
        for name, shape in hints.items():
            light.graph.value_info.append(onnx.helper.make_tensor_value_info(name, 0, shape))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as error:  # noqa: BLE001 - inference is an aid; its failure is not fatal
        log.warning("shape inference failed (%s); using the shapes the model declares", error)
        inferred = light
    scoped = {(): _declared(inferred.graph, model.graph.initializer)}
    _add_bodies(inferred.graph, (), scoped)
    return scoped


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
