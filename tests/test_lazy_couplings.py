"""Couplings of big float16, bfloat16 and float32 layers that are never stored
(memory.LazySquares): the same solutions as the stored squares (float32 ones for 16-bit
weights, float64 ones for float32 weights), no full-size matrix during a solve, and the bfloat16
fallback and NaN/inf errors of the stored path. Tests force the lazy path on small layers by
lowering unitgraph.LAZY_BYTES and unitgraph.LAZY_FLOAT32_BYTES (:func:`all_lazy`)."""

from __future__ import annotations

import dataclasses
import tracemalloc

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from mlp_models import mlp
from solver_checks import assert_same_minimum
from torch import nn
from torch_models import export, randomise
from verify_models import float16

import onnxbalance
from onnxbalance import memory, unitgraph
from onnxbalance.analysis import analyse
from onnxbalance.solver import solve
from onnxbalance.solver.products import both_times, times, transposed_times
from onnxbalance.unitgraph import FIXED, Layer, UnitGraph

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def torch_mlp():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU())
    module.append(nn.Linear(40, 5))
    return export(randomise(module, 1).eval(), torch.zeros(2, 12))


MODELS = {
    "hand-built float16 MLP": lambda: mlp((6, 32, 24, 16, 3), dtype="float16", seed=3),
    "hand-built bfloat16 MLP": lambda: mlp((6, 32, 24, 16, 3), dtype="bfloat16", seed=4),
    "torch MLP to float16": lambda: float16(torch_mlp()),
    "torch MLP (float32)": torch_mlp,
}


def all_lazy(monkeypatch) -> None:
    """Every layer whose couplings are single squares is never stored, however small."""
    monkeypatch.setattr(unitgraph, "LAZY_BYTES", 0)
    monkeypatch.setattr(unitgraph, "LAZY_FLOAT32_BYTES", 0)


def both_graphs(units, monkeypatch):
    """(stored, lazy) unit graphs of the same units, and the lazy one's unit maxima."""
    stored = units.unit_graph(2.0)
    all_lazy(monkeypatch)
    unit_max: list[np.ndarray] = []
    lazy = units.unit_graph(2.0, unit_max)
    monkeypatch.undo()
    return stored, lazy, unit_max


@pytest.mark.parametrize("method", ["newton", "mu"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_lazy_couplings_give_the_stored_solution(name, method, monkeypatch):
    units = analyse(MODELS[name]())
    stored, lazy, unit_max = both_graphs(units, monkeypatch)
    kinds = [type(layer.coupling) for layer in lazy.layers]
    # every layer with one raw column per unit goes lazy; the first (all inputs FIXED: one
    # summed column) keeps float64
    assert kinds.count(memory.LazySquares) == len(kinds) - 1, kinds
    for layer, plain in zip(lazy.layers, stored.layers, strict=True):
        np.testing.assert_array_equal(np.asarray(layer.coupling), plain.coupling)
    for found, maxima in zip(units.layers, unit_max, strict=True):
        weight = np.asarray(found.weight, dtype=np.float64)
        np.testing.assert_array_equal(maxima, np.abs(weight).max(axis=1))
    assert_same_minimum(lazy, stored, method)


def _chain(weights, transposed: bool) -> UnitGraph:
    """Layers fc0.. with these weights as never-stored couplings; the first
    layer's columns and the last layer's rows FIXED. ``transposed``: each weight is read as a
    MatMul's [in, out] tensor seen as [out, in] (tiles of columns)."""
    layers, start = [], 0
    for k, weight in enumerate(weights):
        n_out, n_in = weight.shape
        cols = np.full(n_in, FIXED) if k == 0 else np.arange(start - n_in, start)
        last = k == len(weights) - 1
        rows = np.full(n_out, FIXED) if last else np.arange(start, start + n_out)
        start += 0 if last else n_out
        matrix = np.ascontiguousarray(weight.T).T if transposed else weight
        layers.append(Layer(f"fc{k}", memory.LazySquares(matrix), rows, cols))
    return UnitGraph(tuple(layers), [f"g{k}" for k in range(start)])


def _weights(sizes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((n_out, n_in)) * np.exp(rng.uniform(-2, 2, (n_out, 1))) / 9).astype(
            dtype
        )
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    ]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
def test_transposed_and_fixed_column_layers_match_stored_squares(dtype, transposed):
    """Tiles of rows or of columns, and a first layer with fixed columns (stored by the
    objective): the Newton solution of the squares stored (in float32 for 16-bit weights, in
    float64 for float32 ones, exact in each)."""
    weights = _weights((5, 300, 200, 250, 3), dtype)
    lazy = _chain(weights, transposed)
    exact = np.float32 if np.dtype(dtype).itemsize == 2 else np.float64
    stored = UnitGraph(
        tuple(
            dataclasses.replace(layer, coupling=np.square(weight.astype(exact)))
            for layer, weight in zip(lazy.layers, weights, strict=True)
        ),
        lazy.group_names,
    )
    expected = solve(stored, 2.0, 2.0, tol=1e-10)
    found = solve(lazy, 2.0, 2.0, tol=1e-10)
    assert expected.converged and expected.passes > 4
    np.testing.assert_allclose(found.norm_after, expected.norm_after, rtol=1e-12)
    np.testing.assert_allclose(found.log_scales, expected.log_scales, rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("transposed", [False, True])
def test_products_of_lazy_squares(transposed, dtype):
    rng = np.random.default_rng(5)
    stored = rng.standard_normal((700, 530)).astype(dtype)
    weight = stored.T if transposed else stored  # (530, 700): columns from stored rows
    lazy = memory.LazySquares(weight)
    assert lazy.transposed == transposed
    wide = np.float64(weight) ** 2
    x, y = rng.random(weight.shape[1]), rng.random(weight.shape[0])
    columns = rng.random((weight.shape[1], 3))
    np.testing.assert_allclose(times(lazy, x), wide @ x, rtol=1e-13)
    np.testing.assert_allclose(times(lazy, columns), wide @ columns, rtol=1e-13)
    np.testing.assert_allclose(transposed_times(lazy, y), wide.T @ y, rtol=1e-13)
    rows_out, cols_out = np.ones(wide.shape[0]), np.ones(wide.shape[1])
    both_times(lazy, x, y, rows_out, cols_out)
    np.testing.assert_allclose(rows_out, 1 + wide @ x, rtol=1e-13)
    np.testing.assert_allclose(cols_out, 1 + wide.T @ y, rtol=1e-13)
    assert times(lazy, x.astype(np.float32)).dtype == np.float32  # the steering products
    np.testing.assert_allclose(times(lazy, x.astype(np.float32)), wide @ x, rtol=1e-5)
    out = np.full(wide.shape[1], np.nan, np.float32)  # written whole, whatever it held
    transposed_times(lazy, y.astype(np.float32), out=out)
    np.testing.assert_allclose(out, wide.T @ y, rtol=1e-5)
    maxima = np.empty(wide.shape[0])
    assert memory.check_lazy_squares(lazy, maxima)  # the bits of |w|, tile by tile
    np.testing.assert_array_equal(maxima, np.sqrt(wide).max(axis=1))
    rows = np.array([3, 0, 699 if not transposed else 529])
    np.testing.assert_array_equal(lazy[rows], wide[rows])  # exact: float64 for float32 weights
    np.testing.assert_array_equal(lazy[:, [1, 4]], wide[:, [1, 4]])
    assert lazy.dtype == (np.float32 if dtype == np.float16 else np.float64)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_no_full_size_matrix_during_a_solve(monkeypatch, dtype):
    """Building the couplings and a whole Newton solve of three never-stored 1536 x 1536 layers
    allocate less than one such layer's float32 squares (stored, float16 ones take three, and
    float32 ones three float64 squares and their float32 copies). Float32 layers of this size
    are never stored by default."""
    width = 1536
    units = analyse(mlp((8, width, width, width, 4), dtype=dtype, seed=2, spread=2.0))
    monkeypatch.setattr(unitgraph, "LAZY_BYTES", 2**20)
    tracemalloc.start()
    try:
        graph = units.unit_graph(2.0, [])
        result = solve(graph, 2.0, 2.0, tol=1e-8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    lazy = [type(layer.coupling) is memory.LazySquares for layer in graph.layers]
    # the hidden layers, and the output layer, whose rows stay (read once, for its column sums)
    assert lazy == [False, True, True, True]
    assert result.converged and result.passes > 4
    assert peak < width * width * 4, peak
    monkeypatch.undo()
    monkeypatch.setattr(unitgraph, "LAZY_FLOAT32_BYTES", 2**40)  # the hidden layers stored
    stored = units.unit_graph(2.0)
    lazy = [type(layer.coupling) is memory.LazySquares for layer in stored.layers]
    assert lazy == [False, False, False, True]
    expected = solve(stored, 2.0, 2.0, tol=1e-8)
    # the tiles sum in another order than the stored blocks: round-off, within the tolerance
    np.testing.assert_allclose(result.norm_after, expected.norm_after, rtol=1e-12)
    np.testing.assert_allclose(result.log_scales, expected.log_scales, rtol=0, atol=1e-7)


def _with_entry(units, index: int, value: float):
    """The units with entry [3, 5] of layer ``index``'s weight set to ``value``, and that
    weight (a writable copy)."""
    weight = np.array(units.layers[index].weight)
    weight[3, 5] = value
    layers = list(units.layers)
    layers[index] = dataclasses.replace(layers[index], weight=weight)
    return dataclasses.replace(units, layers=tuple(layers)), weight


@pytest.mark.parametrize("bad", [2.0**64, 1e-25, np.inf, np.nan])
def test_bfloat16_out_of_range_falls_back_to_float64(bad, monkeypatch):
    units, weight = _with_entry(analyse(mlp((4, 16, 12, 3), dtype="bfloat16", seed=2)), 1, bad)
    monkeypatch.setattr(unitgraph, "LAZY_BYTES", 0)
    unit_max: list[np.ndarray] = []
    graph = units.unit_graph(2.0, unit_max)
    assert graph.layers[1].coupling.dtype == np.float64  # stored in float64, as before
    assert isinstance(graph.layers[2].coupling, memory.LazySquares)  # the others unaffected
    if np.isfinite(bad):
        np.testing.assert_array_equal(graph.layers[1].coupling, np.float64(weight) ** 2)
        assert solve(graph, 2.0, 2.0).converged
    else:
        with pytest.raises(ValueError, match="'.*' has NaN or infinite weights"):
            solve(graph, 2.0, 2.0)
    np.testing.assert_array_equal(unit_max[1], np.abs(np.float64(weight)).max(axis=1))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nan_and_inf_are_named_by_the_solver(bad, dtype, monkeypatch):
    units, _ = _with_entry(analyse(mlp((4, 16, 12, 8, 3), dtype=dtype, seed=2)), 2, bad)
    all_lazy(monkeypatch)
    unit_max: list[np.ndarray] = []
    graph = units.unit_graph(2.0, unit_max)
    # the tiles skip float16's fix-up for infinities and NaN: such a layer is stored in float64
    assert graph.layers[2].coupling.dtype == np.float64
    assert isinstance(graph.layers[1].coupling, memory.LazySquares)
    assert np.isnan(unit_max[2][3]) == np.isnan(bad) and not np.isfinite(unit_max[2][3])
    name = units.layers[2].name
    with pytest.raises(ValueError, match=f"layer '{name}' has NaN or infinite weights"):
        solve(graph, 2.0, 2.0)


def test_bfloat16_range_is_checked_on_the_stored_bits(monkeypatch):
    """The edges of the range where squares are exact pass, one step beyond fails, in any tile
    of a transposed weight read a few stored rows at a time."""
    monkeypatch.setattr(memory, "BLOCK_BYTES", 64)
    stored = np.random.default_rng(1).standard_normal((9, 6)).astype(BFLOAT16)
    stored[2, 1], stored[8, 5], stored[4, 0] = 2.0**-63, -(2.0**64 - 2.0**56), 0.0
    lazy = memory.LazySquares(stored.T)
    maxima = np.empty(6)
    assert memory.check_lazy_squares(lazy, maxima)
    np.testing.assert_array_equal(maxima, np.abs(np.float64(stored)).max(axis=0))
    for bad in (2.0**-64, 2.0**64, np.inf, np.nan):
        edited = stored.copy()
        edited[7, 3] = bad
        assert not memory.check_lazy_squares(memory.LazySquares(edited.T))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_balance_file_with_external_data_writes_the_stored_result(dtype, tmp_path, monkeypatch):
    """End to end on memory-mapped weights (their pages released after every pass): the file
    balanced through never-stored couplings equals, byte for byte, the one balanced through
    stored squares, and onnxruntime finds it equivalent to the input."""
    src = tmp_path / "in.onnx"
    onnx.save_model(
        mlp((6, 48, 40, 32, 3), dtype=dtype, seed=7),
        src,
        save_as_external_data=True,
        location="in.onnx.data",
        size_threshold=0,
    )
    written = {}
    for name, threshold in (("stored", 2**40), ("lazy", 0)):
        monkeypatch.setattr(unitgraph, "LAZY_BYTES", threshold)
        monkeypatch.setattr(unitgraph, "LAZY_FLOAT32_BYTES", threshold)
        report = onnxbalance.balance_file(src, tmp_path / f"{name}.onnx")
        assert report.norm_after < report.norm_before * 0.999
        written[name] = (onnx.load(tmp_path / f"{name}.onnx"), report)
    (stored, stored_report), (lazy, lazy_report) = written["stored"], written["lazy"]
    assert lazy.SerializeToString() == stored.SerializeToString()
    assert lazy_report.norm_after == stored_report.norm_after
    assert lazy_report.passes == stored_report.passes
    assert lazy_report.verify is not None and lazy_report.verify.passed


@pytest.mark.parametrize("q", [2.0, 1.0])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_layers_whose_rows_all_stay_are_never_stored(dtype, q):
    """A transformer's q, k and output projections: for q = p the solver reads them once, for
    their column sums; for q != p on every pass. Either way, the stored solution."""
    units = analyse(mlp((6, 32, 24, 16, 3), dtype=dtype, seed=5))
    graph = units.unit_graph(2.0)
    lazy = [type(layer.coupling) is memory.LazySquares for layer in graph.layers]
    assert lazy == [False, False, False, True]  # only the output layer's rows all stay
    stored = UnitGraph(
        tuple(
            dataclasses.replace(layer, coupling=np.asarray(layer.coupling, np.float64))
            for layer in graph.layers
        ),
        graph.group_names,
    )
    found, expected = solve(graph, 2.0, q, tol=1e-10), solve(stored, 2.0, q, tol=1e-10)
    assert expected.converged and expected.norm_after < expected.norm_before
    np.testing.assert_allclose(found.norm_after, expected.norm_after, rtol=1e-12)
    np.testing.assert_allclose(found.log_scales, expected.log_scales, rtol=0, atol=1e-8)
