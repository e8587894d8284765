"""Small models shared by the runtime tests; exported once per session to keep tests fast."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2, global pool, Linear: the ops a pruned CNN is made of."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Pre-norm self-attention + GELU MLP block over tokens, then a head."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="session")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(SmallCNN())


@pytest.fixture(scope="session")
def transformer() -> nn.Module:
    torch.manual_seed(1)
    return TinyTransformer().eval()


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory, cnn) -> str:
    """The CNN exported with a dynamic batch (path)."""
    from secateurs.runtime.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    export_onnx(cnn, torch.randn(2, 3, 16, 16), path, dynamic_batch=True)
    return str(path)


@pytest.fixture(scope="session")
def narrow_cnn_onnx(tmp_path_factory) -> str:
    """A narrower CNN with the same input signature: a stand-in for a pruned model."""
    from secateurs.runtime.onnx_export import export_onnx

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("onnx") / "cnn_narrow.onnx"
    export_onnx(_randomise_bn(SmallCNN(width=8)), torch.randn(2, 3, 16, 16), path,
                dynamic_batch=True)
    return str(path)
