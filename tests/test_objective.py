"""Objective: F and the loads, against the reference, on both of its numeric paths."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import Edge, Network, exponents, networks

from onnxbalance.solver import Objective
from onnxbalance.solver.couplings import collapse_fixed_rows, summarise_graph
from onnxbalance.solver.objective import Bins
from onnxbalance.unitgraph import FIXED


@settings(max_examples=80, deadline=None)
@given(
    net=networks(dag=True, zeros=True, ties=True),
    p=exponents,
    q=exponents,
    spread=st.sampled_from([0.1, 3.0, 60.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_loads_match_the_reference_on_both_paths(net, p, q, spread, seed):
    u = np.random.default_rng(seed).normal(scale=spread, size=net.n_groups)
    objective = Objective(net.unit_graph(p), p, q)
    # where the plain products overflow, the point is redone in the log domain (two passes)
    paths = []
    direct_loads, log_loads = objective._direct_loads, objective._log_loads
    objective._direct_loads = lambda scaled: paths.append("direct") or direct_loads(scaled)
    objective._log_loads = lambda scales: paths.append("log") or log_loads(scales)
    direct = objective.loads(u)
    redone = paths == ["direct", "log"]
    del objective._direct_loads, objective._log_loads
    objective._log_range = np.inf  # force the log-domain path
    logged = objective.loads(u)
    incoming, outgoing = reference.loads(net.layers(), net.n_groups, u, p, q)
    value = reference.objective(net.layers(), u, p, q)
    for loads in (direct, logged):
        assert loads.value == pytest.approx(value, rel=1e-11)
        np.testing.assert_allclose(loads.incoming, incoming, rtol=1e-11, atol=1e-300)
        np.testing.assert_allclose(loads.outgoing, outgoing, rtol=1e-11, atol=1e-300)
    assert objective.value(u) == pytest.approx(value, rel=1e-11)
    if spread < 10:  # rho itself (not rho^r) can exceed float64 for the widest spreads
        rows = np.concatenate(objective.row_sums(u))
        assert float(np.sum(rows ** (q / p))) == pytest.approx(value, rel=1e-11)
    assert objective.passes == 2 + 2 * redone + 2 + 1 + (1 if spread < 10 else 0)


def test_a_row_far_below_the_rest_of_its_layer_is_not_lost_to_underflow():
    """The output row's only coupling is to a unit scaled by e^-400 while another column of the
    same layer sits at e^+517: a shift shared by the whole layer would underflow that row."""
    weights = [np.zeros((1, 1)), np.array([[0.0], [-0.54], [0.0], [0.0]]), np.zeros((1, 4))]
    weights[2][0, 3] = 0.04
    net = Network(
        (1, 1, 4, 1),
        tuple(Edge(k, k + 1, w) for k, w in enumerate(weights)),
        tuple(np.zeros(s) for s in (0, 1, 4, 1)),
        (np.array([FIXED]), np.array([0]), np.array([1, 2, 3, 4]), np.array([FIXED])),
        5,
    )
    u = np.array([27.0, 30.0, -129.0, 66.0, 100.0])
    objective = Objective(net.unit_graph(4.0), 4.0, 1.0)
    loads = objective.loads(u)
    incoming, outgoing = reference.loads(net.layers(), net.n_groups, u, 4.0, 1.0)
    assert outgoing[4] > 0
    np.testing.assert_allclose(loads.outgoing, outgoing, rtol=1e-12)
    np.testing.assert_allclose(loads.incoming, incoming, rtol=1e-12)
    assert objective.value(u) == pytest.approx(reference.objective(net.layers(), u, 4.0, 1.0))


@settings(max_examples=60, deadline=None)
@given(
    index=st.lists(st.integers(0, 9), max_size=40),
    ordered=st.booleans(),
    seed=st.integers(0, 99),
)
def test_bins_sum_like_bincount(index, ordered, seed):
    index = np.array(sorted(index) if ordered else index, dtype=np.int64)
    values = np.random.default_rng(seed).normal(size=index.size)
    expected = np.bincount(index, values, 10)
    np.testing.assert_allclose(Bins(index, 10)(values), expected, rtol=1e-12, atol=1e-12)
    order = np.argsort(index, kind="stable")
    np.testing.assert_allclose(Bins(index, 10, order)(values), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    net=networks(dag=True, zeros=True, ties=True),
    p=exponents,
    spread=st.sampled_from([0.1, 3.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_layers_whose_rows_stay_collapse_to_their_column_sums_when_q_is_p(net, p, spread, seed):
    graph = net.unit_graph(p)
    couplings = summarise_graph(graph)
    small, collapsed = collapse_fixed_rows(graph, couplings)
    for before, after in zip(graph.layers, small.layers, strict=True):
        stays = before.row_groups.size > 1 and (before.row_groups == FIXED).all()
        assert np.shape(after.coupling)[0] == (1 if stays else np.shape(before.coupling)[0])
    u = np.random.default_rng(seed).normal(scale=spread, size=net.n_groups)
    full = Objective(graph, p, p, couplings).loads(u)
    reduced = Objective(small, p, p, collapsed).loads(u)
    assert reduced.value == pytest.approx(full.value, rel=1e-12)
    np.testing.assert_allclose(reduced.incoming, full.incoming, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(reduced.outgoing, full.outgoing, rtol=1e-10, atol=1e-300)


def test_collapsing_rows_is_for_q_equal_p_only():
    from networks import make_network

    graph = make_network((3, 5, 4, 2), seed=7).unit_graph(2.0)  # the output layer's 2 rows stay
    couplings = summarise_graph(graph)
    small, collapsed = collapse_fixed_rows(graph, couplings)
    assert [np.shape(layer.coupling)[0] for layer in small.layers] == [5, 4, 1]
    u = np.random.default_rng(0).normal(size=graph.n_groups)
    same = Objective(small, 2.0, 2.0, collapsed).value(u)
    assert same == pytest.approx(Objective(graph, 2.0, 2.0, couplings).value(u), rel=1e-12)
    # with q != p each row's sum enters through a power: the collapsed graph is another F
    other = Objective(small, 2.0, 4.0, collapsed).value(u)
    assert other != pytest.approx(Objective(graph, 2.0, 4.0, couplings).value(u), rel=1e-3)
