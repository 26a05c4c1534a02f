"""The contract: coupling matrices aggregated over raw columns, checked by brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxbalance.unitgraph import FIXED, LinearUnits, ModelUnits, coupling_matrix


def brute_force(weight, col_groups, p):
    col_groups = np.asarray(col_groups)
    groups = sorted(set(col_groups.ravel().tolist()))
    c = np.zeros((weight.shape[0], len(groups)))
    for o in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            g = col_groups[o, j] if col_groups.ndim == 2 else col_groups[j]
            c[o, groups.index(g)] += abs(weight[o, j]) ** p
    return c, np.array(groups)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 8),
    n_groups=st.integers(1, 4),
    two_d=st.booleans(),
    p=st.floats(0.5, 4.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_coupling_matrix_matches_brute_force(rows, cols, n_groups, two_d, p, seed):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(rows, cols))
    shape = (rows, cols) if two_d else (cols,)
    col_groups = rng.integers(FIXED, n_groups, size=shape)
    coupling, groups = coupling_matrix(weight, col_groups, p)
    expected, expected_groups = brute_force(weight, col_groups, p)
    np.testing.assert_array_equal(groups, expected_groups)
    np.testing.assert_allclose(coupling, expected, rtol=1e-12)
    assert coupling.dtype == np.float64


def test_fixed_columns_collapse_into_one():
    weight = np.array([[1.0, 2.0, -3.0, 4.0]])
    coupling, groups = coupling_matrix(weight, np.array([FIXED, 0, FIXED, FIXED]), 2.0)
    assert groups.tolist() == [FIXED, 0]
    assert coupling.tolist() == [[1.0 + 9.0 + 16.0, 4.0]]


def test_flatten_runs_and_distinct_columns():
    weight = np.arange(1.0, 7.0).reshape(1, 6)
    coupling, groups = coupling_matrix(weight, np.array([0, 0, 0, 1, 1, 1]), 1.0)
    assert groups.tolist() == [0, 1] and coupling.tolist() == [[6.0, 15.0]]
    coupling, groups = coupling_matrix(weight, np.arange(6), 1.0)
    assert groups.tolist() == list(range(6)) and coupling.tolist() == [[1, 2, 3, 4, 5, 6]]


def test_grouped_convolution_columns_depend_on_the_row():
    # Two output channels, each seeing its own input channel through two taps.
    weight = np.array([[1.0, 2.0], [3.0, 4.0]])
    col_groups = np.array([[0, 0], [1, 1]])
    coupling, groups = coupling_matrix(weight, col_groups, 2.0)
    assert groups.tolist() == [0, 1]
    assert coupling.tolist() == [[5.0, 0.0], [0.0, 25.0]]


def test_model_units_build_the_unit_graph_for_p():
    layer = LinearUnits(
        "fc", np.array([[1.0, -2.0], [0.5, 0.0]]), np.array([0, 1]), np.array([FIXED, FIXED])
    )
    graph = ModelUnits((layer,), ("a", "b")).unit_graph(3.0)
    assert graph.n_groups == 2 and graph.group_names == ("a", "b")
    (built,) = graph.layers
    assert built.name == "fc" and built.row_groups.dtype == np.int64
    assert built.col_groups.tolist() == [FIXED]
    np.testing.assert_allclose(built.coupling, [[9.0], [0.125]])


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_weight_dtype_does_not_matter(p):
    weight = np.array([[1.5, -2.5]], dtype=np.float32)
    coupling, _ = coupling_matrix(weight, np.array([0, 1]), p)
    assert coupling.dtype == np.float64
    np.testing.assert_allclose(coupling, np.abs(weight.astype(np.float64)) ** p)
