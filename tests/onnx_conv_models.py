"""Unit-level ONNX fixtures for convolutions and pass-through ops (onnx.helper, opset 17).

Each builder returns a :class:`arch_reference.Fixture`: the model, seeded inputs, the hand-made
unit graph (one :class:`RefLayer` per linear layer, named by its initializers) and the number of
balanced units (scale groups) derived by hand from the op semantics in the issue; the comment
above each builder gives the derivation. Weights are seeded, with per-row magnitudes spread by
exp(N(0, 1)) so that balancing moves something.
"""

from __future__ import annotations

import numpy as np
import onnx
from arch_reference import FIXED, Fixture, Groups, RefLayer, conv_cols, fixed
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Builder:
    """Collects nodes, initializers and RefLayers for one small model."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: list[str] = []
        self.layers: list[RefLayer] = []
        self.groups = Groups()
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def input(self, name: str, shape: tuple[int, ...]) -> str:
        self.inputs[name] = self.rng.standard_normal(shape).astype(np.float32)
        return name

    def const(self, stem: str, value) -> str:
        name = self.fresh(stem)
        self.inits[name] = np.asarray(value)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def weight(self, shape: tuple[int, ...], rows_axis: int = 0) -> np.ndarray:
        w = self.rng.normal(0.0, 0.4, shape)
        spread = np.exp(self.rng.standard_normal(shape[rows_axis]))
        view = [1] * len(shape)
        view[rows_axis] = shape[rows_axis]
        return (w * spread.reshape(view)).astype(np.float32)

    def conv(
        self,
        x: str,
        in_groups: np.ndarray,
        cout: int,
        kernel: tuple[int, ...],
        rows: np.ndarray,
        group: int = 1,
        bias: bool = True,
        **attrs,
    ) -> str:
        """Conv with only the attributes given (everything else left at the ONNX defaults)."""
        cin = len(in_groups)
        w = self.const("W", self.weight((cout, cin // group, *kernel)))
        inputs = [x, w]
        b = None
        if bias:
            b = self.const("B", self.rng.uniform(-0.3, 0.3, cout).astype(np.float32))
            inputs.append(b)
        if group != 1:
            attrs["group"] = group
        out = self.op("Conv", inputs, **attrs)
        cols = conv_cols(in_groups, cout, group, int(np.prod(kernel)))
        self.layers.append(RefLayer(self.fresh("conv"), w, "out_first", rows, cols, bias=b))
        return out

    def finish(self, expected: int, notes: str) -> Fixture:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [
                helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape)
                for k, v in self.inputs.items()
            ],
            [],  # filled below, with the shapes ONNX shape inference gives them
            [numpy_helper.from_array(v, k) for k, v in self.inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        known = {v.name: v for v in inferred.graph.value_info}
        model.graph.output.extend(known[name] for name in self.outputs)
        onnx.checker.check_model(model, full_check=True)
        layers = []
        for layer in self.layers:
            eff = _effective(layer, self.inits)
            layers.append(
                RefLayer(
                    layer.name,
                    layer.weight,
                    layer.layout,
                    np.asarray(layer.row_groups, np.int64),
                    np.asarray(layer.col_groups, np.int64),
                    layer.bias,
                    layer.bn,
                    layer.alpha,
                    eff,
                )
            )
        return Fixture(
            name=self.name,
            model=model,
            inputs=self.inputs,
            layers=tuple(layers),
            n_groups=self.groups.n,
            expected_balanced=expected,
            notes=notes,
            ops=tuple(n.op_type for n in self.nodes),
        )


def _effective(layer: RefLayer, arrays: dict[str, np.ndarray]) -> np.ndarray:
    from arch_reference import effective_weight

    return effective_weight(layer, {k: np.asarray(v) for k, v in arrays.items()})


def relu(b: Builder, x: str) -> str:
    return b.op("Relu", [x])


# conv_defaults: Conv nodes with no attributes at all (group=1, strides=1, pads=0, dilations=1,
# kernel_shape from W). conv1 2->4 ReLU: 4; conv2 4->3 is the output: 0. Total 4.
def conv_defaults() -> Fixture:
    b = Builder("conv_defaults", 11)
    x = b.input("x", (2, 2, 6, 6))
    h = b.groups.new(4)
    y = relu(b, b.conv(x, fixed(2), 4, (3, 3), h))
    b.outputs.append(b.conv(y, h, 3, (1, 1), fixed(3)))
    return b.finish(4, "conv1 4 ReLU units; output conv fixed")


# grouped: conv1 2->4 ReLU (4); conv2 4->6 group=2, 3x3, pads 1: output channels 0-2 see
# conv1 channels 0-1, channels 3-5 see 2-3; ReLU (6); conv3 1x1 -> output. Total 10.
def grouped() -> Fixture:
    b = Builder("grouped", 12)
    x = b.input("x", (2, 2, 5, 5))
    h1, h2 = b.groups.new(4), b.groups.new(6)
    y = relu(b, b.conv(x, fixed(2), 4, (1, 1), h1))
    y = relu(b, b.conv(y, h1, 6, (3, 3), h2, group=2, pads=[1, 1, 1, 1]))
    b.outputs.append(b.conv(y, h2, 2, (1, 1), fixed(2)))
    return b.finish(10, "4 + 6 (group=2 maps each output channel to its group's inputs)")


# depthwise: conv1 2->4 ReLU (4); depthwise 4->4 group=4 3x3 stride 2 ReLU (4); pointwise out.
# Total 8.
def depthwise() -> Fixture:
    b = Builder("depthwise", 13)
    x = b.input("x", (2, 2, 6, 6))
    h1, h2 = b.groups.new(4), b.groups.new(4)
    y = relu(b, b.conv(x, fixed(2), 4, (1, 1), h1))
    y = relu(b, b.conv(y, h1, 4, (3, 3), h2, group=4, strides=[2, 2], pads=[1, 1, 1, 1]))
    b.outputs.append(b.conv(y, h2, 2, (1, 1), fixed(2)))
    return b.finish(8, "4 + 4 depthwise")


# conv1d: Conv 2->4 k=3 stride 2 dilation 2 pads 2, no bias, ReLU (4); Conv 4->2 k=1 out. Total 4.
def conv1d() -> Fixture:
    b = Builder("conv1d", 14)
    x = b.input("x", (2, 2, 11))
    h = b.groups.new(4)
    y = relu(
        b, b.conv(x, fixed(2), 4, (3,), h, bias=False, strides=[2], dilations=[2], pads=[2, 2])
    )
    b.outputs.append(b.conv(y, h, 2, (1,), fixed(2)))
    return b.finish(4, "4 ReLU channels of a 1-D conv")


# conv3d: Conv 1->3 kernel 2x2x2 ReLU (3); Conv 3->2 1x1x1 out. Total 3.
def conv3d() -> Fixture:
    b = Builder("conv3d", 15)
    x = b.input("x", (2, 1, 3, 4, 4))
    h = b.groups.new(3)
    y = relu(b, b.conv(x, fixed(1), 3, (2, 2, 2), h))
    b.outputs.append(b.conv(y, h, 2, (1, 1, 1), fixed(2)))
    return b.finish(3, "3 ReLU channels of a 3-D conv")


# conv_transpose: conv 2->4 ReLU (4); ConvTranspose 4->3 k2 s2 (group 1: weight [in, out, k, k],
# the channel map is exact) ReLU (3); conv 3->2 out. Total 7.
def conv_transpose() -> Fixture:
    b = Builder("conv_transpose", 16)
    x = b.input("x", (2, 2, 3, 3))
    h1, h2 = b.groups.new(4), b.groups.new(3)
    y = relu(b, b.conv(x, fixed(2), 4, (1, 1), h1))
    w = b.const("WT", b.weight((4, 3, 2, 2), rows_axis=1))
    bias = b.const("BT", b.rng.uniform(-0.3, 0.3, 3).astype(np.float32))
    y = relu(b, b.op("ConvTranspose", [y, w, bias], strides=[2, 2]))
    cols = np.stack([np.repeat(h1, 4)] * 3)  # raw columns of row o: (input channel, tap)
    b.layers.append(RefLayer("convT", w, "convT", h2, cols, bias=bias))
    b.outputs.append(b.conv(y, h2, 2, (1, 1), fixed(2)))
    return b.finish(7, "4 + 3 (ConvTranspose rows are its output channels)")


# batchnorm: Conv 2->4 with bias -> BatchNormalization (epsilon absent: default 1e-5) -> ReLU (4):
# conv columns / input scales, gamma and beta * unit scale, conv bias, mean, var unchanged.
# Conv 4->2 out. Total 4.
def batchnorm() -> Fixture:
    b = Builder("batchnorm", 17)
    x = b.input("x", (2, 2, 5, 5))
    h = b.groups.new(4)
    y = b.conv(x, fixed(2), 4, (3, 3), h, pads=[1, 1, 1, 1])
    conv = b.layers.pop()
    gamma = b.const("gamma", b.rng.uniform(0.5, 2.0, 4).astype(np.float32))
    beta = b.const("beta", b.rng.uniform(-0.5, 0.5, 4).astype(np.float32))
    mean = b.const("mean", b.rng.uniform(-0.5, 0.5, 4).astype(np.float32))
    var = b.const("var", b.rng.uniform(0.3, 3.0, 4).astype(np.float32))
    y = relu(b, b.op("BatchNormalization", [y, gamma, beta, mean, var]))
    b.layers.append(
        RefLayer(
            conv.name,
            conv.weight,
            conv.layout,
            conv.row_groups,
            conv.col_groups,
            bias=conv.bias,
            bn=(gamma, beta, var, 1e-5),
        )
    )
    b.outputs.append(b.conv(y, h, 2, (1, 1), fixed(2)))
    return b.finish(4, "4 channels; BN gamma/beta carry the scale")


# pools: conv 2->4 ReLU MaxPool 2x2 (4); conv 4->4 ReLU AveragePool 2x2 (4); conv 4->3 ReLU
# GlobalAveragePool (3) -> Flatten -> Gemm transB=1 out; a GlobalMaxPool branch on the first
# block feeds a second output through Flatten -> Gemm. Total 11.
def pools() -> Fixture:
    b = Builder("pools", 18)
    x = b.input("x", (2, 2, 8, 8))
    h1, h2, h3 = b.groups.new(4), b.groups.new(4), b.groups.new(3)
    y1 = b.op(
        "MaxPool",
        [relu(b, b.conv(x, fixed(2), 4, (3, 3), h1, pads=[1, 1, 1, 1]))],
        kernel_shape=[2, 2],
        strides=[2, 2],
    )
    y = b.op(
        "AveragePool", [relu(b, b.conv(y1, h1, 4, (1, 1), h2))], kernel_shape=[2, 2], strides=[2, 2]
    )
    y = b.op("GlobalAveragePool", [relu(b, b.conv(y, h2, 3, (1, 1), h3))])
    b.outputs.append(_gemm(b, b.op("Flatten", [y]), h3, 2, fixed(2), trans_b=1))
    z = b.op("Flatten", [b.op("GlobalMaxPool", [y1])])
    b.outputs.append(_gemm(b, z, h1, 2, fixed(2), trans_b=1))
    return b.finish(11, "4 + 4 + 3 through MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool")


def _gemm(b: Builder, x: str, in_cols: np.ndarray, n_out: int, rows, trans_b=None, alpha=None):
    """Gemm on a 2-D input; transB and alpha only written when given (defaults 0 and 1)."""
    n_in = len(in_cols)
    shape = (n_out, n_in) if trans_b else (n_in, n_out)
    w = b.const("G", b.weight(shape, rows_axis=0 if trans_b else 1))
    bias = b.const("GB", b.rng.uniform(-0.3, 0.3, n_out).astype(np.float32))
    attrs = {}
    if trans_b is not None:
        attrs["transB"] = trans_b
    if alpha is not None:
        attrs["alpha"] = alpha
    out = b.op("Gemm", [x, w, bias], **attrs)
    cols = np.broadcast_to(in_cols, (n_out, n_in)).copy()
    layout = "out_first" if trans_b else "in_first"
    b.layers.append(RefLayer(b.fresh("gemm"), w, layout, rows, cols, bias=bias, alpha=alpha or 1.0))
    return out


def _matmul(b: Builder, x: str, in_cols: np.ndarray, n_out: int, rows) -> str:
    """MatMul by a [in, out] initializer, then Add of a bias."""
    n_in = len(in_cols)
    w = b.const("M", b.weight((n_in, n_out), rows_axis=1))
    bias = b.const("MB", b.rng.uniform(-0.3, 0.3, n_out).astype(np.float32))
    out = b.op("Add", [b.op("MatMul", [x, w]), bias])
    cols = np.broadcast_to(in_cols, (n_out, n_in)).copy()
    b.layers.append(RefLayer(b.fresh("matmul"), w, "in_first", rows, cols, bias=bias))
    return out


# flatten_gemm: conv 2->3 3x3 on 4x4 (valid: 2x2 out) ReLU (3) -> Flatten (3 channels x 4
# positions, channel-major) -> Gemm with transB absent (default 0: W is [12, 5]) and alpha 0.5,
# ReLU (5) -> Gemm transB=1 out. Total 8.
def flatten_gemm() -> Fixture:
    b = Builder("flatten_gemm", 19)
    x = b.input("x", (2, 2, 4, 4))
    h1, h2 = b.groups.new(3), b.groups.new(5)
    y = b.op("Flatten", [relu(b, b.conv(x, fixed(2), 3, (3, 3), h1))])
    y = relu(b, _gemm(b, y, np.repeat(h1, 4), 5, h2, alpha=0.5))
    b.outputs.append(_gemm(b, y, h2, 2, fixed(2), trans_b=1))
    return b.finish(8, "3 channels (4 columns each) + 5 Gemm units")


# reshape_matmul: conv 2->3 on 4x4 pads 1 ReLU (3) -> Reshape [2, 48] -> MatMul [48, 5] + Add
# bias, ReLU (5) -> MatMul [5, 2] + Add out. Total 8.
def reshape_matmul() -> Fixture:
    b = Builder("reshape_matmul", 20)
    x = b.input("x", (2, 2, 4, 4))
    h1, h2 = b.groups.new(3), b.groups.new(5)
    y = relu(b, b.conv(x, fixed(2), 3, (3, 3), h1, pads=[1, 1, 1, 1]))
    y = b.op("Reshape", [y, b.const("shape", np.array([2, 48], np.int64))])
    y = relu(b, _matmul(b, y, np.repeat(h1, 16), 5, h2))
    b.outputs.append(_matmul(b, y, h2, 2, fixed(2)))
    return b.finish(8, "3 channels (16 columns each) + 5 MatMul units")


# concat: conv a 2->3 ReLU, conv b 2->2 ReLU, Concat axis=1 (offsets 0 and 3) -> conv 5->2 out.
# Total 5.
def concat() -> Fixture:
    b = Builder("concat", 21)
    x = b.input("x", (2, 2, 4, 4))
    ha, hb = b.groups.new(3), b.groups.new(2)
    ya = relu(b, b.conv(x, fixed(2), 3, (3, 3), ha, pads=[1, 1, 1, 1]))
    yb = relu(b, b.conv(x, fixed(2), 2, (1, 1), hb))
    y = b.op("Concat", [ya, yb], axis=1)
    b.outputs.append(b.conv(y, np.concatenate([ha, hb]), 2, (1, 1), fixed(2)))
    return b.finish(5, "3 + 2 joined by Concat on the channel axis")


# pad0: conv 2->3 ReLU (3) -> Pad (mode absent = constant, value absent = 0) -> conv 3->2 out.
# Total 3.
def pad0() -> Fixture:
    b = Builder("pad0", 22)
    x = b.input("x", (2, 2, 4, 4))
    h = b.groups.new(3)
    y = relu(b, b.conv(x, fixed(2), 3, (3, 3), h))
    y = b.op("Pad", [y, b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    b.outputs.append(b.conv(y, h, 2, (3, 3), fixed(2)))
    return b.finish(3, "3 channels through a zero Pad")


# transpose_hw: conv 2->3 ReLU (3) -> Transpose perm [0,1,3,2] (channel axis stays 1) -> conv
# 3->2 out. Total 3.
def transpose_hw() -> Fixture:
    b = Builder("transpose_hw", 23)
    x = b.input("x", (2, 2, 4, 5))
    h = b.groups.new(3)
    y = relu(b, b.conv(x, fixed(2), 3, (3, 3), h, pads=[1, 1, 1, 1]))
    y = b.op("Transpose", [y], perm=[0, 1, 3, 2])
    b.outputs.append(b.conv(y, h, 2, (1, 1), fixed(2)))
    return b.finish(3, "3 channels; Transpose keeps the channel axis")


# transpose_nhwc: conv 2->3 ReLU (3) -> Transpose [0,2,3,1] (channels last) -> MatMul [3, 4] on
# the 4-D activations + bias, ReLU (4) -> MatMul [4, 2] + bias out. Total 7.
def transpose_nhwc() -> Fixture:
    b = Builder("transpose_nhwc", 24)
    x = b.input("x", (2, 2, 3, 3))
    h1, h2 = b.groups.new(3), b.groups.new(4)
    y = relu(b, b.conv(x, fixed(2), 3, (3, 3), h1, pads=[1, 1, 1, 1]))
    y = b.op("Transpose", [y], perm=[0, 2, 3, 1])
    y = relu(b, _matmul(b, y, h1, 4, h2))
    b.outputs.append(_matmul(b, y, h2, 2, fixed(2)))
    return b.finish(7, "3 channels followed to the last axis + 4 MatMul units")


# resize_nearest: conv 2->3 ReLU (3) -> Resize nearest x2 -> conv 3->2 out. Total 3.
def resize_nearest() -> Fixture:
    b = Builder("resize_nearest", 25)
    x = b.input("x", (2, 2, 3, 3))
    h = b.groups.new(3)
    y = relu(b, b.conv(x, fixed(2), 3, (1, 1), h))
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    y = b.op("Resize", [y, "", scales], mode="nearest")
    b.outputs.append(b.conv(y, h, 2, (3, 3), fixed(2)))
    return b.finish(3, "3 channels through nearest Resize")


# split_slice: conv 2->6 ReLU (6) -> Split axis 1 [2, 2, 2]: parts feed conv a, conv b, and a
# Slice of channels 1:2 of the third part feeds conv c; channel 4 (first of the third part) is
# therefore unused -> no outgoing weights, cut off from the outputs -> fixed. Total 5.
def split_slice() -> Fixture:
    b = Builder("split_slice", 26)
    x = b.input("x", (2, 2, 4, 4))
    h = b.groups.new(5)  # channels 0-3 and 5
    rows = np.array([h[0], h[1], h[2], h[3], FIXED, h[4]])
    y = relu(b, b.conv(x, fixed(2), 6, (3, 3), rows, pads=[1, 1, 1, 1]))
    parts = b.op("Split", [y, b.const("split", np.array([2, 2, 2], np.int64))], n_out=3, axis=1)
    b.outputs.append(b.conv(parts[0], rows[0:2], 2, (1, 1), fixed(2)))
    b.outputs.append(b.conv(parts[1], rows[2:4], 2, (1, 1), fixed(2)))
    part = b.op(
        "Slice",
        [
            parts[2],
            b.const("starts", np.array([1], np.int64)),
            b.const("ends", np.array([2], np.int64)),
            b.const("axes", np.array([1], np.int64)),
        ],
    )
    b.outputs.append(b.conv(part, rows[5:6], 2, (1, 1), fixed(2)))
    return b.finish(5, "6 channels split/sliced on the channel axis; channel 4 unused (dead end)")


# residual_input: conv1 3->3 ReLU (3); conv2 3->3 + Add with the graph input x -> ReLU ->
# conv3 out: the Add ties conv2's channels to x, a graph input -> fixed. Total 3.
def residual_input() -> Fixture:
    b = Builder("residual_input", 27)
    x = b.input("x", (2, 3, 4, 4))
    h = b.groups.new(3)
    y = relu(b, b.conv(x, fixed(3), 3, (3, 3), h, pads=[1, 1, 1, 1]))
    y = relu(b, b.op("Add", [b.conv(y, h, 3, (3, 3), fixed(3), pads=[1, 1, 1, 1]), x]))
    b.outputs.append(b.conv(y, fixed(3), 2, (1, 1), fixed(2)))
    return b.finish(3, "conv1 3; residual group tied to the graph input fixed")


# residual_clip: conv1 2->3 ReLU (3); conv2 3->3 Add Clip(conv3(x), 0, 6) -> ReLU -> conv4 out:
# a merge with a Clip output fixes the whole group (conv2's and conv3's rows). Total 3.
def residual_clip() -> Fixture:
    b = Builder("residual_clip", 28)
    x = b.input("x", (2, 2, 4, 4))
    h = b.groups.new(3)
    y = relu(b, b.conv(x, fixed(2), 3, (3, 3), h, pads=[1, 1, 1, 1]))
    lo, hi = b.const("lo", np.array(0, np.float32)), b.const("hi", np.array(6, np.float32))
    z = b.op("Clip", [b.conv(x, fixed(2), 3, (1, 1), fixed(3)), lo, hi])
    y = relu(b, b.op("Add", [b.conv(y, h, 3, (1, 1), fixed(3)), z]))
    b.outputs.append(b.conv(y, fixed(3), 2, (1, 1), fixed(2)))
    return b.finish(3, "conv1 3; Add with a Clip output fixes the group")


# mul_const: conv 2->3 ReLU (3) -> Mul by a constant [1, 3, 1, 1] -> conv 3->2 ReLU (2) -> Mul
# by the second graph input (it carries no unit: balancing leaves it as it is) -> conv 2->2 out.
# Total 5.
def mul_const() -> Fixture:
    b = Builder("mul_const", 29)
    x = b.input("x", (2, 2, 4, 4))
    gate = b.input("gate", (2, 2, 4, 4))
    h, g = b.groups.new(3), b.groups.new(2)
    y = relu(b, b.conv(x, fixed(2), 3, (3, 3), h, pads=[1, 1, 1, 1]))
    k = b.const("k", b.rng.uniform(-2.0, 2.0, (1, 3, 1, 1)).astype(np.float32))
    y = relu(b, b.conv(b.op("Mul", [y, k]), h, 2, (1, 1), g))
    b.outputs.append(b.conv(b.op("Mul", [y, gate]), g, 2, (1, 1), fixed(2)))
    return b.finish(5, "3 channels through Mul by a constant, 2 through Mul by an input")


# sum_merge: conv a 2->3 and conv b 2->3 (1x1), Sum -> ReLU -> conv 3->2 out: Sum ties channel k
# of a with channel k of b (one factor each). Total 3.
def sum_merge() -> Fixture:
    b = Builder("sum_merge", 31)
    x = b.input("x", (2, 2, 4, 4))
    tied = b.groups.new(3)
    ya = b.conv(x, fixed(2), 3, (3, 3), tied, pads=[1, 1, 1, 1])
    yb = b.conv(x, fixed(2), 3, (1, 1), tied)
    y = relu(b, b.op("Sum", [ya, yb]))
    b.outputs.append(b.conv(y, tied, 2, (1, 1), fixed(2)))
    return b.finish(3, "3 tied groups across the two Sum inputs")


# identity_dropout: conv 2->3 ReLU (3) -> Identity -> Dropout (inference) -> conv 3->2 out.
# Total 3.
def identity_dropout() -> Fixture:
    b = Builder("identity_dropout", 32)
    x = b.input("x", (2, 2, 4, 4))
    h = b.groups.new(3)
    y = relu(b, b.conv(x, fixed(2), 3, (3, 3), h, pads=[1, 1, 1, 1]))
    y = b.op("Dropout", [b.op("Identity", [y])])
    b.outputs.append(b.conv(y, h, 2, (1, 1), fixed(2)))
    return b.finish(3, "3 channels through Identity and Dropout")


# matmul_3d: [batch, tokens, features] = [2, 5, 6] -> MatMul [6, 8] + Add bias -> ReLU (8) ->
# MatMul [8, 3] + Add out (a transformer feed-forward block). Total 8.
def matmul_3d() -> Fixture:
    b = Builder("matmul_3d", 33)
    x = b.input("x", (2, 5, 6))
    h = b.groups.new(8)
    y = relu(b, _matmul(b, x, fixed(6), 8, h))
    b.outputs.append(_matmul(b, y, h, 3, fixed(3)))
    return b.finish(8, "8 hidden features of a 3-D MatMul feed-forward block")


# stop_<op>: conv1 2->3 ReLU (3); conv2 3->4 -> <op> (not positively homogeneous, or not known
# to commute with a per-channel scale: Softmax and LayerNormalization mix channels, Sin is an
# op the issue does not list, i.e. unknown): conv2 rows fixed, so its bias stays bit-for-bit;
# conv3 4->2 out. Total 3.
STOP_OPS = (
    "Clip",
    "HardSwish",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Softplus",
    "Softmax",
    "LayerNormalization",
    "Sin",
)


def stop(op_type: str) -> Fixture:
    b = Builder(f"stop_{op_type.lower()}", 30)
    x = b.input("x", (2, 2, 4, 4))
    h = b.groups.new(3)
    y = relu(b, b.conv(x, fixed(2), 3, (3, 3), h, pads=[1, 1, 1, 1]))
    y = b.conv(y, h, 4, (1, 1), fixed(4))
    if op_type == "Clip":
        lo, hi = b.const("lo", np.array(0, np.float32)), b.const("hi", np.array(6, np.float32))
        y = b.op("Clip", [y, lo, hi])
    elif op_type == "Softmax":
        y = b.op("Softmax", [y], axis=1)
    elif op_type == "LayerNormalization":
        scale = b.const("ln_scale", b.rng.uniform(0.5, 1.5, (4, 4, 4)).astype(np.float32))
        y = b.op("LayerNormalization", [y, scale], axis=1)
    else:
        y = b.op(op_type, [y])
    b.outputs.append(b.conv(y, fixed(4), 2, (1, 1), fixed(2)))
    return b.finish(3, f"conv1 3; conv2 -> {op_type} fixed")


FIXTURES = {
    f.__name__: f
    for f in (
        conv_defaults,
        grouped,
        depthwise,
        conv1d,
        conv3d,
        conv_transpose,
        batchnorm,
        pools,
        flatten_gemm,
        reshape_matmul,
        concat,
        pad0,
        transpose_hw,
        transpose_nhwc,
        resize_nearest,
        split_slice,
        residual_input,
        residual_clip,
        mul_const,
        sum_merge,
        identity_dropout,
        matmul_3d,
    )
}
for _op in STOP_OPS:
    FIXTURES[f"stop_{_op.lower()}"] = lambda _op=_op: stop(_op)
