"""Matching rules, one per op family. Each returns a match or a :class:`Refusal` with a reason.

Units are *channels of a tensor*: a linear layer's output units are the entries of its output
along one axis (``out_axis``, counted from the end), and it reads its input units along
``in_axis``. A per-channel factor a > 0 on a layer's units is exact when

* linear (Gemm, MatMul with a constant 2-D weight, optionally + a constant bias):
  ``y = alpha * x W^T + beta * b``; scaling row o of W and b[o] by a_o scales y[..., o] by a_o,
  and scaling column i of W by 1/a_i undoes a factor a_i carried by x[..., i];
* activation (Relu, LeakyRelu, PRelu with a constant slope): f(a z) = a f(z) for a > 0
  (positive homogeneity), element-wise, so the channel axis and the factors pass through;
* stop (everything else): the factors cannot pass; units reaching it keep scale 1.

Pass-through ops that move or merge channels (pools, Flatten, Concat, residual Add, ...) belong
next to :func:`match_passthrough`: they return a :class:`PassThrough` whose output channel axis
(and, later, channel map) says where each input channel lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import FLOAT_TYPES, GraphIndex, dtype_name

ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "PRelu"})
NOT_HOMOGENEOUS = frozenset(
    {
        "Sigmoid",
        "Tanh",
        "Clip",
        "Gelu",
        "Elu",
        "Selu",
        "Celu",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Softsign",
        "Softmax",
        "LogSoftmax",
        "Exp",
        "Log",
        "Mish",
        "ThresholdedRelu",
        "Shrink",
        "Erf",
    }
)
QUANTIZED = frozenset(
    {
        "QLinearMatMul",
        "MatMulInteger",
        "QLinearConv",
        "ConvInteger",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QGemm",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
    }
)
# Weight input slot and which axis of that weight counts output units, for quantized layers.
QUANTIZED_WEIGHT = {
    "QLinearMatMul": (3, -1),
    "MatMulInteger": (1, -1),
    "QLinearConv": (3, 0),
    "ConvInteger": (1, 0),
}
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})
STANDARD_DOMAINS = ("", "ai.onnx")
LINEAR_OPS = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose"} | set(QUANTIZED_WEIGHT))


@dataclass(frozen=True)
class Refusal:
    """Why a rule does not apply. ``count`` is the number of units concerned (0 if unknown)."""

    reason: str
    count: int = 0


@dataclass(frozen=True)
class LinearMatch:
    """A linear layer: ``output[..., o] = sum_i weight[o, i] * data[..., i] + bias[o]``.

    ``row_axis``/``col_axis`` say which axis of the stored weight holds output/input units.
    ``rows_refusal`` says why the output units cannot move (weight or bias not editable);
    ``cols_refusal`` why the input units cannot (weight not editable).
    """

    name: str
    nodes: tuple[int, ...]
    data_input: str
    in_axis: int
    output: str
    out_axis: int
    weight: str
    row_axis: int
    col_axis: int
    alpha: float
    n_rows: int
    n_cols: int
    bias: str | None = None
    bias_shape: tuple[int, ...] = ()
    rows_refusal: str | None = None
    cols_refusal: str | None = None

    def effective_weight(self, graph: GraphIndex) -> np.ndarray:
        """Rows = output units, columns = input units, with Gemm's alpha applied."""
        w = graph.array(self.weight)
        oriented = w.T if self.row_axis == 1 else w
        if self.alpha == 1.0:
            return oriented
        return self.alpha * oriented.astype(np.float64)

    def bias_expand_to(self) -> tuple[int, ...] | None:
        """The shape a broadcast bias takes so that each unit gets its own entry."""
        shape = self.bias_shape
        if not shape:
            return (self.n_rows,)
        if shape[-1] == 1 and self.n_rows != 1:
            return shape[:-1] + (self.n_rows,)
        return None


@dataclass(frozen=True)
class PassThrough:
    """An op the channel factors pass through: they reappear on ``output`` along ``axis``.

    ``activation`` marks a positively homogeneous non-linearity (what makes a hidden unit).
    ``output`` None means the op reads only the tensor's shape: the factors end there harmlessly.
    """

    output: str | None
    axis: int
    activation: bool


def _editable(graph: GraphIndex, name: str, role: str) -> str | None:
    """Why a constant cannot be rewritten in place, or None if it can."""
    if graph.is_overridable(name):
        return f"{role} '{name}' is also a graph input (it can be overridden at run time)"
    n = graph.n_uses(name)
    if n > 1:
        return f"{role} '{name}' is used by {n} node inputs"
    return None


def _weight(graph: GraphIndex, i: int, name: str, units_axis: int) -> Refusal | None:
    """Refuse a weight that is not a stored, 2-D, floating-point constant."""
    node = graph.nodes[i]
    if name in graph.sparse:
        return Refusal(f"weight '{name}' is a sparse initializer")
    if not graph.is_constant(name):
        producer = graph.producer_of(name)
        if producer is not None and producer.op_type in QUANTIZED:
            return Refusal(
                f"weight '{name}' comes from {producer.op_type} (quantized weights are not "
                f"rescaled)"
            )
        return None  # data times data (attention scores, ...): not a layer at all
    shape = graph.shape(name)
    if shape is None:
        return Refusal(f"weight '{name}' is a Constant without a tensor value")
    count = shape[units_axis] if len(shape) == 2 else (shape[-1] if shape else 0)
    elem = graph.elem_type(name)
    if elem not in FLOAT_TYPES:
        return Refusal(f"weight '{name}' has dtype {dtype_name(elem)}, not floating point", count)
    if len(shape) != 2:
        return Refusal(f"{node.op_type} weight '{name}' has rank {len(shape)}, not 2", count)
    return None


def _bias(graph: GraphIndex, name: str, n_rows: int) -> tuple[tuple[int, ...], str | None]:
    """A bias's shape and why it cannot be rescaled per unit (None if it can)."""
    shape = graph.shape(name)
    if shape is None:
        return (), f"bias '{name}' is not a stored constant"
    if graph.elem_type(name) not in FLOAT_TYPES:
        return shape, f"bias '{name}' is not floating point"
    if shape and shape[-1] not in (1, n_rows):
        return shape, f"bias '{name}' of shape {list(shape)} does not broadcast per unit"
    return shape, _editable(graph, name, "bias")


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def match_linear(graph: GraphIndex, i: int) -> LinearMatch | Refusal | None:
    """Gemm or MatMul(+Add) at node ``i``; None for ops that are not linear layers at all."""
    if graph.nodes[i].domain not in STANDARD_DOMAINS:
        return None  # a custom op that happens to share a standard name
    op = graph.nodes[i].op_type
    if op == "Gemm":
        return _match_gemm(graph, i)
    if op == "MatMul":
        return _match_matmul(graph, i)
    if op in QUANTIZED_WEIGHT:
        slot, axis = QUANTIZED_WEIGHT[op]
        node = graph.nodes[i]
        shape = graph.shape(node.input[slot]) if len(node.input) > slot else None
        count = shape[axis] if shape else 0
        return Refusal(f"quantized op {op} is not rescaled", count)
    return None


def _match_gemm(graph: GraphIndex, i: int) -> LinearMatch | Refusal | None:
    node = graph.nodes[i]
    if len(node.input) < 2:
        return None
    trans_a = int(_attr(node, "transA", 0))
    trans_b = int(_attr(node, "transB", 0))
    b = node.input[1]
    refusal = _weight(graph, i, b, 0 if trans_b else 1)
    if refusal is not None or not graph.is_constant(b):
        return refusal
    shape = graph.shape(b)
    row_axis, col_axis = (0, 1) if trans_b else (1, 0)
    n_rows, n_cols = shape[row_axis], shape[col_axis]
    weight_refusal = _editable(graph, b, "weight")
    rows_refusal = weight_refusal
    bias, bias_shape = None, ()
    if len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
        if graph.is_constant(bias):
            bias_shape, bias_refusal = _bias(graph, bias, n_rows)
            if bias_shape and len(bias_shape) > 2:
                bias_refusal = f"bias '{bias}' has rank {len(bias_shape)}"
        else:
            bias_refusal = f"bias '{bias}' is not a constant"
        rows_refusal = rows_refusal or bias_refusal
    return LinearMatch(
        name=graph.names[i],
        nodes=(i,),
        data_input=node.input[0],
        in_axis=-2 if trans_a else -1,
        output=node.output[0],
        out_axis=-1,
        weight=b,
        row_axis=row_axis,
        col_axis=col_axis,
        alpha=float(_attr(node, "alpha", 1.0)),
        n_rows=n_rows,
        n_cols=n_cols,
        bias=bias,
        bias_shape=bias_shape,
        rows_refusal=rows_refusal,
        cols_refusal=weight_refusal,
    )


def _match_matmul(graph: GraphIndex, i: int) -> LinearMatch | Refusal | None:
    node = graph.nodes[i]
    a, b = node.input[0], node.input[1]
    if not graph.is_constant(b) and graph.is_constant(a):
        shape = graph.shape(a)
        if shape is not None and len(shape) == 2 and graph.elem_type(a) in FLOAT_TYPES:
            return Refusal(f"constant weight '{a}' is the left MatMul operand", shape[0])
        return None
    refusal = _weight(graph, i, b, -1)
    if refusal is not None or not graph.is_constant(b):
        return refusal
    n_cols, n_rows = graph.shape(b)
    weight_refusal = _editable(graph, b, "weight")
    rows_refusal = weight_refusal
    output, nodes = node.output[0], (i,)
    bias, bias_shape = None, ()
    uses = graph.uses(output)
    if len(uses) == 1 and output not in graph.graph_outputs:
        j, slot = uses[0]
        add = graph.nodes[j]
        if add.op_type == "Add" and add.domain in STANDARD_DOMAINS and len(add.input) == 2:
            other = add.input[1 - slot]
            if graph.is_constant(other):
                bias, nodes, output = other, (i, j), add.output[0]
                bias_shape, bias_refusal = _bias(graph, bias, n_rows)
                rows_refusal = rows_refusal or bias_refusal
    return LinearMatch(
        name=graph.names[i],
        nodes=nodes,
        data_input=a,
        in_axis=-1,
        output=output,
        out_axis=-1,
        weight=b,
        row_axis=1,
        col_axis=0,
        alpha=1.0,
        n_rows=n_rows,
        n_cols=n_cols,
        bias=bias,
        bias_shape=bias_shape,
        rows_refusal=rows_refusal,
        cols_refusal=weight_refusal,
    )


def _activation(graph: GraphIndex, i: int, slot: int, axis: int) -> PassThrough | Refusal:
    """Relu, LeakyRelu, PRelu: element-wise and positively homogeneous in input 0."""
    node, name = graph.nodes[i], graph.names[i]
    if slot != 0:
        return Refusal(f"feeds {node.op_type} '{name}' as input {slot}")
    if node.op_type == "PRelu" and (len(node.input) < 2 or not graph.is_constant(node.input[1])):
        # a constant slope is not rescaled: PRelu(a z, s) = a PRelu(z, s) for any fixed s
        return Refusal(f"feeds PRelu '{name}' whose slope is not a constant")
    return PassThrough(node.output[0], axis, activation=True)


def _shape_only(graph: GraphIndex, i: int, slot: int, axis: int) -> PassThrough:
    """Shape, Size: their result does not depend on the values, so no factor reaches it."""
    return PassThrough(None, axis, activation=False)


# op type -> rule for ops the channel factors may pass through (next: pools, Flatten, Concat,
# Transpose, ..., each returning where the channels land)
PASSTHROUGH_RULES = {op: _activation for op in ACTIVATIONS} | {
    "Shape": _shape_only,
    "Size": _shape_only,
}


def match_passthrough(graph: GraphIndex, i: int, slot: int, axis: int) -> PassThrough | Refusal:
    """Where channel factors on input ``slot`` of node ``i`` (along ``axis``) go, or why not.

    ``slot`` -1 means the node reads the tensor from inside one of its subgraphs.
    """
    node = graph.nodes[i]
    op, name = node.op_type, graph.names[i]
    if slot < 0 or op in SUBGRAPH_OPS:
        return Refusal(f"used inside the subgraph of {op} '{name}'")
    rule = PASSTHROUGH_RULES.get(op) if node.domain in STANDARD_DOMAINS else None
    if rule is not None:
        return rule(graph, i, slot, axis)
    if op in QUANTIZED:
        return Refusal(f"feeds quantized op {op} '{name}'")
    if op in LINEAR_OPS:
        return Refusal(f"feeds {op} '{name}', which is not a rescalable linear layer")
    if op in NOT_HOMOGENEOUS:
        return Refusal(f"feeds {op} '{name}', which is not positively homogeneous")
    return Refusal(f"feeds {op} '{name}', which does not pass per-unit scales")
