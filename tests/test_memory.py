"""Block-wise |W|^p and page release for memory-mapped weights (onnxbalance.memory)."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest

from onnxbalance import memory, tensors
from onnxbalance.unitgraph import coupling_matrix


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
@pytest.mark.parametrize("p", [1.0, 2.0, 0.5, 3.0])
def test_abs_power_matches_direct(monkeypatch, dtype, p):
    monkeypatch.setattr(memory, "BLOCK_BYTES", 64)  # many blocks, a ragged last one
    monkeypatch.setattr(memory, "_TILE", 3)  # a transposed weight is read in several tiles
    weight = (np.random.default_rng(0).standard_normal((13, 5)) * 3).astype(dtype)
    expected = np.abs(weight.astype(np.float64)) ** p
    np.testing.assert_allclose(memory.abs_power(weight, p), expected, rtol=1e-15)
    np.testing.assert_allclose(memory.abs_power(weight.T, p), expected.T, rtol=1e-15)
    assert memory.abs_power(np.zeros((0, 4)), p).shape == (0, 4)
    # the same powers, and each row's largest |w| on the way, exactly
    maxima = np.full(13, np.nan)
    np.testing.assert_array_equal(memory.abs_power(weight, p, unit_max=maxima), expected)
    np.testing.assert_array_equal(maxima, np.abs(weight.astype(np.float64)).max(axis=1))
    assert maxima.max() > 3.0
    extremes = np.array([[3.4e38, -1e-45], [-1.4e-45, 0.0]], dtype=np.float32)
    memory.abs_power(extremes, 2.0, unit_max=maxima[:2])  # squares are exact, and their roots
    np.testing.assert_array_equal(maxima[:2], np.abs(extremes.astype(np.float64)).max(axis=1))
    empty_rows = np.full(3, np.nan)
    memory.abs_power(np.zeros((3, 0), dtype), p, unit_max=empty_rows)
    np.testing.assert_array_equal(empty_rows, 0.0)


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_coupling_of_mapped_weight_gives_pages_back(tmp_path):
    rows, cols = 2048, 2048  # 16 MB of float32
    weight = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
    tensor = tensors.make_tensor("W", weight, onnx.TensorProto.FLOAT)
    (tmp_path / "w.bin").write_bytes(tensor.raw_data)
    stub = tensors.copy_metadata(tensor)
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(weight.nbytes))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    mapped = tensors.read_array(stub, tmp_path)
    assert memory.mapped_buffer(mapped) is not None
    start = _rss_file_kb()
    float(mapped.sum())  # touch every page: they now count as resident
    touched = _rss_file_kb()
    assert touched - start > 0.8 * weight.nbytes / 1024
    coupling, _ = coupling_matrix(mapped, np.arange(cols), 2.0)
    assert _rss_file_kb() - start < 0.2 * weight.nbytes / 1024  # released after use
    np.testing.assert_allclose(coupling, weight.astype(np.float64) ** 2, rtol=1e-15)
    np.testing.assert_array_equal(mapped, weight)  # still readable after release


def test_abs_power_of_huge_values_is_inf_without_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = memory.abs_power(np.array([[1e200, 2.0]]), 2.0)
    assert result.tolist() == [[np.inf, 4.0]]


def test_populated_arrays_are_ordinary_and_never_released(monkeypatch):
    monkeypatch.setattr(memory, "POPULATE_BYTES", 0)
    weight = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    result = memory.abs_power(weight, 2.0)
    np.testing.assert_array_equal(result, weight.astype(np.float64) ** 2)
    assert result.flags.writeable and result.dtype == np.float64
    memory.release(result)  # a writable anonymous map: must not be dropped (it would read 0)
    np.testing.assert_array_equal(result, weight.astype(np.float64) ** 2)
    for dtype in (np.float64, np.float32):
        copy = memory.empty_populated((3, 5), dtype)
        copy[...] = 7.0
        assert copy.dtype == dtype and copy.sum() == 105.0


@pytest.mark.parametrize("stored_transposed", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(np.float64, 1e-14), (np.float32, 2.5e-7), (np.float16, 2.5e-7)]
)
def test_row_max_abs_matches_scaled_copy(monkeypatch, grouped, dtype, rtol, stored_transposed):
    from onnxbalance.scaling import scale_weight
    from onnxbalance.weightstats import unit_max

    monkeypatch.setattr(memory, "BLOCK_BYTES", 40)
    rng = np.random.default_rng(3)
    # a MatMul's weight is stored [in, out] and read as its transpose
    stored = rng.standard_normal((6, 9) if stored_transposed else (9, 6)).astype(dtype)
    weight = stored.T if stored_transposed else stored
    rows = rng.uniform(-2, 2, 9)
    cols = rng.uniform(-2, 2, (9, 6) if grouped else 6)
    expected = unit_max(scale_weight(weight.astype(np.float64), rows, cols))
    # float32 weights are scaled in float32: two roundings of 2^-24 each
    np.testing.assert_allclose(memory.row_max_abs(weight, rows, cols), expected, rtol=rtol)


@pytest.mark.parametrize("stored_transposed", [False, True])
def test_row_max_abs_redoes_float32_rows_that_overflow_or_underflow(stored_transposed):
    from onnxbalance.scaling import scale_weight
    from onnxbalance.weightstats import unit_max

    weight = np.array([[3e38, 1.0], [1e-38, 0.0], [0.0, 0.0], [2.0, -4.0]], dtype=np.float32)
    if stored_transposed:
        weight = np.ascontiguousarray(weight.T).T
    rows = np.zeros(4)
    cols = np.array([-20.0, 0.0])  # column 0 grows by e^20: 3e38 overflows float32
    expected = unit_max(scale_weight(weight.astype(np.float64), rows, cols))
    got = memory.row_max_abs(weight, rows, cols)
    assert np.isfinite(got).all() and got[0] > 1e46
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-14)  # redone in float64
    np.testing.assert_allclose(got, expected, rtol=2.5e-7)  # the others stay in float32
    shrink = np.array([30.0, 0.0])  # 1e-38 * e^-30 is below float32's smallest number
    got = memory.row_max_abs(weight, rows, shrink)
    expected = unit_max(scale_weight(weight.astype(float), rows, shrink))
    assert got[1] > 0
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-14)
    np.testing.assert_allclose(got, expected, rtol=2.5e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_arrays_share_one_allocation_below_the_populate_size(monkeypatch, dtype):
    shapes = [(3, 4), (0, 2), (5, 1)]
    arrays = memory.empty_arrays(shapes, dtype)
    assert [a.shape for a in arrays] == shapes and all(a.dtype == dtype for a in arrays)
    assert all(a.flags.c_contiguous for a in arrays)
    assert np.shares_memory(arrays[0].base, arrays[2].base)
    arrays[0][...] = 1.0
    arrays[2][...] = 2.0  # the arrays do not overlap
    assert np.all(arrays[0] == 1.0) and np.all(arrays[2] == 2.0)
    monkeypatch.setattr(memory, "POPULATE_BYTES", 8)
    apart = memory.empty_arrays(shapes, dtype)
    assert [a.shape for a in apart] == shapes
    assert not np.shares_memory(apart[0], apart[2], max_work=None)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("p", [2.0, 1.0, 0.7])
def test_abs_power_runs_sums_the_powers_block_by_block(monkeypatch, dtype, p):
    monkeypatch.setattr(memory, "BLOCK_BYTES", 100)  # two rows of 7 float64 columns a block
    weight = (np.random.default_rng(2).standard_normal((11, 7)) * 4).astype(dtype)
    powers = np.abs(weight.astype(np.float64)) ** p
    order = np.array([3, 0, 5, 1, 2, 6, 4])
    starts = np.array([0, 2, 3])
    for permuted in (order, None):
        columns = powers if permuted is None else powers[:, permuted]
        expected = np.stack([columns[:, 0:2].sum(1), columns[:, 2], columns[:, 3:].sum(1)], 1)
        maxima = np.full(11, np.nan)
        out = memory.abs_power_runs(weight, p, starts, np.empty((11, 3)), permuted, maxima)
        np.testing.assert_allclose(out, expected, rtol=1e-15)
        np.testing.assert_array_equal(maxima, np.abs(weight.astype(np.float64)).max(axis=1))
