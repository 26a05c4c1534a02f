"""Normalisations as diagonal layers: the per-channel scale and bias of a LayerNormalization over
the last axis or of an InstanceNormalization make units of the channels they write, while the
channels they read stay fixed; so does a Mul by a per-channel constant of channels that carry
no unit, which is how a LayerNorm written out in primitive ops (opset < 17, tf2onnx, Keras) or
an RMSNorm ends. The architectures themselves (a pre-LayerNorm FFN and an InstanceNorm conv
net, with their scipy optima) are in test_architectures; here are the same FFN at opset 14,
RMSNorm, the float16 conversion and what must keep a normalisation from being a layer.
Balanced models are run in onnxruntime next to the originals, apart from the tool's own
check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from arch_reference import assert_equivalent
from onnx import TensorProto, helper, numpy_helper
from onnx_models import HID, IN, OUT, Net

from onnxbalance import balance
from onnxbalance.analysis import analyse
from onnxbalance.unitgraph import FIXED

torch = pytest.importorskip("torch")
pytest.importorskip("onnxconverter_common")
nn = torch.nn

from arch_reference import check_balanced, reference_minimum  # noqa: E402
from torch_models import PreNormFFN, export, export_dynamo, fixture, randomise  # noqa: E402
from verify_models import float16  # noqa: E402


def test_a_layernorm_written_out_at_opset_14_balances_to_the_same_optimum():
    fx, _ = fixture("prenorm_ffn", fold=True, opset=14)
    ops = {n.op_type for n in fx.model.graph.node}
    assert "LayerNormalization" not in ops and {"ReduceMean", "Div", "Mul"} <= ops

    balanced, report = balance(fx.model)

    weights = [layer.effective for layer in fx.layers]
    _, best, _ = reference_minimum(fx.layers, weights, fx.n_groups, 2.0, 2.0)
    check_balanced(fx, balanced, report.units_balanced, best)
    assert report.verify.passed


class RMSNormFFN(nn.Module):
    """Llama's RMSNorm (x * rsqrt(mean(x^2) + eps) * weight) before a ReLU FFN, a residual and
    a head."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(16))
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return self.head(x + self.fc2(torch.relu(self.fc1(normed))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_an_rmsnorm_scale_is_a_diagonal_layer(dynamo):
    module = randomise(RMSNormFFN(), seed=14)
    example = torch.randn(2, 5, 16)
    model = export_dynamo(module, example) if dynamo else export(module, example)

    balanced, report = balance(model)

    # the 16 normalised channels (read by fc1 alone) and fc1's 32
    assert report.units_balanced == 16 + 32 and report.verify.passed
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight = next(n for n, v in stored.items() if np.array_equal(v, module.weight.detach()))
    after = {t.name: numpy_helper.to_array(t) for t in balanced.graph.initializer}
    assert not np.array_equal(after[weight], stored[weight])  # the scale moved
    assert_equivalent(model, balanced, {model.graph.input[0].name: example.numpy()})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_float16_prenorm_ffn_balances_its_layernorm_channels(dynamo):
    module = randomise(PreNormFFN(), seed=12)
    example = torch.randn(2, 5, 16)
    exported = export_dynamo(module, example) if dynamo else export(module, example)
    model = float16(exported)
    scales = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert scales, "the conversion keeps float16 weights"

    balanced, report = balance(model)

    # the LayerNorm's 16 channels and fc1's 32 (see torch_models.build_prenorm_ffn)
    assert report.units_balanced == 48 and report.verify.passed
    norm = next(n for n in balanced.graph.node if n.op_type == "LayerNormalization")
    stored = {t.name: numpy_helper.to_array(t) for t in balanced.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gamma = norm.input[1]
    assert stored[gamma].dtype == np.float16
    assert not np.array_equal(stored[gamma], before[gamma])  # the scale moved
    feed = {model.graph.input[0].name: example.numpy()}
    assert_equivalent(model, balanced, feed, rtol=1e-2)


def _normalised(scale_shape: tuple[int, ...], *, scale_is_input: bool = False) -> onnx.ModelProto:
    """x [2, 3, 4] -> LayerNormalization (scale of ``scale_shape``, axis from its rank) -> MatMul
    [4, 5] -> Relu -> MatMul [5, 2]."""
    rng = np.random.default_rng(0)
    scale = numpy_helper.from_array(rng.uniform(0.5, 2, scale_shape).astype(np.float32), "g")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])]
    if scale_is_input:
        inputs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, list(scale_shape)))
    graph = helper.make_graph(
        [
            helper.make_node(
                "LayerNormalization", ["x", "g", "b"], ["n"], name="norm", axis=-len(scale_shape)
            ),
            helper.make_node("Reshape", ["n", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2"),
        ],
        "normalised",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            scale,
            numpy_helper.from_array(rng.normal(size=scale_shape).astype(np.float32), "b"),
            numpy_helper.from_array(np.array([2, 3, 4], np.int64), "shape"),
            numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.normal(size=(5, 2)).astype(np.float32), "W2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_layernorm_over_the_last_axis_is_a_diagonal_layer():
    model = _normalised((4,))
    units = analyse(model)
    norm = next(layer for layer in units.layers if layer.name == "norm")
    assert norm.weight.shape == (4, 1) and (norm.col_groups == FIXED).all()
    assert (norm.row_groups != FIXED).all() and units.n_groups == 4 + 5
    assert sorted(e.tensor for e in norm.edits) == ["b", "g"]
    balanced, report = balance(model)
    assert report.verify.passed
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    assert_equivalent(model, balanced, {"x": x})


def test_a_layernorm_over_several_axes_or_with_a_scale_fed_at_run_time_makes_no_moving_unit():
    # scale [3, 4]: one weight per entry, not per channel: no layer at all
    units = analyse(_normalised((3, 4)))
    assert "norm" not in {layer.name for layer in units.layers}
    # a scale that is also a graph input can be overridden: its rows stay, saying why
    units = analyse(_normalised((4,), scale_is_input=True))
    norm = next(layer for layer in units.layers if layer.name == "norm")
    assert (norm.row_groups == FIXED).all()
    assert any(s.node == "norm" and "also a graph input" in s.reason for s in units.skipped)


def test_the_dynamo_exporter_without_its_optimiser_writes_sizes_as_integer_attributes():
    # its GroupNorm reshapes to sizes held by Constant nodes' value_ints / value_int: constants
    # like any other (reading them was a KeyError); its scale, computed at run time, is no layer
    from torch_models import GroupNormHead

    module = randomise(GroupNormHead(), seed=12).eval()
    example = torch.randn(2, 3, 8, 8)
    model = export_dynamo(module, example, optimize=False)
    assert any(a.name in ("value_int", "value_ints") for n in model.graph.node for a in n.attribute)
    _, report = balance(model, inputs={model.graph.input[0].name: example.numpy()})
    assert report.units_found == 16  # both convs' channels, stopped by the normalisation
    assert {e.reason.split("'")[0] for e in report.units_fixed} == {"feeds InstanceNormalization "}


def test_a_reshape_to_sizes_given_as_integer_attributes_passes_the_units():
    net = Net("reshape_to_value_ints", seed=13)
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "relu")
    net.nodes.append(helper.make_node("Constant", [], ["flat"], value_ints=[0, -1]))
    net.gemm(net.op("Reshape", [h, "flat"], "flatten"), HID, OUT, "fc2")
    net.output("fc2_out")
    model = net.build()
    feed = {"x": net.rng.standard_normal((8, IN)).astype(np.float32)}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == HID
    assert_equivalent(model, balanced, feed)
