"""Dead and cut-off groups: hand-built cases, and properties checked by independent means."""

from __future__ import annotations

from collections import deque

import numpy as np
import reference
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import Edge, Network, dead_and_cut_off_network, networks

from onnxbalance.solver.liveness import (
    CUT_FROM_BOTH,
    CUT_FROM_INPUTS,
    CUT_FROM_OUTPUTS,
    DEAD_BOTH,
    DEAD_INCOMING,
    DEAD_OUTGOING,
    find_pinned,
    pin_dead_and_cut_off,
    pin_groups,
)
from onnxbalance.unitgraph import FIXED, Layer, UnitGraph

# Cut-off groups need ties (a coupling inside one group) and zeros; draw plenty of both.
LIVENESS_NETWORKS = st.one_of(
    networks(dag=True, zeros=True, ties=True, max_width=4),
    networks(dag=True, zeros=True, group_pool=True, max_width=4),
)


def reasons(net: Network) -> dict[int, str]:
    return {g.group: g.reason for g in find_pinned(net.unit_graph(2.0))}


def chain(w1, w2, w3, groups1, groups2, n_groups) -> Network:
    w1, w2, w3 = (np.asarray(w, dtype=np.float64) for w in (w1, w2, w3))
    sizes = (w1.shape[1], w1.shape[0], w2.shape[0], w3.shape[0])
    groups = (
        np.full(sizes[0], FIXED),
        np.asarray(groups1),
        np.asarray(groups2),
        np.full(sizes[3], FIXED),
    )
    biases = tuple(np.zeros(s) for s in sizes)
    edges = (Edge(0, 1, w1), Edge(1, 2, w2), Edge(2, 3, w3))
    return Network(sizes, edges, biases, groups, n_groups)


def test_dead_and_cut_off_from_the_inputs():
    assert reasons(dead_and_cut_off_network()) == {
        0: DEAD_INCOMING,
        1: DEAD_OUTGOING,
        2: CUT_FROM_INPUTS,
    }


def test_cut_off_from_the_outputs():
    # h1 = [x, a], h2 = [y, b]; x and y tied (group 0); y's only outgoing weight is zero,
    # x's only outgoing weight goes to y: the group reaches the outputs only through itself.
    net = chain([[1.0], [1.0]], [[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0]], [0, 1], [0, 2], n_groups=3)
    assert reasons(net) == {0: CUT_FROM_OUTPUTS}


def test_cut_off_from_both_sides_and_dead_on_both_sides():
    # group 0 = {x in h1, y in h2}: x gets nothing from the inputs, y gives nothing to the
    # outputs, x -> y is the group's only coupling. Unit c in h1 is fully disconnected.
    net = chain(
        [[0.0], [1.0], [0.0]],
        [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        [[0.0, 1.0]],
        [0, 1, 3],
        [0, 2],
        n_groups=4,
    )
    assert reasons(net) == {0: CUT_FROM_BOTH, 3: DEAD_BOTH}


def test_a_unit_fed_only_by_a_dead_unit_stays_live():
    # a (h1) gets no input but feeds e (h2): a is pinned and then anchors e like an input.
    net = chain([[0.0], [1.0]], [[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0]], [0, 1], [2, 3], 4)
    assert reasons(net) == {0: DEAD_INCOMING}
    graph, pinned = pin_dead_and_cut_off(net.unit_graph(2.0))
    assert [g.group for g in pinned] == [0]
    best = reference.minimise(net.layers(), 4, 2.0, 2.0, pinned=[0])
    assert best.success and np.abs(best.log_scales).max() < 10  # a finite optimum exists


def test_unused_group_is_pinned_and_nothing_else():
    net = chain([[1.0]], [[1.0]], [[1.0]], [0], [1], n_groups=3)
    assert reasons(net) == {2: DEAD_BOTH}


def test_pin_groups_maps_to_fixed_and_keeps_everything_else():
    graph = dead_and_cut_off_network().unit_graph(2.0)
    pinned = pin_groups(graph, [2, 4])
    assert pinned.group_names == graph.group_names
    for before, after in zip(graph.layers, pinned.layers, strict=True):
        assert after.name == before.name
        np.testing.assert_array_equal(after.coupling, before.coupling)
        for old, new in (
            (before.row_groups, after.row_groups),
            (before.col_groups, after.col_groups),
        ):
            expected = np.where(np.isin(old, [2, 4]), FIXED, old)
            np.testing.assert_array_equal(new, expected)
    assert pin_groups(graph, []) is graph


def unit_reachability(net: Network, pinned_dead: set[int]) -> tuple[set[int], set[int]]:
    """Independent oracle: breadth-first search over units and non-zero weights. Returns the
    groups reachable from a fixed input side and those reaching a fixed output side (dead
    groups count as fixed; a group is never its own anchor)."""
    nodes = [(k, j) for k, size in enumerate(net.sizes) for j in range(size)]
    group = {(k, j): int(net.groups[k][j]) for k, j in nodes}
    forward: dict = {n: [] for n in nodes}
    backward: dict = {n: [] for n in nodes}
    for e in net.edges:
        for o, i in zip(*np.nonzero(e.weight), strict=True):
            forward[(e.src, i)].append((e.dst, o))
            backward[(e.dst, o)].append((e.src, i))

    members: dict[int, list] = {}
    for n in nodes:
        members.setdefault(group[n], []).append(n)

    def search(adjacency) -> set[int]:
        # A group moves as one: once any of its units is reached, all of them are.
        anchored = [n for n in nodes if group[n] == FIXED or group[n] in pinned_dead]
        queue, found = deque(anchored), set()
        while queue:
            node = queue.popleft()
            for nxt in adjacency[node]:
                g = group[nxt]
                if g in found or g == FIXED or g in pinned_dead:
                    continue
                found.add(g)
                queue.extend(members[g])
        return found

    return search(forward), search(backward)


@settings(max_examples=150, deadline=None)
@given(net=LIVENESS_NETWORKS)
def test_pinned_groups_match_a_unit_level_search(net):
    found = reasons(net)
    incoming = np.zeros(net.n_groups)
    outgoing = np.zeros(net.n_groups)
    for w, rows, cols in net.layers():
        np.add.at(incoming, rows[rows != FIXED], np.abs(w).sum(axis=1)[rows != FIXED])
        np.add.at(outgoing, cols[cols != FIXED], np.abs(w).sum(axis=0)[cols != FIXED])
    dead = {g for g in range(net.n_groups) if incoming[g] == 0 or outgoing[g] == 0}
    from_inputs, to_outputs = unit_reachability(net, dead)
    for g in range(net.n_groups):
        if g in dead:
            assert found[g].startswith("dead"), (g, found.get(g))
        elif g in from_inputs and g in to_outputs:
            assert g not in found
        else:
            assert found[g].startswith("cut off"), (g, found.get(g))
            assert ("inputs" in found[g]) == (g not in from_inputs)
            assert ("outputs" in found[g]) == (g not in to_outputs)


@settings(max_examples=100, deadline=None)
@given(net=LIVENESS_NETWORKS)
def test_pinned_groups_have_no_finite_optimum(net):
    """Raising every group without an input anchor (or lowering every group without an output
    anchor) never increases F, measured with the independent reference objective."""
    found = reasons(net)
    layers = net.layers()
    rise = [g for g, why in found.items() if why in (DEAD_INCOMING, CUT_FROM_INPUTS)]
    rise += [g for g, why in found.items() if why in (DEAD_BOTH, CUT_FROM_BOTH)]
    fall = [g for g, why in found.items() if why in (DEAD_OUTGOING, CUT_FROM_OUTPUTS)]
    fall += [g for g, why in found.items() if why in (DEAD_BOTH, CUT_FROM_BOTH)]
    for groups, sign in ((rise, 1.0), (fall, -1.0)):
        if not groups:
            continue
        values = []
        for t in (0.0, 1.0, 4.0, 16.0):
            u = np.zeros(net.n_groups)
            u[groups] = sign * t
            values.append(reference.objective(layers, u, 2.0, 2.0))
        assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:], strict=False))


def test_fixed_only_graph_has_nothing_to_pin():
    layer = Layer("fc", np.ones((2, 3)), np.full(2, FIXED), np.full(3, FIXED))
    assert find_pinned(UnitGraph((layer,), ())) == ()
