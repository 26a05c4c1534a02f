"""Units through Gather / GatherElements / run-time Slices and Reshapes, and channel shuffles.

Counts are derived by hand from the fixtures; every balanced model is run next to the original
in onnxruntime here, independently of the tool's own verification.
"""

from __future__ import annotations

import index_models as im
import numpy as np
import onnx
import pytest
from arch_reference import assert_equivalent
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx_models import IN, Net

from onnxbalance import balance
from onnxbalance.analysis import analyse
from onnxbalance.unitgraph import FIXED

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_models import export, export_dynamo, skewed  # noqa: E402 (needs torch)


def test_gather_on_the_unit_axis_selects_channels():
    model = im.gather_channels()
    units = analyse(model)
    fc1, fc2 = units.layers
    picked = [p % im.HID for p in im.PICKED]
    assert fc2.col_groups.tolist() == fc1.row_groups[picked].tolist()
    unread = sorted(set(range(im.HID)) - set(picked))
    assert (fc1.row_groups[unread] == FIXED).all()
    x = np.random.default_rng(0).normal(size=(8, IN)).astype(np.float32)
    balanced, report = balance(model, inputs={"x": x})
    assert report.units_balanced == len(set(picked)) == 4
    assert_equivalent(model, balanced, {"x": x})


def test_gather_and_slices_along_time_keep_channels():
    model = im.gather_time()
    x = np.random.default_rng(1).normal(size=(2, im.T, IN)).astype(np.float32)
    feed = {"x": x, "start": np.array([1], np.int64)}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == im.HID
    assert_equivalent(model, balanced, feed)
    assert_equivalent(model, balanced, {"x": x, "start": np.array([3], np.int64)})


class ShuffleBlock(nn.Module):
    """ShuffleNet-style: 1x1 conv -> channel shuffle (groups 2) -> depthwise 3x3 -> 1x1 -> head."""

    def __init__(self, channels: int = 8, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.expand = nn.Conv2d(3, channels, 1)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.project = nn.Conv2d(channels, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = torch.relu(self.expand(x))
        n, c, h, w = x.shape
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = torch.relu(self.depthwise(x))
        return self.head(torch.relu(self.project(x)))


@pytest.mark.parametrize("dynamo", [False, True])
def test_channel_shuffle(dynamo):
    module = skewed(ShuffleBlock(), seed=3)
    example = torch.randn(2, 3, 5, 5)
    model = export_dynamo(module, example) if dynamo else export(module, example)
    units = analyse(model)
    expand, depthwise = units.layers[0], units.layers[1]
    # shuffled channel j is channel (j % g) * (C / g) + j // g of the expand conv
    shuffled = [(j % 2) * 4 + j // 2 for j in range(8)]
    per_row = depthwise.col_groups.reshape(8, -1)  # depthwise: one channel, 9 taps per row
    assert (per_row == per_row[:, :1]).all()
    assert per_row[:, 0].tolist() == expand.row_groups[shuffled].tolist()
    feed = {model.graph.input[0].name: example.numpy()}
    balanced, report = balance(model, inputs=feed)
    # expand 8 + depthwise 8 + project 6; the head's 2 are outputs
    assert report.units_found == report.units_balanced == 8 + 8 + 6
    assert report.norm_after < report.norm_before
    assert_equivalent(model, balanced, feed)


class CRNN(nn.Module):
    """Conv features -> time steps (Transpose, Reshape, Gather per step) -> unrolled tanh RNN
    whose input weight every step reads -> a linear head on the last state."""

    def __init__(self, steps: int = 6) -> None:
        super().__init__()
        self.steps = steps
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1)
        self.ih = nn.Linear(6 * 2, 5)
        self.hh = nn.Linear(5, 5, bias=False)
        self.out = nn.Linear(5, 3)

    def forward(self, x):  # x: [N, 1, 4, steps]
        f = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # [N, 6, 2, steps]
        seq = f.permute(3, 0, 1, 2).reshape(self.steps, x.shape[0], 12)
        h = torch.tanh(self.ih(seq[0]))
        for t in range(1, self.steps):
            h = torch.tanh(self.ih(seq[t]) + self.hh(h))
        return self.out(h)


def _crnn():
    module = skewed(CRNN(), seed=5)
    example = torch.randn(2, 1, 4, 6)
    model = export(module, example)
    return model, {model.graph.input[0].name: example.numpy()}


def test_crnn_gather_per_time_step_passes_units():
    """The per-step Gathers (and the Transpose and Reshape before them) pass the conv units on:
    what stops them now is the input weight that all six steps read."""
    model, feed = _crnn()
    assert [n.op_type for n in model.graph.node].count("Gather") >= 6
    units = analyse(model)
    reasons = " ".join(s.reason for s in units.skipped)
    for op in ("Gather", "Transpose", "Reshape"):
        assert f"feeds {op}" not in reasons
    balanced, report = balance(model, inputs=feed)
    assert report.units_balanced >= 4  # conv1, whose only reader is conv2
    assert_equivalent(model, balanced, feed)


def test_crnn_balances_both_convs():
    """conv1 (4) and conv2 (6): the six readers of the input weight all see conv2's units the
    same way, so its columns are divided once; the RNN state passes tanh and stays fixed."""
    model, feed = _crnn()
    balanced, report = balance(model, inputs=feed)
    assert report.units_balanced == 4 + 6
    assert report.copied_tensors == 0  # edited once, in place
    assert_equivalent(model, balanced, feed)


@pytest.mark.parametrize(
    ("perm", "channels"), [((0, 2, 1, 3, 4), [0, 2, 1, 3]), ((0, 1, 3, 2, 4), None)]
)
def test_reshape_transpose_reshape_only_when_it_permutes_channels(perm, channels):
    model = im.reshape_transpose_reshape(perm)
    units = analyse(model)
    conv1, conv2 = units.layers
    if channels is None:
        assert (conv1.row_groups == FIXED).all()
        # the channels end up spread over the channel and row axes, which conv2 sums over
        assert "with its units spread over several axes" in units.skipped[0].reason
        return
    assert conv2.col_groups.tolist() == conv1.row_groups[channels].tolist()
    x = np.random.default_rng(4).normal(size=(1, 3, 2, 2)).astype(np.float32)
    balanced, report = balance(model, inputs={"x": x})
    assert report.units_balanced == 4
    assert_equivalent(model, balanced, {"x": x})


class FlattenByView(nn.Module):
    """Conv-Relu, then ``h.view(h.size(0), -1)`` into a Linear-Relu-Linear head: the classic
    classifier of pre-``torch.flatten`` code. With a dynamic batch the TorchScript exporter
    computes the view's target at run time: Concat(Unsqueeze(Gather(Shape(h), 0)), [-1])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 5 * 5, 7)
        self.fc2 = nn.Linear(7, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc2(torch.relu(self.fc1(h.view(h.size(0), -1))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_view_keeping_a_dynamic_batch_passes_the_units(dynamo):
    module = skewed(FlattenByView(), seed=5)
    example = torch.randn(2, 3, 5, 5)
    if dynamo:
        model = export_dynamo(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        model = export(module, example, dynamic_axes={"x": {0: "batch"}})
        assert "Shape" in [node.op_type for node in model.graph.node]  # computed target
    feed = {model.graph.input[0].name: np.random.default_rng(5).normal(size=(3, 3, 5, 5))}
    feed = {name: x.astype(np.float32) for name, x in feed.items()}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == 4 + 7
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    assert_equivalent(model, balanced, feed)


@pytest.mark.parametrize(
    ("target", "columns", "balanced"),
    [
        ("batch, -1", 100, 4),  # tf2onnx's Flatten of an NHWC tensor
        ("batch, 0, -1", 20, 4),  # 0 repeats the input's size there
        ("batch, 5, 20", 20, 4),
        ("-1, 100", 100, 4),  # no run-time entry: the -1 is the batch
        ("-1, batch", 1, 0),  # the batch moved behind the units
        ("batch, batch, -1", 1, 0),  # the batch twice: the -1 cannot be told
        ("other, -1", 1, 0),  # another input's size, unknown
    ],
)
def test_a_reshape_target_read_from_shapes_at_run_time(target, columns, balanced):
    model = im.nhwc_flatten_at_run_time(target, columns)
    units = analyse(model)
    assert units.n_groups == balanced
    if not balanced:  # (such a model need not run: only its analysis is looked at)
        assert "whose target shape is computed at run time" in units.skipped[0].reason
        return
    x = np.random.default_rng(6).normal(size=(3, 3, 5, 5)).astype(np.float32)
    feed = {"x": x, "other": np.zeros((2, 1), np.float32)}
    balanced_model, report = balance(model, inputs=feed)
    assert report.units_balanced == balanced
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    assert_equivalent(model, balanced_model, feed)


class WidthSequence(nn.Module):
    """The feature-to-sequence step of CRNN text recognisers: conv features [N, C, H, W] of an
    image of any width become W time steps of C * H values (``permute(3, 0, 1, 2)`` then
    ``view(w, n, c * h)``, a target computed from Shape, Gather and Mul), read by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2, 3)

    def forward(self, x):
        f = torch.relu(self.conv(x))  # [N, 4, 2, W]
        seq = f.permute(3, 0, 1, 2)
        w, n, c, h = seq.shape
        return self.fc(seq.reshape(w, n, c * h))


def test_a_sequence_of_columns_of_any_width_passes_the_units():
    module = skewed(WidthSequence(), seed=8)
    model = export(module, torch.randn(1, 1, 2, 5), opset=12, dynamic_axes={"x": {3: "width"}})
    assert "Mul" in [node.op_type for node in model.graph.node]  # c * h, computed
    feed = {"x": np.random.default_rng(8).normal(size=(1, 1, 2, 7)).astype(np.float32)}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == 4
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    assert_equivalent(model, balanced, feed)


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_and_unsqueeze_keep_the_unit_axis_whatever_the_other_sizes(opset):
    model = im.conv1d_through_conv2d(opset)
    units = analyse(model)
    assert units.n_groups == 4 + 5 and not units.skipped
    x = np.random.default_rng(11).normal(size=(2, 3, 9)).astype(np.float32)
    balanced, report = balance(model, inputs={"x": x})
    assert report.units_balanced == 4 + 5
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    assert_equivalent(model, balanced, {"x": x})


@settings(max_examples=24, deadline=None)
@given(
    form=st.sampled_from(im.SEQUENCE_FORMS),
    channels=st.integers(1, 4),
    height=st.integers(1, 3),
    batch=st.integers(1, 3),
    width=st.integers(1, 5),
)
def test_computed_reshapes_keep_the_function_for_any_sizes(form, channels, height, batch, width):
    """The channel map read from a run-time target holds whatever sizes the unknown dimensions
    take: onnxruntime runs the original and the balanced model on another batch and width than
    any the analysis saw. (One channel of height 1 lands on an axis of size 1 among others,
    which no map tells apart: not asked here.)"""
    assume(channels * height > 1)
    model = im.features_to_sequence(form, channels, height)
    units = analyse(model)
    assert units.n_groups == channels and not units.skipped
    width = 3 if form == "flat" else width
    x = np.random.default_rng(width).normal(size=(batch, 1, height, width)).astype(np.float32)
    balanced, report = balance(model, inputs={"x": x})
    assert report.units_balanced == channels
    assert_equivalent(model, balanced, {"x": x})


def _pixel_model(op: str, mode: str | None, channels: int) -> onnx.ModelProto:
    """x [2, 2, 4, 4] -> conv (``channels``) -> Relu -> ``op`` (blocksize 2) -> conv (3)."""
    rng = np.random.default_rng(5)
    after = channels // 4 if op == "DepthToSpace" else channels * 4
    options = {"mode": mode} if mode else {}
    w1 = rng.normal(size=(channels, 2, 1, 1)) * np.exp(rng.normal(size=(channels, 1, 1, 1)) * 2)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1"),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node(op, ["a"], ["m"], name="move", blocksize=2, **options),
            helper.make_node("Conv", ["m", "W2"], ["y"], name="conv2"),
        ],
        "pixels",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w1.astype(np.float32), "W1"),
            numpy_helper.from_array(rng.normal(size=(3, after, 1, 1)).astype(np.float32), "W2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("op", "mode", "channels", "shared"),
    [
        # output channel c of DepthToSpace holds input channels k*2 + c (DCR) or c*4 + k (CRD)
        ("DepthToSpace", None, 8, [[0, 2, 4, 6], [1, 3, 5, 7]]),
        ("DepthToSpace", "DCR", 8, [[0, 2, 4, 6], [1, 3, 5, 7]]),
        ("DepthToSpace", "CRD", 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        # SpaceToDepth spreads channel c over output channels k*2 + c: no tie
        ("SpaceToDepth", None, 2, [[0], [1]]),
    ],
)
def test_pixel_shuffles_tie_or_spread_the_channels(op, mode, channels, shared):
    model = _pixel_model(op, mode, channels)
    units = analyse(model)
    conv1, conv2 = units.layers
    groups = [sorted(set(conv1.row_groups[block].tolist())) for block in shared]
    assert all(len(g) == 1 and g[0] != FIXED for g in groups) and len({g[0] for g in groups}) == 2
    after = conv2.col_groups.reshape(-1)
    if op == "SpaceToDepth":
        assert after.tolist() == conv1.row_groups.tolist() * 4
    x = np.random.default_rng(1).normal(size=(2, 2, 4, 4)).astype(np.float32)
    balanced, report = balance(model, inputs={"x": x})
    assert report.units_balanced == 2 and report.verify.passed
    assert_equivalent(model, balanced, {"x": x})


def test_slices_at_sizes_computed_from_shapes_select_channels():
    # h[:, :half] and h[:, half:], half = h.shape[1] // 2 computed in the graph (Shape, Gather,
    # Div), as exporters that do not fold shapes write it: known before the model runs
    net = Net("computed_halves", seed=4)
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, 8, "fc1"), "relu")
    one, two = net.const("one", np.array([1])), net.const("two", np.array([2]))
    zero, end = net.const("zero", np.array([0])), net.const("end", np.array([2**62]))
    width = net.op("Gather", [net.op("Shape", [h], "shape"), one], "width")
    half = net.op("Div", [width, two], "half")
    first = net.gemm(net.op("Slice", [h, zero, half, one], "first"), 4, 3, "fc_a", bias=None)
    second = net.gemm(net.op("Slice", [h, half, end, one], "second"), 4, 3, "fc_b", bias=None)
    net.output(net.op("Add", [first, second], "join", output="y"))
    model = net.build()
    fc1, fc_a, fc_b = analyse(model).layers
    assert fc_a.col_groups.tolist() == fc1.row_groups[:4].tolist()
    assert fc_b.col_groups.tolist() == fc1.row_groups[4:].tolist()
    x = net.rng.normal(size=(8, IN)).astype(np.float32)
    balanced, report = balance(model, inputs={"x": x})
    assert report.units_found == report.units_balanced == 8
    assert_equivalent(model, balanced, {"x": x})
