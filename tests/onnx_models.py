"""Tiny ONNX models built with onnx.helper, seeded weights, one per analysis pattern.

Every builder returns a checked ModelProto. Node names are the layer names the tests expect
(``fc1``, ``fc2``, ...); hidden width is 6, input width 4, output width 3 unless stated.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
IN, HID, OUT = 4, 6, 3


class Net:
    """Collects nodes, initializers and value infos, then builds a model with metadata."""

    def __init__(self, name: str, seed: int = 0, dtype=np.float32) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def input(self, name: str, shape, elem: int | None = None) -> str:
        elem = self.elem if elem is None else elem
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def const(self, name: str, array, node: bool = False, graph_input: bool = False) -> str:
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if node:
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=f"c_{name}", value=tensor)
            )
        else:
            self.initializers.append(tensor)
        if graph_input:
            self.inputs.append(helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
        return name

    def rand(self, name: str, shape, **kw) -> str:
        return self.const(name, self.rng.normal(size=shape).astype(self.dtype), **kw)

    def op(self, op_type: str, inputs, name: str, output: str | None = None, **attrs) -> str:
        output = output or f"{name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attrs))
        return output

    def output(self, name: str) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, self.elem, None))

    def build(self, opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            self.inputs,
            self.outputs,
            self.initializers,
            doc_string=f"test graph {self.name}",
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name="onnxbalance-tests",
            producer_version="0.0",
            doc_string="built by tests/onnx_models.py",
        )
        model.ir_version = IR_VERSION
        helper.set_model_props(model, {"origin": "tests", "model": self.name})
        # shapes of outputs (the checker wants them) and value_info of intermediates (so the
        # tests can see it survives a rewrite) come from shape inference
        inferred = onnx.shape_inference.infer_shapes(model).graph
        types = {v.name: v.type for v in [*inferred.value_info, *inferred.output]}
        for out in model.graph.output:
            out.type.CopyFrom(types[out.name])
        model.graph.value_info.extend(inferred.value_info)
        onnx.checker.check_model(model, full_check=True)
        return model

    # --- layers -------------------------------------------------------------------------

    def gemm(
        self,
        x: str,
        n_in: int,
        n_out: int,
        name: str,
        *,
        trans_a: int = 0,
        trans_b: int = 1,
        alpha: float = 1.0,
        beta: float = 1.0,
        bias: str | None = "vec",
        node: bool = False,
        weight: str | None = None,
    ) -> str:
        if weight is None:
            weight = self.rand(f"{name}_W", (n_out, n_in) if trans_b else (n_in, n_out), node=node)
        inputs = [x, weight]
        if bias is not None:
            shape = {"vec": (n_out,), "row": (1, n_out), "scalar": (), "one": (1,)}[bias]
            inputs.append(self.rand(f"{name}_b", shape, node=node))
        attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
        return self.op("Gemm", inputs, name, **attrs)

    def matmul(
        self,
        x: str,
        n_in: int,
        n_out: int,
        name: str,
        *,
        bias: str | None = "vec",
        bias_first: bool = False,
        node: bool = False,
        weight: str | None = None,
    ) -> str:
        if weight is None:
            weight = self.rand(f"{name}_W", (n_in, n_out), node=node)
        y = self.op("MatMul", [x, weight], name)
        if bias is None:
            return y
        shape = {"vec": (n_out,), "row": (1, n_out), "scalar": ()}[bias]
        b = self.rand(f"{name}_b", shape, node=node)
        return self.op("Add", [b, y] if bias_first else [y, b], f"{name}_add")

    def relu(self, x: str, name: str) -> str:
        return self.op("Relu", [x], name)


def _finish(net: Net, y: str) -> onnx.ModelProto:
    net.output(y)
    return net.build()


def gemm_mlp(trans_b=1, alpha=1.0, beta=1.0, bias="vec", node=False) -> onnx.ModelProto:
    """x -> fc1 -> Relu -> fc2 -> y."""
    net = Net("gemm_mlp")
    x = net.input("x", ["N", IN])
    h = net.relu(
        net.gemm(x, IN, HID, "fc1", trans_b=trans_b, alpha=alpha, beta=beta, bias=bias, node=node),
        "act1",
    )
    kw = {"trans_b": trans_b, "alpha": alpha, "beta": beta, "node": node}
    return _finish(net, net.gemm(h, HID, OUT, "fc2", **kw))


def deep_mlp(depth=3, trans_b=1, node=False) -> onnx.ModelProto:
    """x -> fc1 -> Relu -> ... -> fc{depth} -> y, Gemm layers."""
    net = Net("deep_mlp", seed=depth)
    h, n_in = net.input("x", ["N", IN]), IN
    for k in range(1, depth):
        h = net.relu(net.gemm(h, n_in, HID, f"fc{k}", trans_b=trans_b, node=node), f"act{k}")
        n_in = HID
    return _finish(net, net.gemm(h, n_in, OUT, f"fc{depth}", trans_b=trans_b, node=node))


def gemm_trans_a(first: bool) -> onnx.ModelProto:
    """transA=1 on fc1 (reads the graph input transposed) or on fc2 (reads the hidden
    activation transposed: its 'features' are the batch axis, so fc1 cannot move)."""
    batch = 5
    net = Net(f"gemm_trans_a_{first}")
    if first:
        x = net.input("x", [IN, batch])
        h = net.relu(net.gemm(x, IN, HID, "fc1", trans_a=1), "act1")
        return _finish(net, net.gemm(h, HID, OUT, "fc2"))
    x = net.input("x", [batch, IN])
    h = net.relu(net.gemm(x, IN, HID, "fc1"), "act1")
    return _finish(net, net.gemm(h, batch, OUT, "fc2", trans_a=1))


def matmul_mlp(bias="vec", bias_first=False, node=False, batch_dims=1) -> onnx.ModelProto:
    """x -> MatMul(+Add) fc1 -> Relu -> MatMul(+Add) fc2 -> Relu -> MatMul(+Add) fc3 -> y."""
    net = Net("matmul_mlp")
    x = net.input("x", ["N"] * batch_dims + [IN])
    kw = {"bias": bias, "bias_first": bias_first, "node": node}
    h = net.relu(net.matmul(x, IN, HID, "fc1", **kw), "act1")
    h = net.relu(net.matmul(h, HID, HID, "fc2", **kw), "act2")
    return _finish(net, net.matmul(h, HID, OUT, "fc3", **kw))


def activations(kind: str) -> onnx.ModelProto:
    """fc1 -> act -> fc2 -> act -> fc3 with LeakyRelu or PRelu (scalar / per-unit slope)."""
    net = Net(f"act_{kind}")
    h = net.input("x", ["N", IN])
    n_in = IN
    for k in (1, 2):
        z = net.gemm(h, n_in, HID, f"fc{k}")
        if kind == "leaky":
            h = net.op("LeakyRelu", [z], f"act{k}", alpha=0.1)
        elif kind == "prelu_scalar":
            h = net.op("PRelu", [z, net.const(f"slope{k}", np.float32(0.2))], f"act{k}")
        else:
            slope = net.const(f"slope{k}", np.linspace(-0.5, 0.5, HID, dtype=np.float32))
            h = net.op("PRelu", [z, slope], f"act{k}")
        n_in = HID
    return _finish(net, net.gemm(h, HID, OUT, "fc3"))


def fan_out() -> onnx.ModelProto:
    """One hidden activation read by two layers (two heads) and by a Relu chain to a third."""
    net = Net("fan_out")
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "act1")
    net.output(net.gemm(h, HID, OUT, "head_a"))
    net.output(net.matmul(h, HID, 2, "head_b"))
    h2 = net.relu(h, "act1b")  # Relu of a Relu: still homogeneous, still fc1's units
    return _finish(net, net.gemm(h2, HID, 2, "head_c", trans_b=0))


def shape_reader() -> onnx.ModelProto:
    """fc1's activation is also read by Shape (values do not matter): fc1 still moves."""
    net = Net("shape_reader")
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "act1")
    shape = net.op("Shape", [h], "shape")
    net.outputs.append(helper.make_tensor_value_info(shape, TensorProto.INT64, None))
    return _finish(net, net.gemm(h, HID, OUT, "fc2"))


def hidden_is_output() -> onnx.ModelProto:
    """fc1's activation is also a graph output, so fc1 cannot move; fc2 still can."""
    net = Net("hidden_is_output")
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "act1")
    net.output(h)
    h = net.relu(net.gemm(h, HID, HID, "fc2"), "act2")
    return _finish(net, net.gemm(h, HID, OUT, "fc3"))


def shared_weight() -> onnx.ModelProto:
    """fc2 and fc3 use the same square weight W (tied): both fixed, fc1 cannot move either."""
    net = Net("shared_weight")
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc0"), "act0")
    h = net.relu(net.gemm(h, HID, HID, "fc1"), "act1")
    w = net.rand("W", (HID, HID))
    h = net.relu(net.gemm(h, HID, HID, "fc2", weight=w), "act2")
    h = net.relu(net.gemm(h, HID, HID, "fc3", weight=w), "act3")
    return _finish(net, net.gemm(h, HID, OUT, "fc4"))


def blocker(op: str) -> onnx.ModelProto:
    """fc1 -> Relu -> fc2 -> op -> fc3 -> Relu -> fc4: op (Sigmoid, Clip, Tanh) stops fc2."""
    net = Net(f"blocker_{op}")
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "act1")
    z = net.gemm(h, HID, HID, "fc2")
    if op == "Clip":
        lo, hi = net.const("lo", np.float32(0.0)), net.const("hi", np.float32(6.0))
        h = net.op("Clip", [z, lo, hi], "block")
    else:
        h = net.op(op, [z], "block")
    h = net.relu(net.gemm(h, HID, HID, "fc3"), "act3")
    return _finish(net, net.gemm(h, HID, OUT, "fc4"))


def weight_is_input() -> onnx.ModelProto:
    """fc1's weight is an initializer that is also a graph input (overridable)."""
    net = Net("weight_is_input")
    x = net.input("x", ["N", IN])
    w = net.rand("fc1_W", (HID, IN), graph_input=True)
    h = net.relu(net.gemm(x, IN, HID, "fc1", weight=w), "act1")
    h = net.relu(net.gemm(h, HID, HID, "fc2"), "act2")
    return _finish(net, net.gemm(h, HID, OUT, "fc3"))


def no_relu() -> onnx.ModelProto:
    """fc1 -> Tanh -> fc2 -> Softmax: nothing can move."""
    net = Net("no_relu")
    h = net.op("Tanh", [net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1")], "tanh")
    return _finish(net, net.op("Softmax", [net.gemm(h, HID, OUT, "fc2")], "softmax"))


def linear_linear() -> onnx.ModelProto:
    """fc1 feeds fc2 directly (no activation), then Relu, fc3."""
    net = Net("linear_linear")
    z = net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1")
    h = net.relu(net.gemm(z, HID, HID, "fc2"), "act2")
    return _finish(net, net.gemm(h, HID, OUT, "fc3"))


def dequantized() -> onnx.ModelProto:
    """fc1 (float) -> Relu -> MatMul whose weight comes from DequantizeLinear (int8)."""
    net = Net("dequantized")
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "act1")
    q = net.const("q_W", net.rng.integers(-100, 100, size=(HID, OUT)).astype(np.int8))
    scale, zero = net.const("q_scale", np.float32(0.02)), net.const("q_zero", np.int8(0))
    w = net.op("DequantizeLinear", [q, scale, zero], "dq")
    return _finish(net, net.op("MatMul", [h, w], "fc2"))


def int_weight() -> onnx.ModelProto:
    """An analysis-only model: an integer MatMul weight (not floating point)."""
    net = Net("int_weight")
    x = net.input("x", ["N", IN], elem=TensorProto.INT32)
    w = net.const("fc1_W", np.ones((IN, HID), np.int32))
    y = net.op("MatMul", [x, w], "fc1")
    net.outputs.append(helper.make_tensor_value_info(y, TensorProto.INT32, None))
    return net.build()


def qlinear() -> onnx.ModelProto:
    """A QLinearMatMul layer between float layers (through Quantize/DequantizeLinear)."""
    net = Net("qlinear")
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "act1")
    s, z = net.const("s", np.float32(0.05)), net.const("z", np.uint8(128))
    hq = net.op("QuantizeLinear", [h, s, z], "quant")
    wq = net.const("wq", net.rng.integers(0, 255, size=(HID, OUT)).astype(np.uint8))
    yq = net.op("QLinearMatMul", [hq, s, z, wq, s, z, s, z], "qmm")
    return _finish(net, net.op("DequantizeLinear", [yq, s, z], "dequant"))


def subgraph() -> onnx.ModelProto:
    """An If whose branches read fc1's activation from the outer scope and hold a MatMul."""
    net = Net("subgraph")
    x = net.input("x", ["N", IN])
    cond = net.input("cond", [], elem=TensorProto.BOOL)
    h = net.relu(net.gemm(x, IN, HID, "fc1"), "act1")
    w_then = numpy_helper.from_array(net.rng.normal(size=(HID, OUT)).astype(np.float32), "w_then")
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", [h, "w_then"], ["y_then"], name="then_mm")],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)],
        [w_then],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Gemm", [h, "fc2_W"], ["y_else"], name="else_gemm", transB=1)],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)],
    )
    net.rand("fc2_W", (OUT, HID))  # outer-scope weight used only inside the else branch
    y = net.op("If", [cond], "if", then_branch=then_graph, else_branch=else_graph)
    return _finish(net, y)


def float64_mlp() -> onnx.ModelProto:
    net = Net("float64_mlp", dtype=np.float64)
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "act1")
    return _finish(net, net.matmul(h, HID, OUT, "fc2"))


def typed_storage() -> onnx.ModelProto:
    """gemm_mlp with fc1's weight stored in float_data instead of raw_data."""
    model = gemm_mlp()
    for t in model.graph.initializer:
        if t.name == "fc1_W":
            values = numpy_helper.to_array(t)
            t.ClearField("raw_data")
            t.float_data.extend(values.ravel().tolist())
    return model


def random_chain(seed: int) -> onnx.ModelProto:
    """A random chain mixing every issue-3 pattern: layer kind, orientation, bias form, storage
    (initializer / Constant node), activation or blocker between layers, side outputs."""
    net = Net(f"random_chain_{seed}", seed=seed)
    rng = np.random.default_rng(seed + 1000)
    h, n_in = net.input("x", ["N", IN]), IN
    depth = int(rng.integers(2, 6))
    for k in range(1, depth + 1):
        n_out = OUT if k == depth else int(rng.integers(2, 8))
        name, node = f"fc{k}", bool(rng.integers(2))
        bias = [None, "vec", "row", "scalar"][int(rng.integers(4))]
        if rng.integers(2):
            z = net.gemm(
                h,
                n_in,
                n_out,
                name,
                trans_b=int(rng.integers(2)),
                alpha=float(rng.choice([1.0, 0.5, 2.0])),
                beta=float(rng.choice([1.0, 0.25, 3.0])),
                bias=bias,
                node=node,
            )
        else:
            z = net.matmul(
                h, n_in, n_out, name, bias=bias, bias_first=bool(rng.integers(2)), node=node
            )
        if k == depth:
            return _finish(net, z)
        kind = rng.choice(["relu", "relu", "leaky", "prelu", "sigmoid", "relu_out", "none"])
        if kind == "leaky":
            h = net.op("LeakyRelu", [z], f"act{k}", alpha=0.05)
        elif kind == "prelu":
            slope = net.const(f"slope{k}", rng.normal(size=n_out).astype(np.float32))
            h = net.op("PRelu", [z, slope], f"act{k}")
        elif kind == "sigmoid":
            h = net.op("Sigmoid", [z], f"act{k}")
        elif kind == "none":
            h = z
        else:
            h = net.relu(z, f"act{k}")
            if kind == "relu_out":
                net.output(h)
        n_in = n_out
    raise AssertionError("unreachable")


# --- convolutions, BatchNormalization, pass-through ops, merges -------------------

CH = 4  # hidden channels of the conv builders; images are 6 x 6, batch 2, 2 input channels


class ConvNet(Net):
    def conv(
        self,
        x: str,
        c_in: int,
        c_out: int,
        name: str,
        k=(3, 3),
        *,
        group: int = 1,
        bias: bool = True,
        weight: str | None = None,
        **attrs,
    ) -> str:
        if weight is None:
            shape = (c_out, c_in // group, *k)
            # rows spread over two orders of magnitude: balancing has work to do
            spread = np.exp(self.rng.normal(size=(c_out,) + (1,) * (len(k) + 1)))
            w = (self.rng.normal(size=shape) * spread).astype(self.dtype)
            weight = self.const(f"{name}_W", w)
        inputs = [x, weight]
        if bias:
            inputs.append(
                self.const(f"{name}_b", self.rng.uniform(-0.3, 0.3, c_out).astype(self.dtype))
            )
        if group != 1:
            attrs["group"] = group
        return self.op("Conv", inputs, name, **attrs)

    def bn(self, x: str, c: int, name: str, scale: str | None = None) -> str:
        rng = self.rng
        scale = scale or self.const(f"{name}_scale", rng.uniform(0.5, 2.0, c).astype(self.dtype))
        params = [
            scale,
            self.const(f"{name}_bias", rng.uniform(-0.5, 0.5, c).astype(self.dtype)),
            self.const(f"{name}_mean", rng.uniform(-0.5, 0.5, c).astype(self.dtype)),
            self.const(f"{name}_var", rng.uniform(0.3, 3.0, c).astype(self.dtype)),
        ]
        return self.op("BatchNormalization", [x, *params], name)


def _ints(net: Net, name: str, values) -> str:
    return net.const(name, np.asarray(values, dtype=np.int64))


def _floats(net: Net, name: str, values) -> str:
    return net.const(name, np.asarray(values, dtype=np.float32))


def _split_h_concat(net: Net, h: str) -> str:
    """Split along the height into two parts and Concat them back in swapped order."""
    net.nodes.append(
        helper.make_node(
            "Split", [h, _ints(net, "sp", [2, 4])], ["top", "bottom"], name="split", axis=2
        )
    )
    return net.op("Concat", ["bottom", "top"], "mid", axis=2)


# op between conv1's Relu and conv2: builder(net, h) -> (tensor, channels conv2 reads)
BETWEEN = {
    "identity": lambda n, h: (n.op("Identity", [h], "mid"), CH),
    "dropout": lambda n, h: (n.op("Dropout", [h, _floats(n, "ratio", 0.5)], "mid"), CH),
    "maxpool": lambda n, h: (n.op("MaxPool", [h], "mid", kernel_shape=[2, 2], strides=[2, 2]), CH),
    "avgpool": lambda n, h: (
        n.op("AveragePool", [h], "mid", kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1),
        CH,
    ),
    "lppool": lambda n, h: (n.op("LpPool", [h], "mid", kernel_shape=[2, 2], p=2), CH),
    "pad_reflect": lambda n, h: (
        n.op("Pad", [h, _ints(n, "pads", [0, 0, 1, 1, 0, 0, 1, 1])], "mid", mode="reflect"),
        CH,
    ),
    "pad_zero": lambda n, h: (
        n.op("Pad", [h, _ints(n, "pads", [0, 0, 2, 0, 0, 0, 0, 1]), _floats(n, "v", 0.0)], "mid"),
        CH,
    ),
    "resize_linear": lambda n, h: (
        n.op("Resize", [h, "", _floats(n, "scales", [1, 1, 2, 2])], "mid", mode="linear"),
        CH,
    ),
    "transpose_roundtrip": lambda n, h: (
        n.op(
            "Transpose", [n.op("Transpose", [h], "t1", perm=[0, 2, 3, 1])], "mid", perm=[0, 3, 1, 2]
        ),
        CH,
    ),
    "unsqueeze_squeeze": lambda n, h: (
        n.op(
            "Squeeze",
            [n.op("Unsqueeze", [h, _ints(n, "ax", [2])], "u"), _ints(n, "ax2", [2])],
            "mid",
        ),
        CH,
    ),
    "mul_scalar": lambda n, h: (n.op("Mul", [_floats(n, "k", -1.5), h], "mid"), CH),
    "div_channels": lambda n, h: (
        n.op("Div", [h, _floats(n, "k", np.linspace(0.5, 2, CH).reshape(1, CH, 1, 1))], "mid"),
        CH,
    ),
    "slice_reverse": lambda n, h: (
        n.op(
            "Slice",
            [
                h,
                _ints(n, "s", [-1]),
                _ints(n, "e", [-(2**63)]),
                _ints(n, "a", [1]),
                _ints(n, "st", [-1]),
            ],
            "mid",
        ),
        CH,
    ),
    "split_h_concat": lambda n, h: (_split_h_concat(n, h), CH),
    "slice_step2": lambda n, h: (
        n.op(
            "Slice",
            [h, _ints(n, "s", [0]), _ints(n, "e", [9]), _ints(n, "a", [1]), _ints(n, "st", [2])],
            "mid",
        ),
        CH // 2,
    ),
    "clip_min0": lambda n, h: (n.op("Clip", [h, _floats(n, "lo", 0.0)], "mid"), CH),
    "reduce_hw": lambda n, h: (n.op("ReduceMax", [h], "mid", axes=[-1, 2], keepdims=1), CH),
    "slice_hw": lambda n, h: (
        n.op("Slice", [h, _ints(n, "s", [1]), _ints(n, "e", [5]), _ints(n, "a", [-1])], "mid"),
        CH,
    ),
    # stops
    "clip": lambda n, h: (
        n.op("Clip", [h, _floats(n, "lo", 0.0), _floats(n, "hi", 6.0)], "mid"),
        CH,
    ),
    "hardswish": lambda n, h: (n.op("HardSwish", [h], "mid"), CH),
    "pad_value": lambda n, h: (
        n.op("Pad", [h, _ints(n, "pads", [0, 0, 1, 1, 0, 0, 1, 1]), _floats(n, "v", 1.0)], "mid"),
        CH,
    ),
    "pad_channels": lambda n, h: (
        n.op("Pad", [h, _ints(n, "pads", [0, 1, 0, 0, 0, 0, 0, 0])], "mid"),
        CH + 1,
    ),
    "resize_channels": lambda n, h: (
        n.op("Resize", [h, "", _floats(n, "scales", [1, 2, 1, 1])], "mid"),
        2 * CH,
    ),
    "nhwc_pool": lambda n, h: (
        n.op("GlobalAveragePool", [n.op("Transpose", [h], "t1", perm=[0, 2, 3, 1])], "mid"),
        6,
    ),
    "mul_input": lambda n, h: (n.op("Mul", [h, n.input("gate", [2, CH, 6, 6])], "mid"), CH),
    "div_by_units": lambda n, h: (n.op("Div", [_floats(n, "k", 2.0), h], "mid"), CH),
    "mul_self": lambda n, h: (n.op("Mul", [h, h], "mid"), CH),
    "reshape_split_channels": lambda n, h: (
        n.op(
            "Reshape",
            [
                n.op("Reshape", [h, _ints(n, "sh", [2, 2, 2, 36])], "r1"),
                _ints(n, "sh2", [2, CH, 6, 6]),
            ],
            "mid",
        ),
        CH,
    ),
    "reshape_split_add": lambda n, h: (  # a constant added per position, not per channel
        n.op(
            "Reshape",
            [
                n.op(
                    "Add",
                    [
                        n.op("Reshape", [h, _ints(n, "sh", [2, 2, 2, 36])], "r1"),
                        n.rand("k", (1, 1, 1, 36)),
                    ],
                    "mid",
                ),
                _ints(n, "sh2", [2, CH, 6, 6]),
            ],
            "r2",
        ),
        CH,
    ),
    "layernorm": lambda n, h: (
        n.op(
            "LayerNormalization",
            [h, _floats(n, "g", np.ones(6)), _floats(n, "b", np.zeros(6))],
            "mid",
        ),
        CH,
    ),
    "reduce_channels": lambda n, h: (n.op("ReduceMean", [h], "mid", axes=[1], keepdims=1), 1),
    "batchnorm_alone": lambda n, h: (ConvNet.bn(n, h, CH, "mid"), CH),
    "add_channels": lambda n, h: (n.op("Add", [n.rand("k", (CH, 1, 1)), h], "mid"), CH),
    "add_scalar": lambda n, h: (n.op("Add", [h, n.rand("k", (1,))], "mid"), CH),
    # stops
    "batchnorm_input_mean": lambda n, h: (
        n.op(
            "BatchNormalization",
            [
                h,
                n.rand("g", (CH,)),
                n.rand("b", (CH,)),
                n.input("mean", [CH]),
                _floats(n, "v", [1] * CH),
            ],
            "mid",
        ),
        CH,
    ),
}


def conv_chain(between: str, bn: bool = False) -> onnx.ModelProto:
    """x -> conv1 (2->4, 3x3, pads 1) [-> BN] -> Relu -> <between> -> conv2 (1x1) -> y."""
    net = ConvNet(f"conv_chain_{between}", seed=len(between))
    z = net.conv(net.input("x", [2, 2, 6, 6]), 2, CH, "conv1", pads=[1, 1, 1, 1])
    if bn:
        z = net.bn(z, CH, "bn1")
    h, channels = BETWEEN[between](net, net.relu(z, "act1"))
    return _finish(net, net.conv(h, channels, 3, "conv2", (1, 1)))


def conv_dims(spatial: int, group: int, depthwise_stride: bool = False) -> onnx.ModelProto:
    """1-D/2-D/3-D convs without attributes (defaults), a grouped conv, no-bias conv, output."""
    net = ConvNet(f"conv{spatial}d_g{group}", seed=spatial * 10 + group)
    size = {1: [11], 2: [6, 6], 3: [5, 5, 6]}[spatial]
    k3, k1 = (3,) * spatial, (1,) * spatial
    h = net.relu(net.conv(net.input("x", [2, 2, *size]), 2, CH, "conv1", k3), "act1")
    attrs = {"strides": [2] * spatial, "dilations": [1] * spatial} if depthwise_stride else {}
    h = net.relu(net.conv(h, CH, CH, "conv2", k3, group=group, bias=False, **attrs), "act2")
    return _finish(net, net.conv(h, CH, 3, "conv3", k1))


def conv_transpose(group: int) -> onnx.ModelProto:
    """conv1 -> Relu -> ConvTranspose (group) [stride 2] -> Relu -> conv3."""
    net = ConvNet(f"conv_transpose_g{group}", seed=group)
    h = net.relu(net.conv(net.input("x", [2, 2, 4, 4]), 2, CH, "conv1", (1, 1)), "act1")
    w = net.rand("ct_W", (CH, 6 // group, 2, 2))
    b = net.rand("ct_b", (6,))
    h = net.relu(net.op("ConvTranspose", [h, w, b], "ct", strides=[2, 2], group=group), "act2")
    return _finish(net, net.conv(h, 6, 3, "conv3", (1, 1)))


def dwsep(act: str) -> onnx.ModelProto:
    """stem conv-BN-Relu, depthwise conv-BN-<act>, pointwise conv-BN-Relu, GAP, Flatten, Gemm."""
    net = ConvNet(f"dwsep_{act}", seed=7)
    h = net.relu(
        net.bn(net.conv(net.input("x", [2, 2, 6, 6]), 2, CH, "stem", bias=False), CH, "bn0"), "a0"
    )
    z = net.bn(net.conv(h, CH, CH, "dw", group=CH, pads=[1] * 4), CH, "bn1")
    if act == "relu6":
        h = net.op("Clip", [z, _floats(net, "lo", 0.0), _floats(net, "hi", 6.0)], "relu6")
    else:
        h = net.relu(z, "a1")
    h = net.relu(net.bn(net.conv(h, CH, 6, "pw", (1, 1), bias=False), 6, "bn2"), "a2")
    h = net.op("Flatten", [net.op("GlobalAveragePool", [h], "gap")], "flat")
    return _finish(net, net.gemm(h, 6, OUT, "fc"))


def resnet_block(shortcut: str, relu_after_add: bool = True) -> onnx.ModelProto:
    """stem conv-Relu (S); c1 conv-Relu; c2 conv; Add(c2, S | proj(S) | x) [-> Relu]; GAP;
    Flatten; Gemm fc. shortcut: "identity", "projection" (1x1, stride 2 with c1/c2 strided),
    "input" (the block reads the graph input directly)."""
    net = ConvNet(f"resnet_{shortcut}_{relu_after_add}", seed=3)
    x = net.input("x", [2, CH, 6, 6])
    s = x if shortcut == "input" else net.relu(net.conv(x, CH, CH, "stem", pads=[1] * 4), "a0")
    stride = [2, 2] if shortcut == "projection" else [1, 1]
    out = 6 if shortcut == "projection" else CH
    h = net.relu(net.conv(s, CH, out, "c1", pads=[1] * 4, strides=stride), "a1")
    y = net.conv(h, out, out, "c2", pads=[1] * 4)
    short = net.conv(s, CH, out, "proj", (1, 1), strides=stride) if shortcut == "projection" else s
    h = net.op("Add", [y, short], "add")
    if relu_after_add:
        h = net.relu(h, "a2")
    h = net.op("Flatten", [net.op("GlobalAveragePool", [h], "gap")], "flat")
    return _finish(net, net.gemm(h, out, OUT, "fc"))


def merges(kind: str) -> onnx.ModelProto:
    """Two conv-Relu branches a (2->4) and b (2->4) merged, then conv c. kind: "concat_c"
    (channel axis: 8 channels), "concat_h" (height: tie), "sub" (tie), "sum3" (Sum with a graph
    input: fixed), "add_constant" (Add of a constant: fixed)."""
    net = ConvNet(f"merge_{kind}", seed=5)
    x = net.input("x", [2, 2, 6, 6])
    a = net.relu(net.conv(x, 2, CH, "a", pads=[1] * 4), "act_a")
    b = net.relu(net.conv(x, 2, CH, "b", (1, 1)), "act_b")
    channels = CH
    if kind == "concat_c":
        h, channels = net.op("Concat", [a, b], "merge", axis=1), 2 * CH
    elif kind == "concat_h":
        h = net.op("Concat", [a, b], "merge", axis=-2)
    elif kind == "concat_input":  # graph input channels carry no unit: scale 1
        h, channels = net.op("Concat", [a, x], "merge", axis=1), CH + 2
    elif kind == "sub":
        h = net.op("Sub", [a, b], "merge")
    elif kind == "sum3":
        h = net.op("Sum", [a, b, net.input("z", [2, CH, 6, 6])], "merge")
    else:
        h = net.op("Add", [a, net.rand("k", (1, CH, 1, 1))], "merge")
    return _finish(net, net.conv(h, channels, 3, "c", (1, 1)))


def flatten_reshape(kind: str) -> onnx.ModelProto:
    """conv (2->4, 3x3 valid on 5x5: 3x3 out) -> Relu -> <Flatten | Reshape | NHWC Flatten> ->
    Gemm/MatMul (36 -> 5) -> Relu -> Gemm (5 -> 3)."""
    net = ConvNet(f"flatten_{kind}", seed=9)
    h = net.relu(net.conv(net.input("x", [2, 2, 5, 5]), 2, CH, "conv"), "act")
    if kind == "flatten":
        h = net.op("Flatten", [h], "flat")
        z = net.gemm(h, 36, 5, "fc1", trans_b=0)
    elif kind == "reshape":
        h = net.op("Reshape", [h, _ints(net, "shape", [-1, 36])], "flat")
        z = net.matmul(h, 36, 5, "fc1")
    elif kind == "mean":  # spatial mean without keepdims: [N, 4]
        h = net.op("ReduceMean", [h], "flat", axes=[2, 3], keepdims=0)
        z = net.gemm(h, CH, 5, "fc1")
    else:  # channels last, then Flatten: column j is channel j % 4
        h = net.op("Flatten", [net.op("Transpose", [h], "nhwc", perm=[0, 2, 3, 1])], "flat")
        z = net.gemm(h, 36, 5, "fc1")
    h = net.relu(z, "act1")
    return _finish(net, net.gemm(h, 5, OUT, "fc2"))


def gemm_bn(shared_scale: bool = False) -> onnx.ModelProto:
    """fc1 -> BatchNormalization (2-D) -> Relu -> fc2 -> BN -> Relu -> fc3; optionally the two
    BNs share one scale tensor (then neither layer's rows move)."""
    net = ConvNet(f"gemm_bn_{shared_scale}", seed=11)
    scale = net.rand("shared_scale", (HID,)) if shared_scale else None
    h = net.relu(
        net.bn(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), HID, "bn1", scale), "a1"
    )
    h = net.relu(net.bn(net.gemm(h, HID, HID, "fc2"), HID, "bn2", scale), "a2")
    return _finish(net, net.gemm(h, HID, OUT, "fc3"))


def ffn(with_attention_reshape: bool = False, transposed: bool = False) -> onnx.ModelProto:
    """Transformer encoder FFN on [batch, tokens, features]: LayerNorm -> MatMul+Add (8 -> 16)
    -> Relu -> MatMul+Add (16 -> 8) -> Add(residual) -> LayerNorm -> y; optionally a projection
    whose output is split into 2 heads by Reshape, passes a Relu and is merged back; optionally
    the FFN weights are stored [out, in] behind Transpose nodes (torch without constant folding)."""
    net = ConvNet(f"ffn_{with_attention_reshape}", seed=13)
    x = net.input("x", [2, 5, 8])
    h = net.op(
        "LayerNormalization",
        [x, _floats(net, "g0", np.ones(8)), _floats(net, "b0", np.zeros(8))],
        "ln0",
    )
    if with_attention_reshape:
        v = net.matmul(h, 8, 8, "v_proj")
        heads = net.op("Reshape", [v, _ints(net, "heads", [2, 5, 2, 4])], "split_heads")
        merged = net.op(
            "Reshape", [net.relu(heads, "head_act"), _ints(net, "flat", [2, 5, 8])], "merge_heads"
        )
        h = net.op("Add", [h, net.matmul(merged, 8, 8, "o_proj")], "attn_res")
    w1 = w2 = None
    if transposed:
        w1 = net.op("Transpose", [net.rand("ff1_Wt", (16, 8))], "t1", perm=[1, 0])
        w2 = net.op("Transpose", [net.rand("ff2_Wt", (8, 16))], "t2")
    f = net.relu(net.matmul(h, 8, 16, "ff1", weight=w1), "ff_act")
    y = net.op("Add", [h, net.matmul(f, 16, 8, "ff2", weight=w2)], "ff_res")
    g, b = _floats(net, "g1", np.ones(8)), _floats(net, "b1", np.zeros(8))
    return _finish(net, net.op("LayerNormalization", [y, g, b], "ln1"))


def split_unused() -> onnx.ModelProto:
    """conv (2->6) -> Relu -> Split [2, 4] on channels: part 0 -> conv a, part 1 unused."""
    net = ConvNet("split_unused", seed=17)
    h = net.relu(net.conv(net.input("x", [2, 2, 6, 6]), 2, 6, "conv", pads=[1] * 4), "act")
    net.nodes.append(
        helper.make_node(
            "Split", [h, _ints(net, "split", [2, 4])], ["p0", "p1"], name="split", axis=1
        )
    )
    return _finish(net, net.conv("p0", 2, 3, "a", (1, 1)))


def dynamic_flatten() -> onnx.ModelProto:
    """conv on [N, 2, H, W] (symbolic) -> Relu -> Flatten -> Gemm: the columns per channel are
    unknown, so the conv's channels cannot move (analysis only)."""
    net = ConvNet("dynamic_flatten", seed=19)
    h = net.relu(net.conv(net.input("x", ["N", 2, "H", "W"]), 2, CH, "conv", pads=[1] * 4), "act")
    return _finish(net, net.gemm(net.op("Flatten", [h], "flat"), 36 * CH, OUT, "fc"))


def conv_add_bias() -> onnx.ModelProto:
    """Conv without bias + Add of a [1, C, 1, 1] constant -> Relu -> Conv + Add of a [C, 1, 1]
    constant -> Relu -> Conv (how some converters store conv biases)."""
    net = ConvNet("conv_add_bias", seed=23)
    z = net.conv(net.input("x", [2, 2, 6, 6]), 2, CH, "conv1", bias=False)
    h = net.relu(net.op("Add", [z, net.rand("b1", (1, CH, 1, 1))], "add1"), "act1")
    z = net.conv(h, CH, 6, "conv2", (1, 1), bias=False)
    h = net.relu(net.op("Add", [net.rand("b2", (6, 1, 1)), z], "add2"), "act2")
    return _finish(net, net.conv(h, 6, 3, "conv3", (1, 1)))


def random_conv_net(seed: int) -> onnx.ModelProto:
    """A random DAG of issue-5 patterns on 6x6 images: convs (grouped, with or without bias or
    BN), activations or stops after them, pools, Concat, residual Add, Mul by constants,
    Transpose round trips, side outputs; every tensor nothing reads ends in one Concat, then
    GlobalAveragePool, Flatten, Gemm."""
    net = ConvNet(f"random_conv_{seed}", seed=seed)
    rng = np.random.default_rng(seed + 500)
    tensors = [(net.input("x", [2, 3, 6, 6]), 3)]  # (name, channels)
    unread = set()

    def pick(channels: int | None = None, avoid: str = "") -> tuple[str, int]:
        fits = [t for t in tensors if channels in (None, t[1])]
        pool = [t for t in fits[-3:] if t[0] != avoid] or [t for t in fits if t[0] != avoid]
        pool = pool or fits
        chosen = pool[int(rng.integers(len(pool)))]
        unread.discard(chosen[0])
        return chosen

    for k in range(int(rng.integers(4, 10))):
        x, c = pick()
        kind = rng.choice(["conv", "conv", "conv", "conv", "pool", "concat", "add", "add", "mul"])
        kind = "transpose" if rng.integers(12) == 0 else kind
        name = f"n{k}"
        if kind == "conv":
            out = int(rng.choice([c, c, 2, 4])) if c != 3 else int(rng.choice([2, 4]))
            group = c if (out == c and rng.integers(3) == 0) else 1
            kernel = int(rng.choice([1, 3]))
            z = net.conv(
                x, c, out, name, (kernel, kernel), group=group, bias=bool(rng.integers(2)),
                pads=[kernel // 2] * 4,
            )  # fmt: skip
            if rng.integers(3) == 0:
                z = net.bn(z, out, f"{name}_bn")
            act = rng.choice(["relu", "relu", "relu", "leaky", "clip6", "none", "sigmoid"])
            if act == "relu":
                z = net.relu(z, f"{name}_act")
            elif act == "leaky":
                z = net.op("LeakyRelu", [z], f"{name}_act", alpha=0.1)
            elif act == "clip6":
                lo, hi = _floats(net, f"{name}_lo", 0.0), _floats(net, f"{name}_hi", 6.0)
                z = net.op("Clip", [z, lo, hi], f"{name}_act")
            elif act == "sigmoid":
                z = net.op("Sigmoid", [z], f"{name}_act")
            tensors.append((z, out))
        elif kind == "pool":
            op = str(rng.choice(["MaxPool", "AveragePool"]))
            tensors.append((net.op(op, [x], name, kernel_shape=[3, 3], pads=[1] * 4), c))
        elif kind == "concat":
            y, d = pick()
            tensors.append((net.op("Concat", [x, y], name, axis=1), c + d))
        elif kind == "add":
            y, _ = pick(c, avoid=x)
            tensors.append((net.op("Add", [x, y], name), c))
        elif kind == "mul":
            scale = net.rand(f"{name}_k", (1, c, 1, 1))
            tensors.append((net.op("Mul", [x, scale], name), c))
        else:
            t = net.op("Transpose", [x], f"{name}_t", perm=[0, 2, 3, 1])
            tensors.append((net.op("Transpose", [t], name, perm=[0, 3, 1, 2]), c))
        unread.add(tensors[-1][0])
        if rng.integers(8) == 0:
            net.output(tensors[-1][0])
    ends = [t for t in tensors if t[0] in unread]
    x = net.op("Concat", [t[0] for t in ends], "ends", axis=1) if len(ends) > 1 else ends[0][0]
    h = net.op("Flatten", [net.op("GlobalAveragePool", [x], "gap")], "flat")
    return _finish(net, net.gemm(h, sum(t[1] for t in ends), OUT, "fc"))
