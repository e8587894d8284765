"""Look-alikes of foundation-model image encoders, written afresh from the published structure:

* ``DINOv2Lite`` — DINOv2's ViT: a class token and *register tokens* concatenated before the
  patches, the position embedding stored for a 4x4 grid and *bicubically interpolated* to the
  input's grid (``reshape -> permute -> F.interpolate -> permute``: the channels pass through a
  resize), per-channel LayerScale on both residual branches, registers dropped at the head;
* ``SAMEncoderLite`` — Segment Anything's image encoder: windowed attention over a padded
  token grid (pad to a multiple of the window, partition, attend, un-partition, crop) with
  *decomposed relative positions* (``einsum("bhwc,hkc->bhwk", q, Rh)``: per-axis position
  tables over the head dim, added to the attention logits), a global-attention block, and the
  neck: 1x1 and 3x3 convs with a channels-first LayerNorm2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, lookalike, seeded_randn

__all__ = ["ENTRIES"]


# ------------------------------------------------------------------ DINOv2


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Parameter(torch.full((dim,), 0.1))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.ls2 = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.ls1 * self.proj(a)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DINOv2Lite(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, registers: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.registers = nn.Parameter(torch.randn(1, registers, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + 16, dim) * 0.02)  # class + a 4x4 grid
        self.blocks = nn.Sequential(_Block(dim, heads), _Block(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(2 * dim, 10)
        self.n_reg = registers

    def _pos(self, h: int, w: int) -> torch.Tensor:
        cls_pos, grid = self.pos[:, :1], self.pos[:, 1:]
        dim = grid.shape[-1]
        grid = grid.reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch(x)  # [B, C, H, W]
        b, _, h, w = p.shape
        tokens = torch.cat([self.cls.expand(b, -1, -1), p.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + self._pos(h, w)
        tokens = torch.cat([tokens[:, :1], self.registers.expand(b, -1, -1), tokens[:, 1:]],
                           dim=1)
        t = self.norm(self.blocks(tokens))
        patches = t[:, 1 + self.n_reg:]
        return self.head(torch.cat([t[:, 0], patches.mean(1)], dim=-1))


# ------------------------------------------------------------------ SAM


def _rel_table(size: int, head_dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(2 * size - 1, head_dim) * 0.02)


def _rel(q_size: int, table: torch.Tensor) -> torch.Tensor:
    """Per query and key position along one axis, the table row of their distance."""
    coords = torch.arange(q_size)[:, None] - torch.arange(q_size)[None, :] + (q_size - 1)
    return table[coords.long()]  # [q, k, head_dim]


class _SAMAttention(nn.Module):
    def __init__(self, dim: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.size = heads, size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_h = _rel_table(size, dim // heads)
        self.rel_w = _rel_table(size, dim // heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C], H = W = size
        b, h, w, c = x.shape
        d = c // self.heads
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, d).unbind(0)
        attn = (q * d ** -0.5) @ k.transpose(-2, -1)
        rq = q.reshape(b * self.heads, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, _rel(h, self.rel_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, _rel(w, self.rel_w))
        attn = (attn.view(b * self.heads, h, w, h, w) + rel_h[:, :, :, :, None]
                + rel_w[:, :, :, None, :]).view(b * self.heads, h * w, h * w)
        out = (attn.softmax(-1) @ v).view(b, self.heads, h, w, d)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c))


class _SAMBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, grid: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SAMAttention(dim, heads, window if window else grid)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        shortcut = x
        x = self.norm1(x)
        if self.window:
            b, h, w, c = x.shape
            s = self.window
            ph, pw = (s - h % s) % s, (s - w % s) % s
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5)
            x = self.attn(x.reshape(-1, s, s, c))
            x = x.view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(b, hp, wp, c)[:, :h, :w]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SAMEncoderLite(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, out: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 5, 5, dim) * 0.02)
        self.blocks = nn.Sequential(_SAMBlock(dim, heads, 3, 5), _SAMBlock(dim, heads, 0, 5))
        self.neck = nn.Sequential(nn.Conv2d(dim, out, 1, bias=False), LayerNorm2d(out),
                                  nn.Conv2d(out, out, 3, padding=1, bias=False),
                                  LayerNorm2d(out))
        self.head = nn.Linear(out, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).permute(0, 2, 3, 1) + self.pos  # [B, 5, 5, C]
        x = self.neck(self.blocks(x).permute(0, 3, 1, 2))
        return self.head(x.mean((2, 3)))


ENTRIES: tuple[ZooModel, ...] = (
    lookalike("dinov2_registers", DINOv2Lite, seeded_randn(1, 3, 24, 24),
           "DINOv2: class + register tokens, position embedding bicubically interpolated to the "
           "grid, LayerScale", "attention", "transformer", "layernorm"),
    lookalike("sam_encoder", SAMEncoderLite, seeded_randn(1, 3, 20, 20),
           "Segment Anything encoder: padded windowed attention with decomposed relative "
           "positions (einsum), a global block, conv + LayerNorm2d neck", "attention",
           "transformer", "layernorm"),
)
