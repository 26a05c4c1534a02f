"""Models stored with external data go through analysis and rewrite lazily, with the same
result as when every tensor is in memory; float16/bfloat16/float64 weights are rewritten in
their own dtype and keep the function."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_models as om
import pytest
from mlp_models import DTYPES, mlp, save
from onnx import numpy_helper
from test_rewrite import RUNNABLE

from onnxbalance import memory, safewrite, tensors
from onnxbalance.analysis import analyse
from onnxbalance.rewrite import rewrite


def _lazy_copy(model: onnx.ModelProto, folder) -> onnx.ModelProto:
    path = folder / "m.onnx"
    onnx.save_model(
        onnx.ModelProto.FromString(model.SerializeToString()),
        path,
        save_as_external_data=True,
        location="m.onnx.bin",
        size_threshold=0,
        convert_attribute=True,  # Constant nodes' values too
    )
    return onnx.load(path, load_external_data=False)


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: tensors.read_array(t).astype(np.float64) for t in tensors.iter_tensors(model)}


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_lazy_analysis_and_rewrite_match_eager(tmp_path, name):
    model = RUNNABLE[name]()
    lazy = _lazy_copy(model, tmp_path)
    assert tensors.external_names(lazy)  # really stored outside
    eager_units = analyse(model)
    with tensors.external_folder(tmp_path):
        lazy_units = analyse(lazy)
    assert lazy_units.group_names == eager_units.group_names
    assert lazy_units.skipped == eager_units.skipped
    for a, b in zip(lazy_units.layers, eager_units.layers, strict=True):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.row_groups, b.row_groups)
    u = np.random.default_rng(0).uniform(-2, 2, eager_units.n_groups)
    with tensors.external_folder(tmp_path):
        lazy_out = rewrite(lazy, lazy_units, u)
        lazy_values = _values(lazy_out)
    eager_values = _values(rewrite(model, eager_units, u))
    assert lazy_values.keys() == eager_values.keys()
    for key, value in eager_values.items():
        np.testing.assert_array_equal(lazy_values[key], value, err_msg=key)
    was_external = tensors.external_names(lazy)
    for tensor in tensors.iter_tensors(lazy_out):
        if tensor.name in was_external:  # rewritten as raw bytes, never Python float lists
            assert tensors.is_external(tensor) or tensor.HasField("raw_data")
            assert not tensor.float_data and not tensor.double_data


def test_lazy_weights_are_memory_mapped(tmp_path):
    lazy = _lazy_copy(om.deep_mlp(3), tmp_path)
    with tensors.external_folder(tmp_path):
        units = analyse(lazy)
    assert units.layers and all(memory.mapped_buffer(layer.weight) for layer in units.layers)


def _forward(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """float64 reference forward pass of a Gemm(transB=1)+Relu chain (no onnxruntime: it has no
    bfloat16 Gemm on CPU)."""
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    env = {"x": x}
    for node in model.graph.node:
        if node.op_type == "Gemm":
            a, w, b = (env.get(n, values.get(n)) for n in node.input)
            env[node.output[0]] = a @ w.T + b
        else:
            env[node.output[0]] = np.maximum(env[node.input[0]], 0.0)
    return env["y"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("external", [False, True])
def test_dtypes_rewritten_in_their_own_type(tmp_path, dtype, external):
    model = mlp(widths=(6, 16, 12, 4), dtype=dtype, seed=3, spread=1.0)
    path = save(model, tmp_path / "in.onnx", external=external)
    lazy = onnx.load(path, load_external_data=False)
    with tensors.external_folder(tmp_path):
        units = analyse(lazy)
        u = np.random.default_rng(1).uniform(-1, 1, units.n_groups)
        balanced = rewrite(lazy, units, u)
    out = tmp_path / "out" / "b.onnx"
    out.parent.mkdir()
    safewrite.save_model(balanced, out, base_dir=tmp_path, external=tensors.external_names(lazy))
    stored = onnx.load(out)
    for before, after in zip(model.graph.initializer, stored.graph.initializer, strict=True):
        assert after.data_type == before.data_type == DTYPES[dtype]
    assert (tensors.external_names(onnx.load(out, load_external_data=False)) != set()) == external
    x = np.random.default_rng(2).standard_normal((5, 6))
    reference, result = _forward(model, x), _forward(stored, x)
    eps = {"float16": 2**-11, "bfloat16": 2**-8, "float32": 2**-24, "float64": 2**-53}[dtype]
    # each weight is rounded once more than in the input: a few ulps of the output scale
    scale = np.abs(reference).max()
    np.testing.assert_allclose(result, reference, atol=40 * eps * scale, rtol=0)


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_block_wise_rewrite_equals_whole(monkeypatch, name):
    model = RUNNABLE[name]()
    units = analyse(model)
    u = np.random.default_rng(4).uniform(-2, 2, units.n_groups)
    whole = _values(rewrite(model, units, u))
    monkeypatch.setattr(memory, "BLOCK_BYTES", 24)  # blocks of one to three rows
    blocked = _values(rewrite(model, units, u))
    for key, value in whole.items():
        np.testing.assert_array_equal(blocked[key], value, err_msg=key)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_streamed_output_is_the_float32_rule_bit_for_bit(tmp_path, monkeypatch, dtype):
    # what balance_file writes: rescaled blocks streamed into the staged data file
    from test_rewrite import float32_rule

    from onnxbalance import api
    from onnxbalance.rewrite import tensor_edits

    path = save(mlp(widths=(9, 40, 33, 5), dtype=dtype, seed=8), tmp_path / "in.onnx", True)
    model = onnx.load(path, load_external_data=False)
    monkeypatch.setattr(memory, "BLOCK_BYTES", 4 * 4 * 40 * 3)  # several blocks per weight
    with tensors.external_folder(tmp_path):
        units = analyse(model)
        u = np.random.default_rng(9).uniform(-2, 2, units.n_groups)
        produce = api._rewrite_while_writing(model, tmp_path / "out.onnx", path, tmp_path,
                                             api._Timer(None))  # fmt: skip
        with produce(units, u) as staged:
            written = {t.name: t for t in onnx.load(staged.model_path).graph.initializer}
    up, down = np.append(np.exp(u), 1.0), np.append(np.exp(-u), 1.0)
    edits = tensor_edits(units)
    assert {"W0", "W1", "W2", "b0", "b1"} <= edits.keys()
    for tensor in model.graph.initializer:
        with tensors.external_folder(tmp_path):
            original = tensors.read_array(tensor)
        new = numpy_helper.to_array(written[tensor.name])
        if tensor.name not in edits:
            assert new.tobytes() == original.tobytes()
            continue
        (edit,) = edits[tensor.name]
        rows = up[edit.row_groups] if edit.row_groups is not None else np.ones(len(original))
        cols = down[edit.col_groups] if edit.col_groups is not None else np.ones(1)
        expected = float32_rule(original.reshape(len(original), -1), rows, cols)
        assert new.dtype == original.dtype
        assert new.tobytes() == expected.tobytes(), tensor.name
