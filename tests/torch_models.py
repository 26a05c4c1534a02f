"""Small torch architectures for the acceptance tests, exported, with their unit graphs.

Every module is seeded, in eval mode, with BatchNorm running statistics and affine parameters set
randomly (so BN changes the effective weights W * gamma / sqrt(var + eps)) and per-output-channel
weight magnitudes spread over about two orders of magnitude (so balancing has work to do).

Export: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), opset 17, static
shapes. It takes about 0.01-0.3 s per tiny model; the dynamo exporter takes seconds per model and
folds BN as well, so it is not used here. Two modes, both tested:

* ``fold=True`` (the exporter's default, do_constant_folding=True): in eval mode the exporter
  FOLDS Conv+BatchNormalization into the Conv (weight W*gamma/s, bias beta+(b-mean)*gamma/s) and
  renames the folded tensors ``onnx::Conv_<n>``. Linear layers keep their names; a Linear on a
  3-D input becomes MatMul with a pre-transposed initializer ``onnx::MatMul_<n>`` plus Add.
* ``fold=False`` (do_constant_folding=False): explicit BatchNormalization nodes remain and the
  initializers keep their state_dict names; this is what exercises the BN rule on real graphs.

Op lists observed with torch 2.13 (``python tests/torch_models.py`` prints them; Constant nodes
left out). "bn" = fold=False; it differs from "fold" only by a BatchNormalization after each
Conv that has one, plus Cast nodes on ReLU6's Clip bounds:

* convnet      Conv Relu MaxPool Conv Relu AveragePool Flatten Gemm Relu Gemm
* basic_identity     Conv Relu Conv Relu Conv Add Relu GlobalAveragePool Flatten Gemm
* basic_on_input     Conv Relu Conv Add Relu GlobalAveragePool Flatten Gemm
* se_basic       Conv Relu Conv Relu Conv GlobalAveragePool Conv Relu Conv Sigmoid Mul Add Relu
                 GlobalAveragePool Flatten Gemm
* basic_projection   Conv Relu Conv Relu Conv Conv Add Relu GlobalAveragePool Flatten Gemm
* bottleneck_identity    Conv Relu Conv Relu Conv Relu Conv Add Relu GlobalAveragePool ...
* bottleneck_projection  Conv Relu Conv Relu Conv Relu Conv Conv Add Relu GlobalAveragePool ...
* dwsep_relu     Conv Relu Conv(group=8) Relu Conv Relu GlobalAveragePool Flatten Gemm
* dwsep_relu6    Conv Relu Conv(group=8) Clip Conv Relu GlobalAveragePool Flatten Gemm
                 (bn: ... BatchNormalization Cast Cast Clip ...)
* fire           Conv Relu MaxPool Conv Relu Conv Relu Conv Relu Concat GlobalAveragePool ...
* transformer (fold only)  Transpose MatMul Add (in_proj) Reshape/Slice/Gather/Transpose ...
                 MatMul Softmax MatMul Transpose Reshape Gemm (out_proj) Reshape Transpose Add
                 LayerNormalization MatMul Add Relu MatMul Add Add LayerNormalization; the
                 feed-forward MatMul weights are stored transposed [in, out].

Locating tensors: the tests find each layer's initializers in the exported model by value (the
folded names are not predictable), then never rely on names again.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from arch_reference import FIXED, Fixture, Groups, RefLayer, conv_cols, dense_cols, fixed
from torch import nn

OPSET = 17


# ---------------------------------------------------------------- modules


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class ConvNet(nn.Module):
    """Conv-BN-ReLU-MaxPool, Conv-BN-ReLU-AvgPool, Flatten, Linear-ReLU, Linear. Input 3x16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)  # with bias, then BN
        self.bn1 = nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool2(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU, conv3x3-BN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.c1 = conv_bn(cin, cout, 3, stride)
        self.c2 = conv_bn(cout, cout, 3)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1-BN-ReLU, 3x3-BN-ReLU (stride here), 1x1-BN, + shortcut, ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.c1 = conv_bn(cin, mid, 1)
        self.c2 = conv_bn(mid, mid, 3, stride)
        self.c3 = conv_bn(mid, cout, 1)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class SqueezeExcite(nn.Module):
    """SENet's gate: GlobalAveragePool, 1x1 Conv-ReLU, 1x1 Conv-Sigmoid, times the input."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        gate = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(gate))))


class SEBasicBlock(BasicBlock):
    """SE-ResNet basic block: the residual branch gated by :class:`SqueezeExcite` before the
    shortcut is added."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__(channels, channels)
        self.se = SqueezeExcite(channels, reduced)

    def forward(self, x):
        return torch.relu(self.se(self.c2(torch.relu(self.c1(x)))) + x)


class PreNormFFN(nn.Module):
    """A pre-LayerNorm transformer FFN with its residual, and a linear head, on [B, T, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x + self.fc2(torch.relu(self.fc1(self.norm(x)))))


class InstanceNormNet(nn.Module):
    """Conv, InstanceNorm (affine), ReLU, Conv, ReLU, a head: a style-transfer block in small."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.conv2, self.head = nn.Conv2d(8, 6, 3, padding=1), Head(6, 4)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv1(x)))
        return self.head(torch.relu(self.conv2(h)))


class GroupNormHead(nn.Module):
    """Conv-GroupNorm-ReLU twice, as FCOS and RetinaNet heads are built, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.norm2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.head = Head(8, 4)

    def forward(self, x):
        h = torch.relu(self.norm1(self.conv1(x)))
        return self.head(torch.relu(self.norm2(self.conv2(h))))


class Head(nn.Module):
    """GlobalAveragePool, Flatten, Linear."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Net(nn.Module):
    """stem (Conv-BN-act, optional) -> body -> head."""

    def __init__(self, stem: nn.Module | None, body: nn.Module, head: nn.Module, act=torch.relu):
        super().__init__()
        self.stem = stem
        self.body = body
        self.head = head
        self.act = act

    def forward(self, x):
        if self.stem is not None:
            x = self.act(self.stem(x))
        return self.head(self.body(x))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3-BN-act, pointwise 1x1-BN-ReLU (MobileNet v1 style)."""

    def __init__(self, cin: int, cout: int, dw_act: Callable) -> None:
        super().__init__()
        self.dw = conv_bn(cin, cin, 3, groups=cin)
        self.pw = conv_bn(cin, cout, 1)
        self.dw_act = dw_act

    def forward(self, x):
        return torch.relu(self.pw(self.dw_act(self.dw(x))))


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1-ReLU, expand 1x1-ReLU || expand 3x3-ReLU, Concat."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)


class CallEncoder(nn.Module):
    """Calls a TransformerEncoderLayer with is_causal=False given as a Python bool.

    Without it the TorchScript tracer turns is_causal into a tensor and
    scaled_dot_product_attention rejects it (torch 2.13).
    """

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, src_mask=None, is_causal=False)


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights with per-row magnitudes spread by exp(N(0, 1)) (Conv, Linear); BN stats,
    the scale and bias of LayerNorm, GroupNorm and InstanceNorm and attention's packed
    projection random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear | nn.Conv1d | nn.Conv3d):
                m.weight.normal_(0.0, 0.3, generator=gen)
                spread = torch.exp(torch.randn(m.weight.shape[0], generator=gen))
                m.weight.mul_(spread.view(-1, *[1] * (m.weight.dim() - 1)))
                if m.bias is not None:
                    m.bias.uniform_(-0.3, 0.3, generator=gen)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.3, 3.0, generator=gen)
            elif isinstance(m, NORMS) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.3, generator=gen)
            elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                # the packed q/k/v projection is no Linear: without this, torch's global
                # generator would set it, and the fixture would differ from process to process
                m.in_proj_weight.normal_(0.0, 0.3, generator=gen)
                m.in_proj_bias.uniform_(-0.3, 0.3, generator=gen)
    return module.eval()


# ---------------------------------------------------------------- export


def skewed(module: nn.Module, seed: int) -> nn.Module:
    """Random weights of very different scales per layer: something to balance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, param in enumerate(module.parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * (4.0 if k % 4 < 2 else 0.3))
    return module.eval()


def export(
    module: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    fold: bool = True,
    opset: int | None = OPSET,
    input_names: Sequence[str] = ("x",),
    output_names: Sequence[str] = ("y",),
    **options,
) -> onnx.ModelProto:
    """TorchScript exporter, opset 17 unless ``opset`` (None: the exporter's own default), one
    input ``x`` and one output ``y`` unless ``example`` is a tuple of inputs and the names are
    given; static shapes unless ``options`` (``dynamic_axes``, ``keep_initializers_as_inputs``,
    ..., passed on to ``torch.onnx.export``) say otherwise.

    The TorchScript exporter is chosen on purpose (module docstring); its deprecation, tracing
    and other warnings (an LSTM exported with a dynamic length, say) are silenced so that the
    suite's warnings are our own."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(
            module,
            example if isinstance(example, tuple) else (example,),
            path,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=fold,
            input_names=list(input_names),
            output_names=list(output_names),
            **options,
        )
        return onnx.load(path)


def export_dynamo(module: nn.Module, example: torch.Tensor, **options) -> onnx.ModelProto:
    """The dynamo exporter (``options``, such as ``dynamic_shapes``, passed on); its warnings
    are silenced as :func:`export`'s are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module, (example,), dynamo=True, verbose=False, **options
        ).model_proto


# ---------------------------------------------------------------- unit graphs from the modules


@dataclass(frozen=True)
class Spec:
    """One linear layer of a torch module, with its units' groups (raw columns, 2-D)."""

    name: str
    module: nn.Module | SimpleNamespace  # Conv2d, Linear, or a packed weight and bias
    bn: nn.BatchNorm2d | None
    row_groups: np.ndarray
    col_groups: np.ndarray


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def _bn_factor(bn: nn.BatchNorm2d) -> np.ndarray:
    return _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)


def _effective(spec: Spec) -> np.ndarray:
    w = _np(spec.module.weight)
    w = w.reshape(w.shape[0], -1)
    return w * _bn_factor(spec.bn)[:, None] if spec.bn is not None else w


def _find(tensors: dict[str, np.ndarray], value: np.ndarray, what: str) -> tuple[str, bool]:
    """The unique initializer equal (to float32 rounding) to ``value`` or to its transpose."""
    hits = []
    for name, array in tensors.items():
        if array.size != value.size or array.dtype.kind != "f":
            continue
        if array.shape == value.shape and np.allclose(array, value, rtol=1e-4, atol=1e-6):
            hits.append((name, False))
        elif value.ndim == 1 and np.allclose(array.reshape(-1), value, rtol=1e-4, atol=1e-6):
            hits.append((name, False))  # a vector stored as [C, 1, 1] (a GroupNorm's scale)
        elif (
            array.ndim == 2
            and array.T.shape == value.shape
            and np.allclose(array.T, value, rtol=1e-4, atol=1e-6)
        ):
            hits.append((name, True))
    if len(hits) != 1:
        raise LookupError(f"{what}: expected one matching initializer, found {hits}")
    return hits[0]


def bind(spec: Spec, model: onnx.ModelProto) -> RefLayer:
    """Find the spec's tensors in an exported model: folded BN or explicit BN, Gemm or MatMul."""
    from arch_reference import initializers

    tensors = initializers(model)
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    m, bn = spec.module, spec.bn
    w = _np(m.weight)
    if bn is not None and not has_bn:  # folded by the exporter
        factor = _bn_factor(bn)
        folded_w = w * factor.reshape(-1, *[1] * (w.ndim - 1))
        b = _np(m.bias) if m.bias is not None else 0.0
        folded_b = _np(bn.bias) + (b - _np(bn.running_mean)) * factor
        weight, transposed = _find(tensors, folded_w, spec.name + " weight")
        bias, _ = _find(tensors, folded_b, spec.name + " bias")
        bn_names = None
    else:
        weight, transposed = _find(tensors, w, spec.name + " weight")
        bias = _find(tensors, _np(m.bias), spec.name + " bias")[0] if m.bias is not None else None
        bn_names = None
        if bn is not None:
            bn_names = (
                _find(tensors, _np(bn.weight), spec.name + " gamma")[0],
                _find(tensors, _np(bn.bias), spec.name + " beta")[0],
                _find(tensors, _np(bn.running_var), spec.name + " var")[0],
                float(bn.eps),
            )
    return RefLayer(
        name=spec.name,
        weight=weight,
        layout="in_first" if transposed else "out_first",
        row_groups=np.asarray(spec.row_groups, dtype=np.int64),
        col_groups=np.asarray(spec.col_groups, dtype=np.int64),
        bias=bias,
        bn=bn_names,
        effective=_effective(spec),
    )


def _conv(name, seq_or_conv, rows, in_groups, taps=None) -> Spec:
    """Spec of conv_bn(...) (Sequential conv, bn) or a bare Conv2d."""
    if isinstance(seq_or_conv, nn.Sequential):
        conv, bn = seq_or_conv[0], seq_or_conv[1]
    else:
        conv, bn = seq_or_conv, None
    taps = int(np.prod(conv.kernel_size))
    cols = conv_cols(in_groups, conv.out_channels, conv.groups, taps)
    return Spec(name, conv, bn, rows, cols)


def _norm(name, norm: nn.Module, rows) -> Spec:
    """Spec of a normalisation's per-channel scale: a diagonal layer, its one column fixed."""
    return Spec(name, norm, None, rows, np.full((len(rows), 1), FIXED))


def _fc(name, linear: nn.Linear, rows, in_groups, positions=1) -> Spec:
    return Spec(name, linear, None, rows, dense_cols(in_groups, linear.out_features, positions))


# Each builder returns (module, input shape, specs, n_groups, expected balanced, explanation).
# The expected count is derived by hand from the architecture and is also what the specs encode;
# test_architectures checks the two agree, then checks the tool against both.


def build_convnet():
    m = randomise(ConvNet(), 1)
    g = Groups()
    a, b, c = g.new(8), g.new(16), g.new(12)
    specs = [
        Spec("conv1", m.conv1, m.bn1, a, conv_cols(fixed(3), 8, 1, 9)),
        Spec("conv2", m.conv2, m.bn2, b, conv_cols(a, 16, 1, 9)),
        _fc("fc1", m.fc1, c, b, positions=16),  # Flatten of 16 x 4 x 4: channel-major
        _fc("fc2", m.fc2, fixed(5), c),
    ]
    why = (
        "conv1 8 ch -> BN -> ReLU -> MaxPool: 8; conv2 16 ch -> BN -> ReLU -> AvgPool -> Flatten: "
        "16; fc1 12 -> ReLU: 12; fc2 is the output: 0. Total 36."
    )
    return m, (2, 3, 16, 16), specs, g.n, 36, why


def build_basic_identity():
    m = randomise(Net(conv_bn(3, 8, 3), BasicBlock(8, 8), Head(8, 4)), 2)
    g = Groups()
    res = g.new(8)  # stem channels tied to conv2 channels through the identity Add
    c1 = g.new(8)
    specs = [
        _conv("stem", m.stem, res, fixed(3)),
        _conv("block.c1", m.body.c1, c1, res),
        _conv("block.c2", m.body.c2, res, c1),
        _fc("fc", m.head.fc, fixed(4), res),
    ]
    why = (
        "stem 8 ch ReLU; block conv1 8 ch ReLU: 8; conv2 + identity tie conv2's 8 channels to "
        "the stem's 8 (Add -> ReLU, rescalable): one tied group per channel, 8. Total 16 groups."
    )
    return m, (2, 3, 8, 8), specs, g.n, 16, why


def build_se_basic():
    m = randomise(Net(conv_bn(3, 8, 3), SEBasicBlock(8, 2), Head(8, 4)), 11)
    g = Groups()
    res, c1, squeezed = g.new(8), g.new(8), g.new(2)
    se = m.body.se
    specs = [
        _conv("stem", m.stem, res, fixed(3)),
        _conv("block.c1", m.body.c1, c1, res),
        _conv("block.c2", m.body.c2, res, c1),
        _conv("se.reduce", se.reduce, squeezed, res),  # its columns undo the pooled scales
        _conv("se.expand", se.expand, fixed(8), squeezed),  # Sigmoid: fixed
        _fc("fc", m.head.fc, fixed(4), res),
    ]
    why = (
        "stem 8 ch tied with conv2's 8 through the gate's Mul (its gate carries no unit: the "
        "reduce conv's columns undo the pooled channels' scales) and the identity Add: 8; "
        "conv1 8; the gate's reduce conv 2 -> ReLU: 2; its expand conv feeds Sigmoid: fixed. "
        "Total 18."
    )
    return m, (2, 3, 8, 8), specs, g.n, 18, why


def build_prenorm_ffn():
    m = randomise(PreNormFFN(), 12)
    g = Groups()
    normed, hidden = g.new(16), g.new(32)
    specs = [
        _norm("norm", m.norm, normed),
        _fc("fc1", m.fc1, hidden, normed),
        _fc("fc2", m.fc2, fixed(16), hidden),  # rows added to the graph input
        _fc("head", m.head, fixed(4), fixed(16)),
    ]
    why = (
        "the LayerNorm's 16 channels (scale and bias) are read by fc1 alone: 16; fc1 32 -> "
        "ReLU: 32; fc2's rows are added to the graph input: fixed. Total 48."
    )
    return m, (2, 5, 16), specs, g.n, 48, why


def build_instance_norm():
    m = randomise(InstanceNormNet(), 13)
    g = Groups()
    normed, c2 = g.new(8), g.new(6)
    specs = [
        _conv("conv1", m.conv1, fixed(8), fixed(3)),  # normalised: a factor would be undone
        _norm("norm", m.norm, normed),
        _conv("conv2", m.conv2, c2, normed),
        _fc("fc", m.head.fc, fixed(4), c2),
    ]
    why = (
        "conv1's channels feed the InstanceNorm: fixed; its 8 channels (scale and bias) -> "
        "ReLU: 8; conv2 6 -> ReLU: 6. Total 14."
    )
    return m, (2, 3, 8, 8), specs, g.n, 14, why


def build_group_norm():
    m = randomise(GroupNormHead(), 15)
    g = Groups()
    first, second = g.new(8), g.new(8)
    specs = [
        _conv("conv1", m.conv1, fixed(8), fixed(3)),  # normalised: a factor would be undone
        _norm("norm1", m.norm1, first),
        _conv("conv2", m.conv2, fixed(8), first),
        _norm("norm2", m.norm2, second),
        _fc("fc", m.head.fc, fixed(4), second),
    ]
    why = (
        "each GroupNorm's per-channel scale and bias (the Mul and Add after the "
        "InstanceNormalization torch exports it with) -> ReLU: 8 + 8; the convs' channels feed "
        "the normalisations: fixed. Total 16."
    )
    return m, (2, 3, 8, 8), specs, g.n, 16, why


def build_basic_on_input():
    m = randomise(Net(None, BasicBlock(8, 8), Head(8, 4)), 3)
    g = Groups()
    c1 = g.new(8)
    specs = [
        _conv("block.c1", m.body.c1, c1, fixed(8)),
        _conv("block.c2", m.body.c2, fixed(8), c1),  # tied with the graph input -> fixed
        _fc("fc", m.head.fc, fixed(4), fixed(8)),
    ]
    why = (
        "block on the graph input: conv1 8 ch ReLU: 8; conv2 + identity shortcut tie into the "
        "residual group with the block input, which is a graph input -> 8 fixed. Total 8."
    )
    return m, (2, 8, 8, 8), specs, g.n, 8, why


def build_basic_projection():
    m = randomise(Net(conv_bn(3, 8, 3), BasicBlock(8, 16, stride=2), Head(16, 4)), 4)
    g = Groups()
    s, c1, res = g.new(8), g.new(16), g.new(16)
    specs = [
        _conv("stem", m.stem, s, fixed(3)),
        _conv("block.c1", m.body.c1, c1, s),
        _conv("block.c2", m.body.c2, res, c1),
        _conv("block.short", m.body.short, res, s),
        _fc("fc", m.head.fc, fixed(4), res),
    ]
    why = (
        "stem 8 ch ReLU: 8 (projection shortcut is a linear layer, no tie); conv1 16 ch (stride "
        "2) ReLU: 16; conv2 and the 1x1 projection tie through Add -> ReLU: 16. Total 40."
    )
    return m, (2, 3, 8, 8), specs, g.n, 40, why


def build_bottleneck_identity():
    m = randomise(Net(conv_bn(3, 16, 3), Bottleneck(16, 4, 16), Head(16, 4)), 5)
    g = Groups()
    res, a, b = g.new(16), g.new(4), g.new(4)
    specs = [
        _conv("stem", m.stem, res, fixed(3)),
        _conv("block.c1", m.body.c1, a, res),
        _conv("block.c2", m.body.c2, b, a),
        _conv("block.c3", m.body.c3, res, b),
        _fc("fc", m.head.fc, fixed(4), res),
    ]
    why = (
        "stem 16 ch tied with conv3's 16 through the identity Add -> ReLU: 16; conv1 1x1 4 ch: "
        "4; conv2 3x3 4 ch: 4. Total 24."
    )
    return m, (2, 3, 8, 8), specs, g.n, 24, why


def build_bottleneck_projection():
    m = randomise(Net(conv_bn(3, 8, 3), Bottleneck(8, 4, 16, stride=2), Head(16, 4)), 6)
    g = Groups()
    s, a, b, res = g.new(8), g.new(4), g.new(4), g.new(16)
    specs = [
        _conv("stem", m.stem, s, fixed(3)),
        _conv("block.c1", m.body.c1, a, s),
        _conv("block.c2", m.body.c2, b, a),
        _conv("block.c3", m.body.c3, res, b),
        _conv("block.short", m.body.short, res, s),
        _fc("fc", m.head.fc, fixed(4), res),
    ]
    why = "stem 8; conv1 4; conv2 (stride 2) 4; conv3 + projection tied: 16. Total 32."
    return m, (2, 3, 8, 8), specs, g.n, 32, why


def build_dwsep_relu():
    m = randomise(Net(conv_bn(3, 8, 3), DepthwiseSeparable(8, 16, torch.relu), Head(16, 4)), 7)
    g = Groups()
    s, d, pw = g.new(8), g.new(8), g.new(16)
    specs = [
        _conv("stem", m.stem, s, fixed(3)),
        _conv("dw", m.body.dw, d, s),  # group=8: channel k sees only stem channel k
        _conv("pw", m.body.pw, pw, d),
        _fc("fc", m.head.fc, fixed(4), pw),
    ]
    why = "stem 8 ReLU; depthwise 8 ReLU; pointwise 16 ReLU. Total 32."
    return m, (2, 3, 8, 8), specs, g.n, 32, why


def build_dwsep_relu6():
    relu6 = nn.functional.relu6
    m = randomise(Net(conv_bn(3, 8, 3), DepthwiseSeparable(8, 16, relu6), Head(16, 4)), 8)
    g = Groups()
    s, pw = g.new(8), g.new(16)
    specs = [
        _conv("stem", m.stem, s, fixed(3)),
        _conv("dw", m.body.dw, fixed(8), s),  # ReLU6 (Clip) after the depthwise: rows fixed
        _conv("pw", m.body.pw, pw, fixed(8)),
        _fc("fc", m.head.fc, fixed(4), pw),
    ]
    why = (
        "stem 8 ReLU: 8 (its scale only divides the depthwise weight columns); depthwise 8 -> "
        "ReLU6 (Clip): fixed, its BN gamma/beta (or folded bias) stay bit-for-bit; pointwise "
        "16 ReLU: 16. Total 24."
    )
    return m, (2, 3, 8, 8), specs, g.n, 24, why


def build_fire():
    stem = nn.Sequential(conv_bn(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
    m = randomise(Net(None, nn.Sequential(stem, Fire(8, 4, 8)), Head(16, 5)), 9)
    g = Groups()
    s, sq, e1, e3 = g.new(8), g.new(4), g.new(8), g.new(8)
    fire = m.body[1]
    specs = [
        _conv("stem", m.body[0][0], s, fixed(3)),
        _conv("squeeze", fire.squeeze, sq, s),
        _conv("expand1x1", fire.e1, e1, sq),
        _conv("expand3x3", fire.e3, e3, sq),
        _fc("fc", m.head.fc, fixed(5), np.concatenate([e1, e3])),  # Concat offsets 0 and 8
    ]
    why = "stem 8 (ReLU, MaxPool); squeeze 4; expand1x1 8 and expand3x3 8 -> Concat. Total 28."
    return m, (2, 3, 8, 8), specs, g.n, 28, why


def build_transformer():
    layer = nn.TransformerEncoderLayer(
        d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, activation="relu", batch_first=True
    )
    randomise(layer, 10)
    m = CallEncoder(layer)
    attention = layer.self_attn
    # q, k and v are the row blocks of one packed projection, as torch stores them
    packed = SimpleNamespace(weight=attention.in_proj_weight, bias=attention.in_proj_bias)
    g = Groups()
    v, ff = g.new(16), g.new(32)
    specs = [
        Spec("in_proj", packed, None, np.concatenate([fixed(32), v]), dense_cols(fixed(16), 48)),
        _fc("out_proj", attention.out_proj, fixed(16), v),  # rows: residual Add with the input
        _fc("linear1", layer.linear1, ff, fixed(16)),  # input is LayerNorm output: fixed
        _fc("linear2", layer.linear2, fixed(16), ff),  # output goes into residual Add + LayerNorm
    ]
    why = (
        "in_proj's q and k rows meet in a MatMul before Softmax: fixed; its 16 v rows pass the "
        "heads' split, the probabilities' MatMul and the join to out_proj: 16; out_proj's rows "
        "are added to the input: fixed; linear1 32 hidden units -> ReLU -> linear2: 32; "
        "linear2's rows feed Add + LayerNorm: fixed. Total 48."
    )
    return m, (2, 5, 16), specs, g.n, 48, why


BUILDERS = {
    "convnet": build_convnet,
    "basic_identity": build_basic_identity,
    "basic_on_input": build_basic_on_input,
    "se_basic": build_se_basic,
    "prenorm_ffn": build_prenorm_ffn,
    "instance_norm": build_instance_norm,
    "group_norm": build_group_norm,
    "basic_projection": build_basic_projection,
    "bottleneck_identity": build_bottleneck_identity,
    "bottleneck_projection": build_bottleneck_projection,
    "dwsep_relu": build_dwsep_relu,
    "dwsep_relu6": build_dwsep_relu6,
    "fire": build_fire,
    "transformer": build_transformer,
}


# The bn-mode (do_constant_folding=False) transformer stores linear weights as [out, in] behind
# Transpose nodes feeding MatMul: an exporter artefact, tested elsewhere.
CASES = [(name, fold) for name in BUILDERS for fold in (True, False)]
CASES.remove(("transformer", False))


def fixture(name: str, *, fold: bool, opset: int = OPSET) -> tuple[Fixture, nn.Module]:
    """Build, export and bind one architecture. Returns the fixture and the torch module."""
    module, shape, specs, n_groups, expected, why = BUILDERS[name]()
    example = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    model = export(module, example, fold=fold, opset=opset)
    layers = tuple(bind(spec, model) for spec in specs)
    return (
        Fixture(
            name=f"{name}[{'fold' if fold else 'bn'}]",
            model=model,
            inputs={"x": example.numpy()},
            layers=layers,
            n_groups=n_groups,
            expected_balanced=expected,
            notes=why,
            ops=tuple(n.op_type for n in model.graph.node),
        ),
        module,
    )


def movable_groups(layers: tuple[RefLayer, ...]) -> set[int]:
    found: set[int] = set()
    for layer in layers:
        for groups in (layer.row_groups, layer.col_groups):
            found |= {int(v) for v in np.unique(groups) if v != FIXED}
    return found


if __name__ == "__main__":  # print the op lists the exporter produces (kept in the docstring)
    for arch, fold in CASES:
        fx, _ = fixture(arch, fold=fold)
        print(fx.name, " ".join(op for op in fx.ops if op != "Constant"))
