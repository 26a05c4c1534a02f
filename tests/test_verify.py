"""Output comparison: equivalent models pass, changed ones fail, inputs follow declared types."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from gemm_mlp import add_relu_model, gemm_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxbalance import upcast
from onnxbalance.errors import InputError
from onnxbalance.verify import (
    BATCH,
    DRAWS,
    FACTOR,
    _Perturbation,
    _Rule,
    compare_models,
    compare_output,
    make_inputs,
    run_model,
)


def _perturbed(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name == name:
            array = numpy_helper.to_array(tensor) * np.float32(factor)
            tensor.CopyFrom(numpy_helper.from_array(array, name))
    return copy


def test_identical_models_pass_with_zero_difference():
    model = gemm_mlp([5, 7, 3], seed=0)
    result = compare_models(model, model)
    assert result.passed and bool(result)
    assert result.max_abs_diff == 0.0 and result.max_rel_diff == 0.0
    assert result.n_inputs == BATCH and result.draws == 1 and result.input_shapes == {"x": (8, 5)}
    assert [o.name for o in result.outputs] == ["y"] and result.outputs[0].shape == (8, 3)


def test_rescaled_equivalent_model_passes():
    # the same function with hidden units scaled by 1000 and 1e-3: only rounding differs
    original = gemm_mlp([10, 20, 20, 4], seed=1)
    rescaled = gemm_mlp([10, 20, 20, 4], seed=1, scale_hidden=[1e3, 1e-3])
    result = compare_models(original, rescaled)
    assert result.passed
    assert 0.0 < result.max_rel_diff < 1e-5


def test_changed_weight_fails_and_says_why():
    original = gemm_mlp([10, 20, 4], seed=2)
    changed = _perturbed(original, "W1", 1.01)
    result = compare_models(original, changed)
    assert not result.passed
    (failure,) = result.failures
    assert failure.name == "y" and "outside tolerance" in failure.reason
    assert result.max_abs_diff > 0


def test_all_zero_output_counts_as_failure():
    # Relu of a strongly negative pre-activation: the output is 0 for any test input
    model = gemm_mlp([3, 4], seed=0)
    for tensor in model.graph.initializer:
        if tensor.name == "B0":
            tensor.CopyFrom(numpy_helper.from_array(np.full(4, -1e6, np.float32), "B0"))
    relu = helper.make_node("Relu", ["y"], ["z"], "last_relu")
    model.graph.node.append(relu)
    model.graph.output[0].name = "z"
    result = compare_models(model, model)
    assert not result.passed
    assert "all zero" in result.outputs[0].reason


def test_seeded_inputs_are_reproducible_and_shapes_resolved():
    model = gemm_mlp([5, 6, 2], batch="N")
    (a,), (b,), (c,) = (make_inputs(model, seed=s) for s in (3, 3, 4))
    assert a["x"].shape == (BATCH, 5) and a["x"].dtype == np.float32
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    # no batch chosen by us: several independent draws instead
    draws = make_inputs(model, input_shapes={"x": (7, 5)})
    assert len(draws) == DRAWS and {d["x"].shape for d in draws} == {(7, 5)}
    assert not np.array_equal(draws[0]["x"], draws[1]["x"])


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"y": (1, 5)}, "not inputs of the model"),
        ({"x": (1, 5, 1)}, "rank 2"),
        ({"x": (0, 5)}, "positive"),
        ({"x": (2, 6)}, "model fixes 5"),
    ],
)
def test_bad_input_shapes(shapes, message):
    with pytest.raises(InputError, match=message):
        make_inputs(gemm_mlp([5, 6, 2]), input_shapes=shapes)


def test_integer_and_bool_inputs_are_generated():
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["idx"], ["fi"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["mask"], ["fm"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["fi", "fm"], ["s"]),
            helper.make_node("Add", ["s", "x"], ["y"]),
        ],
        "typed",
        [
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["B", 3]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 3]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = make_inputs(model, input_shapes={"idx": (4, 3), "mask": (4, 3), "x": (4, 3)})[0]
    assert feed["idx"].dtype == np.int64 and feed["mask"].dtype == np.bool_
    assert set(np.unique(feed["idx"])) <= {0, 1, 2, 3}
    assert compare_models(model, model, input_shapes={"idx": (4, 3), "mask": (4, 3),
                                                      "x": (4, 3)}).passed  # fmt: skip


def test_user_inputs_are_checked_and_used():
    model = gemm_mlp([5, 6, 2])
    x = np.arange(15, dtype=np.float32).reshape(3, 5)
    result = compare_models(model, model, inputs={"x": x})
    assert result.passed and result.outputs[0].shape == (3, 2)
    with pytest.raises(InputError, match="missing x"):
        compare_models(model, model, inputs={"z": x})
    with pytest.raises(InputError, match="dtype float64"):
        compare_models(model, model, inputs={"x": x.astype(np.float64)})


def test_tolerance_follows_the_noise_floor_and_the_compute_precision():
    ref = np.linspace(-1, 1, 50).astype(np.float32)
    noisy = (ref + np.float32(1e-4), None)  # the perturbed original: a noise floor of 1e-4
    within = compare_output("y", ref, ref + np.float32(0.9 * FACTOR * 1e-4), noisy)
    assert within.passed and within.noise_floor == pytest.approx(1e-4, rel=1e-3)
    outside = compare_output("y", ref, ref + np.float32(2 * FACTOR * 1e-4), noisy)
    assert not outside.passed
    assert outside.tolerance_ratio == pytest.approx(2 * FACTOR * 1e-4 / outside.atol, rel=1e-3)
    assert 1.9 < outside.tolerance_ratio < 2.1
    # no floor: FACTOR machine epsilons of the output's scale
    assert compare_output("y", ref, ref * np.float32(1 + 3e-7)).passed
    assert not compare_output("y", ref, ref * np.float32(1 + 1e-5)).passed
    # float16 work behind float32 outputs: float16's epsilon
    float16_work = _Rule(compute="float16")
    assert compare_output("y", ref, ref * np.float32(1 + 3e-3), rule=float16_work).passed
    # the caller's rtol/atol replace the rule
    fixed = _Rule(rtol=1e-2, atol=0.0)
    assert compare_output("y", ref, ref * np.float32(1 + 5e-3), rule=fixed).passed
    assert not compare_output("y", ref, ref + np.float32(1e-3), noisy, rule=_Rule(atol=1e-4)).passed


def test_integer_outputs_must_match_exactly():
    labels = np.array([0, 3, 7])
    assert compare_output("label", labels, labels.copy()).passed
    failed = compare_output("label", labels, np.array([0, 3, 6]))
    assert not failed.passed and "1 of 3" in failed.reason
    # a label output that happens to be all zero is fine: it is exact, not a blind check
    assert compare_output("label", np.zeros(3, np.int64), np.zeros(3, np.int64)).passed


def test_nan_and_shape_mismatch_fail():
    ref = np.ones(4, np.float32)
    bad = ref.copy()
    bad[1] = np.nan
    assert "non-finite" in compare_output("y", ref, bad).reason
    assert "shape" in compare_output("y", ref, np.ones(5, np.float32)).reason


def test_model_without_weights_runs():
    model = add_relu_model()
    assert compare_models(model, model).passed


def test_onnxruntime_failure_is_a_user_error():
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    with pytest.raises(InputError, match="onnxruntime cannot run the input model") as info:
        run_model(model, {"x": np.ones(2, np.float32)}, "the input model")
    assert "\n" not in str(info.value)


def test_zipmap_outputs_keep_their_declared_float_type():
    from onnxbalance.verify import _to_array

    rows = [{1: 0.25, 0: 0.75}, {0: 0.5, 1: 0.5}]
    array = _to_array(rows, "seq(map(int64,tensor(float)))")
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, [[0.75, 0.25], [0.5, 0.5]])
    assert _to_array(rows, "seq(map(int64,tensor(double)))").dtype == np.float64


OVERFLOWING_INPUTS = {
    "x": (100 * np.random.default_rng(0).standard_normal((3, 4))).astype(np.float32)
}


def test_an_overflow_that_balancing_removes_is_compared_in_float64():
    """The original's hidden layer (weights ~1e37) overflows float32 on inputs ~100; the
    balanced model computes the same function within range. Both run again in float64 and
    pass; a wrong model still fails there, and a model that overflows where the original did
    not fails outright."""
    overflowing = gemm_mlp([4, 6, 3], seed=5, scale_hidden=[1e37])
    balanced = gemm_mlp([4, 6, 3], seed=5)
    feed = OVERFLOWING_INPUTS
    assert not np.isfinite(run_model(overflowing, feed, "it")["y"]).all()
    assert np.isfinite(run_model(balanced, feed, "it")["y"]).all()
    result = compare_models(overflowing, balanced, inputs=feed)
    assert result.passed
    (output,) = result.outputs
    assert (
        output.reason == "the input model overflows float32 on the test inputs: compared in float64"
    )
    assert output.dtype == "float32" and output.rtol == 0 and output.noise_floor > 0
    assert 0 < output.max_rel_diff < 1e-5
    wrong = compare_models(overflowing, _perturbed(balanced, "W1", 1.01), inputs=feed)
    (failure,) = wrong.failures
    assert "compared in float64" in failure.reason and "outside tolerance" in failure.reason
    backwards = compare_models(balanced, overflowing, inputs=feed)
    assert backwards.failures[0].reason == "non-finite values differ"


def _one_by_one_convs(
    first: list[float], second: list[float], dtype: type = np.float32
) -> onnx.ModelProto:
    """Conv 1 -> 2 channels, Relu, Conv 2 -> 1 channel, all 1x1 kernels."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = [
        numpy_helper.from_array(np.array(first, dtype).reshape(2, 1, 1, 1), "A"),
        numpy_helper.from_array(np.array(second, dtype).reshape(1, 2, 1, 1), "B"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "A"], ["h"], "conv0"),
        helper.make_node("Relu", ["h"], ["r"], "relu0"),
        helper.make_node("Conv", ["r", "B"], ["y"], "conv1"),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", elem, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", elem, [1, 1, 2, 2])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float16_models_are_compared_again_in_float32_where_conv_runs():
    """onnxruntime's CPU runs float16 Conv chains through float32 (no overflow shows), so the
    rerun is called directly: float16 widens to float32, which has the range and the Conv
    kernels that float64 lacks."""
    from onnxbalance.verify import _compared_wider, _Source

    original = _one_by_one_convs([1000.0, 1.0], [1e-3, 1.0], np.float16)
    balanced = _one_by_one_convs([1.0, 1.0], [1.0, 1.0], np.float16)
    feed = {"x": np.full((1, 1, 2, 2), 100.0, np.float16)}
    failed = compare_output("y", np.full((1, 1, 2, 2), np.inf, np.float16), feed["x"] * 2)
    again = _compared_wider(_Source.of(original), _Source.of(balanced), [feed], [failed], _Rule())
    output = again["y"]
    assert output.passed and output.dtype == "float16"
    assert (
        output.reason == "the input model overflows float16 on the test inputs: compared in float32"
    )
    assert 0 < output.max_rel_diff < 1e-3  # 1e-3 is not exact in float16


def test_an_overflow_that_cannot_run_in_float64_still_fails_and_says_why():
    """onnxruntime has no float64 Conv on CPU: the failure stands, with the reason."""
    overflowing = _one_by_one_convs([1e37, 1.0], [1e-37, 1.0])
    balanced = _one_by_one_convs([1.0, 1.0], [1.0, 1.0])
    feed = {"x": np.full((1, 1, 2, 2), 100.0, np.float32)}
    result = compare_models(overflowing, balanced, inputs=feed)
    (failure,) = result.failures
    assert failure.reason.startswith("non-finite values differ: the input model overflows")
    assert "cannot run the models in float64" in failure.reason


def _with_huge_bias(dtype: type) -> onnx.ModelProto:
    """Hidden biases at the dtype's largest value and positive output weights: every output
    overflows to +inf."""
    model = gemm_mlp([4, 6, 3], seed=7, dtype=dtype)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if tensor.name == "B0":
            values = np.full_like(values, np.finfo(dtype).max)
        elif tensor.name == "W1":
            values = np.abs(values)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


def test_outputs_non_finite_everywhere_are_compared_in_float64_or_fail():
    """Nothing finite is left to compare in the model's own dtype: float32 runs again in
    float64 (and passes for the same function); float64 has nothing wider and fails."""
    everywhere = np.full(3, np.inf, np.float32)
    lost = compare_output("y", everywhere, everywhere.copy())
    assert (
        not lost.passed and lost.reason == "output is NaN or infinite everywhere on the test inputs"
    )
    model = _with_huge_bias(np.float32)
    assert not np.isfinite(run_model(model, make_inputs(model)[0], "it")["y"]).any()
    same = compare_models(model, model)
    assert same.passed and "compared in float64" in same.outputs[0].reason
    assert not compare_models(model, _perturbed(model, "W1", 1.01)).passed
    wide = _with_huge_bias(np.float64)
    (failure,) = compare_models(wide, wide).failures
    assert failure.reason == "output is NaN or infinite everywhere on the test inputs"


def test_nan_inputs_are_not_taken_for_an_overflow():
    """Every output is NaN because the inputs are: nothing to run again in float64."""
    model = gemm_mlp([4, 6, 3], seed=7)
    feed = {"x": np.full((2, 4), np.nan, np.float32)}
    (failure,) = compare_models(model, model, inputs=feed).failures
    assert failure.reason == "output is NaN or infinite everywhere on the test inputs"


def test_the_share_of_active_hidden_values_is_reported():
    """Counted by hand: the hidden Relu of a 4-8-3 MLP on the same inputs, run separately."""
    model = gemm_mlp([4, 8, 3], seed=3)
    result = compare_models(model, model)
    watched = onnx.ModelProto()
    watched.CopyFrom(model)
    hidden = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    watched.graph.output.append(onnx.ValueInfoProto(name=hidden))
    (feed,) = make_inputs(model)
    values = run_model(watched, feed, "it")[hidden]
    assert 0 < result.active_fraction < 1
    assert result.active_fraction == np.count_nonzero(values) / values.size
    assert result.to_dict()["active_fraction"] == result.active_fraction
    assert [o.name for o in result.outputs] == ["y"]  # the watched values are not compared
    assert compare_models(add_relu_model(), add_relu_model()).active_fraction is not None


def _saved_external(model: onnx.ModelProto, path) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data edits the model it is given
    onnx.save_model(copy, path, save_as_external_data=True, location=f"{path.name}.data",
                    size_threshold=0)  # fmt: skip


def _saved_pair(tmp_path, dtype, seed: int, scale_hidden: list[float]):
    """An MLP and the same function with its hidden units rescaled, saved with external data as
    a.onnx and b.onnx in ``tmp_path``; both returned in memory too."""
    original = gemm_mlp([6, 40, 30, 3], seed=seed, dtype=dtype)
    rescaled = gemm_mlp([6, 40, 30, 3], seed=seed, dtype=dtype, scale_hidden=scale_hidden)
    _saved_external(original, tmp_path / "a.onnx")
    _saved_external(rescaled, tmp_path / "b.onnx")
    return original, rescaled


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_weights_streamed_from_external_data_move_as_in_memory_ones(tmp_path, monkeypatch, dtype):
    # The perturbed weights of a model with external data (bfloat16: kept, and widened by Cast
    # nodes) are computed a few rows at a time: with blocks of 64 bytes every weight takes several,
    # and each output's noise floor must still equal the one of the same models given in
    # memory (converted and moved whole, same draws).
    original, rescaled = _saved_pair(tmp_path, dtype, seed=3, scale_hidden=[8.0, 0.25])
    stored = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    in_memory = compare_models(original, rescaled)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("onnxbalance.memory.BLOCK_BYTES", 64)
    streamed = compare_models(tmp_path / "a.onnx", tmp_path / "b.onnx", scratch=scratch)
    floors = [o.noise_floor for o in streamed.outputs]
    assert floors == [o.noise_floor for o in in_memory.outputs] and min(floors) > 0
    assert streamed.passed and in_memory.passed
    assert list(scratch.iterdir()) == []  # the perturbed copies are gone
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == stored


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_perturbed_weights_in_external_data_are_handed_over_in_memory(tmp_path, monkeypatch, dtype):
    # No copy of the model is written for the perturbed runs (a 2 GB model's took 2 GB of disk
    # and the time to write and read it): the only function that writes one must not be called,
    # and the figures are those of the same models given in memory, where each perturbed
    # weight is a fresh inline tensor.
    original, rescaled = _saved_pair(tmp_path, dtype, seed=5, scale_hidden=[4.0, 0.5])
    in_memory = compare_models(original, rescaled)

    def no_copy(*args, **kwargs):
        raise AssertionError("a copy of the model was written")

    monkeypatch.setattr("onnxbalance.safewrite.stage_model", no_copy)
    handed = compare_models(tmp_path / "a.onnx", tmp_path / "b.onnx", scratch=tmp_path / "none")
    figures = [(o.noise_floor, o.atol, o.max_abs_diff, o.passed) for o in handed.outputs]
    assert figures == [(o.noise_floor, o.atol, o.max_abs_diff, o.passed) for o in in_memory.outputs]
    assert handed.passed and min(o.noise_floor for o in handed.outputs) > 0
    broken = onnx.ModelProto()
    broken.CopyFrom(rescaled)
    weight = next(t for t in broken.graph.initializer if t.name == "W1")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * dtype(1.1), "W1"))
    _saved_external(broken, tmp_path / "c.onnx")
    assert not compare_models(tmp_path / "a.onnx", tmp_path / "c.onnx").passed


def test_held_weights_go_into_the_file_of_a_graph_too_big_for_one_message(tmp_path, monkeypatch):
    # Over protobuf's limit the graph reaches onnxruntime as a file: the perturbed weights held
    # in memory must be written into it, or the perturbed run would use the stored ones.
    original, rescaled = _saved_pair(tmp_path, np.float16, seed=6, scale_hidden=[4.0, 0.5])
    in_memory = compare_models(original, rescaled)
    monkeypatch.setattr("onnxbalance.verify._PROTOBUF_LIMIT", 100)
    staged = compare_models(tmp_path / "a.onnx", tmp_path / "b.onnx")
    figures = [(o.noise_floor, o.atol, o.max_abs_diff) for o in staged.outputs]
    assert figures == [(o.noise_floor, o.atol, o.max_abs_diff) for o in in_memory.outputs]
    assert staged.passed and min(o.noise_floor for o in staged.outputs) > 0


@pytest.mark.parametrize(("dtype", "eps"), [(np.float16, 2**-10), (ml_dtypes.bfloat16, 2**-7)])
def test_narrow_models_with_external_data_keep_their_own_round_off(tmp_path, dtype, eps):
    # The tolerance of a float16 or bfloat16 model read from external data is its dtype's:
    # 5 * (noise floor + eps * max|original|), the scale taken from the original run apart
    # (bfloat16 through the exact float32 conversion, float16 as it is).
    original, rescaled = _saved_pair(tmp_path, dtype, seed=8, scale_hidden=[2.0, 0.5])
    result = compare_models(tmp_path / "a.onnx", tmp_path / "b.onnx")
    runnable = upcast.to_float32(original) if dtype is ml_dtypes.bfloat16 else original
    feeds = make_inputs(runnable)
    scale = max(float(np.abs(run_model(runnable, f, "it")["y"]).max()) for f in feeds)
    (output,) = result.outputs
    assert output.passed and output.noise_floor > 0
    assert output.atol == pytest.approx(FACTOR * (output.noise_floor + eps * scale), rel=1e-12)


def test_outputs_own_their_memory():
    # onnxruntime returns arrays that may view its session's buffers, which then outlive the
    # session: for a float16 model all the float32 copies of its weights, one set per run kept
    model = gemm_mlp([6, 40, 3], seed=4, dtype=np.float16)
    outputs = run_model(model, {"x": np.ones((2, 6), np.float16)}, "the model")
    assert outputs["y"].flags.owndata and outputs["y"].shape == (2, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_weights_move_and_whole_number_structure_stays(dtype):
    # A weight moves when any of its finite values has a fraction, however far into it (the
    # first values are only looked at first); whole numbers, scalars and infinities are
    # structure (masks, scales, -inf fills) and stay, bit for bit.
    def tensor(values):
        return numpy_helper.from_array(np.asarray(values, dtype=dtype), "t")

    whole = np.arange(300_000, dtype=np.float64) % 7 - 3
    late_fraction = whole.copy()
    late_fraction[-5] = 0.5
    fills = np.where(whole > 0, -np.inf, 0.0)
    cases = [(whole, False), (late_fraction, True), (fills, False), ([2.5], False)]
    assert [_Perturbation.moves(tensor(v)) for v, _ in cases] == [m for _, m in cases]
    perturbation = _Perturbation(seed=0)
    for values, moves in cases:
        stored = tensor(values)
        moved = numpy_helper.to_array(perturbation.tensor(stored))
        same = np.array_equal(moved.view(np.uint8), numpy_helper.to_array(stored).view(np.uint8))
        assert same != moves
