"""Smaller families and awkward cases: an op no pruner knows, GroupNorm/SE/upsampling, models
FX cannot trace, 1-D and 3-D convolutions, and a plain MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randn

__all__ = [
    "GluNet",
    "SqueezeExcite",
    "GroupNormUNet",
    "ResolutionAdaptiveNet",
    "GatedRefineNet",
    "Conv1dNet",
    "Conv3dNet",
    "ResidualMLP",
    "ENTRIES",
]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class GluNet(nn.Module):
    """CNN with an op that has no channel rule between two convs.

    ``F.glu(x, dim=1)`` gates channel ``i`` by channel ``i + C / 2``; without a rule for it, no
    channel of ``mix_in``'s output or ``mix_out``'s input may be removed, so a pruner must pin
    those channels (``cumsum`` played this part until it got a rule of its own). The stem and
    the residual tail are ordinary and prunable.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 16)
        self.mix_in = nn.Conv2d(16, 16, 1)
        self.mix_out = nn.Conv2d(8, 32, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.tail = nn.Sequential(
            _conv_bn_relu(32, 24), nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32)
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.mix_in(x)
        x = F.glu(x, dim=1)
        x = F.relu(self.bn(self.mix_out(x)))
        x = F.relu(x + self.tail(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global pool, 1x1 reduce, SiLU, 1x1 expand,
    sigmoid gate multiplied into the input channels."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.expand(self.act(self.reduce(s)))
        return x * torch.sigmoid(s)


def _conv_gn_silu(cin: int, cout: int, groups: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(groups, cout), nn.SiLU())


class GroupNormUNet(nn.Module):
    """Tiny U-Net-like image-to-image net (diffusion-UNet flavour): GroupNorm+SiLU convs, a strided
    encoder, SE, ``F.interpolate`` upsampling, a skip ``torch.cat`` and a ``ConvTranspose2d``
    that doubles the resolution of the output."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3) -> None:
        super().__init__()
        self.enc1 = _conv_gn_silu(in_channels, 16, groups=4)
        self.enc2 = _conv_gn_silu(16, 32, groups=8, stride=2)
        self.se = SqueezeExcite(32, 8)
        self.dec1 = _conv_gn_silu(32 + 16, 16, groups=4)
        self.up = nn.ConvTranspose2d(16, 8, kernel_size=2, stride=2)
        self.out = nn.Conv2d(8, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc1(x)
        x = self.se(self.enc2(skip))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.dec1(torch.cat([x, skip], dim=1))
        x = F.silu(self.up(x))
        return self.out(x)


class ResolutionAdaptiveNet(nn.Module):
    """CNN that resizes off-size inputs to its training resolution: ``if x.shape[-1] != size``.

    A Python branch on a tensor's shape: ``torch.fx.symbolic_trace`` sees a Proxy in the ``if``
    and raises ``TraceError``; ``torch.export`` specialises on the concrete example shape and
    traces the branch that was taken.
    """

    def __init__(self, image_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.image_size = image_size
        self.features = nn.Sequential(_conv_bn_relu(3, 16), _conv_bn_relu(16, 32, stride=2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear")
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GatedRefineNet(nn.Module):
    """CNN whose refinement stage runs only when the features' sum is positive.

    The data-dependent branch (``if x.sum() > 0:`` in eager code) is written with ``torch.cond``
    so that ``torch.export`` captures both branches; ``torch.fx.symbolic_trace`` fails on it.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 16)
        self.refine = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cond(x.sum() > 0, lambda t: t + self.refine(t), lambda t: t.clone(), (x,))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Conv1dNet(nn.Module):
    """1-D CNN for sequences (B, C, T): Conv1d-BN1d-ReLU-MaxPool1d twice, mean over time, Linear."""

    def __init__(self, in_channels: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, 16, 5, padding=2),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 3, padding=1),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=-1))


class Conv3dNet(nn.Module):
    """Tiny video/volume CNN (B, C, D, H, W): two Conv3d-BN3d-ReLU, global pool, Linear."""

    def __init__(self, in_channels: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, 8, 3, padding=1),
            nn.BatchNorm3d(8),
            nn.ReLU(),
            nn.Conv3d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm3d(16),
            nn.ReLU(),
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool3d(self.features(x), 1)
        return self.fc(torch.flatten(x, 1))


class ResidualMLP(nn.Module):
    """MLP with a residual hidden layer: Linear-LN-ReLU-Dropout, ``h + Linear(h)``, head."""

    def __init__(self, in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.relu(self.norm(self.fc1(x))))
        h = F.relu(h + self.fc2(h))
        return self.head(h)


ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="unsupported_op",
        build=seeded_build(GluNet),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="CNN with F.glu over channels (no channel rule) between two convs; "
                    "prunable stem and tail",
        tags=frozenset({"cnn", "residual", "batchnorm", "unsupported-op"}),
    ),
    ZooModel(
        name="groupnorm_cnn",
        build=seeded_build(GroupNormUNet),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="GroupNorm+SiLU U-Net: squeeze-excite, F.interpolate x2, skip concat, ConvTranspose2d",
        tags=frozenset(
            {"cnn", "groupnorm", "squeeze-excite", "upsample", "concat", "conv-transpose"}
        ),
    ),
    ZooModel(
        name="untraceable",
        build=seeded_build(ResolutionAdaptiveNet),
        example_inputs=seeded_randn(1, 3, 24, 24),
        description="CNN with a Python `if` on the input shape: FX TraceError, torch.export works",
        tags=frozenset({"cnn", "batchnorm", "fx-untraceable"}),
    ),
    ZooModel(
        name="untraceable_cond",
        build=seeded_build(GatedRefineNet),
        example_inputs=seeded_randn(1, 3, 16, 16),
        description="CNN with a data-dependent branch (x.sum() > 0) via torch.cond: export only",
        tags=frozenset({"cnn", "batchnorm", "control-flow", "fx-untraceable"}),
    ),
    ZooModel(
        name="conv1d_net",
        build=seeded_build(Conv1dNet),
        example_inputs=seeded_randn(1, 4, 64),
        description="Conv1d-BN1d-ReLU-MaxPool1d x2, mean over time, Linear",
        tags=frozenset({"cnn", "conv1d", "batchnorm"}),
    ),
    ZooModel(
        name="conv3d_net",
        build=seeded_build(Conv3dNet),
        example_inputs=seeded_randn(1, 2, 8, 16, 16),
        description="Conv3d-BN3d-ReLU x2, adaptive 3-D pool, Linear",
        tags=frozenset({"cnn", "conv3d", "batchnorm"}),
    ),
    ZooModel(
        name="mlp",
        build=seeded_build(ResidualMLP),
        example_inputs=seeded_randn(4, 32),
        description="Linear-LayerNorm-ReLU-Dropout MLP with a residual hidden layer",
        tags=frozenset({"mlp", "residual", "layernorm"}),
    ),
)
