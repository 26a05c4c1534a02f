"""Serializing a model with holes for streamed tensor data (protos.serialized_pieces)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxbalance import protos, tensors


def rich_model() -> onnx.ModelProto:
    """A model that sets fields before and after the graph, the initializers and raw_data."""
    rng = np.random.default_rng(0)
    inits = []
    for k, shape in enumerate([(300, 20), (300,), (7, 300), (7,), (130, 2)]):
        tensor = numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"t{k}")
        if k % 2 == 0:
            tensor.doc_string = f"tensor {k}"  # a field numbered after raw_data
            entry = tensor.metadata_props.add()
            entry.key, entry.value = "origin", "test"
        inits.append(tensor)
    inits.append(helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "t0", "t1"], ["h"], "g0", transB=1),
            helper.make_node("Relu", ["h"], ["r"], "relu"),
            helper.make_node("Gemm", ["r", "t2", "t3"], ["y"], "g1", transB=1),
        ],
        "rich",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7])],
        inits,
        doc_string="graph doc",
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 300])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests"
    )
    model.doc_string = "model doc"
    helper.set_model_props(model, {"author": "onnxbalance tests"})
    return model


def joined(pieces, data: dict[str, bytes]) -> bytes:
    return b"".join(data[p] if isinstance(p, str) else p for p in pieces)


@settings(max_examples=30, deadline=None)
@given(st.sets(st.sampled_from(["t0", "t1", "t2", "t3", "t4"])))
def test_pieces_with_the_data_put_back_are_the_serialized_model(streamed):
    model = rich_model()
    data = {t.name: t.raw_data for t in model.graph.initializer if t.HasField("raw_data")}
    stubbed = protos.map_tensors(
        model, lambda t: tensors.copy_metadata(t) if t.name in streamed else t
    )
    pieces = protos.serialized_pieces(stubbed, {name: len(data[name]) for name in streamed})
    assert joined(pieces, data) == model.SerializeToString(deterministic=True)
    assert sorted(p for p in pieces if isinstance(p, str)) == sorted(streamed)


def test_large_holes_need_multi_byte_lengths():
    # 200 000 bytes of data: the tensor's, the graph's and the model's lengths all grow a byte
    weight = numpy_helper.from_array(np.arange(50_000, dtype=np.float32), "w")
    graph = helper.make_graph([], "g", [], [], [weight])
    model = helper.make_model(graph)
    stubbed = protos.map_tensors(model, tensors.copy_metadata)
    pieces = protos.serialized_pieces(stubbed, {"w": len(weight.raw_data)})
    assert joined(pieces, {"w": weight.raw_data}) == model.SerializeToString()
    assert onnx.load_from_string(joined(pieces, {"w": weight.raw_data})) == model


def test_a_hole_must_be_a_main_graph_initializer():
    with pytest.raises(KeyError, match="nowhere"):
        protos.serialized_pieces(rich_model(), {"nowhere": 4})


def test_raw_spans_point_at_each_initializers_bytes():
    model = rich_model()
    data = model.SerializeToString()
    spans = protos.initializer_raw_spans(data)
    assert len(spans) == len(model.graph.initializer)
    for tensor, span in zip(model.graph.initializer, spans, strict=True):
        if tensor.HasField("raw_data"):
            offset, length = span
            assert data[offset : offset + length] == tensor.raw_data
        else:
            assert span is None  # "typed" keeps its values in float_data


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field, encoded by hand."""
    return protos._key(number) + protos._varint(len(payload)) + payload


def test_raw_spans_follow_protobuf_merging_rules():
    # Two graph fields merge (their initializers add up); a tensor whose raw_data occurs twice
    # keeps the last one.
    first = numpy_helper.from_array(np.arange(3, dtype=np.float32), "a")
    twice = (
        numpy_helper.from_array(np.arange(5, dtype=np.float32), "b").SerializeToString()
        + onnx.TensorProto(raw_data=np.full(5, 7, np.float32).tobytes()).SerializeToString()
    )
    data = helper.make_model(
        helper.make_graph([], "g", [], [], [first])
    ).SerializeToString() + _field(7, _field(5, twice))
    parsed = onnx.load_from_string(data)
    spans = protos.initializer_raw_spans(data)
    assert [t.name for t in parsed.graph.initializer] == ["a", "b"]
    assert parsed.graph.initializer[1].raw_data == np.full(5, 7, np.float32).tobytes()
    for tensor, (offset, length) in zip(parsed.graph.initializer, spans, strict=True):
        assert data[offset : offset + length] == tensor.raw_data


def test_raw_spans_refuse_data_cut_inside_a_field():
    data = rich_model().SerializeToString()
    with pytest.raises((ValueError, IndexError)):
        protos.initializer_raw_spans(data[: len(data) // 2])
