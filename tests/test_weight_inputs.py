"""Weights that are also graph inputs: IR 3 requires every initializer to be listed as an
input, and torch's ``keep_initializers_as_inputs`` still writes them so. Such a weight could be
fed at run time, so its units stay fixed, unless ``--drop-weight-inputs`` makes it a constant.
Every balanced model is run next to the original in onnxruntime here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from arch_reference import assert_equivalent
from onnx import TensorProto, helper, numpy_helper

from onnxbalance import balance, check, protos
from onnxbalance.cli import main

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_models import export, randomise  # noqa: E402 (needs torch)

HIDDEN = 8 + 6  # the two hidden conv layers' channels


def _listed_weights_model(ir_version: int) -> onnx.ModelProto:
    """Conv-BN-Relu, Conv-Relu, global pool, Linear, exported with every initializer also a
    graph input (opset 9, as the IR 3 files of old model zoos were)."""
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip
    model = export(
        randomise(module, 7).eval(), torch.randn(2, 3, 6, 6), opset=9,
        keep_initializers_as_inputs=True,
    )  # fmt: skip
    model.ir_version = ir_version
    weights = {tensor.name for tensor in model.graph.initializer}
    assert weights and weights <= {value.name for value in model.graph.input}
    return model


def _feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).normal(size=(2, 3, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("ir_version", [3, 6])
def test_listed_weights_balance_only_when_dropped_from_the_inputs(tmp_path, capsys, ir_version):
    src = tmp_path / "listed.onnx"
    onnx.save(_listed_weights_model(ir_version), src)
    original_bytes = src.read_bytes()
    report_path, out = tmp_path / "r.json", tmp_path / "out.onnx"
    assert main([str(src), str(out), "--report", str(report_path), "-q"]) == 0
    report = json.loads(report_path.read_text())
    assert report["units_found"] == HIDDEN and report["units_balanced"] == 0
    assert report["weight_inputs_dropped"] == []
    assert all("--drop-weight-inputs" in entry["reason"] for entry in report["units_fixed"])

    assert (
        main([str(src), str(out), "--drop-weight-inputs", "--report", str(report_path), "-q"]) == 0
    )
    capsys.readouterr()
    report = json.loads(report_path.read_text())
    model, balanced = onnx.load(src), onnx.load(out)
    weights = [tensor.name for tensor in model.graph.initializer]
    assert sorted(report["weight_inputs_dropped"]) == sorted(weights)
    assert report["units_balanced"] == HIDDEN and report["verify"]["passed"]
    assert report["norm_after"] < report["norm_before"] * (1 - 1e-3)
    assert [value.name for value in balanced.graph.input] == ["x"]
    assert balanced.ir_version == max(ir_version, protos.WEIGHTS_AS_CONSTANTS_IR)
    onnx.checker.check_model(balanced, full_check=True)
    assert_equivalent(model, balanced, _feed())
    assert src.read_bytes() == original_bytes


def test_the_callers_model_keeps_its_inputs(tmp_path):
    model = _listed_weights_model(3)
    before = model.SerializeToString()
    balanced, report = balance(model, inputs=_feed(), drop_weight_inputs=True)
    assert model.SerializeToString() == before
    assert report.units_balanced == HIDDEN and len(report.weight_inputs_dropped) == len(
        model.graph.initializer
    )
    assert [value.name for value in balanced.graph.input] == ["x"]
    assert_equivalent(model, balanced, _feed())
    measured = check(model, drop_weight_inputs=True)
    assert not measured.input_balanced and measured.units_balanced == HIDDEN
    assert check(model).units_balanced == 0
    assert model.SerializeToString() == before


def _graph_with(inputs: list[str], ir_version: int) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(2, np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"])], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 2] if name != "B" else [2])
         for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [weight, bias],
    )  # fmt: skip
    return helper.make_model(graph, ir_version=ir_version)


@pytest.mark.parametrize(
    ("inputs", "ir_version", "dropped", "after"),
    [
        (["x", "W", "B"], 3, ("W", "B"), 4),
        (["W", "x"], 8, ("W",), 8),  # a later IR version stays
        (["x"], 3, (), 3),  # nothing listed: nothing changes
    ],
)
def test_drop_weight_inputs_keeps_the_data_inputs_in_order(inputs, ir_version, dropped, after):
    model = _graph_with(inputs, ir_version)
    assert protos.drop_weight_inputs(model) == dropped
    assert [value.name for value in model.graph.input] == ["x"]
    assert model.ir_version == after
    assert [tensor.name for tensor in model.graph.initializer] == ["W", "B"]
