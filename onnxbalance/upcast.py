"""Models with their floating tensors widened, for verification in onnxruntime.

:func:`to_float32`: onnxruntime has no CPU kernels for bfloat16 Gemm/MatMul/Conv. Every bfloat16
value is exactly a float32 value (bfloat16 is float32 with the low 16 mantissa bits dropped), so
converting the stored tensors and the declared types gives a model that computes, in float32
arithmetic, the function the bfloat16 weights define. Running the original and the balanced
model through the same conversion compares them fairly: both are evaluated the same way, and the
only difference left is the rounding of the rescaled weights to bfloat16.

:func:`to_float32_by_casts`: the same function with the stored bfloat16 weights left as they are,
each converted by a Cast node where it is read, so onnxruntime need not hold a float32 copy of
them all.

:func:`widen`: the same to float32 or float64 (:func:`wider_type`), also exact. It serves when
the input model overflows its own dtype on the test inputs and the balanced one does not
(rescaling moves magnitudes between layers; that is what it is for): in the wider type neither
overflows, and the two functions can be compared.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxbalance import protos, tensors
from onnxbalance.analysis.graph import fresh_name, outer_names, subgraphs

BF16 = onnx.TensorProto.BFLOAT16
F16 = onnx.TensorProto.FLOAT16
F32 = onnx.TensorProto.FLOAT
F64 = onnx.TensorProto.DOUBLE


def uses(model: onnx.ModelProto, *data_types: int) -> bool:
    """Whether any stored tensor, declared value or Cast target has one of these element types."""
    if any(t.data_type in data_types for t in tensors.iter_tensors(model)):
        return True
    graph = model.graph
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    if any(v.type.tensor_type.elem_type in data_types for v in values):
        return True
    return any(
        a.name == "to" and a.i in data_types
        for n in graph.node
        for a in n.attribute
        if a.type == a.INT
    )


def _types(graph: onnx.GraphProto, narrow: frozenset[int], wide: int) -> None:
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type in narrow:
            value.type.tensor_type.elem_type = wide
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.type == attribute.INT and attribute.i in narrow:
                attribute.i = wide
            if attribute.HasField("g"):
                _types(attribute.g, narrow, wide)
            for sub in attribute.graphs:
                _types(sub, narrow, wide)


def _widened(
    model: onnx.ModelProto, narrow: frozenset[int], wide: int, read_external: bool = True
) -> onnx.ModelProto:
    """A copy of ``model`` with tensors, value types and Cast targets of the ``narrow`` types
    as ``wide``.

    External tensors are read through :func:`onnxbalance.tensors.read_array` (set the folder
    with :func:`onnxbalance.tensors.external_folder`); converted ones come back inline, the
    others keep their storage. ``read_external=False``: external tensors to convert come back
    as stubs of the wide type without values, which the caller fills from the original's.
    """
    dtype = tensors.numpy_dtype(wide)

    def convert(tensor: onnx.TensorProto) -> onnx.TensorProto:
        if tensor.data_type not in narrow:
            return tensor
        if not read_external and tensors.is_external(tensor):
            stub = tensors.copy_metadata(tensor)
            stub.data_type = wide
            return stub
        with np.errstate(invalid="ignore"):  # a signalling NaN becomes a quiet one, no warning
            values = tensors.read_array(tensor).astype(dtype)
        fresh = tensors.make_tensor(tensor.name, values, wide)
        fresh.doc_string = tensor.doc_string
        return fresh

    out = protos.map_tensors(model, convert)
    _types(out.graph, narrow, wide)
    return out


def to_float32(model: onnx.ModelProto, read_external: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with bfloat16 tensors, value types and Cast targets as float32
    (external tensors: see :func:`_widened`)."""
    return _widened(model, frozenset({BF16}), F32, read_external)


def wider_type(model: onnx.ModelProto) -> int:
    """The float type to run ``model`` in when it overflows its own: float32 for float16 and
    bfloat16 models (range enough, and onnxruntime has float32 kernels for every op, Conv
    included), float64 for the others."""
    return F32 if uses(model, F16, BF16) else F64


def widen(model: onnx.ModelProto, wide: int, read_external: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with every narrower float tensor, value type and Cast target as
    ``wide`` (float32 or float64; external tensors: see :func:`_widened`)."""
    narrow = {F16, BF16} if wide == F32 else {F16, BF16, F32}
    return _widened(model, frozenset(narrow), wide, read_external)


def to_float32_by_casts(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """:func:`to_float32`, except that the main graph's bfloat16 initializers that only its own
    nodes read stay as they are stored (external data included) and reach those nodes through
    a Cast to float32 placed right before the first of them. The function is the same (the
    Cast is the exact conversion); onnxruntime then holds the weights in bfloat16 and converts
    one at a time as the nodes run (when it does not fold constants), instead of holding a
    float32 copy of them all. None when a bfloat16 tensor in external data is read elsewhere
    (a body, a graph output, listed as a graph input): that model takes :func:`to_float32`."""
    graph = model.graph
    inner = set().union(*(outer_names(g) for n in graph.node for g in subgraphs(n)))
    # a graph input's declared type becomes float32, so an initializer listed there converts too
    elsewhere = inner | {o.name for o in graph.output} | {v.name for v in graph.input}
    kept = {t.name: t for t in graph.initializer if t.data_type == BF16 and t.name not in elsewhere}
    if any(
        t.data_type == BF16 and tensors.is_external(t) and t.name not in kept
        for t in tensors.iter_tensors(model)
    ):
        return None
    out = _widened(model, frozenset({BF16}), F32, read_external=False)
    for index, tensor in enumerate(out.graph.initializer):
        if tensor.name in kept:
            out.graph.initializer[index].CopyFrom(kept[tensor.name])
    taken = {name for node in graph.node for name in [*node.input, *node.output, node.name]}
    taken |= {v.name for v in graph.input} | {t.name for t in graph.initializer}
    cast_of = {name: fresh_name(f"{name}/float32", taken) for name in kept}
    pending = set(cast_of)
    nodes = []
    for node in out.graph.node:
        for name in dict.fromkeys(i for i in node.input if i in pending):
            # right before its first reader: the float32 copy lives from here to the last one
            nodes.append(
                onnx.helper.make_node("Cast", [name], [cast_of[name]], cast_of[name], to=F32)
            )
            pending.discard(name)
        reader = onnx.NodeProto()
        reader.CopyFrom(node)
        reader.input[:] = [cast_of.get(name, name) for name in node.input]
        nodes.append(reader)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
