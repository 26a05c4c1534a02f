"""Models whose layers live inside If, Loop and Scan bodies, built with onnx.helper.

Widths are chosen so that every count in the tests is a different number: a count that comes
out right by accident (the wrong body, the wrong layer) is unlikely.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_models import IN, OUT, Net

THEN_HID, ELSE_HID, SHARED_HID = 6, 7, 5


def _const_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"c_{name}", value=numpy_helper.from_array(array, name)
    )


def if_two_branches() -> onnx.ModelProto:
    """x -> If(cond) -> y. Each branch: layer 1 -> Relu -> layer 2 -> Relu -> 'head_W'.

    then_branch: Gemm layers whose weights are the body's own initializers.
    else_branch: a MatMul + Add whose weight and bias are Constant nodes in the body, then a
    Gemm whose weight ``cap_W`` and bias ``cap_b`` are outer initializers read only there.
    Both branches end in a Gemm reading the same outer weight ``head_W`` (two readers).
    """
    net = Net("if_two_branches")
    rng = net.rng
    x = net.input("x", ["N", IN])
    cond = net.input("cond", [], elem=TensorProto.BOOL)

    def rand(*shape):
        return rng.normal(size=shape).astype(np.float32)

    net.const("head_W", rand(OUT, SHARED_HID))
    net.const("cap_W", rand(SHARED_HID, ELSE_HID))
    net.const("cap_b", rand(SHARED_HID))
    out = helper.make_tensor_value_info
    then_graph = helper.make_graph(
        [
            helper.make_node("Gemm", [x, "t1_W", "t1_b"], ["t1"], name="t_fc1", transB=1),
            helper.make_node("Relu", ["t1"], ["t1r"], name="t_act1"),
            helper.make_node("Gemm", ["t1r", "t2_W", "t2_b"], ["t2"], name="t_fc2", transB=1),
            helper.make_node("Relu", ["t2"], ["t2r"], name="t_act2"),
            helper.make_node("Gemm", ["t2r", "head_W"], ["y_then"], name="t_head", transB=1),
        ],
        "then",
        [],
        [out("y_then", TensorProto.FLOAT, ["N", OUT])],
        [
            numpy_helper.from_array(rand(THEN_HID, IN), "t1_W"),
            numpy_helper.from_array(rand(THEN_HID), "t1_b"),
            numpy_helper.from_array(rand(SHARED_HID, THEN_HID), "t2_W"),
            numpy_helper.from_array(rand(SHARED_HID), "t2_b"),
        ],
    )
    else_graph = helper.make_graph(
        [
            _const_node("e1_W", rand(IN, ELSE_HID)),
            _const_node("e1_b", rand(ELSE_HID)),
            helper.make_node("MatMul", [x, "e1_W"], ["e1"], name="e_fc1"),
            helper.make_node("Add", ["e1", "e1_b"], ["e1b"], name="e_fc1_bias"),
            helper.make_node("Relu", ["e1b"], ["e1r"], name="e_act1"),
            helper.make_node("Gemm", ["e1r", "cap_W", "cap_b"], ["e2"], name="e_fc2", transB=1),
            helper.make_node("Relu", ["e2"], ["e2r"], name="e_act2"),
            helper.make_node("Gemm", ["e2r", "head_W"], ["y_else"], name="e_head", transB=1),
        ],
        "else",
        [],
        [out("y_else", TensorProto.FLOAT, ["N", OUT])],
    )
    y = net.op("If", [cond], "branch", then_branch=then_graph, else_branch=else_graph)
    net.output(y)
    return net.build()


LOOP_HID, SCAN_HID = 8, 9


def _body_mlp(prefix: str, x: str, hid: int, rng) -> tuple[list[onnx.NodeProto], list, str]:
    """Gemm -> Relu -> Gemm inside a body, weights stored as the body's initializers."""
    w1 = numpy_helper.from_array(rng.normal(size=(hid, IN)).astype(np.float32), f"{prefix}1_W")
    b1 = numpy_helper.from_array(rng.normal(size=hid).astype(np.float32), f"{prefix}1_b")
    w2 = numpy_helper.from_array(rng.normal(size=(IN, hid)).astype(np.float32), f"{prefix}2_W")
    h, hr, y = f"{prefix}h", f"{prefix}hr", f"{prefix}y"
    nodes = [
        helper.make_node("Gemm", [x, w1.name, b1.name], [h], name=f"{prefix}fc1", transB=1),
        helper.make_node("Relu", [h], [hr], name=f"{prefix}act"),
        helper.make_node("Gemm", [hr, w2.name], [y], name=f"{prefix}fc2", transB=1),
    ]
    return nodes, [w1, b1, w2], y


def loop_mlp() -> onnx.ModelProto:
    """A Loop that applies a ReLU MLP (IN -> LOOP_HID -> IN) to its carried state ``trips``
    times: h <- MLP(h). The state enters and leaves the body, so only the body's hidden layer
    moves."""
    net = Net("loop_mlp")
    x = net.input("x", ["N", IN])
    trips = net.const("trips", np.array(3, np.int64))
    nodes, weights, y = _body_mlp("l", "h_in", LOOP_HID, net.rng)
    nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"))
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        nodes,
        "loop_body",
        [
            vi("i", TensorProto.INT64, []),
            vi("cond_in", TensorProto.BOOL, []),
            vi("h_in", TensorProto.FLOAT, ["N", IN]),
        ],
        [vi("cond_out", TensorProto.BOOL, []), vi(y, TensorProto.FLOAT, ["N", IN])],
        weights,
    )
    cond = net.const("go", np.array(True))
    out = net.op("Loop", [trips, cond, x], "loop", body=body)
    net.outputs.append(vi(out, TensorProto.FLOAT, ["N", IN]))
    return net.build()


def scan_mlp() -> onnx.ModelProto:
    """A Scan over the first axis of x [T, N, IN] applying a ReLU MLP (IN -> SCAN_HID -> IN)
    to every slice, with a running sum as its state: s <- s + MLP(x_t)."""
    net = Net("scan_mlp")
    x = net.input("x", ["T", "N", IN])
    s0 = net.input("s0", ["N", IN])
    nodes, weights, y = _body_mlp("s", "x_t", SCAN_HID, net.rng)
    nodes += [
        helper.make_node("Add", ["s_in", y], ["s_out"], name="accumulate"),
        helper.make_node("Identity", [y], ["y_t"], name="emit"),
    ]
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        nodes,
        "scan_body",
        [vi("s_in", TensorProto.FLOAT, ["N", IN]), vi("x_t", TensorProto.FLOAT, ["N", IN])],
        [vi("s_out", TensorProto.FLOAT, ["N", IN]), vi("y_t", TensorProto.FLOAT, ["N", IN])],
        weights,
    )
    node = helper.make_node(
        "Scan", [s0, x], ["s_final", "ys"], name="scan", body=body, num_scan_inputs=1
    )
    net.nodes.append(node)
    net.outputs.append(vi("s_final", TensorProto.FLOAT, ["N", IN]))
    net.outputs.append(vi("ys", TensorProto.FLOAT, ["T", "N", IN]))
    return net.build()


def if_same_names() -> onnx.ModelProto:
    """Both branches hold a Relu MLP (IN -> THEN_HID -> OUT) whose Constant weights have the
    same names in both, with different values: legal (each body is its own scope), but a name
    read in two places must never be edited."""
    net = Net("if_same_names")
    x = net.input("x", ["N", IN])
    cond = net.input("cond", [], elem=TensorProto.BOOL)
    branches = {}
    for label in ("then", "else"):
        w1 = net.rng.normal(size=(THEN_HID, IN)).astype(np.float32)
        w2 = net.rng.normal(size=(OUT, THEN_HID)).astype(np.float32)
        branches[f"{label}_branch"] = helper.make_graph(
            [
                _const_node("w1", w1),
                _const_node("w2", w2),
                helper.make_node("Gemm", [x, "w1"], ["h"], name="fc1", transB=1),
                helper.make_node("Relu", ["h"], ["hr"], name="act"),
                helper.make_node("Gemm", ["hr", "w2"], [f"y_{label}"], name="fc2", transB=1),
            ],
            label,
            [],
            [helper.make_tensor_value_info(f"y_{label}", TensorProto.FLOAT, ["N", OUT])],
        )
    net.output(net.op("If", [cond], "branch", **branches))
    return net.build()
