"""A MobileNetV2-shaped torch network, small enough to train on 2 cores in a minute.

The shape of torchvision's mobilenet_v2 (which is not a dependency): a 3x3 stride-2 stem,
inverted residual blocks (1x1 expansion, 3x3 depthwise, 1x1 linear bottleneck without an
activation, a residual Add where the block keeps its shape), a 1x1 head conv, global average
pooling and a Linear classifier; every conv is followed by BatchNorm and every activation is
ReLU6, or ``act`` in its place (the peers' approximation replaces ReLU6 by ReLU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

# (expansion t, output channels c, blocks n, first stride s), as in the MobileNetV2 paper
SMALL_SETTINGS = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 1))
# torchvision's mobilenet_v2 (width 1.0): with stem 32, head 1280, 3 input channels, 1000 classes
FULL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int, act) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, act) -> None:
        super().__init__()
        mid = cin * expand
        layers = [conv_bn(cin, mid, 1, 1, 1, act)] if expand != 1 else []
        layers += [conv_bn(mid, mid, 3, stride, mid, act), conv_bn(mid, cout, 1, 1, 1, None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2Like(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 10,
        stem: int = 8,
        head: int = 64,
        settings: Sequence[tuple[int, int, int, int]] = SMALL_SETTINGS,
        act: Callable[[], nn.Module] = nn.ReLU6,
    ) -> None:
        super().__init__()
        layers = [conv_bn(in_channels, stem, 3, 2, 1, act)]
        cin = stem
        for t, c, n, s in settings:
            for k in range(n):
                layers.append(InvertedResidual(cin, c, s if k == 0 else 1, t, act))
                cin = c
        layers.append(conv_bn(cin, head, 1, 1, 1, act))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
