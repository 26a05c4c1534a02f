"""Refusing units whose rescaled weights overflow their dtype (onnxbalance.overflow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from mlp_models import DTYPES, mlp
from onnx import numpy_helper

from onnxbalance import memory, overflow, tensors
from onnxbalance.unitgraph import FIXED, LinearUnits, ModelUnits, Skip, TensorEdit


def mlp_units(model: onnx.ModelProto) -> ModelUnits:
    """What analysis finds in a Gemm(transB=1)+Relu MLP: one group per hidden unit."""
    weights = [t for t in model.graph.initializer if t.name.startswith("W")]
    widths = [weights[0].dims[1]] + [w.dims[0] for w in weights]
    names, layers, start = [], [], 0
    groups = [np.full(widths[0], FIXED)]
    for k, width in enumerate(widths[1:-1]):
        groups.append(np.arange(start, start + width))
        names += [f"relu{k}[{j}]" for j in range(width)]
        start += width
    groups.append(np.full(widths[-1], FIXED))
    for k, weight in enumerate(weights):
        rows, cols = groups[k + 1], groups[k]
        edits = (
            TensorEdit(f"W{k}", row_axis=0, row_groups=rows, col_axis=1, col_groups=cols),
            TensorEdit(f"b{k}", row_axis=0, row_groups=rows),
        )
        array = numpy_helper.to_array(weight)
        layers.append(LinearUnits(f"gemm{k}", array, rows, cols, edits))
    return ModelUnits(tuple(layers), tuple(names))


def brute_force(model, units, u):
    with np.errstate(over="ignore"):  # float64 products may reach inf: still an overflow
        return _brute_force(model, units, u)


def _brute_force(model, units, u):
    """Every rescaled entry computed in full, in float64: which groups pushed one too high."""
    found = set()
    stored = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    limit = tensors.max_finite(tensors.FLOAT_TYPES[model.graph.initializer[0].data_type])
    padded = np.append(u, 0.0)
    for layer in units.layers:
        for edit in layer.edits:
            rows = np.where(edit.row_groups == FIXED, len(u), edit.row_groups)
            new = stored[edit.tensor] * np.exp(padded[rows]).reshape(
                -1, *[1] * (stored[edit.tensor].ndim - 1)
            )
            cols = None
            if edit.col_groups is not None:
                cols = np.where(edit.col_groups == FIXED, len(u), edit.col_groups)
                new = new * np.exp(-padded[cols])[None, :]
            for o, *rest in zip(*np.nonzero(np.abs(new) > limit), strict=True):
                g = edit.row_groups[o]
                if g != FIXED and u[g] > 0:
                    found.add(int(g))
                if cols is not None:
                    g = edit.col_groups[rest[0]]
                    if g != FIXED and u[g] < 0:
                        found.add(int(g))
    return found


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("seed", range(4))
def test_overflowing_groups_match_brute_force(monkeypatch, dtype, seed):
    monkeypatch.setattr(memory, "BLOCK_BYTES", 100)  # several blocks per tensor
    model = mlp(widths=(4, 8, 6, 3), dtype=dtype, seed=seed)
    units = mlp_units(model)
    rng = np.random.default_rng(seed)
    span = {"float16": 12.0, "bfloat16": 90.0, "float32": 90.0, "float64": 710.0}[dtype]
    u = rng.uniform(-span, span, size=units.n_groups)
    reasons = overflow.overflowing_groups(model, units, u)
    assert set(reasons) == brute_force(model, units, u)
    assert set(reasons)  # the spans are chosen so that something overflows
    assert all(dtype in r for r in reasons.values())
    assert overflow.overflowing_groups(model, units, np.zeros(units.n_groups)) == {}


def test_pinning_until_nothing_overflows():
    model = mlp(widths=(4, 8, 6, 3), dtype="float16", seed=5)
    units = mlp_units(model)
    u = np.random.default_rng(0).uniform(-12, 12, size=units.n_groups)
    names = dict(enumerate(units.group_names))
    kept = np.arange(units.n_groups)
    rounds = 0
    while True:
        reasons = overflow.overflowing_groups(model, units, u)
        if not reasons:
            break
        rounds += 1
        before = units
        units = overflow.pin_groups(units, reasons)
        assert units.n_groups == before.n_groups - len(reasons)
        keep = [g for g in range(before.n_groups) if g not in reasons]
        u, kept = u[keep], kept[keep]
    assert rounds >= 1
    assert [names[g] for g in kept] == list(units.group_names)
    pinned = sum(s.count for s in units.skipped)
    assert pinned == len(names) - units.n_groups
    assert all("overflow float16" in s.reason for s in units.skipped)
    assert {s.node for s in units.skipped} <= {"relu0", "relu1"}
    # the remaining groups index a contiguous range; pinned ones are FIXED everywhere
    for layer in units.layers:
        for groups in (layer.row_groups, layer.col_groups):
            moving = groups[groups != FIXED]
            assert moving.size == 0 or (moving.min() >= 0 and moving.max() < units.n_groups)


def test_pin_keeps_other_groups_and_records():
    model = mlp(widths=(2, 3, 2))
    units = mlp_units(model)
    units = ModelUnits(units.layers, units.group_names, (Skip("x", 1, "earlier"),))
    pinned = overflow.pin_groups(units, {1: "too big"})
    assert pinned.group_names == ("relu0[0]", "relu0[2]")
    assert pinned.layers[0].row_groups.tolist() == [0, FIXED, 1]
    assert pinned.layers[1].col_groups.tolist() == [0, FIXED, 1]
    assert pinned.layers[0].edits[1].row_groups.tolist() == [0, FIXED, 1]
    assert pinned.skipped == (Skip("x", 1, "earlier"), Skip("relu0", 1, "too big"))
    assert overflow.pin_groups(units, {}) is units


def test_transposed_and_grouped_layouts():
    """Gemm(transB=0) stores W as (in, out): rows on axis 1; grouped convs use 2-D columns."""
    weight = np.full((3, 2), 1000.0, dtype=np.float16)  # (in, out)
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [], "g", [], [], [tensors.make_tensor("W", weight, DTYPES["float16"])]
        )
    )
    u = np.array([5.0, 0.0, -5.0])  # 1000 * e^5 = 148413 > 65504
    edit = TensorEdit(
        "W",
        row_axis=1,
        row_groups=np.array([0, 1]),
        col_axis=0,
        col_groups=np.array([FIXED, 2, FIXED]),
    )
    units = ModelUnits(
        (LinearUnits("gemm", weight.T, np.array([0, 1]), np.array([FIXED, 2, FIXED]), (edit,)),),
        ("a", "b", "c"),
    )
    assert set(overflow.overflowing_groups(model, units, u)) == {0, 2}
    grouped = TensorEdit(
        "W",
        row_axis=1,
        row_groups=np.array([FIXED, FIXED]),
        col_axis=0,
        col_groups=np.array([[FIXED, 2, FIXED], [FIXED, FIXED, FIXED]]),
    )
    units = ModelUnits(
        (
            LinearUnits(
                "conv", weight.T, np.array([FIXED, FIXED]), np.array([FIXED, 2, FIXED]), (grouped,)
            ),
        ),
        ("a", "b", "c"),
    )
    assert set(overflow.overflowing_groups(model, units, u)) == {2}
