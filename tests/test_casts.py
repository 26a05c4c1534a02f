"""Units through Cast and CastLike between float types.

float16 converters keep some ops in float32 and put a Cast on each side of them
(onnxconverter-common keeps Resize and Upsample, among others, in its default block list): an
upsampling network converted that way must balance as well as its float32 original. Casts to
anything but a float type stop the units, with a reason. Every balanced model is run next to
the original in onnxruntime here, independently of the tool's own verification.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from arch_reference import assert_equivalent
from onnx import TensorProto, helper, numpy_helper
from onnx_models import HID, IN, OPSET, OUT, Net

from onnxbalance import balance
from onnxbalance.analysis import analyse

torch = pytest.importorskip("torch")
pytest.importorskip("onnxconverter_common")
nn = torch.nn

from torch_models import export, export_dynamo, randomise  # noqa: E402 (needs torch)
from verify_models import float16  # noqa: E402


class UpsamplingNet(nn.Module):
    """Conv-Relu, upsample, Conv-Relu, upsample, a 1x1 head: the decoder half of a U-Net or an
    FPN, in miniature. Hidden units: 8 + 6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        h = torch.relu(self.conv2(h))
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="bilinear")
        return self.head(h)


def _exported(dynamo: bool) -> onnx.ModelProto:
    module = randomise(UpsamplingNet(), seed=4).eval()
    example = torch.randn(1, 3, 6, 6)
    return export_dynamo(module, example) if dynamo else export(module, example)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_float16_conversion_with_resize_kept_in_float32_balances_every_unit(dynamo):
    model = float16(_exported(dynamo))
    producers = {out: node for node in model.graph.node for out in node.output}
    resizes = [node for node in model.graph.node if node.op_type == "Resize"]
    assert len(resizes) == 2
    for resize in resizes:  # the converter's pattern: Cast -> Resize -> Cast
        assert producers[resize.input[0]].op_type == "Cast"
        readers = [n for n in model.graph.node if resize.output[0] in n.input]
        assert [n.op_type for n in readers] == ["Cast"]
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    feed = {model.graph.input[0].name: x}
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == 8 + 6
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    assert report.verify.passed
    # float16 hidden values: round-off of about 1e-3 of the outputs' scale
    assert_equivalent(model, balanced, feed, rtol=1e-2)


_TARGETS = {
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "double": TensorProto.DOUBLE,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}


def _cast_between_layers(target: int, like: bool) -> onnx.ModelProto:
    """x -> fc1 -> Relu -> Cast(target) -> Cast(float) -> fc2 -> y (float32 weights), the first
    Cast a CastLike of a stored scalar of the target's type when ``like``."""
    rng = np.random.default_rng(1)
    skew = np.exp(rng.standard_normal((6, 1)))  # something to balance
    weights = [
        numpy_helper.from_array((rng.standard_normal((6, 4)) * skew).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "B1"),
        numpy_helper.from_array((rng.standard_normal((3, 6)) / skew.T).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h0"], "fc1", transB=1),
        helper.make_node("Relu", ["h0"], ["h"], "relu"),
        helper.make_node("Cast", ["c"], ["back"], "back", to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["back", "W2"], ["y"], "fc2", transB=1),
    ]
    if like:
        nodes.insert(2, helper.make_node("CastLike", ["h", "like"], ["c"], "there"))
        weights.append(helper.make_tensor("like", target, [], [0]))
    else:
        nodes.insert(2, helper.make_node("Cast", ["h"], ["c"], "there", to=target))
    graph = helper.make_graph(
        nodes, "cast_between_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("like", [False, True], ids=["Cast", "CastLike"])
@pytest.mark.parametrize("target", list(_TARGETS))
def test_casts_pass_the_units_to_float_types_only(target, like):
    model = _cast_between_layers(_TARGETS[target], like)
    units = analyse(model)
    op = "CastLike" if like else "Cast"
    if target in ("int32", "bool"):
        assert units.n_groups == 0
        assert [(s.count, s.reason) for s in units.skipped] == [
            (6, f"feeds {op} 'there', which does not cast to a float type")
        ]
        return
    assert units.n_groups == 6 and not units.skipped
    feed = {"x": np.random.default_rng(2).standard_normal((16, 4)).astype(np.float32)}
    balanced, report = balance(model, inputs=feed)
    assert report.units_balanced == 6
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    # the hidden values are rounded to the target's precision on the way: bfloat16's 2^-8
    assert_equivalent(model, balanced, feed, rtol=3e-2 if target == "bfloat16" else 1e-2)


def test_a_castlike_reads_only_the_dtype_of_the_units_it_is_like():
    # CastLike(k, h) takes h's dtype, never its values: h's units reach nothing there
    net = Net("castlike_of_a_constant", seed=5)
    h = net.relu(net.gemm(net.input("x", ["N", IN]), IN, HID, "fc1"), "relu")
    shift = net.op("CastLike", [net.const("shift", net.rng.standard_normal(OUT)), h], "like_h")
    net.op("Add", [net.gemm(h, HID, OUT, "fc2"), shift], "shifted", output="y")
    net.output("y")
    model = net.build()
    units = analyse(model)
    assert units.n_groups == 6 and not units.skipped
    feed = {"x": net.rng.standard_normal((16, IN)).astype(np.float32)}
    balanced, report = balance(model, inputs=feed)
    assert report.units_balanced == 6 and report.norm_after < report.norm_before * (1 - 1e-3)
    assert_equivalent(model, balanced, feed)


def test_the_dynamo_exporter_without_its_optimiser_casts_no_unit_away():
    # its attention casts the softmax scale like q and k, whose units then go no further
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    module = randomise(layer, seed=6).eval()
    example = torch.randn(2, 5, 16)
    raw, optimised = (export_dynamo(module, example, optimize=flag) for flag in (False, True))
    assert any(n.op_type == "CastLike" for n in raw.graph.node)
    reasons = [(s.count, s.reason) for s in analyse(raw).skipped]
    assert not [r for r in reasons if "CastLike" in r[1]], reasons
    feed = {raw.graph.input[0].name: example.numpy()}  # torch names it after forward's argument
    (_, expected), (balanced, report) = (balance(m, inputs=feed) for m in (optimised, raw))
    assert report.units_balanced == expected.units_balanced > 0
    assert_equivalent(raw, balanced, feed)
