"""Hostile variants of valid models, for the fuzz test.

Each mutation takes a seeded ``random.Random``, a valid model and a folder, writes one damaged
model file (and its external data when it has any) into the folder and returns its path and a
short description. Byte-level mutations damage the serialized file; structural ones build
models that parse but lie (sizes, dims, graph wiring, values, external references).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from mlp_models import set_external_entry
from onnx import helper

Mutation = Callable[[random.Random, onnx.ModelProto, Path], tuple[Path, str]]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def _write(model: onnx.ModelProto, folder: Path, name: str = "in.onnx") -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _save_external(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "in.onnx"
    onnx.save_model(
        _copy(model),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="in.onnx.bin",
        size_threshold=0,
    )
    return path


def _weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if len(t.dims) >= 1]


# --- byte level ---------------------------------------------------------------------------


def bit_flips(rng, model, folder):
    data = bytearray(model.SerializeToString())
    count = rng.choice([1, 2, 8, 64])
    for _ in range(count):
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
    path = folder / "in.onnx"
    path.write_bytes(bytes(data))
    return path, f"{count} bit flips"


def truncation(rng, model, folder):
    data = model.SerializeToString()
    cut = rng.randrange(len(data))
    path = folder / "in.onnx"
    path.write_bytes(data[:cut])
    return path, f"truncated to {cut} of {len(data)} bytes"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def random_field(rng, model, folder):
    """Append a well-formed protobuf field with a random number and wire type at top level."""
    number = rng.choice([1, 2, 3, 7, 8, 14, 20, 999, 2**20])
    wire = rng.choice([0, 1, 2, 5])
    key = _varint(number << 3 | wire)
    if wire == 0:
        value = _varint(rng.getrandbits(rng.choice([1, 7, 32, 63])))
    elif wire == 1:
        value = struct.pack("<Q", rng.getrandbits(64))
    elif wire == 5:
        value = struct.pack("<I", rng.getrandbits(32))
    else:
        payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 3, 40])))
        value = _varint(len(payload)) + payload
    path = folder / "in.onnx"
    path.write_bytes(model.SerializeToString() + key + value)
    return path, f"field {number} wire type {wire} appended"


def garbage(rng, model, folder):
    path = folder / "in.onnx"
    path.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 17, 500]))))
    return path, "random bytes"


# --- structure ----------------------------------------------------------------------------


def huge_dims(rng, model, folder):
    model = _copy(model)
    tensor = rng.choice(_weights(model))
    dims = rng.choice([[2**40, 2**40], [2**31, 3], [0, 5], [-1, 4], [2**62]])
    del tensor.dims[:]
    tensor.dims.extend(dims)
    return _write(model, folder), f"{tensor.name} declares dims {dims}"


def non_finite_weights(rng, model, folder):
    model = _copy(model)
    tensor = rng.choice(_weights(model))
    array = onnx.numpy_helper.to_array(tensor).copy()
    flat = array.reshape(-1)
    flat[rng.randrange(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    return _write(model, folder), f"{tensor.name} holds a non-finite value"


def extreme_weight(rng, model, folder):
    """One finite weight at the edge of its dtype's range, or far below one: a legal model that
    may overflow inside, before or after balancing."""
    model = _copy(model)
    tensor = rng.choice(_weights(model))
    array = onnx.numpy_helper.to_array(tensor).copy()
    info = np.finfo(array.dtype)
    magnitude = rng.choice(
        [info.max, info.max / 16, np.sqrt(info.max), info.tiny, info.smallest_subnormal]
    )
    flat = array.reshape(-1)
    flat[rng.randrange(flat.size)] = rng.choice([1, -1]) * magnitude
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    return _write(model, folder), f"{tensor.name} holds {flat.max():.3g} / {flat.min():.3g}"


def _readers(nodes) -> list[int]:
    """Positions of the nodes with at least one input (not Constant and the like)."""
    return [k for k, node in enumerate(nodes) if node.input]


def cycle(rng, model, folder):
    model = _copy(model)
    nodes = model.graph.node
    first = rng.choice([k for k in _readers(nodes) if k < len(nodes) - 1])
    later = rng.randrange(first + 1, len(nodes))
    nodes[first].input[0] = nodes[later].output[0]
    return _write(model, folder), f"{nodes[first].name} reads {nodes[later].name}'s output"


def dangling_input(rng, model, folder):
    model = _copy(model)
    node = model.graph.node[rng.choice(_readers(model.graph.node))]
    slot = rng.randrange(len(node.input))
    node.input[slot] = "nowhere"
    return _write(model, folder), f"{node.name} input {slot} is undefined"


def wrong_tensor_size(rng, model, folder):
    model = _copy(model)
    tensor = rng.choice(_weights(model))
    raw = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
    change = rng.choice(["short", "long", "dims"])
    if change == "short":
        tensor.raw_data = raw[: rng.randrange(len(raw))]
    elif change == "long":
        tensor.raw_data = raw + b"\0" * rng.choice([1, 4, 64])
    else:
        tensor.raw_data = raw
        tensor.dims[0] += rng.choice([-1, 1]) if tensor.dims[0] > 1 else 1
    return _write(model, folder), f"{tensor.name} stored size is wrong ({change})"


def wrong_type(rng, model, folder):
    model = _copy(model)
    tensor = rng.choice(_weights(model))
    tensor.data_type = rng.choice([onnx.TensorProto.INT64, onnx.TensorProto.STRING, 0, 9999])
    return _write(model, folder), f"{tensor.name} has element type {tensor.data_type}"


def removed_initializer(rng, model, folder):
    model = _copy(model)
    index = rng.randrange(len(model.graph.initializer))
    name = model.graph.initializer[index].name
    del model.graph.initializer[index]
    return _write(model, folder), f"initializer {name} removed"


def duplicate_initializer(rng, model, folder):
    model = _copy(model)
    tensor = rng.choice(_weights(model))
    model.graph.initializer.append(tensor)
    return _write(model, folder), f"initializer {tensor.name} twice"


def unknown_op(rng, model, folder):
    model = _copy(model)
    node = rng.choice(list(model.graph.node))
    node.op_type = rng.choice(["NoSuchOp", "Gemm", "Relu", "Conv", ""])
    return _write(model, folder), f"{node.name} becomes {node.op_type or 'empty'}"


_BAD_ATTRIBUTES = {
    "Gemm": [
        ("transB", 7),
        ("alpha", float("nan")),
        ("alpha", 0.0),
        ("beta", float("inf")),
        ("transA", 1),
    ],
    "Conv": [
        ("group", 0),
        ("group", 3),
        ("strides", [0, 0]),
        ("pads", [-1, 0, 0, 0]),
        ("dilations", [0, 1]),
        ("kernel_shape", [5, 5]),
        ("auto_pad", "BOGUS"),
    ],
    "BatchNormalization": [("epsilon", -1.0), ("epsilon", float("nan")), ("training_mode", 1)],
    "Concat": [("axis", 7), ("axis", -9)],
    # ops without attributes get one they do not have
    "MatMul": [("transB", 1)],
    "Relu": [("alpha", 0.5)],
}


def bad_attribute(rng, model, folder):
    model = _copy(model)
    node = rng.choice([n for n in model.graph.node if n.op_type in _BAD_ATTRIBUTES])
    del node.attribute[:]
    node.attribute.append(helper.make_attribute(*rng.choice(_BAD_ATTRIBUTES[node.op_type])))
    return _write(model, folder), f"{node.name} gets {node.attribute[0].name}"


def bad_opset(rng, model, folder):
    model = _copy(model)
    model.opset_import[0].version = rng.choice([0, 1, 99, -3])
    model.ir_version = rng.choice([model.ir_version, 0, 99])
    return _write(model, folder), f"opset {model.opset_import[0].version} ir {model.ir_version}"


# --- external data ------------------------------------------------------------------------


def _external_entries(rng, model, folder):
    path = _save_external(model, folder)
    stored = onnx.load(path, load_external_data=False)
    tensor = rng.choice(_weights(stored))
    return path, stored, tensor


def external_escape(rng, model, folder):
    path, stored, tensor = _external_entries(rng, model, folder)
    location = rng.choice(["../in.onnx.bin", "/etc/passwd", "sub/../../x", "", "missing.bin"])
    set_external_entry(tensor, "location", location)
    _write(stored, folder)
    return path, f"{tensor.name} external location {location!r}"


def external_wrong_size(rng, model, folder):
    path, stored, tensor = _external_entries(rng, model, folder)
    key = rng.choice(["length", "offset"])
    value = rng.choice(["-1", "3", "99999999", "x", str(2**63)])
    set_external_entry(tensor, key, value)
    _write(stored, folder)
    return path, f"{tensor.name} external {key}={value}"


def external_truncated_file(rng, model, folder):
    path = _save_external(model, folder)
    data = folder / "in.onnx.bin"
    data.write_bytes(data.read_bytes()[: rng.randrange(data.stat().st_size)])
    return path, "external data file truncated"


MUTATIONS: dict[str, Mutation] = {
    f.__name__: f
    for f in (
        bit_flips,
        truncation,
        random_field,
        garbage,
        huge_dims,
        non_finite_weights,
        extreme_weight,
        cycle,
        dangling_input,
        wrong_tensor_size,
        wrong_type,
        removed_initializer,
        duplicate_initializer,
        unknown_op,
        bad_attribute,
        bad_opset,
        external_escape,
        external_wrong_size,
        external_truncated_file,
    )
}
