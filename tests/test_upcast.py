"""bfloat16 models converted to float32 for onnxruntime (onnxbalance.upcast)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from mlp_models import mlp, save
from onnx import numpy_helper
from test_external_data import _forward

from onnxbalance import tensors, upcast


def test_bfloat16_model_runs_as_float32(tmp_path):
    model = mlp(widths=(5, 7, 3), dtype="bfloat16", seed=4)
    assert upcast.uses(model, onnx.TensorProto.BFLOAT16)
    assert not upcast.uses(mlp(), onnx.TensorProto.BFLOAT16)
    path = save(model, tmp_path / "m.onnx", external=True)
    lazy = onnx.load(path, load_external_data=False)
    with tensors.external_folder(tmp_path):
        converted = upcast.to_float32(lazy)
    assert not upcast.uses(converted, onnx.TensorProto.BFLOAT16)
    assert lazy.graph.initializer[0].data_type == onnx.TensorProto.BFLOAT16  # input untouched
    for before, after in zip(model.graph.initializer, converted.graph.initializer, strict=True):
        exact = numpy_helper.to_array(before).astype(np.float64)
        np.testing.assert_array_equal(numpy_helper.to_array(after), exact)  # no rounding
    session = ort.InferenceSession(
        converted.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    got = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _forward(model, x.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_cast_targets_and_constants():
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Cast", ["x"], ["c"], to=onnx.TensorProto.BFLOAT16),
            onnx.helper.make_node(
                "Constant",
                [],
                ["k"],
                value=tensors.make_tensor(
                    "k", np.array([2.0], dtype=tensors.BFLOAT16), onnx.TensorProto.BFLOAT16
                ),
            ),
            onnx.helper.make_node("Mul", ["c", "k"], ["y"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [3])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert upcast.uses(model, onnx.TensorProto.BFLOAT16)
    converted = upcast.to_float32(model)
    assert not upcast.uses(converted, onnx.TensorProto.BFLOAT16)
    session = ort.InferenceSession(
        converted.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.array([1.0, -2.5, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], 2 * x)


def test_float16_model_widened_to_float64(tmp_path):
    """Tensors (external ones read in), value types and Cast targets become float64, exactly."""
    model = mlp(widths=(5, 7, 3), dtype="float16", seed=6)
    path = save(model, tmp_path / "m.onnx", external=True)
    lazy = onnx.load(path, load_external_data=False)
    with tensors.external_folder(tmp_path):
        assert upcast.wider_type(lazy) == onnx.TensorProto.FLOAT
        converted = upcast.widen(lazy, onnx.TensorProto.DOUBLE)
    for before, after in zip(model.graph.initializer, converted.graph.initializer, strict=True):
        assert after.data_type == onnx.TensorProto.DOUBLE
        exact = numpy_helper.to_array(before).astype(np.float64)
        np.testing.assert_array_equal(numpy_helper.to_array(after), exact)
    inputs_and_outputs = [*converted.graph.input, *converted.graph.output]
    assert {v.type.tensor_type.elem_type for v in inputs_and_outputs} == {onnx.TensorProto.DOUBLE}
    session = ort.InferenceSession(
        converted.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((4, 5))
    got = session.run(None, {"x": x})[0]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, _forward(model, x), rtol=1e-12, atol=1e-12)


def test_bfloat16_weights_kept_and_cast_where_read(tmp_path):
    # The weights stay bfloat16 in their external file; each reaches its first reader through
    # a Cast right before it, and the model computes exactly what the fully converted one does.
    model = mlp(widths=(5, 7, 6, 3), dtype="bfloat16", seed=2)
    path = save(model, tmp_path / "m.onnx", external=True)
    lazy = onnx.load(path, load_external_data=False)
    casted = upcast.to_float32_by_casts(lazy)
    weights = {t.name for t in lazy.graph.initializer}
    assert [t.data_type for t in casted.graph.initializer] == [onnx.TensorProto.BFLOAT16] * len(
        weights
    )
    assert all(tensors.is_external(t) for t in casted.graph.initializer)
    nodes = list(casted.graph.node)
    for index, node in enumerate(nodes):
        read = [name for name in node.input if name in weights]
        assert node.op_type == "Cast" or not read  # no reader sees a bfloat16 weight
        if node.op_type == "Cast" and node.input[0] in weights:
            reader = nodes[index + 1]  # right before its reader (or the next Cast before it)
            assert reader.op_type == "Cast" or node.output[0] in reader.input
    assert not any(
        v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
        for v in [*casted.graph.input, *casted.graph.output]
    )
    with tensors.external_folder(tmp_path):
        converted = upcast.to_float32(lazy)
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(tmp_path)
    )
    got = ort.InferenceSession(
        casted.SerializeToString(), options, providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    want = ort.InferenceSession(
        converted.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_bfloat16_weight_read_elsewhere_is_converted_instead(tmp_path):
    # A stored bfloat16 weight that is also a graph output cannot stay bfloat16 (the output is
    # declared float32): such a model takes the full conversion.
    model = mlp(widths=(5, 7, 3), dtype="bfloat16", seed=3)
    weight = model.graph.initializer[0]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(weight.name, onnx.TensorProto.BFLOAT16, weight.dims)
    )
    path = save(model, tmp_path / "m.onnx", external=True)
    assert upcast.to_float32_by_casts(onnx.load(path, load_external_data=False)) is None
    inline = upcast.to_float32_by_casts(model)  # inline tensors: only the others are kept
    kept = [t.name for t in inline.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16]
    assert weight.name not in kept and kept
