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

Needs torch (the test extra); the exports and the seeded weights are the suite's
(tests/torch_models.py). Usage: PYTHONPATH=. python benchmarks/torch_exports.py
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from torch_models import export, export_dynamo, randomise  # noqa: E402

from onnxbalance import OnnxBalanceError, balance  # noqa: E402

EXPORTS: dict[str, Callable[[nn.Module, torch.Tensor], onnx.ModelProto]] = {
    "torchscript": export,
    "torchscript, no folding": lambda module, example: export(module, example, fold=False),
    "dynamo": export_dynamo,
    "dynamo, no optimiser": lambda module, example: export_dynamo(module, example, optimize=False),
}


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


def main() -> int:
    logging.disable(logging.WARNING)  # the dynamo exporter's notes on missing torchvision
    print(f"{'module':40s} {'export':24s} {'found':>6s} {'balanced':>8s} {'ratio':>7s}  verified")
    for label, (make, shape) in MODULES.items():
        torch.manual_seed(0)  # the recurrent weights, which randomise leaves as built
        module = randomise(make(), seed=0).eval()
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        reasons: dict[str, set[str]] = {}
        for export_name, exported in EXPORTS.items():
            model = exported(module, example)
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
