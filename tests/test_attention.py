"""Attention's value path: a value projection's channels pass the split into heads, the
probabilities' MatMul and the join back, so they are hidden units of the value and output
projections (torch's exports of hand-written attention, of nn.MultiheadAttention's packed
projection and of GPT-2's split one; hand-built layouts against a brute-force simulation)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from arch_reference import assert_equivalent
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_models import Net

from onnxbalance import balance
from onnxbalance.analysis import analyse
from onnxbalance.analysis.graph import GraphIndex
from onnxbalance.analysis.passthrough import Carrier, relaid, resolved_reshapes
from onnxbalance.analysis.shapes import infer_shapes
from onnxbalance.unitgraph import FIXED

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_models import export, export_dynamo, skewed  # noqa: E402 (needs torch)

D, HEADS, FFN = 16, 4, 24


def _feed(model: onnx.ModelProto, shape: tuple[int, ...], seed: int = 0) -> dict:
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return {model.graph.input[0].name: x}


class _Attention(nn.Module):
    """OPT-style attention: a LayerNorm, separate projections split into heads with sizes read
    off the layer's input (view + transpose), the output projection read by a ReLU FFN (no
    residual: the projection's rows are hidden units)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, 3)

    def forward(self, x):
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, t, HEADS, -1).transpose(1, 2)

        h = self.norm(x)
        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        y = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v
        y = self.o(y.transpose(1, 2).reshape(b, t, D))
        return self.fc2(torch.relu(self.fc1(y)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_value_channels_pass_attention_for_any_batch_and_length(dynamo):
    module = skewed(_Attention(), seed=1)
    example = torch.randn(2, 5, D)
    if dynamo:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
        model = export_dynamo(module, example, dynamic_shapes=(dims,))
    else:  # the view's sizes come from Shape(x) while it reshapes q(norm(x)): ONNX names
        # those sizes alike, but cannot tell the view's output shape
        model = export(module, example, dynamic_axes={"x": {0: "batch", 1: "length"}})
    feed = _feed(model, (3, 7, D))  # sizes the export never saw
    balanced, report = balance(model, inputs=feed)
    # the LayerNorm's 16 channels (read by q, k and v alone), v's 16, o's 16 (read by fc1) and
    # fc1's 24; q and k meet in one MatMul
    assert (report.units_found, report.units_balanced) == (5 * D + FFN, 3 * D + FFN)
    assert {entry.count for entry in report.units_fixed} == {D}
    assert all("with scaled units on both inputs" in e.reason for e in report.units_fixed)
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    assert report.verify is not None and report.verify.passed
    assert_equivalent(model, balanced, feed)


class _TorchAttention(nn.Module):
    """nn.MultiheadAttention (one packed [3 D, D] projection for q, k and v), then a ReLU FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, 3)

    def forward(self, x):
        y, _ = self.attention(x, x, x, need_weights=False)
        return self.fc2(torch.relu(self.fc1(y)))


def _check_packed(module: nn.Module, dynamo: bool) -> None:
    """One projection makes q, k and v: its v rows (D), the output projection's rows (D) and
    fc1's FFN units balance, exactly."""
    example = torch.randn(2, 5, D)
    model = export_dynamo(module, example) if dynamo else export(module, example)
    feed = _feed(model, (2, 5, D))
    balanced, report = balance(model, inputs=feed)
    assert (report.units_found, report.units_balanced) == (3 * D + D + FFN, 2 * D + FFN)
    assert report.verify is not None and report.verify.passed
    assert_equivalent(model, balanced, feed)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_packed_projection_of_multihead_attention(dynamo):
    _check_packed(skewed(_TorchAttention(), seed=2), dynamo)


def test_an_unflatten_the_shape_inference_cannot_follow_is_resolved():
    """torch writes the packed projection's unflatten to [..., 3, D] with a target computed
    through Mod and Slice of its Shape, which ONNX's data propagation leaves unknown; the
    analysis reads it and hands the shape back, so everything after it has shapes too."""
    model = export(skewed(_TorchAttention(), seed=2), torch.randn(2, 5, D))
    assert "Mod" in {node.op_type for node in model.graph.node}
    shapes = infer_shapes(model)
    resolved = resolved_reshapes(GraphIndex(model.graph, shapes))
    unflattened = [name for name, dims in resolved.items() if dims == (5, 2, 3, D)]
    assert len(unflattened) == 1 and shapes.get(unflattened[0]) in (None, ())


class _GPT2Attention(nn.Module):
    """GPT-2: one projection to 3 D columns, split into q, k and v along the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (y.view(b, t, HEADS, -1).permute(0, 2, 1, 3) for y in (q, k, v))
        y = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        y = self.c_proj(y.permute(0, 2, 1, 3).contiguous().view(b, t, D))
        return self.fc2(torch.relu(self.fc1(y)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_split_projection_of_gpt2_attention(dynamo):
    _check_packed(skewed(_GPT2Attention(), seed=3), dynamo)


class _TimmAttention(nn.Module):
    """timm's ViT attention: the packed projection laid out as [3, B, heads, N, C/heads] and
    taken apart by unbind (a Split, then Squeezes) or by indexing (Gathers)."""

    def __init__(self, unbind: bool) -> None:
        super().__init__()
        self.unbind = unbind
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, 3)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.unbind else (qkv[0], qkv[1], qkv[2])
        y = (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v
        y = self.proj(y.transpose(1, 2).reshape(b, n, c))
        return self.fc2(torch.relu(self.fc1(y)))


@pytest.mark.parametrize("unbind", [True, False], ids=["unbind", "index"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_packed_projection_of_timm_attention(dynamo, unbind):
    _check_packed(skewed(_TimmAttention(unbind), seed=4), dynamo)


# ---------------------------------------------------------------- layouts, against a simulation

B, T = 2, 3


def _layout_model(heads: int, size: int, perm: tuple[int, ...], probabilities: bool):
    """x [B, T, C] -> v (C = heads * size) -> Relu -> Reshape [B, T, heads, size] ->
    Transpose(perm) -> [MatMul(p, .) with a graph input p] -> Reshape [B, T, C] -> o."""
    c = heads * size
    net = Net(f"layout_{heads}_{size}_{perm}_{probabilities}", seed=heads * 10 + size)
    h = net.relu(net.matmul(net.input("x", [B, T, c]), c, c, "v"), "act")
    h = net.op("Reshape", [h, net.const("split", np.array([B, T, heads, size]))], "split")
    h = net.op("Transpose", [h], "move", perm=list(perm))
    rows = [B, T, heads, size][perm[2]]
    if probabilities:
        h = net.op("MatMul", [net.input("p", [rows, rows]), h], "mix")
    h = net.op("Reshape", [h, net.const("join", np.array([B, T, c]))], "join")
    net.output(net.matmul(h, c, 2, "o"))
    return net.build()


def _expected_columns(heads: int, size: int, perm: tuple[int, ...], probabilities: bool):
    """The channel of every entry of o's input, by running the layout on channel numbers; per
    column of o, its channel, or None when some column sees several channels."""
    c = heads * size
    channel = np.broadcast_to(np.arange(c), (B, T, c)).reshape(B, T, heads, size)
    channel = channel.transpose(perm)
    if probabilities:  # MatMul(p, .) sums entries along axis -2: all must be one channel
        if not (channel == channel[..., :1, :]).all():
            return None
    channel = channel.reshape(B, T, c)
    return channel[0, 0] if (channel == channel[:1, :1]).all() else None


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 3),
    size=st.integers(1, 3),
    perm=st.sampled_from(list(itertools.permutations(range(4)))),
    probabilities=st.booleans(),
)
def test_layouts_of_heads_match_a_simulation(heads, size, perm, probabilities):
    model = _layout_model(heads, size, perm, probabilities)
    units = analyse(model)
    v, o = units.layers
    columns = _expected_columns(heads, size, perm, probabilities)
    if columns is None or heads * size == 1:  # one channel: no axis tells where it lies
        assert (v.row_groups == FIXED).all()
        return
    assert o.col_groups.reshape(-1, heads * size)[0].tolist() == v.row_groups[columns].tolist()
    assert (v.row_groups != FIXED).all()
    feed = {"x": np.random.default_rng(0).normal(size=(B, T, heads * size)).astype(np.float32)}
    if probabilities:
        rows = [B, T, heads, size][perm[2]]
        feed["p"] = np.random.default_rng(1).normal(size=(rows, rows)).astype(np.float32)
    balanced, report = balance(model, inputs=feed)
    assert report.units_balanced == heads * size
    assert_equivalent(model, balanced, feed)


def test_relaid_follows_heads_into_and_out_of_the_batch():
    # nn.MultiheadAttention: [T, N, C] -> [T, N * H, C / H]; channel h * 4 + d sits at
    # position (n * 2 + h, d) for every n
    units = np.arange(8)
    carrier = Carrier(units, np.zeros(8, bool), -1, 3)
    merged = relaid((5, 3, 8), carrier, (5, 6, 4))
    assert merged.spread == (-2, -1)
    per_head = [[h * 4 + d for d in range(4)] for h in (0, 1)]
    assert merged.units.tolist() == per_head * 3
    # and back: [N * H, T, D] -> [N, H, T, D] keeps one copy of each head
    back = relaid((6, 5, 4), merged.on_axes((-3, -1), 3), (3, 2, 5, 4))
    assert back.spread == (-3, -1) and back.units.tolist() == units.reshape(2, 4).tolist()
    # a leading size that is unknown is no obstacle; one channel has no axis to sit on
    assert relaid((None, 5, 8), carrier, (None, 5, 2, 4)).spread == (-2, -1)
    one = Carrier(np.array([0]), np.zeros(1, bool), -1, 2)
    assert relaid((3, 1), one, (3, 1, 1)) is None


def test_matmul_of_two_activations_stops_units_it_sums_over():
    """Units on the axis a MatMul of two activations sums over are stopped, with the reason;
    units on both operands too (attention's queries and keys)."""
    net = Net("contracted")
    x = net.input("x", [2, 4, 6])
    p = net.input("p", [2, 6, 4])
    a = net.relu(net.matmul(x, 6, 6, "a"), "act_a")
    b = net.relu(net.matmul(x, 6, 6, "b"), "act_b")
    summed = net.op("MatMul", [a, p], "sums")  # a's units on its last axis: summed over
    both = net.op("MatMul", [b, net.op("Transpose", [b], "bt", perm=[0, 2, 1])], "both")
    net.output(net.op("Add", [net.matmul(summed, 4, 3, "c"), net.matmul(both, 4, 3, "d")], "y"))
    skipped = {s.node: s.reason for s in analyse(net.build()).skipped}
    assert skipped["a"] == "feeds MatMul 'sums', which is not a rescalable linear layer"
    assert skipped["b"] == "feeds MatMul 'both' with scaled units on both inputs"


def test_matmul_of_two_activations_passes_units_it_does_not_sum_over():
    """conv channels (axis 1 of [N, C, H, W]) through MatMul(x, p) over the width, p a graph
    input: every channel keeps its factor."""
    net = Net("channels_through_matmul")
    x = net.input("x", [2, 2, 3, 4])
    h = net.relu(net.op("Conv", [x, net.rand("c1_W", (5, 2, 1, 1))], "conv1"), "act")
    h = net.op("MatMul", [h, net.input("p", [4, 4])], "mix")
    net.output(net.op("Conv", [h, net.rand("c2_W", (3, 5, 1, 1))], "conv2"))
    model = net.build()
    rng = np.random.default_rng(2)
    feed = {
        "x": rng.normal(size=(2, 2, 3, 4)).astype(np.float32),
        "p": rng.normal(size=(4, 4)).astype(np.float32),
    }
    balanced, report = balance(model, inputs=feed)
    assert report.units_balanced == 5
    assert_equivalent(model, balanced, feed)


def _paddle_style_attention() -> onnx.ModelProto:
    """paddle2onnx's SVTR block in small (opset 12), on conv features of any size:
    x [n, 4, h, w] -> 1x1 conv (6) -> Relu -> Reshape to [n, 6, h·w] (target: Slice(Shape) and
    -1, which ONNX's inference at this opset turns into no shape at all, not even a rank) ->
    Transpose -> packed qkv (6 -> 18) -> Reshape [0, -1, 3, 2, 3] -> Transpose (2, 0, 3, 1, 4)
    -> q, k, v by Slice + Squeeze of axis 0 -> Softmax(q kᵀ) v -> Transpose -> Reshape
    [0, -1, 6] -> proj (6 -> 5)."""
    net = Net("paddle_style_attention", seed=4)
    x = net.input("x", ["n", 4, "h", "w"])
    h = net.relu(net.op("Conv", [x, net.rand("conv_W", (6, 4, 1, 1))], "conv"), "act")
    first = [net.const(f"lead_{k}", np.array([v])) for k, v in enumerate((0, 2, 0))]
    sizes = net.op("Slice", [net.op("Shape", [h], "shape"), *first], "lead")
    target = net.op("Concat", [sizes, net.const("rest", np.array([-1]))], "target", axis=0)
    flat = net.op("Reshape", [h, target], "flatten")
    qkv = net.matmul(net.op("Transpose", [flat], "tokens", perm=[0, 2, 1]), 6, 18, "qkv")
    qkv = net.op("Reshape", [qkv, net.const("heads", np.array([0, -1, 3, 2, 3]))], "split")
    qkv = net.op("Transpose", [qkv], "parts", perm=[2, 0, 3, 1, 4])
    axis0 = net.const("axis0", np.array([0]))
    parts = []
    for p in range(3):
        bounds = [net.const(f"s{p}", np.array([p])), net.const(f"e{p}", np.array([p + 1])), axis0]
        part = net.op("Slice", [qkv, *bounds], f"slice{p}")
        parts.append(net.op("Squeeze", [part], f"part{p}", axes=[0]))
    q, k, v = parts
    scores = net.op("MatMul", [q, net.op("Transpose", [k], "kt", perm=[0, 1, 3, 2])], "scores")
    y = net.op("MatMul", [net.op("Softmax", [scores], "probabilities", axis=-1), v], "mix")
    y = net.op("Transpose", [y], "back", perm=[0, 2, 1, 3])
    y = net.op("Reshape", [y, net.const("join", np.array([0, -1, 6]))], "join")
    net.output(net.matmul(y, 6, 5, "proj"))
    return net.build(opset=12)


def test_paddle_style_attention_on_features_of_any_size():
    model = _paddle_style_attention()
    feed = {"x": np.random.default_rng(5).normal(size=(2, 4, 3, 5)).astype(np.float32)}
    balanced, report = balance(model, inputs=feed)
    # the conv's 6 channels reach qkv through the flatten; qkv's 6 v rows reach proj
    assert report.units_balanced == 6 + 6
    assert report.verify is not None and report.verify.passed
    assert_equivalent(model, balanced, feed)
    feed = {"x": np.random.default_rng(6).normal(size=(1, 4, 2, 7)).astype(np.float32)}
    assert_equivalent(model, balanced, feed)
