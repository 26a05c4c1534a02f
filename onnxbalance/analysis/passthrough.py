"""Ops that per-unit factors pass through, one rule per op family, each with the channel map.

A tensor that carries units is described by a :class:`Carrier`: the unit behind each index
along one axis (``axis``, counted from the end), or along several when attention has split the
channels into heads, -1 for entries that carry no unit (scale 1).
A rule gets the carriers of a node's inputs and says where the units land on its outputs
(:class:`Step`), or refuses with a reason. Every rule is exact for any positive factors a_c on
channels c because the op commutes with them:

* positively homogeneous activations (Relu, LeakyRelu, PRelu with a constant slope, Clip with
  bounds 0 and +inf):
  f(a z) = a f(z) for a > 0, element-wise; these make the units *hidden* (``activated``);
* clips with any other constant bounds (ReLU6 = Clip(0, 6), one bound only, negative bounds,
  Min or Max against a scalar constant; docs/algorithm.md §1):
  clip(a z, a lo, a hi) = a clip(z, lo, hi), so they are
  exact once channel c's bounds become lo a_c and hi a_c, which takes a new node with per-channel
  bound tensors (``Step.clip``; only with ``rescale_clip``). The bounds then scale with the unit
  like a bias does, and the clipped function is positively homogeneous in (z, lo, hi) jointly,
  just as a Relu is in the layer's row and bias: the units are *hidden* (``activated``) exactly
  as after a Relu (Max(z, 0) is one: it passes with ``rescale_clip`` and needs no new node).
  A clip with neither bound is the identity and leaves them as they were;
* copies and per-channel maps: Identity, Dropout (inference), Cast/CastLike from one float type
  to another (exact when it widens; when it narrows, round(a z) and a round(z) differ by the
  target's round-off, as a rescaled weight stored in that type does), max/average/Lp pools and
  their global forms (they act on each channel of an [N, C, ...] tensor separately), mean,
  sum, max, min, L1 and L2 reductions over other axes (all positively homogeneous), Pad (zero
  constant, edge, reflect or wrap; nothing added along the unit axis), Resize/Upsample (each
  channel interpolated alone; the unit axis keeps its size), Mul/Div by a constant or by any
  tensor that carries no unit, which balancing leaves as it is (a (y k) = (a y) k: a
  squeeze-and-excitation gate);
* index maps: Transpose follows the axis; Flatten, Reshape, Squeeze, Unsqueeze keep row-major
  order, so when the unit axis and everything after it (inner size s) fold into one output axis
  whose trailing size t divides s, output index x belongs to channel (x t // s) mod C (column
  j of Flatten([N, C, H, W]) is channel j // (H W)); a Reshape target computed from Shape
  nodes is read as sizes and references to the input's own dimensions, which settles the
  output's sizes for every size those take, and trailing axes a Reshape carries over as they
  are leave the layout of the others alone; Squeeze and Unsqueeze with known axes only remove
  or insert axes of size 1, so the unit axis stays one whatever the other sizes are; Concat
  along the unit axis offsets the channels, Split, Slice and Gather along it select them;
  Slice, Gather and GatherElements along other axes copy entries within each channel; any
  other Reshape (attention's split into heads, heads moved into the batch and back, a channel
  shuffle's Reshape -> Transpose -> Reshape) is followed entry by entry over a trailing block
  of known sizes, and the units land on the axes their channel varies along (:func:`relaid`);
* MatMul of two activations (attention's probabilities times its values) pairs up entries
  along every axis but the one it sums over: units of one operand on any other axis keep their
  factors in the product;
* affine maps with stored constants that are rescaled with the units: Add/Sub of a per-channel
  constant (x + b -> a x + a b; a constant equal for every channel is expanded to one entry
  per channel first), a BatchNormalization that is not right after a layer
  (pre-activation, after a Relu): gamma (a x - a mean) / s + a beta = a BN(x);
* merges: Add, Sum, Sub, Mean (and Concat along another axis), Max and Min of inputs that all
  carry units join channel k of every input into one output channel, which is exact only if
  those units share one factor: they are *tied* (docs/algorithm.md §6); so are the r*r channels
  a DepthToSpace turns into one channel's pixels. An input that carries no unit (a graph input,
  a constant that cannot be rescaled per channel, the output of a non-homogeneous op) has scale
  1, so the tie fixes the whole group.

Everything else stops the units (they keep scale 1): non-homogeneous functions (Sigmoid, Gelu,
Softmax, a normalisation's input, ...), clips without ``rescale_clip``, ops mixing channels (a
MatMul summing over the unit axis, reductions over it), unknown ops, and shapes that cannot be
inferred.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .graph import FLOAT_TYPES, GraphIndex
from .ops import (
    ACTIVATIONS,
    LINEAR_OPS,
    NOT_HOMOGENEOUS,
    QUANTIZED,
    STANDARD_DOMAINS,
    SUBGRAPH_OPS,
    Refusal,
    attr,
    fixed_constant,
    given_axes,
    is_fixed_constant,
    shape_value,
    slice_cuts,
)


@dataclass(frozen=True)
class Carrier:
    """The units a tensor carries along ``axis`` (negative, from the end); -1 = no unit.

    Attention splits a layer's channels into heads ([N, T, C] -> [N, T, H, C/H]) and moves the
    head axis ahead of the tokens: its units are then *spread* over several axes, ``spread``
    (one per dimension of ``units``, in the same order; ``axis`` is the first of them). Only
    ops that move entries without mixing channels take such a carrier (:data:`SPREAD_RULES`);
    a Reshape joins the axes into one again."""

    units: np.ndarray
    activated: np.ndarray  # per entry: has it passed a positively homogeneous activation?
    axis: int
    rank: int | None = None  # the tensor's rank when known without shape inference
    spread: tuple[int, ...] = ()

    @property
    def axes(self) -> tuple[int, ...]:
        return self.spread or (self.axis,)

    def take(self, index: np.ndarray, axis: int | None = None, rank: int | None = None) -> Carrier:
        axis = self.axis if axis is None else axis
        rank = self.rank if rank is None else rank
        return Carrier(self.units[index], self.activated[index], axis, rank)

    def along(self, dim: int, index: np.ndarray) -> Carrier:
        """The units at ``index`` of their dimension ``dim`` (an axis of the tensor each)."""
        units, activated = self.units.take(index, axis=dim), self.activated.take(index, axis=dim)
        return replace(self, units=units, activated=activated)

    def on_axes(self, axes: tuple[int, ...], rank: int | None) -> Carrier:
        """The same units on other axes (as many as it has now) of a tensor of ``rank``."""
        return replace(self, axis=axes[0], spread=axes if self.spread else (), rank=rank)

    @classmethod
    def over(
        cls, units: np.ndarray, activated: np.ndarray, axes: tuple[int, ...], rank: int | None
    ) -> Carrier:
        """Units with one dimension per axis in ``axes``: spread if there are several."""
        return cls(units, activated, axes[0], rank, axes if len(axes) > 1 else ())


@dataclass(frozen=True)
class Step:
    """Where the units go: output carriers, and groups of carriers whose units must be tied
    entry by entry (a merge); ``fixes`` are (units, reason) that must keep scale 1; ``scaled``
    are stored constants whose entries along an axis scale with the units (a bias added to
    rescaled channels, a BatchNormalization's mean and bias)."""

    outputs: tuple[tuple[str, Carrier], ...] = ()
    ties: tuple[tuple[Carrier, ...], ...] = ()
    fixes: tuple[tuple[np.ndarray, str], ...] = ()
    # (constant, its axis, units, the shape it is expanded to or None)
    scaled: tuple[tuple[str, int, np.ndarray, tuple[int, ...] | None], ...] = ()
    clip: Bounds | None = None  # exact only once the node's bounds move with the units


@dataclass(frozen=True)
class Bounds:
    """A clip of ``data`` to [low, high] (-inf / +inf where absent), both constants."""

    data: str
    low: float
    high: float

    @property
    def is_relu(self) -> bool:
        return self.low == 0.0 and self.high == np.inf

    def text(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


Rule = Callable[[GraphIndex, int, dict[int, Carrier]], "Step | Refusal"]


def _name(graph: GraphIndex, i: int) -> str:
    return f"{graph.nodes[i].op_type} '{graph.names[i]}'"


def _spread_refusal(graph: GraphIndex, i: int) -> Refusal:
    return Refusal(f"feeds {_name(graph, i)} with the unit axis spread over several axes")


def _only_data(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Carrier | Refusal:
    """The carrier of input 0, refusing units that arrive on any other input."""
    for slot in carried:
        if slot != 0:
            return Refusal(f"feeds {_name(graph, i)} as input {slot}")
    return carried[0]


def _rank(graph: GraphIndex, name: str, carrier: Carrier | None = None) -> int | Refusal:
    rank = graph.rank(name)
    if rank is None and carrier is not None:
        rank = carrier.rank
    if rank is None:
        return Refusal(f"shape of '{name}' cannot be inferred")
    return rank


def _data_with_rank(
    graph: GraphIndex, i: int, carried: dict[int, Carrier]
) -> tuple[Carrier, int] | Refusal:
    """The carrier of input 0 and that input's rank, or why the node cannot pass units on."""
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    rank = _rank(graph, graph.nodes[i].input[0], data)
    if isinstance(rank, Refusal):
        return rank
    return data, rank


def _same(graph: GraphIndex, i: int, carrier: Carrier, activated: bool = False) -> Step:
    out = graph.nodes[i].output[0]
    if activated:
        carrier = replace(carrier, activated=np.ones_like(carrier.activated))
    return Step(outputs=((out, carrier),))


# ------------------------------------------------------------------ element-wise, per channel


def _activation(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    node = graph.nodes[i]
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    if node.op_type == "PRelu" and (
        len(node.input) < 2 or not is_fixed_constant(graph, node.input[1])
    ):
        # a constant slope is not rescaled: PRelu(a z, s) = a PRelu(z, s) for any fixed s
        return Refusal(f"feeds PRelu '{graph.names[i]}' whose slope is not a constant")
    return _same(graph, i, data, activated=True)


def _clip(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Clip: bounds from inputs 1 and 2 (opset >= 11) or from attributes (opset < 11)."""
    node = graph.nodes[i]
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    bounds = []
    for slot, name, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if len(node.input) > slot and node.input[slot]:
            value = fixed_constant(graph, node.input[slot])
            if value is None or value.size != 1:
                return Refusal(f"feeds {_name(graph, i)} whose bounds are not scalar constants")
            bounds.append(float(value.ravel()[0]))
        else:
            bounds.append(float(attr(node, name, default)))
    clip = Bounds(node.input[0], *bounds)
    step = _bounded(graph, i, data, clip)
    if clip.is_relu and isinstance(step, Step):  # torch's clamp(min=0): a Relu, option or not
        return Step(outputs=step.outputs)
    return step


def _min_max(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Max(z, c) and Min(z, c) with a scalar constant c clip z to one bound, so the
    Min(Max(x, 0), 6) that exporters write for ReLU6 is a Relu and a clip to at most 6 (both
    clips: without ``rescale_clip`` the units stop at the Max, as they always did). Max and Min
    of inputs that all carry units tie them, channel by channel, as a sum does:
    max(a y, a z) = a max(y, z) (maxout, LightCNN's max-feature-map)."""
    node = graph.nodes[i]
    if len(carried) >= 2 and len(carried) == sum(1 for name in node.input if name):
        return _merge(graph, i, carried)
    if len(node.input) != 2 or len(carried) != 1:
        return Refusal(f"feeds {_name(graph, i)}, which does not clip to a constant")
    slot, data = next(iter(carried.items()))
    value = fixed_constant(graph, node.input[1 - slot])
    if value is None or value.size != 1:
        return Refusal(f"feeds {_name(graph, i)}, which does not clip to a scalar constant")
    c = float(value.ravel()[0])
    low, high = (c, np.inf) if node.op_type == "Max" else (-np.inf, c)
    return _bounded(graph, i, data, Bounds(node.input[slot], low, high))


def _bounded(graph: GraphIndex, i: int, data: Carrier, bounds: Bounds) -> Step | Refusal:
    if np.isnan(bounds.low) or np.isnan(bounds.high):
        return Refusal(f"feeds {_name(graph, i)}, whose bound is NaN")
    if bounds.high == np.inf and bounds.low == -np.inf:
        return _same(graph, i, data)  # the identity
    return Step(outputs=_same(graph, i, data, activated=True).outputs, clip=bounds)


def _copy(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Identity, Dropout in inference mode (its mask output carries nothing)."""
    node = graph.nodes[i]
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = fixed_constant(graph, node.input[2])
        if mode is None or bool(mode):
            return Refusal(f"feeds Dropout '{graph.names[i]}' that may run in training mode")
    return _same(graph, i, data)


def _cast(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Cast and CastLike between float types: widening is exact; narrowing gives round(a z),
    which differs from a round(z) by the target's round-off, as a rescaled weight stored in that
    type does (fp16 converters wrap the ops they keep in float32, such as Resize, in a Cast each
    way). A cast to anything else (an integer, a bool, float8) stops the units. CastLike reads
    only the dtype of its second input: units arriving there reach nothing (the dynamo exporter
    without its optimiser casts constants like the activations they meet)."""
    node = graph.nodes[i]
    if node.op_type == "CastLike":
        carried = {slot: carrier for slot, carrier in carried.items() if slot != 1}
        if not carried:
            return Step()
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    if node.op_type == "Cast":
        target = int(attr(node, "to", 0))
    else:
        target = graph.elem_type(node.input[1]) if len(node.input) > 1 else None
    source = graph.elem_type(node.input[0])
    if target not in FLOAT_TYPES or source not in (*FLOAT_TYPES, None):
        return Refusal(f"feeds {_name(graph, i)}, which does not cast to a float type")
    return _same(graph, i, data)


def _pool(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Pools act on each channel (axis 1) separately: the units must be on axis 1."""
    found = _data_with_rank(graph, i, carried)
    if isinstance(found, Refusal):
        return found
    data, rank = found
    if data.axis + rank != 1:
        return Refusal(f"feeds {_name(graph, i)}, which pools over the unit axis")
    return _same(graph, i, data)


def _scale_by_factor(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Mul by a factor k (either side) or Div by one: a (y k) = (a y) k. k is a constant, or
    any tensor that carries no unit: balancing leaves it as it is (a squeeze-and-excitation
    gate, computed from y by a layer whose columns undo y's scales, is one)."""
    node = graph.nodes[i]
    if len(carried) != 1 or len(node.input) != 2:
        return Refusal(f"feeds {_name(graph, i)} with scaled units on both inputs")
    (slot, data), other = next(iter(carried.items())), node.input[1 - next(iter(carried))]
    if node.op_type == "Div" and slot != 0:
        return Refusal(f"divides in {_name(graph, i)}, which is not homogeneous in the divisor")
    dims = graph.dims(other)
    if (dims is None or None in dims) and (data.spread or data.units.size == 1):
        # it could spread one unit over the unit axis, or entries over the spread axes
        return Refusal(f"feeds {_name(graph, i)} whose other input '{other}' has no known shape")
    shape = dims or ()
    if data.spread and any(d != 1 for d in shape):  # attention's scaling of q and k: a scalar
        return _spread_refusal(graph, i)
    if len(shape) >= -data.axis and shape[data.axis] not in (None, 1, len(data.units)):
        return Refusal(f"feeds {_name(graph, i)}, whose factor does not broadcast per unit")
    # the product has the rank of the factor where that is higher
    rank = None if data.rank is None or dims is None else max(data.rank, len(dims))
    return _same(graph, i, replace(data, rank=rank))


REDUCTIONS = frozenset(
    ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2")
)


def _reduce(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Positively homogeneous reductions over axes other than the unit axis (a spatial mean)."""
    node = graph.nodes[i]
    found = _data_with_rank(graph, i, carried)
    if isinstance(found, Refusal):
        return found
    data, rank = found
    axes, computed = given_axes(graph, graph.nodes[i])
    if computed:
        return Refusal(f"feeds {_name(graph, i)} whose axes are not a constant")
    if not axes:
        if int(attr(node, "noop_with_empty_axes", 0)):
            return _same(graph, i, data)
        axes = range(rank)  # the default reduces every axis
    axes = {a % rank for a in axes}
    k = data.axis + rank
    if k in axes:
        return Refusal(f"feeds {_name(graph, i)}, which reduces over the unit axis")
    if int(attr(node, "keepdims", 1)):
        return _same(graph, i, data)
    kept = k - sum(1 for a in axes if a < k)
    kept_rank = rank - len(axes)
    moved = Carrier(data.units, data.activated, kept - kept_rank, kept_rank)
    return Step(outputs=((node.output[0], moved),))


def _pad(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    node = graph.nodes[i]
    found = _data_with_rank(graph, i, carried)
    if isinstance(found, Refusal):
        return found
    data, rank = found
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "edge", "reflect", "wrap"):
        return Refusal(f"feeds Pad '{graph.names[i]}' with mode {mode}")
    if len(node.input) > 1:  # opset >= 11: pads, constant_value, axes are inputs
        pads = fixed_constant(graph, node.input[1])
        given = [*node.input[2:4], "", ""]
        value = fixed_constant(graph, given[0]) if given[0] else 0.0
        axes = fixed_constant(graph, given[1]) if given[1] else None
        if pads is None or value is None or (given[1] and axes is None):
            return Refusal(f"feeds Pad '{graph.names[i]}' whose pads are not constants")
    else:
        pads, value, axes = attr(node, "pads", []), attr(node, "value", 0.0), None
    pads = np.asarray(pads, dtype=np.int64).ravel()
    axes = np.arange(rank) if axes is None else (np.asarray(axes).ravel() % rank)
    if len(pads) != 2 * len(axes):
        return Refusal(f"feeds Pad '{graph.names[i]}' with {len(pads)} pads for rank {rank}")
    if mode == "constant" and np.any(np.asarray(value, dtype=np.float64) != 0):
        return Refusal(f"feeds Pad '{graph.names[i]}' with a non-zero constant")
    k = data.axis + rank
    for j, ax in enumerate(axes):
        if ax == k and (pads[j] != 0 or pads[j + len(axes)] != 0):
            return Refusal(f"feeds Pad '{graph.names[i]}', which pads the unit axis")
    return _same(graph, i, data)


def _resize(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Resize/Upsample interpolate each channel alone; the unit axis must keep its size."""
    node = graph.nodes[i]
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    mode = attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    transform = attr(node, "coordinate_transformation_mode", b"half_pixel")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    # these keep index x on an axis of scale 1; tf_half_pixel_for_nn may round it to x + 1,
    # tf_crop_and_resize may crop the unit axis and extrapolate a constant
    if transform not in (
        "half_pixel",
        "half_pixel_symmetric",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
    ):
        return Refusal(f"feeds {_name(graph, i)} with coordinate transformation {transform}")
    if mode not in ("nearest", "linear", "cubic", "bilinear", "trilinear"):
        return Refusal(f"feeds {_name(graph, i)} with mode {mode}")
    before, after = graph.dims(node.input[0]), graph.dims(node.output[0])
    if (
        before is not None
        and after is not None
        and None not in (before[data.axis], after[data.axis])
    ):
        if before[data.axis] != after[data.axis]:
            return Refusal(f"feeds {_name(graph, i)}, which resizes the unit axis")
        return _same(graph, i, data)
    # sizes unknown: constant scales (Resize input 2, Upsample input 1) must keep the axis
    if attr(node, "axes", None) is not None:
        return Refusal(f"shape of '{node.output[0]}' cannot be inferred")
    slot = 1 if node.op_type == "Upsample" or len(node.input) == 2 else 2
    scales = fixed_constant(graph, node.input[slot]) if len(node.input) > slot else None
    if scales is not None and scales.size >= -data.axis and scales.ravel()[data.axis] == 1:
        return _same(graph, i, data)
    return Refusal(f"shape of '{node.output[0]}' cannot be inferred")


# ------------------------------------------------------------------ index maps


def _transpose(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    node = graph.nodes[i]
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    perm = attr(node, "perm", None)
    if perm is None:
        rank = _rank(graph, node.input[0], data)
        if isinstance(rank, Refusal):
            return rank
        perm = list(reversed(range(rank)))
    rank = len(perm)
    axes = tuple(list(perm).index(axis + rank) - rank for axis in data.axes)
    return Step(outputs=((node.output[0], data.on_axes(axes, rank)),))


def reshaped(
    before: tuple[int | None, ...], axis: int, after: tuple[int | None, ...], n_units: int
) -> tuple[int, np.ndarray] | None:
    """Where units on ``axis`` of a ``before``-shaped tensor land when its elements are laid out
    again, in the same row-major order, as ``after`` (Reshape, Flatten, Squeeze, Unsqueeze).

    Returns the output axis (from the end) and, per index along it, the unit's position along
    the input axis; None when the units do not map onto one output axis.

    >>> reshaped((None, 3, 2, 2), -3, (None, 12), 3)[1].tolist()
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    """
    k = axis + len(before)
    if before[k] != n_units or any(d is None for d in before[k:]):
        return None
    inner = int(np.prod(before[k + 1 :], dtype=np.int64))
    # sizes of the input's trailing blocks that contain whole channels
    blocks = set()
    size = n_units * inner
    blocks.add(size)
    for d in reversed(before[:k]):
        if d is None:
            break
        size *= d
        blocks.add(size)
    trailing = 1
    suffixes = []
    for d in reversed(after):
        if d is None:
            break
        suffixes.append((trailing, trailing * d))
        trailing *= d
    # suffixes[j] = (product after axis m, product from axis m) for m = len(after) - 1 - j
    for j in reversed(range(len(suffixes))):
        inner_out, from_m = suffixes[j]
        if from_m in blocks and inner % inner_out == 0 and after[len(after) - 1 - j] != 1:
            m_size = from_m // inner_out
            index = (np.arange(m_size, dtype=np.int64) * inner_out // inner) % n_units
            return -1 - j, index
    return None


def _repeated_axis(
    graph: GraphIndex, data: str, before: tuple[int | None, ...], reference: tuple[str, int]
) -> int | None:
    """The axis of a Reshape's input ``data`` whose size a target entry (a reference to a
    tensor's unknown size, :func:`.ops.shape_value`) repeats: a reference to the input itself,
    or to another tensor's size that shape inference named like one of the input's (attention's
    view(b, t, heads, -1) of a projection, b and t read off the layer's input); else None."""
    tensor, axis = reference
    if tensor == data:
        return axis % len(before) if -len(before) <= axis < len(before) else None
    symbol = graph.symbol(tensor, axis)
    named = [k for k in range(len(before)) if symbol and graph.symbol(data, k) == symbol]
    return named[0] if len(named) == 1 else None


def _computed_dims(
    graph: GraphIndex, i: int, before: tuple[int | None, ...]
) -> tuple[tuple[int | None, ...], int] | None:
    """A Reshape's output shape read from its target (:func:`.ops.shape_value`), None per
    dimension that repeats one of the input's unknown ones, and how many trailing input axes
    it carries over as they are (a CRNN's ``view(n, c * h, w)`` of features of any width keeps
    w). None if the shape cannot be told for every size the unknown dimensions take: each must
    reappear in the target once, as a reference to it or as the -1 that the known sizes leave
    to it alone."""
    node = graph.nodes[i]
    entries = shape_value(graph, node.input[1])
    if entries is None or int(attr(node, "allowzero", 0)):
        return None
    dims: list[int | None] = []
    repeated: dict[int, int] = {}  # output position -> the input axis whose size it repeats
    for position, entry in enumerate(entries):
        if entry == 0:  # 0 repeats the input's size at the same position
            entry = (node.input[0], position)
        if isinstance(entry, int):
            if entry < -1:
                return None
            dims.append(entry)
            continue
        axis = _repeated_axis(graph, node.input[0], before, entry)
        if axis is None:
            return None
        repeated[position] = axis
        dims.append(before[axis])
    axes = set(repeated.values())
    left = {axis for axis, size in enumerate(before) if size is None} - axes
    if len(axes) != len(repeated) or dims.count(-1) > 1 or len(left) > (-1 in dims):
        return None
    if -1 in dims:
        hole = dims.index(-1)
        known_in = int(
            np.prod([d for a, d in enumerate(before) if a not in axes | left], dtype=np.int64)
        )
        known_out = int(
            np.prod(
                [d for k, d in enumerate(dims) if k != hole and k not in repeated], dtype=np.int64
            )
        )
        if known_out <= 0 or known_in % known_out:
            return None
        if left:  # the unknown size times known_in / known_out: itself only if that is 1
            if known_in != known_out:
                return None
            repeated[hole], dims[hole] = left.pop(), None
        else:
            dims[hole] = known_in // known_out
    kept = 0
    while kept < min(len(dims), len(before)) and (
        repeated.get(len(dims) - 1 - kept) == len(before) - 1 - kept
    ):
        kept += 1
    return tuple(dims), kept


def resolved_reshapes(graph: GraphIndex) -> dict[str, tuple[int | None, ...]]:
    """Output shapes that shape inference left unknown, or knows less of, for Reshapes whose
    computed targets :func:`_computed_dims` reads (its ``Mod`` of an unflatten is beyond ONNX's
    data propagation), or whose targets at least give the rank and some sizes (paddle2onnx's
    flatten of conv features to [N, C, -1] leaves ONNX's inference at opset 12 without even the
    rank): given back to it as hints, they let it infer the shapes after them."""
    found = {}
    for i, node in enumerate(graph.nodes):
        if node.op_type != "Reshape" or node.domain not in STANDARD_DOMAINS:
            continue
        before, after = graph.dims(node.input[0]), graph.dims(node.output[0])
        if after is not None and None not in after:
            continue
        resolved = None if before is None else _computed_dims(graph, i, before)
        dims = resolved[0] if resolved is not None else _target_sizes(graph, i, before)
        if dims is None:
            continue
        known = sum(d is not None for d in dims)
        if after is None or (len(after) == len(dims) and known > len(after) - after.count(None)):
            found[node.output[0]] = dims
    return found


def _target_sizes(
    graph: GraphIndex, i: int, before: tuple[int | None, ...] | None
) -> tuple[int | None, ...] | None:
    """A Reshape's output rank and those of its sizes its target tells alone (None for the
    others), whatever the sizes it reads at run time."""
    node = graph.nodes[i]
    entries = shape_value(graph, node.input[1])
    if entries is None:
        return None
    sizes: list[int | None] = []
    for position, entry in enumerate(entries):
        if entry == 0 and not int(attr(node, "allowzero", 0)):  # the input's size there
            entry = before[position] if before is not None and position < len(before) else None
        sizes.append(entry if isinstance(entry, int) and entry > 0 else None)
    return tuple(sizes)


def _leading(
    graph: GraphIndex, i: int, data: Carrier, before: tuple[int | None, ...]
) -> Step | None:
    """A Reshape whose target repeats the input's sizes up to the units' last axis (paddle2onnx
    flattens conv features of any size to [N, C, H·W] with a target computed from the input's
    Shape; an attention head split [0, -1, 3, heads, C/heads] keeps the batch): equal leading
    sizes hold the same entries, so the units keep their axes (from the start) whatever the
    sizes after them."""
    node = graph.nodes[i]
    if node.op_type != "Reshape" or int(attr(node, "allowzero", 0)):
        return None
    entries = shape_value(graph, node.input[1])
    last = max(data.axes) + len(before)
    if entries is None or len(entries) <= last:
        return None
    for position, entry in enumerate(entries[: last + 1]):
        if isinstance(entry, tuple):
            if _repeated_axis(graph, node.input[0], before, entry) != position:
                return None
        elif entry != 0 and entry != before[position]:  # a size known to be the same, or 0
            return None
    rank = len(entries)
    moved = data.on_axes(tuple(axis + len(before) - rank for axis in data.axes), rank)
    return Step(outputs=((node.output[0], moved),))


def _squeeze(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Squeeze and Unsqueeze with known axes only remove or insert axes of size 1: the unit axis
    stays an axis of its own whatever the other sizes are (a CRNN's ``squeeze(2)`` of features
    of any width). Without known axes, :func:`_reshape` decides from the shapes."""
    node = graph.nodes[i]
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    axes, _ = given_axes(graph, graph.nodes[i])
    rank = _rank(graph, node.input[0], data)
    if not axes or isinstance(rank, Refusal):
        return _reshape(graph, i, carried)  # no axes: Squeeze drops every axis of size 1
    units = [axis + rank for axis in data.axes]  # from the start
    out_rank = rank - len(axes) if node.op_type == "Squeeze" else rank + len(axes)
    if len({a % max(rank, out_rank) for a in axes}) != len(axes) or not 0 <= min(units):
        return _reshape(graph, i, carried)  # repeated axes: an invalid node, judged by shapes
    unit_values, activated = data.units, data.activated
    if node.op_type == "Squeeze":
        removed = {a % rank for a in axes}
        # of units spread over several axes, one of size 1 may go (the q, k or v part sliced
        # off a packed projection); the one axis of a single channel may not: none is left
        gone = tuple(j for j, unit in enumerate(units) if unit in removed)
        if gone and (len(gone) == len(units) or any(unit_values.shape[j] != 1 for j in gone)):
            return Refusal(f"feeds {_name(graph, i)}, which removes the unit axis")
        unit_values, activated = unit_values.squeeze(gone), activated.squeeze(gone)
        positions = [unit - sum(a < unit for a in removed) for unit in units if unit not in removed]
    else:
        inserted = {a % out_rank for a in axes}
        kept = [k for k in range(out_rank) if k not in inserted]
        positions = [kept[unit] for unit in units]
    moved = tuple(k - out_rank for k in positions)
    return Step(outputs=((node.output[0], Carrier.over(unit_values, activated, moved, out_rank)),))


def _reshape(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    node = graph.nodes[i]
    data = _only_data(graph, i, carried)
    if isinstance(data, Refusal):
        return data
    before, after = graph.dims(node.input[0]), graph.dims(node.output[0])
    computed = node.op_type == "Reshape" and not is_fixed_constant(graph, node.input[1])
    kept = 0  # trailing axes carried over as they are: the layout of the others decides
    if node.op_type == "Reshape" and before is not None and (after is None or None in after):
        resolved = _computed_dims(graph, i, before)
        if resolved is not None:
            after, kept = resolved
    if before is not None and max(data.axes) >= -kept:
        kept = 0  # the unit axis itself is carried over: the sizes before it decide
    core_before = before if before is None or not kept else before[:-kept]
    core_after = after if after is None or not kept else after[:-kept]
    unknown = before is None or any(d is None for d in core_before[min(data.axes) + len(before) :])

    def unseen(name: str) -> Refusal:
        if computed:  # the true obstacle: where the channels land depends on a run-time value
            return Refusal(f"feeds {_name(graph, i)}, whose target shape is computed at run time")
        return Refusal(f"shape of '{name}' cannot be inferred")

    if unknown or after is None:
        leading = None if before is None else _leading(graph, i, data, before)
        if leading is not None:
            return leading
        return unseen(node.input[0] if unknown else node.output[0])
    # unknown leading sizes do not matter when a trailing block of known sizes holds the units
    if not data.spread:
        mapped = reshaped(core_before, data.axis + kept, core_after, len(data.units))
        if mapped is not None:
            axis, index = mapped
            return Step(outputs=((node.output[0], data.take(index, axis - kept, len(after))),))
    core = data.on_axes(tuple(axis + kept for axis in data.axes), len(core_before))
    moved = relaid(core_before, core, core_after)
    if moved is not None:
        moved = moved.on_axes(tuple(axis - kept for axis in moved.axes), len(after))
        return Step(outputs=((node.output[0], moved),))
    if None in core_after[1:]:
        return unseen(node.output[0])
    return Refusal(f"feeds {_name(graph, i)}, whose layout of the units cannot be followed")


SIMULATED_ENTRIES = 1 << 22
"""Largest block whose layout :func:`relaid` follows entry by entry: 32 MiB of positions."""


def relaid(
    before: tuple[int | None, ...], data: Carrier, after: tuple[int | None, ...]
) -> Carrier | None:
    """Where the units of ``data``, on a ``before``-shaped tensor, land when a Reshape lays its
    entries out again, in the same row-major order, as ``after``: attention's split of the
    channels into heads ([N, T, C] -> [N, T, H, C/H], units spread over two axes), its merge of
    heads into the batch ([T, N, C] -> [T, N·H, C/H]), their joins back, a channel shuffle.

    The channel of every entry of the smallest trailing block of ``before`` that holds all unit
    axes and is a trailing block of ``after`` too is followed through the new layout (equal
    trailing blocks hold the same entries, whatever the sizes in front of them). Each output
    entry's channel then depends on its indices along some axes only: the units lie on those.
    None when no such block of known sizes exists, it is larger than
    :data:`SIMULATED_ENTRIES`, or every entry has the same channel (one channel: no axis tells
    where it is)."""
    rank = len(before)
    positions = [axis + rank for axis in data.axes]
    sizes = data.units.shape  # one dimension per unit axis
    if any(before[k] != n for k, n in zip(positions, sizes, strict=True)):
        return None
    starts: dict[int, int] = {}  # size of a trailing block of ``after`` -> its first axis
    size = 1
    for start in reversed(range(len(after))):
        if after[start] is None:
            break
        size *= after[start]
        starts.setdefault(size, start)
    start = min(positions)
    if any(d is None for d in before[start:]):
        return None
    size = int(np.prod(before[start:], dtype=np.int64))
    while size not in starts:
        start -= 1
        if start < 0 or before[start] is None:
            return None
        size *= before[start]
    if size > SIMULATED_ENTRIES:
        return None
    # per entry of the block, its position in data.units (raveled), laid out as after's block
    in_units = np.arange(data.units.size).reshape(sizes).transpose(np.argsort(positions))
    shape = [1] * (rank - start)
    for k in positions:
        shape[k - start] = before[k]
    block = np.broadcast_to(in_units.reshape(shape), before[start:])
    ids = block.reshape(after[starts[size] :])
    # a unit and whether it was activated, per entry (the same pair may sit at several ids)
    entry = data.units.ravel()[ids] * 2 + data.activated.ravel()[ids]
    varying = [m for m in range(ids.ndim) if not (entry == entry.take([0], axis=m)).all()]
    if not varying:
        return None
    index = ids[tuple(slice(None) if m in varying else 0 for m in range(ids.ndim))]
    axes = tuple(m - ids.ndim for m in varying)
    units, activated = data.units.ravel()[index], data.activated.ravel()[index]
    return Carrier.over(units, activated, axes, len(after))


def _concat(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    node = graph.nodes[i]
    first = next(iter(carried.values()))
    rank = _rank(graph, node.output[0], first)
    if isinstance(rank, Refusal):
        return rank
    axis = int(attr(node, "axis", 0))
    axis = axis - rank if axis >= 0 else axis
    if any(c.axis != first.axis for c in carried.values()):
        return Refusal(f"feeds {_name(graph, i)} with units on different axes")
    if axis != first.axis:
        return _merge(graph, i, carried)
    units, activated = [], []
    for slot, name in enumerate(node.input):
        if slot in carried:
            units.append(carried[slot].units)
            activated.append(carried[slot].activated)
            continue
        dims = graph.dims(name)
        if dims is None or len(dims) != rank or dims[axis] is None:
            return Refusal(f"shape of '{name}' cannot be inferred")
        units.append(np.full(dims[axis], -1, dtype=np.int64))
        activated.append(np.ones(dims[axis], dtype=bool))
    out = Carrier(np.concatenate(units), np.concatenate(activated), axis, rank)
    return Step(outputs=((node.output[0], out),))


def _depth_to_space(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """DepthToSpace (a pixel shuffle) moves blocks of r*r channels into the r x r pixels of
    one channel: output channel c holds input channels k*C + c (mode DCR, the default) or
    c*r*r + k (CRD) for k < r*r, which must then share one factor. SpaceToDepth spreads
    channel c over the output channels k*C + c."""
    found = _data_with_rank(graph, i, carried)
    if isinstance(found, Refusal):
        return found
    data, rank = found
    node = graph.nodes[i]
    block = int(attr(node, "blocksize", 0)) ** 2
    n = len(data.units)
    if rank != 4 or data.axis != -3 or not block or data.spread:
        return Refusal(f"feeds {_name(graph, i)} with units off the channel axis of [N, C, H, W]")
    if node.op_type == "SpaceToDepth":
        return _same(graph, i, data.take(np.tile(np.arange(n), block)))
    if n % block:
        return Refusal(f"feeds {_name(graph, i)} {n} channels, not a multiple of {block}")
    channels = np.arange(n // block)
    if attr(node, "mode", b"DCR") in ("CRD", b"CRD"):
        parts = tuple(data.take(channels * block + k) for k in range(block))
    else:
        parts = tuple(data.take(k * len(channels) + channels) for k in range(block))
    activated = np.logical_and.reduce([part.activated for part in parts])
    out = replace(parts[0], activated=activated)
    return Step(outputs=((node.output[0], out),), ties=(parts,))


def _split(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    node = graph.nodes[i]
    found = _data_with_rank(graph, i, carried)
    if isinstance(found, Refusal):
        return found
    data, rank = found
    axis = int(attr(node, "axis", 0))
    axis = axis - rank if axis >= 0 else axis
    outputs = [out for out in node.output if out]
    if axis not in data.axes:
        return Step(outputs=tuple((out, data) for out in outputs))
    j = data.axes.index(axis)  # a unit axis: timm's unbind of a packed q/k/v splits one
    n = data.units.shape[j]
    sizes = _split_sizes(graph, i, n)
    if sizes is None or sum(sizes) != n:
        return Refusal(f"shape of '{node.output[0]}' cannot be inferred")
    start, pieces = 0, []
    for out, size in zip(node.output, sizes, strict=True):
        if out:
            pieces.append((out, data.along(j, np.arange(start, start + size))))
        start += size
    return Step(outputs=tuple(pieces))


def _split_sizes(graph: GraphIndex, i: int, total: int) -> list[int] | None:
    """The parts' sizes along the split axis: inferred, or from the split input (opset >= 13),
    the split attribute (older opsets), or equal parts (the last one smaller, opset 18)."""
    node = graph.nodes[i]
    axis = int(attr(node, "axis", 0))
    inferred = [graph.dims(out) for out in node.output]
    if all(d is not None and len(d) > axis % len(d) and d[axis] is not None for d in inferred):
        return [int(d[axis]) for d in inferred]
    if len(node.input) > 1 and node.input[1]:
        sizes = fixed_constant(graph, node.input[1])
        return None if sizes is None else [int(v) for v in np.ravel(sizes)]
    sizes = attr(node, "split", None)
    if sizes is not None:
        return [int(v) for v in sizes]
    n = len(node.output)
    step = -(-total // n)
    return [max(0, min(step, total - k * step)) for k in range(n)]


def _slice(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    node = graph.nodes[i]
    found = _data_with_rank(graph, i, carried)
    if isinstance(found, Refusal):
        return found
    data, rank = found
    cuts = slice_cuts(graph, node)
    if cuts is None:
        # bounds computed at run time (a time step's window) on other axes only: the entries
        # kept along the unit axis are all of them
        given = fixed_constant(graph, node.input[3]) if len(node.input) > 3 else None
        if given is not None:
            axes = {int(a) if a < 0 else int(a) - rank for a in np.ravel(given)}
            if not axes & set(data.axes):
                return _same(graph, i, data)
        return Refusal(f"feeds Slice '{graph.names[i]}' whose bounds are not constants")
    for ax, start, end, step in cuts:
        ax = ax if ax < 0 else ax - rank
        if ax in data.axes:
            j = data.axes.index(ax)
            index = np.arange(data.units.shape[j])[slice(start, end, step)]
            data = data.along(j, index)
    return Step(outputs=((node.output[0], data),))


def _gather(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Gather and GatherElements copy entries. Along an axis other than the units', every output
    entry keeps the channel of the entry it copies, whatever the indices (Gather replaces only
    its own axis by the indices' axes; GatherElements keeps the rank, and the unit axis keeps
    its first ``indices.shape[k]`` positions), so per-channel factors commute with it
    (docs/algorithm.md §1). A Gather along the unit axis with constant 1-D indices selects
    channels, like a Slice; one scalar index along one of several axes the units are spread over
    (the q, k or v part of a packed projection split into [..., 3, C]) keeps that part."""
    node = graph.nodes[i]
    found = _data_with_rank(graph, i, carried)
    if isinstance(found, Refusal):
        return found
    data, rank = found
    positions = [axis + rank for axis in data.axes]
    axis = int(attr(node, "axis", 0)) % rank
    dims = graph.dims(node.input[1])
    out = node.output[0]
    if node.op_type == "GatherElements":
        k = data.axis + rank
        if data.spread:
            return _spread_refusal(graph, i)
        if axis == k:
            return Refusal(f"feeds {_name(graph, i)}, which gathers along the unit axis")
        if dims is None or len(dims) != rank or dims[k] is None or dims[k] > len(data.units):
            return Refusal(f"shape of '{node.input[1]}' cannot be inferred")
        return Step(outputs=((out, data.take(np.arange(dims[k]))),))
    if axis not in positions:
        if dims is None:
            return Refusal(f"shape of '{node.input[1]}' cannot be inferred")
        out_rank = rank - 1 + len(dims)
        moved = tuple((p if p < axis else p - 1 + len(dims)) - out_rank for p in positions)
        return Step(outputs=((out, data.on_axes(moved, out_rank)),))
    indices = fixed_constant(graph, node.input[1])
    j = positions.index(axis)
    n = data.units.shape[j]
    if indices is None or indices.ndim > 1 or (indices.ndim == 0 and not data.spread):
        return Refusal(f"feeds {_name(graph, i)}, which gathers the unit axis by other indices")
    indices = indices.astype(np.int64)
    if ((indices < -n) | (indices >= n)).any():
        return Refusal(f"feeds {_name(graph, i)} with indices out of range")
    taken = data.along(j, indices % n)
    if indices.ndim == 1:
        return Step(outputs=((out, taken),))
    rest = tuple(p - rank + (p < axis) for p in positions if p != axis)  # the axis is dropped
    return Step(outputs=((out, Carrier.over(taken.units, taken.activated, rest, rank - 1)),))


def _matmul(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """A MatMul that is no rescalable layer (attention's probabilities times its values): it
    sums over the last axis of its first operand and the second-last of its second, and only
    pairs up the others, so per-channel factors on any other axis of one operand come out on
    the same axis (from the end) of the product (docs/algorithm.md §1); the other operand,
    carrying no unit, keeps its values."""
    node = graph.nodes[i]
    if len(carried) != 1:
        return Refusal(f"feeds {_name(graph, i)} with scaled units on both inputs")
    slot, data = next(iter(carried.items()))
    rank = _rank(graph, node.input[slot], data)
    other = _rank(graph, node.input[1 - slot])
    if isinstance(rank, Refusal) or isinstance(other, Refusal):
        return rank if isinstance(rank, Refusal) else other
    if (-1 if slot == 0 else -2) in data.axes or min(rank, other) < 2:
        return Refusal(f"feeds {_name(graph, i)}, which is not a rescalable linear layer")
    dims = graph.dims(node.output[0])
    if dims is not None and any(
        dims[axis] not in (None, size)
        for axis, size in zip(data.axes, data.units.shape, strict=True)
    ):
        return Refusal(f"feeds {_name(graph, i)}, which broadcasts along the unit axis")
    out_rank = max(rank, other)
    return Step(outputs=((node.output[0], data.on_axes(data.axes, out_rank)),))


# ------------------------------------------------------------------ merges and readers


def _merge(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Add, Sum, Sub, Mean, Concat along another axis, Max and Min of units: channel k of each
    input is one output channel."""
    node = graph.nodes[i]
    first = next(iter(carried.values()))
    for c in carried.values():
        if c.axis != first.axis or len(c.units) != len(first.units):
            return Refusal(f"feeds {_name(graph, i)}, which broadcasts along the unit axis")
    if len(carried) == 1 and len(node.input) == 2 and node.op_type in ("Add", "Sub"):
        rank = _rank(graph, node.output[0], first)
        rank = None if isinstance(rank, Refusal) else rank
        scaled = _per_unit_constant(graph, node.input[1 - next(iter(carried))], first, rank)
        if scaled is not None:
            return Step(outputs=((node.output[0], first),), scaled=(scaled,))
    fixes = []
    for slot, name in enumerate(node.input):
        if slot not in carried and name:
            dims = graph.dims(name)
            if (
                dims is not None
                and len(dims) >= -first.axis
                and dims[first.axis]
                not in (
                    None,
                    len(first.units),
                )
            ):
                return Refusal(f"feeds {_name(graph, i)}, which broadcasts along the unit axis")
            reason = f"merged by {_name(graph, i)} with {_unscalable(graph, name)}"
            fixes.extend((c.units, reason) for c in carried.values())
    activated = np.logical_and.reduce([c.activated for c in carried.values()])
    out = Carrier(first.units, activated, first.axis, first.rank)
    return Step(
        outputs=((node.output[0], out),), ties=(tuple(carried.values()),), fixes=tuple(fixes)
    )


def _unscalable(graph: GraphIndex, name: str) -> str:
    """What a merge met that carries no unit (scale 1), named by where it comes from."""
    if name in graph.graph_inputs:
        return f"the graph input '{name}' (scale 1)"
    producer = graph.producer.get(name)
    if producer is not None:
        return f"'{name}' from {_name(graph, producer)}, which carries no rescalable unit"
    return f"'{name}', which cannot be rescaled"


def _shape_only(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step:
    """Shape, Size: their result does not depend on the values, so no factor reaches it."""
    return Step()


def _per_unit_constant(
    graph: GraphIndex, name: str, data: Carrier, rank: int | None = None
) -> tuple[str, int, np.ndarray, tuple[int, ...] | None] | None:
    """A stored float constant with one entry per unit along the units' axis (ones elsewhere)
    that may be rewritten: adding it to rescaled channels is exact once it is rescaled too.

    With ``rank``, the rank of the sum, a constant that is the same for every unit (all its
    dimensions 1: HardSwish's ``x + 3``, a learnt scalar shift) qualifies too: it is expanded
    to one entry per unit (the last item, None when the shape stays), which leaves the sum's
    shape as it was."""
    shape = graph.shape(name)
    if not is_fixed_constant(graph, name) or shape is None:
        return None
    if graph.elem_type(name) not in FLOAT_TYPES or graph.n_uses(name) != 1:
        return None
    if len(shape) >= -data.axis:
        axis = len(shape) + data.axis
        others_one = all(d == 1 for k, d in enumerate(shape) if k != axis)
        if shape[axis] == len(data.units) and others_one:
            return name, axis, data.units, None
    if rank is None or any(d != 1 for d in shape) or -data.axis > rank:
        return None
    expanded = [1] * max(len(shape), -data.axis)
    expanded[data.axis] = len(data.units)
    return name, len(expanded) + data.axis, data.units, tuple(expanded)


def _batchnorm(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """A BatchNormalization not absorbed into a layer (pre-activation, after a Relu, after a
    merge): gamma (a x - a mean) / s + a beta = a BN(x), so mean and bias scale with the units."""
    node, name = graph.nodes[i], graph.names[i]
    found = _data_with_rank(graph, i, carried)
    if isinstance(found, Refusal):
        return found
    data, rank = found
    if data.axis + rank != 1:
        return Refusal(f"feeds BatchNormalization '{name}', which normalises another axis")
    refusal = Refusal(f"feeds BatchNormalization '{name}' whose parameters cannot be rescaled")
    if len(node.input) != 5 or any(node.output[1:]):
        return refusal
    if int(attr(node, "training_mode", 0)) or not int(attr(node, "spatial", 1)):
        return refusal
    channels = Carrier(data.units, data.activated, -1)  # parameters are 1-D, one per channel
    bias, mean = (_per_unit_constant(graph, node.input[k], channels) for k in (2, 3))
    scale, var = node.input[1], node.input[4]
    if (
        bias is None
        or mean is None
        or not (is_fixed_constant(graph, scale) and is_fixed_constant(graph, var))
    ):
        return refusal
    return Step(outputs=((node.output[0], data),), scaled=(bias, mean))


# op type -> rule
PASSTHROUGH_RULES: dict[str, Rule] = {
    **{op: _activation for op in ACTIVATIONS},
    **dict.fromkeys(("Identity", "Dropout"), _copy),
    **dict.fromkeys(("Cast", "CastLike"), _cast),
    "Clip": _clip,
    **dict.fromkeys(("Min", "Max"), _min_max),
    **dict.fromkeys(
        (
            "MaxPool",
            "AveragePool",
            "LpPool",
            "GlobalAveragePool",
            "GlobalMaxPool",
            "GlobalLpPool",
        ),
        _pool,
    ),
    **dict.fromkeys(("Mul", "Div"), _scale_by_factor),
    **dict.fromkeys(REDUCTIONS, _reduce),
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "Transpose": _transpose,
    "MatMul": _matmul,
    **dict.fromkeys(("Flatten", "Reshape"), _reshape),
    **dict.fromkeys(("Squeeze", "Unsqueeze"), _squeeze),
    "Concat": _concat,
    **dict.fromkeys(("DepthToSpace", "SpaceToDepth"), _depth_to_space),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather,
    **dict.fromkeys(("Add", "Sum", "Sub", "Mean"), _merge),
    "Shape": _shape_only,
    "Size": _shape_only,
    "BatchNormalization": _batchnorm,
}


SPREAD_RULES = frozenset(
    (
        *(_activation, _copy, _cast, _scale_by_factor, _shape_only),
        *(_transpose, _reshape, _squeeze, _split, _slice, _gather, _matmul),
    )
)
"""The rules that take units spread over several axes: they move or pair up entries, or act on
each entry alone."""


def match_passthrough(graph: GraphIndex, i: int, carried: dict[int, Carrier]) -> Step | Refusal:
    """Where the units carried by node ``i``'s inputs (by input slot) go, or why they stop."""
    node = graph.nodes[i]
    op, name = node.op_type, graph.names[i]
    if op in SUBGRAPH_OPS:
        return Refusal(f"used inside the subgraph of {op} '{name}'")
    rule = PASSTHROUGH_RULES.get(op) if node.domain in STANDARD_DOMAINS else None
    if rule is not None and rule not in SPREAD_RULES and any(c.spread for c in carried.values()):
        return _spread_refusal(graph, i)
    if rule is not None:
        return rule(graph, i, carried)
    if op in QUANTIZED:
        return Refusal(f"feeds quantized op {op} '{name}'")
    if op in LINEAR_OPS:
        return Refusal(f"feeds {op} '{name}', which is not a rescalable linear layer")
    if op in NOT_HOMOGENEOUS:
        return Refusal(f"feeds {op} '{name}', which is not positively homogeneous")
    return Refusal(f"feeds {op} '{name}', which does not pass per-unit scales")
