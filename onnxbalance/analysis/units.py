"""Build :class:`~onnxbalance.unitgraph.ModelUnits` from an ONNX model.

1. Infer static shapes (:mod:`.shapes`) and find the linear layers (:func:`ops.match_linear`);
   every output row of every layer is a candidate unit.
2. Walk the nodes once, in their (topological) order, carrying each layer's units forward
   through pass-through ops (:mod:`.passthrough`), which say where every channel lands. A merge
   (residual Add, ...) ties the units it joins, channel by channel (union-find,
   docs/algorithm.md §6). A unit is *fixed* (scale 1) when any path from it
   * reaches a linear layer that is not a rescalable reader (weight shared or overridable, reads
     another axis),
   * stops at an op that does not commute with positive per-channel factors (with its reason),
   * reaches a graph output, or a merge with something that carries no unit;
   and when no path from it reaches a linear layer at all (output units; channels sliced away).
   A tied group is fixed when any of its members is.
3. The remaining groups are the hidden units; each layer's rows take the groups of its output
   units and its columns the groups of the units its data input carries (FIXED where none).

A unit's scale a multiplies the row and bias of its layer (or, with a BatchNormalization after
the layer, that channel's BN scale and bias; see :mod:`.ops`), every stored constant its channel
meets on the way (a per-channel bias added later, the mean and bias of a BatchNormalization it
passes through: ``ModelUnits.edits``), and divides every column that reads it. If/Loop/Scan
bodies are analysed the same way, each as a graph of its own (:mod:`.scopes`).

A channel between two linear layers with no activation between them (a linear bottleneck:
Conv -> BN -> Conv, or Conv -> BN -> residual Add) is a unit like any other: the second layer
is linear, so dividing its column by the factor the first layer's row took is exact for any
positive factor, as it is through a positively homogeneous activation (docs/algorithm.md §1).

With ``rescale_clip``, units pass clips with constant bounds (ReLU6, ...) as hidden units, and
each such clip on a moving channel becomes a :class:`~onnxbalance.unitgraph.ClipReplacement`
whose per-unit bounds are rescaled like a bias (:mod:`.passthrough`). Without it, they stop
there. ``units_behind_clips`` counts the units that the clips decide on: balanced with the
option, fixed without it. Without the option the units are therefore also followed as if it
were given, and a unit that something else would stop then says what (a hard-swish
``x * Clip(x + 3, 0, 6) / 6`` multiplies the unit by itself).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import NamedTuple, overload

import numpy as np
import onnx

from ..unitgraph import FIXED, ClipReplacement, LinearUnits, ModelUnits, Skip, TensorEdit
from . import shared
from .graph import GraphIndex
from .ops import (
    LINEAR_OPS,
    LinearMatch,
    Refusal,
    is_channel_scale,
    match_channel_scale,
    match_linear,
)
from .passthrough import Bounds, Carrier, Step, match_passthrough, resolved_reshapes
from .scopes import NameSequence, body_indexes, merged
from .shapes import infer_scoped_shapes

log = logging.getLogger(__name__)


class _Units:
    """Candidate units: union-find for ties, the first reason each one must stay fixed, and
    whether any linear layer reads it."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.reason: dict[int, str] = {}
        self.read = np.zeros(n, dtype=bool)

    def find(self, u: int) -> int:
        parent = self.parent
        root = u
        while parent[root] != root:
            root = int(parent[root])
        while parent[u] != root:
            parent[u], u = root, int(parent[u])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earliest unit names the group

    def fix(self, units: np.ndarray, reason: str) -> None:
        for u in np.unique(units[units >= 0]).tolist():
            self.reason.setdefault(u, reason)


def analyse(
    model: onnx.ModelProto, *, rescale_clip: bool = False, copy_weights: bool = False
) -> ModelUnits:
    """Find the linear layers, the hidden units that may be rescaled, and what must stay put.

    Shared and derived constants of the main graph get private copies where their readers need
    different factors (:mod:`.shared`); ``copy_weights`` allows copies of weight matrices too
    (the file grows).

    Args:
        model: the ONNX model (not modified).
        rescale_clip: let units through clips with constant bounds, whose nodes are then
            replaced by per-unit bounds (``ModelUnits.clips``).
        copy_weights: copy weight matrices whose readers need different factors.

    Returns:
        The layers with their row/column scale groups and the tensor edits that rescale them,
        one group name ``"<layer>:<unit>"`` per hidden unit (a tied group takes the name of its
        first unit; inside a body, ``"If 'name'/then_branch/<layer>:<unit>"``), the Skip
        records, and the private copies the rewrite makes.

    Raises:
        InputError: a BatchNormalization after a layer computes NaN or infinity (:mod:`.ops`).
    """
    shapes = infer_scoped_shapes(model)
    hints: dict[str, tuple[int | None, ...]] = {}
    while True:  # each round hints more sizes than the last, so it ends
        index = GraphIndex(model.graph, shapes[()])
        found = resolved_reshapes(index)
        found = {name: dims for name, dims in found.items() if hints.get(name) != dims}
        if not found:
            break
        hints |= found
        shapes = infer_scoped_shapes(model, hints)
    opset = _opset(model)
    parts = [("", _main_graph(model, index, rescale_clip, opset, copy_weights))]
    parts += [
        (f"{path}/", _analyse_graph(body, _Clips(rescale_clip, opset, in_body=True))[0])
        for path, body in body_indexes(model, shapes)
    ]
    return merged(parts)


def _main_graph(
    model: onnx.ModelProto,
    original: GraphIndex,
    rescale_clip: bool,
    opset: int,
    copy_weights: bool,
) -> ModelUnits:
    """:func:`analyse` for the main graph (``original`` its index, without copies), with the
    private copies it needs."""
    refused: frozenset[str] = frozenset()
    while True:  # each round refuses more weights, so it ends
        copies = shared.plan(original, refused)
        graph = GraphIndex(model.graph, original.shapes, copies)
        units, weights = _analyse_graph(graph, _Clips(rescale_clip, opset))
        units, conflicts = shared.settle(original, units, weights, copies, copy_weights)
        if not conflicts:
            return units
        log.info("%d shared weights need different factors per reader", len(conflicts))
        refused |= conflicts


def _analyse_graph(graph: GraphIndex, clips: _Clips) -> tuple[ModelUnits, list[str]]:
    """:func:`analyse` for one graph (the main graph or a body, :mod:`.scopes`), and each
    layer's weight tensor.

    A Mul of channels that carry no unit by a per-channel constant is a diagonal layer (a
    LayerNorm written out in primitive ops ends in one, y = x_hat * gamma + beta): following
    the units once tells which Muls see none; they are then followed again with those Muls as
    layers."""
    followed = _followed(graph, clips, frozenset())
    diagonal = frozenset(i for i in followed.quiet if is_channel_scale(graph, i))
    if diagonal:
        followed = _followed(graph, clips.fresh(), diagonal)
    behind = sorted(followed.clips.behind)
    if clips.rescale or not behind:
        decided = int(_moving(followed.state)[behind].sum())
    else:  # followed as with --rescale-clip: what the option would balance, what it would not
        # (the same layers, diagonal ones included, so that unit numbers agree)
        rescaled = _followed(graph, clips.fresh(rescale=True), diagonal)
        roots = _roots(rescaled.state.parent)
        moving = _moving(rescaled.state, roots)
        decided = int(moving[behind].sum())
        _name_other_obstacles(followed.state, rescaled.state, roots, moving)
    units, weights = _assembled(graph, followed)
    return replace(units, units_behind_clips=decided), weights


def _name_other_obstacles(
    state: _Units, rescaled: _Units, roots: np.ndarray, moving: np.ndarray
) -> None:
    """Reasons that offer --rescale-clip to units it would not balance: they say instead what
    would stop them then (the first reason in their group, followed with the option, whose
    union-find ``roots`` are given), without naming it (the summary counts the units each
    option named in their reasons may free)."""
    first: dict[int, str] = {}
    for u, why in sorted(rescaled.reason.items()):
        first.setdefault(int(roots[u]), why)
    for u, why in state.reason.items():
        if why.endswith(_CLIP_HINT) and not moving[u]:
            later = first.get(int(roots[u]))
            state.reason[u] = why[: -len(_CLIP_HINT)] + (
                f"; rescaled bounds would not free them: {later}" if later else ""
            )


class _Followed(NamedTuple):
    """The layers of one graph and where their units went (:func:`_followed`)."""

    layers: list[LinearMatch]
    skipped: list[Skip]
    offsets: np.ndarray
    state: _Units
    clips: _Clips
    reads: dict[int, np.ndarray]
    scaled: list[tuple[str, int, np.ndarray, tuple[int, ...] | None]]
    quiet: list[int]  # nodes (not layers) that no unit reached


def _followed(graph: GraphIndex, clips: _Clips, diagonal: frozenset[int]) -> _Followed:
    """The graph's layers, the Muls of ``diagonal`` among them, and their units followed
    through the graph (:func:`_propagate`)."""
    skipped: list[Skip] = []
    layers: list[LinearMatch] = []
    for i in graph.topological_order():
        match = match_channel_scale(graph, i) if i in diagonal else match_linear(graph, i)
        if isinstance(match, Refusal):
            skipped.append(Skip(graph.names[i], match.count, match.reason))
        elif match is not None:
            layers.append(match)
    offsets = np.cumsum([0] + [layer.n_rows for layer in layers])
    state = _Units(int(offsets[-1]))
    reads, scaled, quiet = _propagate(graph, layers, offsets, state, clips)
    return _Followed(layers, skipped, offsets, state, clips, reads, scaled, quiet)


def _assembled(graph: GraphIndex, followed: _Followed) -> tuple[ModelUnits, list[str]]:
    """The scale groups, each layer's record and the edits, from the units followed."""
    layers, skipped, offsets, state, clips, reads, scaled, _ = followed
    groups = _Groups(state, _UnitNames([layer.name for layer in layers], offsets))

    reaches = _reaches_linear(graph)
    units = []
    weights = []
    seen_weights: set[str] = set()
    for k, layer in enumerate(layers):
        span = np.arange(offsets[k], offsets[k + 1])
        rows = groups.of_unit[span]
        if layer.kind == "recurrent":  # its gates are no units: they only weigh in the norm
            why, note = [], " (gates of a recurrent layer: its input weight's columns move)"
        elif layer.output in reaches:
            why = groups.skips(layer.name, span)
            note = "".join(f"; {s.count} fixed: {s.reason}" for s in why)
        else:
            why, note = [], " (output units: no linear layer reads them)"
        skipped.extend(why)
        log.info(
            "layer %s: %d of %d units movable%s",
            layer.name,
            int((rows != FIXED).sum()),
            layer.n_rows,
            note,
        )
        # a weight read by two nodes is stored once and counts once in the norm
        if layer.weight in seen_weights:
            continue
        seen_weights.add(layer.weight)
        read = reads.get(k)
        cols = (
            np.full(layer.n_cols, FIXED, dtype=np.int64) if read is None else groups.of_unit[read]
        )
        units.append(_units(graph, layer, rows, cols))
        weights.append(layer.weight)
    log.info(
        "analysis: %d linear layers, %d hidden units, %d skip records",
        len(units),
        len(groups.names),
        len(skipped),
    )
    edits = []
    for tensor, axis, carried, expand_to in scaled:
        rows = groups.of_unit[carried]
        if (rows != FIXED).any():
            edits.append(TensorEdit(tensor, row_axis=axis, row_groups=rows, expand_to=expand_to))
    replaced = clips.replacements(graph, layers, offsets, groups.of_unit)
    for clip, rows in replaced:
        edits += [TensorEdit(name, row_axis=0, row_groups=rows) for name, _ in clip.bound_tensors]
    replacements = tuple(clip for clip, _ in replaced)
    units = ModelUnits(tuple(units), groups.names, tuple(skipped), tuple(edits), replacements)
    return units, weights


def _propagate(
    graph: GraphIndex, layers: list[LinearMatch], offsets: np.ndarray, state: _Units, clips: _Clips
) -> tuple[
    dict[int, np.ndarray], list[tuple[str, int, np.ndarray, tuple[int, ...] | None]], list[int]
]:
    """One pass over the nodes: carry units forward, record ties and reasons. Returns, per
    layer index, the units its data input carries (the layer's column units), the stored
    constants that scale with units (tensor, axis, units), and the nodes (not layers) that no
    unit reaches."""
    first = {layer.nodes[0]: k for k, layer in enumerate(layers)}
    absorbed = {j for layer in layers for j in layer.nodes[1:]}
    carriers: dict[str, Carrier] = {}
    reads: dict[int, np.ndarray] = {}
    scaled: list[tuple[str, int, np.ndarray, tuple[int, ...] | None]] = []
    quiet: list[int] = []

    def carry(name: str, carrier: Carrier) -> None:
        carriers[name] = carrier
        if name in graph.graph_outputs:
            what = "activation" if carrier.activated.all() else "output"
            state.fix(carrier.units, f"{what} '{name}' is a graph output")

    for i in graph.topological_order():
        node = graph.nodes[i]
        implicit = [carriers[name] for name in graph.implicit.get(i, ()) if name in carriers]
        for carrier in implicit:
            op = node.op_type
            state.fix(carrier.units, f"used inside the subgraph of {op} '{graph.names[i]}'")
        if i in absorbed:
            continue
        carried = {s: carriers[name] for s, name in enumerate(node.input) if name in carriers}
        k = first.get(i)
        if k is not None:
            layer = layers[k]
            for slot, carrier in carried.items():
                if slot == 0:
                    if _read(layer, carrier, state):
                        reads[k] = carrier.units
                else:
                    state.fix(carrier.units, f"feeds {node.op_type} '{layer.name}' as input {slot}")
            units = np.arange(offsets[k], offsets[k + 1], dtype=np.int64)
            if layer.rows_refusal is not None:
                state.fix(units, layer.rows_refusal)
            else:
                rank = graph.rank(layer.output)
                if layer.kind not in ("dense", "scale") or graph.nodes[i].op_type == "Gemm":
                    rank = 1 - layer.out_axis if layer.kind != "dense" else 2
                activated = np.zeros(len(units), bool)
                carry(layer.output, Carrier(units, activated, layer.out_axis, rank))
            continue
        if not carried:
            quiet.append(i)
            continue
        step = match_passthrough(graph, i, carried)
        if isinstance(step, Refusal):
            for carrier in carried.values():
                state.fix(carrier.units, step.reason)
            continue
        if step.clip is not None and not clips.admit(graph, i, step.clip, carried, state):
            continue
        _apply(graph, i, step, state)
        scaled.extend(step.scaled)
        for name, carrier in step.outputs:
            carry(name, carrier)
    return reads, scaled, quiet


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


_CLIP_HINT = " (--rescale-clip moves them with the units)"


class _Clips:
    """The clips units reach: which to let them through (with ``rescale_clip``), which units
    reach any, and, once the groups are known, the nodes to replace."""

    def __init__(self, rescale: bool, opset: int, in_body: bool = False) -> None:
        self.rescale = rescale
        self.opset = opset
        self.in_body = in_body
        self.behind: set[int] = set()
        self.found: list[tuple[int, Bounds, Carrier]] = []

    def fresh(self, rescale: bool | None = None) -> _Clips:
        """The same settings (or this ``rescale``), nothing found yet (for another pass over
        the graph)."""
        return _Clips(self.rescale if rescale is None else rescale, self.opset, self.in_body)

    def admit(
        self, graph: GraphIndex, i: int, bounds: Bounds, carried: dict[int, Carrier], state: _Units
    ) -> bool:
        """Whether the units pass node ``i``, a clip to constant ``bounds``; fixes them if not."""
        (carrier,) = carried.values()
        self.behind.update(carrier.units[carrier.units >= 0].tolist())
        node = f"{graph.nodes[i].op_type} '{graph.names[i]}'"
        if not self.rescale:
            reason = (
                f"feeds {node}, which is not positively homogeneous at fixed bounds "
                f"{bounds.text()}{_CLIP_HINT}"
            )
        elif self.in_body:  # the rewrite replaces nodes of the main graph only
            reason = f"feeds {node} inside a subgraph, where clips are not rewritten"
        elif self.opset < 8:  # Min and Max broadcast per-unit bounds from opset 8 on
            reason = f"feeds {node}: per-unit bounds need opset 8 or later, not {self.opset}"
        else:
            if not bounds.is_relu:  # Max(z, 0) is exact as it stands
                self.found.append((i, bounds, carrier))
            return True
        state.fix(carrier.units, reason)
        return False

    def replacements(
        self,
        graph: GraphIndex,
        layers: list[LinearMatch],
        offsets: np.ndarray,
        of_unit: np.ndarray,
    ) -> list[tuple[ClipReplacement, np.ndarray]]:
        """A replacement for each admitted clip that has a moving unit, with its units' groups."""
        taken: set[str] | None = None
        found = []
        for i, bounds, carrier in self.found:
            units = carrier.units
            rows = of_unit[units]
            if not (rows != FIXED).any():
                continue
            if taken is None:
                taken = _name_heads(graph.graph)
            prefix = graph.names[i]
            while prefix in taken:
                prefix += "_"
            taken.add(prefix)
            layer = layers[int(np.searchsorted(offsets, units[units >= 0][0], side="right")) - 1]
            replacement = ClipReplacement(
                node=graph.names[i],
                output=graph.nodes[i].output[0],
                data=bounds.data,
                low=bounds.low,
                high=bounds.high,
                prefix=prefix,
                shape=(len(units),) + (1,) * (-carrier.axis - 1),
                data_type=int(graph.elem_type(layer.weight)),
            )
            found.append((replacement, rows))
        return found


def _name_heads(graph: onnx.GraphProto) -> set[str]:
    """Every part before a '/' of a name the graph uses: a prefix not in this set makes fresh
    names ``prefix + "/" + anything``."""
    names = {node.name for node in graph.node}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        names.update(v.name for v in values)
    heads = set()
    for name in names:
        while "/" in name:
            name = name.rpartition("/")[0]
            heads.add(name)
    return heads


def _read(layer: LinearMatch, carrier: Carrier, state: _Units) -> bool:
    """Check the units reaching a layer's data input; True if they become its columns."""
    units = carrier.units
    if layer.cols_refusal is not None:
        state.fix(units, f"activation feeds '{layer.name}': {layer.cols_refusal}")
    elif carrier.spread:
        state.fix(units, f"activation feeds '{layer.name}' with its units spread over several axes")
    elif carrier.axis != layer.in_axis:
        state.fix(units, f"activation feeds '{layer.name}', which reads it transposed")
    elif len(units) != layer.n_cols:
        state.fix(units, f"feeds '{layer.name}' {len(units)} channels, not {layer.n_cols}")
    else:
        state.read[units[units >= 0]] = True
        return True
    return False


def _apply(graph: GraphIndex, i: int, step: Step, state: _Units) -> None:
    for units, reason in step.fixes:
        state.fix(units, reason)
    name = f"{graph.nodes[i].op_type} '{graph.names[i]}'"
    for carriers in step.ties:
        stacked = np.stack([c.units for c in carriers])  # (inputs, channels)
        lonely = (stacked < 0).any(axis=0)
        if lonely.any():
            state.fix(
                stacked[:, lonely].ravel(),
                f"merged by {name} with a channel that cannot be rescaled",
            )
        for column in stacked[:, ~lonely].T.tolist():
            for other in column[1:]:
                state.union(column[0], other)


def _moving(state: _Units, roots: np.ndarray | None = None) -> np.ndarray:
    """Per unit, whether its group moves: its root (``roots``, found if None) is neither fixed
    nor unread."""
    roots = _roots(state.parent) if roots is None else roots
    read = np.zeros(len(roots), dtype=bool)
    np.logical_or.at(read, roots, state.read)
    fixed_root = np.zeros(len(roots), dtype=bool)
    fixed_root[roots[sorted(state.reason)]] = True
    return ~fixed_root[roots] & read[roots]


def _roots(parent: np.ndarray) -> np.ndarray:
    """Every unit's union-find root, by pointer jumping over the whole array at once."""
    roots = parent.copy()
    while True:
        jumped = roots[roots]
        if np.array_equal(jumped, roots):
            return roots
        roots = jumped


class _UnitNames:
    """Units are numbered layer after layer; unit ``offsets[k] + o`` is named "layer_k:o"."""

    def __init__(self, layers: list[str], offsets: np.ndarray) -> None:
        self.layers = layers
        self.offsets = offsets

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, unit: int) -> str:
        layer = self._layer(unit)
        return f"{self.layers[layer]}:{unit - int(self.offsets[layer])}"

    def layer_of(self, unit: int) -> str:
        return self.layers[self._layer(unit)]

    def _layer(self, unit: int) -> int:
        return int(np.searchsorted(self.offsets, unit, side="right")) - 1


class GroupNames(NameSequence):
    """The scale groups' names, each that of its first unit, made when read: a model may have
    millions of units, and the solver and report name only the few they mention."""

    def __init__(self, units: _UnitNames, roots: np.ndarray) -> None:
        self._units = units
        self._roots = roots

    def __len__(self) -> int:
        return len(self._roots)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        if isinstance(index, slice):
            return tuple(self._units[int(r)] for r in self._roots[index])
        return self._units[int(self._roots[index])]

    def __repr__(self) -> str:
        return f"GroupNames({len(self)} groups)"


class _Groups:
    """Scale groups: one per union-find root that is neither fixed nor unread, numbered in
    layer/row order and named after the root's unit."""

    def __init__(self, state: _Units, unit_names: _UnitNames) -> None:
        n = len(unit_names)
        self.unit_names = unit_names
        self.state = state
        self.roots = _roots(state.parent)
        self.root_reason: dict[int, tuple[int, str]] = {}  # root -> (first fixed member, why)
        for u, reason in sorted(state.reason.items()):
            self.root_reason.setdefault(int(self.roots[u]), (u, reason))
        moving = _moving(state, self.roots)
        # A root is its group's smallest unit (union keeps the smaller root), so numbering the
        # roots in ascending order numbers groups in order of their first unit.
        group_roots, number = np.unique(self.roots[moving], return_inverse=True)
        self.names = GroupNames(unit_names, group_roots)
        self.of_unit = np.full(n + 1, FIXED, dtype=np.int64)  # index -1 ("no unit"): FIXED
        self.of_unit[:n][moving] = number.reshape(-1)
        self.of_unit.setflags(write=False)  # shared by layers' rows and columns

    def skips(self, layer: str, span: np.ndarray) -> list[Skip]:
        """Why the layer's fixed rows are fixed, one Skip per distinct reason."""
        counts: dict[str, int] = {}
        for u in span[self.of_unit[span] == FIXED].tolist():
            reason = self.state.reason.get(u)
            root = int(self.roots[u])
            if reason is None and root in self.root_reason:
                member, why = self.root_reason[root]
                other = self.unit_names.layer_of(member)
                reason = f"tied by a merge to units of '{other}', which are fixed: {why}"
            elif reason is None:
                reason = "not read by any linear layer (unused channel)"
            counts[reason] = counts.get(reason, 0) + 1
        return [Skip(layer, n, reason) for reason, n in counts.items()]


def _reaches_linear(graph: GraphIndex) -> set[str]:
    """Tensors with a linear op (or a subgraph that may hold one) downstream: fixed units of a
    layer whose output reaches none are output units, not worth a Skip record."""
    reach: set[str] = set()
    for i in reversed(graph.topological_order()):
        node = graph.nodes[i]
        if (
            node.op_type in LINEAR_OPS
            or i in graph.with_subgraphs
            or any(out in reach for out in node.output if out)
        ):
            reach.update(name for name in node.input if name)
            reach.update(graph.implicit.get(i, ()))
    return reach


def _units(
    graph: GraphIndex, layer: LinearMatch, rows: np.ndarray, cols: np.ndarray
) -> LinearUnits:
    """The layer's record: raw column groups for the coupling, and the tensor edits."""
    moves_rows = bool((rows != FIXED).any())
    if layer.kind == "scale":  # row o weighs its own normalised channel alone: never a unit
        raw_cols = tensor_cols = np.full(1, FIXED, dtype=np.int64)
    elif layer.kind in ("dense", "recurrent"):
        raw_cols = tensor_cols = cols
    elif layer.group == 1:
        raw_cols, tensor_cols = np.repeat(cols, layer.taps), cols
    else:  # row o of group g reads input channels g*(I/g) .. (g+1)*(I/g)-1
        per_group = layer.n_cols // layer.group
        group_of_row = np.arange(layer.n_rows) // (layer.n_rows // layer.group)
        tensor_cols = cols.reshape(layer.group, per_group)[group_of_row]
        raw_cols = np.repeat(tensor_cols, layer.taps, axis=1)
    edits = []
    own_rows = moves_rows and layer.bn is None  # with BN, gamma and beta carry the rows
    if layer.kind == "scale" and own_rows:  # a diagonal: its columns never move
        edits.append(TensorEdit(tensor=layer.weight, row_axis=layer.row_axis, row_groups=rows))
    elif own_rows or (cols != FIXED).any():
        edits.append(
            TensorEdit(
                tensor=layer.weight,
                row_axis=layer.row_axis,
                row_groups=rows if own_rows else None,
                col_axis=layer.col_axis,
                col_groups=tensor_cols,
            )
        )
    if (cols != FIXED).any():  # a recurrent layer's other directions: the same columns
        edits += [
            TensorEdit(tensor=name, col_axis=layer.col_axis, col_groups=tensor_cols)
            for name in layer.more_weights
        ]
    if moves_rows and layer.bn is not None:
        bn = layer.bn
        edits += [TensorEdit(t, row_axis=0, row_groups=rows) for t in (bn.scale, bn.bias)]
    elif moves_rows and layer.bias is not None and layer.kind != "dense":
        axis = len(layer.bias_shape) + layer.bias_axis
        edits.append(TensorEdit(tensor=layer.bias, row_axis=axis, row_groups=rows))
    elif moves_rows and layer.bias is not None:
        expand_to = layer.bias_expand_to()
        rank = len(expand_to if expand_to is not None else layer.bias_shape)
        edits.append(
            TensorEdit(tensor=layer.bias, row_axis=rank - 1, row_groups=rows, expand_to=expand_to)
        )
    return LinearUnits(layer.name, layer.effective_weight(graph), rows, raw_cols, tuple(edits))
