"""Algorithm 1 (method "mu") against the independent scipy minimiser in tests/reference.py."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from networks import (
    Edge,
    Network,
    dead_and_cut_off_network,
    exponents,
    make_network,
    networks,
    paper_networks,
)
from solver_checks import (
    alternating_magnitudes_network,
    check_against_reference,
    spanning_magnitudes_network,
    tied_network,
)

from onnxbalance.solver import methods
from onnxbalance.solver import solve as solve_any
from onnxbalance.solver.mu import step_size
from onnxbalance.unitgraph import FIXED, Layer, UnitGraph

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TIGHT = {"tol": 1e-10, "max_sweeps": 200_000}
solve = functools.partial(solve_any, method="mu")  # the default method is "newton"


@PROPERTY
@given(net=networks(dag=False), p=exponents, q=exponents)
def test_layered_networks_reach_the_scipy_minimum(net, p, q):
    result = solve(net.unit_graph(p), p, q, **TIGHT)
    check_against_reference(net, p, q, result)
    assert result.pinned == ()
    assert result.solver == "mu"
    assert result.passes == 2 * (result.sweeps + 1)


@PROPERTY
@given(net=networks(dag=True, zeros=True, ties=True), p=exponents, q=exponents)
def test_dag_networks_with_zeros_and_ties_reach_the_scipy_minimum(net, p, q):
    check_against_reference(net, p, q, solve(net.unit_graph(p), p, q, **TIGHT))


@settings(max_examples=15, deadline=None)
@given(net=networks(dag=True, zeros=True, ties=True), p=exponents, q=exponents)
def test_rescaling_preserves_the_function(net, p, q):
    result = solve(net.unit_graph(p), p, q, tol=1e-8)
    x = np.random.default_rng(0).normal(size=(16, net.sizes[0]))
    before = net.forward(x)
    moved = net.rescaled(result.log_scales)
    scale = max(np.abs(before).max(), 1e-300)
    np.testing.assert_allclose(moved.forward(x), before, rtol=0, atol=1e-10 * scale)
    if result.norm_after < result.norm_before * (1 - 1e-6):  # the weights really changed
        assert any(
            not np.allclose(a.weight, b.weight) for a, b in zip(moved.edges, net.edges, strict=True)
        )


def balanced_one_hidden_layer(seed: int) -> Network:
    """For p = q = 2: each hidden unit's outgoing column gets the squared norm of its incoming
    row, so in_h = out_h holds by construction."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(6, 4))
    w2 = rng.normal(size=(3, 6))
    w2 *= np.sqrt((w1**2).sum(axis=1) / (w2**2).sum(axis=0))
    groups = (np.full(4, FIXED), np.arange(6), np.full(3, FIXED))
    biases = (np.zeros(0), rng.normal(size=6), rng.normal(size=3))
    return Network((4, 6, 3), (Edge(0, 1, w1), Edge(1, 2, w2)), biases, groups, 6)


def test_constructed_balanced_network_stops_after_one_sweep():
    net = balanced_one_hidden_layer(3)
    result = solve(net.unit_graph(2.0), 2.0, 2.0, tol=1e-6)
    assert result.converged and result.sweeps == 1
    assert np.abs(result.log_scales).max() < 1e-12
    assert result.norm_after == pytest.approx(result.norm_before, rel=1e-12)


@settings(max_examples=10, deadline=None)
@given(net=networks(dag=True, ties=True), p=exponents, q=exponents)
def test_balancing_a_balanced_network_changes_nothing(net, p, q):
    first = solve(net.unit_graph(p), p, q, tol=1e-12, max_sweeps=500_000)
    assert first.converged
    balanced = net.rescaled(first.log_scales)
    again = solve(balanced.unit_graph(p), p, q, tol=1e-6)
    assert again.converged and again.sweeps == 1
    assert np.abs(np.expm1(again.log_scales)).max() < 1e-6
    assert again.norm_after == pytest.approx(first.norm_after, rel=1e-9)


def test_unbalanced_network_takes_more_than_one_sweep():
    net = balanced_one_hidden_layer(3)
    w1 = net.edges[0].weight * np.array([10.0, 1, 1, 1, 1, 0.1])[:, None]
    tilted = Network(net.sizes, (Edge(0, 1, w1), net.edges[1]), net.biases, net.groups, 6)
    result = solve(tilted.unit_graph(2.0), 2.0, 2.0)
    assert result.sweeps > 1 and result.norm_after < result.norm_before


def test_dead_and_cut_off_groups_stay_at_one_and_the_rest_converges():
    net = dead_and_cut_off_network()
    result = solve(net.unit_graph(2.0), 2.0, 2.0, **TIGHT)
    reasons = {g.group: g.reason for g in result.pinned}
    assert reasons == {
        0: "dead: all incoming weights are zero",
        1: "dead: all outgoing weights are zero",
        2: "cut off from the inputs",
    }
    assert [g.name for g in result.pinned] == ["g0", "g1", "g2"]
    check_against_reference(net, 2.0, 2.0, result)
    assert np.all(result.log_scales[[3, 4, 5]] != 0.0)
    x = np.random.default_rng(1).normal(size=(8, 3))
    np.testing.assert_allclose(net.rescaled(result.log_scales).forward(x), net.forward(x), 1e-10)


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 3.0), (3.0, 1.0)])
def test_tied_units_share_one_factor_and_match_scipy(p, q):
    tied, free = tied_network(True), tied_network(False)
    result = solve(tied.unit_graph(p), p, q, **TIGHT)
    check_against_reference(tied, p, q, result)
    unconstrained = reference.minimise(free.layers(), free.n_groups, p, q)
    # The tie is a real constraint: the tied optimum is worse than the free one.
    assert result.norm_after > unconstrained.norm * (1 + 1e-6)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_paper_networks_converge_within_1000_sweeps(index):
    net = paper_networks()[index]
    graph = net.unit_graph(2.0)
    start = time.perf_counter()
    result = solve(graph, 2.0, 2.0, tol=1e-6, max_sweeps=1000)
    elapsed = time.perf_counter() - start
    assert result.converged, result.message
    assert result.sweeps <= 1000
    assert result.norm_after < result.norm_before
    incoming, outgoing = reference_loads_fast(net, result.log_scales)
    np.testing.assert_allclose(incoming, outgoing, rtol=1e-3)
    assert elapsed < 60


def reference_loads_fast(net: Network, log_scales: np.ndarray):
    """in_h and out_h for p = q = 2 from the rescaled weights: squared row and column norms."""
    scaled = net.rescaled(log_scales)
    incoming = np.zeros(net.n_groups)
    outgoing = np.zeros(net.n_groups)
    for edge in scaled.edges:
        rows, cols = net.groups[edge.dst], net.groups[edge.src]
        np.add.at(incoming, rows[rows != FIXED], (edge.weight**2).sum(axis=1)[rows != FIXED])
        np.add.at(outgoing, cols[cols != FIXED], (edge.weight**2).sum(axis=0)[cols != FIXED])
    return incoming, outgoing


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    p=exponents,
    q=exponents,
    dag=st.booleans(),
)
def test_extreme_magnitudes_do_not_overflow(seed, p, q, dag):
    extreme = spanning_magnitudes_network(seed, dag)
    with np.errstate(over="raise", under="ignore"):
        result = solve(extreme.unit_graph(p), p, q, tol=1e-10, max_sweeps=500_000)
    assert np.all(np.isfinite(result.log_scales))
    assert np.all(np.isfinite(result.history))
    check_against_reference(extreme, p, q, result)


def test_extreme_scales_between_layers():
    """Layers of magnitude 1e30 and 1e-30 in turn: the optimum has scales near 1e-30."""
    extreme = alternating_magnitudes_network()
    for p, q in [(4.0, 4.0), (0.5, 4.0), (4.0, 0.5), (0.5, 0.5)]:
        with np.errstate(over="raise"):
            result = solve(extreme.unit_graph(p), p, q, **TIGHT)
        assert np.abs(result.log_scales).max() > 30  # really moved by many orders of magnitude
        check_against_reference(extreme, p, q, result)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_couplings_raise_naming_the_layer(bad):
    net = make_network((3, 4, 2), seed=0)
    graph = net.unit_graph(2.0)
    layer = graph.layers[1]
    coupling = layer.coupling.copy()
    coupling[0, 1] = bad
    broken = UnitGraph(
        (graph.layers[0], Layer("fc_out", coupling, layer.row_groups, layer.col_groups)),
        graph.group_names,
    )
    with pytest.raises(ValueError, match="fc_out"):
        solve(broken)


def test_step_size_follows_the_paper():
    assert step_size(2.0, 2.0) == 1 / 8
    assert step_size(2.0, 1.0) == 1 / 4  # q = p/2 uses 1/(4q)
    assert step_size(4.0, 1.0) == pytest.approx(3 / 16)
    assert step_size(1.0, 0.25) == pytest.approx(0.75)


def test_max_sweeps_reached_is_reported_not_raised():
    net = make_network((3, 6, 6, 6, 2), seed=2)
    progress = []
    result = solve(
        net.unit_graph(2.0), tol=1e-12, max_sweeps=5, progress=lambda *a: progress.append(a)
    )
    assert not result.converged and result.sweeps == 5
    assert "did not converge in 5 sweeps" in result.message
    assert [step for step, _ in progress] == [1, 2, 3, 4, 5]
    assert [norm for _, norm in progress] == list(result.history[1:])


def test_bad_arguments_raise():
    graph = make_network((2, 3, 2), seed=0).unit_graph(2.0)
    assert "mu" in methods()
    with pytest.raises(ValueError, match="unknown solver method"):
        solve(graph, method="nope")
    with pytest.raises(ValueError, match="p and q"):
        solve(graph, p=0.0)
    with pytest.raises(ValueError, match="tol"):
        solve(graph, tol=0.0)


def test_graph_without_movable_groups_converges_at_once():
    net = make_network((3, 2), seed=0)
    result = solve(net.unit_graph(2.0))
    assert result.converged and result.sweeps == 0 and result.log_scales.size == 0
