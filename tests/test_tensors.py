"""Lazy, checked tensor reads and dtype write-back (onnxbalance.tensors)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from mlp_models import DTYPES, mlp, save, set_external_entry
from onnx import helper, numpy_helper

from onnxbalance import memory, tensors
from onnxbalance.errors import InputError


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("external", [False, True])
def test_read_matches_onnx(tmp_path, dtype, external):
    model = mlp(dtype=dtype)
    path = save(model, tmp_path / "m.onnx", external=external)
    lazy = onnx.load(path, load_external_data=False)
    for stored, original in zip(lazy.graph.initializer, model.graph.initializer, strict=True):
        array = tensors.read_array(stored, tmp_path)
        expected = numpy_helper.to_array(original)
        assert array.dtype == tensors.numpy_dtype(DTYPES[dtype])
        assert array.shape == expected.shape
        np.testing.assert_array_equal(array.astype(np.float64), expected.astype(np.float64))
        assert not array.flags.writeable  # the input's bytes must never be edited in place
        assert (memory.mapped_buffer(array) is not None) == external


def test_typed_fields_and_release(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    typed = helper.make_tensor("t", onnx.TensorProto.FLOAT, [2, 3], values.ravel().tolist())
    np.testing.assert_array_equal(tensors.read_array(typed), values)
    half = helper.make_tensor("h", onnx.TensorProto.FLOAT16, [2, 3], values.astype(np.float16))
    np.testing.assert_array_equal(tensors.read_array(half), values.astype(np.float16))
    # release drops resident pages but the data stays readable
    path = save(mlp(), tmp_path / "m.onnx", external=True)
    weight = onnx.load(path, load_external_data=False).graph.initializer[0]
    array = tensors.read_array(weight, tmp_path)
    before = array.astype(np.float64)
    tensors.release(array)
    np.testing.assert_array_equal(array.astype(np.float64), before)
    tensors.release(values)  # ordinary arrays: nothing to do


def _external_weight(tmp_path):
    path = save(mlp(), tmp_path / "m.onnx", external=True)
    model = onnx.load(path, load_external_data=False)
    return model.graph.initializer[0], tmp_path / "m.onnx.bin"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("location", "../m.onnx.bin", "outside the model's folder"),
        ("location", "/etc/passwd", "outside the model's folder"),
        ("location", "missing.bin", "cannot read external data"),
        ("length", "7", "need"),
        ("offset", "999999999", "truncated"),
        ("offset", "-4", "negative"),
        ("offset", "abc", "non-numeric"),
    ],
)
def test_hostile_external_references(tmp_path, key, value, message):
    weight, _ = _external_weight(tmp_path)
    set_external_entry(weight, key, value)
    with pytest.raises(InputError, match=message) as info:
        tensors.read_array(weight, tmp_path)
    assert "W0" in str(info.value)


def test_symlink_escaping_folder_is_refused(tmp_path):
    weight, data = _external_weight(tmp_path)
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "link.bin").symlink_to(data)
    set_external_entry(weight, "location", "link.bin")
    with pytest.raises(InputError, match="outside"):
        tensors.read_array(weight, inner)


def test_truncated_data_file(tmp_path):
    weight, data = _external_weight(tmp_path)
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(InputError, match="truncated"):
        tensors.read_array(weight, tmp_path)


def test_wrong_inline_sizes():
    raw = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[3, 3])
    raw.raw_data = b"\0" * 20
    with pytest.raises(InputError, match="'w' holds 20 bytes"):
        tensors.read_array(raw)
    typed = onnx.TensorProto(name="v", data_type=onnx.TensorProto.FLOAT, dims=[4])
    typed.float_data.extend([1.0, 2.0])
    with pytest.raises(InputError, match="'v' holds 2 values"):
        tensors.read_array(typed)
    huge = onnx.TensorProto(name="big", data_type=onnx.TensorProto.FLOAT, dims=[2**40, 2**40])
    huge.raw_data = b"\0" * 16
    with pytest.raises(InputError, match="big"):
        tensors.read_array(huge)  # checked before anything is allocated
    negative = onnx.TensorProto(name="neg", data_type=onnx.TensorProto.FLOAT, dims=[-1])
    with pytest.raises(InputError, match="negative"):
        tensors.read_array(negative)
    unknown = onnx.TensorProto(name="u", data_type=12345, dims=[1])
    with pytest.raises(InputError, match="unknown element type"):
        tensors.read_array(unknown)


def test_external_without_folder():
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[1])
    weight.data_location = onnx.TensorProto.EXTERNAL
    set_external_entry(weight, "location", "w.bin")
    with pytest.raises(InputError, match="not loaded from a file"):
        tensors.read_array(weight, None)


@pytest.mark.parametrize(
    ("dtype", "fits", "overflows"),
    [
        ("float16", 65504.0, 65520.0),
        ("bfloat16", 3.3e38, 3.4e38),
        ("float32", 3.4e38, 3.5e38),
    ],
)
def test_to_dtype_flags_overflow(dtype, fits, overflows):
    np_dtype = tensors.numpy_dtype(DTYPES[dtype])
    values = np.array([[1.0, -fits], [overflows, -overflows], [np.inf, np.nan]])
    cast, mask = tensors.to_dtype(values, np_dtype)
    assert cast.dtype == np_dtype
    # inputs that were already inf/nan are the input's business, not an overflow of ours
    assert mask.tolist() == [[False, False], [True, True], [False, False]]
    assert np.isfinite(cast.astype(np.float64)[0]).all()


def test_float64_never_overflows():
    cast, mask = tensors.to_dtype(np.array([1e300, -1e308]), np.dtype(np.float64))
    assert not mask.any()
    assert cast.tolist() == [1e300, -1e308]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_make_tensor_round_trip(dtype):
    np_dtype = tensors.numpy_dtype(DTYPES[dtype])
    array = (np.arange(6).reshape(2, 3) - 2.5).astype(np_dtype)
    tensor = tensors.make_tensor("t", array, DTYPES[dtype])
    back = numpy_helper.to_array(tensor)
    np.testing.assert_array_equal(back.astype(np.float64), array.astype(np.float64))
    with pytest.raises(ValueError):
        tensors.make_tensor("t", array.astype(np.int32), DTYPES[dtype])


def test_iter_tensors_finds_attributes_and_subgraphs():
    const = helper.make_node(
        "Constant", [], ["c"], value=helper.make_tensor("cv", onnx.TensorProto.FLOAT, [1], [1.0])
    )
    inner = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["o"])],
        "branch",
        [],
        [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor("s", onnx.TensorProto.FLOAT, [1], [2.0])],
    )
    cond = helper.make_node("If", ["flag"], ["r"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph(
        [const, cond],
        "g",
        [helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor("init", onnx.TensorProto.FLOAT, [1], [3.0])],
    )
    names = sorted(t.name for t in tensors.iter_tensors(helper.make_model(graph)))
    assert names == ["cv", "init", "s", "s"]


def test_check_tensors_names_the_bad_one(tmp_path):
    model = mlp()
    tensors.check_tensors(model, None)  # a valid model passes
    packed = helper.make_tensor("q", onnx.TensorProto.INT4, [3], [1, -2, 3])
    model.graph.initializer.append(packed)
    tensors.check_tensors(model, None)  # packed 4-bit storage is not mistaken for a bad size
    assert tensors.read_array(packed).tolist() == [1, -2, 3]
    for field, value, message in [
        ("data_type", 9999, "unknown element type 9999"),
        ("raw_data", b"\0" * 3, "holds 3 bytes"),
    ]:
        broken = mlp()
        setattr(broken.graph.initializer[2], field, value)
        with pytest.raises(InputError, match=message) as info:
            tensors.check_tensors(broken, None)
        assert "W1" in str(info.value)
    typed = mlp()
    tensor = typed.graph.initializer[1]
    tensor.ClearField("raw_data")
    tensor.float_data.extend([1.0])
    with pytest.raises(InputError, match="'b0' holds 1 values"):
        tensors.check_tensors(typed, None)
    weight, _ = _external_weight(tmp_path)
    external = mlp()
    external.graph.initializer[0].CopyFrom(weight)
    tensors.check_tensors(external, tmp_path)
    set_external_entry(external.graph.initializer[0], "length", "4")
    with pytest.raises(InputError, match="W0"):
        tensors.check_tensors(external, tmp_path)
