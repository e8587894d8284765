"""Look-alikes of public architectures, written afresh from their published structure.

A held-out check of issue 11: each model reproduces how torchvision, timm, Hugging Face or a
well-known repository spells one architecture's coupling pattern, at toy width. Every one
prunes exactly (``tests/test_prune_zoo.py``) or pins with a reason
(``tests/test_zoo_public.py``):

* ``Inception`` (GoogLeNet) — four branches concatenated, a max-pool branch;
* ``CBAMNet`` — CBAM channel attention (avg+max shared MLP) and spatial attention from the
  mean/max over channels (a statistic over the channel dim: lossy, so pinned in exact mode);
* ``ECANet`` — ECA attention: a ``Conv1d`` sliding *across the channel axis* (neighbouring
  channels mix, so the channel dim is pinned);
* ``ResNeSt`` — split attention with radix 2: ``reshape(B, radix, C/radix, H, W)``, sum over
  the radix, ``rSoftMax`` by ``view``/``transpose``;
* ``SKNet`` — selective kernel: ``torch.stack`` of grouped 3x3/5x5 branches, softmax over the
  branch axis;
* ``Xception`` — separable convs, stride-2 1x1 projection shortcut, max-pool in the branch;
* ``CaiT`` — talking-heads attention (``nn.Linear(heads, heads)`` mixes the heads axis) and
  class attention (only the class token queries), layer scale;
* ``DeiTDist`` — class and distillation tokens prepended, two heads averaged,
  ``nn.TransformerEncoderLayer`` blocks;
* ``Conformer`` — the conv module (pointwise, ``F.glu`` over channels, depthwise ``Conv1d``,
  BatchNorm1d) and ``nn.MultiheadAttention``;
* ``HRNet`` — two resolutions exchanging features (``F.interpolate(size=...)`` + add, strided
  conv + add), concat head;
* ``YoloLite`` — YOLOv8 C2f (``chunk`` into a list extended in a generator) and SPPF (max-pool
  chain + concat), upsample + concat neck, a detection head reshaped to anchors (needs
  ``torch.export``: the generator defeats ``symbolic_trace``);
* ``TiedGPT`` — GPT-2 with ``lm_head.weight`` tied to ``wte.weight``;
* ``Wav2VecLite`` — wav2vec2's conv feature extractor (per-channel GroupNorm) and its
  weight-normed grouped positional conv (``parametrizations.weight_norm``, ``dim=2``);
* ``ESPCN`` — a ``PixelShuffle`` super-resolution tail;
* ``EDSRLite`` — a ``pixel_unshuffle`` stem and a conv + ``PixelShuffle`` upsampler mid-network
  (an output channel of the shuffle is ``r * r`` input channels);
* ``EffV2`` — EfficientNetV2 fused-MBConv with a hard-sigmoid squeeze-excite;
* ``VGGish`` — ``AdaptiveAvgPool2d((2, 2))`` then ``flatten`` into a Linear (4 features per
  channel);
* ``DETRLite`` — learned queries (``nn.Embedding.weight`` expanded over the batch) with self- and
  cross-attention ``nn.MultiheadAttention`` over conv features;
* ``CRNN`` — conv features reshaped ``(B, W, C*H)`` into a bidirectional ``nn.LSTM``;
* ``MaxViTLite`` — MaxViT grid attention: ``view``/``permute`` into a grid of windows and back;
* ``MobileViTLite`` — HF MobileViT's unfold into patches, attention over ``batch x patch_area``
  rows (``view(*rows, -1, head_size)``, a size computed at run time), fold back and concat.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, lookalike, seeded_randint, seeded_randn

__all__ = ["ENTRIES"]


def cbr(i, o, k=3, s=1, g=1, act=True):
    layers = [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ GoogLeNet / Inception: four-branch concat, maxpool branch
class Inception(nn.Module):
    def __init__(self, i, c1, c3r, c3, c5r, c5, pp):
        super().__init__()
        self.b1 = cbr(i, c1, 1)
        self.b2 = nn.Sequential(cbr(i, c3r, 1), cbr(c3r, c3, 3))
        self.b3 = nn.Sequential(cbr(i, c5r, 1), cbr(c5r, c5, 3), cbr(c5, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), cbr(i, pp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32, 3, 2)
        self.i3a = Inception(32, 16, 16, 24, 8, 8, 8)
        self.i3b = Inception(56, 24, 16, 32, 8, 16, 16)
        self.fc = nn.Linear(88, 10)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x):
        x = self.i3b(self.i3a(self.stem(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


# ------------------------------------------------------------------ CBAM: channel attention (avg+max MLP) and spatial attention (mean/max over C)
class CBAM(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.ReLU(), nn.Conv2d(c // r, c, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        ca = torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))
        x = x * ca
        sa = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(sa))


class CBAMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a1 = cbr(3, 32), CBAM(32)
        self.c2, self.a2 = cbr(32, 64, s=2), CBAM(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.a2(self.c2(self.a1(self.c1(x))))
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------ ECA-Net: conv1d across the channel axis (neighbouring channels mix)
class ECA(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, 1)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y)


class ECANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.e1 = cbr(3, 32), ECA()
        self.c2, self.e2 = cbr(32, 64, s=2), ECA()
        self.c3 = cbr(64, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.e1(self.c1(x))
        x = self.e2(self.c2(x))
        x = x + self.c3(x)
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------ ResNeSt split attention (radix 2, rSoftMax over the radix)
class RSoftmax(nn.Module):
    def __init__(self, radix, cardinality):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality

    def forward(self, x):
        b = x.size(0)
        x = x.view(b, self.cardinality, self.radix, -1).transpose(1, 2)
        x = F.softmax(x, dim=1)
        return x.reshape(b, -1)


class SplitAttn(nn.Module):
    def __init__(self, c, radix=2, groups=1, r=4):
        super().__init__()
        self.radix = radix
        mid = c * radix
        attn = max(c // r, 8)
        self.conv = nn.Conv2d(c, mid, 3, 1, 1, groups=groups * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(mid)
        self.fc1 = nn.Conv2d(c, attn, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(attn)
        self.fc2 = nn.Conv2d(attn, mid, 1, groups=groups)
        self.rsoftmax = RSoftmax(radix, groups)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(x)))
        B, RC, H, W = x.shape
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        x_gap = x.sum(dim=1)
        x_gap = x_gap.mean((2, 3), keepdim=True)
        x_gap = F.relu(self.bn1(self.fc1(x_gap)))
        x_attn = self.fc2(x_gap)
        x_attn = self.rsoftmax(x_attn).view(B, -1, 1, 1)
        out = (x * x_attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)
        return out.contiguous()


class ResNeStBlock(nn.Module):
    def __init__(self, c, w):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w)
        self.sa = SplitAttn(w)
        self.conv3, self.bn3 = nn.Conv2d(w, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.sa(out)))
        return F.relu(out + x)


class ResNeSt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.layers = nn.Sequential(ResNeStBlock(32, 16), ResNeStBlock(32, 16))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


# ------------------------------------------------------------------ SKNet selective kernel: branches summed, softmax over the branch axis
class SKConv(nn.Module):
    def __init__(self, c, m=2, r=4):
        super().__init__()
        self.convs = nn.ModuleList([cbr(c, c, 3 + 2 * i, g=4) for i in range(m)])
        d = max(c // r, 8)
        self.fc = nn.Sequential(nn.Conv2d(c, d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU())
        self.fcs = nn.Conv2d(d, c * m, 1)
        self.m = m

    def forward(self, x):
        feats = torch.stack([conv(x) for conv in self.convs], dim=1)  # B, M, C, H, W
        u = feats.sum(1)
        s = u.mean((2, 3), keepdim=True)
        z = self.fc(s)
        a = self.fcs(z).view(x.shape[0], self.m, -1, 1, 1).softmax(dim=1)
        return (feats * a).sum(1)


class SKNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.sk = SKConv(32)
        self.out = cbr(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.out(self.sk(x))
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------ Xception: separable convs, residual with 1x1 stride-2 projection
class SepConv(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.dw = nn.Conv2d(i, i, 3, 1, 1, groups=i, bias=False)
        self.pw = nn.Conv2d(i, o, 1, bias=False)
        self.bn = nn.BatchNorm2d(o)

    def forward(self, x):
        return self.bn(self.pw(self.dw(F.relu(x))))


class XBlock(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.skip = nn.Sequential(nn.Conv2d(i, o, 1, 2, bias=False), nn.BatchNorm2d(o))
        self.rep = nn.Sequential(SepConv(i, o), SepConv(o, o), nn.MaxPool2d(3, 2, 1))

    def forward(self, x):
        return self.rep(x) + self.skip(x)


class Xception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.b1, self.b2 = XBlock(32, 64), XBlock(64, 96)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        return self.fc(F.relu(self.b2(self.b1(self.stem(x)))).mean((2, 3)))


# ------------------------------------------------------------------ CaiT: class attention (cls token attends to all) + talking-heads attention
class TalkingHeadAttn(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.h = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj_l = nn.Linear(heads, heads)
        self.proj_w = nn.Linear(heads, heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ClassAttn(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.h = heads
        self.scale = (dim // heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, self.h, C // self.h).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, self.h, C // self.h).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, self.h, C // self.h).permute(0, 2, 1, 3)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x_cls = (attn @ v).transpose(1, 2).reshape(B, 1, C)
        return self.proj(x_cls)


class CaiT(nn.Module):
    def __init__(self, dim=48, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.n1, self.a1 = nn.LayerNorm(dim), TalkingHeadAttn(dim, heads)
        self.g1 = nn.Parameter(1e-1 * torch.ones(dim))
        self.n2, self.m = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 96), nn.GELU(), nn.Linear(96, dim))
        self.g2 = nn.Parameter(1e-1 * torch.ones(dim))
        self.nc, self.ca = nn.LayerNorm(dim), ClassAttn(dim, heads)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = x + self.g1 * self.a1(self.n1(x))
        x = x + self.g2 * self.m(self.n2(x))
        cls = self.cls.expand(x.shape[0], -1, -1)
        u = torch.cat((cls, x), dim=1)
        cls = cls + self.ca(self.nc(u))
        return self.head(self.norm(cls)[:, 0])


# ------------------------------------------------------------------ DeiT with a distillation token: two tokens prepended, two heads averaged
class DeiTDist(nn.Module):
    def __init__(self, dim=48, heads=3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 66, dim) * 0.02)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(dim, heads, 96, 0.0, batch_first=True,
                                                                norm_first=True) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head, self.head_dist = nn.Linear(dim, 10), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B = x.shape[0]
        x = torch.cat((self.cls.expand(B, -1, -1), self.dist.expand(B, -1, -1), x), dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


# ------------------------------------------------------------------ Conformer conv module: pointwise -> GLU -> depthwise 1d -> BN -> swish -> pointwise
class ConformerConv(nn.Module):
    def __init__(self, d, k=7):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.dw = nn.Conv1d(d, d, k, padding=k // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, d, 1)

    def forward(self, x):  # B, T, D
        y = self.ln(x).transpose(1, 2)
        y = F.glu(self.pw1(y), dim=1)
        y = F.silu(self.bn(self.dw(y)))
        return x + self.pw2(y).transpose(1, 2)


class Conformer(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.inp = nn.Linear(20, d)
        self.ff1 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ln_a = nn.LayerNorm(d)
        self.conv = ConformerConv(d)
        self.out = nn.Linear(d, 11)

    def forward(self, x):
        x = self.inp(x)
        x = x + 0.5 * self.ff1(x)
        y = self.ln_a(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = self.conv(x)
        return self.out(x)


# ------------------------------------------------------------------ HRNet-lite: two resolutions exchanging features (upsample + add, strided conv + add)
class HRFuse(nn.Module):
    def __init__(self, c_hi, c_lo):
        super().__init__()
        self.hi = nn.Sequential(cbr(c_hi, c_hi), cbr(c_hi, c_hi))
        self.lo = nn.Sequential(cbr(c_lo, c_lo), cbr(c_lo, c_lo))
        self.lo2hi = nn.Sequential(nn.Conv2d(c_lo, c_hi, 1, bias=False), nn.BatchNorm2d(c_hi))
        self.hi2lo = nn.Sequential(nn.Conv2d(c_hi, c_lo, 3, 2, 1, bias=False), nn.BatchNorm2d(c_lo))

    def forward(self, xs):
        hi, lo = self.hi(xs[0]), self.lo(xs[1])
        up = F.interpolate(self.lo2hi(lo), size=hi.shape[-2:], mode="bilinear", align_corners=False)
        return [F.relu(hi + up), F.relu(lo + self.hi2lo(hi))]


class HRNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.down = cbr(16, 32, s=2)
        self.f1, self.f2 = HRFuse(16, 32), HRFuse(16, 32)
        self.head = nn.Conv2d(48, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        xs = self.f2(self.f1([x, self.down(x)]))
        lo = F.interpolate(xs[1], scale_factor=2, mode="nearest")
        return self.head(torch.cat([xs[0], lo], 1))


# ------------------------------------------------------------------ YOLOv5/8 neck bits: C2f split + SPPF maxpool chain + concat, upsample + concat
class C2f(nn.Module):
    def __init__(self, i, o, n=2):
        super().__init__()
        self.c = o // 2
        self.cv1 = cbr(i, 2 * self.c, 1)
        self.cv2 = cbr((2 + n) * self.c, o, 1)
        self.m = nn.ModuleList(nn.Sequential(cbr(self.c, self.c), cbr(self.c, self.c)) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, i, o, k=5):
        super().__init__()
        c = i // 2
        self.cv1, self.cv2 = cbr(i, c, 1), cbr(c * 4, o, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class YoloLite(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = cbr(3, 16, s=2)
        self.b1 = nn.Sequential(cbr(16, 32, s=2), C2f(32, 32))
        self.b2 = nn.Sequential(cbr(32, 64, s=2), C2f(64, 64), SPPF(64, 64))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(96, 32)
        self.det = nn.Conv2d(32, 3 * 8, 1)

    def forward(self, x):
        p3 = self.b1(self.b0(x))
        p4 = self.b2(p3)
        y = self.n1(torch.cat([self.up(p4), p3], 1))
        b, _, h, w = y.shape
        return self.det(y).view(b, 3, 8, h, w).permute(0, 1, 3, 4, 2).contiguous()


# ------------------------------------------------------------------ GPT-2 with tied embeddings: lm_head.weight is wte.weight
class TiedGPT(nn.Module):
    def __init__(self, vocab=50, d=32, heads=4, n=2, t=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList()
        for _ in range(n):
            self.blocks.append(nn.ModuleDict(dict(ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d),
                                                  proj=nn.Linear(d, d), ln2=nn.LayerNorm(d),
                                                  fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d))))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.h = heads

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            C = x.shape[-1]
            q, k, v = b["qkv"](b["ln1"](x)).split(C, dim=2)
            q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b["proj"](y.transpose(1, 2).reshape(B, T, C))
            x = x + b["out"](F.gelu(b["fc"](b["ln2"](x)), approximate="tanh"))
        return self.lm_head(self.ln_f(x))


# ------------------------------------------------------------------ Wav2Vec2-ish: conv feature extractor with GroupNorm, weight-normed positional conv
class Wav2VecLite(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.c0 = nn.Conv1d(1, 32, 10, 5, bias=False)
        self.gn = nn.GroupNorm(32, 32)
        self.c1 = nn.Conv1d(32, 32, 3, 2, bias=False)
        self.proj_ln, self.proj = nn.LayerNorm(32), nn.Linear(32, d)
        pc = nn.Conv1d(d, d, 9, padding=4, groups=4)
        self.pos_conv = nn.utils.parametrizations.weight_norm(pc, name="weight", dim=2)
        self.ln = nn.LayerNorm(d)
        self.enc = nn.TransformerEncoderLayer(d, 4, 64, 0.0, batch_first=True)
        self.out = nn.Linear(d, 12)

    def forward(self, wav):  # B, L
        x = F.gelu(self.gn(self.c0(wav[:, None])))
        x = F.gelu(self.c1(x)).transpose(1, 2)
        x = self.proj(self.proj_ln(x))
        x = x + F.gelu(self.pos_conv(x.transpose(1, 2))).transpose(1, 2)
        return self.out(self.enc(self.ln(x)))


# ------------------------------------------------------------------ PixelShuffle super-resolution head (ESPCN / EDSR tail)
class ESPCN(nn.Module):
    def __init__(self, r=2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.Tanh(), nn.Conv2d(32, 16, 3, padding=1), nn.Tanh())
        self.res = nn.Conv2d(16, 16, 3, padding=1)
        self.tail = nn.Conv2d(16, 3 * r * r, 3, padding=1)
        self.ps = nn.PixelShuffle(r)

    def forward(self, x):
        y = self.body(x)
        y = y + self.res(y)
        return self.ps(self.tail(y))


# ------------------------------------------------------------------ EDSR/NAFNet-style: pixel_unshuffle stem, PixelShuffle upsampler
class EDSRLite(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.head = nn.Conv2d(12, c, 3, padding=1)
        self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                                nn.Conv2d(c, c, 3, padding=1)) for _ in range(2))
        self.up = nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2))
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        y = self.head(F.pixel_unshuffle(x, 2))
        for block in self.body:
            y = y + 0.1 * block(y)
        return self.tail(self.up(y)) + x


# ------------------------------------------------------------------ MnasNet/EfficientNetV2: fused-MBConv (3x3 expand conv), SE with hardsigmoid
class FusedMB(nn.Module):
    def __init__(self, i, o, e=4, s=1):
        super().__init__()
        self.use_res = s == 1 and i == o
        self.expand = nn.Sequential(nn.Conv2d(i, i * e, 3, s, 1, bias=False), nn.BatchNorm2d(i * e), nn.SiLU())
        self.se1, self.se2 = nn.Conv2d(i * e, max(i // 4, 4), 1), nn.Conv2d(max(i // 4, 4), i * e, 1)
        self.project = nn.Sequential(nn.Conv2d(i * e, o, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = self.expand(x)
        s = F.hardsigmoid(self.se2(F.silu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        y = self.project(y * s)
        return x + y if self.use_res else y


class EffV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(FusedMB(16, 16), FusedMB(16, 32, s=2), FusedMB(32, 32))
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


# ------------------------------------------------------------------ flatten -> linear without pooling (VGG/AlexNet classifier), adaptive pool to 2x2
class VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2), cbr(32, 32))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(32 * 4, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------ DETR-ish decoder: learned queries cross-attending to conv features via nn.MultiheadAttention
class DETRLite(nn.Module):
    def __init__(self, d=32, q=6):
        super().__init__()
        self.backbone = nn.Sequential(cbr(3, 32, s=2), cbr(32, 64, s=2))
        self.input_proj = nn.Conv2d(64, d, 1)
        self.query = nn.Embedding(q, d)
        self.self_attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.cross = nn.MultiheadAttention(d, 4, batch_first=True)
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d))
        self.cls, self.box = nn.Linear(d, 5), nn.Linear(d, 4)

    def forward(self, x):
        mem = self.input_proj(self.backbone(x)).flatten(2).transpose(1, 2)
        tgt = self.query.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        tgt = self.n1(tgt + self.self_attn(tgt, tgt, tgt)[0])
        tgt = self.n2(tgt + self.cross(tgt, mem, mem)[0])
        tgt = self.n3(tgt + self.ffn(tgt))
        return torch.cat([self.cls(tgt), self.box(tgt).sigmoid()], -1)


# ------------------------------------------------------------------ LSTM classifier over conv features (recurrent op, no rule expected)
class CRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(cbr(1, 16), nn.MaxPool2d((2, 1)), cbr(16, 32), nn.MaxPool2d((2, 1)))
        self.rnn = nn.LSTM(32 * 4, 32, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(64, 11)

    def forward(self, x):  # B, 1, 16, W
        f = self.cnn(x)
        b, c, h, w = f.shape
        f = f.permute(0, 3, 1, 2).reshape(b, w, c * h)
        y, _ = self.rnn(f)
        return self.fc(y)


# ------------------------------------------------------------------ MaxViT-ish grid attention: rearrange into grid windows with view/permute
class GridAttn(nn.Module):
    def __init__(self, d, heads, g=2):
        super().__init__()
        self.g, self.h = g, heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):  # B, C, H, W
        B, C, H, W = x.shape
        g = self.g
        t = x.view(B, C, g, H // g, g, W // g).permute(0, 3, 5, 2, 4, 1).reshape(-1, g * g, C)
        n = t.shape[1]
        qkv = self.qkv(self.norm(t)).reshape(-1, n, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, n, C)
        t = t + self.proj(a)
        t = t.view(B, H // g, W // g, g, g, C).permute(0, 5, 3, 1, 4, 2).reshape(B, C, H, W)
        return t


class MaxViTLite(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32, s=2)
        self.mb = nn.Sequential(cbr(32, 64, 1), cbr(64, 64, 3, g=64), nn.Conv2d(64, 32, 1))
        self.grid = GridAttn(32, 4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mb(x)
        x = self.grid(x)
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------ MobileViT: unfold into patches, attend over batch x patch_area rows, fold back
class UnfoldAttn(nn.Module):
    """HF MobileViT's self-attention: heads from ``view(*rows, -1, head_size)``, the context
    back through ``size()[:-2] + (all_head_size,)``."""

    def __init__(self, d, heads):
        super().__init__()
        self.head_size, self.all_head_size = d // heads, d
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        shape = (*x.shape[:-1], -1, self.head_size)
        q, k, v = (f(x).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_size), dim=-1) @ v
        a = a.permute(0, 2, 1, 3).contiguous()
        return self.out(a.view(*(a.size()[:-2] + (self.all_head_size,))))


class MobileViTBlock(nn.Module):
    def __init__(self, c, d, heads, patch=2):
        super().__init__()
        self.p = patch
        self.local = nn.Sequential(cbr(c, c, 3), nn.Conv2d(c, d, 1, bias=False))
        self.norm1, self.attn = nn.LayerNorm(d), UnfoldAttn(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        self.proj = cbr(d, c, 1)
        self.fuse = cbr(2 * c, c, 3)

    def forward(self, x):
        y = self.local(x)
        B, d, H, W = y.shape
        p, nh, nw = self.p, H // self.p, W // self.p
        t = y.reshape(B * d * nh, p, nw, p).transpose(1, 2).reshape(B, d, nh * nw, p * p)
        t = t.transpose(1, 3).reshape(B * p * p, nh * nw, d)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        t = t.contiguous().view(B, p * p, nh * nw, d).transpose(1, 3)
        t = t.reshape(B * d * nh, nw, p, p).transpose(1, 2).reshape(B, d, H, W)
        return self.fuse(torch.cat([x, self.proj(t)], 1))


class MobileViTLite(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, s=2)
        self.mv2 = nn.Sequential(cbr(16, 32, 1), cbr(32, 32, 3, g=32), nn.Conv2d(32, 24, 1))
        self.vit = MobileViTBlock(24, 32, 4)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.vit(self.mv2(self.stem(x)))
        return self.fc(x.mean((2, 3)))


ENTRIES: tuple[ZooModel, ...] = (
    lookalike("googlenet_inception", GoogLeNet, seeded_randn(1, 3, 32, 32),
           "GoogLeNet Inception: four-branch concat with a max-pool branch", "cnn", "concat"),
    lookalike("cbam_attention", CBAMNet, seeded_randn(1, 3, 32, 32),
           "CBAM: channel attention (avg+max MLP), spatial attention from mean/max over channels",
           "cnn", "attention"),
    lookalike("eca_channel_conv", ECANet, seeded_randn(1, 3, 32, 32),
           "ECA-Net: Conv1d across the channel axis gates the channels", "cnn", "attention"),
    lookalike("resnest_split_attn", ResNeSt, seeded_randn(1, 3, 32, 32),
           "ResNeSt split attention: radix reshape, sum over radix, rSoftMax", "cnn", "residual"),
    lookalike("sknet_selective", SKNet, seeded_randn(1, 3, 32, 32),
           "SKNet selective kernel: stacked grouped 3x3/5x5 branches, softmax over branches",
           "cnn", "grouped-conv"),
    lookalike("xception_separable", Xception, seeded_randn(1, 3, 32, 32),
           "Xception: separable convs, stride-2 projection shortcut", "cnn", "depthwise"),
    lookalike("cait_talking_heads", CaiT, seeded_randn(1, 3, 32, 32),
           "CaiT: talking-heads attention (Linear over the heads axis), class attention",
           "attention", "transformer", "layernorm"),
    lookalike("deit_distilled", DeiTDist, seeded_randn(1, 3, 32, 32),
           "DeiT with a distillation token: two prepended tokens, two heads averaged",
           "attention", "transformer", "layernorm"),
    lookalike("conformer_glu", Conformer, seeded_randn(1, 12, 20),
           "Conformer: GLU conv module with depthwise Conv1d/BatchNorm1d, MultiheadAttention",
           "attention", "transformer", "conv1d"),
    lookalike("hrnet_fuse", HRNet, seeded_randn(1, 3, 32, 32),
           "HRNet: two resolutions fused by interpolate+add and strided conv+add", "cnn",
           "residual"),
    lookalike("yolo_c2f_sppf", YoloLite, seeded_randn(1, 3, 32, 32),
           "YOLOv8 C2f (chunk, list extend) and SPPF (max-pool chain), anchor reshape head",
           "cnn", "concat", "fx-untraceable"),
    lookalike("gpt2_tied", TiedGPT, seeded_randint(50, 1, 12),
           "GPT-2 with lm_head.weight tied to wte.weight", "attention", "transformer",
           "layernorm"),
    lookalike("wav2vec_weightnorm", Wav2VecLite, seeded_randn(1, 400),
           "wav2vec2: conv extractor with per-channel GroupNorm, weight-normed positional conv",
           "conv1d", "transformer"),
    lookalike("espcn_pixelshuffle", ESPCN, seeded_randn(1, 3, 16, 16),
           "ESPCN: residual convs and a PixelShuffle tail", "cnn"),
    lookalike("edsr_pixel_shuffle", EDSRLite, seeded_randn(1, 3, 16, 16),
           "EDSR/NAFNet-style: pixel_unshuffle stem, residual body, conv + PixelShuffle "
           "upsampler", "cnn", "residual"),
    lookalike("effnetv2_fused", EffV2, seeded_randn(1, 3, 32, 32),
           "EfficientNetV2 fused-MBConv with hard-sigmoid squeeze-excite", "cnn", "residual"),
    lookalike("vgg_adaptive_flatten", VGGish, seeded_randn(1, 3, 16, 16),
           "VGG classifier: AdaptiveAvgPool2d((2, 2)) then flatten into Linear", "cnn",
           "flatten"),
    lookalike("detr_queries", DETRLite, seeded_randn(1, 3, 32, 32),
           "DETR decoder: learned queries, self- and cross-attention MultiheadAttention",
           "attention", "transformer"),
    lookalike("crnn_lstm", CRNN, seeded_randn(1, 1, 16, 20),
           "CRNN: conv features reshaped into a bidirectional LSTM", "cnn", "recurrent"),
    lookalike("maxvit_grid", MaxViTLite, seeded_randn(1, 3, 16, 16),
           "MaxViT grid attention: view/permute into grid windows and back", "attention"),
    lookalike("mobilevit_unfold", MobileViTLite, seeded_randn(2, 3, 16, 16),
           "MobileViT: unfold to patches, attention over batch x patch_area rows (a run-time "
           "size), fold back, concat with the input", "attention", "transformer", "concat",
           "fx-untraceable"),
)
