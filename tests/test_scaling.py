"""Applying log-scales to plain arrays, checked element by element."""

from __future__ import annotations

import numpy as np
import pytest
from networks import make_network

from onnxbalance.scaling import scale_bias, scale_tensor, scale_weight, unit_log_scales
from onnxbalance.solver import Objective
from onnxbalance.unitgraph import FIXED, Layer, UnitGraph, coupling_matrix

RNG = np.random.default_rng(0)


def test_unit_log_scales_maps_fixed_to_zero():
    u = np.array([0.5, -1.0, 2.0])
    groups = np.array([[2, FIXED], [0, 0]])
    np.testing.assert_array_equal(unit_log_scales(u, groups), [[2.0, 0.0], [0.5, 0.5]])
    np.testing.assert_array_equal(unit_log_scales(np.zeros(0), np.full(3, FIXED)), np.zeros(3))


def test_scale_weight_and_bias_match_the_definition():
    w = RNG.normal(size=(4, 3))
    b = RNG.normal(size=4)
    rows, cols = RNG.normal(size=4), RNG.normal(size=3)
    expected = np.array([[w[o, i] * np.exp(rows[o] - cols[i]) for i in range(3)] for o in range(4)])
    np.testing.assert_allclose(scale_weight(w, rows, cols), expected, rtol=1e-15)
    np.testing.assert_allclose(scale_bias(b, rows), b * np.exp(rows), rtol=1e-15)


def test_two_dimensional_column_scales():
    w = RNG.normal(size=(4, 3))
    rows, cols = RNG.normal(size=4), RNG.normal(size=(4, 3))
    expected = w * np.exp(rows[:, None] - cols)
    np.testing.assert_allclose(scale_weight(w, rows, cols), expected, rtol=1e-15)
    # The same weight stored transposed (a MatMul's (in, out) layout): rows on axis 1.
    got = scale_tensor(w.T, row_axis=1, row_log_scales=rows, col_axis=0, col_log_scales=cols)
    np.testing.assert_allclose(got, expected.T, rtol=1e-15)


def test_convolution_kernel_scales_output_and_input_channels():
    w = RNG.normal(size=(5, 3, 2, 2))
    rows, cols = RNG.normal(size=5), RNG.normal(size=3)
    got = scale_tensor(w, row_axis=0, row_log_scales=rows, col_axis=1, col_log_scales=cols)
    for o in range(5):
        for i in range(3):
            np.testing.assert_allclose(got[o, i], w[o, i] * np.exp(rows[o] - cols[i]), rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_dtype_is_kept(dtype):
    w = RNG.normal(size=(3, 2)).astype(dtype)
    got = scale_weight(w, np.array([0.1, 0.2, 0.3]), np.array([0.0, -0.5]))
    assert got.dtype == dtype
    expected = w.astype(np.float64) * np.exp(np.array([0.1, 0.2, 0.3])[:, None] + [0, 0.5])
    np.testing.assert_array_equal(got, expected.astype(dtype))


def test_huge_scales_on_both_sides_do_not_overflow():
    w = np.array([[1e-300, 2.0]])
    with np.errstate(over="raise"):
        got = scale_weight(w, np.array([800.0]), np.array([100.0, 800.0]))
    assert got[0, 1] == 2.0
    assert got[0, 0] == pytest.approx(1e-300 * np.exp(700.0))


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (1.0, 3.0), (0.7, 0.5)])
def test_objective_equals_the_norm_of_the_rescaled_weights(p, q):
    """Objective.value(u) against ||W||_{p,q}^q of the weights rescaled with these helpers."""
    net = make_network((3, 5, 4, 2), seed=4, skips=1, ties=2)
    u = RNG.normal(size=net.n_groups)
    scaled = net.rescaled(u)
    rows: dict[int, np.ndarray] = {}
    for edge in scaled.edges:  # rows of a node gather every edge into it (one unit, one row)
        powered = (np.abs(edge.weight) ** p).sum(axis=1)
        rows[edge.dst] = rows.get(edge.dst, 0) + powered
    expected = sum(((r ** (q / p)).sum() for r in rows.values()), 0.0)
    # The unit graph keeps one layer per edge, so compare with a graph of merged edges.
    merged = make_merged_graph(net, p)
    assert Objective(merged, p, q).value(u) == pytest.approx(expected, rel=1e-12)


def make_merged_graph(net, p):
    """One layer per destination node: the edges into it side by side (a concatenation)."""
    layers = []
    for node in range(1, len(net.sizes)):
        into = [e for e in net.edges if e.dst == node]
        weight = np.concatenate([e.weight for e in into], axis=1)
        col_groups = np.concatenate([net.groups[e.src] for e in into])
        coupling, cols = coupling_matrix(weight, col_groups, p)
        layers.append(Layer(f"node{node}", coupling, net.groups[node], cols))
    return UnitGraph(tuple(layers), net.group_names)
