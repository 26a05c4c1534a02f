"""Checks shared by the solver tests: a solve result against the independent scipy reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from networks import Edge, Network, make_network

from onnxbalance.solver import SolveResult, solve


def check_against_reference(net: Network, p: float, q: float, result: SolveResult) -> None:
    layers = net.layers()
    pinned = [g.group for g in result.pinned]
    assert result.converged, result.message
    assert np.all(result.log_scales[pinned] == 0.0)
    # The reported norms are the real norms of the rescaled network.
    start = reference.objective(layers, np.zeros(net.n_groups), p, q) ** (1 / q)
    end = reference.objective(layers, result.log_scales, p, q) ** (1 / q)
    assert result.norm_before == pytest.approx(start, rel=1e-12)
    assert result.norm_after == pytest.approx(end, rel=1e-12)
    # Monotone: F never increases from sweep to sweep.
    history = np.array(result.history)
    assert history[0] == result.norm_before and history[-1] == result.norm_after
    assert np.all(np.diff(history) <= 1e-12 * history[:-1])
    # Balanced: in_g = out_g for every live group.
    incoming, outgoing = reference.loads(layers, net.n_groups, result.log_scales, p, q)
    live = (incoming + outgoing) > 0
    live[pinned] = False
    np.testing.assert_allclose(incoming[live], outgoing[live], rtol=1e-6)
    # The reported imbalances are those of the reference loads at the start and at the end.
    for log_scales, reported in (
        (np.zeros(net.n_groups), result.imbalance_before),
        (result.log_scales, result.imbalance_after),
    ):
        incoming, outgoing = reference.loads(layers, net.n_groups, log_scales, p, q)
        gap = np.abs(incoming - outgoing)[live] / (incoming + outgoing)[live]
        assert reported == pytest.approx(gap.max(initial=0.0), rel=1e-6, abs=1e-12)
    # Optimal: the same minimum as L-BFGS on log F with the same pinned groups.
    best = reference.minimise(layers, net.n_groups, p, q, pinned=pinned)
    if result.norm_after < best.norm * (1 - 1e-6):
        # L-BFGS stopped short (weights spanning 60 orders of magnitude): started from our
        # solution, it must find nothing lower
        best = reference.minimise(layers, net.n_groups, p, q, pinned=pinned, x0=result.log_scales)
    assert result.norm_after == pytest.approx(best.norm, rel=1e-6)


def tied_network(tie: bool) -> Network:
    net = make_network((3, 4, 4, 2), seed=11)
    if not tie:
        return net
    groups = list(net.groups)
    groups[2] = groups[2].copy()
    groups[2][1] = groups[1][0]  # units h1[0] and h2[1] share one factor
    _, compact = np.unique(np.concatenate(groups[1:3]), return_inverse=True)
    groups[1], groups[2] = compact[:4], compact[4:]
    return Network(net.sizes, net.edges, net.biases, tuple(groups), 7)


def spanning_magnitudes_network(seed: int, dag: bool) -> Network:
    """A small network whose weights are scaled by 10^U(-30, 30), entry by entry."""
    net = make_network((3, 4, 4, 3, 2), seed=seed, skips=2 if dag else 0)
    rng = np.random.default_rng(seed)
    edges = tuple(
        Edge(e.src, e.dst, e.weight * 10.0 ** rng.uniform(-30, 30, size=e.weight.shape))
        for e in net.edges
    )
    return Network(net.sizes, edges, net.biases, net.groups, net.n_groups)


def alternating_magnitudes_network() -> Network:
    """Layers of magnitude 1e30 and 1e-30 in turn: the optimum has scales near 1e-30."""
    net = make_network((3, 5, 5, 5, 2), seed=5)
    factors = [1e30, 1e-30, 1e30, 1e-30]
    edges = tuple(Edge(e.src, e.dst, e.weight * f) for e, f in zip(net.edges, factors, strict=True))
    return Network(net.sizes, edges, net.biases, net.groups, net.n_groups)


def assert_same_minimum(found_graph, expected_graph, method: str) -> None:
    """Both unit graphs (the same weights, stored two ways) solve to the same minimum, at the
    same points, in the same number of passes and sweeps (p = q = 2, tol 1e-9)."""
    options = {"method": method, "tol": 1e-9, "max_sweeps": 400 if method == "mu" else 10_000}
    found = solve(found_graph, 2.0, 2.0, **options)
    expected = solve(expected_graph, 2.0, 2.0, **options)
    assert expected.norm_after < expected.norm_before * 0.999  # there was work to do
    np.testing.assert_allclose(found.norm_after, expected.norm_after, rtol=1e-12)
    np.testing.assert_allclose(found.log_scales, expected.log_scales, rtol=0, atol=1e-9)
    assert (found.passes, found.sweeps) == (expected.passes, expected.sweeps)
