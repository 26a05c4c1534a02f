"""Matching of linear layers: Gemm, MatMul(+Add), Conv, ConvTranspose, each optionally followed
by an inference-form BatchNormalization, and the input weights of recurrent layers, which read
units without making any. Each rule returns a match or a :class:`Refusal`.

A linear layer's output units are the entries of its output along one axis (``out_axis``,
counted from the end: -1 for Gemm/MatMul features, -(k+1) for the channels of a k-D conv), and
it reads its input units along ``in_axis``. A per-unit factor a > 0 is exact because

* Gemm / MatMul with a constant 2-D weight, + a constant bias: ``y = alpha * x W^T + beta * b``;
  scaling row o of W and b[o] by a_o scales y[..., o] by a_o, and scaling column i of W by 1/a_i
  undoes a factor a_i carried by x[..., i]. Attributes left out take the ONNX defaults
  (transA = transB = 0, alpha = beta = 1).
* Conv, weight [O, I/g, k...], any kernel, stride, padding, dilation: output channel o of group
  gi = o // (O/g) reads input channels gi*(I/g) .. (gi+1)*(I/g)-1 through all kernel taps; the
  units are output channels, and the raw columns of row o are (input channel, tap) pairs, so
  the coupling sums |W|^p over the taps (docs/algorithm.md §2). group defaults to 1; padding,
  strides and dilations never mix channels, so they do not matter.
* ConvTranspose, weight [I, O/g, k...]: with group 1 output channel o reads every input channel
  through W[:, o, taps]; rows are axis 1 of the weight, columns axis 0. A grouped ConvTranspose
  would need a row factor that depends on the column's group, which a tensor edit cannot
  express: it is refused.
* LSTM, GRU and RNN read their input x only through the input weight W [directions,
  gates * hidden, input]: every gate computes ``f(x W^T + h R^T + b)``, so dividing column i
  of W (in every direction and gate) by a_i undoes a factor a_i carried by x[..., i]. The gates
  pass sigmoid and tanh, so their rows never move and count as no unit; R and b stay as they
  are. A W computed as ``Unsqueeze(Concat(Slice(V, gate rows), ...), [0])`` from a stored 2-D
  V, every row of V once (each direction's, joined by a Concat), has V's columns: V's columns
  move instead.
* LayerNormalization over the last axis and InstanceNormalization end in
  ``y = scale[o] * x_hat[..., o] + bias[o]``, ``x_hat`` normalised: a diagonal layer whose
  units are the output channels (scaling scale[o] and bias[o] by a_o scales y's channel o by
  a_o; the SmoothQuant symmetry of a transformer's LayerNorm and the projections it feeds).
  Its input units cannot move: a per-channel factor changes the normalisation.
* BatchNormalization (inference form) right after the layer:
  ``y = gamma (z - mean) / sqrt(var + eps) + beta``. Scaling output channel o by a_o exactly
  means multiplying gamma[o] and beta[o] by a_o while the layer's rows, its bias, mean and var
  stay unchanged (scaling those instead is not exact because of eps). So the row edit moves
  from the layer's weight and bias to gamma and beta; the columns are still divided by the
  input units' factors. The norm uses the *folded* network's weights,
  ``W_eff[o, ...] = W[o, ...] * gamma[o] / sqrt(var[o] + eps)``: the weights the BN-free
  equivalent network has, and the ones a BN-folding export would store, so a model balances to
  the same result whether or not its exporter folded BN. The file keeps its BN nodes. A channel
  whose gamma / sqrt(var + eps) is not a finite number (a corrupt running variance, say) makes
  the model compute NaN or infinity: InputError names the node and the channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InputError
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
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
NORMALIZATIONS = frozenset({"LayerNormalization", "InstanceNormalization"})
LINEAR_OPS = frozenset(
    {"Gemm", "MatMul", "Conv", "ConvTranspose"} | set(QUANTIZED_WEIGHT) | RECURRENT_OPS
)


@dataclass(frozen=True)
class Refusal:
    """Why a rule does not apply. ``count`` is the number of units concerned (0 if unknown)."""

    reason: str
    count: int = 0


@dataclass(frozen=True)
class BatchNorm:
    """An inference-form BatchNormalization absorbed into the layer before it."""

    node: int
    scale: str
    bias: str
    factor: np.ndarray  # gamma / sqrt(var + eps), float64


@dataclass(frozen=True)
class LinearMatch:
    """A linear layer: ``output[..., o] = sum_i weight[o, i] * data[..., i] + bias[o]``.

    ``row_axis``/``col_axis`` say which axis of the stored weight holds output/input units;
    ``kind`` is "dense" (Gemm, MatMul), "conv", "convT", "recurrent" (the input weight of an
    LSTM, GRU or RNN, whose rows never move) or "scale" (a normalisation's per-channel scale,
    the diagonal of its weight); ``taps`` the kernel size of a conv.
    ``rows_refusal`` says why the output units cannot move (weight, bias or BN parameters not
    editable); ``cols_refusal`` why the input units cannot (weight not editable).
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
    kind: str = "dense"
    group: int = 1
    taps: int = 1
    bn: BatchNorm | None = None
    bias_axis: int = -1  # the bias's axis that holds one entry per unit (from the end)
    more_weights: tuple[str, ...] = ()
    """Stored weights whose rows follow ``weight``'s and whose columns are its columns (a
    bidirectional recurrent layer's reverse direction, stored apart)."""

    def effective_weight(self, graph: GraphIndex) -> np.ndarray:
        """Rows = output units, raw columns = (input unit, tap), with alpha and BN applied."""
        w = graph.array(self.weight)
        if self.more_weights:  # [rows, input] each: the directions one after the other
            w = np.concatenate([w, *(graph.array(name) for name in self.more_weights)])
        if self.kind == "conv":
            oriented = w.reshape(w.shape[0], -1)
        elif self.kind == "recurrent":  # [directions, gates * hidden, input]
            oriented = w.reshape(-1, w.shape[-1])
        elif self.kind == "scale":  # the diagonal: one weight per row
            oriented = w.reshape(-1, 1)
        elif self.kind == "convT":  # [I, O, taps] -> [O, I * taps] (group 1 only)
            oriented = w.reshape(w.shape[0], w.shape[1], -1).transpose(1, 0, 2)
            oriented = oriented.reshape(w.shape[1], -1)
        else:
            oriented = w.T if self.row_axis == 1 else w
        if self.bn is None:
            if self.alpha == 1.0:
                return oriented
            with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf: refused by the solver
                return self.alpha * oriented.astype(np.float64)
        # in the weight's precision (at least float32): float64 would double a big copy for
        # a relative change of ~1e-7 in the couplings; float64 only if the product overflows
        factor = self.alpha * self.bn.factor
        try:
            with np.errstate(over="raise", invalid="ignore"):
                narrow = factor.astype(np.result_type(oriented.dtype, np.float32))
                return oriented * narrow[:, None]
        except FloatingPointError:
            with np.errstate(over="ignore", invalid="ignore"):
                return oriented.astype(np.float64) * factor[:, None]

    def bias_expand_to(self) -> tuple[int, ...] | None:
        """The shape a broadcast bias takes so that each unit gets its own entry."""
        shape = self.bias_shape
        if not shape:
            return (self.n_rows,)
        if shape[-1] == 1 and self.n_rows != 1:
            return shape[:-1] + (self.n_rows,)
        return None


def _editable(graph: GraphIndex, name: str, role: str, readers: int = 1) -> str | None:
    """Why a constant cannot be rewritten in place, or None if it can (``readers``: the node
    inputs of the one expression that may read it)."""
    if graph.is_overridable(name):
        return (
            f"{role} '{name}' is also a graph input (it can be overridden at run time; "
            "--drop-weight-inputs makes the weights constants)"
        )
    if name in graph.graph_outputs:
        return f"{role} '{name}' is also a graph output"
    uses = graph.uses(name)
    if any(slot < 0 for _, slot in uses):
        return f"{role} '{name}' is also read inside a subgraph"
    n = graph.n_uses(name)  # in a body: over the whole model
    if n > len(uses):
        return f"{role} '{name}' is used by {n} node inputs"
    if n > readers:
        return (
            f"{role} '{name}' is shared by {n} node inputs that need different factors "
            "(--copy-shared-weights gives each its own copy)"
        )
    return None


def _weight(
    graph: GraphIndex, i: int, name: str, units_axis: int, conv: bool = False
) -> Refusal | None:
    """Refuse a weight that is not a stored floating-point constant of the right rank
    (2-D for Gemm/MatMul, at least 3-D for a convolution)."""
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
    if conv:
        count = shape[units_axis] if len(shape) > units_axis else 0
    else:
        count = shape[units_axis] if len(shape) == 2 else (shape[-1] if shape else 0)
    elem = graph.elem_type(name)
    if elem not in FLOAT_TYPES:
        return Refusal(f"weight '{name}' has dtype {dtype_name(elem)}, not floating point", count)
    if conv and len(shape) < 3:
        return Refusal(f"{node.op_type} weight '{name}' has rank {len(shape)}, not >= 3", count)
    if not conv and len(shape) != 2:
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


def attr(node: onnx.NodeProto, name: str, default):
    """An attribute's value, or ``default`` (the ONNX spec's) when the node leaves it out."""
    for proto in node.attribute:
        if proto.name == name:
            return onnx.helper.get_attribute_value(proto)
    return default


def match_linear(graph: GraphIndex, i: int) -> LinearMatch | Refusal | None:
    """Gemm, MatMul(+Add), Conv or ConvTranspose at node ``i``, with a BatchNormalization
    after it when there is one; None for ops that are not linear layers at all."""
    if graph.nodes[i].domain not in STANDARD_DOMAINS:
        return None  # a custom op that happens to share a standard name
    op = graph.nodes[i].op_type
    match: LinearMatch | Refusal | None = None
    if op == "Gemm":
        match = _match_gemm(graph, i)
    elif op == "MatMul":
        match = _match_matmul(graph, i)
    elif op in ("Conv", "ConvTranspose"):
        match = _match_conv(graph, i)
    elif op in RECURRENT_OPS:
        return _match_recurrent(graph, i)
    elif op in NORMALIZATIONS:
        return _match_normalization(graph, i)
    if isinstance(match, LinearMatch):
        rank = graph.rank(match.output)
        if match.kind != "dense" or rank == 2:  # BN normalises axis 1: the units' axis
            return _with_batchnorm(graph, match)
        return match
    if match is not None:
        return match
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
    trans_a = int(attr(node, "transA", 0))
    trans_b = int(attr(node, "transB", 0))
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
        alpha=float(attr(node, "alpha", 1.0)),
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
    stored, row_axis, col_axis = _transposed_constant(graph, b), 0, 1
    if stored is None:  # the usual [in, out] weight
        stored, row_axis, col_axis = b, 1, 0
    refusal = _weight(graph, i, stored, row_axis)
    if refusal is not None or not graph.is_constant(stored):
        return refusal
    shape = graph.shape(stored)
    n_rows, n_cols = shape[row_axis], shape[col_axis]
    weight_refusal = _editable(graph, stored, "weight")
    if stored != b and graph.n_uses(b) > 1:
        weight_refusal = f"weight '{b}' is used by {graph.n_uses(b)} node inputs"
    rows_refusal = weight_refusal
    output, nodes = node.output[0], (i,)
    bias, bias_shape = None, ()
    added = _added_constant(graph, output)
    if added is not None:
        j, bias = added
        nodes, output = (i, j), graph.nodes[j].output[0]
        bias_shape, bias_refusal = _bias(graph, bias, n_rows)
        rows_refusal = rows_refusal or bias_refusal
    return LinearMatch(
        name=graph.names[i],
        nodes=nodes,
        data_input=a,
        in_axis=-1,
        output=output,
        out_axis=-1,
        weight=stored,
        row_axis=row_axis,
        col_axis=col_axis,
        alpha=1.0,
        n_rows=n_rows,
        n_cols=n_cols,
        bias=bias,
        bias_shape=bias_shape,
        rows_refusal=rows_refusal,
        cols_refusal=weight_refusal,
    )


def _match_recurrent(graph: GraphIndex, i: int) -> LinearMatch | Refusal | None:
    """The input weight W [directions, gates * hidden, input] of an LSTM, GRU or RNN: every
    gate computes ``f(x W^T + h R^T + b)``, so x reaches the nonlinearities only through W, and
    dividing column i of W by a_i undoes a factor a_i carried by x[..., i]. The rows (gates)
    pass sigmoid and tanh: they never move, and count as no unit."""
    node = graph.nodes[i]
    if len(node.input) < 3:
        return None
    w = node.input[1]
    if w in graph.sparse or not graph.is_constant(w):
        found = _rows_rearranged(graph, w)
        if found is None:
            return Refusal(f"{node.op_type} '{graph.names[i]}' input weight '{w}' is not stored")
        (stored, *reverse), weight_refusal = found
        rank = 2
    else:
        stored, reverse, weight_refusal, rank = w, [], _editable(graph, w, "weight"), 3
    shape = graph.shape(stored)
    if shape is None or len(shape) != rank or graph.elem_type(stored) not in FLOAT_TYPES:
        return Refusal(f"{node.op_type} input weight '{w}' is not a 3-D float constant")
    if any(graph.shape(other) != shape for other in reverse):
        return Refusal(f"{node.op_type} input weight '{w}' joins directions of different shapes")
    return LinearMatch(
        name=graph.names[i],
        nodes=(i,),
        data_input=node.input[0],
        in_axis=-1,
        output=node.output[0] if node.output else "",
        out_axis=-1,
        weight=stored,
        row_axis=rank - 2,
        col_axis=rank - 1,
        alpha=1.0,
        n_rows=int(np.prod(shape[:-1])) * (1 + len(reverse)),
        n_cols=shape[-1],
        rows_refusal=f"gates of {node.op_type} '{graph.names[i]}'",
        cols_refusal=weight_refusal,
        kind="recurrent",
        more_weights=tuple(reverse),
    )


def _rows_rearranged(graph: GraphIndex, name: str) -> tuple[list[str], str | None] | None:
    """The stored 2-D weights, one per direction, whose rows, each once, in some order, make up
    the input weight ``name``: ``Unsqueeze(.., [0])`` of one direction's, or a Concat of those
    along the directions; and why their columns cannot move (None: they can). None for
    anything else.

    torch exports an LSTM or GRU without constant folding (or inside an If branch, where none
    applies; the dynamo exporter's optimiser leaves weights of realistic size unfolded) as
    ``Unsqueeze(Concat(Slice(W, gate rows), ...), [0])``: its gates reordered. Slices and
    Concats along the rows keep every column whole, so dividing W's column i by a_i divides
    the recurrent layer's column i alike, when W and every node between are read by this
    expression alone."""
    node = graph.producer_of(name)
    if node is None or node.domain not in STANDARD_DOMAINS or name in graph.graph_outputs:
        return None
    joined = node.op_type == "Concat" and attr(node, "axis", None) in (0, -3)
    parts = list(node.input) if joined else [name]
    found = [_direction(graph, part) for part in parts]
    if not found or None in found:
        return None
    stored = [direction for direction, _ in found]
    refusals = [why for _, why in found if why is not None]
    if joined and graph.n_uses(name) != 1:
        refusals.append(f"input weight '{name}' is also read elsewhere")
    return stored, (refusals[0] if refusals else None)


def _direction(graph: GraphIndex, name: str) -> tuple[str, str | None] | None:
    """:func:`_rows_rearranged` for ``name`` = ``Unsqueeze(.., [0])`` of one direction's rows:
    the stored weight and why its columns cannot move, or None."""
    unsqueeze = graph.producer_of(name)
    if (
        unsqueeze is None
        or unsqueeze.op_type != "Unsqueeze"
        or unsqueeze.domain not in STANDARD_DOMAINS
        or name in graph.graph_outputs
    ):
        return None
    axes, _ = given_axes(graph, unsqueeze)
    found = _row_pieces(graph, unsqueeze.input[0]) if axes in ([0], [-3]) else None
    if found is None:
        return None
    piece, rows, reads = found
    stored = graph.stored_name(piece)
    if not np.array_equal(np.sort(rows), np.arange(graph.shape(stored)[0])):
        return None  # rows left out or repeated: the stored weight is not the layer's
    refusal = _editable(graph, stored, "weight", readers=reads)
    if refusal is None and (reads != graph.n_stored_uses(stored) or graph.n_uses(name) != 1):
        refusal = f"weight '{stored}' is also read outside the input weight '{name}'"
    return stored, refusal


def _row_pieces(graph: GraphIndex, name: str) -> tuple[str, np.ndarray, int] | None:
    """(the 2-D constant, the rows of it, in order, and how many times it is read) that
    ``name`` is made of through Slices and Concats along the first axis, each read once, in at
    most :data:`_SHAPE_NODES` nodes (exporters use one Slice per gate and a Concat)."""
    budget = _SHAPE_NODES

    def pieces(name: str) -> tuple[str, np.ndarray, int] | None:
        nonlocal budget
        budget -= 1
        if graph.is_constant(name):
            shape = graph.shape(name)
            if shape is None or len(shape) != 2 or graph.elem_type(name) not in FLOAT_TYPES:
                return None
            return name, np.arange(shape[0]), 1
        node = graph.producer_of(name)
        if (
            node is None
            or node.domain not in STANDARD_DOMAINS
            or graph.n_uses(name) != 1
            or name in graph.graph_outputs
            or budget < 0
        ):
            return None
        if node.op_type == "Concat" and attr(node, "axis", None) in (0, -2):
            parts = [pieces(part) for part in node.input]
            if None in parts or len({graph.stored_name(p[0]) for p in parts}) != 1:
                return None
            rows = np.concatenate([p[1] for p in parts])
            return parts[0][0], rows, sum(p[2] for p in parts)
        if node.op_type == "Slice":
            cuts = slice_cuts(graph, node)
            inner = pieces(node.input[0])
            if cuts is None or inner is None:
                return None
            stored, rows, reads = inner
            for axis, start, end, step in cuts:
                if axis not in (0, -2) or step != 1:
                    return None
                rows = rows[start:end]  # ONNX clamps like Python slicing
            return stored, rows, reads
        return None

    return pieces(name)


def slice_cuts(graph: GraphIndex, node: onnx.NodeProto) -> list[tuple[int, int, int, int]] | None:
    """(axis, start, end, step) for every axis a Slice cuts, as the node gives them (an axis
    may be negative; bounds clamp like Python slicing; INT64 bounds stay valid Python ints),
    from its attributes (before opset 10) or its inputs, constants or sizes known before the
    model runs (:func:`shape_value`: the dynamo exporter without its optimiser slices a
    recurrent weight's gates at multiples of a Shape); None when one is known only then."""
    if len(node.input) == 1:
        starts, ends = attr(node, "starts", []), attr(node, "ends", [])
        axes, steps = attr(node, "axes", None), None
    else:
        values = []
        for name in node.input[1:5]:
            entries = shape_value(graph, name) if name else None
            if name and (entries is None or not all(isinstance(e, int) for e in entries)):
                return None
            values.append(entries)
        starts, ends, axes, steps = values + [None] * (4 - len(values))
    starts = np.asarray(starts, dtype=np.int64).ravel()
    ends = np.asarray(ends, dtype=np.int64).ravel()
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes, dtype=np.int64).ravel()
    steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).ravel()
    cuts = zip(axes, starts, ends, steps, strict=True)
    return [(int(axis), int(start), int(end), int(step)) for axis, start, end, step in cuts]


def is_fixed_constant(graph: GraphIndex, name: str) -> bool:
    """A constant the model's caller cannot override (not also a graph input)."""
    return bool(name) and graph.is_constant(name) and not graph.is_overridable(name)


def fixed_constant(graph: GraphIndex, name: str) -> np.ndarray | None:
    """The value of a :func:`is_fixed_constant` tensor, None for any other."""
    return graph.array(name) if is_fixed_constant(graph, name) else None


def given_axes(graph: GraphIndex, node: onnx.NodeProto) -> tuple[list[int] | None, bool]:
    """The node's ``axes``: its attribute, or from opset 13 (Squeeze, Unsqueeze, ReduceSum) or
    18 (other reductions) its second input; None if not given, and whether they are computed at
    run time (given as an input that is not a constant)."""
    if len(node.input) > 1 and node.input[1]:
        axes = fixed_constant(graph, node.input[1])
        if axes is None:
            return None, True
    else:
        axes = attr(node, "axes", None)
    return (None if axes is None else [int(a) for a in np.asarray(axes).ravel()]), False


Dimension = int | tuple[str, int]
"""An entry of a shape computed at run time: a known size, or (tensor, axis) for that tensor's
size along that axis, whatever it turns out to be."""

_SHAPE_NODES = 64  # nodes a Reshape target is followed back through: exporters use a handful

# integer arithmetic on known sizes, as ONNX defines it (Mod's result has the divisor's sign;
# Div truncates, which floor division matches for the non-negative sizes it is given here)
_SIZE_ARITHMETIC: dict[str, Callable[[int, int], int | None]] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Mod": lambda a, b: a % b if b else None,
    "Div": lambda a, b: a // b if b > 0 and a >= 0 else None,
}


def shape_value(graph: GraphIndex, name: str) -> list[Dimension] | None:
    """The entries of a small integer tensor that exporters compute from ``Shape`` nodes and
    constants (``x.view(x.size(0), -1)`` gives Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])):
    per entry a known size, or a reference to a tensor's dimension whose size is unknown; None
    for anything else. A scalar counts as one entry (Unsqueeze and Squeeze leave the entries as
    they are)."""
    budget = _SHAPE_NODES

    def entries(name: str) -> list[Dimension] | None:
        nonlocal budget
        budget -= 1
        value = fixed_constant(graph, name)
        if value is not None:
            if value.dtype.kind not in "iu" or value.ndim > 1:
                return None
            return [int(v) for v in value.ravel()]
        node = graph.producer_of(name)
        if node is None or node.domain not in STANDARD_DOMAINS or budget < 0:
            return None
        op, first = node.op_type, node.input[0] if node.input else ""
        if op == "Shape":
            dims = graph.dims(first)
            if dims is None:
                return None
            axes = range(len(dims))[int(attr(node, "start", 0)) : attr(node, "end", None)]
            return [(first, axis) if dims[axis] is None else dims[axis] for axis in axes]
        if op in ("Identity", "Unsqueeze", "Squeeze", "Cast", "Reshape"):
            return entries(first)  # a Reshape of a 1-D size list: to one entry, or a scalar
        if op == "Concat":
            parts = [entries(part) for part in node.input]
            return None if None in parts else [entry for part in parts for entry in part]
        if op in _SIZE_ARITHMETIC and len(node.input) == 2 and not attr(node, "fmod", 0):
            # known sizes only: C * H of a view, the dim % rank of an unflatten
            operands = [entries(part) for part in node.input]
            if None in operands or not all(isinstance(e, int) for o in operands for e in o):
                return None
            a, b = operands
            if len(a) != len(b) and 1 in (len(a), len(b)):
                a, b = a * max(1, len(b) // len(a)), b * max(1, len(a) // len(b))
            if len(a) != len(b):
                return None
            results = [_SIZE_ARITHMETIC[op](x, y) for x, y in zip(a, b, strict=True)]
            return None if None in results else results
        if op == "Gather" and len(node.input) == 2:
            data, taken = entries(first), fixed_constant(graph, node.input[1])
            if data is None or taken is None or int(attr(node, "axis", 0)) != 0:
                return None
            if not all(-len(data) <= k < len(data) for k in taken.ravel()):
                return None
            return [data[int(k)] for k in taken.ravel()]
        if op == "Slice" and len(node.input) >= 3:
            bounds = [entries(x) if x else None for x in node.input[1:5]]
            if any(b is not None and (len(b) != 1 or not isinstance(b[0], int)) for b in bounds):
                return None
            start, end, *rest = (None if b is None else b[0] for b in bounds)
            if start is None or end is None or rest[:1] not in ([], [None], [0], [-1]):
                return None  # 1-D: the only axis
            if rest[1:] not in ([], [None], [1]):
                return None  # with step 1
            data = entries(first)
            return None if data is None else data[start:end]
        return None

    return entries(name)


def _match_normalization(graph: GraphIndex, i: int) -> LinearMatch | None:
    """The per-channel scale and bias of a LayerNormalization over the last axis (a 1-D scale)
    or of an InstanceNormalization (channels on axis 1); None where they are not stored
    floating-point vectors: the node is then no layer, and units stop at it as before."""
    node = graph.nodes[i]
    if len(node.input) < 2:
        return None
    scale = node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    shape = _float_constant_shape(graph, scale)
    if shape is None or len(shape) != 1:
        return None
    if node.op_type == "LayerNormalization":
        out_axis = -1
    else:
        rank = graph.rank(node.input[0])
        if rank is None or rank < 2 or _in_group_norm(graph, i):
            return None
        out_axis = 1 - rank
    reason = f"{node.op_type} normalises its input across the units"
    return _diagonal(graph, i, node.input[0], scale, 0, out_axis, reason, bias)


def _float_constant_shape(graph: GraphIndex, name: str) -> tuple[int, ...] | None:
    """The shape of a stored, dense, floating-point constant; None for anything else."""
    if name in graph.sparse or graph.elem_type(name) not in FLOAT_TYPES:
        return None
    return graph.shape(name)


def _in_group_norm(graph: GraphIndex, i: int) -> bool:
    """Whether InstanceNormalization ``i`` is the middle of a GroupNorm as torch exports it:
    Reshape to [N, groups, -1], InstanceNormalization (scale 1, bias 0), Reshape back, Mul by
    the per-channel scale, Add of the bias. The Mul is then the diagonal layer, with a unit
    per channel, not the normalisation, with one per group."""
    reshape = _only_reader(graph, graph.nodes[i].output[0])
    if reshape is None or graph.nodes[reshape].op_type != "Reshape":
        return False
    mul = _only_reader(graph, graph.nodes[reshape].output[0])
    return mul is not None and is_channel_scale(graph, mul)


def _only_reader(graph: GraphIndex, name: str) -> int | None:
    uses = graph.uses(name)
    return uses[0][0] if len(uses) == 1 else None


def _diagonal(
    graph: GraphIndex,
    i: int,
    data: str,
    scale: str,
    row_axis: int,
    out_axis: int,
    cols_refusal: str,
    bias: str | None = None,
) -> LinearMatch:
    """Node ``i`` as a diagonal layer: channel o of its output (axis ``out_axis``) is
    ``scale[o]`` (along ``row_axis`` of the stored scale) times channel o of ``data``, plus
    ``bias[o]``; the data's channels never move (``cols_refusal`` says why)."""
    n = graph.shape(scale)[row_axis]
    bias_shape, bias_refusal = _bias(graph, bias, n) if bias is not None else ((), None)
    return LinearMatch(
        name=graph.names[i],
        nodes=(i,),
        data_input=data,
        in_axis=out_axis,
        output=graph.nodes[i].output[0],
        out_axis=out_axis,
        weight=scale,
        row_axis=row_axis,
        col_axis=row_axis,
        alpha=1.0,
        n_rows=n,
        n_cols=n,
        bias=bias,
        bias_shape=bias_shape,
        rows_refusal=_editable(graph, scale, "scale") or bias_refusal,
        cols_refusal=cols_refusal,
        kind="scale",
    )


def _channel_scale(graph: GraphIndex, i: int) -> tuple[int, str, int] | None:
    """For a Mul of a computed tensor by a stored floating-point constant with one axis of
    two or more entries (a per-channel scale, either side): the tensor's slot, the constant and
    that axis; None for any other node."""
    node = graph.nodes[i]
    if node.op_type != "Mul" or node.domain not in STANDARD_DOMAINS or len(node.input) != 2:
        return None
    for slot in (0, 1):
        data, scale = node.input[slot], node.input[1 - slot]
        shape = _float_constant_shape(graph, scale)
        if graph.is_constant(data) or shape is None:
            continue
        long_axes = [axis for axis, d in enumerate(shape) if d != 1]
        if len(long_axes) == 1 and shape[long_axes[0]] >= 2:
            return slot, scale, long_axes[0]
    return None


def is_channel_scale(graph: GraphIndex, i: int) -> bool:
    return _channel_scale(graph, i) is not None


def match_channel_scale(graph: GraphIndex, i: int) -> LinearMatch:
    """Node ``i`` (one for which :func:`is_channel_scale` holds, reached by no unit) as a
    diagonal layer: ``y[..., o, ...] = scale[o] * x[..., o, ...]``, its units the channels
    along the scale's long axis."""
    slot, scale, axis = _channel_scale(graph, i)
    reason = "its channels carried no unit when it was taken for a diagonal layer"
    out_axis = axis - len(graph.shape(scale))
    return _diagonal(graph, i, graph.nodes[i].input[slot], scale, axis, out_axis, reason)


def _transposed_constant(graph: GraphIndex, name: str) -> str | None:
    """The stored [out, in] weight behind ``Transpose(W)`` (torch's export without constant
    folding), or None. Rescaling W's rows and columns rescales the transpose's alike."""
    producer = graph.producer_of(name)
    if (
        producer is None
        or producer.op_type != "Transpose"
        or producer.domain not in STANDARD_DOMAINS
        or not graph.is_constant(producer.input[0])
        or name in graph.graph_outputs
    ):
        return None
    shape = graph.shape(producer.input[0])
    if shape is None or len(shape) != 2 or list(attr(producer, "perm", [1, 0])) != [1, 0]:
        return None
    return producer.input[0]


def _match_conv(graph: GraphIndex, i: int) -> LinearMatch | Refusal | None:
    node, name = graph.nodes[i], graph.names[i]
    transposed = node.op_type == "ConvTranspose"
    if len(node.input) < 2:
        return None
    w = node.input[1]
    refusal = _weight(graph, i, w, 1 if transposed else 0, conv=True)
    if refusal is not None or not graph.is_constant(w):
        return refusal
    shape = graph.shape(w)
    group = int(attr(node, "group", 1))
    if group < 1:
        return Refusal(f"{node.op_type} '{name}' has an invalid group {group}", shape[0])
    if transposed:
        n_rows, n_cols = shape[1] * group, shape[0]
        if group != 1:
            # row o's factor would depend on the input channel's group: no tensor edit for it
            return Refusal(f"ConvTranspose '{name}' with group {group} is not rescaled", n_rows)
        row_axis, col_axis = 1, 0
    else:
        n_rows, n_cols = shape[0], shape[1] * group
        if n_rows % group:
            return Refusal(f"Conv '{name}' has {n_rows} outputs for group {group}", n_rows)
        row_axis, col_axis = 0, 1
    taps = int(np.prod(shape[2:], dtype=np.int64))
    weight_refusal = _editable(graph, w, "weight")
    rows_refusal = weight_refusal
    bias, bias_shape = None, ()
    if len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
        if graph.is_constant(bias):
            bias_shape, bias_refusal = _bias(graph, bias, n_rows)
            if len(bias_shape) != 1:
                bias_refusal = bias_refusal or f"bias '{bias}' has rank {len(bias_shape)}"
        else:
            bias_refusal = f"bias '{bias}' is not a constant"
        rows_refusal = rows_refusal or bias_refusal
    axis = -(len(shape) - 1)  # channels: axis 1 of an [N, C, spatial...] tensor
    output, nodes, bias_axis = node.output[0], (i,), -1
    if bias is None:  # a bias added by a separate Add of a [C, 1, ...] constant
        added = _added_constant(graph, output)
        if added is not None:
            j, other = added
            shape_b = graph.shape(other)
            ones = all(d == 1 for k, d in enumerate(shape_b) if k != len(shape_b) + axis)
            if len(shape_b) >= -axis and shape_b[axis] == n_rows and ones:
                bias, bias_shape, bias_axis = other, shape_b, axis
                nodes, output = (i, j), graph.nodes[j].output[0]
                rows_refusal = rows_refusal or _bias(graph, other, n_rows)[1]
    return LinearMatch(
        name=name,
        nodes=nodes,
        data_input=node.input[0],
        in_axis=axis,
        output=output,
        out_axis=axis,
        weight=w,
        row_axis=row_axis,
        col_axis=col_axis,
        alpha=1.0,
        n_rows=n_rows,
        n_cols=n_cols,
        bias=bias,
        bias_shape=bias_shape,
        rows_refusal=rows_refusal,
        cols_refusal=weight_refusal,
        kind="convT" if transposed else "conv",
        group=group,
        taps=taps,
        bias_axis=bias_axis,
    )


def _added_constant(graph: GraphIndex, output: str) -> tuple[int, str] | None:
    """The Add node and its constant operand when ``output``'s only reader adds a constant."""
    uses = graph.uses(output)
    if len(uses) != 1 or output in graph.graph_outputs:
        return None
    j, slot = uses[0]
    add = graph.nodes[j]
    if add.op_type != "Add" or add.domain not in STANDARD_DOMAINS or len(add.input) != 2:
        return None
    other = add.input[1 - slot]
    if not graph.is_constant(other) or graph.shape(other) is None:
        return None
    return j, other


def _batchnorm_factor(name: str, scale: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """gamma / sqrt(var + eps) per channel, the factor the runtime applies (float64 from the
    stored values). InputError naming the node and the first bad channel where it is not a
    finite number: the model computes NaN or infinity there, whatever balancing does."""
    # quietly: a signalling NaN (a flipped bit) raises numpy's 'invalid' flag even in a cast
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale, var = scale.astype(np.float64), var.astype(np.float64)
        denominator = var + eps
        factor = scale / np.sqrt(denominator)
    bad = ~(np.isfinite(factor) & (denominator > 0))
    if bad.any():
        k = int(np.argmax(bad))
        raise InputError(
            f"BatchNormalization '{name}', channel {k}: scale {scale[k]:.6g}, variance "
            f"{var[k]:.6g}, epsilon {eps:.6g}; variance + epsilon must be positive and "
            "scale / sqrt(variance + epsilon) finite"
        )
    return factor


def _with_batchnorm(graph: GraphIndex, match: LinearMatch) -> LinearMatch:
    """Absorb an inference-form BatchNormalization that is the only reader of the output."""
    uses = graph.uses(match.output)
    if len(uses) != 1 or match.output in graph.graph_outputs:
        return match
    j, slot = uses[0]
    node = graph.nodes[j]
    if node.op_type != "BatchNormalization" or node.domain not in STANDARD_DOMAINS or slot != 0:
        return match
    if len(node.input) != 5 or any(out for out in node.output[1:]):
        return match  # training form (running statistics as outputs)
    if int(attr(node, "training_mode", 0)) or not int(attr(node, "spatial", 1)):
        return match
    params = node.input[1:]
    for param in params:
        if (
            not graph.is_constant(param)
            or graph.shape(param) != (match.n_rows,)
            or graph.elem_type(param) not in FLOAT_TYPES
        ):
            return match
    scale, bias, _, var = params
    factor = _batchnorm_factor(
        graph.names[j], graph.array(scale), graph.array(var), float(attr(node, "epsilon", 1e-5))
    )
    reason = _editable(graph, scale, "BN scale") or _editable(graph, bias, "BN bias")
    if scale == bias:
        reason = f"BN scale and bias are the same tensor '{scale}'"
    return dataclasses.replace(
        match,
        nodes=match.nodes + (j,),
        output=node.output[0],
        rows_refusal=match.cols_refusal or reason,
        bn=BatchNorm(j, scale, bias, factor),
    )
