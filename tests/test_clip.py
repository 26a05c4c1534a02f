"""--rescale-clip: units behind Clip (ReLU6, one bound, negative bounds, opset-6 attributes,
opset-11+ inputs) and behind Min/Max against a constant are balanced exactly, each clip node
replaced by per-channel bounds that move with the units.

Small fixtures: x [2, 2, 6, 6] -> conv1 (2 -> 4, 3x3) -> <clip> -> conv2 (4 -> 3, 1x1) -> y;
conv1's 4 units are the only hidden units, so with the option exactly 4 balance and without it
none. Exactness is checked by running both models in onnxruntime on inputs large enough that
every clip clips, and the new bounds against the rows of conv1 they must follow.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_models as om
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnx_models import CH, ConvNet
from torch import nn
from torch_models import randomise

from onnxbalance import api
from onnxbalance.analysis import analyse
from onnxbalance.overflow import overflowing_groups
from onnxbalance.report import freeing_options
from sample_models.mobilenet import MobileNetV2Like

INF = np.inf


def _scalar(net: ConvNet, name: str, value: float, node: bool = False) -> str:
    return net.const(name, np.asarray(value, dtype=np.float32), node=node)


def clip_net(kind: str, opset: int = 13) -> onnx.ModelProto:
    net = ConvNet(f"clip_{kind}", seed=3)
    z = net.conv(net.input("x", [2, 2, 6, 6]), 2, CH, "conv1", pads=[1, 1, 1, 1])
    if kind == "relu6":
        h = net.op("Clip", [z, _scalar(net, "lo", 0.0), _scalar(net, "hi", 6.0)], "clip")
    elif kind == "negative":
        h = net.op("Clip", [z, _scalar(net, "lo", -1.5), _scalar(net, "hi", 2.0)], "clip")
    elif kind == "constant_nodes":  # the TorchScript exporter's Constant nodes
        lo, hi = _scalar(net, "lo", 0.0, node=True), _scalar(net, "hi", 6.0, node=True)
        h = net.op("Clip", [z, lo, hi], "clip")
    elif kind == "inverted":  # min > max: Clip gives max everywhere
        h = net.op("Clip", [z, _scalar(net, "lo", 2.0), _scalar(net, "hi", 1.0)], "clip")
    elif kind == "high_only":
        h = net.op("Clip", [z, "", _scalar(net, "hi", 1.0)], "clip")
    elif kind == "low_only":
        h = net.op("Clip", [z, _scalar(net, "lo", -0.5)], "clip")
    elif kind == "attributes":  # Clip-6: bounds are attributes
        h = net.op("Clip", [z], "clip", min=-1.0, max=6.0)
    elif kind == "min_max":  # what exporters write for ReLU6
        h = net.op("Max", [z, _scalar(net, "zero", 0.0)], "max")
        h = net.op("Min", [h, _scalar(net, "six", 6.0)], "clip")
    elif kind == "max_min":
        h = net.op("Min", [_scalar(net, "six", 6.0), z], "clip")
        h = net.op("Max", [h, _scalar(net, "zero", 0.0)], "max")
    elif kind == "max_zero":
        h = net.op("Max", [z, _scalar(net, "zero", 0.0)], "max")
    elif kind == "bounds_not_constant":
        lo = net.input("lo", [])
        h = net.op("Clip", [z, lo, _scalar(net, "hi", 6.0)], "clip")
    y = net.conv(h, CH, 3, "conv2", (1, 1))
    net.output(y)
    return net.build(opset)


# kind -> (opset, the replaced node's (low, high), ops that compute its output now)
EXACT = {
    "relu6": (13, "clip", (0.0, 6.0), ["Relu", "Min"]),
    "negative": (13, "clip", (-1.5, 2.0), ["Max", "Min"]),
    "constant_nodes": (13, "clip", (0.0, 6.0), ["Relu", "Min"]),
    "inverted": (13, "clip", (2.0, 1.0), ["Max", "Min"]),
    "high_only": (13, "clip", (-INF, 1.0), ["Min"]),
    "low_only": (13, "clip", (-0.5, INF), ["Max"]),
    "attributes": (10, "clip", (-1.0, 6.0), ["Max", "Min"]),
    "min_max": (13, "clip", (-INF, 6.0), ["Min"]),
    "max_min": (13, "clip", (-INF, 6.0), ["Min"]),
}


def _run(model: onnx.ModelProto, x: np.ndarray, *names: str) -> list[np.ndarray]:
    """The model's values of ``names`` (graph outputs are added for intermediates)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    declared = {o.name for o in copy.graph.output}
    for name in names:
        if name not in declared:
            copy.graph.output.append(helper.make_tensor_value_info(name, 1, None))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(list(names), {"x": x})


def _x() -> np.ndarray:
    return (4 * np.random.default_rng(0).standard_normal((2, 2, 6, 6))).astype(np.float32)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("kind", sorted(EXACT))
def test_clip_units_balance_exactly(kind):
    opset, node, (low, high), ops = EXACT[kind]
    model = clip_net(kind, opset)
    clip = next(n for n in model.graph.node if n.name == node)
    x = _x()
    z, before = _run(model, x, "conv1_out", "conv2_out")
    # the fixture is only a test if the clip really clips
    assert (z > high).any() or high == INF
    assert (z < low).any() or low == -INF

    balanced, report = api.balance(model, rescale_clip=True)

    assert report.rescale_clip and report.verify.passed
    assert (report.units_found, report.units_balanced, report.n_fixed) == (4, 4, 0)
    assert report.units_behind_clips == 4 and report.clips_replaced == (node,)
    (after,) = _run(balanced, x, "conv2_out")
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    # the output keeps its name; the clip is now the expected per-channel ops
    writers = [n for n in balanced.graph.node if clip.output[0] in n.output]
    assert [n.op_type for n in writers] == [ops[-1]] and writers[0].name == node
    new_ops = [n.op_type for n in balanced.graph.node if n.name.startswith(f"{node}/")]
    assert new_ops + [ops[-1]] == ops
    # each channel's bounds moved with that channel's row of conv1: bound_c / bound = a_c
    old, new = _initializers(model), _initializers(balanced)
    a = new["conv1_b"].astype(np.float64) / old["conv1_b"]
    np.testing.assert_allclose(
        new["conv1_W"] / old["conv1_W"], np.broadcast_to(a[:, None, None, None], (4, 2, 3, 3)),
        rtol=1e-5,
    )  # fmt: skip
    assert np.ptp(np.log(a)) > 0.1  # the channels moved by different factors
    for suffix, bound in (("low", low), ("high", high)):
        name = f"{node}/{suffix}"
        if not np.isfinite(bound) or bound == 0.0:
            assert name not in new
            continue
        assert new[name].shape == (4, 1, 1) and new[name].dtype == np.float32
        np.testing.assert_allclose(new[name].ravel(), bound * a, rtol=1e-6)
    # scalar bound initializers that nothing reads any more are gone
    assert not {"lo", "hi", "six"} & (set(new) - {i for n in balanced.graph.node for i in n.input})
    assert "Constant" not in {n.op_type for n in balanced.graph.node}
    onnx.checker.check_model(balanced, full_check=True)


@pytest.mark.parametrize("kind", sorted(EXACT))
def test_without_the_option_clip_units_stay_fixed_and_are_counted(kind):
    opset, node, _, _ = EXACT[kind]
    model = clip_net(kind, opset)
    units = analyse(model)
    assert units.n_groups == 0 and units.units_behind_clips == 4 and units.clips == ()
    (skip,) = units.skipped
    assert (skip.node, skip.count) == ("conv1", 4)
    first = "max" if kind == "min_max" else node  # the units stop at the first clip they meet
    assert f"'{first}', which is not positively homogeneous" in skip.reason
    assert "--rescale-clip" in skip.reason
    balanced, report = api.balance(model)
    assert not report.changed and report.clips_replaced == () and report.units_behind_clips == 4
    assert balanced.SerializeToString() == model.SerializeToString()


def test_max_with_zero_is_a_relu_that_needs_no_new_node_but_the_option():
    model = clip_net("max_zero")
    assert analyse(model).n_groups == 0  # as before the option existed
    balanced, report = api.balance(model, rescale_clip=True)
    assert report.verify.passed and report.units_balanced == 4 and report.clips_replaced == ()
    assert [n.op_type for n in balanced.graph.node] == ["Conv", "Max", "Conv"]
    old, new = _initializers(model), _initializers(balanced)
    assert new["zero"] == old["zero"] == 0 and not np.allclose(new["conv1_W"], old["conv1_W"])


def test_clip_whose_bounds_are_not_constants_leaves_its_units_fixed():
    model = clip_net("bounds_not_constant")
    units = analyse(model, rescale_clip=True)
    assert units.n_groups == 0 and units.clips == () and units.units_behind_clips == 0
    (skip,) = units.skipped
    assert skip == type(skip)("conv1", 4, "feeds Clip 'clip' whose bounds are not scalar constants")


def test_opset_7_clip_stays_fixed_for_want_of_broadcasting_min_and_max():
    units = analyse(clip_net("attributes", 7), rescale_clip=True)
    assert units.n_groups == 0 and units.units_behind_clips == 0  # the option decides nothing
    (skip,) = units.skipped
    assert "per-unit bounds need opset 8 or later, not 7" in skip.reason


def test_replacement_names_avoid_names_the_model_already_has():
    model = clip_net("relu6", 13)
    node = next(n for n in model.graph.node if n.name == "clip")
    node.output[0] = "clip/high"  # the name the bound tensor would take
    next(n for n in model.graph.node if n.name == "conv2").input[0] = "clip/high"
    balanced, report = api.balance(model, rescale_clip=True)
    assert report.verify.passed and report.units_balanced == 4
    assert {"clip_/high", "clip/high"} <= {t.name for t in balanced.graph.initializer} | {
        o for n in balanced.graph.node for o in n.output
    }


def test_report_and_cli_name_the_option(tmp_path, capsys):
    import json

    from onnxbalance.cli import main

    src = tmp_path / "in.onnx"
    onnx.save(clip_net("relu6", 13), src)
    for flag, replaced in (([], []), (["--rescale-clip"], ["clip"])):
        out, rep = tmp_path / f"out{len(flag)}.onnx", tmp_path / f"r{len(flag)}.json"
        assert main([str(src), str(out), "--report", str(rep), *flag]) == 0
        report = json.loads(rep.read_text())
        assert report["rescale_clip"] == bool(flag)
        assert report["units_behind_clips"] == 4 and report["clips_replaced"] == replaced
        text = capsys.readouterr().out
        assert "units behind clips" in text
        assert ("--rescale-clip balances them" in text) != bool(flag)
        assert ("1 clip node replaced" in text) == bool(flag)
    assert main([str(src), "--check", "--rescale-clip"]) == 1  # nothing written, not balanced
    assert "1 clip node to replace" in capsys.readouterr().out
    # --check on several models passes the option on: only with it can the clip's units move
    plain = tmp_path / "out0.onnx"  # balanced without the option: nothing moved
    assert main(["--check", str(src), str(plain)]) == 0
    assert capsys.readouterr().out.count(": balanced") == 2
    assert main(["--check", str(src), str(plain), "--rescale-clip"]) == 1
    assert capsys.readouterr().out.count(": NOT balanced") == 2


# ---------------------------------------------------------------- a MobileNetV2-shaped export


def _export(act, dynamo: bool, path) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = randomise(MobileNetV2Like(act=act), seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.zeros(2, 1, 16, 16),), str(path), dynamo=dynamo,
            input_names=["x"], output_names=["y"], opset_version=18 if dynamo else 17,
        )  # fmt: skip
    return onnx.load(str(path))


def _moving(units) -> set[tuple[int, str]]:
    """(layer position, unit) of each moving group: the dynamo exporter numbers node names
    differently in the ReLU and the ReLU6 export, but both have the same layers in order."""
    position = {layer.name: k for k, layer in enumerate(units.layers)}
    moving = set()
    for g in range(units.n_groups):
        layer, _, unit = units.group_names[g].rpartition(":")
        moving.add((position[layer], unit))
    return moving


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_mobilenet_v2_balances_every_unit_its_relu_version_does(dynamo, tmp_path):
    relu6 = _export(nn.ReLU6, dynamo, tmp_path / "relu6.onnx")
    relu = _export(nn.ReLU, dynamo, tmp_path / "relu.onnx")
    clips = sum(n.op_type == "Clip" for n in relu6.graph.node)
    assert clips == 13  # stem, 2 per block with expansion, 1 in the first block, head

    with_relu = analyse(relu)
    with_clip = analyse(relu6, rescale_clip=True)
    assert analyse(relu6).n_groups < with_relu.n_groups
    assert with_relu.n_groups > 0 and _moving(with_relu) <= _moving(with_clip)
    # every ReLU6 whose channels move is replaced; the conv names match across both exports
    assert len(with_clip.clips) >= 12

    balanced, report = api.balance(relu6, rescale_clip=True)
    assert report.verify.passed and report.units_balanced == with_clip.n_groups
    assert report.norm_after < report.norm_before
    x = np.random.default_rng(1).standard_normal((2, 1, 16, 16)).astype(np.float32) * 3
    (before,) = _run(relu6, x, "y")
    (after,) = _run(balanced, x, "y")
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    kept = sum(n.op_type == "Clip" for n in balanced.graph.node)
    assert kept == clips - len(report.clips_replaced)


def test_float16_bounds_that_would_overflow_pin_their_unit():
    # 60 * e^7.5 > 65504, the largest float16, while conv1's weights times e^7.5 still fit
    net = ConvNet("clip_fp16", seed=3, dtype=np.float16)
    z = net.conv(net.input("x", [2, 2, 6, 6]), 2, CH, "conv1", pads=[1, 1, 1, 1])
    lo, hi = (net.const(n, np.asarray(v, np.float16)) for n, v in (("lo", 0.0), ("hi", 60.0)))
    net.output(net.conv(net.op("Clip", [z, lo, hi], "clip"), CH, 3, "conv2", (1, 1)))
    model = net.build()
    units = analyse(model, rescale_clip=True)
    assert units.n_groups == 4
    weights = _initializers(model)["conv1_W"].astype(np.float64)
    assert np.abs(weights[0]).max() * np.exp(7.5) < 65504
    reasons = overflowing_groups(model, units, np.array([7.5, 0.0, 0.0, 0.0]))
    assert reasons == {0: "rescaled weights of 'clip/high' would overflow float16"}


def test_clips_between_dense_layers_take_one_bound_per_feature():
    # fc1 (5 -> 7) Clip(-1, 0.5) fc2 (MatMul + Add, 7 -> 6) Min(., 1) fc3 (6 -> 3): 7 + 6 units
    net = om.Net("dense_clip")
    z = net.gemm(net.input("x", ["N", 5]), 5, 7, "fc1")
    lo, hi = net.const("lo", np.float32(-1.0)), net.const("hi", np.float32(0.5))
    z2 = net.matmul(net.op("Clip", [z, lo, hi], "clip"), 7, 6, "fc2")
    h2 = net.op("Min", [z2, net.const("one", np.float32(1.0))], "min")
    net.output(net.gemm(h2, 6, 3, "fc3"))
    model = net.build()
    x = 4 * np.random.default_rng(2).standard_normal((64, 5)).astype(np.float32)
    z, z2, before = _run(model, x, "fc1_out", "fc2_add_out", "fc3_out")
    assert (z < -1).any() and (z > 0.5).any() and (z2 > 1).any() and (z2 < 1).any()

    balanced, report = api.balance(model, rescale_clip=True)

    assert report.verify.passed and report.units_balanced == 13
    assert report.clips_replaced == ("clip", "min")
    shapes = {t.name: tuple(t.dims) for t in balanced.graph.initializer if "/" in t.name}
    assert shapes == {"clip/low": (7,), "clip/high": (7,), "min/high": (6,)}
    (after,) = _run(balanced, x, "fc3_out")
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_a_clip_inside_a_loop_body_keeps_its_units_fixed_and_says_why():
    # loop_mlp's body is fc1 -> Relu -> fc2; its Relu becomes a ReLU6 here
    from subgraph_models import LOOP_HID, loop_mlp

    model = loop_mlp()
    body = next(n for n in model.graph.node if n.op_type == "Loop").attribute[0].g
    act = next(n for n in body.node if n.op_type == "Relu")
    body.initializer.extend(
        numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in (("lo", 0), ("hi", 6))
    )
    act.CopyFrom(helper.make_node("Clip", [act.input[0], "lo", "hi"], list(act.output), "relu6"))
    onnx.checker.check_model(model, full_check=True)
    units = analyse(model, rescale_clip=True)
    assert units.n_groups == 0 and units.clips == () and units.units_behind_clips == 0
    (skip,) = [s for s in units.skipped if "relu6" in s.reason]
    assert skip.count == LOOP_HID
    assert "inside a subgraph, where clips are not rewritten" in skip.reason


class HardSwishThenRelu6(nn.Module):
    """A hard swish as paddle2onnx and hand-written torch code write it, x * Clip(x + 3, 0, 6)
    / 6 (PP-PicoDet, PP-LCNet), then a ReLU6 block."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        h = self.first(x)
        h = h * torch.clamp(h + 3.0, 0.0, 6.0) / 6.0
        return self.head(torch.clamp(self.second(h), 0.0, 6.0))


def test_units_the_option_would_not_balance_are_not_offered_it():
    # x * Clip(x + 3, 0, 6) multiplies the unit by itself: --rescale-clip would move the clip's
    # bounds and still leave the unit fixed. Only the ReLU6 units are counted behind clips,
    # and the hard swish's say what else stops them.
    from torch_models import export

    model = export(randomise(HardSwishThenRelu6(), seed=3).eval(), torch.randn(1, 3, 12, 12))
    units = analyse(model)
    assert units.n_groups == 0 and units.units_behind_clips == 5
    reasons = {s.node: s.reason for s in units.skipped if s.count}
    (first,) = [r for node, r in reasons.items() if node.startswith("/first")]
    assert "fixed bounds [0, 6]; rescaled bounds would not free them: feeds Mul" in first
    assert "with scaled units on both inputs" in first and "--rescale-clip" not in first
    (second,) = [r for node, r in reasons.items() if node.startswith("/second")]
    assert second.endswith("(--rescale-clip moves them with the units)")
    _, report = api.balance(model)
    assert report.units_behind_clips == 5
    assert freeing_options(report.units_fixed) == {"--rescale-clip": 5}
    balanced, report = api.balance(model, rescale_clip=True)
    assert report.units_balanced == 5 and report.units_behind_clips == 5 and report.verify.passed
