"""Models whose hidden units pass Gather, GatherElements and run-time Slices, built with
onnx.helper (see tests/test_index_maps.py for the torch exports)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx_models import IN, OUT, Net

HID = 6
PICKED = [4, 0, 2, 2, -1]  # channels 1 and 3 are not picked: nothing reads them


def gather_channels() -> onnx.ModelProto:
    """fc1 (HID units) -> Relu -> Gather(axis=1, PICKED) -> fc2 reading len(PICKED) columns."""
    net = Net("gather_channels")
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "act1")
    picked = net.op("Gather", [h, net.const("picked", np.array(PICKED, np.int64))], "pick", axis=1)
    net.output(net.gemm(picked, len(PICKED), OUT, "fc2"))
    return net.build()


T = 4


def gather_time() -> onnx.ModelProto:
    """x [2, T, IN] -> MatMul + bias (HID units) -> Relu -> h [2, T, HID], then three ways
    along the time axis, joined by Concat on that axis, then a MatMul reading HID columns:
    Gather(h, [3, 1], axis=1), GatherElements(h, constant indices [2, 3, HID], axis=1) and a
    Slice of h whose start is a graph input (known only at run time)."""
    net = Net("gather_time")
    x = net.input("x", [2, T, IN])
    start = net.input("start", [1], elem=TensorProto.INT64)
    h = net.relu(net.matmul(x, IN, HID, "fc1"), "act1")
    steps = net.op("Gather", [h, net.const("steps", np.array([3, 1], np.int64))], "steps", axis=1)
    where = net.rng.integers(0, T, size=(2, 3, HID)).astype(np.int64)
    mixed = net.op("GatherElements", [h, net.const("where", where)], "mixed", axis=1)
    ends, axes = net.const("ends", np.array([T], np.int64)), net.const("axes", np.array([1]))
    tail = net.op("Slice", [h, start, ends, axes], "tail")
    joined = net.op("Concat", [steps, mixed, tail], "join", axis=1)
    net.output(net.matmul(joined, HID, OUT, "fc2"))
    return net.build()


def reshape_transpose_reshape(perm: tuple[int, ...]) -> onnx.ModelProto:
    """x [1, 3, 2, 2] -> 1x1 conv (4 channels) -> Relu -> Reshape [1, 2, 2, 2, 2] ->
    Transpose(perm) -> Reshape [1, 4, 2, 2] -> 1x1 conv (2 channels). (0, 2, 1, 3, 4) swaps
    the two halves of the channels: a permutation; (0, 1, 3, 2, 4) swaps the low half of the
    channels with the rows: channel and position mix."""
    net = Net("reshape_transpose_reshape")
    x = net.input("x", [1, 3, 2, 2])
    h = net.op("Conv", [x, net.rand("c1_W", (4, 3, 1, 1))], "conv1")
    h = net.relu(h, "act1")
    split = net.op("Reshape", [h, net.const("split", np.array([1, 2, 2, 2, 2]))], "split")
    moved = net.op("Transpose", [split], "move", perm=list(perm))
    back = net.op("Reshape", [moved, net.const("back", np.array([1, 4, 2, 2]))], "back")
    net.output(net.op("Conv", [back, net.rand("c2_W", (2, 4, 1, 1))], "conv2"))
    return net.build()


def nhwc_flatten_at_run_time(target: str, columns: int) -> onnx.ModelProto:
    """x [batch, 3, 5, 5] -> 3x3 conv (4 channels) -> Relu -> Transpose to NHWC -> Reshape to a
    target computed at run time, as tf2onnx writes a Keras Flatten -> MatMul reading
    ``columns`` columns. ``target`` lists its entries: sizes, "batch" (x's leading size, read
    with Shape and Slice) or "other" (the leading size of another input, [n, 1])."""
    net = Net("nhwc_flatten_at_run_time")
    x = net.input("x", ["batch", 3, 5, 5])
    other = net.input("other", ["n", 1])
    h = net.op("Conv", [x, net.rand("conv_W", (4, 3, 3, 3))], "conv", pads=[1, 1, 1, 1])
    nhwc = net.op("Transpose", [net.relu(h, "act")], "nhwc", perm=[0, 2, 3, 1])
    first, one = net.const("first", np.array([0])), net.const("one", np.array([1]))
    leading = {
        name: net.op("Slice", [net.op("Shape", [tensor], f"{name}_shape"), first, one], name)
        for name, tensor in (("batch", nhwc), ("other", other))
    }
    entries = [
        leading[entry] if entry in leading else net.const(f"size{k}", np.array([int(entry)]))
        for k, entry in enumerate(target.split(", "))
    ]
    shape = net.op("Concat", entries, "target", axis=0)
    net.output(net.matmul(net.op("Reshape", [nhwc, shape], "flatten"), columns, OUT, "fc"))
    return net.build()


def conv1d_through_conv2d(opset: int) -> onnx.ModelProto:
    """x [batch, 3, length] -> Conv1d (4 channels) -> Relu -> Unsqueeze at axis 2 -> a 1x3
    Conv2d (5 channels) -> Relu -> Squeeze of axis 2 -> Conv1d (2 channels), with batch and
    length unknown (axes as an attribute before opset 13, as an input from it on)."""
    net = Net(f"conv1d_through_conv2d_{opset}")
    x = net.input("x", ["batch", 3, "length"])
    pad = {"pads": [1, 1]}
    h = net.relu(net.op("Conv", [x, net.rand("c1_W", (4, 3, 3))], "conv1", **pad), "act1")
    axes = {"axes": [2]} if opset < 13 else {}
    ins = [] if opset < 13 else [net.const("axes", np.array([2]))]
    h = net.op("Unsqueeze", [h, *ins], "to_2d", **axes)
    h = net.op("Conv", [h, net.rand("c2_W", (5, 4, 1, 3))], "conv2", pads=[0, 1, 0, 1])
    h = net.op("Squeeze", [net.relu(h, "act2"), *ins], "to_1d", **axes)
    net.output(net.op("Conv", [h, net.rand("c3_W", (2, 5, 1))], "conv3"))
    return net.build(opset)


SEQUENCE_FORMS = ("width last", "width first", "minus one last", "flat")


def features_to_sequence(form: str, channels: int, height: int) -> onnx.ModelProto:
    """x [batch, 1, height, width] (batch and width unknown) -> 3x3 conv (``channels``) ->
    Relu -> a Reshape whose target is computed from Shape nodes -> a MatMul reading the
    channels' axis, the forms CRNNs and flattening heads take:

    * "width last": [n, c * h, w] (then Transpose to [n, w, c * h]);
    * "width first": Transpose to [w, n, c, h], then [w, n, c * h];
    * "minus one last": [n, c * h, -1], the -1 standing for w (then Transpose);
    * "flat": [n, -1] (the MatMul then reads c * h * w columns: the width is fixed to 3).
    """
    net = Net(f"features_to_sequence_{form.replace(' ', '_')}")
    width = 3 if form == "flat" else "width"
    x = net.input("x", ["batch", 1, height, width])
    h = net.op("Conv", [x, net.rand("conv_W", (channels, 1, 3, 3))], "conv", pads=[1, 1, 1, 1])
    h = net.relu(h, "act")
    if form == "width first":
        h = net.op("Transpose", [h], "steps", perm=[3, 0, 1, 2])
    shape = net.op("Shape", [h], "shape")

    def size(axis: int) -> str:
        index = net.const(f"axis{axis}", np.array([axis]))
        return net.op("Gather", [shape, index], f"size{axis}", axis=0)

    def sizes(*entries: int | str) -> list[str]:
        """Each entry a known size, or "axis k" for h's size along axis k."""
        return [
            size(int(e.split()[1])) if isinstance(e, str) else net.const(f"c{k}", np.array([e]))
            for k, e in enumerate(entries)
        ]

    c_h = channels * height
    parts = {
        "width last": lambda: sizes("axis 0", c_h, "axis 3"),
        "width first": lambda: sizes("axis 0", "axis 1", c_h),
        "minus one last": lambda: sizes("axis 0", c_h, -1),
        "flat": lambda: sizes("axis 0", -1),
    }[form]()
    seq = net.op("Reshape", [h, net.op("Concat", parts, "target", axis=0)], "to_sequence")
    if form in ("width last", "minus one last"):
        seq = net.op("Transpose", [seq], "time_major", perm=[0, 2, 1])
    columns = channels * height * (3 if form == "flat" else 1)
    net.output(net.matmul(seq, columns, OUT, "fc"))
    return net.build()
