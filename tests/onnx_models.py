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

    def build(self) -> onnx.ModelProto:
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
            opset_imports=[helper.make_opsetid("", OPSET)],
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
