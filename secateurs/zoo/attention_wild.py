"""Attention as public vision and language models write it, in small look-alikes.

Each model reproduces one pattern that public architectures use and that a pruner has to get
right (issue 11, "Real-world coverage"); the code is written here from the patterns, not copied:

* ``vit_unbind`` — timm's fused qkv ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`` split by
  ``unbind(0)``, by tuple unpacking and by ``split(1, dim)``; a PVTv2-style block with a fused
  kv projection (``k, v = kv.unbind(0)``) over spatially reduced tokens. The factor 3 (or 2)
  sets the number of outputs and must stay; heads and head dims prune.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randn

__all__ = ["UnbindAttention", "FusedKVAttention", "UnbindViT", "ENTRIES"]


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ------------------------------------------------------------------ class 1: unbind / unpacking


class UnbindAttention(nn.Module):
    """timm ``Attention``: one qkv Linear, ``(3, B, H, N, D)`` by reshape/permute, then q, k, v
    taken by ``unbind(0)`` (``how="unbind"``), tuple unpacking (``"unpack"``) or
    ``split(1, dim=2)`` before the permute (``"split"``)."""

    def __init__(self, dim: int, num_heads: int, how: str = "unbind") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.how = how
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        if self.how == "split":
            q, k, v = qkv.split(1, dim=2)
            q, k, v = (q.squeeze(2).transpose(1, 2), k.squeeze(2).transpose(1, 2),
                       v.squeeze(2).transpose(1, 2))
        elif self.how == "unpack":
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class FusedKVAttention(nn.Module):
    """PVTv2-style spatial-reduction attention: q from every token, a fused kv Linear on tokens
    reduced by a strided conv and LayerNorm, ``k, v = kv.reshape(B, M, 2, H, D)
    .permute(2, 0, 3, 1, 4).unbind(0)``, and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, grid: int, sr: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.grid = grid
        self.q = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr, stride=sr)
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        r = x.permute(0, 2, 1).reshape(b, c, self.grid, self.grid)
        r = self.norm(self.sr(r).reshape(b, c, -1).permute(0, 2, 1))
        kv = self.kv(r).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UnbindViT(nn.Module):
    """Patch embedding (16x16 image, 4x4 patches: 16 tokens), four blocks (unbind, tuple
    unpacking, ``split(1)``, PVTv2 fused kv), mean pool, head."""

    def __init__(self, dim: int = 32, heads: int = 4, mlp: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.blocks = nn.Sequential(
            _Block(dim, UnbindAttention(dim, heads, "unbind"), mlp),
            _Block(dim, UnbindAttention(dim, heads, "unpack"), mlp),
            _Block(dim, UnbindAttention(dim, heads, "split"), mlp),
            _Block(dim, FusedKVAttention(dim, heads, grid=4), mlp),
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.blocks(x)
        return self.head(self.norm(x).mean(dim=1))


_TAGS = frozenset({"transformer", "attention", "layernorm", "wild"})

ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="vit_unbind",
        build=seeded_build(UnbindViT),
        example_inputs=seeded_randn(2, 3, 16, 16),
        description="timm fused qkv split by unbind(0) / tuple unpacking / split(1), PVTv2 "
                    "fused kv unbind(0)",
        tags=_TAGS | {"fused-qkv"},
    ),
)
