"""What reaches the terminal when onnxruntime refuses a model: our one line, nothing of its own."""

from __future__ import annotations

import numpy as np
import onnx
from gemm_mlp import gemm_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxbalance.cli import main


def _fails_when_run() -> onnx.ModelProto:
    """A balanceable MLP whose output is reshaped to rows of 5: 8 rows of 3 values cannot be,
    which onnxruntime finds only when it runs the model (and logs an error line of its own)."""
    model = gemm_mlp([4, 8, 3], seed=1, scale_hidden=[10.0])
    shape = numpy_helper.from_array(np.array([-1, 5], "int64"), "rows_of_5")
    model.graph.initializer.append(shape)
    model.graph.node.append(helper.make_node("Reshape", ["y", "rows_of_5"], ["z"]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["R", 5]))
    return model


def test_onnxruntime_log_lines_never_reach_the_terminal(tmp_path, capfd):
    src = tmp_path / "in.onnx"
    onnx.save(_fails_when_run(), src)
    for argv in ([str(src), str(tmp_path / "out.onnx")], ["compare", str(src), str(src)]):
        assert main(argv) == 2
        out, err = capfd.readouterr()  # the file descriptors: onnxruntime writes there directly
        assert len(err.splitlines()) == 1, err
        assert err.startswith("onnxbalance: error: ") and "onnxruntime cannot run" in err
        assert "[E:onnxruntime" not in err and "\x1b[" not in err
    assert not (tmp_path / "out.onnx").exists()


def _conv_with_a_bad_group() -> onnx.ModelProto:
    """group 2 on 3 input channels: valid to onnx's checker, refused by onnxruntime at run
    time; no hidden unit, so there is nothing to balance."""
    weight = numpy_helper.from_array(np.ones((4, 1, 1, 1), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], group=2)],
        "bad_group",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _empty_graph() -> onnx.ModelProto:
    graph = helper.make_graph([], "empty", [], [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_onnxruntime_cannot_run_is_refused_even_with_nothing_to_balance(tmp_path, capfd):
    for name, model in (("bad_group", _conv_with_a_bad_group()), ("empty", _empty_graph())):
        src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}_out.onnx"
        onnx.save(model, src)
        assert main([str(src), str(out), "-q"]) == 2
        _, err = capfd.readouterr()
        assert len(err.splitlines()) == 1 and "onnxruntime cannot run the input model" in err
        assert not out.exists()
        # --no-verify asks for no run: the copy is made as before
        assert main([str(src), str(out), "-q", "--no-verify"]) == 0 and out.exists()


def test_a_nan_bias_is_named_like_a_nan_weight(tmp_path, capfd):
    for entry, bad in ((2, np.nan), (5, np.inf)):
        model = gemm_mlp([4, 8, 3], seed=1, scale_hidden=[10.0])
        bias = next(t for t in model.graph.initializer if t.name == "B0")
        values = numpy_helper.to_array(bias).copy()
        values[entry] = bad
        bias.CopyFrom(numpy_helper.from_array(values, "B0"))
        src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
        onnx.save(model, src)
        assert main([str(src), str(out), "-q"]) == 2
        _, err = capfd.readouterr()
        assert len(err.splitlines()) == 1
        assert f"tensor 'B0' holds NaN or infinity (at [{entry}])" in err
        assert not out.exists()


def test_a_nan_bias_shared_by_layers_that_get_private_copies_is_named(tmp_path, capfd):
    """Two layers read one bias and need different factors, so each gets a private copy: the
    NaN is still named (by the stored tensor's name) with exit 2, not a failed verification."""
    rng = np.random.default_rng(0)
    bias = np.ones(8, np.float32)
    bias[3] = np.nan
    weights = {"W0": (8, 4), "W1": (8, 8), "W2": (3, 8)}
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in weights.items()]  # fmt: skip
    inits += [
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(np.zeros(3, np.float32), "c"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W0", "b"], ["h0"], transB=1),
        helper.make_node("Relu", ["h0"], ["a0"]),
        helper.make_node("Gemm", ["a0", "W1", "b"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "W2", "c"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "shared_nan_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits,
    )  # fmt: skip
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    assert main([str(src), str(out), "-q"]) == 2
    _, err = capfd.readouterr()
    assert len(err.splitlines()) == 1
    assert "tensor 'b' holds NaN or infinity (at [3])" in err
    assert not out.exists()
