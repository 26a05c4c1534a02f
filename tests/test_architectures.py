"""Acceptance tests on small torch architectures (see torch_models.py).

Each architecture's unit graph is written by hand in torch_models.py from its definition, with
the count of balanced units (scale groups) explained there. Two kinds of tests:

* unmarked: the fixtures are right (export matches torch, the hand unit graph reads the same
  weights, any rescaling of its movable groups keeps the function, the hand count matches the
  graph). They pass without the analyser.
* ``@pytest.mark.arch``: onnxbalance itself (api.balance, p = q = 2) must balance exactly the
  hand-derived units, keep the outputs (onnxruntime, not the tool's check), reach the scipy
  optimum of the hand unit graph, and leave every other tensor bit-for-bit unchanged (select
  them alone with ``pytest -m arch``).

Counting convention: ``units_balanced`` counts scale groups (independent factors). A channel
tied across a residual Add counts once, however many layers' rows it spans.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from arch_reference import (
    assert_check_is_sharp,
    assert_equivalent,
    check_balanced,
    effective_weight,
    initializers,
    norm_value,
    reference_minimum,
    rescale_model,
    run,
)
from torch_models import CASES, fixture, movable_groups

IDS = [f"{name}-{'fold' if fold else 'bn'}" for name, fold in CASES]


@functools.cache
def built(name: str, fold: bool):
    return fixture(name, fold=fold)


@functools.cache
def optimum(name: str, fold: bool, p: float = 2.0, q: float = 2.0):
    fx, _ = built(name, fold)
    weights = [layer.effective for layer in fx.layers]
    return reference_minimum(fx.layers, weights, fx.n_groups, p, q)


@pytest.mark.parametrize(("name", "fold"), CASES, ids=IDS)
def test_export_computes_the_torch_function(name, fold):
    fx, module = built(name, fold)
    with torch.no_grad():
        expected = module(torch.from_numpy(fx.inputs["x"])).numpy()
    np.testing.assert_allclose(run(fx.model, fx.inputs)[0], expected, rtol=1e-4, atol=1e-4)
    # the TorchScript exporter folds eval-mode BN into the Conv unless constant folding is off
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert ("BatchNormalization" in fx.ops) == (has_bn and not fold)


@pytest.mark.parametrize(("name", "fold"), CASES, ids=IDS)
def test_hand_unit_graph_is_consistent(name, fold):
    fx, _ = built(name, fold)
    # the hand count (a constant in the builder) is what the unit graph encodes
    assert movable_groups(fx.layers) == set(range(fx.n_groups))
    assert fx.n_groups == fx.expected_balanced
    # the layers read the torch weights (BN folded) from the exported tensors
    tensors = initializers(fx.model)
    for layer in fx.layers:
        np.testing.assert_allclose(
            effective_weight(layer, tensors), layer.effective, rtol=1e-4, atol=1e-6
        )
    # BN must matter: the effective weights are not the raw conv weights
    if "BatchNormalization" in fx.ops:
        assert any(layer.bn is not None for layer in fx.layers)


@pytest.mark.parametrize(("name", "fold"), CASES, ids=IDS)
def test_any_rescaling_of_the_hand_groups_keeps_the_function(name, fold):
    """Validates the hand tie structure: a wrong tie or a missed stop changes the outputs."""
    fx, _ = built(name, fold)
    u = np.random.default_rng(1).uniform(-1.5, 1.5, fx.n_groups)
    assert_equivalent(fx.model, rescale_model(fx.model, fx.layers, u), fx.inputs)
    start, best, u_best = optimum(name, fold)
    assert best < start  # the spread row magnitudes leave something to balance
    at_best = rescale_model(fx.model, fx.layers, u_best)
    assert_equivalent(fx.model, at_best, fx.inputs)
    assert norm_value(fx.layers, at_best) == pytest.approx(best, rel=1e-5)


def _balance(fx, tmp_path, p=2.0, q=2.0):
    from onnxbalance.api import balance

    path = tmp_path / "model.onnx"
    onnx.save(fx.model, str(path))
    return balance(str(path), p=p, q=q, verify=False)


@pytest.mark.arch
@pytest.mark.parametrize(("name", "fold"), CASES, ids=IDS)
def test_tool_balances_exactly_the_hand_derived_units(name, fold, tmp_path):
    fx, _ = built(name, fold)
    before = fx.model.SerializeToString()
    balanced, report = _balance(fx, tmp_path)
    assert fx.model.SerializeToString() == before

    _, best, _ = optimum(name, fold)
    check_balanced(fx, balanced, report.units_balanced, best)


@pytest.mark.arch
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "bn"])
def test_relu6_layer_tensors_are_bit_for_bit_unchanged(fold, tmp_path):
    """The depthwise conv feeds ReLU6: its rows (bias or BN gamma/beta) stay exactly as stored."""
    fx, _ = built("dwsep_relu6", fold)
    dw = next(layer for layer in fx.layers if layer.name == "dw")
    row_tensors = list(dw.bn[:2]) if dw.bn is not None else [dw.bias]
    assert row_tensors and None not in row_tensors
    balanced, report = _balance(fx, tmp_path)
    assert "clip" in repr(report.units_fixed).lower()  # the reason names the ReLU6 (Clip)
    old, new = initializers(fx.model), initializers(balanced)
    for tensor in row_tensors:
        assert new[tensor].tobytes() == old[tensor].tobytes()
    # the depthwise weight itself changes only by its columns (the stem's scales)
    ratio = new[dw.weight].astype(np.float64) / old[dw.weight].astype(np.float64)
    per_channel = ratio.reshape(ratio.shape[0], -1)
    np.testing.assert_allclose(
        per_channel, np.broadcast_to(per_channel[:, :1], per_channel.shape), rtol=1e-5
    )


@pytest.mark.parametrize(("name", "fold"), [c for c in CASES if c[1]], ids=lambda v: str(v))
def test_acceptance_check_accepts_the_optimum_and_rejects_wrong_results(name, fold):
    """The arch checks can fail: fed the hand-made optimum they pass; fed a wrong result, not."""
    fx, _ = built(name, fold)
    _, best, u_best = optimum(name, fold)
    assert_check_is_sharp(fx, u_best, best)


# p != q: the row structure (all input channels and kernel taps of an output channel, BN folded)
# becomes observable in the norm; at p = q = 2 it is not.
GENERAL_PQ = [
    ("basic_projection", False),
    ("dwsep_relu", True),
    ("fire", True),
    ("transformer", True),
    ("prenorm_ffn", True),
]


@pytest.mark.arch
@pytest.mark.parametrize(("name", "fold"), GENERAL_PQ, ids=lambda v: str(v))
def test_tool_reaches_the_optimum_for_p1_q2(name, fold, tmp_path):
    fx, _ = built(name, fold)
    balanced, report = _balance(fx, tmp_path, p=1.0, q=2.0)
    check_balanced(fx, balanced, report.units_balanced, optimum(name, fold, 1.0, 2.0)[1], 1.0, 2.0)
