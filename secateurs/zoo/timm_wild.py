"""Look-alikes of timm, torchvision and diffusers blocks whose channel bookkeeping is unusual,
written afresh from the published structure (a held-out check like ``public_lookalikes``):

* ``GhostNet`` — the ghost module: a primary 1x1 conv, a cheap depthwise conv of its output,
  both concatenated and *sliced* to the wanted width (``cat([x1, x2])[:, :oup]``: the slice
  drops the cheap branch's last channels), in a ghost bottleneck with squeeze-excite;
* ``Res2Net`` — the Bottle2neck: ``torch.split(x, width, 1)`` by an int width, a cascade of
  3x3 convs where each scale adds the previous one's output, the last scale passed through,
  all concatenated;
* ``XCiT`` — cross-covariance attention: q and k L2-normalised over *tokens*, a ``d x d``
  attention per head (softmax over head-dim channels) scaled by a per-head temperature
  ``[heads, 1, 1]``;
* ``GMLP`` — gMLP's spatial gating unit: ``chunk(2, -1)``, LayerNorm on one half, a Linear over
  the *tokens* axis, the halves multiplied;
* ``SwinV2Attn`` — Swin V2 window attention: cosine attention (q and k normalised over the
  head dim), a clamped per-head ``logit_scale``, and a continuous position bias whose MLP
  *outputs one value per head* (``cpb_mlp``), indexed by a relative-position buffer; the q/v
  biases concatenated with a zero k bias;
* ``DPN`` — the dual path block: one conv's output sliced at a constant into a residual part
  (added) and a dense part (concatenated, growing), the pair concatenated into the next block;
* ``TinyUNet`` — a diffusers-style UNet: sinusoidal timestep embedding, ResNet blocks with
  GroupNorm and the time embedding added per channel (``h + proj(t)[:, :, None, None]``), a
  skip concatenation after nearest upsampling;
* ``CoaTLite`` — CoaT's factorised attention (softmax of k over tokens) with the convolutional
  relative position encoding: v's heads split *unevenly* (``torch.split`` by channel counts
  of 2, 3 and 3 heads) into depthwise convs of kernel 3, 5 and 7. Iterating the split's parts
  defeats ``symbolic_trace``; ``torch.export`` keeps the batch symbolic from an example of
  batch 2, not 1 (a batch-1 example is exported static, and ``trace`` says so).

And four whose weights serve several uses: ``FPNSharedHead`` (RetinaNet: one conv head for
every FPN level), ``Siamese`` (one encoder, two inputs), ``TiedAutoencoder`` (a conv weight
reused transposed by the decoder) and ``LoopedBlock`` (ALBERT: one block, three steps).
``SDPAGQA``: grouped-query attention by ``scaled_dot_product_attention(enable_gqa=True)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, lookalike, seeded_randn

__all__ = ["ENTRIES"]


def _cbr(i: int, o: int, k: int = 3, s: int = 1, g: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False),
                               nn.BatchNorm2d(o)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ GhostNet


class GhostModule(nn.Module):
    def __init__(self, inp: int, oup: int, ratio: int = 2, dw: int = 3, act: bool = True):
        super().__init__()
        self.oup = oup
        init = math.ceil(oup / ratio)
        self.primary = _cbr(inp, init, 1, act=act)
        self.cheap = _cbr(init, init * (ratio - 1), dw, g=init, act=act)

    def forward(self, x):
        x1 = self.primary(x)
        x2 = self.cheap(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.expand = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * F.hardsigmoid(s)


class GhostBottleneck(nn.Module):
    def __init__(self, c: int, mid: int, out: int, stride: int = 1):
        super().__init__()
        self.ghost1 = GhostModule(c, mid)
        self.dw = _cbr(mid, mid, 3, stride, g=mid, act=False) if stride > 1 else nn.Identity()
        self.se = SqueezeExcite(mid)
        self.ghost2 = GhostModule(mid, out, act=False)
        self.shortcut = (nn.Identity() if c == out and stride == 1 else
                         nn.Sequential(_cbr(c, c, 3, stride, g=c, act=False),
                                       _cbr(c, out, 1, act=False)))

    def forward(self, x):
        return self.ghost2(self.se(self.dw(self.ghost1(x)))) + self.shortcut(x)


class GhostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3, 2)
        self.b1 = GhostBottleneck(16, 31, 16)  # 31: the slice drops a cheap channel
        self.b2 = GhostBottleneck(16, 48, 23, stride=2)
        self.b3 = GhostBottleneck(23, 70, 23)
        self.head = nn.Linear(23, 10)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------------------ Res2Net


class Bottle2neck(nn.Module):
    def __init__(self, c: int, width: int, scale: int = 4, out: int | None = None):
        super().__init__()
        out = out or c
        self.width, self.nums = width, scale - 1
        self.conv1 = _cbr(c, width * scale, 1)
        self.convs = nn.ModuleList(_cbr(width, width, 3) for _ in range(self.nums))
        self.conv3 = _cbr(width * scale, out, 1, act=False)
        self.down = nn.Identity() if out == c else _cbr(c, out, 1, act=False)

    def forward(self, x):
        spx = torch.split(self.conv1(x), self.width, 1)
        spo = []
        sp = spx[0]
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = conv(sp)
            spo.append(sp)
        spo.append(spx[self.nums])
        return F.relu(self.conv3(torch.cat(spo, 1)) + self.down(x))


class Res2Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3, 2)
        self.l1 = Bottle2neck(16, 8, out=32)
        self.l2 = Bottle2neck(32, 8)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.l2(self.l1(self.stem(x))).mean((2, 3)))


# ------------------------------------------------------------------ XCiT


class XCA(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # [b, heads, head_dim, tokens]
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # [b, heads, d, d]
        x = (attn.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj(x)


class XCiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = XCA(dim, heads)
        self.gamma1 = nn.Parameter(torch.rand(dim) + 0.5)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.gamma2 = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        x = x + self.gamma1 * self.attn(self.norm1(x))
        return x + self.gamma2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class XCiT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(XCiTBlock(dim, heads), XCiTBlock(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


# ------------------------------------------------------------------ gMLP


class SpatialGatingUnit(nn.Module):
    def __init__(self, hidden: int, tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden // 2)
        self.proj = nn.Linear(tokens, tokens)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2))
        return u * v.transpose(-1, -2)


class GMLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.sgu = SpatialGatingUnit(hidden, tokens)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x):
        return x + self.fc2(self.sgu(F.gelu(self.fc1(self.norm(x)))))


class GMLP(nn.Module):
    def __init__(self, dim: int = 24, hidden: int = 64):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(GMLPBlock(dim, hidden, 16), GMLPBlock(dim, hidden, 16))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


# ------------------------------------------------------------------ Swin V2


class SwinV2Attention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.logit_scale = nn.Parameter(torch.log(10 * (torch.rand(heads, 1, 1) + 0.5)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, heads, bias=False))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)
        r = torch.arange(-(window - 1), window, dtype=torch.float32)
        table = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1) / (window - 1)
        table = torch.sign(table) * torch.log2(table.abs() * 8 + 1) / math.log2(8)
        self.register_buffer("coords_table", table.unsqueeze(0), persistent=False)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        table = self.cpb_mlp(self.coords_table).view(-1, self.heads)
        bias = table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class SwinV2Block(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window
        self.attn = SwinV2Attention(dim, heads, window)
        self.norm1 = nn.LayerNorm(dim)  # post-norm, as Swin V2
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        b, h, w, c = x.shape
        s = self.window
        win = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        win = self.attn(win).view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
        x = x + self.norm1(win.reshape(b, h, w, c))
        return x + self.norm2(self.fc2(F.gelu(self.fc1(x))))


class SwinV2Attn(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(SwinV2Block(dim, heads, 4), SwinV2Block(dim, heads, 4))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        return self.head(self.blocks(x).mean((1, 2)))


# ------------------------------------------------------------------ DPN


class DualPathBlock(nn.Module):
    def __init__(self, c_in: int, r: int, c_res: int, inc: int, project: bool):
        super().__init__()
        self.c_res = c_res
        self.proj = _cbr(c_in, c_res + 2 * inc, 1) if project else None
        self.a = _cbr(c_in, r, 1)
        self.b = _cbr(r, r, 3, g=4)
        self.c = nn.Conv2d(r, c_res + inc, 1, bias=False)

    def forward(self, x):
        if isinstance(x, tuple):
            x = torch.cat(x, dim=1)
        if self.proj is not None:
            s = self.proj(x)
            s1, s2 = s[:, : self.c_res], s[:, self.c_res:]
        else:
            s1, s2 = None, None
        out = self.c(self.b(self.a(x)))
        o1, o2 = out[:, : self.c_res], out[:, self.c_res:]
        return s1 + o1, torch.cat([s2, o2], dim=1)


class DualPathBlockNext(DualPathBlock):
    """A non-projecting block: the residual part and the dense part come from the previous
    block's pair."""

    def forward(self, x):
        res, dense = x
        out = self.c(self.b(self.a(torch.cat(x, dim=1))))
        return res + out[:, : self.c_res], torch.cat([dense, out[:, self.c_res:]], dim=1)


class DPN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3, 2)
        self.b1 = DualPathBlock(16, 16, 24, 8, project=True)  # -> (24, 16 + 8)
        self.b2 = DualPathBlockNext(48, 16, 24, 8, project=False)  # -> (24, 24 + 8)
        self.bn = nn.BatchNorm2d(56)
        self.head = nn.Linear(56, 10)

    def forward(self, x):
        x = torch.cat(self.b2(self.b1(self.stem(x))), dim=1)
        return self.head(F.relu(self.bn(x)).mean((2, 3)))


# ------------------------------------------------------------------ UNet (diffusers-style)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb: int, groups: int = 4):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class TinyUNet(nn.Module):
    def __init__(self, c: int = 16, temb: int = 32):
        super().__init__()
        self.temb_dim = c
        self.time = nn.Sequential(nn.Linear(c, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.down1 = ResnetBlock(c, c, temb)
        self.downsample = nn.Conv2d(c, c, 3, 2, 1)
        self.mid = ResnetBlock(c, 2 * c, temb)
        self.up = ResnetBlock(3 * c, c, temb)
        self.norm_out = nn.GroupNorm(4, c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x, t):
        temb = self.time(timestep_embedding(t, self.temb_dim))
        h1 = self.down1(self.conv_in(x), temb)
        h = self.mid(self.downsample(h1), temb)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up(torch.cat([h, h1], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _unet_inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return (torch.randn(1, 3, 16, 16, generator=gen), torch.tensor([37.0]))


# ------------------------------------------------------------------ CoaT


class ConvRelPosEnc(nn.Module):
    def __init__(self, head_dim: int, windows: dict[int, int]):
        super().__init__()
        self.convs = nn.ModuleList()
        self.splits = []
        for k, heads in windows.items():
            ch = heads * head_dim
            self.convs.append(nn.Conv2d(ch, ch, k, padding=k // 2, groups=ch))
            self.splits.append(ch)

    def forward(self, q, v, size: tuple[int, int]):
        b, h, n, d = q.shape
        hh, ww = size
        q_img, v_img = q[:, :, 1:], v[:, :, 1:]
        v_img = v_img.transpose(-1, -2).reshape(b, h * d, hh, ww)
        parts = torch.split(v_img, self.splits, dim=1)
        conv = torch.cat([c(p) for c, p in zip(self.convs, parts)], dim=1)
        conv = conv.reshape(b, h, d, hh * ww).transpose(-1, -2)
        return F.pad(q_img * conv, (0, 0, 1, 0, 0, 0))


class FactorAttnConvRelPos(nn.Module):
    def __init__(self, dim: int, heads: int, windows: dict[int, int]):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.crpe = ConvRelPosEnc(dim // heads, windows)

    def forward(self, x, size: tuple[int, int]):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        factor = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
        x = self.scale * factor + self.crpe(q, v, size)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CoaTLite(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FactorAttnConvRelPos(dim, heads, {3: 2, 5: 3, 7: 3})
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x)
        size = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.attn(self.norm1(x), size)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x[:, 0])


# ------------------------------------------------------------------ weights used more than once


class FPNSharedHead(nn.Module):
    """torchvision RetinaNet-style: an FPN (lateral 1x1 convs to one width, top-down nearest
    ``interpolate(size=...)`` + add, 3x3 output convs, an extra level by ``max_pool2d(1, 2)``)
    and *one* conv head applied to every level, its logits ``view(N, A, K, H, W)`` ->
    ``permute`` -> ``reshape(N, -1, K)`` and concatenated over the levels."""

    def __init__(self, width: int = 16, anchors: int = 3, classes: int = 4):
        super().__init__()
        self.anchors, self.classes = anchors, classes
        self.c3 = _cbr(3, 16, 3, 2)
        self.c4 = _cbr(16, 24, 3, 2)
        self.c5 = _cbr(24, 32, 3, 2)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (16, 24, 32))
        self.output = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(3))
        self.tower = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.logits = nn.Conv2d(width, anchors * classes, 3, padding=1)

    def forward(self, x):
        c3 = self.c3(x)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        lat = [conv(c) for conv, c in zip(self.lateral, (c3, c4, c5))]
        p5 = lat[2]
        p4 = lat[1] + F.interpolate(p5, size=lat[1].shape[-2:], mode="nearest")
        p3 = lat[0] + F.interpolate(p4, size=lat[0].shape[-2:], mode="nearest")
        levels = [out(p) for out, p in zip(self.output, (p3, p4, p5))]
        levels.append(F.max_pool2d(levels[-1], 1, 2))
        outs = []
        for p in levels:
            y = self.logits(self.tower(p))
            n, _, h, w = y.shape
            y = y.view(n, self.anchors, self.classes, h, w).permute(0, 3, 4, 1, 2)
            outs.append(y.reshape(n, -1, self.classes))
        return torch.cat(outs, dim=1)


class Siamese(nn.Module):
    """One encoder on two inputs; the head reads ``cat([f, g, |f - g|])``."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(_cbr(3, 16, 3, 2), _cbr(16, 24, 3, 2))
        self.head = nn.Sequential(nn.Linear(72, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, a, b):
        f = self.encoder(a).mean((2, 3))
        g = self.encoder(b).mean((2, 3))
        return self.head(torch.cat([f, g, (f - g).abs()], dim=1))


def _two_images() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return (torch.randn(1, 3, 16, 16, generator=gen), torch.randn(1, 3, 16, 16, generator=gen))


class TiedAutoencoder(nn.Module):
    """A decoder that reuses the encoder's conv weights transposed
    (``F.conv_transpose2d(h, self.enc2.weight)``): one tensor is a conv's output channels and a
    transposed conv's input channels."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.enc2 = nn.Conv2d(16, 24, 3, 2, 1)
        self.mid = nn.Conv2d(24, 24, 1)
        self.dec1_bias = nn.Parameter(torch.randn(16) * 0.1)
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h1 = F.relu(self.enc1(x))
        h = F.relu(self.mid(F.relu(self.enc2(h1))))
        d = F.conv_transpose2d(h, self.enc2.weight, self.dec1_bias, stride=2, padding=1,
                               output_padding=1)
        return self.out(F.relu(d + h1))


class LoopedBlock(nn.Module):
    """ALBERT / Universal-Transformer style: one transformer block applied three times in a
    Python loop (its weights serve every iteration)."""

    def __init__(self, dim: int = 32, heads: int = 4, steps: int = 3):
        super().__init__()
        self.steps, self.heads = steps, heads
        self.embed = nn.Linear(12, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def block(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def forward(self, x):
        x = self.embed(x)
        for _ in range(self.steps):
            x = self.block(x)
        return self.head(x[:, 0])


class SDPAGQA(nn.Module):
    """Grouped-query attention through ``F.scaled_dot_product_attention(enable_gqa=True)``
    (6 query heads over 2 key/value heads, no ``repeat_kv``), with a per-head additive bias
    as the mask, in a pre-norm block."""

    def __init__(self, dim: int = 48, heads: int = 6, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Linear(12, dim)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.head_bias = nn.Parameter(torch.randn(heads, 1, 1) * 0.1)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        b, n, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        mask = self.head_bias.expand(self.heads, n, n)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, -1))
        return self.head(x + self.fc2(F.gelu(self.fc1(x))))[:, -1]


ENTRIES: tuple[ZooModel, ...] = (
    lookalike("ghostnet_slice", GhostNet, seeded_randn(1, 3, 32, 32),
           "GhostNet: ghost modules (primary + cheap depthwise, concat sliced to the width), "
           "squeeze-excite", "cnn", "concat", "depthwise"),
    lookalike("res2net_split", Res2Net, seeded_randn(1, 3, 32, 32),
           "Res2Net Bottle2neck: split by an int width, cascaded 3x3 convs adding the previous "
           "scale, concat", "cnn", "residual", "concat"),
    lookalike("xcit_xca", XCiT, seeded_randn(1, 3, 16, 16),
           "XCiT cross-covariance attention: q/k normalised over tokens, softmax over head-dim "
           "channels, per-head temperature", "attention", "transformer", "layernorm"),
    lookalike("gmlp_sgu", GMLP, seeded_randn(1, 3, 16, 16),
           "gMLP spatial gating unit: chunk, LayerNorm on one half, Linear over tokens, product",
           "transformer", "layernorm"),
    lookalike("swinv2_cosine", SwinV2Attn, seeded_randn(1, 3, 32, 32),
           "Swin V2 window attention: cosine attention, per-head logit scale, per-head "
           "continuous position bias MLP, cat(q_bias, 0, v_bias)", "attention", "transformer",
           "layernorm"),
    lookalike("dpn_dual_path", DPN, seeded_randn(1, 3, 32, 32),
           "DPN dual path blocks: a conv's output sliced into a residual and a growing dense "
           "part", "cnn", "residual", "concat", "grouped-conv"),
    lookalike("unet_timestep", TinyUNet, _unet_inputs,
           "diffusers-style UNet: timestep embedding added per channel, GroupNorm ResNet "
           "blocks, skip concat after upsampling", "cnn", "residual", "concat"),
    lookalike("coat_conv_relpos", CoaTLite, seeded_randn(2, 3, 16, 16),
           "CoaT factorised attention with conv relative position encoding over uneven head "
           "splits (2, 3, 3 heads; kernels 3, 5, 7)", "attention", "transformer", "layernorm",
           "fx-untraceable"),
    lookalike("fpn_shared_head", FPNSharedHead, seeded_randn(1, 3, 32, 32),
           "RetinaNet-style FPN (lateral convs, top-down interpolate + add, extra max-pool "
           "level) with one conv head shared by every level, anchor reshape + concat", "cnn",
           "residual", "concat"),
    lookalike("siamese_shared", Siamese, _two_images,
           "Siamese: one encoder on two inputs, head on cat([f, g, |f - g|])", "cnn",
           "concat"),
    lookalike("tied_autoencoder", TiedAutoencoder, seeded_randn(1, 3, 16, 16),
           "autoencoder whose decoder reuses an encoder conv's weight in conv_transpose2d",
           "cnn", "residual"),
    lookalike("looped_block", LoopedBlock, seeded_randn(1, 8, 12),
           "ALBERT-style: one transformer block applied three times in a loop", "attention",
           "transformer", "layernorm"),
    lookalike("sdpa_gqa", SDPAGQA, seeded_randn(1, 8, 12),
           "grouped-query attention by scaled_dot_product_attention(enable_gqa=True), 6 "
           "query heads over 2 kv heads, a per-head bias mask", "attention", "transformer",
           "layernorm"),
)
