"""Couplings of float16 and bfloat16 weights stored in float32 (exact squares), multiplied in
float64: the same solution as the float64 couplings of the same weights, and no float64 matrix."""

from __future__ import annotations

import dataclasses
import tracemalloc

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlp_models import mlp
from solver_checks import assert_same_minimum
from torch import nn
from torch_models import export, randomise
from verify_models import float16, torch_model

from onnxbalance import memory
from onnxbalance.analysis import analyse
from onnxbalance.solver import Objective, solve
from onnxbalance.solver import objective as objective_module
from onnxbalance.solver.couplings import summarise, summarise_graph
from onnxbalance.solver.curvature import Curvature, evaluate
from onnxbalance.solver.liveness import find_pinned
from onnxbalance.solver.objective import movable_groups
from onnxbalance.solver.products import both_times, times, transposed_times
from onnxbalance.solver.workspace import Workspace
from onnxbalance.unitgraph import FIXED, Layer, UnitGraph, coupling_matrix

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def float64_graph(units) -> UnitGraph:
    """The float64 couplings of the same weights, by the float64 path alone."""
    layers = []
    for layer in units.layers:
        weight = np.asarray(layer.weight, dtype=np.float64)
        coupling, groups = coupling_matrix(weight, layer.col_groups, 2.0)
        layers.append(Layer(layer.name, coupling, np.asarray(layer.row_groups), groups))
    return UnitGraph(tuple(layers), units.group_names)


def torch_mlp(seed: int = 0) -> onnx.ModelProto:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU())
    module.append(nn.Linear(30, 5))
    return export(randomise(module, seed).eval(), torch.zeros(2, 12))


MODELS = {
    "hand-built float16 MLP": lambda: mlp((6, 32, 24, 16, 3), dtype="float16", seed=3),
    "hand-built bfloat16 MLP": lambda: mlp((6, 32, 24, 16, 3), dtype="bfloat16", seed=4),
    "torch MLP to float16": lambda: float16(torch_mlp()),
    "torch ResNet to float16": lambda: float16(torch_model("resnet")),
}


@pytest.mark.parametrize("method", ["newton", "mu"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_solution_as_float64_couplings(name, method):
    units = analyse(MODELS[name]())
    graph = units.unit_graph(2.0)
    reference = float64_graph(units)
    stored = [layer.coupling.dtype for layer in graph.layers]
    assert np.dtype(np.float32) in stored  # the narrow path is taken...
    for found, layer, wide in zip(units.layers, graph.layers, reference.layers, strict=True):
        # ...holds the very same values (exact squares), and only where it can
        np.testing.assert_array_equal(layer.coupling, wide.coupling)
        if layer.coupling.dtype == np.float32:
            assert np.asarray(found.weight).dtype in (np.float16, BFLOAT16)
            assert layer.coupling.shape[1] == np.shape(found.weight)[1]
    assert_same_minimum(graph, reference, method)


def test_resnet_mixes_float32_and_float64_couplings():
    """1x1 convolutions and the Linear store float32; 3x3 ones sum nine taps: float64."""
    units = analyse(float16(torch_model("resnet")))
    graph = units.unit_graph(2.0)
    for layer, built in zip(units.layers, graph.layers, strict=True):
        groups = np.asarray(layer.col_groups)
        # one raw column per unit, in order (as the solver reads them): a 1x1 convolution or
        # the Linear on a hidden layer
        one_per_unit = groups.ndim == 1 and bool(np.all(np.diff(groups) > 0))
        assert np.asarray(layer.weight).dtype == np.float16
        assert built.coupling.dtype == (np.float32 if one_per_unit else np.float64), layer.name
    assert {layer.coupling.dtype for layer in graph.layers} == {
        np.dtype(np.float32),
        np.dtype(np.float64),
    }


def test_float16_gemm_coupling_is_its_own_float32_copy():
    units = analyse(mlp((6, 64, 48, 3), dtype="float16", seed=1))
    unit_max: list[np.ndarray] = []
    graph = units.unit_graph(2.0, unit_max)
    hidden = graph.layers[1]  # hidden to hidden: one raw column per unit
    assert hidden.coupling.dtype == np.float32
    summary = summarise(hidden.name, hidden.coupling)
    assert summary.matrix is hidden.coupling and summary.single is summary.matrix
    objective = Objective(graph, 2.0, 2.0, summarise_graph(graph))
    assert objective.layers[1].free is hidden.coupling
    assert objective.layers[1].single is hidden.coupling
    # the report's per-unit largest |w|, exactly, from the float32 squares
    for layer, maxima in zip(units.layers, unit_max, strict=True):
        expected = np.abs(np.asarray(layer.weight, dtype=np.float64)).max(axis=1)
        np.testing.assert_array_equal(maxima, expected)
    # sums over all columns are float64 sums of the exact squares
    weight = np.asarray(units.layers[1].weight, dtype=np.float64)
    np.testing.assert_allclose(summary.row_sums, (weight**2).sum(axis=1), rtol=1e-15)
    np.testing.assert_allclose(summary.col_sums, (weight**2).sum(axis=0), rtol=1e-15)
    assert summary.row_sums.dtype == summary.col_sums.dtype == np.float64


def test_no_float64_matrix_is_made_for_float32_couplings():
    """Neither a float64 copy of a coupling matrix nor a second float32 one shows in the
    traced allocations of a whole Newton solve (the summary, the objective, every product)."""
    rng = np.random.default_rng(0)
    width = 1536
    sizes = (8, width, width, width, 4)
    groups, start = [], 0
    for k, size in enumerate(sizes):
        inner = 0 < k < len(sizes) - 1
        groups.append(np.arange(start, start + size) if inner else np.full(size, FIXED))
        start += size if inner else 0
    layers = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = rng.standard_normal((n_out, n_in)) * np.exp(rng.uniform(-2, 2, (n_out, 1))) / 20
        squares = np.square(w.astype(np.float16).astype(np.float32))
        layers.append(Layer(f"fc{k}", squares, groups[k + 1], groups[k]))
    graph = UnitGraph(tuple(layers), [f"g{k}" for k in range(start)])
    tracemalloc.start()
    try:
        result = solve(graph, 2.0, 2.0, tol=1e-8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.converged and result.passes > 4
    assert peak < width * width * 4, peak  # one float32 matrix; float64 storage takes 3x that
    wide = UnitGraph(
        tuple(dataclasses.replace(x, coupling=x.coupling.astype(np.float64)) for x in layers),
        graph.group_names,
    )
    expected = solve(wide, 2.0, 2.0, tol=1e-8)
    np.testing.assert_allclose(result.log_scales, expected.log_scales, rtol=0, atol=1e-9)
    assert result.passes == expected.passes


@pytest.mark.parametrize("bad", [2.0**64, 1e20, 2.0**-64, 1e-25, np.inf, np.nan])
def test_bfloat16_out_of_range_falls_back_to_float64(bad):
    units = analyse(mlp((4, 16, 12, 3), dtype="bfloat16", seed=2))
    weight = np.array(units.layers[1].weight)  # a writable copy of the hidden layer
    weight[3, 5] = bad
    layers = list(units.layers)
    layers[1] = dataclasses.replace(layers[1], weight=weight)
    units = dataclasses.replace(units, layers=tuple(layers))
    unit_max: list[np.ndarray] = []
    graph = units.unit_graph(2.0, unit_max)
    assert graph.layers[1].coupling.dtype == np.float64
    assert graph.layers[2].coupling.dtype == np.float32  # the others are unaffected
    expected = np.asarray(weight, dtype=np.float64) ** 2
    if np.isfinite(bad):
        np.testing.assert_array_equal(graph.layers[1].coupling, expected)
        assert solve(graph, 2.0, 2.0).converged  # solvable in float64
    else:
        with pytest.raises(ValueError, match="'.*' has NaN or infinite weights"):
            solve(graph, 2.0, 2.0)
    rest = np.asarray(weight[4:], dtype=np.float64)
    np.testing.assert_array_equal(unit_max[1][4:], np.abs(rest).max(axis=1))


def test_bfloat16_edges_of_the_range_stay_float32(monkeypatch):
    weight = np.array([[2.0**-63, -(2.0**64 - 2.0**56)], [0.0, -0.0]], dtype=BFLOAT16)
    out = np.empty((2, 2), np.float32)
    assert memory.float32_squares(weight, out)
    np.testing.assert_array_equal(out, np.float64(weight) ** 2)
    # a MatMul's weight is read transposed, in tiles of columns: the same squares and checks
    monkeypatch.setattr(memory, "_TILE", 2)
    monkeypatch.setattr(memory, "BLOCK_BYTES", 16)
    stored = np.random.default_rng(1).standard_normal((7, 5)).astype(BFLOAT16)
    out = np.empty((5, 7), np.float32)
    assert memory.float32_squares(stored.T, out)
    np.testing.assert_array_equal(out, np.float64(stored.T) ** 2)
    stored[6, 4] = 2.0**-64
    assert not memory.float32_squares(stored.T, out)


@settings(max_examples=80, deadline=None)
@given(bits=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=24), narrow=st.booleans())
def test_float32_squares_are_exact_or_refused(bits, narrow):
    """Any bit patterns (subnormals, NaN, inf included): a float32 result equals the float64
    squares exactly; a refusal means some non-zero |w| squares outside float32's normal range."""
    raw = np.array(bits, dtype=np.uint16).reshape(len(bits), 1)
    weight = raw.view(np.float16 if narrow else BFLOAT16)
    with np.errstate(invalid="ignore"):  # signalling NaNs
        exact = np.asarray(weight, dtype=np.float64) ** 2
    out = np.empty(weight.shape, np.float32)
    fits = memory.float32_squares(weight, out)  # quietly, NaN and inf included
    if fits:
        np.testing.assert_array_equal(out, exact)  # NaN where NaN, inf where inf (float16)
    else:
        assert not narrow  # float16 always fits
        nonzero = exact[exact != 0]
        assert not np.all((nonzero >= 2.0**-126) & (nonzero < 2.0**128))


@pytest.mark.parametrize("shape", [(3000, 257), (1, 5), (700, 3)])
def test_products_of_float32_matrices_are_float64_products(shape, monkeypatch):
    rng = np.random.default_rng(5)
    matrix = (rng.random(shape) ** 3).astype(np.float32)
    wide = matrix.astype(np.float64)
    x, y = rng.random(shape[1]) * 1e-3, rng.random(shape[0]) * 1e5
    columns = rng.random((shape[1], 3))
    np.testing.assert_allclose(times(matrix, x), wide @ x, rtol=1e-14)
    np.testing.assert_allclose(times(matrix, columns), wide @ columns, rtol=1e-14)
    np.testing.assert_allclose(transposed_times(matrix, y), wide.T @ y, rtol=1e-14)
    rows_out, cols_out = np.ones(shape[0]), np.ones(shape[1])
    both_times(matrix, x, y, rows_out, cols_out)
    np.testing.assert_allclose(rows_out, 1 + wide @ x, rtol=1e-14)
    np.testing.assert_allclose(cols_out, 1 + wide.T @ y, rtol=1e-14)
    assert times(matrix, x).dtype == transposed_times(matrix, y).dtype == np.float64
    # float32 vectors multiply in float32 (the steering phase's products); both_times adds
    # each block's float32 products into float64 outputs
    assert times(matrix, x.astype(np.float32)).dtype == np.float32
    rows_out, cols_out = np.zeros(shape[0]), np.zeros(shape[1])
    both_times(matrix, x.astype(np.float32), y.astype(np.float32), rows_out, cols_out)
    np.testing.assert_allclose(rows_out, wide @ x, rtol=1e-6)
    np.testing.assert_allclose(cols_out, wide.T @ y, rtol=1e-6)
    # no float64 copy of the matrix: a few rows at a time
    tracemalloc.start()
    try:
        times(matrix, x)
        transposed_times(matrix, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if shape[0] > 1000:  # many blocks
        assert peak < matrix.nbytes / 2


def _graphs_with_both_storages(seed: int):
    """A chain with zero rows, a zero column, a dead unit, fixed columns in the middle and
    couplings over many orders of magnitude: the same graph stored float32 and float64."""
    rng = np.random.default_rng(seed)
    sizes = (3, 40, 30, 20, 2)
    names, groups = [], []
    for k, size in enumerate(sizes):
        if k in (0, len(sizes) - 1):
            groups.append(np.full(size, FIXED))
            continue
        start = len(names)
        names += [f"h{k}[{i}]" for i in range(size)]
        groups.append(np.arange(start, start + size))
    groups[2] = groups[2].copy()
    groups[2][:4] = FIXED  # fixed columns inside a layer
    layers32 = []
    for k in range(len(sizes) - 1):
        w = rng.standard_normal((sizes[k + 1], sizes[k])) * np.exp(
            rng.uniform(-8, 8, (1, sizes[k]))
        )
        w = w.astype(np.float16)
        if k == 1:
            w[5] = 0  # dead units
            w[:, 7] = 0
            w[15:] = 0
        if k == 2:  # a row and a column that only reach some units (see the test below)
            w[0, :15] = 0
            w[:19, 5] = 0
        if k == 3:
            w[:, 19] = 0
        squares = np.square(w.astype(np.float32))
        layers32.append(Layer(f"fc{k}", squares, groups[k + 1], groups[k]))
    layers64 = [dataclasses.replace(x, coupling=x.coupling.astype(np.float64)) for x in layers32]
    return UnitGraph(tuple(layers32), names), UnitGraph(tuple(layers64), names), groups


@pytest.mark.parametrize("q", [2.0, 1.0, 3.0])
def test_rows_and_columns_lost_to_underflow_are_redone_in_float64(q, monkeypatch):
    """A row whose couplings all meet columns scaled by e^-800 against the rest of its layer,
    and a column that only hears from a row scaled by e^-1400: log-sum-exp over their float32
    couplings. (The units scaled so far have no other couplings: F stays finite.)"""
    narrow, wide, groups = _graphs_with_both_storages(8)
    u = np.zeros(narrow.n_groups)
    u[groups[2][15:]] = 400.0
    u[groups[3][0]] = 400.0
    u[groups[3][19]] = -700.0
    redone = []
    log_sum_terms = objective_module._log_sum_terms
    monkeypatch.setattr(
        objective_module,
        "_log_sum_terms",
        lambda block, *rest: redone.append(block.dtype) or log_sum_terms(block, *rest),
    )
    narrow_loads = Objective(narrow, 2.0, q).loads(u)
    assert len(redone) >= 2 and set(redone) == {np.dtype(np.float32)}  # rows, columns
    wide_loads = Objective(wide, 2.0, q).loads(u)
    assert np.isfinite(wide_loads.value) and wide_loads.outgoing.max() > 0
    np.testing.assert_allclose(narrow_loads.value, wide_loads.value, rtol=1e-13)
    np.testing.assert_allclose(narrow_loads.incoming, wide_loads.incoming, rtol=1e-12, atol=0)
    np.testing.assert_allclose(narrow_loads.outgoing, wide_loads.outgoing, rtol=1e-12, atol=0)


@pytest.mark.parametrize("q", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("spread", [0.0, 1.0, 60.0, 150.0, 400.0])
def test_loads_hessian_and_liveness_match_float64(q, spread):
    """Plain factors, the log domain (scales of e^+-150 and more: rows redone by
    log-sum-exp), the Hessian products with and without the float32 copy, and the dead/cut-off
    analysis. (At e^+-400 F overflows: such a point is refused, its Hessian never formed.)"""
    narrow, wide, _ = _graphs_with_both_storages(7)
    assert [p.name for p in find_pinned(narrow)] == [p.name for p in find_pinned(wide)]
    assert find_pinned(narrow)  # the dead unit
    u = np.random.default_rng(3).uniform(-spread, spread, narrow.n_groups)
    objectives = [Objective(g, 2.0, q, summarise_graph(g)) for g in (narrow, wide)]
    loads = [objective.loads(u) for objective in objectives]
    np.testing.assert_allclose(loads[0].value, loads[1].value, rtol=1e-13)
    np.testing.assert_allclose(loads[0].incoming, loads[1].incoming, rtol=1e-12, atol=0)
    np.testing.assert_allclose(loads[0].outgoing, loads[1].outgoing, rtol=1e-12, atol=0)
    for fast in (False, True):
        points, products = [], []
        for objective, graph in zip(objectives, (narrow, wide), strict=True):
            workspace = Workspace(objective, movable_groups(graph))
            point = evaluate(workspace, u, fast=fast)
            points.append(point)
            if np.isfinite(point.value):
                v = np.random.default_rng(4).standard_normal(graph.n_groups)
                products.append(Curvature(workspace, point).matvec(v))
        rtol = 1e-12 if points[0].exact else 1e-5
        assert points[0].exact == points[1].exact
        np.testing.assert_allclose(points[0].value, points[1].value, rtol=rtol)
        np.testing.assert_allclose(points[0].outgoing, points[1].outgoing, rtol=rtol, atol=0)
        assert len(products) in (0, 2)  # both points overflow, or neither
        assert len(products) == 2 or spread >= 150
        if products:
            scale = np.abs(products[1]).max()
            np.testing.assert_allclose(products[0], products[1], rtol=0, atol=1e-5 * scale)
