"""Op-by-op conv fixtures (onnx_conv_models.py): hand-derived counts, equivalence, optimum.

Unmarked tests check the fixtures themselves (valid models, the hand unit graph's tie structure
keeps the function under any rescaling, the count matches the graph). ``@pytest.mark.arch``
tests run onnxbalance.api.balance on them.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from arch_reference import (
    assert_check_is_sharp,
    assert_equivalent,
    check_balanced,
    effective_weight,
    initializers,
    norm_value,
    reference_minimum,
    rescale_model,
)
from onnx_conv_models import FIXTURES, STOP_OPS
from torch_models import movable_groups

from onnxbalance.weightstats import layer_stats

NAMES = sorted(FIXTURES)


@functools.cache
def built(name: str):
    return FIXTURES[name]()


@functools.cache
def optimum(name: str, p: float = 2.0, q: float = 2.0):
    fx = built(name)
    weights = [layer.effective for layer in fx.layers]
    return reference_minimum(fx.layers, weights, fx.n_groups, p, q)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_consistent(name):
    fx = built(name)
    onnx.checker.check_model(fx.model, full_check=True)
    assert movable_groups(fx.layers) == set(range(fx.n_groups))
    assert fx.n_groups == fx.expected_balanced
    tensors = initializers(fx.model)
    for layer in fx.layers:
        np.testing.assert_allclose(effective_weight(layer, tensors), layer.effective)


@pytest.mark.parametrize("name", NAMES)
def test_any_rescaling_of_the_hand_groups_keeps_the_function(name):
    fx = built(name)
    u = np.random.default_rng(2).uniform(-1.5, 1.5, fx.n_groups)
    assert_equivalent(fx.model, rescale_model(fx.model, fx.layers, u), fx.inputs)
    start, best, u_best = optimum(name)
    assert best < start
    at_best = rescale_model(fx.model, fx.layers, u_best)
    assert_equivalent(fx.model, at_best, fx.inputs)
    assert norm_value(fx.layers, at_best) == pytest.approx(best, rel=1e-5)


@pytest.mark.arch
@pytest.mark.parametrize("name", NAMES)
def test_tool_balances_exactly_the_hand_derived_units(name, tmp_path):
    from onnxbalance.api import balance

    fx = built(name)
    path = tmp_path / "model.onnx"
    onnx.save(fx.model, str(path))
    balanced, report = balance(str(path), p=2.0, q=2.0, verify=False)
    check_balanced(fx, balanced, report.units_balanced, optimum(name)[1])
    # the report's statistics before balancing are those of the hand-derived effective weights
    # (one row per unit); the layers are matched by their statistics, not their names
    expected = sorted(_stats_key(layer_stats(layer.name, layer.effective)) for layer in fx.layers)
    got = sorted(_stats_key(stats) for stats in report.layers_before)
    assert [key[::2] for key in got] == [key[::2] for key in expected]
    np.testing.assert_allclose([key[1::2] for key in got], [key[1::2] for key in expected])


def _stats_key(stats) -> tuple:
    """(units, largest, lost_int8, spread, zero_units): integers at even positions."""
    return (stats.units, stats.largest, stats.lost_int8, stats.spread, stats.zero_units)


@pytest.mark.parametrize("name", NAMES)
def test_acceptance_check_accepts_the_optimum_and_rejects_wrong_results(name):
    _, best, u_best = optimum(name)
    assert_check_is_sharp(built(name), u_best, best)


@pytest.mark.arch
@pytest.mark.parametrize("op_type", STOP_OPS)
def test_report_names_the_stop(op_type, tmp_path):
    """The report's fixed-unit records say why: the stopping op (or its node) is named."""
    from onnxbalance.api import balance

    fx = built(f"stop_{op_type.lower()}")
    path = tmp_path / "model.onnx"
    onnx.save(fx.model, str(path))
    _, report = balance(str(path), p=2.0, q=2.0, verify=False)
    node = next(n.name for n in fx.model.graph.node if n.op_type == op_type)
    text = repr(report.units_fixed).lower()
    assert op_type.lower() in text or node.lower() in text


# p != q makes the row structure observable (rho_o^(q/p) over all inputs and kernel taps of row o);
# at p = q = 2 the norm is a plain sum of squares, so a tool whose objective split a row by
# kernel tap or by group would still find the right optimum.
GENERAL_PQ = ["grouped", "conv_transpose", "conv1d", "conv3d", "flatten_gemm", "matmul_3d"]


@pytest.mark.parametrize("name", GENERAL_PQ)
@pytest.mark.parametrize(("p", "q"), [(1.0, 2.0), (2.0, 1.0)])
def test_rows_matter_when_p_differs_from_q(name, p, q):
    fx = built(name)
    _, best, u_best = optimum(name, p, q)
    at_best = rescale_model(fx.model, fx.layers, u_best)
    assert norm_value(fx.layers, at_best, p, q) == pytest.approx(best, rel=1e-5)
    # the optimum for these (p, q) is not the p = q = 2 optimum
    _, _, u_frobenius = optimum(name)
    other = rescale_model(fx.model, fx.layers, u_frobenius)
    assert norm_value(fx.layers, other, p, q) > best * (1 + 1e-4)


@pytest.mark.arch
@pytest.mark.parametrize("name", GENERAL_PQ)
@pytest.mark.parametrize(("p", "q"), [(1.0, 2.0), (2.0, 1.0)])
def test_tool_reaches_the_optimum_for_other_p_q(name, p, q, tmp_path):
    from onnxbalance.api import balance

    fx = built(name)
    path = tmp_path / "model.onnx"
    onnx.save(fx.model, str(path))
    balanced, report = balance(str(path), p=p, q=q, verify=False)
    check_balanced(fx, balanced, report.units_balanced, optimum(name, p, q)[1], p, q)
