"""The Newton solver (method "newton") against the independent scipy minimiser and Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from networks import Edge, Network, dead_and_cut_off_network, exponents, make_network, networks
from solver_checks import (
    alternating_magnitudes_network,
    check_against_reference,
    spanning_magnitudes_network,
    tied_network,
)

from onnxbalance.solver import methods, newton, solve
from onnxbalance.solver.curvature import Curvature, Workspace, aggregates, evaluate
from onnxbalance.solver.objective import Objective
from onnxbalance.unitgraph import FIXED

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TIGHT = {"tol": 1e-10, "max_sweeps": 10_000, "method": "newton"}


@PROPERTY
@given(net=networks(dag=False), p=exponents, q=exponents)
def test_layered_networks_reach_the_scipy_minimum(net, p, q):
    result = solve(net.unit_graph(p), p, q, **TIGHT)
    check_against_reference(net, p, q, result)
    assert result.solver == "newton"
    # Two passes for the start and for every accepted step but the coarse one, which for
    # r = 1 follows from the start's loads without a pass.
    assert result.passes >= 2 * result.sweeps


@PROPERTY
@given(net=networks(dag=True, zeros=True, ties=True), p=exponents, q=exponents)
def test_dag_networks_with_zeros_and_ties_reach_the_scipy_minimum(net, p, q):
    check_against_reference(net, p, q, solve(net.unit_graph(p), p, q, **TIGHT))


@settings(max_examples=20, deadline=None)
@given(
    net=networks(dag=True, zeros=True, ties=True, max_hidden=4, max_width=6),
    p=exponents,
    q=exponents,
)
def test_newton_and_algorithm_1_agree(net, p, q):
    graph = net.unit_graph(p)
    fast = solve(graph, p, q, tol=1e-10, method="newton")
    slow = solve(graph, p, q, tol=1e-10, max_sweeps=500_000, method="mu")
    assert fast.converged and slow.converged
    assert fast.pinned == slow.pinned
    assert fast.norm_before == pytest.approx(slow.norm_before, rel=1e-14)
    assert fast.norm_after == pytest.approx(slow.norm_after, rel=1e-9)
    # Where F is strictly convex the minimiser is unique: the scales agree too.
    np.testing.assert_allclose(np.exp(fast.log_scales), np.exp(slow.log_scales), rtol=1e-3)


def test_dead_and_cut_off_groups_stay_at_one_and_the_rest_converges():
    net = dead_and_cut_off_network()
    result = solve(net.unit_graph(2.0), 2.0, 2.0, **TIGHT)
    assert {g.group for g in result.pinned} == {0, 1, 2}
    check_against_reference(net, 2.0, 2.0, result)
    assert np.all(result.log_scales[[3, 4, 5]] != 0.0)
    x = np.random.default_rng(1).normal(size=(8, 3))
    np.testing.assert_allclose(net.rescaled(result.log_scales).forward(x), net.forward(x), 1e-10)


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 3.0), (3.0, 1.0), (0.5, 4.0), (4.0, 0.5)])
def test_tied_units_share_one_factor_and_match_scipy(p, q):
    tied, free = tied_network(True), tied_network(False)
    result = solve(tied.unit_graph(p), p, q, **TIGHT)
    check_against_reference(tied, p, q, result)
    unconstrained = reference.minimise(free.layers(), free.n_groups, p, q)
    assert result.norm_after > unconstrained.norm * (1 + 1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), p=exponents, q=exponents, dag=st.booleans())
def test_extreme_magnitudes_do_not_overflow(seed, p, q, dag):
    extreme = spanning_magnitudes_network(seed, dag)
    with np.errstate(over="raise", under="ignore"):
        result = solve(extreme.unit_graph(p), p, q, **TIGHT)
    assert np.all(np.isfinite(result.log_scales))
    check_against_reference(extreme, p, q, result)


def test_extreme_scales_between_layers():
    extreme = alternating_magnitudes_network()
    for p, q in [(4.0, 4.0), (0.5, 4.0), (4.0, 0.5), (0.5, 0.5)]:
        with np.errstate(over="raise"):
            result = solve(extreme.unit_graph(p), p, q, **TIGHT)
        assert np.abs(result.log_scales).max() > 30
        check_against_reference(extreme, p, q, result)


def test_deep_network_needs_far_fewer_passes_than_algorithm_1():
    net = make_network((8,) + (16,) * 16 + (4,), seed=3, paper_init=True)
    graph = net.unit_graph(2.0)
    fast = solve(graph, method="newton")
    slow = solve(graph, method="mu", max_sweeps=100_000)
    assert fast.converged and slow.converged
    assert fast.passes * 10 < slow.passes
    assert fast.norm_after <= slow.norm_after * (1 + 1e-9)


def test_failed_newton_directions_fall_back_to_algorithm_1_and_stay_monotone(monkeypatch):
    """With no Hessian model and every CG direction pointing uphill, only the guarded
    Algorithm-1 steps remain."""

    def uphill(curvature, rhs, rtol, max_iter):
        return -rhs, 1

    monkeypatch.setattr(newton, "_conjugate_gradients", uphill)
    monkeypatch.setattr(Curvature, "model", lambda self: None)
    net = make_network((3, 5, 4, 2), seed=4)
    result = solve(net.unit_graph(2.0), 2.0, 2.0, tol=1e-8, method="newton")
    history = np.array(result.history)
    assert result.converged
    assert result.sweeps > 20  # Algorithm 1's pace: the fallback did the work
    assert np.all(np.diff(history) <= newton.resolution(history[0] ** 2) * history[:-1])
    best = reference.minimise(net.layers(), net.n_groups, 2.0, 2.0)
    assert result.norm_after == pytest.approx(best.norm, rel=1e-8)


def test_max_sweeps_reached_is_reported_not_raised():
    net = make_network((3, 6, 6, 6, 2), seed=2)
    progress = []
    result = solve(
        net.unit_graph(2.0),
        tol=1e-14,
        max_sweeps=2,
        method="newton",
        progress=lambda *a: progress.append(a),
    )
    assert not result.converged and result.sweeps == 2
    assert "did not converge" in result.message
    assert [norm for _, norm in progress] == list(result.history[1:])


def _random_point(p: float, q: float, seed: int):
    net = make_network((4, 5, 6, 3), seed=seed, skips=1, ties=1)
    objective = Objective(net.unit_graph(p), p, q)
    workspace = Workspace(objective, np.ones(objective.n_groups, dtype=bool))
    u = np.random.default_rng(seed).normal(0.0, 0.5, objective.n_groups)
    return objective, workspace, u


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 3.0), (3.0, 1.0), (0.5, 4.0), (4.0, 0.5)])
def test_hessian_products_match_differences_of_the_independent_gradient(p, q):
    objective, workspace, u = _random_point(p, q, seed=int(10 * p + q))
    net = make_network((4, 5, 6, 3), seed=int(10 * p + q), skips=1, ties=1)
    curvature = Curvature(workspace, evaluate(workspace, u))
    v = np.random.default_rng(1).normal(size=u.size)

    def gradient(x):
        incoming, outgoing = reference.loads(net.layers(), net.n_groups, x, p, q)
        return q * (incoming - outgoing)

    step = 1e-5
    expected = (gradient(u + step * v) - gradient(u - step * v)) / (2 * step)
    np.testing.assert_allclose(
        curvature.matvec(v), expected, rtol=1e-5, atol=1e-6 * abs(expected).max()
    )


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (0.5, 4.0), (4.0, 0.5)])
def test_coarse_matrix_and_minimiser_are_exact(p, q):
    objective, workspace, u = _random_point(p, q, seed=3)
    curvature = Curvature(workspace, evaluate(workspace, u))
    curvature.build_coarse()
    n = u.size
    hessian = np.stack([curvature.matvec(np.eye(n)[k]) for k in range(n)], axis=1)
    aggregate = aggregates(objective, workspace.movable)
    prolong = np.zeros((n, aggregate.max() + 1))
    prolong[np.arange(n), aggregate] = 1.0
    coarse = prolong.T @ hessian @ prolong
    assert np.all(np.linalg.eigvalsh(coarse) > 0)
    factored = curvature._coarse_factor
    assert factored.positive == coarse.shape[0]
    for vector in np.eye(coarse.shape[0]):
        np.testing.assert_allclose(factored.solve(coarse @ vector), vector, atol=1e-4)
    shift = curvature.coarse_minimiser(rtol=0.0)
    coarse_gradient = prolong.T @ objective.loads(u + shift).gradient(q)
    assert np.abs(coarse_gradient).max() < 1e-6 * objective.value(u)
    assert objective.value(u + shift) < objective.value(u)


def test_newton_is_the_default_method():
    graph = make_network((3, 4, 2), seed=0).unit_graph(2.0)
    assert methods()[0] == "newton"
    assert solve(graph).solver == "newton"


@settings(max_examples=40, deadline=None)
@given(
    net=networks(dag=True, zeros=True, ties=True),
    p=exponents,
    q=exponents,
    spread=st.sampled_from([0.1, 3.0, 60.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_evaluate_matches_the_reference_loads(net, p, q, spread, seed):
    u = np.random.default_rng(seed).normal(scale=spread, size=net.n_groups)
    objective = Objective(net.unit_graph(p), p, q)
    point = evaluate(Workspace(objective, np.ones(net.n_groups, dtype=bool)), u)
    incoming, outgoing = reference.loads(net.layers(), net.n_groups, u, p, q)
    assert point.value == pytest.approx(reference.objective(net.layers(), u, p, q), rel=1e-11)
    np.testing.assert_allclose(point.incoming, incoming, rtol=1e-11, atol=1e-300)
    np.testing.assert_allclose(point.outgoing, outgoing, rtol=1e-11, atol=1e-300)


def test_evaluate_is_exact_where_a_load_overflows():
    """Far out, rho^r of one row overflows (F is infinite) while the outgoing loads of its
    columns, rho^(r-1) c e^(p (u_o - u_i)), are finite up to 2e301: the plain products overflow
    on the way, the log-domain evaluation does not. (A case hypothesis found.)"""
    column = np.array([[-0.132], [0.640], [0.105], [-0.536], [0.362]])
    weights = [
        column,
        np.array([[1.304, 0.947, -0.704, -1.265, -0.623]]),
        np.array([[0.0413]]),
        np.array([[-2.325, -0.219, -1.246, -0.732, -0.544]]),
    ]
    net = Network(
        (1, 5, 1, 1),
        tuple(
            Edge(src, dst, w)
            for (src, dst), w in zip(((0, 1), (1, 2), (2, 3), (1, 3)), weights, strict=True)
        ),
        (
            np.zeros(0),
            np.array([-0.316, 0.412, 1.043, -0.129, 1.366]),
            np.array([-0.665]),
            np.array([0.352]),
        ),
        (np.array([FIXED]), np.arange(5), np.array([5]), np.array([FIXED])),
        6,
    )
    p, q = 1.0, 3.75
    u = np.random.default_rng(4265746).normal(scale=60.0, size=6)
    point = evaluate(Workspace(Objective(net.unit_graph(p), p, q), np.ones(6, dtype=bool)), u)
    incoming, outgoing = reference.loads(net.layers(), 6, u, p, q)
    assert point.value == np.inf and incoming[5] == np.inf
    finite = np.isfinite(outgoing)
    assert outgoing[finite].max() > 1e300
    np.testing.assert_allclose(point.outgoing, outgoing, rtol=1e-11, atol=1e-300)
    np.testing.assert_allclose(point.incoming, incoming, rtol=1e-11, atol=1e-300)


def test_evaluate_redoes_a_row_lost_to_underflow():
    """The case of test_objective: one row sits e^900 below another column of its layer."""
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
    point = evaluate(Workspace(objective, np.ones(5, dtype=bool)), u)
    incoming, outgoing = reference.loads(net.layers(), net.n_groups, u, 4.0, 1.0)
    assert outgoing[4] > 0
    np.testing.assert_allclose(point.outgoing, outgoing, rtol=1e-12)
    np.testing.assert_allclose(point.incoming, incoming, rtol=1e-12)


@settings(max_examples=10, deadline=None)
@given(net=networks(dag=True, ties=True), p=exponents, q=exponents)
def test_balancing_a_balanced_network_costs_one_evaluation(net, p, q):
    first = solve(net.unit_graph(p), p, q, tol=1e-12, method="newton")
    assert first.converged
    again = solve(net.rescaled(first.log_scales).unit_graph(p), p, q, tol=1e-6, method="newton")
    assert again.converged and again.sweeps == 0 and again.passes == 2
    assert np.all(again.log_scales == 0.0)
    assert again.norm_after == pytest.approx(first.norm_after, rel=1e-12)
