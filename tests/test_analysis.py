"""analyse(): expected groups, fixed units and skip reasons, derived by hand per architecture.

Notation of the expectations: ``{layer: (rows, cols)}`` where rows is the layer's own name when
its output units are hidden (groups "<layer>:<o>") or None when they are all FIXED, and cols is
the name of the layer whose hidden units it reads, or None when its columns are FIXED.
Skips are ``(node, count, substring of the reason)``.
"""

from __future__ import annotations

import numpy as np
import onnx_models as om
import pytest
from onnx import numpy_helper

from onnxbalance.analysis import analyse
from onnxbalance.unitgraph import FIXED

HID = om.HID


def names(units, groups) -> list[str | None]:
    return [None if g == FIXED else units.group_names[g] for g in groups]


def check(model, layers: dict, skips: list) -> object:
    units = analyse(model)
    found = {layer.name: layer for layer in units.layers}
    assert sorted(found) == sorted(layers)
    expected_groups = []
    for name, (rows, cols) in layers.items():
        layer = found[name]
        n_rows, n_cols = layer.weight.shape
        want_rows = [None] * n_rows if rows is None else [f"{rows}:{o}" for o in range(n_rows)]
        want_cols = [None] * n_cols if cols is None else [f"{cols}:{i}" for i in range(n_cols)]
        assert names(units, layer.row_groups) == want_rows, name
        assert names(units, layer.col_groups) == want_cols, name
        if rows is not None:
            expected_groups += want_rows
    assert sorted(units.group_names) == sorted(expected_groups)
    got = sorted((s.node, s.count, s.reason) for s in units.skipped)
    assert len(got) == len(skips), got
    for (node, count, reason), (want_node, want_count, want_reason) in zip(
        got, sorted(skips), strict=True
    ):
        assert (node, count) == (want_node, want_count), got
        assert want_reason in reason, got
    return units


MLP = {"fc1": ("fc1", None), "fc2": (None, "fc1")}
MATMUL = {"fc1": ("fc1", None), "fc2": ("fc2", "fc1"), "fc3": (None, "fc2")}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["vec", "row", "scalar", "one", None])
def test_gemm_mlp(trans_b, bias):
    check(om.gemm_mlp(trans_b=trans_b, bias=bias), MLP, [])


def test_gemm_constant_nodes_alpha_beta():
    check(om.gemm_mlp(alpha=0.7, beta=1.3, node=True), MLP, [])


@pytest.mark.parametrize("bias", ["vec", "row", "scalar", None])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_mlp(bias, bias_first):
    check(om.matmul_mlp(bias=bias, bias_first=bias_first), MATMUL, [])


def test_matmul_constant_nodes_and_3d_input():
    check(om.matmul_mlp(node=True, batch_dims=2), MATMUL, [])


def test_deep_mlp():
    layers = {"fc1": ("fc1", None), "fc2": ("fc2", "fc1"), "fc3": ("fc3", "fc2")}
    check(om.deep_mlp(4), layers | {"fc4": (None, "fc3")}, [])


def test_trans_a_on_input_is_fine():
    check(om.gemm_trans_a(first=True), MLP, [])


def test_trans_a_on_hidden_activation_blocks():
    skips = [("fc1", HID, "activation feeds 'fc2', which reads it transposed")]
    check(om.gemm_trans_a(first=False), {"fc1": (None, None), "fc2": (None, None)}, skips)


@pytest.mark.parametrize("kind", ["leaky", "prelu_scalar", "prelu_vec"])
def test_homogeneous_activations(kind):
    check(
        om.activations(kind),
        {"fc1": ("fc1", None), "fc2": ("fc2", "fc1"), "fc3": (None, "fc2")},
        [],
    )


def test_fan_out_to_three_layers():
    layers = {"fc1": ("fc1", None)} | {h: (None, "fc1") for h in ("head_a", "head_b", "head_c")}
    check(om.fan_out(), layers, [])


def test_shape_of_an_activation_does_not_block():
    check(om.shape_reader(), MLP, [])


def test_hidden_activation_that_is_a_graph_output():
    layers = {"fc1": (None, None), "fc2": ("fc2", None), "fc3": (None, "fc2")}
    check(om.hidden_is_output(), layers, [("fc1", HID, "activation 'act1_out' is a graph output")])


def test_shared_weight_fixes_both_uses_and_counts_once():
    # fc2 and fc3 share W: their rows and columns stay put, so fc1 cannot move either;
    # W appears once among the layers (fc3 is its second use).
    layers = {"fc0": ("fc0", None), "fc1": (None, "fc0"), "fc2": (None, None), "fc4": (None, None)}
    shared = "weight 'W' is used by 2 node inputs"
    skips = [("fc1", HID, f"feeds 'fc2': {shared}"), ("fc2", HID, shared), ("fc3", HID, shared)]
    check(om.shared_weight(), layers, skips)


@pytest.mark.parametrize("op", ["Sigmoid", "Clip", "Tanh"])
def test_non_homogeneous_op_in_the_chain(op):
    layers = {
        "fc1": ("fc1", None),
        "fc2": (None, "fc1"),
        "fc3": ("fc3", None),
        "fc4": (None, "fc3"),
    }
    skips = [("fc2", HID, f"feeds {op} 'block', which is not positively homogeneous")]
    check(om.blocker(op), layers, skips)


def test_weight_that_is_a_graph_input():
    layers = {"fc1": (None, None), "fc2": ("fc2", None), "fc3": (None, "fc2")}
    skips = [("fc1", HID, "weight 'fc1_W' is also a graph input")]
    check(om.weight_is_input(), layers, skips)


def test_no_relu_nothing_moves_and_output_layer_is_not_a_skip():
    units = check(
        om.no_relu(),
        {"fc1": (None, None), "fc2": (None, None)},
        [("fc1", HID, "feeds Tanh 'tanh', which is not positively homogeneous")],
    )
    assert units.n_groups == 0


def test_linear_feeding_linear_directly():
    layers = {"fc1": (None, None), "fc2": ("fc2", None), "fc3": (None, "fc2")}
    skips = [("fc1", HID, "output feeds 'fc2' with no activation between")]
    check(om.linear_linear(), layers, skips)


def test_dequantized_weight():
    skips = [
        ("fc1", HID, "feeds MatMul 'fc2', which is not a rescalable linear layer"),
        ("fc2", 0, "weight 'dq_out' comes from DequantizeLinear"),
    ]
    check(om.dequantized(), {"fc1": (None, None)}, skips)


def test_integer_weight():
    check(om.int_weight(), {}, [("fc1", HID, "has dtype INT32, not floating point")])


def test_quantized_ops():
    skips = [
        ("fc1", HID, "feeds quantized op QuantizeLinear 'quant'"),
        ("qmm", om.OUT, "quantized op QLinearMatMul is not rescaled"),
    ]
    check(om.qlinear(), {"fc1": (None, None)}, skips)


def test_subgraph_reads_activation_and_is_not_analysed():
    skips = [
        ("fc1", HID, "used inside the subgraph of If 'if'"),
        ("if", 0, "2 linear ops inside the If subgraph are not analysed"),
    ]
    check(om.subgraph(), {"fc1": (None, None)}, skips)


def test_float64():
    check(om.float64_mlp(), MLP, [])


def _init(model, name):
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_effective_weight_orientation_and_alpha(trans_b):
    model = om.gemm_mlp(trans_b=trans_b, alpha=0.7, beta=1.3, node=True)
    units = analyse(model)
    fc1 = units.layers[0]
    w = _init(model, "fc1_W").astype(np.float64)
    alpha = float(np.float32(0.7))  # ONNX stores float attributes in single precision
    expected = alpha * (w if trans_b else w.T)
    assert fc1.weight.shape == (HID, om.IN)
    np.testing.assert_allclose(fc1.weight, expected, rtol=1e-12)
    weight_edit, bias_edit = fc1.edits
    assert weight_edit.tensor == "fc1_W"
    assert (weight_edit.row_axis, weight_edit.col_axis) == ((0, 1) if trans_b else (1, 0))
    assert bias_edit.tensor == "fc1_b" and bias_edit.row_axis == 0
    assert bias_edit.col_groups is None and bias_edit.expand_to is None


@pytest.mark.parametrize(
    "bias, row_axis, expand_to",
    [("vec", 0, None), ("row", 1, None), ("scalar", 0, (HID,)), ("one", 0, (HID,))],
)
def test_bias_edits(bias, row_axis, expand_to):
    units = analyse(om.gemm_mlp(bias=bias))
    fc1, fc2 = units.layers
    bias_edit = fc1.edits[1]
    assert (bias_edit.row_axis, bias_edit.expand_to) == (row_axis, expand_to)
    assert list(bias_edit.row_groups) == list(range(HID))
    # the output layer's rows are fixed: its bias is not edited, only its weight's columns
    assert [e.tensor for e in fc2.edits] == ["fc2_W"]


def test_matmul_bias_either_order_is_the_constant():
    for first in (False, True):
        units = analyse(om.matmul_mlp(bias_first=first))
        assert [e.tensor for e in units.layers[0].edits] == ["fc1_W", "fc1_b"]


def test_analyse_does_not_mutate():
    for model in (om.gemm_mlp(node=True), om.shared_weight(), om.subgraph()):
        before = model.SerializeToString()
        analyse(model)
        assert model.SerializeToString() == before


def test_prelu_with_a_data_slope_blocks():
    net = om.Net("prelu_data")
    x = net.input("x", ["N", om.IN])
    slope = net.input("slope", [HID])
    h = net.op("PRelu", [net.gemm(x, om.IN, HID, "fc1"), slope], "act1")
    net.output(net.gemm(h, HID, om.OUT, "fc2"))
    skips = [("fc1", HID, "feeds PRelu 'act1' whose slope is not a constant")]
    check(net.build(), {"fc1": (None, None), "fc2": (None, None)}, skips)


def test_unit_graph_couplings_from_the_weights():
    model = om.gemm_mlp(trans_b=0, alpha=0.5)  # alpha 0.5 is exact in float32
    graph = analyse(model).unit_graph(2.0)
    w1 = 0.5 * _init(model, "fc1_W").astype(np.float64).T
    w2 = 0.5 * _init(model, "fc2_W").astype(np.float64).T
    first, second = graph.layers
    # fc1's inputs are all fixed graph inputs: one aggregated column
    np.testing.assert_allclose(first.coupling, (w1**2).sum(axis=1, keepdims=True), rtol=1e-12)
    assert first.col_groups.tolist() == [FIXED] and first.row_groups.tolist() == list(range(HID))
    np.testing.assert_allclose(second.coupling, w2**2, rtol=1e-12)
    assert second.col_groups.tolist() == list(range(HID))
    assert second.row_groups.tolist() == [FIXED] * om.OUT
    assert graph.group_names == tuple(f"fc1:{o}" for o in range(HID))
