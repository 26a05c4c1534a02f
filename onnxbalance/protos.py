"""Copying ONNX protos field by field, so that large tensors are copied only when wanted."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

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
        if kind == _TENSOR:
            mapped = [fn(t) for t in value] if is_repeated(field) else fn(value)
        elif kind in _CONTAINERS:
            mapped = (
                [map_tensors(m, fn) for m in value]
                if is_repeated(field)
                else map_tensors(value, fn)
            )
        else:
            mapped = value
        copy_field(out, field, mapped)
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


WEIGHTS_AS_CONSTANTS_IR = 4
"""The first IR version that lets an initializer stay out of the graph inputs."""


def weight_inputs(graph: onnx.GraphProto) -> tuple[str, ...]:
    """The graph's inputs that name one of its initializers (weights a caller may override),
    in input order."""
    weights = {tensor.name for tensor in graph.initializer}
    return tuple(value.name for value in graph.input if value.name in weights)


def drop_weight_inputs(model: onnx.ModelProto) -> tuple[str, ...]:
    """Remove, in place, the main graph's :func:`weight_inputs`, so that those weights are
    constants, and raise the IR version to 4 if it was lower (IR 3 requires every initializer
    to be listed as an input; later exporters list them on request, such as torch's
    ``keep_initializers_as_inputs``). Returns the names removed."""
    dropped = weight_inputs(model.graph)
    if dropped:
        kept = [value for value in model.graph.input if value.name not in dropped]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, WEIGHTS_AS_CONSTANTS_IR)
    return dropped


def copy_except(message, skipped: frozenset[str]):
    """A copy of ``message`` without the fields named in ``skipped``, which are never read.

    ``ListFields`` would read every field, and reading a bytes field (a tensor's ``raw_data``)
    copies it.
    """
    out = type(message)()
    for field in message.DESCRIPTOR.fields:
        if field.name in skipped:
            continue
        if is_repeated(field):
            value = getattr(message, field.name)
            if len(value):
                getattr(out, field.name).extend(value)
        elif message.HasField(field.name):
            copy_field(out, field, getattr(message, field.name))
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


_LENGTH_DELIMITED = 2
_FIXED_SIZES = {1: 8, 5: 4}  # wire types 1 (64-bit) and 5 (32-bit)
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number

Piece = bytes | str
"""A piece of a serialized model: bytes as they are, or the name of a tensor whose raw data the
writer puts in that place."""


def serialized_pieces(model: onnx.ModelProto, raw_sizes: Mapping[str, int]) -> list[Piece]:
    """``model`` serialized, with the raw data of some main-graph initializers left as holes.

    ``raw_sizes`` maps those initializers' names to their data's byte count; in ``model`` they
    are stubs without values. Writing the pieces in order, each name replaced by exactly that
    many bytes of data, gives the bytes ``SerializeToString`` would give for the model with the
    data in place (fields in number order), so a rescaled weight can go from its producer to
    the file a block at a time and the whole model is never one message in memory.

    Raises:
        KeyError: a name in ``raw_sizes`` is not an initializer of the main graph.
    """
    if not raw_sizes:
        return [model.SerializeToString(deterministic=True)]
    missing = set(raw_sizes) - {t.name for t in model.graph.initializer}
    if missing:
        raise KeyError(f"not initializers of the main graph: {sorted(missing)}")
    graph_head, graph_tail = _split(model.graph, _INITIALIZER)
    initializers: list[Piece] = []
    for tensor in model.graph.initializer:
        if tensor.name in raw_sizes:
            head, tail = _split(tensor, _RAW_DATA)
            nbytes = raw_sizes[tensor.name]
            data_key = _key(_RAW_DATA) + _varint(nbytes)
            size = len(head) + len(data_key) + nbytes + len(tail)
            initializers += [_key(_INITIALIZER) + _varint(size) + head + data_key, tensor.name]
            initializers.append(tail)
        else:
            encoded = tensor.SerializeToString(deterministic=True)
            initializers.append(_key(_INITIALIZER) + _varint(len(encoded)) + encoded)
    graph_size = len(graph_head) + len(graph_tail)
    graph_size += sum(raw_sizes[p] if isinstance(p, str) else len(p) for p in initializers)
    model_head, model_tail = _split(model, _GRAPH)
    opening = model_head + _key(_GRAPH) + _varint(graph_size) + graph_head
    return [opening, *initializers, graph_tail + model_tail]


def initializer_raw_spans(data: bytes) -> list[tuple[int, int] | None]:
    """Where each main-graph initializer's ``raw_data`` lies in the serialized model ``data``.

    One entry per initializer, in order: (offset, length), or None when it has no raw data.
    Parsing rules are protobuf's: graph fields that occur more than once merge (initializers
    add up), and the last ``raw_data`` of a tensor wins. Lets a caller view the bytes it read
    instead of copying them out of the parsed message.

    Raises:
        ValueError: ``data`` uses the deprecated group encoding or ends inside a field.
    """
    spans: list[tuple[int, int] | None] = []
    for number, start, end in _fields(data, 0, len(data)):
        if number != _GRAPH:
            continue
        for number, tensor_start, tensor_end in _fields(data, start, end):
            if number != _INITIALIZER:
                continue
            span = None
            for number, raw_start, raw_end in _fields(data, tensor_start, tensor_end):
                if number == _RAW_DATA:
                    span = (raw_start, raw_end - raw_start)
            spans.append(span)
    return spans


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(number, start, end) of each length-delimited field in ``data[start:end]``."""
    position = start
    while position < end:
        key, position = _read_varint(data, position)
        wire_type = key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(data, position)
            if position + length > end:
                raise ValueError("a field runs past the end of its message")
            yield key >> 3, position, position + length
            position += length
        elif wire_type == 0:
            _, position = _read_varint(data, position)
        elif wire_type in _FIXED_SIZES:
            position += _FIXED_SIZES[wire_type]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _split(message, number: int) -> tuple[bytes, bytes]:
    """``message`` serialized as two parts: its fields numbered below ``number``, and above."""
    head, tail = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number != number:
            copy_field(head if field.number < number else tail, field, value)
    return head.SerializeToString(deterministic=True), tail.SerializeToString(deterministic=True)


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
