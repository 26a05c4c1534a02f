"""The same torch modules through every way torch writes ONNX: do they balance alike?

Each module (realistic layer sizes: the dynamo exporter's optimiser folds only small constants,
so what it leaves unfolded shows only at such sizes) is exported four ways — the TorchScript
exporter with and without constant folding, the dynamo exporter with and without its
optimiser — and balanced in memory. Printed per module and export: units found, balanced, the
norm ratio and the verification. One module's rows should agree: a difference is a pattern
one exporter writes that the tool does not follow (the reasons for fixed units that only some
exports give follow, names left out).
Modules whose units a non-homogeneous op fixes in every export (attention scores, a
squeeze-and-excitation gate) show it in every row alike.

Needs torch (the test extra). Usage: PYTHONPATH=. python benchmarks/torch_exports.py
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import torch
from torch import nn

from onnxbalance import OnnxBalanceError, balance

EXPORTS: dict[str, Callable[[nn.Module, torch.Tensor], onnx.ModelProto]] = {}


def _export(name: str):
    def register(function):
        EXPORTS[name] = function
        return function

    return register


@_export("torchscript")
def _torchscript(module, example):
    buffer = io.BytesIO()
    torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


@_export("torchscript, no folding")
def _torchscript_unfolded(module, example):
    buffer = io.BytesIO()
    torch.onnx.export(
        module, (example,), buffer, dynamo=False, opset_version=17, do_constant_folding=False
    )
    return onnx.load_from_string(buffer.getvalue())


@_export("dynamo")
def _dynamo(module, example):
    return torch.onnx.export(module, (example,), dynamo=True, verbose=False).model_proto


@_export("dynamo, no optimiser")
def _dynamo_raw(module, example):
    return torch.onnx.export(
        module, (example,), dynamo=True, optimize=False, verbose=False
    ).model_proto


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 16)
        )

    def forward(self, x):
        return self.layers(x)


class ConvNet(nn.Module):
    """Conv + BatchNorm, a residual block, a ConvTranspose upsampling and a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.block = nn.Conv2d(64, 64, 3, padding=1)
        self.up = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.block(y)) + y
        return self.head(torch.relu(self.up(y)))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class Tagger(nn.Module):
    """Features -> two bidirectional LSTM layers -> a tag per step."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(64, 128)
        self.rnn = nn.LSTM(128, 192, num_layers=2, batch_first=True, bidirectional=True)
        self.tags = nn.Linear(384, 9)

    def forward(self, x):
        return self.tags(self.rnn(torch.relu(self.features(x)))[0])


class Recogniser(nn.Module):
    """A CRNN text recogniser: convs, the columns as a sequence, a bidirectional GRU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 64, 3, padding=1), nn.Conv2d(64, 128, 3, padding=1)
        self.rnn = nn.GRU(128 * 4, 256, bidirectional=True)
        self.classes = nn.Linear(512, 40)

    def forward(self, x):
        f = torch.relu(self.conv1(x))
        f = torch.relu(self.conv2(nn.functional.max_pool2d(f, 2)))  # [1, 128, 4, w]
        n, c, h, w = f.shape
        return self.classes(self.rnn(f.view(n, c * h, w).permute(2, 0, 1))[0])


MODULES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MLP 256-1024-1024-16": (Mlp, (4, 256)),
    "conv net (BN, residual, ConvTranspose)": (ConvNet, (2, 3, 16, 16)),
    "transformer encoder layer 256": (Encoder, (2, 5, 256)),
    "bidirectional LSTM tagger": (Tagger, (2, 7, 64)),
    "CRNN with a bidirectional GRU": (Recogniser, (1, 1, 8, 32)),
}


def skewed(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights, rows of each layer scaled by exp(N(0, 1)): something to balance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.2, generator=generator)
            if parameter.dim() >= 2:
                spread = torch.exp(torch.randn(parameter.shape[0], generator=generator))
                parameter.mul_(spread.view(-1, *[1] * (parameter.dim() - 1)))
        for child in module.modules():
            if isinstance(child, nn.BatchNorm2d):
                child.running_var.uniform_(0.5, 2.0, generator=generator)
    return module.eval()


def main() -> int:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # the dynamo exporter's notes on missing torchvision
    print(f"{'module':40s} {'export':24s} {'found':>6s} {'balanced':>8s} {'ratio':>7s}  verified")
    for label, (make, shape) in MODULES.items():
        module = skewed(make(), seed=0)
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        reasons: dict[str, set[str]] = {}
        for export_name, export in EXPORTS.items():
            model = export(module, example)
            feed = {model.graph.input[0].name: example.numpy()}
            try:
                _, report = balance(model, inputs=feed)
            except OnnxBalanceError as exc:
                print(f"{label:40s} {export_name:24s} refused: {exc}")
                continue
            passed = report.verify.passed if report.verify else "not needed"
            print(
                f"{label:40s} {export_name:24s} {report.units_found:6d} "
                f"{report.units_balanced:8d} {report.norm_ratio:7.4f}  {passed}"
            )
            # node names differ between exporters: the reasons are compared without them
            reasons[export_name] = {re.sub(r"'[^']*'", "'…'", e.reason) for e in report.units_fixed}
        every = set.intersection(*reasons.values()) if reasons else set()
        for export_name, theirs in reasons.items():
            for reason in sorted(theirs - every)[:3]:
                print(f"{'':40s} {export_name:24s} only here: {reason[:100]}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
