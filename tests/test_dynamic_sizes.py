"""Test inputs for dynamic dimensions: sizes the input model runs on, names shared.

Exported detection and audio networks do not run at every size of their dynamic dimensions: an
FPN that halves the image side five times and doubles the top back needs sides of 32 or more,
an audio front end that pads its window by reflection needs more samples than the pad, and a
recurrent state named by the batch must have the batch's size. Out of the box, without
``--input-shape``, the tool must find sizes they run on, and say what it tried when it cannot.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from arch_reference import run
from onnx import TensorProto, helper, numpy_helper

from onnxbalance import balance
from onnxbalance.errors import InputError
from onnxbalance.report import verification_text
from onnxbalance.verify import BATCH, DRAWS, SIZES, compare_models, make_inputs, sizes_to_try

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_models import export, export_dynamo, randomise  # noqa: E402 (needs torch)


class Pyramid(nn.Module):
    """DBNet's neck in miniature: five stride-2 Conv-Relu stages, the top one upsampled twice
    and joined to the one below, a 1x1 head. At sides of 16 the two top maps are both 1x1, and
    the upsampled one does not fit."""

    def __init__(self) -> None:
        super().__init__()
        widths = [3, 4, 6, 6, 8, 8]
        self.stages = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in itertools.pairwise(widths)
        )
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = torch.relu(stage(x))
            features.append(x)
        top = nn.functional.interpolate(features[-1], scale_factor=2.0, mode="nearest")
        return self.head(torch.cat([features[-2], top], 1))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_an_fpn_with_dynamic_sides_is_verified_at_sides_it_runs_on(dynamo):
    module = randomise(Pyramid(), seed=1)
    example = torch.randn(1, 3, 64, 64)
    if dynamo:
        side = torch.export.Dim("side", min=32, max=2048)
        batch = torch.export.Dim("batch", max=64)
        model = export_dynamo(module, example, dynamic_shapes={"x": {0: batch, 2: side, 3: side}})
    else:
        axes = {"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}}
        model = export(module, example, dynamic_axes=axes)
    (name,) = [i.name for i in model.graph.input]
    with pytest.raises(InputError, match="cannot run the input model"):  # at the first size
        compare_models(model, model, input_shapes={name: (BATCH, 3, SIZES[0], SIZES[0])})

    balanced, report = balance(model)

    assert report.verify.passed and report.units_balanced == 4 + 6 + 6 + 8 + 8
    assert report.verify.input_shapes == {name: (BATCH, 3, SIZES[1], SIZES[1])}
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 128)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    (got,) = run(balanced, {name: x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


class Detector(nn.Module):
    """silero-vad's shape in miniature: samples padded by reflection, framed by a strided
    Conv1d, Relu, an LSTM that starts from a state input (batch on its second axis) and hands
    back its last state, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = nn.Conv1d(1, 6, 64, stride=32)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x, state):
        h = nn.functional.pad(x.unsqueeze(1), (0, 64), mode="reflect")
        h = torch.relu(self.frames(h)).transpose(1, 2)
        out, (h1, c1) = self.rnn(h, (state[:1], state[1:]))
        return self.head(out[:, -1]), torch.cat([h1, c1])


def _detector() -> tuple[nn.Module, onnx.ModelProto]:
    module = randomise(Detector(), seed=2)
    example = (torch.randn(1, 512), torch.zeros(2, 1, 5))
    model = export(
        module, example, input_names=["input", "state"], output_names=["prob", "state_out"],
        dynamic_axes={"input": {0: "batch", 1: "samples"}, "state": {1: "batch"},
                      "prob": {0: "batch"}, "state_out": {1: "batch"}},
    )  # fmt: skip
    return module, model


@pytest.mark.parametrize("named", [True, False])
def test_a_recurrent_state_gets_the_batch_and_samples_grow_until_the_pad_fits(named):
    """The state shares the batch's name, or names no dimension as silero_vad.onnx does (input
    [?, ?], state [2, ?, 128]): laid out as ONNX's LSTM states are, [directions, batch, hidden],
    its one dynamic dimension is the batch (as a sequence of 16 it failed at every size)."""
    module, model = _detector()
    if not named:
        for value in [*model.graph.input, *model.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                dim.ClearField("dim_param")
    assert sizes_to_try(model) == SIZES

    balanced, report = balance(model)

    assert report.verify.passed and report.units_balanced == 6
    assert report.verify.input_shapes == {"input": (BATCH, SIZES[2]), "state": (2, BATCH, 5)}
    # a given size of the batch reaches the state too, and the samples still grow
    _, report = balance(model, input_shapes={"input": (3, 100)})
    assert report.verify.input_shapes == {"input": (3, 100), "state": (2, 3, 5)}
    with torch.no_grad():
        x = torch.randn(2, 700)
        state = torch.randn(2, 2, 5)
        expected = [t.numpy() for t in module(x, state)]
    got = run(balanced, {"input": x.numpy(), "state": state.numpy()})
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_a_state_layout_without_a_batch_elsewhere_is_a_sequence():
    # [1, ?, 4] alone is a batch of one sequence (an embedding input); beside an input led by
    # a dynamic batch it is that batch; named, it follows its name
    def model(*inputs):
        values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs]
        nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n, _ in inputs]
        outputs = [helper.make_tensor_value_info(n + "_out", TensorProto.FLOAT, None)
                   for n, _ in inputs]  # fmt: skip
        return helper.make_model(helper.make_graph(nodes, "g", values, outputs))

    alone = make_inputs(model(("x", [1, None, 4])))[0]
    assert alone["x"].shape == (1, SIZES[0], 4)
    (feed,) = make_inputs(model(("x", [1, None, 4]), ("y", [None, 3])))
    assert feed["x"].shape == (1, BATCH, 4) and feed["y"].shape == (BATCH, 3)
    given = make_inputs(model(("x", [1, None, 4]), ("y", [None, 3])), input_shapes={"y": (5, 3)})
    assert given[0]["x"].shape == (1, 5, 4)
    (feed,) = make_inputs(model(("x", [1, "steps", 4]), ("y", [None, 3])))
    assert feed["x"].shape == (1, SIZES[0], 4)


def _reshaped(first: list, second: list, target: list[int]) -> onnx.ModelProto:
    """y = Reshape(x, target) + 0 * z: inputs x and z of the given dimensions."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "target"], ["r"]),
            helper.make_node("ReduceSum", ["z"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["t"]),
            helper.make_node("Add", ["r", "t"], ["y"]),
        ],
        "reshaped",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, first),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, second),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array(target, np.int64), "target"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dimensions_named_alike_share_one_size():
    model = _reshaped(["n", "t"], [2, "n", "t", "k", "", 3], [-1])
    (feed,) = make_inputs(model)
    assert feed["x"].shape == (BATCH, SIZES[0])
    assert feed["z"].shape == (2, BATCH, SIZES[0], SIZES[0], SIZES[0], 3)
    # sizes the caller gives reach the dimensions of the same name; no batch was chosen here
    draws = make_inputs(model, size=SIZES[1], input_shapes={"x": (3, 5)})
    assert len(draws) == DRAWS and draws[0]["z"].shape == (2, 3, 5, SIZES[1], SIZES[1], 3)


def test_sizes_are_tried_only_when_some_dimension_takes_them():
    assert sizes_to_try(_reshaped(["n", 4], [1], [-1])) == SIZES[:1]  # a batch alone
    assert sizes_to_try(_reshaped([2, 4], [1], [-1])) == SIZES[:1]
    assert sizes_to_try(_reshaped(["n", "t"], [1], [-1]), input_shapes={"x": (2, 3)}) == SIZES[:1]
    assert sizes_to_try(_reshaped(["n", "t"], [1], [-1])) == SIZES
    feed = {"x": np.ones((2, 3), np.float32), "z": np.ones(1, np.float32)}
    assert sizes_to_try(_reshaped(["n", "t"], [1], [-1]), inputs=feed) == SIZES[:1]


def test_a_model_that_runs_at_no_size_says_what_was_tried():
    model = _reshaped(["n", "t"], [1], [BATCH, 7])  # 8 x t never has 56 elements
    with pytest.raises(InputError) as caught:
        compare_models(model, model)
    message = str(caught.value)
    tried = ", ".join(map(str, SIZES[:-1])) + f" or {SIZES[-1]}"
    assert f"dynamic dimensions are {tried} (" in message and "--input-shape" in message
    assert "Reshape" in message and "\n" not in message
    with pytest.raises(InputError) as caught:  # sizes the caller gave are not changed
        compare_models(model, model, input_shapes={"x": (BATCH, 5)})
    assert "dynamic dimensions are" not in str(caught.value)
    # a model onnxruntime cannot even load is not tried again at other sizes
    broken = _reshaped(["n", "t"], [1], [-1])
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InputError, match="cannot run the input model: ") as caught:
        compare_models(broken, broken)
    assert "dynamic dimensions are" not in str(caught.value)


def _tail_network() -> onnx.ModelProto:
    """y = 1 + sum over t >= 300 of Relu(x[:, t] W1 + b1) W2, x [n, t, 4]: the hidden units see
    nothing of a shorter x, and y is then a constant that no weight moves (whole numbers are
    not weights, see verify.perturbed)."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "start", "end", "axis"], ["tail"]),
            helper.make_node("MatMul", ["tail", "W1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["a"]),
            helper.make_node("MatMul", ["a", "W2"], ["o"]),
            helper.make_node("ReduceSum", ["o", "axis"], ["s"], keepdims=0),
            helper.make_node("Add", ["s", "one"], ["y"]),
        ],
        "tail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(np.array([300], np.int64), "start"),
            numpy_helper.from_array(np.array([2**62], np.int64), "end"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
            numpy_helper.from_array((rng.standard_normal((4, 6)) * 3).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b1"),
            numpy_helper.from_array((rng.standard_normal((6, 3)) / 3).astype(np.float32), "W2"),
            numpy_helper.from_array(np.ones(3, np.float32), "one"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sizes_at_which_no_output_moves_with_the_weights_are_passed_over(caplog):
    model = _tail_network()

    _, report = balance(model)

    assert report.units_balanced == 6
    verified = report.verify
    assert verified.passed and not verified.insensitive and verified.max_abs_diff > 0
    assert verified.input_shapes == {"x": (BATCH, SIZES[3], 4)}
    # at a size the caller gives, the same emptiness is said out loud
    with caplog.at_level("WARNING", logger="onnxbalance"):
        _, report = balance(model, input_shapes={"x": (2, SIZES[2], 4)})
    assert report.verify.passed and report.verify.insensitive
    assert report.verify.to_dict()["insensitive"] is True
    assert "the inputs test nothing" in verification_text(report.verify)
    assert "no output moved when the weights were perturbed" in caplog.text
