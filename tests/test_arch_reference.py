"""The independent reference used by the architecture tests is itself right.

F(u) is checked against a direct evaluation of the rescaled weights, its gradient against
finite differences, and the minimiser against the balance condition in_g = out_g
(docs/algorithm.md §3, §6) at its result.
"""

from __future__ import annotations

import numpy as np
import pytest
from arch_reference import FIXED, RefLayer, conv_cols, objective, reference_minimum


def _graph(seed: int):
    """Three layers with 2-D (grouped-conv) columns, a tied group and fixed units."""
    rng = np.random.default_rng(seed)
    rows1 = np.array([0, 1, 2, 3])
    rows2 = np.array([4, 4, 5, 5, 6, FIXED])  # group 4 tied across two rows
    layers = [
        (rng.normal(size=(4, 6)), rows1, np.full((4, 6), FIXED)),
        (rng.normal(size=(6, 2 * 3)), rows2, conv_cols(rows1, 6, 2, 3)),
        (rng.normal(size=(3, 6)), np.full(3, FIXED), np.broadcast_to(rows2, (3, 6)).copy()),
    ]
    return layers, 7


def _direct(layers, u, p, q):
    ue = np.append(u, 0.0)
    total = 0.0
    for w, rows, cols in layers:
        scaled = w * np.exp(ue[rows][:, None] - ue[cols])
        total += np.sum(np.sum(np.abs(scaled) ** p, axis=1) ** (q / p))
    return total


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 2.0), (2.0, 1.0), (3.0, 1.5)])
def test_objective_value_and_gradient(p, q):
    layers, n = _graph(0)
    f = objective(
        [w for w, _, _ in layers], [r for _, r, _ in layers], [c for *_, c in layers], n, p, q
    )
    u = np.random.default_rng(1).uniform(-1, 1, n)
    value, grad = f(u)
    assert value == pytest.approx(_direct(layers, u, p, q), rel=1e-12)
    eps = 1e-6
    numeric = [(f(u + eps * e)[0] - f(u - eps * e)[0]) / (2 * eps) for e in np.eye(n)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 2.0), (2.0, 1.0)])
def test_minimum_is_balanced_and_lower_than_random_points(p, q):
    layers, n = _graph(2)
    refs = tuple(
        RefLayer(f"l{k}", f"w{k}", "out_first", rows, cols)
        for k, (_, rows, cols) in enumerate(layers)
    )
    weights = [w for w, _, _ in layers]
    start, best, u = reference_minimum(refs, weights, n, p, q)
    assert best < start
    _, grad = objective(
        weights, [r.row_groups for r in refs], [r.col_groups for r in refs], n, p, q
    )(u)
    assert np.max(np.abs(grad)) < 1e-7 * best  # in_g = out_g for every group
    rng = np.random.default_rng(3)
    for _ in range(20):
        assert _direct(layers, u + rng.normal(0, 0.1, n), p, q) >= best * (1 - 1e-12)
