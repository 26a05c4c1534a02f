"""Units through a product with a tensor that carries none: gates.

Squeeze-and-excitation (SENet, MobileNetV3, PP-LCNet) multiplies a layer's channels by a gate
computed from them: pool, reduce, expand, sigmoid. The reduce layer's columns undo the pooled
channels' scales, so the gate is the same in the balanced model, and a (y g) = (a y) g: the
channels pass the product. GLU-style gates (``a * sigmoid(b)``) are the same case. A factor of
unknown shape could spread a single unit along the unit axis: that one still stops them.
Every model is run in onnxruntime next to the original, apart from the tool's own check.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from arch_reference import assert_equivalent
from onnx import TensorProto, helper, numpy_helper

from onnxbalance import balance
from onnxbalance.analysis import analyse

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_models import build_se_basic, export, export_dynamo, randomise  # noqa: E402


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_an_se_resnet_block_with_a_dynamic_batch_balances_through_its_gate(dynamo):
    module, shape, *_ = build_se_basic()
    example = torch.randn(*shape)
    if dynamo:
        batch = torch.export.Dim("batch", max=64)
        model = export_dynamo(module, example, dynamic_shapes={"x": {0: batch}})
    else:
        model = export(module, example, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    assert "Mul" in {n.op_type for n in model.graph.node}

    balanced, report = balance(model)

    # stem/residual 8, conv1 8, the gate's reduce conv 2 (see torch_models.build_se_basic)
    assert report.units_balanced == 18 and report.verify.passed
    assert report.norm_after < 0.9 * report.norm_before
    x = np.random.default_rng(1).standard_normal((3, *shape[1:])).astype(np.float32)
    assert_equivalent(model, balanced, {model.graph.input[0].name: x})


class GatedMLP(nn.Module):
    """fc1, times sigmoid(gate(x)) (a GLU), fc2: fc1's rows pass the product."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x) * torch.sigmoid(self.gate(x)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_glu_passes_the_units_of_its_linear_half(dynamo):
    module = randomise(GatedMLP(), seed=5)
    example = torch.randn(4, 6)
    model = export_dynamo(module, example) if dynamo else export(module, example)

    balanced, report = balance(model)

    assert report.units_balanced == 10 and report.verify.passed
    assert not any("Mul" in entry.reason for entry in report.units_fixed)
    assert_equivalent(model, balanced, {model.graph.input[0].name: example.numpy()})


def _single_channel_times(gate: onnx.ValueInfoProto) -> onnx.ModelProto:
    """conv1 (one channel) -> Relu -> Mul by the graph input ``gate`` -> conv2."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1"),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Mul", ["a", "gate"], ["g"], name="times"),
            helper.make_node("Conv", ["g", "W2"], ["y"], name="conv2"),
        ],
        "gated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]), gate],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.standard_normal((1, 2, 1, 1)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.standard_normal((3, 1, 1, 1)).astype(np.float32), "W2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_factor_of_unknown_shape_stops_a_single_unit():
    known = _single_channel_times(helper.make_tensor_value_info("gate", TensorProto.FLOAT, [1]))
    assert analyse(known).n_groups == 1
    unknown = _single_channel_times(helper.make_tensor_value_info("gate", TensorProto.FLOAT, None))
    units = analyse(unknown)
    assert units.n_groups == 0
    (skip,) = units.skipped
    assert skip.reason == "feeds Mul 'times' whose other input 'gate' has no known shape"
