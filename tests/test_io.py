"""Loading, checking and atomic writing: every failure is a one-line user error, nothing is left."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from gemm_mlp import gemm_mlp
from onnx import helper, numpy_helper

from onnxbalance import io, safewrite, tensors
from onnxbalance.errors import InputError, OutputError


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(gemm_mlp([6, 8, 3], seed=1), path)
    return path


def test_load_roundtrip(model_path):
    model = io.load_model(model_path)
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: d, "not a regular file"),
    ],
)
def test_load_missing_or_folder(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        io.load_model(make(tmp_path))


def test_load_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a protobuf at all\n" * 20)
    with pytest.raises(InputError, match="not an ONNX model"):
        io.load_model(path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="not an ONNX model"):
        io.load_model(path)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_load_truncated(model_path, tmp_path, fraction):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputError) as info:
        io.load_model(cut)
    assert "cut.onnx" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_invalid_graph(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"], "relu")],
        "broken",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(InputError, match="invalid ONNX model"):
        io.load_model(path)


def _with_weight_shape(model: onnx.ModelProto, name: str, shape: tuple[int, ...]):
    for tensor in model.graph.initializer:
        if tensor.name == name:
            values = np.ones(shape, dtype=np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values, name))
    return model


def test_load_refuses_a_weight_whose_shape_does_not_fit_the_graph(tmp_path):
    # The weight is declared to the checker rather than stored: strict shape inference must still
    # see its shape, or this mismatch (40 inputs expected, 41 given) would pass.
    model = gemm_mlp([41, 50, 3], seed=2, batch=4)
    weight = model.graph.node[0].input[1]
    stored = [list(t.dims) for t in model.graph.initializer if t.name == weight][0]
    path = tmp_path / "mismatch.onnx"
    onnx.save(_with_weight_shape(model, weight, (stored[0], stored[1] - 1)), path)
    with pytest.raises(InputError, match="invalid ONNX model"):
        io.load_model(path)


def test_checked_skeleton_declares_weights_and_keeps_small_constants():
    model = gemm_mlp([40, 50, 3], seed=2)
    model.graph.input.append(helper.make_tensor_value_info("B1", onnx.TensorProto.FLOAT, [3]))
    big = {t.name for t in model.graph.initializer if np.prod(t.dims) > 1024}
    skeleton = tensors.without_weights(model)
    declared = {v.name: v for v in skeleton.graph.input}
    assert big and big <= set(declared) and not big & {t.name for t in skeleton.graph.initializer}
    for tensor in model.graph.initializer:
        if tensor.name in big:
            shape = declared[tensor.name].type.tensor_type.shape
            assert [d.dim_value for d in shape.dim] == list(tensor.dims)
    kept = {t.name for t in skeleton.graph.initializer}
    assert kept == {t.name for t in model.graph.initializer} - big  # small ones and "B1"
    assert "B1" in kept and [v.name for v in skeleton.graph.input].count("B1") == 1
    assert skeleton.graph.node == model.graph.node and skeleton.opset_import == model.opset_import


@pytest.mark.parametrize("where", ["node name", "attribute doc", "opset domain"])
def test_load_refuses_text_that_is_not_utf8(tmp_path, where):
    model = gemm_mlp([4, 5, 3], seed=1)
    marker = "QQQQ"
    if where == "node name":
        model.graph.node[1].name = marker
    elif where == "attribute doc":
        model.graph.node[0].attribute[0].doc_string = marker
    else:
        model.opset_import.append(helper.make_opsetid(marker, 1))
    data = model.SerializeToString()
    assert data.count(marker.encode()) == 1
    path = tmp_path / "latin1.onnx"
    path.write_bytes(data.replace(marker.encode(), b"Q\xff\xfeQ"))
    with pytest.raises(InputError, match="not UTF-8"):
        io.load_model(path)


def test_external_data_loaded_relative_to_model(tmp_path, monkeypatch):
    model = gemm_mlp([40, 50, 3], seed=2)
    # onnx.save moves the weights of the proto it is given out to the file: read them first
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["W0"]
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(
        model, folder / "ext.onnx", save_as_external_data=True, location="ext.bin",
        size_threshold=0,
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)  # load from another working folder
    loaded = io.load_model(folder / "ext.onnx")
    stored = {t.name: t for t in loaded.graph.initializer}["W0"]
    assert tensors.is_external(stored)  # left on disk until read
    np.testing.assert_array_equal(tensors.read_array(stored, folder), expected)


def test_external_data_missing(tmp_path):
    model = gemm_mlp([40, 50, 3], seed=2)
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin")
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(InputError, match="cannot read external data file 'ext.bin'"):
        io.load_model(tmp_path / "ext.onnx")


def test_save_is_atomic_and_readable(tmp_path):
    model = gemm_mlp([6, 8, 3], seed=3)
    out = tmp_path / "out.onnx"
    io.save_model(model, out)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert onnx.load(out).SerializeToString() == model.SerializeToString()
    # mkstemp makes 0600 files; the output must have the usual umask-based mode
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OutputError, match="No space left"):
        io.save_model(gemm_mlp([6, 8, 3]), out)
    assert os.listdir(tmp_path) == []


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        io.save_model(gemm_mlp([6, 8, 3]), tmp_path / "nope" / "out.onnx")


def test_check_output_path_refuses_input(model_path, tmp_path):
    with pytest.raises(OutputError, match="same file as the input"):
        io.check_output_path(model_path, model_path)
    with pytest.raises(OutputError, match="same file as the input"):
        io.check_output_path(tmp_path / "." / "mlp.onnx", model_path)
    link = tmp_path / "link.onnx"
    link.symlink_to(model_path)
    with pytest.raises(OutputError, match="same file as the input"):
        io.check_output_path(link, model_path)
    hard = tmp_path / "hard.onnx"
    os.link(model_path, hard)
    with pytest.raises(OutputError, match="same file as the input"):
        io.check_output_path(hard, model_path)


def test_check_output_path_folder_errors(model_path, tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        io.check_output_path(tmp_path / "missing" / "out.onnx", model_path)
    with pytest.raises(OutputError, match="is a folder"):
        io.check_output_path(tmp_path, model_path)
    assert io.check_output_path(tmp_path / "new.onnx", model_path) == tmp_path / "new.onnx"


def test_load_inputs(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.ones((2, 3), np.float32))
    arrays = io.load_inputs(path)
    assert list(arrays) == ["x"] and arrays["x"].shape == (2, 3)
    with pytest.raises(InputError, match="no such file"):
        io.load_inputs(tmp_path / "missing.npz")
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(InputError, match="npz"):
        io.load_inputs(tmp_path / "one.npy")
    (tmp_path / "bad.npz").write_text("garbage")
    with pytest.raises(InputError, match="not a readable .npz"):
        io.load_inputs(tmp_path / "bad.npz")


def test_save_too_large_for_protobuf_keeps_weights_beside(tmp_path, monkeypatch):
    model = gemm_mlp([40, 50, 3], seed=5)
    monkeypatch.setattr(safewrite, "INLINE_BUDGET", 0)  # as if over 2 GB
    io.save_model(model, tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    loaded = io.load_model(tmp_path / "big.onnx")
    for a, b in zip(loaded.graph.initializer, model.graph.initializer, strict=True):
        np.testing.assert_array_equal(tensors.read_array(a, tmp_path), numpy_helper.to_array(b))
    assert tensors.external_names(onnx.load(tmp_path / "big.onnx", load_external_data=False))
    assert not tensors.external_names(model)  # the caller's model is left as it was


def test_loaded_weights_are_views_of_the_mapped_file_and_never_dropped(model_path):
    from onnxbalance import memory

    with tensors.arrays_kept():
        model = io.load_model(model_path)
        for tensor in model.graph.initializer:
            array = tensors.read_array(tensor)
            assert tensors.read_array(tensor) is array  # decoded once
            mapped = memory.mapped_buffer(array)
            assert mapped is not None and not isinstance(mapped, memory.DroppableMap)
            np.testing.assert_array_equal(array, numpy_helper.to_array(tensor))
    outside = io.load_model(model_path)  # outside arrays_kept: plain copies, as numpy_helper's
    array = tensors.read_array(outside.graph.initializer[0])
    assert memory.mapped_buffer(array) is None
    assert tensors.read_array(outside.graph.initializer[0]) is not array


def test_load_reads_files_that_cannot_be_mapped(model_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("mmap not supported on this filesystem")

    monkeypatch.setattr(tensors, "map_file", refuse)
    model = io.load_model(model_path)
    assert model == onnx.load(model_path)
