"""Max and Min of inputs that all carry units tie them channel by channel, as a sum does:
max(a y, a z) = a max(y, z) for a > 0. Maxout layers and LightCNN's max-feature-map (the
channels of one conv split in halves and maxed) balance so; a Max with anything that carries
no unit is not homogeneous and stops them. Balanced models are run in onnxruntime next to the
originals, apart from the tool's own check."""

from __future__ import annotations

import pytest
from arch_reference import assert_equivalent

from onnxbalance import balance
from onnxbalance.analysis import analyse

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_models import export, export_dynamo, randomise  # noqa: E402 (needs torch)


class MaxFeatureMap(nn.Module):
    """conv (8 channels), the max of its halves (4), conv-ReLU (6), mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv1(x)
        h = torch.maximum(h[:, :4], h[:, 4:])
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


class Maxout(nn.Module):
    """The max of two linear maps of the input (8 each), then a linear head."""

    def __init__(self, against_input: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
        self.against_input = against_input

    def forward(self, x):
        other = x[:, :1].expand(-1, 8) if self.against_input else self.b(x)
        return self.out(torch.maximum(self.a(x), other))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize(
    ("module", "shape", "units"),
    [
        # conv1's channel k and k + 4 share one factor: 4 groups; conv2 6
        (MaxFeatureMap, (2, 3, 8, 8), 4 + 6),
        # row k of a and of b share one factor
        (Maxout, (4, 6), 8),
    ],
    ids=["max-feature-map", "maxout"],
)
def test_a_max_of_units_ties_them(module, shape, units, dynamo):
    net = randomise(module(), seed=2)
    example = torch.randn(*shape)
    model = export_dynamo(net, example) if dynamo else export(net, example)

    balanced, report = balance(model)

    assert report.units_balanced == units and report.verify.passed
    assert report.norm_after < report.norm_before * (1 - 1e-3)
    assert_equivalent(model, balanced, {model.graph.input[0].name: example.numpy()})


def test_a_max_with_what_carries_no_unit_stops_them():
    net = randomise(Maxout(against_input=True), seed=2)
    model = export(net, torch.randn(4, 6))
    units = analyse(model)
    assert units.n_groups == 0
    assert any("Max" in skip.reason for skip in units.skipped)
