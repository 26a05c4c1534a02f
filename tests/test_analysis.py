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


def _check_skips(units, skips) -> None:
    """units.skipped holds exactly ``skips`` as (node, count, part of the reason)."""
    got = sorted((s.node, s.count, s.reason) for s in units.skipped)
    assert len(got) == len(skips), got
    for (node, count, reason), (want_node, want_count, want_reason) in zip(
        got, sorted(skips), strict=True
    ):
        assert (node, count) == (want_node, want_count), got
        assert want_reason in reason, got


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
    _check_skips(units, skips)
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
    shared = "weight 'W' is shared by 2 node inputs"
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
    # fc1's channels reach fc2 with no activation: rescaling them is exact all the same (fc2 is
    # linear), so they are hidden units like fc2's
    layers = {"fc1": ("fc1", None), "fc2": ("fc2", "fc1"), "fc3": (None, "fc2")}
    check(om.linear_linear(), layers, [])


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


def test_subgraph_reads_activation():
    """The branches' layers are found; what they read from the outer scope (fc1's activation)
    and what they write (the branch outputs) is fixed."""
    layers = {
        "fc1": (None, None),
        "If 'if'/then_branch/then_mm": (None, None),
        "If 'if'/else_branch/else_gemm": (None, None),
    }
    check(om.subgraph(), layers, [("fc1", HID, "used inside the subgraph of If 'if'")])


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


# --- convolutions, BN, pass-through ops, merges --------------------------------------
# Expectations are per layer: rows and *raw* columns as group names (None = FIXED), built from
# the architecture by hand: own(layer, n) are a layer's own units, a conv's raw columns repeat
# each input channel over its kernel taps.

CH = om.CH


def own(layer: str, n: int) -> list[str]:
    return [f"{layer}:{o}" for o in range(n)]


def taps(labels: list, k: int) -> list:
    return [label for label in labels for _ in range(k)]


def fixed(n: int) -> list[None]:
    return [None] * n


def check_units(model, layers: dict, skips: list, n_groups: int | None = None):
    """layers: {name: (row labels, raw column labels (1-D list or 2-D list of lists))}."""
    units = analyse(model)
    found = {layer.name: layer for layer in units.layers}
    assert sorted(found) == sorted(layers)
    for name, (rows, cols) in layers.items():
        layer = found[name]
        assert names(units, layer.row_groups) == rows, name
        got_cols = np.vectorize(lambda g: units.group_names[g] if g != FIXED else "-")(
            layer.col_groups
        )
        want = np.array(cols, dtype=object)
        want[want == None] = "-"  # noqa: E711 - elementwise comparison
        assert got_cols.shape == want.shape, name
        assert (got_cols == want).all(), (name, got_cols)
    expected = {label for rows, _ in layers.values() for label in rows if label is not None}
    assert sorted(units.group_names) == sorted(expected)
    if n_groups is not None:
        assert units.n_groups == n_groups
    _check_skips(units, skips)
    return units


PASSING = [
    "identity",
    "dropout",
    "maxpool",
    "avgpool",
    "lppool",
    "pad_reflect",
    "pad_zero",
    "resize_linear",
    "transpose_roundtrip",
    "unsqueeze_squeeze",
    "mul_scalar",
    "mul_input",  # by a graph input: balancing does not change it
    "div_channels",
    "slice_reverse",
    "slice_hw",
    "reduce_hw",
    "clip_min0",
    "split_h_concat",
    "slice_step2",
    "batchnorm_alone",
    "add_channels",
    "reshape_split_channels",
]


@pytest.mark.parametrize("between", PASSING)
def test_ops_the_channel_scales_pass_through(between):
    cols = own("conv1", CH)
    rows = own("conv1", CH)
    if between == "slice_reverse":
        cols = cols[::-1]
    elif between == "slice_step2":  # channels 0 and 2 are read; 1 and 3 by nothing
        cols, rows = cols[::2], [rows[0], None, rows[2], None]
    layers = {"conv1": (rows, taps(fixed(2), 9)), "conv2": (fixed(3), cols)}
    skips = [("conv1", 2, "not read by any linear layer")] if between == "slice_step2" else []
    check_units(om.conv_chain(between), layers, skips)


STOPPING = {
    "clip": "feeds Clip 'mid', which is not positively homogeneous",
    "hardswish": "feeds HardSwish 'mid', which is not positively homogeneous",
    "pad_value": "feeds Pad 'mid' with a non-zero constant",
    "pad_channels": "feeds Pad 'mid', which pads the unit axis",
    "resize_channels": "feeds Resize 'mid', which resizes the unit axis",
    "nhwc_pool": "feeds GlobalAveragePool 'mid', which pools over the unit axis",
    "div_by_units": "divides in Div 'mid'",
    "mul_self": "feeds Mul 'mid' with scaled units on both inputs",
    "reshape_split_add": "feeds Add 'mid' with the unit axis spread over several axes",
    "reduce_channels": "feeds ReduceMean 'mid'",
    "batchnorm_input_mean": "feeds BatchNormalization 'mid' whose parameters cannot be rescaled",
}


@pytest.mark.parametrize("between", sorted(STOPPING))
def test_ops_that_stop_the_channel_scales(between):
    model = om.conv_chain(between)
    n_in = analyse(model).layers[1].weight.shape[1]
    layers = {"conv1": (fixed(CH), taps(fixed(2), 9)), "conv2": (fixed(3), fixed(n_in))}
    check_units(model, layers, [("conv1", CH, STOPPING[between])], n_groups=0)


LN_STOPS = "LayerNormalization normalises its input across the units"


def test_a_layernorm_stops_the_channels_it_normalises_and_makes_units_of_its_own():
    # conv1 [2, 4, 6, 6] -> LayerNormalization over the width (scale [6]) -> conv2: the
    # normalisation's units lie on the width, which conv2 reads as positions, not channels
    model = om.conv_chain("layernorm")
    layers = {
        "conv1": (fixed(CH), taps(fixed(2), 9)),
        "mid": (fixed(6), fixed(1)),
        "conv2": (fixed(3), fixed(CH)),
    }
    skips = [
        ("conv1", CH, f"activation feeds 'mid': {LN_STOPS}"),
        ("mid", 6, "activation feeds 'conv2', which reads it transposed"),
    ]
    check_units(model, layers, skips, n_groups=0)


def test_constants_rescaled_with_the_channels_they_meet():
    # a BatchNormalization after the Relu: its mean and bias scale with conv1's units
    units = analyse(om.conv_chain("batchnorm_alone"))
    assert [(e.tensor, e.row_axis) for e in units.edits] == [("mid_bias", 0), ("mid_mean", 0)]
    assert [names(units, e.row_groups) for e in units.edits] == [own("conv1", CH)] * 2
    # a [C, 1, 1] constant added to them
    units = analyse(om.conv_chain("add_channels"))
    assert [(e.tensor, e.row_axis) for e in units.edits] == [("k", 0)]
    # a constant that is the same for every channel: expanded to [C, 1, 1] first
    units = analyse(om.conv_chain("add_scalar"))
    assert [(e.tensor, e.row_axis, e.expand_to) for e in units.edits] == [("k", 0, (CH, 1, 1))]
    assert names(units, units.edits[0].row_groups) == own("conv1", CH)


def test_conv_batchnorm_moves_gamma_beta_not_the_conv():
    model = om.conv_chain("maxpool", bn=True)
    units = check_units(
        model,
        {"conv1": (own("conv1", CH), taps(fixed(2), 9)), "conv2": (fixed(3), own("conv1", CH))},
        [],
    )
    conv1, conv2 = units.layers
    # the rows move through BN scale and bias; the conv's inputs are fixed: no weight edit,
    # and the conv bias, BN mean and var are never edited
    assert [(e.tensor, e.row_axis) for e in conv1.edits] == [("bn1_scale", 0), ("bn1_bias", 0)]
    assert [e.tensor for e in conv2.edits] == ["conv2_W"]
    w = _init(model, "conv1_W").reshape(CH, -1).astype(np.float64)
    scale, var = _init(model, "bn1_scale"), _init(model, "bn1_var")
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    np.testing.assert_allclose(conv1.weight, w * factor[:, None], rtol=1e-6)


def test_batchnorm_folding_beyond_float32_is_done_in_float64():
    """A float32 weight near float32's largest value times a BN factor above 1 does not fit in
    float32: the folded weight is computed in float64, without an overflow warning."""
    import warnings

    model = om.conv_chain("maxpool", bn=True)
    stored = {t.name: t for t in model.graph.initializer}
    for name, value in (("conv1_W", -3.4e38), ("bn1_scale", 4.0), ("bn1_var", 1.0)):
        values = numpy_helper.to_array(stored[name]).copy()
        values.reshape(-1)[0] = value
        stored[name].CopyFrom(numpy_helper.from_array(values, name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv1 = analyse(model).layers[0]
    w = _init(model, "conv1_W").reshape(CH, -1).astype(np.float64)
    scale, var = _init(model, "bn1_scale"), _init(model, "bn1_var")
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    assert conv1.weight.dtype == np.float64 and np.isfinite(conv1.weight).all()
    np.testing.assert_allclose(conv1.weight, w * factor[:, None], rtol=1e-6)


@pytest.mark.parametrize(
    "spatial, group, stride",
    [(1, 1, False), (2, 1, True), (3, 1, False), (2, 2, False), (2, 4, True)],
)
def test_conv_dimensions_groups_and_default_attributes(spatial, group, stride):
    k = 3**spatial
    per_group = CH // group
    # row o of conv2 reads the input channels of its group, each over k taps
    grouped = [
        taps([f"conv1:{(o // per_group) * per_group + j}" for j in range(per_group)], k)
        for o in range(CH)
    ]
    layers = {
        "conv1": (own("conv1", CH), taps(fixed(2), k)),
        "conv2": (own("conv2", CH), grouped if group > 1 else taps(own("conv1", CH), k)),
        "conv3": (fixed(3), own("conv2", CH)),
    }
    check_units(om.conv_dims(spatial, group, stride), layers, [], n_groups=2 * CH)


def test_conv_transpose_group_1_is_a_layer_and_grouped_is_refused():
    layers = {
        "conv1": (own("conv1", CH), fixed(2)),
        "ct": (own("ct", 6), taps(own("conv1", CH), 4)),  # raw columns (input channel, tap)
        "conv3": (fixed(3), own("ct", 6)),
    }
    units = check_units(om.conv_transpose(1), layers, [])
    edit = units.layers[1].edits[0]
    assert (edit.row_axis, edit.col_axis) == (1, 0)  # weight [in, out, kh, kw]
    skips = [
        ("ct", 6, "ConvTranspose 'ct' with group 2 is not rescaled"),
        ("conv1", CH, "feeds ConvTranspose 'ct', which is not a rescalable linear layer"),
    ]
    layers = {"conv1": (fixed(CH), fixed(2)), "conv3": (fixed(3), fixed(6))}
    check_units(om.conv_transpose(2), layers, skips)


@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_depthwise_separable(act):
    depthwise_cols = [taps([f"stem:{o}"], 9) for o in range(CH)]
    dw_rows = own("dw", CH) if act == "relu" else fixed(CH)
    layers = {
        "stem": (own("stem", CH), taps(fixed(2), 9)),
        "dw": (dw_rows, depthwise_cols),
        "pw": (own("pw", 6), dw_rows),
        "fc": (fixed(om.OUT), own("pw", 6)),
    }
    skips = [] if act == "relu" else [("dw", CH, "feeds Clip 'relu6'")]
    check_units(om.dwsep(act), layers, skips)


def test_resnet_identity_block_ties_stem_and_second_conv():
    tied = own("stem", CH)  # a tied group is named after its first unit
    layers = {
        "stem": (tied, taps(fixed(CH), 9)),
        "c1": (own("c1", CH), taps(tied, 9)),
        "c2": (tied, taps(own("c1", CH), 9)),
        "fc": (fixed(om.OUT), tied),
    }
    check_units(om.resnet_block("identity"), layers, [], n_groups=2 * CH)


def test_resnet_projection_block_ties_second_conv_and_projection():
    tied = own("c2", 6)
    layers = {
        "stem": (own("stem", CH), taps(fixed(CH), 9)),
        "c1": (own("c1", 6), taps(own("stem", CH), 9)),
        "c2": (tied, taps(own("c1", 6), 9)),
        "proj": (tied, own("stem", CH)),
        "fc": (fixed(om.OUT), tied),
    }
    check_units(om.resnet_block("projection"), layers, [], n_groups=CH + 12)


def test_resnet_block_on_the_graph_input_fixes_the_residual_group():
    layers = {
        "c1": (own("c1", CH), taps(fixed(CH), 9)),
        "c2": (fixed(CH), taps(own("c1", CH), 9)),
        "fc": (fixed(om.OUT), fixed(CH)),
    }
    skips = [("c2", CH, "merged by Add 'add' with the graph input 'x' (scale 1)")]
    check_units(om.resnet_block("input"), layers, skips, n_groups=CH)


def test_residual_add_feeding_a_layer_without_relu_ties_the_group():
    # the Add's channels reach fc with no activation: a linear channel, tied across the Add
    layers = {
        "stem": (own("stem", CH), taps(fixed(CH), 9)),
        "c1": (own("c1", CH), taps(own("stem", CH), 9)),
        "c2": (own("stem", CH), taps(own("c1", CH), 9)),
        "fc": (fixed(om.OUT), own("stem", CH)),
    }
    check_units(om.resnet_block("identity", relu_after_add=False), layers, [], n_groups=2 * CH)


@pytest.mark.parametrize(
    "kind", ["concat_c", "concat_input", "concat_h", "sub", "sum3", "add_constant"]
)
def test_merges(kind):
    a_rows, b_rows = own("a", CH), own("b", CH)
    skips = []
    if kind == "concat_c":
        c_cols = own("a", CH) + own("b", CH)
    elif kind == "concat_input":
        c_cols, b_rows = own("a", CH) + fixed(2), fixed(CH)
    elif kind in ("concat_h", "sub"):
        b_rows = c_cols = own("a", CH)  # channel k of both branches: one tied group
    elif kind == "sum3":
        a_rows = b_rows = c_cols = fixed(CH)
        reason = "merged by Sum 'merge' with the graph input 'z' (scale 1)"
        skips = [("a", CH, reason), ("b", CH, reason)]
    else:  # a per-channel constant added to a's channels is rescaled with them
        c_cols = own("a", CH)
    layers = {
        "a": (a_rows, taps(fixed(2), 9)),
        "b": (b_rows, fixed(2)),
        "c": (fixed(3), c_cols),
    }
    if kind == "add_constant":  # b's output is read by nothing: output units, no skip record
        layers["b"] = (fixed(CH), fixed(2))
    check_units(om.merges(kind), layers, skips)


@pytest.mark.parametrize("kind", ["flatten", "reshape", "nhwc", "mean"])
def test_flatten_and_reshape_map_channels_to_columns(kind):
    conv = own("conv", CH)
    # NCHW Flatten: column j is channel j // 9; channels last: column j is channel j % 4
    cols = {"nhwc": conv * 9, "mean": conv}.get(kind, [label for label in conv for _ in range(9)])
    layers = {
        "conv": (conv, taps(fixed(2), 9)),
        "fc1": (own("fc1", 5), cols),
        "fc2": (fixed(om.OUT), own("fc1", 5)),
    }
    check_units(om.flatten_reshape(kind), layers, [], n_groups=CH + 5)


def test_flatten_of_an_unknown_spatial_size_stops():
    layers = {"conv": (fixed(CH), taps(fixed(2), 9)), "fc": (fixed(om.OUT), fixed(36 * CH))}
    skips = [("conv", CH, "shape of 'act_out' cannot be inferred")]
    check_units(om.dynamic_flatten(), layers, skips)


def test_gemm_batchnorm():
    layers = {
        "fc1": (own("fc1", HID), fixed(om.IN)),
        "fc2": (own("fc2", HID), own("fc1", HID)),
        "fc3": (fixed(om.OUT), own("fc2", HID)),
    }
    units = check_units(om.gemm_bn(), layers, [])
    assert [e.tensor for e in units.layers[0].edits] == ["bn1_scale", "bn1_bias"]
    assert [e.tensor for e in units.layers[1].edits] == ["fc2_W", "bn2_scale", "bn2_bias"]
    assert units.layers[1].edits[0].row_groups is None  # fc2's rows move through BN only

    # a BN scale shared by both BNs: each BN reads a private copy, so both layers' rows move
    units = check_units(om.gemm_bn(shared_scale=True), layers, [])
    assert [(c.name, c.source, c.readers) for c in units.copies] == [
        ("shared_scale.bn1", "shared_scale", ((1, 1),)),
        ("shared_scale.bn2", "shared_scale", ((4, 1),)),
    ]
    assert [e.tensor for e in units.layers[0].edits] == ["shared_scale.bn1", "bn1_bias"]


@pytest.mark.parametrize("transposed", [False, True])
def test_transformer_ffn(transposed):
    # ln0's channels are units of their own, but the residual Add ties them to ff2's rows, and
    # ln1 normalises the sum: all fixed
    layers = {
        "ln0": (fixed(8), fixed(1)),
        "ff1": (own("ff1", 16), fixed(8)),
        "ff2": (fixed(8), own("ff1", 16)),
        "ln1": (fixed(8), fixed(1)),
    }
    skips = [("ln0", 8, f"activation feeds 'ln1': {LN_STOPS}")]
    units = check_units(om.ffn(transposed=transposed), layers, skips, n_groups=16)
    edit = units.layers[1].edits[0]
    # a weight behind Transpose is edited where it is stored, as [out, in]
    want = ("ff1_Wt", 0, 1) if transposed else ("ff1_W", 1, 0)
    assert (edit.tensor, edit.row_axis, edit.col_axis) == want


def test_conv_bias_from_an_add():
    layers = {
        "conv1": (own("conv1", CH), taps(fixed(2), 9)),
        "conv2": (own("conv2", 6), own("conv1", CH)),
        "conv3": (fixed(3), own("conv2", 6)),
    }
    units = check_units(om.conv_add_bias(), layers, [])
    biases = [(e.tensor, e.row_axis) for layer in units.layers[:2] for e in layer.edits[1:]]
    assert biases == [("b1", 1), ("b2", 0)]


def test_transformer_ffn_after_attention_style_heads():
    # v_proj's channels are split into 2 heads of 4, pass a Relu per entry and are joined back
    # in the same order: o_proj reads them as they were
    layers = {
        "ln0": (fixed(8), fixed(1)),
        "v_proj": (own("v_proj", 8), fixed(8)),
        "o_proj": (fixed(8), own("v_proj", 8)),
        "ff1": (own("ff1", 16), fixed(8)),
        "ff2": (fixed(8), own("ff1", 16)),
        "ln1": (fixed(8), fixed(1)),
    }
    tied = "tied by a merge to units of 'ln0', which are fixed"
    skips = [
        ("ln0", 8, f"activation feeds 'ln1': {LN_STOPS}"),
        ("o_proj", 8, f"{tied}: activation feeds 'ln1': {LN_STOPS}"),
    ]
    check_units(om.ffn(with_attention_reshape=True), layers, skips, n_groups=24)


def test_split_with_an_unused_part():
    layers = {
        "conv": (own("conv", 2) + fixed(4), taps(fixed(2), 9)),
        "a": (fixed(3), own("conv", 2)),
    }
    check_units(om.split_unused(), layers, [("conv", 4, "not read by any linear layer")])


def test_reshaped_channel_maps():
    from onnxbalance.analysis.passthrough import reshaped

    # Flatten of [N, 3, 2, 2]: columns 0-3 are channel 0, ...
    axis, index = reshaped((None, 3, 2, 2), -3, (None, 12), 3)
    assert axis == -1 and index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Squeeze / Unsqueeze keep the channel as one axis
    assert reshaped((2, 3, 1, 1), -3, (2, 3), 3)[1].tolist() == [0, 1, 2]
    assert reshaped((2, 3), -1, (2, 3, 1, 1), 3)[0] == -3
    # channels last then flattened: column j is channel j % 3
    axis, index = reshaped((None, 2, 2, 3), -1, (None, 12), 3)
    assert index.tolist() == [0, 1, 2] * 4
    # Flatten(axis=2) puts the channel into the rows: [2*3, 4], row r is channel r % 3
    axis, index = reshaped((2, 3, 2, 2), -3, (6, 4), 3)
    assert axis == -2 and index.tolist() == [0, 1, 2, 0, 1, 2]
    # splitting the channel axis into heads has no single-axis map
    assert reshaped((2, 5, 8), -1, (2, 5, 2, 4), 8) is None
    assert reshaped((None, 3, None, 2), -3, (None, 12), 3) is None


def test_shape_inference_does_not_need_weight_values():
    from onnxbalance.analysis.shapes import infer_shapes

    net = om.ConvNet("big_constants", seed=1)
    x = net.input("x", ["N", 16, 9, 9])
    w = net.const("W", np.ones((40, 16, 3, 3), np.float32), node=True)  # a Constant node
    h = net.relu(net.op("Conv", [x, w], "conv"), "act")
    net.output(net.op("Flatten", [h], "flat"))
    model = net.build()
    shapes = infer_shapes(model)
    assert shapes["act_out"] == (None, 40, 7, 7)
    assert shapes["flat_out"] == (None, 40 * 49)
    # the copy given to shape inference holds no weight values
    from onnxbalance.tensors import without_weights

    light = without_weights(model)
    assert light.ByteSize() < 2000 < model.ByteSize()


def test_shape_inference_names_unknown_sizes_unless_the_name_is_a_placeholder():
    """Sizes named alike are equal (the input's 'batch' stays 'batch' after a Relu); a name an
    input gives two of its sizes ('?' for every dynamic size) tells nothing and is dropped."""
    from onnxbalance.analysis.shapes import infer_shapes

    for dims, want in ((["batch", "time", 6], ("batch", "time", None)), (["?", "?", 6], None)):
        net = om.Net("names")
        net.output(net.op("Relu", [net.input("x", dims)], "act"))
        symbols = infer_shapes(net.build()).symbols
        assert symbols["act_out"] == (want or (None, None, None))
        assert symbols["x"] == symbols["act_out"]


_ABSURD_TARGET = """
import logging, resource, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper as nh
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the old ONNX call takes it all
from onnxbalance.analysis.shapes import infer_shapes
logging.basicConfig(stream=sys.stdout, format="%(message)s")
big = nh.from_array(np.array([2**57 + 1], np.int64), "big")  # one flipped bit of [1]
nodes = [
    helper.make_node("Constant", [], ["big"], value=big),
    helper.make_node("Reshape", ["one", "big"], ["end"]),
    helper.make_node("Shape", ["x"], ["s"]),
    helper.make_node("Slice", ["s", "zero", "end"], ["head"]),
    helper.make_node("Concat", ["head", "minus"], ["target"], axis=0),
    helper.make_node("Reshape", ["x", "target"], ["y"]),
]
graph = helper.make_graph(
    nodes, "absurd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    [nh.from_array(np.array(v, np.int64), n)
     for n, v in (("one", 1), ("zero", [0]), ("minus", [-1]))],
)
shapes = infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
print("shape of s:", shapes.get("s"))
"""


def test_a_target_asking_for_an_absurd_size_does_not_exhaust_memory():
    """ONNX's data propagation builds whatever size a Reshape target asks for: a fuzzed model
    with 2**57 + 1 in one took all 24 GB of a test machine. Such a model is inferred without
    data propagation (under a 3 GB address-space limit, where the old call runs out)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _ABSURD_TARGET], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "shape inference failed" not in run.stdout
    assert "a size of more than 2**40 is asked for" in run.stdout
    assert "shape of s: (2,)" in run.stdout


def test_nodes_stored_out_of_order_are_analysed_in_dependency_order():
    model = om.resnet_block("projection")
    expected = analyse(model)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    units = analyse(model)
    assert units.n_groups == expected.n_groups
    # same groups on the same rows and columns, up to the groups' numbering
    renamed: dict[int, int] = {FIXED: FIXED}
    want = {layer.name: layer for layer in expected.layers}
    for layer in units.layers:
        other = want[layer.name]
        for got, ref in (
            (layer.row_groups, other.row_groups),
            (layer.col_groups, other.col_groups),
        ):
            for g, r in zip(np.ravel(got).tolist(), np.ravel(ref).tolist(), strict=True):
                assert renamed.setdefault(g, r) == r
    assert len(set(renamed.values())) == len(renamed)


@pytest.mark.parametrize("bounds, moves", [((0.0,), True), ((0.0, 6.0), False), ((), True)])
def test_clip_is_an_activation_only_with_bounds_0_and_infinity(bounds, moves):
    net = om.Net("clip_bounds")
    z = net.gemm(net.input("x", ["N", om.IN]), om.IN, HID, "fc1")
    limits = [net.const(f"c{k}", np.float32(b)) for k, b in enumerate(bounds)]
    net.output(net.gemm(net.op("Clip", [z, *limits], "clip"), HID, om.OUT, "fc2"))
    if moves:  # no bounds: Clip is the identity, and fc1 feeding fc2 linearly still moves
        check(net.build(), MLP, [])
    else:
        reason = "not positively homogeneous"
        check(net.build(), {"fc1": (None, None), "fc2": (None, None)}, [("fc1", HID, reason)])


def test_without_inferred_shapes_ranks_come_from_the_layers():
    # a custom op hides every shape downstream: a conv's output rank is still known from its
    # weight, so MaxPool and Split pass; Flatten needs H and W, so it stops
    from onnx import helper

    net = om.ConvNet("custom_op", seed=1)
    x = net.input("x", [2, 2, 6, 6])
    net.nodes.append(helper.make_node("Foo", [x], ["foo"], name="foo", domain="com.example"))
    h = net.relu(net.conv("foo", 2, CH, "conv1", pads=[1] * 4), "act1")
    h = net.op("MaxPool", [h], "pool", kernel_shape=[2, 2])
    net.nodes.append(helper.make_node("Split", [h], ["s0", "s1"], name="split", axis=1))
    h = net.relu(net.conv("s1", 2, CH, "conv2"), "act2")
    y = net.gemm(net.op("Flatten", [h], "flat"), CH, om.OUT, "fc")
    graph = helper.make_graph(
        net.nodes,
        "custom_op",
        net.inputs,
        [helper.make_tensor_value_info(name, 1, None) for name in (y, "s0")],
        net.initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    layers = {
        "conv1": ([None, None, "conv1:2", "conv1:3"], fixed(2 * 9)),
        "conv2": (fixed(CH), taps(["conv1:2", "conv1:3"], 9)),
        "fc": (fixed(om.OUT), fixed(CH)),
    }
    skips = [
        ("conv1", 2, "activation 's0' is a graph output"),
        ("conv2", CH, "shape of 'act2_out' cannot be inferred"),
    ]
    check_units(model, layers, skips)


def test_group_names_are_made_when_read_and_compare_as_sequences():
    units = analyse(om.deep_mlp(3))
    names = units.group_names
    eager = tuple(names)  # iterating names every group
    assert len(eager) == len(names) == units.n_groups and len(set(eager)) == len(eager)
    assert names == eager and names == list(eager) and names != eager[:-1]
    assert names != (*eager[:-1], "other:0") and names != "not a sequence of names"
    assert names[-1] == eager[-1] and names[1:3] == eager[1:3]
    with pytest.raises(TypeError):
        hash(names)
