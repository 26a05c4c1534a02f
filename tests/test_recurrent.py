"""Units read by the input weight of an LSTM, GRU or RNN (the conv features of a CRNN text
recogniser, a speech encoder's front end): x reaches the gates only through W, so W's columns
move with the units while its rows, R and the biases stay as they are. Every balanced model is
run next to the original in onnxruntime here.
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

from torch_models import export, export_dynamo, randomise  # noqa: E402 (needs torch)

CHANNELS, HEIGHT = 6, 2


class ConvRecurrent(nn.Module):
    """Conv-Relu features [N, C, H, W] -> W time steps of C * H values -> a recurrent layer ->
    a Linear head on its outputs."""

    def __init__(self, cell: type, bidirectional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.rnn = cell(CHANNELS * HEIGHT, 5, bidirectional=bidirectional)
        self.head = nn.Linear(5 * (2 if bidirectional else 1), 3)

    def forward(self, x):
        f = torch.relu(self.conv(x))  # [1, C, H, W]
        seq = f.permute(3, 0, 1, 2).reshape(f.shape[3], 1, CHANNELS * HEIGHT)
        out, _ = self.rnn(seq)
        return self.head(out)


def _module(cell: type, bidirectional: bool) -> nn.Module:
    module = randomise(ConvRecurrent(cell, bidirectional), seed=9).eval()
    with torch.no_grad():  # something to balance: conv channels of very different scales
        spread = torch.exp(torch.linspace(-2.0, 2.0, CHANNELS))
        module.conv.weight.mul_(spread.view(-1, 1, 1, 1))
        module.conv.bias.mul_(spread)
    return module


def _exported(cell: type, bidirectional: bool) -> onnx.ModelProto:
    return export(_module(cell, bidirectional), torch.randn(1, 1, HEIGHT, 7))


def _stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_units_read_by_a_recurrent_layer_move_its_input_weight_columns(cell, bidirectional):
    model = _exported(getattr(nn, cell), bidirectional)
    (node,) = [n for n in model.graph.node if n.op_type == cell]
    units = analyse(model)
    recurrent = [layer for layer in units.layers if layer.name == node.name]
    assert len(recurrent) == 1 and (recurrent[0].row_groups == -1).all()  # gates never move
    assert units.n_groups == CHANNELS and not units.skipped  # the gates count as no unit

    feed = {"x": np.random.default_rng(9).normal(size=(1, 1, HEIGHT, 7)).astype(np.float32)}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == CHANNELS
    assert report.norm_after < report.norm_before * (1 - 1e-2)
    assert_equivalent(model, balanced, feed)

    before, after = _stored(model), _stored(balanced)
    w, r = node.input[1], node.input[2]
    ratio = after[w] / before[w]  # [directions, gates * hidden, C * H]: one factor per column
    assert np.allclose(ratio, ratio[:1, :1, :], rtol=1e-5)
    # the columns of one channel share its factor: C * H columns hold C channels
    per_channel = ratio[0, 0].reshape(CHANNELS, HEIGHT)
    assert np.allclose(per_channel, per_channel[:, :1], rtol=1e-5)
    assert not np.allclose(per_channel, 1.0, rtol=1e-3)
    assert np.array_equal(after[r], before[r])
    if len(node.input) > 3 and node.input[3]:
        assert np.array_equal(after[node.input[3]], before[node.input[3]])


class Recogniser(nn.Module):
    """A CRNN text recogniser on an image of any width: conv features [1, C, 2, W], turned into
    W time steps ``squeeze`` (features pooled to height 1, then ``squeeze(2)``) or ``view`` way
    (``view(n, c * h, w)``, w kept), then ``permute(2, 0, 1)`` into a bidirectional LSTM."""

    def __init__(self, to_sequence: str) -> None:
        super().__init__()
        self.to_sequence = to_sequence
        self.conv = nn.Conv2d(1, CHANNELS, 3, padding=1)
        rows = 1 if to_sequence == "squeeze" else HEIGHT
        self.rnn = nn.LSTM(CHANNELS * rows, 5, bidirectional=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        if self.to_sequence == "squeeze":
            f = nn.functional.max_pool2d(f, (HEIGHT, 1)).squeeze(2)
        else:
            n, c, h, w = f.shape
            f = f.view(n, c * h, w)
        return self.head(self.rnn(f.permute(2, 0, 1))[0])


@pytest.mark.parametrize("to_sequence", ["squeeze", "view"])
def test_a_recogniser_of_any_width_balances_its_features(to_sequence):
    module = randomise(Recogniser(to_sequence), seed=10).eval()
    model = export(module, torch.randn(1, 1, HEIGHT, 7), dynamic_axes={"x": {3: "width"}})
    feed = {"x": np.random.default_rng(10).normal(size=(1, 1, HEIGHT, 11)).astype(np.float32)}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == CHANNELS
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    assert_equivalent(model, balanced, feed)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize(
    ("cell", "exporter"),  # the dynamo exporter writes an RNN as its steps' MatMuls and Tanhs
    [("LSTM", "torchscript"), ("GRU", "torchscript"), ("RNN", "torchscript"), ("LSTM", "dynamo"),
     ("GRU", "dynamo")],
)  # fmt: skip
def test_an_export_without_constant_folding_balances_like_the_folded_one(
    cell, exporter, bidirectional
):
    # Without constant folding (do_constant_folding=False, or inside an If branch, where none
    # applies; the dynamo exporter without its optimiser, which slices at multiples of a Shape,
    # and with it for weights of realistic size) torch writes each direction's input weight as
    # Unsqueeze(Concat(Slice(W, gate rows), ...)), joined by a Concat: the stored W's columns
    # move then, and both exports reach the same minimum.
    module = _module(getattr(nn, cell), bidirectional)
    example = torch.randn(1, 1, HEIGHT, 7)
    folded = export(module, example)
    if exporter == "torchscript":
        unfolded = export(module, example, fold=False)
    else:
        unfolded = export_dynamo(module, example, optimize=False)
    (node,) = [n for n in unfolded.graph.node if n.op_type == cell]
    assert node.input[1] not in _stored(unfolded)  # computed at run time from the stored W
    x = np.random.default_rng(9).normal(size=(1, 1, HEIGHT, 7)).astype(np.float32)
    (_, expected), (balanced, report) = (
        balance(m, inputs={m.graph.input[0].name: x}) for m in (folded, unfolded)
    )
    assert report.units_found == report.units_balanced == CHANNELS
    assert report.norm_before == pytest.approx(expected.norm_before, rel=1e-12)
    assert report.norm_after == pytest.approx(expected.norm_after, rel=1e-9)
    assert_equivalent(unfolded, balanced, {unfolded.graph.input[0].name: x})

    before, after = _stored(unfolded), _stored(balanced)
    directions = [n for n in before if n.endswith(("weight_ih_l0", "weight_ih_l0_reverse"))]
    assert len(directions) == (2 if bidirectional else 1)
    factors = [after[w] / before[w] for w in directions]  # [gates * hidden, C * H] each
    per_channel = np.concatenate(factors).reshape(-1, CHANNELS, HEIGHT)
    assert np.allclose(per_channel, per_channel[:1, :, :1], rtol=1e-5)  # a factor per channel
    assert not np.allclose(per_channel, 1.0, rtol=1e-3)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == {*directions, "conv.weight", "conv.bias"}


def _slices_of_stored_rows(rows: list[tuple[int, int]], extra_reader: bool) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> LSTM (hidden 2) whose input weight is Unsqueeze(Concat(Slice(W,
    rows), ...)); ``extra_reader``: W's first rows are also a graph output."""
    rng = np.random.default_rng(3)
    stored = [
        numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "first"),
        numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(1, 8, 2)).astype(np.float32), "R"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "first"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
    ]
    for k, (start, end) in enumerate(rows):
        stored += [
            numpy_helper.from_array(np.array([start], np.int64), f"start{k}"),
            numpy_helper.from_array(np.array([end], np.int64), f"end{k}"),
        ]
        nodes.append(helper.make_node("Slice", ["W", f"start{k}", f"end{k}", "axis0"], [f"g{k}"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 2])]
    if extra_reader:
        nodes.append(helper.make_node("Slice", ["W", "start0", "end0", "axis0"], ["seen"]))
        outputs.append(helper.make_tensor_value_info("seen", TensorProto.FLOAT, None))
    nodes += [
        helper.make_node("Concat", [f"g{k}" for k in range(len(rows))], ["gates"], axis=0),
        helper.make_node("Unsqueeze", ["gates", "axis0"], ["Wx"]),
        helper.make_node("LSTM", ["a", "Wx", "R"], ["y"], hidden_size=2),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 4])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, stored)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("rows", "extra_reader", "reason"),
    [
        ([(4, 8), (0, 4)], False, None),
        ([(0, 2), (6, 8), (4, 6), (2, 4)], False, None),
        ([(0, 4), (0, 4)], False, "input weight 'Wx' is not stored"),  # rows 4-7 unread
        ([(0, 6), (4, 8)], False, "input weight 'Wx' is not stored"),  # rows 4, 5 twice
        ([(4, 8), (0, 4)], True, "weight 'W' is also read outside the input weight 'Wx'"),
    ],
)
def test_gates_reordered_by_slices_move_the_stored_weight_only_when_it_is_theirs(
    rows, extra_reader, reason
):
    model = _slices_of_stored_rows(rows, extra_reader)
    units = analyse(model)
    fixed = [skip.reason for skip in units.skipped]
    if reason is None:
        assert units.n_groups == 3 and not fixed
        balanced, report = balance(model)
        assert report.units_balanced == 3 and report.verify.passed
        assert not np.array_equal(_stored(balanced)["W"], _stored(model)["W"])
    else:
        assert any(reason in why for why in fixed), fixed


def test_directions_joined_for_a_recurrent_layer_and_read_elsewhere_stay():
    model = export(_module(nn.LSTM, True), torch.randn(1, 1, HEIGHT, 7), fold=False)
    (node,) = [n for n in model.graph.node if n.op_type == "LSTM"]
    joined = node.input[1]
    model.graph.node.append(onnx.helper.make_node("Identity", [joined], ["seen"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("seen", 1, None))
    units = analyse(model)
    reasons = [(skip.count, skip.reason) for skip in units.skipped]
    assert reasons == [(CHANNELS, f"activation feeds '/rnn/LSTM': input weight '{joined}' is "
                                  "also read elsewhere")]  # fmt: skip


def test_the_dynamo_exporters_default_bidirectional_lstm_balances():
    # its optimiser folds no constant this large: each direction's input weight stays gate rows
    # sliced from the stored one and joined (so the layer is matched through them)
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Linear(32, 128)
            self.rnn = nn.LSTM(128, 256, bidirectional=True, batch_first=True)

        def forward(self, x):
            return self.rnn(torch.relu(self.features(x)))[0]

    module = randomise(Tagger(), seed=11).eval()
    example = torch.randn(2, 5, 32)
    model = export_dynamo(module, example)
    (node,) = [n for n in model.graph.node if n.op_type == "LSTM"]
    feed = {model.graph.input[0].name: example.numpy()}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == 128
    assert report.norm_after < report.norm_before * (1 - 1e-2)
    assert_equivalent(model, balanced, feed)
    before, after = _stored(model), _stored(balanced)
    for name in ("rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse"):
        assert not np.array_equal(before[name], after[name])
    assert node.input[1] not in before  # the unfolded form this test is about
