"""Classic convolutional classifiers: ResNet (bottleneck), DenseNet and VGG.

Written the way torchvision writes them, so that traced graphs show the patterns a pruner meets
in the wild: residual ``out += identity`` with a strided 1x1 projection, ``torch.cat`` of all
previous feature maps, and ``torch.flatten(x, 1)`` of a 2x2 or 7x7 map into a Linear (each
channel expands to H*W input features of the classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randn

__all__ = ["Bottleneck", "ResNet", "DenseLayer", "DenseNet", "VGG", "ENTRIES"]


# ---------------------------------------------------------------------------------------- ResNet


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(in_planes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet with bottleneck blocks (ResNet-50/101/152 family).

    ``imagenet_stem`` selects the 7x7/2 conv + 3x3/2 max-pool stem; otherwise a 3x3/1 conv
    (CIFAR-style) keeps small inputs from vanishing.
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        stem_width: int,
        imagenet_stem: bool = True,
    ) -> None:
        super().__init__()
        self.in_planes = stem_width
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        for i, (blocks, planes) in enumerate(zip(layers, widths)):
            stages.append(self._make_layer(planes, blocks, stride=1 if i == 0 else 2))
        while len(stages) < 4:
            stages.append(nn.Identity())
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.in_planes, planes * Bottleneck.expansion, 1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_small() -> ResNet:
    """Three stages of bottlenecks (2, 1, 1 blocks), widths 8/16/32, CIFAR stem, 10 classes."""
    return ResNet([2, 1, 1], [8, 16, 32], num_classes=10, stem_width=16, imagenet_stem=False)


def resnet50() -> ResNet:
    """torchvision ``resnet50`` layout: [3, 4, 6, 3] bottlenecks, widths 64..512, 1000 classes."""
    return ResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes=1000, stem_width=64)


# -------------------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck to ``bn_size * growth``) then BN-ReLU-conv3x3 to ``growth``."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 halving the channels, then 2x2 average pooling."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__(
            nn.BatchNorm2d(num_input_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_input_features, num_output_features, 1, bias=False),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017) as torchvision builds it."""

    def __init__(
        self,
        growth_rate: int,
        block_config: Sequence[int],
        num_init_features: int,
        bn_size: int,
        num_classes: int,
        imagenet_stem: bool = True,
    ) -> None:
        super().__init__()
        if imagenet_stem:
            stem: list[nn.Module] = [
                nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(num_init_features),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            ]
        else:
            stem = [
                nn.Conv2d(3, num_init_features, 3, padding=1, bias=False),
                nn.BatchNorm2d(num_init_features),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*stem)
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, bn_size, growth_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(
                    f"transition{i + 1}", Transition(num_features, num_features // 2)
                )
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = torch.relu(features)
        out = nn.functional.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet_small() -> DenseNet:
    """Two dense blocks of 3 and 2 layers, growth 8, bn_size 2, CIFAR stem, 10 classes."""
    return DenseNet(8, (3, 2), num_init_features=16, bn_size=2, num_classes=10, imagenet_stem=False)


def densenet121() -> DenseNet:
    """torchvision ``densenet121``: growth 32, blocks (6, 12, 24, 16), 64 stem features."""
    return DenseNet(32, (6, 12, 24, 16), num_init_features=64, bn_size=4, num_classes=1000)


# ------------------------------------------------------------------------------------------- VGG

VGGConfig = Sequence[int | str]


class VGG(nn.Module):
    """VGG with BatchNorm: conv3x3-BN-ReLU stacks and max-pools, then a 3-layer MLP classifier.

    The adaptive pool fixes the spatial size fed to ``torch.flatten(x, 1)`` (2x2 small, 7x7
    full), so the first Linear has ``channels * pool_size**2`` inputs.
    """

    def __init__(
        self, cfg: VGGConfig, pool_size: int, hidden: int, num_classes: int, dropout: float = 0.5
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(v, int)
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
            in_channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * pool_size * pool_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg_small() -> VGG:
    """Five conv layers (16, 32, 32, 48, 48) in three pooled stages, 2x2 pooled map, 10 classes."""
    return VGG([16, "M", 32, 32, "M", 48, 48, "M"], pool_size=2, hidden=64, num_classes=10)


def vgg16_bn() -> VGG:
    """torchvision ``vgg16_bn``: configuration D, 7x7 pooled map, 4096-wide classifier."""
    cfg: VGGConfig = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
    cfg += [512, 512, 512, "M", 512, 512, 512, "M"]
    return VGG(cfg, pool_size=7, hidden=4096, num_classes=1000)


ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="resnet",
        build=seeded_build(resnet_small),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="ResNet-50-style bottlenecks (1x1-3x3-1x1, expansion 4), BN, projection shortcuts",
        tags=frozenset({"cnn", "residual", "batchnorm"}),
    ),
    ZooModel(
        name="resnet50_full",
        build=seeded_build(resnet50),
        example_inputs=seeded_randn(1, 3, 224, 224),
        description="ResNet-50 (torchvision layout, 25.6M params) at 224x224",
        tags=frozenset({"cnn", "residual", "batchnorm", "bench"}),
    ),
    ZooModel(
        name="densenet",
        build=seeded_build(densenet_small),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="DenseNet-BC: dense blocks concatenating every earlier map, avg-pool transitions",
        tags=frozenset({"cnn", "concat", "batchnorm"}),
    ),
    ZooModel(
        name="densenet121_full",
        build=seeded_build(densenet121),
        example_inputs=seeded_randn(1, 3, 224, 224),
        description="DenseNet-121 (growth 32, blocks 6/12/24/16, 8.0M params) at 224x224",
        tags=frozenset({"cnn", "concat", "batchnorm", "bench"}),
    ),
    ZooModel(
        name="vgg",
        build=seeded_build(vgg_small),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="VGG-BN: conv-BN-ReLU stacks, max-pools, flatten of a 2x2 map into a 3-layer MLP",
        tags=frozenset({"cnn", "flatten", "batchnorm"}),
    ),
    ZooModel(
        name="vgg16_full",
        build=seeded_build(vgg16_bn),
        example_inputs=seeded_randn(1, 3, 224, 224),
        description="VGG-16 with BN (138M params), flatten of a 7x7x512 map into 4096-wide MLP",
        tags=frozenset({"cnn", "flatten", "batchnorm", "bench"}),
    ),
)
