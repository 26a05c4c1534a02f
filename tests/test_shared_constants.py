"""Units that real exporters hide: shared and derived constants, linear bottlenecks, weights that
are graph outputs, and the outcome a pipeline sees.

Every model is balanced and then run in onnxruntime next to the original (independently of the
tool's own verification); the number of balanced units is derived by hand from the network.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_rewrite import feeds, max_error, run

from onnxbalance import TooFewBalancedError, balance
from onnxbalance.analysis import analyse
from onnxbalance.cli import main

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_models import export, export_dynamo  # noqa: E402 (needs torch)


def _torch_export(module: nn.Module, example, dynamo: bool) -> onnx.ModelProto:
    """Either exporter at its own default opset (20 for TorchScript with torch 2.13)."""
    module = module.eval()
    if dynamo:
        return export_dynamo(module, example)
    return export(module, example, opset=None)


def _balanced(model: onnx.ModelProto, **options):
    """Balance, then check the function in onnxruntime on random inputs; return the report."""
    out, report = balance(model, verify=False, **options)
    inputs = feeds(model)
    assert max_error(run(model, inputs), run(out, inputs)) <= 1e-5
    assert report.norm_after < report.norm_before * (1 - 1e-3)  # something really moved
    return out, report


class _FFN(nn.Module):
    """fc1 -> ReLU -> fc2 -> fc3 -> ReLU -> fc4, biases zero-initialised (an untrained model):
    the TorchScript exporter stores one zero bias for fc1 and fc3 (through an Identity)."""

    def __init__(self, zero_biases: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight *= 5.0  # an imbalance for the solver to remove
            for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
                if zero_biases:
                    nn.init.zeros_(fc.bias)
            if not zero_biases:  # one bias value for fc1 and fc3: stored once
                self.fc3.bias.copy_(self.fc1.bias)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.fc4(torch.relu(self.fc3(h)))


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("zero_biases", [True, False])
def test_torch_ffn_with_shared_biases(dynamo, zero_biases):
    model = _torch_export(_FFN(zero_biases), torch.zeros(2, 8), dynamo)
    stored = {t.name for t in model.graph.initializer}
    if not dynamo:  # the pattern under test: one bias tensor read by fc1 and (aliased) fc3
        assert "fc3.bias" not in stored
    _, report = _balanced(model)
    # fc1's 16 and fc3's 16 hidden units, and the 8 channels between fc2 and fc3 (linear);
    # fc4's outputs are not hidden units
    assert (report.units_found, report.units_balanced) == (16 + 8 + 16, 16 + 8 + 16)
    # zero biases need no copy (no factor changes them); fc1 and fc3 need different ones
    copies = 0 if zero_biases else 2
    assert report.copied_tensors == copies


class _DecoderLayer(nn.Module):
    """OPT's decoder layer with hidden_act='relu' in small: pre-LayerNorm attention and ReLU FFN,
    each with a residual; HF's initialisation (zero biases, LayerNorm beta 0 and gamma 1)."""

    def __init__(self, d: int = 16, heads: int = 2, ffn: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape

        def heads(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        h = self.ln1(x)
        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        attention = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        x = x + self.o(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.Sequential(_DecoderLayer(), _DecoderLayer())
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.5)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.layers[0].fc1.weight *= 4.0  # an imbalance for the solver to remove

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_opt_like_decoder_with_zero_biases(dynamo):
    # every zero bias is stored once by both exporters, and so is the LayerNorms' gamma (all
    # ones); per layer, the FFN's 32 hidden units, the 16 value channels that attention passes
    # to the output projection and the 16 channels of each LayerNorm (read by linear layers
    # alone) move (Softmax stops q and k, the residual stream from the input the rest)
    model = _torch_export(_Decoder(), torch.zeros(1, 5, 16), dynamo)
    _, report = _balanced(model)
    assert report.units_balanced == 2 * (32 + 16 + 16 + 16)
    # each LayerNorm gets a copy of the shared gamma; the zero betas stay zero, shared
    assert (report.copied_tensors, report.bytes_added) == (4, 4 * 16 * 4)


class _VGG(nn.Module):
    """Conv -> BN -> ReLU twice, pool, two Linear layers: torchvision's vgg with BN in small,
    zero conv biases (its initialisation), so every conv reads one stored zero bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        layers = []
        for cin, cout in ((3, 8), (8, 8), (8, 16)):
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            nn.init.zeros_(conv.bias)
            bn = nn.BatchNorm2d(cout)
            with torch.no_grad():
                bn.weight.uniform_(0.5, 3.0)
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
            layers += [conv, bn, nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc1, self.fc2 = nn.Linear(16, 12), nn.Linear(12, 5)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.features(x))))


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_vgg_with_batchnorm_and_zero_biases(dynamo):
    model = _torch_export(_VGG(), torch.zeros(1, 3, 8, 8), dynamo)
    _, report = _balanced(model)
    # every hidden channel: 8 + 8 + 16 conv channels and fc1's 12 units (fc2's are outputs)
    assert (report.units_found, report.units_balanced) == (8 + 8 + 16 + 12, 8 + 8 + 16 + 12)


class _Bottleneck(nn.Module):
    """MobileNetV2's linear bottleneck with a residual: stem (Conv-BN-ReLU) -> expand (Conv-BN-
    ReLU) -> project (Conv-BN, no activation) + stem's output -> head Conv -> ReLU -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)

        def conv_bn(cin, cout, k=1):
            bn = nn.BatchNorm2d(cout)
            with torch.no_grad():
                bn.weight.uniform_(0.5, 3.0)
                bn.running_var.uniform_(0.5, 2)
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), bn)

        self.stem, self.expand, self.project = conv_bn(3, 6, 3), conv_bn(6, 12), conv_bn(12, 6)
        self.head, self.fc = conv_bn(6, 10), nn.Linear(10, 4)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = self.project(torch.relu(self.expand(s))) + s
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


@pytest.mark.parametrize("dynamo", [False, True])
def test_linear_bottleneck_with_a_residual_add(dynamo):
    model = _torch_export(_Bottleneck(), torch.zeros(1, 3, 6, 6), dynamo)
    _, report = _balanced(model)
    # expand's 12 and head's 10; project's 6 reach the head linearly and are tied to stem's 6
    # through the Add: 6 groups, each counted once
    assert (report.units_found, report.units_balanced) == (12 + 6 + 10, 12 + 6 + 10)


# ---------------------------------------------------------------- patterns built by hand


def _gemm_relu_gemm(name: str, bias_nodes, bias_input: str, inits) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32) * 4, "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(3, 6)).astype(np.float32), "w2")
    nodes = list(bias_nodes) + [
        helper.make_node("Gemm", ["x", "w1", bias_input], ["z"], name="fc1", transB=1),
        helper.make_node("Relu", ["z"], ["h"], name="relu"),
        helper.make_node("Gemm", ["h", "w2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w1, w2, *inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bias_in_a_constant_node_through_identity_aliases():
    b = numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32), "b_value")
    nodes = [
        helper.make_node("Constant", [], ["b"], name="const", value=b),
        helper.make_node("Identity", ["b"], ["b_alias"], name="alias1"),
        helper.make_node("Identity", ["b_alias"], ["b_alias2"], name="alias2"),
    ]
    model = _gemm_relu_gemm("constant_bias", nodes, "b_alias2", [])
    out, report = _balanced(model)
    assert report.units_balanced == 6 and report.copied_tensors == 0
    # rescaled where it is stored, in the Constant node; every other node stays as it was
    assert out.graph.node[0].attribute[0].t.name == "b_value"
    new_b = numpy_helper.to_array(out.graph.node[0].attribute[0].t)
    assert new_b.shape == (6,) and not np.array_equal(new_b, numpy_helper.to_array(b))
    assert out.graph.node[1:] == model.graph.node[1:]


def test_paddle_style_reshaped_conv_bias():
    # paddle2onnx: Add(Conv(x, W), Reshape(bias, [1, C, 1, 1])), the bias also shared by two
    # convs through one Reshape (bit-identical values stored once)
    rng = np.random.default_rng(4)
    c = 4
    inits = [
        numpy_helper.from_array(rng.normal(size=(c, 2, 3, 3)).astype(np.float32) * 3, "w1"),
        numpy_helper.from_array(rng.normal(size=(c, c, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(c, c, 1, 1)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array([1, c, 1, 1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Reshape", ["bias", "shape"], ["bias4"], name="reshape"),
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Add", ["c1", "bias4"], ["z1"], name="add1"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Conv", ["h1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "bias4"], ["z2"], name="add2"),
        helper.make_node("Relu", ["z2"], ["h2"], name="relu2"),
        helper.make_node("Conv", ["h2", "w3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 5, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = _balanced(model)
    assert (report.units_found, report.units_balanced) == (2 * c, 2 * c)  # conv3's: outputs
    assert report.copied_tensors == 2  # conv1 and conv2 need different factors
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert np.array_equal(stored["bias"], numpy_helper.to_array(inits[3]))  # source untouched

    # read by conv1 alone (conv2 without a bias): rescaled in place, where it is stored
    model.graph.node[5].input[1] = "c2"  # add2 becomes c2 + c2: conv2's channels, doubled
    out, report = _balanced(model)
    assert (report.units_balanced, report.copied_tensors) == (2 * c, 0)
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert stored["bias"].shape == (c,)
    assert not np.array_equal(stored["bias"], numpy_helper.to_array(inits[3]))


def test_weight_that_is_also_a_graph_output_is_never_edited():
    # fc1's weight is also an output of the graph: the output must stay bit-identical (it used
    # to change silently with --no-verify); its small bias is copied, its weight matrix is not
    model = _gemm_relu_gemm("weight_output", [], "b1", [])
    b1 = numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32), "b1")
    model.graph.initializer.append(b1)
    model.graph.output.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [6, 4]))
    model.graph.output.append(helper.make_tensor_value_info("b1", TensorProto.FLOAT, [6]))
    out, report = balance(model, verify=False)
    inputs = feeds(model)
    before, after = run(model, inputs), run(out, inputs)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[2], after[2])
    assert report.units_balanced == 0
    reasons = {entry.reason for entry in report.units_fixed}
    assert "weight 'w1' is also a graph output" in reasons

    out, report = _balanced(model, copy_shared_weights=True)
    after = run(out, inputs)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[2], after[2])
    assert report.units_balanced == 6
    assert report.bytes_added == (6 * 4 + 6) * 4  # w1 and b1 copied for fc1


def test_one_weight_read_twice_with_the_same_units_is_edited_once():
    # fc2 and fc2b read the same hidden units through one weight (unrolled steps): their edits
    # agree, so the weight is edited in place and no copy is made
    model = _gemm_relu_gemm("read_twice", [], "b1", [])
    model.graph.initializer.append(
        numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32), "b1")
    )
    model.graph.node.append(helper.make_node("Gemm", ["h", "w2"], ["y2"], name="fc2b", transB=1))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 3]))
    units = analyse(model)
    assert units.copies == ()
    assert sorted(layer.name for layer in units.layers) == ["fc1", "fc2"]  # w2 counts once
    _, report = _balanced(model)
    assert report.units_balanced == 6


# ---------------------------------------------------------------- the outcome a pipeline sees


def test_min_balanced_exits_5_and_the_summary_warns(tmp_path, capsys):
    model = _gemm_relu_gemm("weight_output", [], "b1", [])
    model.graph.initializer.append(
        numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32), "b1")
    )
    model.graph.output.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [6, 4]))
    src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)

    assert main([str(src), str(dst)]) == 0
    out, _ = capsys.readouterr()
    first = next(line for line in out.splitlines() if "│" in line)  # the table's first row
    assert "WARNING" in first and "nothing balanced: all 6 units found are fixed" in first

    dst.unlink()
    code = main([str(src), str(dst), "--min-balanced", "0.5", "--report", str(report)])
    _, err = capsys.readouterr()
    assert code == 5 and not dst.exists()
    assert err.startswith("onnxbalance: error: ") and "less than --min-balanced 0.5" in err
    assert json.loads(report.read_text())["balanced_fraction"] == 0.0
    with pytest.raises(TooFewBalancedError):
        balance(model, min_balanced=0.1)

    assert main([str(src), str(dst), "--copy-shared-weights", "--min-balanced", "0.5"]) == 0
    out, _ = capsys.readouterr()
    assert "WARNING" not in out and "private copies" in out
    assert main([str(src), str(dst), "--min-balanced", "1.5"]) == 2
    assert "--min-balanced must be a fraction" in capsys.readouterr().err


def test_a_scalar_shift_shared_by_two_layers_is_expanded_per_channel():
    # x + k with one stored k for every channel, read by two layers' Adds (a learnt scalar
    # shift, paddle's mobile blocks): each Add gets a private [C, 1] copy scaled with its units
    model = _gemm_relu_gemm("scalar_shift", [], "b1", [])
    model.graph.initializer.append(
        numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32), "b1")
    )
    w3 = np.random.default_rng(5).normal(size=(5, 3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(np.array([0.7], np.float32), "k"))
    model.graph.initializer.append(numpy_helper.from_array(w3, "w3"))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    nodes = model.graph.node
    nodes[0].output[0] = "z0"
    nodes.insert(1, helper.make_node("Add", ["z0", "k"], ["z"], name="shift1"))
    nodes[-1].output[0] = "y0"
    nodes.append(helper.make_node("Add", ["y0", "k"], ["y1"], name="shift2"))
    nodes.append(helper.make_node("Relu", ["y1"], ["h2"], name="relu2"))
    nodes.append(helper.make_node("Gemm", ["h2", "w3"], ["y"], name="fc3", transB=1))
    out, report = _balanced(model)
    assert report.units_balanced == 6 + 3
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    assert shapes["k.shift1"] == [6] and shapes["k.shift2"] == [3] and shapes["k"] == [1]


def test_reasons_name_the_true_obstacle():
    # a Reshape whose target shape is an input: the channels' destination is a run-time value
    model = _gemm_relu_gemm("runtime_reshape", [], "b1", [])
    model.graph.initializer.append(
        numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32), "b1")
    )
    model.graph.input.append(helper.make_tensor_value_info("target", TensorProto.INT64, [2]))
    fc2 = model.graph.node[2]
    fc2.input[0] = "h2"
    model.graph.node.insert(2, helper.make_node("Reshape", ["h", "target"], ["h2"], name="r"))
    reasons = {skip.reason for skip in analyse(model).skipped}
    assert reasons == {"feeds Reshape 'r', whose target shape is computed at run time"}


def test_a_shared_weight_matrix_is_copied_only_when_asked():
    # fc2 and fc3 apply one square W to different units: without the option W stays shared and
    # its readers fixed (test_analysis); with it each gets a copy and every hidden layer moves
    import onnx_models as om

    model = om.shared_weight()
    assert analyse(model).copies == ()
    units = analyse(model, copy_weights=True)
    assert [(c.name, c.source) for c in units.copies] == [("W.fc2", "W"), ("W.fc3", "W")]
    out, report = _balanced(model, copy_shared_weights=True)
    assert report.units_balanced == 4 * om.HID  # fc0, fc1, fc2, fc3; fc4's are outputs
    assert report.bytes_added == 2 * om.HID * om.HID * 4
    stored = {t.name: t for t in out.graph.initializer}
    original = {t.name: t for t in model.graph.initializer}
    assert stored["W"].SerializeToString() == original["W"].SerializeToString()


def test_bias_folded_through_shape_only_subexpressions():
    # Unsqueeze -> Cast (float64 -> float32) -> Expand -> Squeeze -> Transpose -> Flatten of a
    # stored float64 vector: folded into one private float32 bias for the layer
    chain = [
        helper.make_node("Unsqueeze", ["b64", "axis0"], ["u"], name="unsqueeze"),
        helper.make_node("Cast", ["u"], ["c"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Expand", ["c", "ones"], ["e"], name="expand"),
        helper.make_node("Squeeze", ["e", "axis0"], ["s"], name="squeeze"),
        helper.make_node("Transpose", ["s"], ["t"], name="transpose", perm=[0]),
        helper.make_node("Flatten", ["t"], ["f"], name="flatten", axis=0),
        helper.make_node("Squeeze", ["f", "axis0"], ["b"], name="squeeze2"),
    ]
    inits = [
        numpy_helper.from_array(np.linspace(-2, 2, 6), "b64"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1, 6], np.int64), "ones"),
    ]
    model = _gemm_relu_gemm("folded_bias", chain, "b", inits)
    out, report = _balanced(model)
    assert report.units_balanced == 6 and report.copied_tensors == 1
    (copy,) = analyse(model).copies
    assert (copy.name, list(copy.value.dims), copy.value.data_type) == ("b.fc1", [6], 1)
