"""Objective: F and the loads, against the reference, on both of its numeric paths."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import exponents, networks

from onnxbalance.solver import Objective


@settings(max_examples=40, deadline=None)
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
    direct = objective.loads(u)
    objective._log_range = np.inf  # force the log-domain path
    logged = objective.loads(u)
    incoming, outgoing = reference.loads(net.layers(), net.n_groups, u, p, q)
    value = reference.objective(net.layers(), u, p, q)
    for loads in (direct, logged):
        assert loads.value == pytest.approx(value, rel=1e-11)
        np.testing.assert_allclose(loads.incoming, incoming, rtol=1e-11, atol=1e-300)
        np.testing.assert_allclose(loads.outgoing, outgoing, rtol=1e-11, atol=1e-300)
    assert objective.value(u) == pytest.approx(value, rel=1e-11)
    rows = np.concatenate(objective.row_sums(u)) if net.edges else np.zeros(0)
    assert float(np.sum(rows ** (q / p))) == pytest.approx(value, rel=1e-11)
    assert objective.passes == 2 + 2 + 1 + 1
