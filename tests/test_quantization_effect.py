"""Balancing shrinks the spread of per-unit weight ranges, and rescues per-tensor int8 accuracy.

The first test builds an MLP with onnx.helper whose hidden units are rescaled by 10^U(-2, 2)
and reads the weights back from the balanced model's initializers itself (not through
onnxbalance's analysis), so a wrong orientation or a rewrite that touched the wrong axis fails.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxbalance import balance
from onnxbalance.report import summary_table
from onnxbalance.weightstats import layer_stats

WIDTHS = (12, 32, 24, 16, 5)
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "quantization.py"


def unbalanced_mlp(seed: int = 0, decades: float = 2.0) -> onnx.ModelProto:
    """MatMul+Add+Relu MLP; hidden unit h scaled by a_h = 10^U(-decades, decades)."""
    rng = np.random.default_rng(seed)
    weights = [
        rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)
        for n_in, n_out in zip(WIDTHS[:-1], WIDTHS[1:], strict=True)
    ]
    biases = [rng.normal(scale=0.1, size=n) for n in WIDTHS[1:]]
    for k in range(len(WIDTHS) - 2):  # rescale the hidden units feeding layer k + 1
        a = 10.0 ** rng.uniform(-decades, decades, size=WIDTHS[k + 1])
        weights[k] = weights[k] * a  # MatMul weight is (in, out): columns are units
        biases[k] = biases[k] * a
        weights[k + 1] = weights[k + 1] / a[:, None]
    nodes, inits, x = [], [], "x"
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"W{k}"),
            numpy_helper.from_array(b.astype(np.float32), f"B{k}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"W{k}"], [f"m{k}"], name=f"matmul{k}"),
            helper.make_node("Add", [f"m{k}", f"B{k}"], [f"a{k}"], name=f"add{k}"),
        ]
        x = f"a{k}"
        if k < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{k}"], name=f"relu{k}"))
            x = f"r{k}"
    graph = helper.make_graph(
        nodes,
        "unbalanced_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTHS[0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", WIDTHS[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def hidden_layer_spreads(model: onnx.ModelProto) -> list[float]:
    """Spread of per-unit ranges of every layer whose rows are hidden units."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [layer_stats(f"W{k}", inits[f"W{k}"].T).spread for k in range(len(WIDTHS) - 2)]


def test_balancing_shrinks_every_hidden_layers_spread_p2_q2() -> None:
    model = unbalanced_mlp()
    before = hidden_layer_spreads(model)
    assert min(before) > 10.0  # the fixture really is unbalanced
    balanced, _ = balance(model, p=2.0, q=2.0)
    after = hidden_layer_spreads(balanced)
    for k, (b, a) in enumerate(zip(before, after, strict=True)):
        assert a < b, f"layer W{k}: spread {b:.3g} -> {a:.3g}"
    # rescaling alone cannot undo the spread of the weights the units were trained with, but
    # balancing must remove the decades the fixture added
    assert max(after) < 10.0


def _load_benchmark():
    """benchmarks/ is a folder of scripts, not a package: load the script as a module."""
    name = "onnxbalance_quantization_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_balancing_rescues_int8_accuracy_on_a_trained_mlp() -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    bench = _load_benchmark()

    task = bench.digits_mlp()
    variant = bench.rescale_units(task.model, task.hidden, 2.0, seed=0)
    float32 = bench.accuracy(variant, task)
    int8 = bench.accuracy(bench.quantize(variant, task), task)
    balanced, _ = balance(variant, p=2.0, q=2.0)
    int8_balanced = bench.accuracy(bench.quantize(balanced, task), task)
    assert float32 > 0.9
    assert int8 < float32 - 0.3  # per-tensor int8 really breaks the rescaled model
    assert int8_balanced >= float32 - 0.01


def test_report_carries_per_layer_stats_before_and_after() -> None:
    model = unbalanced_mlp(seed=3)
    balanced, report = balance(model, p=2.0, q=2.0)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in balanced.graph.initializer}
    n_layers = len(WIDTHS) - 1
    assert len(report.layers_before) == len(report.layers_after) == n_layers
    for k in range(n_layers):
        expected_before = layer_stats("", before[f"W{k}"].T)
        expected_after = layer_stats("", after[f"W{k}"].T)
        got_before, got_after = report.layers_before[k], report.layers_after[k]
        assert got_before.units == expected_before.units == WIDTHS[k + 1]
        assert got_before.largest == pytest.approx(expected_before.largest, rel=1e-6)
        assert got_before.spread == pytest.approx(expected_before.spread, rel=1e-6)
        assert got_before.lost_int8 == expected_before.lost_int8
        # the report computes "after" from the solver's scales, the model stores float32
        assert got_after.largest == pytest.approx(expected_after.largest, rel=1e-5)
        assert got_after.spread == pytest.approx(expected_after.spread, rel=1e-5)
        assert got_after.lost_int8 == expected_after.lost_int8
    layers = report.to_dict()["layers"]
    assert [entry["before"]["spread"] for entry in layers] == pytest.approx(
        [s.spread for s in report.layers_before]
    )
    assert all("after" in entry for entry in layers)
    console = Console(width=200, record=True)
    console.print(summary_table(report, verbose=True))
    text = console.export_text()
    first = report.layers_before[0]
    assert f"weights {first.name}" in text
    assert f"spread {first.spread:.3g}->{report.layers_after[0].spread:.3g}" in text
    console = Console(width=200, record=True)
    console.print(summary_table(report, verbose=False))
    assert "spread" not in console.export_text()
