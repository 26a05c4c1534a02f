"""Models for the verification acceptance tests, shaped like what users verify, and planted errors.

Torch models go through the TorchScript exporter (:func:`torch_models.export`, BN folded into
the convolutions as the exporter does by default) with the architecture tests' randomisation
(BN statistics and affine parameters random, per-channel weight magnitudes spread): a deep
bottleneck ResNet with ResNet-50's [3, 4, 6, 3] blocks on narrow channels, an Inception-style
net (parallel 1x1 / 3x3 / double-3x3 / pool branches joined by Concat), a net whose output is a
sigmoid near zero on random inputs (a detector's heat map), and their float16 conversions by
onnxconverter-common with float32 inputs and outputs. The embedding model is built with
onnx.helper as optimum's BERT exports write it: two Gathers on stored tables, indexed by int64
inputs.

Planted errors change one stored tensor of a model: they are what a correct check must catch.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch_models import Bottleneck, conv_bn, export, randomise


class DeepBottleneckNet(nn.Module):
    """Stem, four stages of [3, 4, 6, 3] bottlenecks (mid widths 4, 8, 16, 32, expansion 4,
    stride 2 from the second stage), global pooling, a Linear to 10 logits. Input 3x32x32."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        blocks, cin = [], 16
        for stage, (count, mid) in enumerate(zip([3, 4, 6, 3], [4, 8, 16, 32], strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Bottleneck(cin, mid, 4 * mid, stride))
                cin = 4 * mid
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InceptionBlock(nn.Module):
    """1x1, 1x1->3x3, 1x1->3x3->3x3 and 3x3-avgpool->1x1 branches, each BN-ReLU, concatenated."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, width, 1)
        self.b3 = nn.ModuleList([conv_bn(cin, width, 1), conv_bn(width, width, 3)])
        self.b33 = nn.ModuleList(
            [conv_bn(cin, width, 1), conv_bn(width, width, 3), conv_bn(width, width, 3)]
        )
        self.bp = conv_bn(cin, width, 1)

    def forward(self, x):
        def chain(convs, y):
            for conv in convs:
                y = torch.relu(conv(y))
            return y

        pooled = nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [chain([self.b1], x), chain(self.b3, x), chain(self.b33, x), chain([self.bp], pooled)],
            1,
        )


class InceptionNet(nn.Module):
    """Stem, three Inception blocks (a max-pool after the first), pooling, Linear. Input 3x32x32."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, stride=2)
        self.a = InceptionBlock(16, 8)
        self.b = InceptionBlock(32, 12)
        self.c = InceptionBlock(48, 16)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = nn.functional.max_pool2d(self.a(x), 2)
        x = self.c(self.b(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SigmoidHeatMap(nn.Module):
    """Conv-BN-ReLU x3, then a 1x1 conv whose bias sits at -7 and a sigmoid: outputs near 1e-3
    on random inputs, like a text detector's probability map. Input 3x32x32."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([conv_bn(3, 16, 3), conv_bn(16, 32, 3), conv_bn(32, 16, 3)])
        self.head = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return torch.sigmoid(self.head(x))


def torch_model(kind: str, seed: int = 0) -> onnx.ModelProto:
    """ "resnet", "inception" or "sigmoid", exported by the TorchScript exporter.

    BN statistics come from a few batches, as after training, then are randomised by up to a
    factor 1.5 either way: activations stay of order 1 through fifty layers as in a trained
    net, and the folded weights keep the randomisation's spread of per-channel magnitudes."""
    module = {"resnet": DeepBottleneckNet, "inception": InceptionNet, "sigmoid": SigmoidHeatMap}
    torch.manual_seed(seed)
    net = randomise(module[kind](), seed)
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the batches
        net.train()
        for _ in range(3):
            net(torch.randn(8, 3, 32, 32, generator=gen))
        for bn in bns:
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.67, 1.5, generator=gen))
        if kind == "sigmoid":
            net.head.weight.mul_(0.01)
            net.head.bias.fill_(-7.0)
    return export(net.eval(), torch.zeros(1, 3, 32, 32))


def float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxconverter-common's conversion as users run it: float16 weights and hidden values,
    float32 graph inputs and outputs (Cast nodes at the edges)."""
    from onnxconverter_common.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


VOCABULARY, TOKEN_TYPES, HIDDEN = 1000, 2, 16


def embedding_ffn(seed: int = 0) -> onnx.ModelProto:
    """ids, token types (int64, dynamic [batch, sequence]) -> word + type embeddings ->
    MatMul-Add-Relu-MatMul-Add (the feed-forward half of a transformer layer)."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape, scale=0.3):
        return numpy_helper.from_array(
            (scale * rng.standard_normal(shape)).astype(np.float32), name
        )

    tables = [weight("words", VOCABULARY, HIDDEN), weight("types", TOKEN_TYPES, HIDDEN)]
    layers = [weight("W1", HIDDEN, 4 * HIDDEN), weight("B1", 4 * HIDDEN, scale=0.1),
              weight("W2", 4 * HIDDEN, HIDDEN), weight("B2", HIDDEN, scale=0.1)]  # fmt: skip
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["w"], "word_embeddings"),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"], "type_embeddings"),
        helper.make_node("Add", ["w", "t"], ["e"]),
        helper.make_node("MatMul", ["e", "W1"], ["h0"], "fc1"),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y0"], "fc2"),
        helper.make_node("Add", ["y0", "B2"], ["y"]),
    ]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
           for n in ("input_ids", "token_type_ids")]  # fmt: skip
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
    graph = helper.make_graph(nodes, "embedding_ffn", ids, [out], tables + layers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------- planted errors


def _edited(model: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` replaced by ``change(values)`` (same dtype)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name == name:
            values = numpy_helper.to_array(tensor)
            changed = np.asarray(change(values.copy())).astype(values.dtype)
            tensor.CopyFrom(numpy_helper.from_array(changed, name))
            return copy
    raise KeyError(name)


def _layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("Gemm", "Conv")]


def hidden_weight(model: onnx.ModelProto) -> str:
    """The weight of the last layer before the output layer: its rows are hidden units."""
    return _layers(model)[-2].input[1]


def output_weight(model: onnx.ModelProto) -> tuple[str, str]:
    """(weight, bias) of the output layer: its rows are the output channels."""
    last = _layers(model)[-1]
    return last.input[1], last.input[2]


def scaled_unit(model: onnx.ModelProto, factor: float = 1.001) -> onnx.ModelProto:
    """One hidden unit's incoming weights times ``factor``, nothing compensating."""

    def change(w):
        w[0] = w[0].astype(np.float64) * factor
        return w

    return _edited(model, hidden_weight(model), change)


def swapped_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Output channels 0 and 1 exchanged (their weight rows and biases)."""
    weight, bias = output_weight(model)
    swap = lambda v: v[[1, 0, *range(2, len(v))]]  # noqa: E731
    return _edited(_edited(model, weight, swap), bias, swap)


def shifted_bias(model: onnx.ModelProto, fraction: float = 1e-3) -> onnx.ModelProto:
    """The output layer's bias moved by ``fraction`` of its range (max - min), every entry."""
    return _edited(
        model,
        output_weight(model)[1],
        lambda b: b.astype(np.float64) + fraction * float(np.ptp(b.astype(np.float64))),
    )


def rerounded(model: onnx.ModelProto, relative: float = 1e-2, seed: int = 0) -> onnx.ModelProto:
    """A hidden weight replaced by the float16 rounding of values moved by a random relative
    ``relative``: what a conversion from other float32 weights would have written."""
    rng = np.random.default_rng(seed)

    def change(w):
        moved = w.astype(np.float64) * (1 + relative * rng.uniform(-1, 1, w.shape))
        return moved.astype(np.float16)

    return _edited(model, hidden_weight(model), change)
