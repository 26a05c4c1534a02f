"""Apply log-scales to the stored tensors of a model: nothing but the edited tensors changes.

Each :class:`~onnxbalance.unitgraph.TensorEdit` multiplies a tensor by ``exp(u[row_groups])``
along its row axis and by ``exp(-u[col_groups])`` along its column axis (u = 0 for FIXED), i.e.
``W[o, i] <- W[o, i] * a_o / a_i`` and ``b[o] <- b[o] * a_o``. Several edits of one tensor
compose multiplicatively; a broadcast bias is first expanded to ``expand_to``.

float64 tensors are rescaled in float64. Narrower ones are multiplied in float32 by their
combined factor (each factor rounded to float32 once), which leaves every weight within two
units in the last place of the exactly rounded product: far below the rounding of float32
inference itself, at less than half the cost. When the factors span more than 2^+-100, so that
a float32 intermediate could leave float32's range where the exact product would not, those
tensors are rescaled in float64 too. Overflow of the tensor's own dtype is refused, naming it.
float16 and bfloat16 go to float32 and back bit by bit (:mod:`onnxbalance.floatbits`), with
exactly the results of numpy's casts in about half the time.

The new model shares no message with the input: every proto field is copied once, except the
edited tensors, which are rebuilt from their new values (keeping name, doc string and metadata).

Clips that rescaled units pass (``ModelUnits.clips``) are replaced by Min/Max/Relu nodes reading
new per-unit bound initializers, which the edits then rescale like any stored tensor; a scalar
bound initializer that nothing reads any more is dropped.
Private copies (``ModelUnits.copies``) are appended to the initializers, rescaled like any
edited tensor, and only the node inputs that read them are renamed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from . import floatbits, memory, protos, tensors
from .analysis.graph import bodies, constant_value, outer_names, subgraphs
from .errors import UnsupportedModelError
from .unitgraph import FIXED, ClipReplacement, ModelUnits, TensorEdit

log = logging.getLogger(__name__)


def rewrite(
    model: onnx.ModelProto,
    units: ModelUnits,
    log_scales: Sequence[float],
    *,
    skip: frozenset[str] = frozenset(),
) -> onnx.ModelProto:
    """A copy of ``model`` whose weights and biases are rescaled by ``exp(log_scales)``.

    Args:
        model: the original model (not modified).
        units: what :func:`onnxbalance.analysis.analyse` found in it.
        log_scales: one log-scale per scale group of ``units``.
        skip: initializers whose new values the caller streams (:func:`rescaled_blocks`)
            straight to the output file: here they are stubs (name, type, shape, no values).

    Returns:
        The new model; only the tensors named by the edits differ, in their own dtype and shape
        (a broadcast bias may be expanded to one entry per unit).

    Raises:
        ValueError: ``log_scales`` does not have one finite entry per group, or an edit names a
            tensor the model does not store.
        UnsupportedModelError: a rescaled tensor no longer fits its dtype (float16 overflow).
    """
    scales = scales_of(checked_scales(units, log_scales))
    edits = tensor_edits(units)
    out = protos.without_initializers(model)
    for copy in units.copies:  # by node index: before the clips change the node list
        for i, slot in copy.readers:
            out.graph.node[i].input[slot] = copy.name
    unread = replace_clips(out.graph, units.clips)
    done: set[str] = set(skip)
    for tensor in model.graph.initializer:
        if tensor.name in unread:
            continue
        new = out.graph.initializer.add()
        if tensor.name in skip:
            new.CopyFrom(tensors.copy_metadata(tensor))
        elif tensor.name in edits:
            _fill(new, tensor, _apply(tensor, edits[tensor.name], scales))
            done.add(tensor.name)
        else:
            new.CopyFrom(tensor)
    for tensor in clip_bounds(units.clips):
        new = out.graph.initializer.add()
        if tensor.name in edits:
            _fill(new, tensor, _apply(tensor, edits[tensor.name], scales))
            done.add(tensor.name)
        else:
            new.CopyFrom(tensor)
    for copy in units.copies:
        new = out.graph.initializer.add()
        if copy.name in edits:
            _fill(new, copy.value, _apply(copy.value, edits[copy.name], scales))
        else:  # its units were pinned after the copy was planned (overflow)
            new.CopyFrom(copy.value)
        new.name = copy.name
        done.add(copy.name)
    _rewrite_constants(out.graph, edits, scales, done)
    _rewrite_bodies(out.graph, edits, scales, done)
    missing = sorted(set(edits) - done)
    if missing:
        raise ValueError(f"edited tensors not stored in the model: {missing}")
    log.info("rewrite: %d tensors rescaled", len(done))
    return out


def _rewrite_constants(
    graph: onnx.GraphProto, edits: dict[str, list[TensorEdit]], scales: Scales, done: set[str]
) -> None:
    """The graph's Constant nodes that are edited, in place (``graph`` is the new model's)."""
    for node in graph.node:
        value = constant_value(node)
        name = node.output[0] if value is not None else None
        if name in edits and name not in done:
            _fill(value, value, _apply(value, edits[name], scales))
            if not any(attr.name == "value" for attr in node.attribute):  # value_float(s)
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("value", value))
            done.add(name)


def _rewrite_bodies(
    graph: onnx.GraphProto, edits: dict[str, list[TensorEdit]], scales: Scales, done: set[str]
) -> None:
    """Edited tensors stored inside If/Loop/Scan bodies, in place, nested bodies too. Analysis
    edits a tensor only when its name is read once in the whole model, so the one stored tensor
    of that name a reader can see is the one to change; names already edited are left alone."""
    for _, _, _, body in bodies(graph):
        for tensor in body.initializer:
            if tensor.name in edits and tensor.name not in done:
                _fill(tensor, tensor, _apply(tensor, edits[tensor.name], scales))
                done.add(tensor.name)
        _rewrite_constants(body, edits, scales, done)
        _rewrite_bodies(body, edits, scales, done)


def replace_clips(graph: onnx.GraphProto, clips: Sequence[ClipReplacement]) -> set[str]:
    """Replace each clip node by per-unit Min/Max/Relu in place (same position, same output).

    ``Min(Max(z, low), high)`` rather than ``Max(Min(z, high), low)``: where low > high both
    give ``high``, as Clip does. Constant nodes whose values only the old nodes read are
    removed; returns their names and those of the initializers only the old nodes read, which
    the caller drops.
    """
    if not clips:
        return set()
    by_output = {clip.output: clip for clip in clips}
    nodes = list(graph.node)
    old_inputs: set[str] = set()
    del graph.node[:]
    for node in nodes:
        clip = by_output.get(node.output[0]) if node.output else None
        if clip is None:
            graph.node.append(node)
            continue
        old_inputs.update(name for name in node.input if name and name != clip.data)
        graph.node.extend(_clip_nodes(clip, node.name))
        log.info("rewrite: %s '%s' -> per-unit bounds", node.op_type, clip.node)
    still_read = {name for node in graph.node for name in node.input}
    still_read |= {value.name for value in graph.output}
    still_read |= {
        name for node in graph.node for sub in subgraphs(node) for name in outer_names(sub)
    }
    unread = old_inputs - still_read
    # onnxruntime warns about every constant nothing reads: the old bounds go with their nodes
    dead = [
        k
        for k, node in enumerate(graph.node)
        if node.op_type == "Constant" and set(node.output) <= unread
    ]
    for k in reversed(dead):
        del graph.node[k]
    return unread


def _clip_nodes(clip: ClipReplacement, name: str) -> list[onnx.NodeProto]:
    """The nodes computing ``clip.output``; the last keeps the replaced node's name."""
    bounds = dict(clip.bound_tensors)
    low = bounds.get(f"{clip.prefix}/low")
    high = bounds.get(f"{clip.prefix}/high")
    steps = []
    if clip.low == 0.0:
        steps.append(("Relu", [clip.data], "relu"))
    elif low is not None:
        steps.append(("Max", [clip.data, f"{clip.prefix}/low"], "max"))
    if high is not None:
        below = steps[-1] if steps else None
        data = f"{clip.prefix}/{below[2]}" if below else clip.data
        steps.append(("Min", [data, f"{clip.prefix}/high"], "min"))
    made = []
    for k, (op, inputs, label) in enumerate(steps):
        last = k == len(steps) - 1
        output = clip.output if last else f"{clip.prefix}/{label}"
        node_name = name if last else f"{clip.prefix}/{op}"
        made.append(onnx.helper.make_node(op, inputs, [output], name=node_name))
    return made


def clip_bounds(clips: Sequence[ClipReplacement]) -> list[onnx.TensorProto]:
    """The replaced clips' bound tensors at their original values, one entry per unit."""
    found = []
    for clip in clips:
        dtype = tensors.numpy_dtype(clip.data_type)
        for name, value in clip.bound_tensors:
            array = np.full(clip.shape, value, dtype=dtype)
            found.append(tensors.make_tensor(name, array, clip.data_type))
    return found


def checked_scales(units: ModelUnits, log_scales: Sequence[float]) -> np.ndarray:
    """``log_scales`` as float64, checked: one finite entry per scale group."""
    u = np.asarray(log_scales, dtype=np.float64)
    if u.shape != (units.n_groups,):
        raise ValueError(f"expected {units.n_groups} log-scales, got shape {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("log-scales must be finite")
    return u


def tensor_edits(units: ModelUnits) -> dict[str, list[TensorEdit]]:
    """The edits that move something, by the name of the tensor they change."""
    edits: dict[str, list[TensorEdit]] = {}
    for edit in [e for layer in units.layers for e in layer.edits] + list(units.edits):
        if _moves(edit):
            edits.setdefault(edit.tensor, []).append(edit)
    return edits


def _moves(edit: TensorEdit) -> bool:
    return any(
        g is not None and (np.asarray(g) != FIXED).any() for g in (edit.row_groups, edit.col_groups)
    )


@dataclass(frozen=True)
class Scales:
    """The factors of every scale group, computed once for all the tensors of a model.

    ``up[g] = exp(u[g])`` and ``down[g] = exp(-u[g])``, each with a trailing 1 that the
    :data:`FIXED` index (-1) reads; ``largest_log`` is max |u|.
    """

    up: np.ndarray
    down: np.ndarray
    largest_log: float


def scales_of(log_scales: np.ndarray) -> Scales:
    u = np.asarray(log_scales, dtype=np.float64)
    return Scales(
        np.append(np.exp(u), 1.0), np.append(np.exp(-u), 1.0), float(np.abs(u).max(initial=0.0))
    )


def _factors(edits: list[TensorEdit], scales: Scales, ndim: int) -> list[np.ndarray]:
    """Each edit's row and column factors, shaped to broadcast against the whole tensor."""
    factors = []
    for edit in edits:
        if edit.row_axis is not None and edit.row_groups is not None:
            factors.append(_along(scales.up[edit.row_groups], edit.row_axis, ndim))
        if edit.col_axis is not None and edit.col_groups is not None:
            col = scales.down[edit.col_groups]
            if col.ndim == 1:
                factors.append(_along(col, edit.col_axis, ndim))
            else:  # (rows, cols): the column unit depends on the row (grouped convolutions)
                shape = [1] * ndim
                shape[edit.row_axis] = col.shape[0]
                shape[edit.col_axis] = col.shape[1]
                axes = sorted((edit.row_axis, edit.col_axis))
                if axes[0] != edit.row_axis:
                    col = col.T
                factors.append(col.reshape(shape))
    return factors


def rescaled_blocks(
    tensor: onnx.TensorProto, edits: list[TensorEdit], scales: Scales
) -> tuple[tuple[int, ...], np.dtype, Iterator[np.ndarray]]:
    """The tensor's new value as (shape, dtype, blocks along axis 0 in that dtype).

    Blocks are computed a quarter of a megabyte of float32 at a time (in cache), so rescaling a
    tensor of any size needs no full-size temporary; external data is read memory-mapped.

    Raises (while iterating):
        UnsupportedModelError: a rescaled entry no longer fits the dtype (float16 overflow).
    """
    original = tensors.read_array(tensor)  # external data: memory-mapped, read as needed
    shape = original.shape
    for edit in edits:
        if edit.expand_to is not None:
            shape = tuple(int(d) for d in edit.expand_to)
    values = np.broadcast_to(original, shape) if shape != original.shape else original
    work = _working_dtype(original.dtype, len(edits) * 2, scales.largest_log)
    factors = [factor.astype(work) for factor in _factors(edits, scales, len(shape))]

    def blocks() -> Iterator[np.ndarray]:
        if not shape:  # a scalar: one block
            slices = [()]
        else:
            # a row counts with the three scratch arrays of its size that casting needs: the
            # block's passes then stay in a typical L2 cache (measured fastest)
            row_bytes = 4 * np.dtype(work).itemsize * int(np.prod(shape[1:], dtype=np.int64))
            slices = memory.row_blocks(shape[0], row_bytes)
        for rows in slices:
            block_factors = [f[rows] if shape and f.shape[0] != 1 else f for f in factors]
            yield _rescaled_block(tensor, values[rows], block_factors, work)
        memory.release(original)

    return shape, original.dtype, blocks()


def _working_dtype(dtype: np.dtype, n_factors: int, largest_log: float) -> type:
    """float32 for float32-or-narrower tensors whose combined factor stays within 2^+-100."""
    if dtype.itemsize > 4 or n_factors * largest_log * np.log2(np.e) > 100:
        return np.float64
    return np.float32


def _rescaled_block(
    tensor: onnx.TensorProto, values: np.ndarray, factors: list[np.ndarray], work: type
) -> np.ndarray:
    """One block of the tensor's new value, in its dtype; overflow is refused, naming it."""
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, with a name
        rescaled = _scaled(values, factors, work)
        # rounding is monotone, so nothing within the largest finite value becomes infinite:
        # two reductions of the block while it is in cache settle almost every block (numpy
        # has no fast isinf for float16/bfloat16), and let the bit-level cast skip inf and NaN
        if _within(rescaled, tensors.max_finite(values.dtype)):
            return floatbits.from_float32(rescaled, values.dtype)
        result = rescaled.astype(values.dtype, copy=False)
    if np.isinf(result).any():
        _refuse_overflow(tensor, values, rescaled)
    return result


def _within(values: np.ndarray, limit: float) -> bool:
    """Whether ``|values| <= limit`` everywhere (not if one is NaN)."""
    return values.size == 0 or bool(values.max() <= limit and values.min() >= -limit)


def _scaled(values: np.ndarray, factors: list[np.ndarray], work: type) -> np.ndarray:
    # a copy first: stored weights sit wherever protobuf put them, often misaligned for SIMD;
    # float16/bfloat16 are widened bit by bit, faster than numpy's cast (onnxbalance.floatbits)
    if work is np.float32:
        block = floatbits.to_float32(values)
    else:
        block = np.array(values, dtype=work)
    combined = factors[0]
    for factor in factors[1:]:
        combined = combined * factor  # an outer product for a row and a column factor
    block *= combined
    return block


def _refuse_overflow(tensor: onnx.TensorProto, values: np.ndarray, rescaled: np.ndarray) -> None:
    """Raise if a finite weight became too large for the tensor's dtype (positive finite factors
    turn no finite weight into NaN, and infinite weights may stay infinite)."""
    with np.errstate(invalid="ignore"):
        too_large = np.abs(rescaled) > tensors.max_finite(values.dtype)
    if (too_large & np.isfinite(values)).any():
        raise UnsupportedModelError(
            f"rescaled tensor '{tensor.name}' overflows {values.dtype.name}; "
            "balancing cannot be stored in this dtype"
        )


def _apply(tensor: onnx.TensorProto, edits: list[TensorEdit], scales: Scales) -> np.ndarray:
    """The tensor's new value in its own dtype."""
    shape, dtype, blocks = rescaled_blocks(tensor, edits, scales)
    if not shape:
        return next(iter(blocks)).reshape(())
    result = np.empty(shape, dtype=dtype)
    start = 0
    for block in blocks:
        result[start : start + len(block)] = block
        start += len(block)
    return result


def _along(factor: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = len(factor)
    return factor.reshape(shape)


def _fill(target: onnx.TensorProto, original: onnx.TensorProto, values: np.ndarray) -> None:
    """Make ``target`` = ``original`` with new values, in the same storage style."""
    # decided before ``target`` changes: it may be ``original`` (a Constant's value)
    raw = (
        original.HasField("raw_data")
        or tensors.is_external(original)  # big: raw bytes, never a Python list of floats
        or original.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    )
    target.CopyFrom(tensors.copy_metadata(original, values.shape))
    if raw:  # straight from the array: no intermediate TensorProto holding another copy
        target.raw_data = tensors.raw_bytes_of(values)
    elif original.data_type == onnx.TensorProto.FLOAT:
        target.float_data.extend(values.ravel().tolist())
    else:
        target.double_data.extend(values.ravel().tolist())
