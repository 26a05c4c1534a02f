"""The pieces that make the Newton solver fast, each against an independent or slower path:
the coupling summary, the rank-one Hessian model, the pass-free coarse solve and coarse point,
and the float32 evaluations of the first phase."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from networks import exponents, make_network, networks

from onnxbalance.solver import couplings, newton, solve
from onnxbalance.solver import workspace as workspace_module
from onnxbalance.solver.couplings import summarise, summarise_graph
from onnxbalance.solver.curvature import Curvature, Workspace, evaluate
from onnxbalance.solver.liveness import DEAD_INCOMING, DEAD_OUTGOING, find_pinned
from onnxbalance.solver.objective import Objective
from onnxbalance.unitgraph import FIXED, Layer, UnitGraph

PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _workspace(net, p, q):
    objective = Objective(net.unit_graph(p), p, q)
    return objective, Workspace(objective, np.ones(objective.n_groups, dtype=bool))


def test_summary_of_positive_matrix_needs_no_float64_inspection():
    matrix = np.array([[1e-3, 2.0], [3.0, 4e5]])
    summary = summarise("fc", matrix)
    assert summary.positive
    assert summary.single is not None and summary.single.dtype == np.float32
    np.testing.assert_allclose(summary.single, matrix, rtol=1e-7)
    # bounded by the largest row sum: at least the largest |log c|, at most that of 4e5 + 3
    assert np.log(4e5) <= summary.log_range <= np.log(4e5 + 3) + 1e-5


@pytest.mark.parametrize(
    ("entry", "message"),
    [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-1e-50, "negative")],
)
def test_summary_rejects_what_float32_hides(entry, message):
    """-1e-50 rounds to -0.0 and inf/NaN poison the float32 extremes: the float64 check runs."""
    matrix = np.ones((2, 3))
    matrix[1, 2] = entry
    with pytest.raises(ValueError, match=message):
        summarise("fc7", matrix)


def test_summary_of_zeros_and_huge_entries_keeps_float64_facts():
    zeros = summarise("a", np.array([[0.0, 1.0], [1e-60, 2.0]]))
    assert not zeros.positive and zeros.single is None  # 1e-60 is below float32: no copy
    assert zeros.log_range == pytest.approx(60 * np.log(10))
    huge = summarise("b", np.array([[1e300, 1.0]]))  # beyond float32, still a valid coupling
    assert huge.positive and huge.single is None  # every entry > 0, but no float32 copy
    assert huge.log_range == pytest.approx(300 * np.log(10))


@pytest.mark.parametrize("single", [True, False])
def test_summary_of_a_matrix_over_several_chunks_finds_zeros_and_tiny_entries(single):
    """A zero and an entry below float32's range in different 4 MB chunks of the copy: the
    smallest positive entry is the float64 one, and a negative entry that float32 rounds to
    -0.0 in the last chunk is still found (with or without a copy)."""
    rng = np.random.default_rng(0)
    matrix = rng.random((1500, 1000)) + 0.5  # 1.5e6 entries: two chunks of the float32 copy
    matrix[10, 3] = 0.0
    matrix[1400, 7] = 1e-60
    summary = summarise("big", matrix, single)
    assert not summary.positive
    # every column still sums to about 1000: the copy may stand in for the products
    assert (summary.single is not None) == single
    assert summary.log_range == pytest.approx(60 * np.log(10), rel=1e-6)
    np.testing.assert_allclose(summary.row_sums, matrix.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(summary.col_sums, matrix.sum(axis=0), rtol=1e-12)
    matrix[1499, 999] = -1e-50
    with pytest.raises(ValueError, match="negative"):
        summarise("big", matrix, single)


@pytest.mark.parametrize("check", ["summarise_graph", "check_graph"])
@pytest.mark.parametrize(
    ("rows", "cols", "message"),
    [
        ([0, 1, 2], [FIXED], r"'b': row groups have shape \(3,\), expected \(2,\)"),
        ([0, 1], [FIXED, 0], r"'b': column groups have shape \(2,\), expected \(1,\)"),
        ([0, 5], [FIXED], r"'b': row group index out of range"),
        ([0, 1], [-2], r"'b': column group index out of range"),
    ],
)
def test_group_arrays_that_do_not_fit_are_refused_naming_the_layer(check, rows, cols, message):
    good = Layer("a", np.ones((2, 1)), np.array([0, 1]), np.array([FIXED]))
    bad = Layer("b", np.ones((2, 1)), np.array(rows), np.array(cols))
    graph = UnitGraph((good, bad), ("g0", "g1"))
    with pytest.raises(ValueError, match=message):
        getattr(couplings, check)(graph)


def test_liveness_of_positive_layers_without_products_matches_the_general_path():
    """Layer 2 is fed only by a group that no input reaches: positive couplings alone must not
    make its rows reachable."""
    rng = np.random.default_rng(0)
    layers = (
        Layer("in", rng.random((2, 1)) + 0.1, np.array([0, 1]), np.array([FIXED])),
        Layer("loop", rng.random((1, 1)) + 0.1, np.array([2]), np.array([2])),
        Layer("next", rng.random((2, 1)) + 0.1, np.array([3, 4]), np.array([2])),
        Layer("out", rng.random((1, 4)) + 0.1, np.array([FIXED]), np.array([0, 1, 3, 4])),
    )
    graph = UnitGraph(layers, tuple(f"g{k}" for k in range(5)))
    couplings = summarise_graph(graph)
    assert all(c.positive for c in couplings)
    fast = find_pinned(graph, couplings)
    general = find_pinned(
        graph, tuple(dataclasses.replace(c, single=None, positive=False) for c in couplings)
    )
    assert fast == general
    assert {g.group for g in fast} == {2, 3, 4}


class _NoProducts:
    """Stands in for a coupling matrix that must not be multiplied."""

    T = property(lambda self: self)

    def __matmul__(self, other):
        raise AssertionError("a product was taken")


def test_liveness_takes_no_product_where_every_source_is_reached():
    """Zeros in every layer, but each layer's sources are all reached: the summary's row and
    column sums decide, as the products would (group 3 has no non-zero outgoing coupling)."""
    layers = (
        Layer("in", np.array([[1.0], [0.0]]), np.array([0, 1]), np.array([FIXED])),
        Layer("mid", np.array([[1.0, 0.0], [0.5, 2.0]]), np.array([2, 3]), np.array([0, 1])),
        Layer("out", np.array([[1.0, 0.0]]), np.array([FIXED]), np.array([2, 3])),
    )
    graph = UnitGraph(layers, tuple(f"g{k}" for k in range(4)))
    summaries = summarise_graph(graph)
    assert not any(c.positive for c in summaries)
    general = find_pinned(graph, summaries)
    assert [(g.group, g.reason) for g in general] == [(1, DEAD_INCOMING), (3, DEAD_OUTGOING)]
    blind = tuple(dataclasses.replace(c, matrix=_NoProducts()) for c in summaries)
    assert find_pinned(graph, blind) == general


RANDOM_POINT = given(
    net=networks(dag=True, zeros=True, ties=True), p=exponents, q=exponents, seed=st.integers(0, 99)
)


def _random_point(net, p, q, seed):
    objective, workspace = _workspace(net, p, q)
    return workspace, np.random.default_rng(seed).normal(scale=0.3, size=net.n_groups)


@PROPERTY
@RANDOM_POINT
def test_float32_evaluation_steers_within_float32_accuracy(net, p, q, seed):
    workspace, u = _random_point(net, p, q, seed)
    fast = evaluate(workspace, u, fast=True)
    exact = evaluate(workspace, u)
    assert exact.exact
    assert fast.exact == (not workspace.has_single)
    incoming, outgoing = reference.loads(net.layers(), net.n_groups, u, p, q)
    np.testing.assert_allclose(fast.incoming, incoming, rtol=1e-4, atol=1e-300)
    np.testing.assert_allclose(fast.outgoing, outgoing, rtol=1e-4, atol=1e-300)


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 3.0), (3.0, 1.0), (0.5, 4.0)])
def test_lowrank_model_is_exact_on_per_layer_constant_vectors(p, q):
    """On an MLP the model has H's row and column sums in every layer block, so M v = H v for
    a vector constant on one layer and zero elsewhere (exact for r = 1, where the column block
    is diagonal; close otherwise). Checked through M^-1 H v = v with H from matvec."""
    net = make_network((3, 6, 5, 4, 2), seed=7)
    objective, workspace = _workspace(net, p, q)
    u = np.random.default_rng(1).normal(scale=0.2, size=net.n_groups)
    curvature = Curvature(workspace, evaluate(workspace, u))
    model = curvature.model()
    assert model is not None
    for groups in (np.arange(0, 6), np.arange(6, 11), np.arange(11, 15)):
        v = np.zeros(net.n_groups)
        v[groups] = 1.0
        back = model.solve(curvature.matvec(v))
        tolerance = 1e-6 if p == q else 0.5  # matvec runs on the float32 copies
        np.testing.assert_allclose(back, v, atol=tolerance)


@PROPERTY
@RANDOM_POINT
def test_lowrank_model_is_positive_definite_when_returned(net, p, q, seed):
    """M is positive definite on the groups F depends on. A group whose couplings are all zero
    has no curvature (H's row and column are zero there): M^-1 leaves it at zero."""
    workspace, u = _random_point(net, p, q, seed)
    model = Curvature(workspace, evaluate(workspace, u)).model()
    if model is None:
        return
    curved = model.inverse_diagonal > 0
    rhs = np.random.default_rng(seed + 1).normal(size=(5, net.n_groups))
    for vector in rhs:
        solved = model.solve(vector)
        assert np.all(solved[~curved] == 0.0)
        if curved.any():
            assert vector[curved] @ solved[curved] > 0


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 3.0), (0.5, 4.0)])
def test_vectorised_coarse_solve_matches_the_block_product_one(p, q):
    net = make_network((4, 7, 6, 5, 3), seed=int(p * 10 + q))
    objective, workspace = _workspace(net, p, q)
    assert workspace.simple is not None
    u = np.random.default_rng(2).normal(scale=0.5, size=net.n_groups)
    point = evaluate(workspace, u)
    fast = Curvature(workspace, point).coarse_minimiser(rtol=0.0)
    passes = objective.passes
    workspace.simple = None  # force build_coarse's block products
    slow = Curvature(workspace, point).coarse_minimiser(rtol=0.0)
    assert objective.passes > passes
    # the block products run on the float32 copies: agreement to their precision
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-9)


def test_coarse_point_without_a_pass_equals_an_evaluation():
    net = make_network((4, 7, 6, 5, 3), seed=3)
    objective, workspace = _workspace(net, 2.0, 2.0)
    point = evaluate(workspace, np.random.default_rng(3).normal(scale=0.5, size=net.n_groups))
    curvature = Curvature(workspace, point)
    shift = curvature.coarse_minimiser()
    passes = objective.passes
    shifted = curvature.shifted_point()
    assert objective.passes == passes and shifted is not None and shifted.exact
    again = evaluate(workspace, point.log_scales + shift)
    assert shifted.value == pytest.approx(again.value, rel=1e-13)
    np.testing.assert_allclose(shifted.incoming, again.incoming, rtol=1e-12)
    np.testing.assert_allclose(shifted.outgoing, again.outgoing, rtol=1e-12)
    for mine, theirs in zip(shifted.layers, again.layers, strict=True):
        np.testing.assert_allclose(mine.moving, theirs.moving, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(mine.col_out, theirs.col_out, rtol=1e-12)


def test_float32_phase_ends_in_a_float64_certified_step():
    """A paper-width MLP: the float32 phase runs, its end point is re-evaluated in float64,
    and the reported norms are the exact ones of the rescaled network."""
    net = make_network((40, 300, 200, 100, 10), seed=5, paper_init=True)
    graph = net.unit_graph(2.0)
    result = solve(graph, 2.0, 2.0, tol=1e-6)
    slow = solve(graph, 2.0, 2.0, tol=1e-10, method="mu", max_sweeps=100_000)
    assert result.converged and slow.converged
    end = reference.objective(net.layers(), result.log_scales, 2.0, 2.0) ** 0.5
    assert result.norm_after == pytest.approx(end, rel=1e-12)
    assert result.norm_after == pytest.approx(slow.norm_after, rel=1e-9)
    assert np.all(np.diff(result.history) < 0)
    incoming, outgoing = reference.loads(net.layers(), net.n_groups, result.log_scales, 2.0, 2.0)
    assert np.max(np.abs(np.expm1(np.log(outgoing / incoming) / 8))) < 1e-6


def test_misleading_float32_phase_is_caught_by_the_float64_certification(monkeypatch):
    """Float32 points that report balanced loads from the first trial on end the phase at once;
    the float64 check then finds the point unbalanced and the solve goes on in float64 to the
    same minimum, every accepted step lowering F."""
    real = newton.evaluate

    def lying(workspace, log_scales, fast=False):
        point = real(workspace, log_scales, fast)
        if point.exact:
            return point
        return dataclasses.replace(point, value=0.5 * point.value, outgoing=point.incoming)

    monkeypatch.setattr(newton, "evaluate", lying)
    net = make_network((20, 60, 50, 40, 5), seed=8, paper_init=True)
    result = solve(net.unit_graph(2.0), 2.0, 2.0, tol=1e-8)
    assert result.converged
    assert np.all(np.diff(result.history) <= 1e-12 * np.array(result.history[:-1]))
    best = reference.minimise(net.layers(), net.n_groups, 2.0, 2.0)
    assert result.norm_after == pytest.approx(best.norm, rel=1e-8)


def test_certification_needs_a_lower_norm_or_a_smaller_imbalance():
    net = make_network((4, 6, 5, 3), seed=9)
    objective, workspace = _workspace(net, 2.0, 2.0)
    start = evaluate(workspace, np.zeros(net.n_groups))
    better = evaluate(workspace, Curvature(workspace, start).coarse_minimiser())
    assert better.value < start.value
    assert newton._certifies(better, start, workspace)
    assert not newton._certifies(start, better, workspace)
    assert not newton._certifies(start, start, workspace)  # same F, same imbalance


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 3.0)])
def test_small_layers_scatter_like_their_products(p, q, monkeypatch):
    """Layers of at most SMALL_LAYER couplings are multiplied by one scatter over all of them;
    with the limit at zero every layer takes its own BLAS products: same point."""
    net = make_network((3, 5, 4, 40, 30, 2), seed=4, skips=2, zero_fraction=0.2)
    u = np.random.default_rng(5).normal(scale=0.5, size=net.n_groups)
    scattered = evaluate(_workspace(net, p, q)[1], u)
    monkeypatch.setattr(workspace_module, "SMALL_LAYER", 0)
    workspace = _workspace(net, p, q)[1]
    assert not workspace.rows.small.values.size
    multiplied = evaluate(workspace, u)
    assert scattered.value == pytest.approx(multiplied.value, rel=1e-14)
    np.testing.assert_allclose(scattered.incoming, multiplied.incoming, rtol=1e-13)
    np.testing.assert_allclose(scattered.outgoing, multiplied.outgoing, rtol=1e-13)
