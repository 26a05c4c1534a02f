"""Build :class:`~onnxbalance.unitgraph.ModelUnits` from an ONNX model.

1. Find the linear layers (:func:`ops.match_linear`).
2. For each layer, follow its output channels forward through pass-through ops
   (:func:`ops.match_passthrough`). Its output units are *hidden* (one scale group each) when
   every path passes at least one positively homogeneous activation and ends in the input of a
   linear layer that reads the same channel axis and whose weight can be edited; no tensor on
   the way may be a graph output. Otherwise they stay at scale 1 (:data:`FIXED`), with a Skip
   naming the layer and the first reason found, unless nothing linear lies downstream (output
   units, which never move).
3. Every tensor on those paths carries the layer's groups along its channel axis; a layer's
   columns take the groups of its data input (FIXED when it carries none: graph inputs, ...).

Only the main graph is analysed: If/Loop/Scan bodies are left alone and reported.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..unitgraph import FIXED, LinearUnits, ModelUnits, Skip, TensorEdit
from .graph import GraphIndex, subgraphs
from .ops import LINEAR_OPS, LinearMatch, Refusal, match_linear, match_passthrough

log = logging.getLogger(__name__)


def analyse(model: onnx.ModelProto) -> ModelUnits:
    """Find the linear layers, the hidden units that may be rescaled, and what must stay put.

    Args:
        model: the ONNX model (not modified).

    Returns:
        The layers with their row/column scale groups and the tensor edits that rescale them,
        one group name ``"<layer>:<unit>"`` per hidden unit, and the Skip records.
    """
    graph = GraphIndex(model.graph)
    skipped: list[Skip] = []
    layers: list[LinearMatch] = []
    for i in range(len(graph.nodes)):
        match = match_linear(graph, i)
        if isinstance(match, Refusal):
            skipped.append(Skip(graph.names[i], match.count, match.reason))
        elif match is not None:
            layers.append(match)
    skipped.extend(_subgraph_skips(graph))
    reader = {layer.nodes[0]: layer for layer in layers}

    group_names: list[str] = []
    channels: dict[str, np.ndarray] = {}
    rows: dict[int, np.ndarray] = {}  # by node index: names need not be unique
    for layer in layers:
        reason, carried = _trace(graph, layer, reader)
        reason = layer.rows_refusal or reason
        if reason is None:
            groups = np.arange(len(group_names), len(group_names) + layer.n_rows, dtype=np.int64)
            groups.setflags(write=False)  # shared by this layer's rows and its readers' columns
            group_names.extend(f"{layer.name}:{o}" for o in range(layer.n_rows))
            for tensor in carried:
                channels[tensor] = groups
        else:
            groups = np.full(layer.n_rows, FIXED, dtype=np.int64)
            if _reaches_linear(graph, layer.output):
                skipped.append(Skip(layer.name, layer.n_rows, reason))
        rows[layer.nodes[0]] = groups

    units = []
    seen_weights: set[str] = set()
    for layer in layers:
        # a weight read by two nodes is stored once and counts once in the norm
        if layer.weight in seen_weights:
            continue
        seen_weights.add(layer.weight)
        cols = channels.get(layer.data_input)
        if cols is None:
            cols = np.full(layer.n_cols, FIXED, dtype=np.int64)
        units.append(_units(graph, layer, rows[layer.nodes[0]], cols))
    log.info(
        "analysis: %d linear layers, %d hidden units, %d skip records",
        len(units),
        len(group_names),
        len(skipped),
    )
    return ModelUnits(tuple(units), tuple(group_names), tuple(skipped))


def _trace(
    graph: GraphIndex, layer: LinearMatch, reader: dict[int, LinearMatch]
) -> tuple[str | None, list[str]]:
    """Follow the layer's output channels; return why they cannot move (or None) and the
    tensors that carry them."""
    carried: list[str] = []
    seen: set[tuple[str, bool]] = set()
    stack = [(layer.output, layer.out_axis, False)]
    while stack:
        tensor, axis, activated = stack.pop()
        if (tensor, activated) in seen:
            continue
        seen.add((tensor, activated))
        if tensor not in carried:
            carried.append(tensor)
        if tensor in graph.graph_outputs:
            what = "activation" if activated else "output"
            return f"{what} '{tensor}' is a graph output", carried
        for i, slot in graph.uses(tensor):
            consumer = reader.get(i)
            if consumer is not None and slot == 0 and consumer.data_input == tensor:
                if not activated:
                    return f"output feeds '{consumer.name}' with no activation between", carried
                if consumer.in_axis != axis:
                    return f"activation feeds '{consumer.name}', which reads it transposed", carried
                if consumer.cols_refusal is not None:
                    return f"activation feeds '{consumer.name}': {consumer.cols_refusal}", carried
                continue
            step = match_passthrough(graph, i, slot, axis)
            if isinstance(step, Refusal):
                return step.reason, carried
            if step.output is not None:
                stack.append((step.output, step.axis, activated or step.activation))
    return None, carried


def _reaches_linear(graph: GraphIndex, tensor: str) -> bool:
    """Whether any linear op lies downstream: if not, these are output units, not hidden ones."""
    seen, stack = {tensor}, [tensor]
    while stack:
        for i, _ in graph.uses(stack.pop()):
            node = graph.nodes[i]
            if node.op_type in LINEAR_OPS or i in graph.with_subgraphs:
                return True
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    stack.append(out)
    return False


def _subgraph_skips(graph: GraphIndex) -> list[Skip]:
    skips = []
    for i in graph.with_subgraphs:
        node = graph.nodes[i]
        n = sum(_count_linear(sub) for sub in subgraphs(node))
        if n:
            reason = f"{n} linear ops inside the {node.op_type} subgraph are not analysed"
            skips.append(Skip(graph.names[i], 0, reason))
    return skips


def _count_linear(graph: onnx.GraphProto) -> int:
    n = 0
    for node in graph.node:
        n += node.op_type in LINEAR_OPS
        n += sum(_count_linear(sub) for sub in subgraphs(node))
    return n


def _units(
    graph: GraphIndex, layer: LinearMatch, rows: np.ndarray, cols: np.ndarray
) -> LinearUnits:
    edits = []
    if (rows != FIXED).any() or (cols != FIXED).any():
        edits.append(
            TensorEdit(
                tensor=layer.weight,
                row_axis=layer.row_axis,
                row_groups=rows,
                col_axis=layer.col_axis,
                col_groups=cols,
            )
        )
    if layer.bias is not None and (rows != FIXED).any():
        expand_to = layer.bias_expand_to()
        rank = len(expand_to if expand_to is not None else layer.bias_shape)
        edits.append(
            TensorEdit(tensor=layer.bias, row_axis=rank - 1, row_groups=rows, expand_to=expand_to)
        )
    return LinearUnits(layer.name, layer.effective_weight(graph), rows, cols, tuple(edits))
