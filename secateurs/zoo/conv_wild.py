"""Patterns from public vision models that trip pruners, written afresh (issue 11).

Each model reproduces one way real code spells an op, not a whole published network:

* ``WindowSwin`` — Swin-style shifted-window attention (timm): ``x.shape`` unpacked into sizes,
  padding to a window multiple, ``view``/``permute`` window partition and reverse, a crop
  ``x[:, :H, :W]`` whose bounds are size expressions of upstream tensors, ``torch.roll``;
* more below, one per failure class.

Default configs are small (unit tests); constructor arguments give the large configs the
benchmark (``tools/bench/coverage_speed.py``) uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randn

__all__ = ["WindowSwin", "ENTRIES"]


# ------------------------------------------------------------------ Swin-style window attention


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head attention inside one window: fused qkv, heads split by reshape/permute."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, shift: int, res: int) -> None:
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)
        mask = None
        if shift:
            hp = -(-res // ws) * ws
            img = torch.zeros(1, hp, hp, 1)
            cnt = 0
            for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                    img[:, hs, wsl, :] = cnt
                    cnt += 1
            win = window_partition(img, ws).view(-1, ws * ws)
            mask = (win.unsqueeze(1) - win.unsqueeze(2)) != 0
            mask = mask.float() * -100.0
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        shortcut = x
        x = self.norm1(x)
        pad_h = (self.ws - h % self.ws) % self.ws
        pad_w = (self.ws - w % self.ws) % self.ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        _, hp, wp, _ = x.shape
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = window_partition(x, self.ws).view(-1, self.ws * self.ws, c)
        win = self.attn(win, self.attn_mask)
        x = window_reverse(win.view(-1, self.ws, self.ws, c), self.ws, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w, :].contiguous()
        x = shortcut + x
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated on channels, LayerNorm, Linear to twice the width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class WindowSwin(nn.Module):
    """Swin-style classifier: conv patch embedding, stages of (regular, shifted) window
    blocks with patch merging between, mean pool, head. ``img`` must give a feature map that
    is not a window multiple somewhere, so padding and the crop are exercised."""

    def __init__(self, img: int = 40, dim: int = 16, depths: tuple[int, ...] = (2, 2),
                 heads: tuple[int, ...] = (2, 4), ws: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.patch_norm = nn.LayerNorm(dim)
        layers: list[nn.Module] = []
        res = img // 4
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            if i:
                layers.append(PatchMerging(dim))
                dim, res = dim * 2, res // 2
            for j in range(depth):
                shift = ws // 2 if j % 2 and res > ws else 0
                layers.append(SwinBlock(dim, nh, ws, shift, res))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch(x).permute(0, 2, 3, 1))
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=(1, 2)))


ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="swin_window",
        build=seeded_build(WindowSwin),
        example_inputs=seeded_randn(1, 3, 40, 40),
        description="Swin-style shifted-window attention: shape unpacking, pad, window "
                    "partition/reverse, roll, crop by size expressions, patch merging",
        tags=frozenset({"attention", "window-attention", "layernorm", "transformer"}),
    ),
)
