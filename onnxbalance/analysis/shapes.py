"""Static shapes of every tensor, from ONNX shape inference on a weight-free copy of the model.

Pass-through rules need shapes to map channels exactly (a Flatten spreads channel c over the
columns c*H*W .. (c+1)*H*W - 1, so H*W must be known) and ranks to read axis attributes. Shape
inference only needs the *values* of small integer tensors (Reshape targets, Slice bounds, ...),
so large floating-point initializers are replaced by graph inputs of the same type and shape:
no weight is copied and external data is never read.
"""

from __future__ import annotations

import logging

import onnx

from .graph import FLOAT_TYPES

log = logging.getLogger(__name__)

Shape = tuple[int | None, ...]
_KEEP_ELEMENTS = 1024  # initializers up to this size keep their values (shape constants)


def infer_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Tensor name -> shape, None for each dimension that is not a known constant.

    Tensors whose rank cannot be inferred are absent. Never raises: a model that shape
    inference rejects yields the shapes it declares itself.
    """
    light = _weight_free(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as error:  # noqa: BLE001 - inference is an aid; its failure is not fatal
        log.warning("shape inference failed (%s); using the shapes the model declares", error)
        inferred = light
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            )
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes


def _weight_free(model: onnx.ModelProto) -> onnx.ModelProto:
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            if field.type == field.TYPE_MESSAGE and not _repeated(field):
                getattr(light, field.name).CopyFrom(value)
            elif _repeated(field):
                getattr(light, field.name).extend(value)
            else:
                setattr(light, field.name, value)
    graph, source = light.graph, model.graph
    graph.name = source.name
    graph.input.extend(source.input)
    for node in source.node:
        value = _large_constant(node)
        if value is None:
            graph.node.append(node)
        else:  # a Constant holding a weight: its shape is all inference needs
            graph.input.append(
                onnx.helper.make_tensor_value_info(node.output[0], value.data_type, value.dims)
            )
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    declared = {v.name for v in source.input}
    for tensor in source.initializer:
        if _large(tensor):
            if tensor.name not in declared:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                )
        else:
            graph.initializer.append(tensor)
    return light


def _large(tensor: onnx.TensorProto) -> bool:
    size = 1
    for d in tensor.dims:
        size *= d
    return tensor.data_type in FLOAT_TYPES and size > _KEEP_ELEMENTS


def _large_constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and _large(attr.t):
            return attr.t
    return None


def _repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; older ones have .label
    if repeated is None:
        repeated = field.label == field.LABEL_REPEATED
    return repeated
