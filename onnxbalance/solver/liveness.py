"""Which scale groups have no finite optimum and must stay at scale 1 (docs/algorithm.md §4).

F(u) attains its minimum over a set of free groups when every one of them lies on a path of
non-zero couplings that starts at a fixed column (an input side) and ends at a fixed row (an
output side). Then for any direction v != 0 some coupling on such a path sees v rise from its
column to its row, so F grows without bound along v (F is coercive). A group that is on no such
path can move off to infinity while F keeps decreasing:

* dead: all its incoming couplings are zero (nothing stops its scale from growing) or all its
  outgoing couplings are zero (nothing stops it from shrinking);
* cut off: it cannot be reached from a fixed column, or cannot reach a fixed row.

Dead groups are pinned first and then count as fixed, so their other side still anchors the
units next to them (a unit fed only by a dead unit with non-zero outgoing weights is live). A
tied group's self-loop (a coupling between two of its own units) never anchors it: rescaling the
group leaves that coupling unchanged. Pinning every cut-off group at once leaves each remaining
group on the path that made it live, so the remaining problem has a finite minimum.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..unitgraph import FIXED, Layer, UnitGraph
from .couplings import Coupling, summarise_graph
from .products import times, transposed_times
from .result import PinnedGroup

DEAD_INCOMING = "dead: all incoming weights are zero"
DEAD_OUTGOING = "dead: all outgoing weights are zero"
DEAD_BOTH = "dead: all incoming and outgoing weights are zero"
CUT_FROM_INPUTS = "cut off from the inputs"
CUT_FROM_OUTPUTS = "cut off from the outputs"
CUT_FROM_BOTH = "cut off from the inputs and the outputs"


def _weight_totals(graph: UnitGraph, couplings: tuple[Coupling, ...]) -> tuple[np.ndarray, ...]:
    """Per group: whether it has a non-zero incoming and a non-zero outgoing coupling (self-loops
    included), from the row and column sums of the summary (no pass)."""
    # one pad entry at the end takes the units of FIXED (-1)
    incoming = np.zeros(graph.n_groups + 1, dtype=bool)
    outgoing = np.zeros(graph.n_groups + 1, dtype=bool)
    for layer, coupling in zip(graph.layers, couplings, strict=True):
        rows = np.asarray(layer.row_groups, dtype=np.int64)
        cols = np.asarray(layer.col_groups, dtype=np.int64)
        if coupling.positive:  # every row and column sums to more than zero
            incoming[rows] = True
            outgoing[cols] = True
        else:
            incoming[rows[coupling.row_sums > 0]] = True
            outgoing[cols[coupling.col_sums > 0]] = True
    return incoming[:-1], outgoing[:-1]


def _reachable(
    graph: UnitGraph, couplings: tuple[Coupling, ...], anchored: np.ndarray, forward: bool
) -> np.ndarray:
    """Groups reached by non-zero couplings from a fixed or ``anchored`` column (forward) or
    reaching a fixed or ``anchored`` row (backward). Anchored groups themselves are excluded.

    Each pass over the layers is one matrix-vector product per layer with an indicator vector;
    a coupling is non-negative, so a positive product means some non-zero coupling hits a
    reached unit. Most layers need no product: with only positive couplings any reached unit
    hits every target, and when every source is reached the product is the row (column) sums
    of the summary. Passes repeat until nothing changes (one or two for feed-forward orders).
    """
    n = graph.n_groups
    # Sources: reached or anchored groups, and the pad at index -1 == FIXED (always a source).
    source = np.append(anchored, True)
    # Layers usually come in forward order: walk them backwards for the backward search.
    order = [
        (
            np.asarray(layer.col_groups if forward else layer.row_groups, np.int64),
            np.asarray(layer.row_groups if forward else layer.col_groups, np.int64),
            coupling,
        )
        for layer, coupling in zip(graph.layers, couplings, strict=True)
    ]
    if not forward:
        order.reverse()
    changed = True
    while changed:
        changed = False
        used = np.zeros(n + 1, dtype=bool)  # sources of the layers walked in this pass
        for sources, targets, coupling in order:
            used[sources] = True
            active = source[sources]
            if not active.any():
                continue
            if coupling.positive:
                hit = targets
            elif active.all():  # as in a plain chain: the row (column) sums decide
                hit = targets[(coupling.row_sums if forward else coupling.col_sums) > 0]
            else:
                matrix = coupling.matrix
                product = times if forward else transposed_times
                hit = targets[product(matrix, active) > 0]
            new = hit[~source[hit]]  # the pad (FIXED) is a source: never new
            if new.size:
                source[new] = True
                # Another pass only if a layer already walked reads a newly reached group.
                changed = changed or bool(used[new].any())
    return source[:-1] & ~anchored


def find_pinned(
    graph: UnitGraph, couplings: tuple[Coupling, ...] | None = None
) -> tuple[PinnedGroup, ...]:
    """Groups that must stay at scale 1, in group order, each with the reason.

    ``couplings`` (couplings.py) saves looking at the matrices again when the caller has them.

    >>> import numpy as np
    >>> from onnxbalance.unitgraph import Layer
    >>> g = UnitGraph((Layer("fc1", np.array([[1.0], [0.0]]), np.array([0, 1]), np.array([FIXED])),
    ...                Layer("fc2", np.array([[1.0, 1.0]]), np.array([FIXED]), np.array([0, 1]))),
    ...               ("h0", "h1"))
    >>> [(p.name, p.reason) for p in find_pinned(g)]
    [('h1', 'dead: all incoming weights are zero')]
    """
    if couplings is None:
        couplings = summarise_graph(graph, single=False)
    incoming, outgoing = _weight_totals(graph, couplings)
    no_in, no_out = ~incoming, ~outgoing
    dead = no_in | no_out
    from_inputs = _reachable(graph, couplings, dead, forward=True)
    to_outputs = _reachable(graph, couplings, dead, forward=False)
    pinned = []
    for group in np.flatnonzero(dead | ~from_inputs | ~to_outputs).tolist():
        if no_in[group] and no_out[group]:
            reason = DEAD_BOTH
        elif no_in[group]:
            reason = DEAD_INCOMING
        elif no_out[group]:
            reason = DEAD_OUTGOING
        elif not from_inputs[group] and not to_outputs[group]:
            reason = CUT_FROM_BOTH
        elif not from_inputs[group]:
            reason = CUT_FROM_INPUTS
        elif not to_outputs[group]:
            reason = CUT_FROM_OUTPUTS
        else:
            continue
        pinned.append(PinnedGroup(group, graph.group_names[group], reason))
    return tuple(pinned)


def pin_groups(graph: UnitGraph, groups) -> UnitGraph:
    """The same graph with ``groups`` mapped to FIXED (group indices and names unchanged)."""
    mask = np.zeros(graph.n_groups, dtype=bool)
    mask[np.asarray(list(groups), dtype=np.int64)] = True
    if not mask.any():
        return graph

    def fix(groups_of_units: np.ndarray) -> np.ndarray:
        units = np.asarray(groups_of_units, dtype=np.int64)
        return np.where(np.append(mask, True)[units], FIXED, units)  # FIXED indexes the pad

    layers: list[Layer] = [
        dataclasses.replace(
            layer, row_groups=fix(layer.row_groups), col_groups=fix(layer.col_groups)
        )
        for layer in graph.layers
    ]
    return UnitGraph(tuple(layers), graph.group_names)


def pin_dead_and_cut_off(
    graph: UnitGraph, couplings: tuple[Coupling, ...] | None = None
) -> tuple[UnitGraph, tuple[PinnedGroup, ...]]:
    """The graph with every dead or cut-off group FIXED, and the pinned groups with reasons."""
    pinned = find_pinned(graph, couplings)
    return pin_groups(graph, (p.group for p in pinned)), pinned
