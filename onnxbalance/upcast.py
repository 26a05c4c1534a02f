"""A bfloat16 model as float32, so onnxruntime's CPU provider can run it for verification.

onnxruntime has no CPU kernels for bfloat16 Gemm/MatMul/Conv. Every bfloat16 value is exactly
a float32 value (bfloat16 is float32 with the low 16 mantissa bits dropped), so converting the
stored tensors and the declared types gives a model that computes, in float32 arithmetic, the
function the bfloat16 weights define. Running the original and the balanced model through the
same conversion compares them fairly: both are evaluated the same way, and the only difference
left is the rounding of the rescaled weights to bfloat16.
"""

from __future__ import annotations

import onnx

from onnxbalance import protos, tensors

BF16 = onnx.TensorProto.BFLOAT16
F32 = onnx.TensorProto.FLOAT


def uses_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any stored tensor, declared value or Cast target is bfloat16."""
    if any(t.data_type == BF16 for t in tensors.iter_tensors(model)):
        return True
    graph = model.graph
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    if any(v.type.tensor_type.elem_type == BF16 for v in values):
        return True
    return any(
        a.name == "to" and a.i == BF16 for n in graph.node for a in n.attribute if a.type == a.INT
    )


def _types(graph: onnx.GraphProto) -> None:
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == BF16:
            value.type.tensor_type.elem_type = F32
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.type == attribute.INT and attribute.i == BF16:
                attribute.i = F32
            if attribute.HasField("g"):
                _types(attribute.g)
            for sub in attribute.graphs:
                _types(sub)


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with bfloat16 tensors, value types and Cast targets as float32.

    External tensors are read through :func:`onnxbalance.tensors.read_array` (set the folder
    with :func:`onnxbalance.tensors.external_folder`); converted ones come back inline, the
    others keep their storage.
    """

    def convert(tensor: onnx.TensorProto) -> onnx.TensorProto:
        if tensor.data_type != BF16:
            return tensor
        values = tensors.read_array(tensor).astype("float32")
        fresh = tensors.make_tensor(tensor.name, values, F32)
        fresh.doc_string = tensor.doc_string
        return fresh

    out = protos.map_tensors(model, convert)
    _types(out.graph)
    return out
