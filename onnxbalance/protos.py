"""Copying ONNX protos field by field, so that large tensors are copied only when wanted."""

from __future__ import annotations

from collections.abc import Callable

import onnx

_CONTAINERS = {
    d.full_name
    for d in (
        onnx.ModelProto.DESCRIPTOR,
        onnx.GraphProto.DESCRIPTOR,
        onnx.NodeProto.DESCRIPTOR,
        onnx.AttributeProto.DESCRIPTOR,
        onnx.FunctionProto.DESCRIPTOR,
        onnx.TrainingInfoProto.DESCRIPTOR,
        onnx.SparseTensorProto.DESCRIPTOR,
    )
}
_TENSOR = onnx.TensorProto.DESCRIPTOR.full_name


def map_tensors(message, fn: Callable[[onnx.TensorProto], onnx.TensorProto]):
    """A copy of ``message`` with every TensorProto inside it replaced by ``fn(tensor)``.

    Walks the message's fields generically, so initializers, Constant attributes, sparse
    tensors, subgraphs and functions are all covered, and copies everything else as is. The
    input is never modified and tensor data is never copied here (``fn`` decides).
    """
    out = type(message)()
    for field, value in message.ListFields():
        kind = field.message_type.full_name if field.message_type is not None else None
        target = getattr(out, field.name)
        if kind is None:
            if is_repeated(field):
                target.extend(value)
            else:
                setattr(out, field.name, value)
        elif kind == _TENSOR:
            if is_repeated(field):
                target.extend(fn(t) for t in value)
            else:
                target.CopyFrom(fn(value))
        elif kind in _CONTAINERS:
            if is_repeated(field):
                target.extend(map_tensors(m, fn) for m in value)
            else:
                target.CopyFrom(map_tensors(value, fn))
        elif is_repeated(field):
            target.extend(value)
        else:
            target.CopyFrom(value)
    return out


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy every field of the model except the main graph's initializers."""
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            copy_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            copy_field(out.graph, field, value)
    return out


def is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; older ones have .label
    return field.label == field.LABEL_REPEATED if repeated is None else repeated


def copy_field(target, field, value) -> None:
    """Set ``field`` of ``target`` to ``value`` (a field of another message of the same type)."""
    if is_repeated(field):
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)
