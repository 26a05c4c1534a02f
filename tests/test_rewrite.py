"""rewrite(): random log-scales (no solver) must leave every model's function unchanged, touch
only the edited tensors, keep their dtype/storage, and leave units that cannot move bit-exact."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_models as om
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxbalance import tensors
from onnxbalance.analysis import analyse
from onnxbalance.errors import UnsupportedModelError
from onnxbalance.rewrite import rewrite
from onnxbalance.unitgraph import FIXED, LinearUnits, ModelUnits, TensorEdit

RUNNABLE = {
    "gemm_b1": lambda: om.gemm_mlp(trans_b=1),
    "gemm_b0": lambda: om.gemm_mlp(trans_b=0),
    "gemm_alpha_beta_nodes": lambda: om.gemm_mlp(trans_b=0, alpha=0.7, beta=1.3, node=True),
    "gemm_bias_row": lambda: om.gemm_mlp(bias="row"),
    "gemm_bias_scalar": lambda: om.gemm_mlp(trans_b=0, bias="scalar"),
    "gemm_bias_one": lambda: om.gemm_mlp(bias="one", node=True),
    "gemm_no_bias": lambda: om.gemm_mlp(bias=None),
    "deep": lambda: om.deep_mlp(5, trans_b=0),
    "trans_a_first": lambda: om.gemm_trans_a(first=True),
    "trans_a_second": lambda: om.gemm_trans_a(first=False),
    "matmul_add": lambda: om.matmul_mlp(),
    "matmul_add_first": lambda: om.matmul_mlp(bias_first=True),
    "matmul_bias_row_first": lambda: om.matmul_mlp(bias="row", bias_first=True),
    "matmul_bias_scalar": lambda: om.matmul_mlp(bias="scalar"),
    "matmul_no_bias": lambda: om.matmul_mlp(bias=None),
    "matmul_nodes_3d": lambda: om.matmul_mlp(node=True, batch_dims=2, bias="scalar"),
    "leaky": lambda: om.activations("leaky"),
    "prelu_scalar": lambda: om.activations("prelu_scalar"),
    "prelu_vec": lambda: om.activations("prelu_vec"),
    "fan_out": om.fan_out,
    "hidden_is_output": om.hidden_is_output,
    "shape_reader": om.shape_reader,
    "shared_weight": om.shared_weight,
    "sigmoid": lambda: om.blocker("Sigmoid"),
    "clip": lambda: om.blocker("Clip"),
    "weight_is_input": om.weight_is_input,
    "no_relu": om.no_relu,
    "linear_linear": om.linear_linear,
    "dequantized": om.dequantized,
    "qlinear": om.qlinear,
    "subgraph": om.subgraph,
    "float64": om.float64_mlp,
    "typed_storage": om.typed_storage,
    # convolutions, BN, pass-through ops, merges
    # (2 / Relu output divides by zero: analysis only)
    **{f"conv_{b}": (lambda b=b: om.conv_chain(b)) for b in om.BETWEEN if b != "div_by_units"},
    "conv_bn_maxpool": lambda: om.conv_chain("maxpool", bn=True),
    **{
        f"conv{d}d_g{g}": (lambda d=d, g=g, s=s: om.conv_dims(d, g, s))
        for d, g, s in [(1, 1, False), (2, 1, True), (3, 1, False), (2, 2, False), (2, 4, True)]
    },
    "conv_transpose_g1": lambda: om.conv_transpose(1),
    "conv_transpose_g2": lambda: om.conv_transpose(2),
    "dwsep_relu": lambda: om.dwsep("relu"),
    "dwsep_relu6": lambda: om.dwsep("relu6"),
    "resnet_identity": lambda: om.resnet_block("identity"),
    "resnet_projection": lambda: om.resnet_block("projection"),
    "resnet_input": lambda: om.resnet_block("input"),
    "resnet_no_relu_after_add": lambda: om.resnet_block("identity", relu_after_add=False),
    **{
        f"merge_{k}": (lambda k=k: om.merges(k))
        for k in ("concat_c", "concat_input", "concat_h", "sub", "sum3")
    },
    "merge_add_constant": lambda: om.merges("add_constant"),
    **{
        f"flatten_{k}": (lambda k=k: om.flatten_reshape(k))
        for k in ("flatten", "reshape", "nhwc", "mean")
    },
    "gemm_bn": om.gemm_bn,
    "gemm_bn_shared": lambda: om.gemm_bn(shared_scale=True),
    "ffn": om.ffn,
    "ffn_transposed": lambda: om.ffn(transposed=True),
    "conv_add_bias": om.conv_add_bias,
    "ffn_heads": lambda: om.ffn(with_attention_reshape=True),
    "split_unused": om.split_unused,
}


def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    stored = {t.name for t in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        if value.name in stored:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 5 for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            out[value.name] = np.array(True)
        else:
            out[value.name] = rng.normal(size=shape).astype(dtype)
    return out


def run(model: onnx.ModelProto, inputs) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, inputs)


def max_error(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """Largest difference, relative to each output's scale."""
    worst = 0.0
    for a, b in zip(reference, other, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.abs(a).max()
        assert scale > 0, "a zero output proves nothing"
        worst = max(worst, float(np.abs(a - b).max() / scale))
    return worst


def moving(units: ModelUnits) -> set[str]:
    return {
        e.tensor
        for e in [e for layer in units.layers for e in layer.edits] + list(units.edits)
        if any(
            g is not None and (np.asarray(g) != FIXED).any() for g in (e.row_groups, e.col_groups)
        )
    }


def random_scales(units: ModelUnits, seed: int = 1, spread: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=spread, size=units.n_groups)


def stored(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def with_copies(model: onnx.ModelProto, units: ModelUnits) -> onnx.ModelProto:
    """The model with the private copies made by hand, before any rescaling."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for private in units.copies:
        tensor = copy.graph.initializer.add()
        tensor.CopyFrom(private.value)
        tensor.name = private.name
        for i, slot in private.readers:
            assert copy.graph.node[i].input[slot] == private.source
            copy.graph.node[i].input[slot] = private.name
    return copy


def without(model: onnx.ModelProto, names: set[str]) -> bytes:
    """The model's bytes with the named tensors' data blanked out."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(keep)
    for node in copy.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            node.attribute[0].t.Clear()
    return copy.SerializeToString(deterministic=True)


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_random_scales_preserve_the_function(name):
    model = RUNNABLE[name]()
    before = model.SerializeToString()
    units = analyse(model)
    balanced = rewrite(model, units, random_scales(units))
    assert model.SerializeToString() == before  # input untouched
    inputs = feeds(model)
    tolerance = 1e-12 if name == "float64" else 1e-5
    assert max_error(run(model, inputs), run(balanced, inputs)) <= tolerance

    # only the edited tensors differ; everything else (nodes, names, order, opsets, ir_version,
    # producer, metadata, doc strings, value_info, other tensors) is byte-identical, once the
    # private copies are appended and their readers renamed
    edited = moving(units)
    expected = with_copies(model, units)
    assert without(expected, edited) == without(balanced, edited)
    old, new = stored(expected), stored(balanced)
    names = [t.name for t in expected.graph.initializer]
    assert names == [t.name for t in balanced.graph.initializer]
    for tensor in edited:
        assert new[tensor].data_type == old[tensor].data_type
        assert new[tensor].name == old[tensor].name
        assert not new[tensor].external_data


def test_the_equivalence_check_has_teeth():
    # dropping fc1's bias edit, or rescaling fc1 without its outgoing columns, changes outputs
    model = om.gemm_mlp()
    units = analyse(model)
    u = random_scales(units)
    inputs = feeds(model)
    reference = run(model, inputs)
    fc1, fc2 = units.layers
    no_bias = dataclasses.replace(fc1, edits=fc1.edits[:1])
    broken = [
        dataclasses.replace(units, layers=(no_bias, fc2)),
        dataclasses.replace(units, layers=(fc1, dataclasses.replace(fc2, edits=()))),
    ]
    for wrong in broken:
        assert max_error(reference, run(rewrite(model, wrong, u), inputs)) > 1e-3


HAND_UNCHANGED = {
    # tensors whose units all stay at scale 1, read off the architecture
    "gemm_b1": ({"fc2_b"}, {"fc1_W", "fc1_b", "fc2_W"}),
    "hidden_is_output": ({"fc1_W", "fc1_b", "fc3_b"}, {"fc2_W", "fc2_b", "fc3_W"}),
    "shared_weight": (
        {"W", "fc1_b", "fc2_b", "fc3_b", "fc4_W", "fc4_b"},
        {"fc0_W", "fc0_b", "fc1_W"},
    ),
    "sigmoid": ({"fc2_b", "fc4_b"}, {"fc1_W", "fc1_b", "fc2_W", "fc3_W", "fc3_b", "fc4_W"}),
    "weight_is_input": ({"fc1_W", "fc1_b", "fc3_b"}, {"fc2_W", "fc2_b", "fc3_W"}),
    # fc1 -> fc2 with no activation between: a linear channel, rescaled like a hidden one
    "linear_linear": ({"fc3_b"}, {"fc1_W", "fc1_b", "fc2_W", "fc2_b", "fc3_W"}),
    "trans_a_second": ({"fc1_W", "fc1_b", "fc2_W", "fc2_b"}, set()),
}


def _check_unchanged_tensors(name: str, unchanged: set, changed: set, complete: bool) -> None:
    """Rescale model ``name`` at random scales: ``unchanged`` keep their bytes, ``changed``
    differ (and, if ``complete``, these are all its stored tensors)."""
    model = RUNNABLE[name]()
    units = analyse(model)
    balanced = rewrite(model, units, random_scales(units, spread=0.5))
    old, new = stored(model), stored(balanced)
    if complete:
        assert set(old) == unchanged | changed
    for tensor in unchanged:
        assert new[tensor].SerializeToString() == old[tensor].SerializeToString(), tensor
    for tensor in changed:
        assert not np.array_equal(
            numpy_helper.to_array(new[tensor]), numpy_helper.to_array(old[tensor])
        ), tensor


@pytest.mark.parametrize("name", sorted(HAND_UNCHANGED))
def test_fixed_units_stay_bit_identical(name):
    _check_unchanged_tensors(name, *HAND_UNCHANGED[name], complete=True)


def test_nothing_to_move_gives_identical_bytes():
    model = om.no_relu()
    units = analyse(model)
    assert units.n_groups == 0
    balanced = rewrite(model, units, np.zeros(0))
    assert balanced.SerializeToString(deterministic=True) == model.SerializeToString(
        deterministic=True
    )


def test_storage_style_and_broadcast_bias_expansion():
    model = om.typed_storage()  # fc1_W in float_data
    balanced = rewrite(model, analyse(model), random_scales(analyse(model)))
    fc1_w = stored(balanced)["fc1_W"]
    assert len(fc1_w.float_data) == om.HID * om.IN and not fc1_w.raw_data
    assert stored(balanced)["fc2_W"].raw_data  # raw stays raw

    model = om.gemm_mlp(bias="scalar")
    balanced = rewrite(model, analyse(model), random_scales(analyse(model)))
    assert list(stored(model)["fc1_b"].dims) == []
    assert list(stored(balanced)["fc1_b"].dims) == [om.HID]
    old_b2 = stored(model)["fc2_b"].SerializeToString()
    assert stored(balanced)["fc2_b"].SerializeToString() == old_b2  # output rows: untouched


@pytest.mark.parametrize("trans_b", [1, 0])
def test_several_edits_compose_and_grouped_columns(trans_b):
    model = om.gemm_mlp(trans_b=trans_b)  # fc1_W: (6, 4) rows on axis 0, or (4, 6) on axis 1
    stored_w = numpy_helper.to_array(stored(model)["fc1_W"]).astype(np.float64)
    w = stored_w if trans_b else stored_w.T
    r, c = (0, 1) if trans_b else (1, 0)
    n = om.HID + om.IN
    u = np.random.default_rng(3).normal(size=n)
    rows = np.arange(om.HID)
    cols = np.arange(om.HID, n)
    per_row_cols = np.tile(cols[::-1], (om.HID, 1))  # 2-D: column unit depends on the row
    per_row_cols[0] = FIXED
    edits = (
        TensorEdit("fc1_W", row_axis=r, row_groups=rows),
        TensorEdit("fc1_W", col_axis=c, col_groups=cols),
        TensorEdit("fc1_W", row_axis=r, row_groups=rows, col_axis=c, col_groups=per_row_cols),
    )
    units = ModelUnits((LinearUnits("a", w, rows, cols, edits),), tuple(f"g{k}" for k in range(n)))
    got = numpy_helper.to_array(stored(rewrite(model, units, u))["fc1_W"])
    grouped = np.where(per_row_cols == FIXED, 0.0, u[np.maximum(per_row_cols, 0)])
    expected = w * np.exp(2 * u[rows])[:, None] * np.exp(-u[cols])[None, :] * np.exp(-grouped)
    assert got.dtype == np.float32
    expected = expected if trans_b else expected.T
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)


def test_float16_keeps_dtype_and_overflow_is_reported():
    net = om.Net("f16", dtype=np.float16)
    h = net.relu(net.gemm(net.input("x", ["N", om.IN]), om.IN, om.HID, "fc1"), "act1")
    net.output(net.gemm(h, om.HID, om.OUT, "fc2"))
    model = net.build()
    units = analyse(model)
    balanced = rewrite(model, units, random_scales(units))
    assert stored(balanced)["fc1_W"].data_type == onnx.TensorProto.FLOAT16
    with pytest.raises(UnsupportedModelError, match="fc1_W"):
        rewrite(model, units, np.full(units.n_groups, 30.0))


def test_wrong_number_of_scales():
    model = om.gemm_mlp()
    units = analyse(model)
    with pytest.raises(ValueError, match="log-scales"):
        rewrite(model, units, np.zeros(units.n_groups + 1))


@pytest.mark.parametrize("seed", range(24))
def test_random_chains_keep_their_function(seed):
    model = om.random_chain(seed)
    units = analyse(model)
    balanced = rewrite(model, units, random_scales(units, seed=seed, spread=2.0))
    inputs = feeds(model, seed)
    assert max_error(run(model, inputs), run(balanced, inputs)) <= 2e-5


CONV_UNCHANGED = {
    # (tensors bit-for-bit unchanged, tensors that change), read off the architecture
    "dwsep_relu6": (
        # the depthwise conv feeds ReLU6: its bias and BN stay; the stem's and the pointwise
        # conv's rows move through their BN scale/bias, their inputs are fixed: weights stay
        {"dw_b", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var", "stem_W", "pw_W", "fc_b"},
        {"bn0_scale", "bn0_bias", "dw_W", "bn2_scale", "bn2_bias", "fc_W"},
    ),
    "conv_bn_maxpool": (
        {"conv1_W", "conv1_b", "bn1_mean", "bn1_var", "conv2_b"},
        {"bn1_scale", "bn1_bias", "conv2_W"},
    ),
    "conv_clip": ({"conv1_W", "conv1_b", "conv2_W", "conv2_b"}, set()),
    "conv_hardswish": ({"conv1_W", "conv1_b", "conv2_W", "conv2_b"}, set()),
    # the Add's channels feed fc linearly: stem and c2 rows move together, fc's columns follow
    "resnet_no_relu_after_add": (
        {"fc_b"},
        {"stem_W", "stem_b", "c1_W", "c1_b", "c2_W", "c2_b", "fc_W"},
    ),
    "merge_sum3": ({"a_W", "a_b", "b_W", "b_b", "c_W", "c_b"}, set()),
    "ffn": ({"ff2_b", "g0", "b0", "g1", "b1"}, {"ff1_W", "ff1_b", "ff2_W"}),
}


@pytest.mark.parametrize("name", sorted(CONV_UNCHANGED))
def test_tensors_of_fixed_units_stay_bit_identical(name):
    _check_unchanged_tensors(name, *CONV_UNCHANGED[name], complete=False)


@pytest.mark.parametrize("seed", range(60))
def test_random_conv_nets_keep_their_function(seed):
    model = om.random_conv_net(seed)
    units = analyse(model)
    balanced = rewrite(model, units, random_scales(units, seed=seed, spread=1.5))
    inputs = feeds(model, seed)
    assert max_error(run(model, inputs), run(balanced, inputs)) <= 5e-5
    assert without(model, moving(units)) == without(balanced, moving(units))


def _ulps_from_exact(got: np.ndarray, w: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Distance, in float32 units in the last place, from the exactly rounded w * factor."""
    exact = (w.astype(np.float64) * factor).astype(np.float32)
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(exact))


@pytest.mark.parametrize(("spread", "within"), [(3.0, 2.0), (40.0, 0.0)])
def test_rescaled_weights_are_within_two_ulps_and_exact_for_extreme_factors(spread, within):
    # Ordinary factors: float32 arithmetic, at most 2 ulps from the exactly rounded product.
    # Factors up to e^+-40 each (2^+-115 combined): float64 arithmetic, exactly rounded.
    from onnxbalance.rewrite import rescaled_blocks, scales_of

    rng = np.random.default_rng(11)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    tensor = numpy_helper.from_array(w, "W")
    u = rng.uniform(-spread, spread, 500)
    rows, cols = np.arange(300), np.arange(300, 500)
    edit = TensorEdit("W", row_axis=0, row_groups=rows, col_axis=1, col_groups=cols)
    shape, dtype, blocks = rescaled_blocks(tensor, [edit], scales_of(u))
    got = np.concatenate(list(blocks))
    factor = np.exp(u[rows])[:, None] * np.exp(-u[cols])[None, :]
    assert shape == w.shape and dtype == np.float32 and got.dtype == np.float32
    assert _ulps_from_exact(got, w, factor).max() <= within
    if within:
        assert (_ulps_from_exact(got, w, factor) > 0).any()  # it was float32 arithmetic


def test_float64_weights_are_rescaled_in_float64():
    from onnxbalance.rewrite import rescaled_blocks, scales_of

    rng = np.random.default_rng(12)
    w = rng.standard_normal((50, 40))
    u = rng.normal(size=90)
    edit = TensorEdit("W", row_axis=0, row_groups=np.arange(50), col_axis=1,
                      col_groups=np.arange(50, 90))  # fmt: skip
    _, dtype, blocks = rescaled_blocks(numpy_helper.from_array(w, "W"), [edit], scales_of(u))
    expected = w * (np.exp(u[:50])[:, None] * np.exp(-u[50:])[None, :])
    np.testing.assert_allclose(np.concatenate(list(blocks)), expected, rtol=4e-16, atol=0)
    assert dtype == np.float64


NARROW = {"float16": np.dtype(np.float16), "bfloat16": tensors.BFLOAT16}


def float32_rule(w: np.ndarray, row_factor: np.ndarray, col_factor: np.ndarray) -> np.ndarray:
    """The documented arithmetic, with numpy's own casts: the weight in float32 times the
    float32 row factor times the float32 column factor (that product rounded first), rounded
    to the weight's dtype."""
    combined = row_factor.astype(np.float32)[:, None] * col_factor.astype(np.float32)[None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        return (w.astype(np.float32) * combined).astype(w.dtype)


def special_weights(dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """60x50 weights of ordinary size, with zeros, subnormals, huge values, infinities and NaNs
    (two payloads) in some rows only, so that some blocks hold them and others do not."""
    w = rng.standard_normal((60, 50)) * np.exp(rng.uniform(-6, 3, size=(60, 1)))
    w[3, :10] = [0.0, -0.0, 1e-7, -3e-6, 6e-8, 2e-5, -6e-5, 1e30, -1e30, 7e4]
    with np.errstate(over="ignore"):
        narrow = w.astype(dtype)  # float16: 1e30 and 7e4 are infinities there already
    bits = narrow.view(np.uint16)
    bits[9, 20:25] = [0x0001, 0x8003, 0x0040, 0x007F, 0x8001]  # subnormals of either dtype
    bits[17, 5] = 0x7C00 if dtype == np.float16 else 0x7F80  # +inf
    bits[17, 6] = 0xFC00 if dtype == np.float16 else 0xFF80  # -inf
    bits[41, 0] = 0x7E01 if dtype == np.float16 else 0x7FC1  # NaN, a payload
    bits[41, 1] = 0xFD55 if dtype == np.float16 else 0xFFA5  # negative signalling NaN
    return narrow


@pytest.mark.parametrize("name", NARROW)
def test_narrow_weights_follow_the_float32_rule_bit_for_bit(monkeypatch, name):
    from onnxbalance import memory
    from onnxbalance.rewrite import rescaled_blocks, scales_of

    rng = np.random.default_rng(5)
    w = special_weights(NARROW[name], rng)
    u = rng.uniform(-3, 3, 110)
    rows, cols = np.arange(60), np.arange(60, 110)
    edit = TensorEdit("W", row_axis=0, row_groups=rows, col_axis=1, col_groups=cols)
    data_type = onnx.TensorProto.FLOAT16 if name == "float16" else onnx.TensorProto.BFLOAT16
    monkeypatch.setattr(memory, "BLOCK_BYTES", 4 * 4 * 50 * 5)  # blocks of five rows
    _, dtype, blocks = rescaled_blocks(tensors.make_tensor("W", w, data_type), [edit], scales_of(u))
    parts = list(blocks)
    assert len(parts) == 12 and dtype == NARROW[name]
    got = np.concatenate(parts)
    expected = float32_rule(w, np.exp(u[rows]), np.exp(-u[cols]))
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
    wide, new = w.astype(np.float32), got.astype(np.float32)
    assert (np.isinf(new) == np.isinf(wide)).all()  # infinite weights stay, nothing else
    assert (np.sign(new[np.isinf(wide)]) == np.sign(wide[np.isinf(wide)])).all()
    assert (np.isnan(new) == np.isnan(wide)).all()
    tiny = float(np.finfo(np.float16).smallest_normal) if name == "float16" else 2.0**-126
    assert ((np.abs(new) < tiny) & (new != 0)).any()  # subnormal results are kept


@pytest.mark.parametrize("name", NARROW)
def test_overflow_of_a_narrow_dtype_is_refused_naming_the_tensor_and_its_edge_is_kept(name):
    from onnxbalance.rewrite import rescaled_blocks, scales_of

    dtype = NARROW[name]
    largest = tensors.max_finite(dtype)
    w = np.full((4, 3), 0.5, dtype=dtype)
    w[2, 1] = largest
    edit = TensorEdit("big_W", row_axis=0, row_groups=np.arange(4))
    data_type = onnx.TensorProto.FLOAT16 if name == "float16" else onnx.TensorProto.BFLOAT16
    tensor = tensors.make_tensor("big_W", w, data_type)
    # a factor just above 1 that still rounds back to the largest finite value: not refused
    nudge = 1 + 2.0**-13 if name == "float16" else 1 + 2.0**-10
    _, _, blocks = rescaled_blocks(tensor, [edit], scales_of(np.log([1, 1, nudge, 1])))
    assert np.concatenate(list(blocks))[2, 1] == largest
    _, _, blocks = rescaled_blocks(tensor, [edit], scales_of(np.log([1, 1, 1.5, 1])))
    with pytest.raises(UnsupportedModelError, match=f"'big_W' overflows {name}"):
        list(blocks)


@pytest.mark.parametrize("form", ["value_floats", "value_float"])
def test_a_bias_held_as_a_constants_list_of_floats_is_rescaled_into_a_tensor(form):
    # Constant(value_floats=...) is a bias like any other; rescaled, it becomes a value tensor
    from arch_reference import assert_equivalent
    from onnx import helper

    from onnxbalance import balance

    net = om.Net("listed_bias", seed=14)
    bias = net.rng.standard_normal(om.HID).astype(np.float32)
    listed = {"value_floats": bias.tolist()} if form == "value_floats" else {"value_float": 0.5}
    net.nodes.append(helper.make_node("Constant", [], ["b"], **listed))
    weight = net.rand("fc1_W", (om.HID, om.IN))
    h = net.relu(net.op("Gemm", [net.input("x", ["N", om.IN]), weight, "b"], "fc1", transB=1), "r")
    net.output(net.gemm(h, om.HID, om.OUT, "fc2", bias=None))
    model = net.build()
    feed = {"x": net.rng.standard_normal((8, om.IN)).astype(np.float32)}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == om.HID and report.verify.passed
    assert_equivalent(model, balanced, feed)
    (constant,) = [n for n in balanced.graph.node if n.op_type == "Constant"]
    assert [a.name for a in constant.attribute] == ["value"]
    value = numpy_helper.to_array(constant.attribute[0].t)  # a scalar: one entry per unit
    assert value.shape == (om.HID,)
    assert not np.allclose(value, bias if form == "value_floats" else 0.5)
