"""The sparse symmetric factorization of the solver's per-layer systems, checked against
numpy's dense eigendecomposition and solve: the inertia the Newton solver's checks rely on and
the solutions, on the LDL^T path (forced with dense_limit=0) and through the Hessian model of a
network deeper than the dense limit."""

from __future__ import annotations

import numpy as np
import pytest
from networks import make_network

from onnxbalance.solver import sparse
from onnxbalance.solver.curvature import Curvature, Workspace, evaluate
from onnxbalance.solver.objective import Objective


def _banded(size: int, seed: int, offsets=(1, 3), zero_diagonal_every: int = 0) -> np.ndarray:
    """A random symmetric indefinite matrix with these bands (a layered network's pattern)."""
    rng = np.random.default_rng(seed)
    matrix = np.diag(3.0 * rng.normal(size=size))
    for offset in offsets:
        band = rng.normal(size=size - offset)
        matrix += np.diag(band, offset) + np.diag(band, -offset)
    if zero_diagonal_every:
        matrix[np.arange(0, size, zero_diagonal_every), np.arange(0, size, zero_diagonal_every)] = 0
    return matrix


def _coordinates(matrix: np.ndarray):
    rows, cols = np.nonzero(matrix)
    return rows, cols, matrix[rows, cols]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("zero_diagonal_every", [0, 2, 7])
def test_ldl_has_the_inertia_and_the_solution_of_the_dense_matrix(seed, zero_diagonal_every):
    matrix = _banded(120, seed, zero_diagonal_every=zero_diagonal_every)
    factored = sparse.factor(120, *_coordinates(matrix), dense_limit=0)
    assert factored is not None
    eigenvalues = np.linalg.eigvalsh(matrix)
    assert factored.positive == np.count_nonzero(eigenvalues > 0)
    assert factored.negative == np.count_nonzero(eigenvalues < 0)
    rhs = np.random.default_rng(seed).normal(size=120)
    solution = factored.solve(rhs)
    # backward error (random matrices may be ill-conditioned: compare residuals, not solutions)
    scale = np.abs(matrix).max() * np.abs(solution).max()
    assert np.abs(matrix @ solution - rhs).max() <= 1e-10 * scale


def test_duplicate_entries_add_up_on_both_paths():
    matrix = _banded(40, 11)
    rows, cols, values = _coordinates(matrix)
    doubled = (np.tile(rows, 2), np.tile(cols, 2), np.tile(values / 2, 2))
    rhs = np.arange(40.0)
    for limit in (0, 100):
        factored = sparse.factor(40, *doubled, dense_limit=limit)
        np.testing.assert_allclose(factored.solve(rhs), np.linalg.solve(matrix, rhs), rtol=1e-8)


@pytest.mark.parametrize("limit", [0, 100])
def test_singular_or_not_finite_matrices_are_refused(limit):
    singular = _banded(30, 2)
    singular[:, 5] = singular[5, :] = 0.0
    assert sparse.factor(30, *_coordinates(singular), dense_limit=limit) is None
    poisoned = _banded(30, 3)
    poisoned[4, 4] = np.nan
    assert sparse.factor(30, *_coordinates(poisoned), dense_limit=limit) is None


def test_deep_network_model_matches_the_dense_one(monkeypatch):
    """A 40-layer chain has 80 vectors in its Hessian model's capacitance matrix, beyond the
    dense limit: the model built by LDL^T solves like the one built by eigendecomposition."""
    net = make_network((3,) + (4,) * 40 + (2,), seed=5)
    p, q = 2.0, 3.0
    objective = Objective(net.unit_graph(p), p, q)
    workspace = Workspace(objective, np.ones(objective.n_groups, dtype=bool))
    u = np.random.default_rng(2).normal(scale=0.3, size=objective.n_groups)
    point = evaluate(workspace, u)
    rhs = np.random.default_rng(3).normal(size=objective.n_groups)
    assert workspace.layout.size > sparse.DENSE_LIMIT
    by_ldl = Curvature(workspace, point).model()
    monkeypatch.setattr(sparse, "DENSE_LIMIT", 10**6)
    by_eigh = Curvature(workspace, point).model()
    assert by_ldl is not None and by_eigh is not None
    np.testing.assert_allclose(by_ldl.solve(rhs), by_eigh.solve(rhs), rtol=1e-7, atol=1e-12)


def test_an_overflowing_coarse_trial_is_quiet_and_infinite():
    """r = 1 coarse terms at a point far enough to overflow: the value is inf (the line search
    rejects the trial) and numpy says nothing (inf - inf in the gradient warned before; the
    fuzz found it on a weight of -1.8e19)."""
    from onnxbalance.solver.curvature import _exponential_terms

    # a chain of three aggregates: the middle one gains an inf term from each side at z below
    load = np.array([1.0, 2.0])
    share = np.array([0.5, 1.0])
    terms = _exponential_terms(load, share, np.array([0, 1]), np.array([1, 2]), 3, 2.0)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value, gradient, _ = terms(np.array([800.0, 400.0, 0.0]))
        finite_value, finite_gradient, _ = terms(np.zeros(3))
    assert value == np.inf
    assert np.isfinite(finite_value) and np.isfinite(finite_gradient).all()
