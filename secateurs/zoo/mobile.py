"""Mobile architectures: MobileNetV2 and ShuffleNetV2.

Both lean on depthwise convolutions (``groups == channels``), whose input and output channels
are one and the same set. ShuffleNet adds the channel shuffle — a ``view`` into
``(groups, channels // groups)``, a ``transpose`` and a ``reshape`` back — plus ``chunk``/
``split`` branches joined by ``torch.cat``, and grouped pointwise convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "ShuffleUnit", "ShuffleNet", "ENTRIES"]


# ----------------------------------------------------------------------------------- MobileNetV2


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6, 'same' padding."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1 projection; identity shortcut when shapes agree."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), as in the paper's Table 2.
MBV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) as torchvision builds it (width multiplier 1)."""

    def __init__(
        self,
        settings: Sequence[tuple[int, int, int, int]],
        input_channel: int,
        last_channel: int,
        num_classes: int,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in settings:
            for i in range(n):
                features.append(InvertedResidual(input_channel, c, s if i == 0 else 1, t))
                input_channel = c
        features.append(ConvBNReLU6(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenetv2_small() -> MobileNetV2:
    """Stem 8, then t/c/n/s = 1/8/1/1, 4/12/2/2, 4/16/2/2, 64-wide head, 10 classes."""
    return MobileNetV2(
        [(1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2)],
        input_channel=8,
        last_channel=64,
        num_classes=10,
    )


def mobilenetv2() -> MobileNetV2:
    """torchvision ``mobilenet_v2``: stem 32, the seven stages of Table 2, 1280-wide head."""
    return MobileNetV2(MBV2_SETTINGS, input_channel=32, last_channel=1280, num_classes=1000)


# ----------------------------------------------------------------------------------- ShuffleNet


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: (B, g, C/g, H, W) -> transpose -> (B, C, H, W)."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit whose pointwise convs are grouped (``groups``), as in ShuffleNetV1.

    Stride 1: split the input into a passthrough part and a processed part — ``x.chunk(2, 1)``
    for an even split, ``torch.split`` with explicit sizes otherwise — and concatenate.
    Stride 2: both branches see the whole input and each produces half of the output.
    Either way the result is channel-shuffled with 2 groups.
    """

    def __init__(
        self, inp: int, oup: int, stride: int, groups: int = 1, passthrough: int | None = None
    ) -> None:
        super().__init__()
        self.stride = stride
        if stride == 1:
            if inp != oup:
                raise ValueError(f"stride-1 shuffle unit needs inp == oup, got {inp} and {oup}")
            self.passthrough = oup // 2 if passthrough is None else passthrough
            branch_in = branch_out = oup - self.passthrough
            self.branch1: nn.Module = nn.Identity()
        else:
            branch_in, branch_out = inp, oup // 2
            self.passthrough = 0
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_out, 1, bias=False),
                nn.BatchNorm2d(branch_out),
                nn.ReLU(inplace=True),
            )
        self.branch2 = nn.Sequential(
            nn.Conv2d(branch_in, branch_out, 1, groups=groups, bias=False),
            nn.BatchNorm2d(branch_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_out, branch_out, 3, stride, 1, groups=branch_out, bias=False),
            nn.BatchNorm2d(branch_out),
            nn.Conv2d(branch_out, branch_out, 1, groups=groups, bias=False),
            nn.BatchNorm2d(branch_out),
            nn.ReLU(inplace=True),
        )
        self.even_split = stride == 1 and 2 * self.passthrough == oup
        self.split_sizes = [self.passthrough, oup - self.passthrough]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        elif self.even_split:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            x1, x2 = torch.split(x, self.split_sizes, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """ShuffleNetV2 body (Ma et al. 2018): strided stem, stages of shuffle units, 1x1 head conv."""

    def __init__(
        self, stem: int, stages: Sequence[nn.Module], head_in: int, head: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(
            nn.Conv2d(head_in, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.stages(x)
        x = self.conv5(x)
        x = x.mean([2, 3])
        return self.fc(x)


def shufflenet_small() -> ShuffleNet:
    """Stem 16; stage 2: 16->32 (pointwise groups 2, chunk split); stage 3: 32->64 (groups 4,
    uneven 16/48 split); 128-wide head, 10 classes."""
    stages = [
        ShuffleUnit(16, 32, stride=2, groups=2),
        ShuffleUnit(32, 32, stride=1, groups=2),
        ShuffleUnit(32, 64, stride=2, groups=4),
        ShuffleUnit(64, 64, stride=1, groups=4, passthrough=16),
    ]
    return ShuffleNet(16, stages, head_in=64, head=128, num_classes=10)


ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="mobilenetv2",
        build=seeded_build(mobilenetv2_small),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="MobileNetV2: inverted residuals, depthwise 3x3, ReLU6, linear bottlenecks",
        tags=frozenset({"cnn", "residual", "depthwise", "batchnorm"}),
    ),
    ZooModel(
        name="mobilenetv2_full",
        build=seeded_build(mobilenetv2),
        example_inputs=seeded_randn(1, 3, 224, 224),
        description="MobileNetV2 1.0 (torchvision layout, 3.5M params) at 224x224",
        tags=frozenset({"cnn", "residual", "depthwise", "batchnorm", "bench"}),
    ),
    ZooModel(
        name="shufflenet",
        build=seeded_build(shufflenet_small),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="ShuffleNetV2 units with grouped pointwise convs, chunk/split branches, channel shuffle",
        tags=frozenset({"cnn", "depthwise", "grouped", "shuffle", "concat", "split", "batchnorm"}),
    ),
)
