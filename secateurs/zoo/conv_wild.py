"""Patterns from public vision models that trip pruners, written afresh (issue 11).

Each model reproduces one way real code spells an op, not a whole published network:

* ``WindowSwin`` — Swin-style shifted-window attention (timm): ``x.shape`` unpacked into sizes,
  padding to a window multiple, ``view``/``permute`` window partition and reverse, a crop
  ``x[:, :H, :W]`` whose bounds are size expressions of upstream tensors, ``torch.roll``;
* ``TvConvNeXt`` — torchvision-style ConvNeXt: ``torch.permute(x, dims)`` in function form (a
  ``Permute`` module), channels-last LayerNorm, per-channel layer scale and
  ``stochastic_depth`` (a ``torch.fx.wrap``-ed function, as torchvision's ``ops`` has it);
* ``TvEfficientNet`` — torchvision-style EfficientNet: MBConv with squeeze-excite and
  ``stochastic_depth`` on every residual branch;
* ``StdConvNet`` — weight standardisation: an NF-Net stage (``ScaledStdConv2d`` with a learned
  gain, scaled activations, skip-init residual, squeeze-excite) and a BiT stage (``StdConv2d``
  after GroupNorm); the standardised convs normalise over their input channels;
* ``SplitNet`` — negative indices into split/chunk results: a Res2Net bottleneck
  (``torch.split`` into scales, hierarchical 3x3 convs, ``spx[-1]`` passed through) and an
  EdgeNeXt split-depthwise block (``x.chunk``, ``spx[-1]``);
* ``BroadcastNet`` — one channel broadcast against C: FocalNet's focal modulation (``gates[:,
  l:l+1]`` times each context level) and MobileViTv2's linear self-attention (a 1-channel
  query split off the qkv conv, softmax over tokens, ``expand_as``);
* ``T5Buckets`` — T5 relative position buckets: binary ``torch.min(a, b)`` (not a reduction),
  ``full_like``, a bias ``nn.Embedding(buckets, heads)`` added to the attention scores;
* ``ConvNeXtV2`` — ConvNeXt-V2's global response norm (``torch.addcmul``) inside the MLP, and a
  selective-kernel branch merge (``torch.stack`` of two convs, softmax over the branches);
* ``PadNet`` — padding as conv nets write it: a CIFAR ResNet "option A" shortcut zero-padding
  the channel dim with ``F.pad``, timm's ``Conv2dSame`` (pad amounts computed from the input
  size), pix2pix's ``ReflectionPad2d`` residual block, ``ZeroPad2d`` before a stride-2 conv;
* ``FusedMoE`` — a transformer block with grouped-query attention by ``repeat_interleave``,
  token selection by ``topk`` + ``gather``, and a fused MoE FFN over 3-D ``[E, in, out]``
  expert weights (``bmm``), gated by the router through ``.T``.

Default configs are small (unit tests); constructor arguments give the large configs the
benchmark (``tools/bench/coverage_speed.py``) uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randint, seeded_randn

__all__ = ["WindowSwin", "TvConvNeXt", "TvEfficientNet", "stochastic_depth", "StdConvNet",
           "SplitNet", "BroadcastNet", "T5Buckets", "ConvNeXtV2", "FusedMoE", "PadNet",
           "ENTRIES"]


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


# ------------------------------------------------------- stochastic depth, torchvision ConvNeXt


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True
                     ) -> torch.Tensor:
    """Drop whole residual branches: per sample (``mode="row"``) or for the batch
    (``"batch"``), scaled by ``1/(1-p)``; the identity in eval or at ``p == 0``. Same name and
    semantics as ``torchvision.ops.stochastic_depth``, which FX sees as one call (wrapped)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    keep = 1.0 - p
    shape = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(keep)
    if keep > 0.0:
        noise.div_(keep)
    return input * noise


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (permute, normalise, permute back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int, sd_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
            nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class TvConvNeXt(nn.Module):
    """ConvNeXt as torchvision writes it: stem conv 4x4/4 + LayerNorm2d, stages of CNBlocks
    (depthwise 7x7, channels-last LayerNorm + MLP, layer scale, stochastic depth), LayerNorm2d +
    2x2/2 conv between stages, pooled LayerNorm2d + Linear head."""

    def __init__(self, dims: tuple[int, ...] = (8, 16), depths: tuple[int, ...] = (1, 1),
                 num_classes: int = 10, sd_prob: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4),
                                                 LayerNorm2d(dims[0], eps=1e-6))]
        total, k = sum(depths), 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i:
                layers.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                            nn.Conv2d(dims[i - 1], dim, 2, 2)))
            for _ in range(depth):
                layers.append(CNBlock(dim, sd_prob * k / max(total - 1, 1)))
                k += 1
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# ------------------------------------------------------- torchvision EfficientNet


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, squeeze-excite, 1x1 project (BN, SiLU);
    a residual with stochastic depth when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int,
                 sd_prob: float) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
        layers += [nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False),
                   nn.BatchNorm2d(mid), nn.SiLU()]
        self.block = nn.Sequential(*layers)
        sq = max(1, cin // 4)
        self.se_reduce, self.se_expand = nn.Conv2d(mid, sq, 1), nn.Conv2d(sq, mid, 1)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        s = F.adaptive_avg_pool2d(h, 1)
        h = h * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(s))))
        h = self.project(h)
        if self.use_res:
            h = self.stochastic_depth(h) + x
        return h


class TvEfficientNet(nn.Module):
    """EfficientNet-B0 layout (torchvision spelling), width and depth scaled by the config."""

    B0 = ((1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 40, 2, 5, 2), (6, 80, 3, 3, 2),
          (6, 112, 3, 5, 1), (6, 192, 4, 5, 2), (6, 320, 1, 3, 1))

    def __init__(self, stages: tuple[tuple[int, ...], ...] | None = None, stem: int = 32,
                 head: int = 1280, num_classes: int = 10, sd_prob: float = 0.2) -> None:
        super().__init__()
        if stages is None:  # small default: three short stages
            stages = ((1, 8, 1, 3, 1), (4, 12, 2, 3, 2), (4, 16, 2, 5, 2))
            stem, head = 8, 32
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False),
                                                 nn.BatchNorm2d(stem), nn.SiLU())]
        total, k, cin = sum(s[2] for s in stages), 0, stem
        for expand, cout, n, ks, stride in stages:
            for j in range(n):
                layers.append(MBConv(cin, cout, expand, ks, stride if j == 0 else 1,
                                     sd_prob * k / total))
                cin, k = cout, k + 1
        layers.append(nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head),
                                    nn.SiLU()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


# ------------------------------------------------------- weight standardisation (NF-Net, BiT)


class StdConv2d(nn.Conv2d):
    """BiT: each filter standardised over (in, kh, kw) by ``batch_norm`` in training mode."""

    def __init__(self, *args, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """NF-Net: standardised filters times a learned per-filter gain and ``gamma / sqrt(fan_in)``."""

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NFBlock(nn.Module):
    """Pre-activation bottleneck without normalisation layers: ``x + alpha * f(beta * act(x))``
    with a skip-init gain, and squeeze-excite on plain convs."""

    def __init__(self, dim: int, mid: int, alpha: float = 0.2, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.conv1 = ScaledStdConv2d(dim, mid, 1, gamma=1.7)
        self.conv2 = ScaledStdConv2d(mid, mid, 3, padding=1, gamma=1.7)
        self.conv3 = ScaledStdConv2d(mid, dim, 1, gamma=1.7)
        self.se_fc1, self.se_fc2 = nn.Conv2d(dim, dim // 2, 1), nn.Conv2d(dim // 2, dim, 1)
        self.skipinit_gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.gelu(x) * self.beta
        out = self.conv1(out)
        out = self.conv2(F.gelu(out))
        out = self.conv3(F.gelu(out))
        s = self.se_fc2(F.relu(self.se_fc1(out.mean((2, 3), keepdim=True))))
        out = out * torch.sigmoid(s) * 2.0
        return out * self.alpha * self.skipinit_gain + x


class BiTBlock(nn.Module):
    """ResNetV2 pre-activation bottleneck: GroupNorm + ReLU before each StdConv2d."""

    def __init__(self, dim: int, mid: int, groups: int = 4) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, dim), StdConv2d(dim, mid, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, mid)
        self.conv2 = StdConv2d(mid, mid, 3, padding=1, bias=False)
        self.norm3, self.conv3 = nn.GroupNorm(groups, mid), StdConv2d(mid, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return x + self.conv3(F.relu(self.norm3(out)))


class StdConvNet(nn.Module):
    """Stem ScaledStdConv2d, NF-Net blocks, a StdConv2d transition, BiT blocks, pooled head."""

    def __init__(self, dim: int = 16, nf_blocks: int = 1, bit_blocks: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(3, dim, 3, stride=2, padding=1)
        self.nf = nn.Sequential(*[NFBlock(dim, dim // 2) for _ in range(nf_blocks)])
        self.trans = StdConv2d(dim, 2 * dim, 3, stride=2, padding=1)
        self.bit = nn.Sequential(*[BiTBlock(2 * dim, dim) for _ in range(bit_blocks)])
        self.norm = nn.GroupNorm(4, 2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bit(self.trans(self.nf(self.stem(x))))
        x = F.relu(self.norm(x)).mean((2, 3))
        return self.head(x)


# ------------------------------------------------------- negative split indices (Res2Net, EdgeNeXt)


class Res2NetBottleneck(nn.Module):
    def __init__(self, cin: int, width: int, scale: int, cout: int) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(cin, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False)
                                   for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        spo = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = F.relu(bn(conv(sp)))
            spo.append(sp)
        spo.append(spx[-1])
        out = self.bn3(self.conv3(torch.cat(spo, 1)))
        return F.relu(out + x)


class SplitDepthwise(nn.Module):
    """EdgeNeXt's split-transpose block, conv part: chunks, hierarchical depthwise convs, the last
    chunk passed through, then a pointwise MLP (BatchNorm here, to keep it exact)."""

    def __init__(self, dim: int, splits: int) -> None:
        super().__init__()
        width = dim // splits
        self.splits = splits
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, groups=width)
                                   for _ in range(splits - 1))
        self.norm = nn.BatchNorm2d(dim)
        self.pw1, self.pw2 = nn.Conv2d(dim, 2 * dim, 1), nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = x.chunk(self.splits, dim=1)
        spo = []
        sp = spx[0]
        for i, conv in enumerate(self.convs):
            if i > 0:
                sp = sp + spx[i]
            sp = conv(sp)
            spo.append(sp)
        spo.append(spx[-1])
        h = self.norm(torch.cat(spo, 1))
        return x + self.pw2(F.gelu(self.pw1(h)))


class SplitNet(nn.Module):
    def __init__(self, dim: int = 16, width: int = 4, scale: int = 4, splits: int = 4,
                 blocks: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim),
                                  nn.ReLU())
        self.res2 = nn.Sequential(*[Res2NetBottleneck(dim, width, scale, dim)
                                    for _ in range(blocks)])
        self.edge = nn.Sequential(*[SplitDepthwise(dim, splits) for _ in range(blocks)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.edge(self.res2(self.stem(x)))
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------- size-1 broadcasts (FocalNet, MobileViTv2)


class FocalModulation(nn.Module):
    def __init__(self, dim: int, levels: int = 2) -> None:
        super().__init__()
        self.levels = levels
        self.f = nn.Linear(dim, 2 * dim + levels + 1)
        self.focal = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3 + 2 * i, padding=1 + i, groups=dim, bias=False),
                          nn.GELU()) for i in range(levels))
        self.h = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        c = x.shape[-1]
        x = self.f(x).permute(0, 3, 1, 2)
        q, ctx, gates = torch.split(x, (c, c, self.levels + 1), 1)
        ctx_all = 0
        for i, layer in enumerate(self.focal):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, i:i + 1]
        glob = F.gelu(ctx.mean((2, 3), keepdim=True))
        ctx_all = ctx_all + glob * gates[:, self.levels:]
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1)
        return self.proj(out)


class LinearSelfAttention(nn.Module):
    """Separable self-attention: one context score per token from a 1-channel query."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.qkv = nn.Conv2d(dim, 1 + 2 * dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, P, N]
        query, key, value = self.qkv(x).split([1, self.dim, self.dim], dim=1)
        scores = F.softmax(query, dim=-1)
        context = (key * scores).sum(dim=-1, keepdim=True)
        return self.out(F.relu(value) * context.expand_as(value))


class BroadcastNet(nn.Module):
    """Conv stem, a FocalNet block (channels-last, BatchNorm'd MLP) and a MobileViTv2 block
    (patches unfolded by reshape/permute, linear self-attention, folded back)."""

    def __init__(self, dim: int = 16, levels: int = 2, patch: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU())
        self.modulation = FocalModulation(dim, levels)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.local = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
                                   nn.BatchNorm2d(dim), nn.Conv2d(dim, dim, 1))
        self.attn = LinearSelfAttention(dim)
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = x.permute(0, 2, 3, 1)
        h = h + self.modulation(h)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        x = h.permute(0, 3, 1, 2)
        b, c, hh, ww = x.shape
        p = self.patch
        y = self.local(x)
        y = y.reshape(b, c, hh // p, p, ww // p, p).permute(0, 1, 3, 5, 2, 4)
        y = self.attn(y.reshape(b, c, p * p, -1))
        y = y.reshape(b, c, p, p, hh // p, ww // p).permute(0, 1, 4, 2, 5, 3)
        x = x + self.proj(y.reshape(b, c, hh, ww))
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------- T5 position buckets (binary min)


def relative_buckets(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets: exact for small distances, logarithmic up to max_distance."""
    num_buckets //= 2
    buckets = (rel > 0).long() * num_buckets
    n = torch.abs(rel)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, n, large)


class T5Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, num_buckets: int = 8,
                 max_distance: int = 16) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, heads * head_dim, bias=False)
        self.v = nn.Linear(dim, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, dim, bias=False)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        pos = torch.arange(t, device=x.device)
        rel = pos[None, :] - pos[:, None]
        buckets = relative_buckets(rel, self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)
        scores = torch.matmul(q, k.transpose(3, 2)) + bias
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, -1)
        return self.o(out)


class T5Buckets(nn.Module):
    """Token embedding, T5 encoder layers (RMS norm, bucketed relative attention, ReLU FFN),
    mean-pooled classifier."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 4, head_dim: int = 4,
                 ff: int = 32, layers: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(T5Attention(dim, heads, head_dim) for _ in range(layers))
        self.wi = nn.ModuleList(nn.Linear(dim, ff, bias=False) for _ in range(layers))
        self.wo = nn.ModuleList(nn.Linear(ff, dim, bias=False) for _ in range(layers))
        self.norm1 = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        self.norm2 = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for attn, wi, wo, n1, n2 in zip(self.attn, self.wi, self.wo, self.norm1, self.norm2):
            x = x + attn(n1(x))
            x = x + wo(F.relu(wi(n2(x))))
        return self.head(x.mean(1))


# ------------------------------------------------------- ConvNeXt-V2 GRN (addcmul), SK stack


class GlobalResponseNorm(nn.Module):
    """timm's channels-last GRN: ``x + addcmul(bias, weight, x * Nx)``, with
    ``Nx = Gx / mean_c(Gx)`` and ``Gx`` the L2 norm over space."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(dim) - 0.5)
        self.bias = nn.Parameter(torch.rand(dim) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1),
                                 x * nx)


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.grn, self.fc2 = nn.Linear(dim, 4 * dim), GlobalResponseNorm(4 * dim), \
            nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.fc2(self.grn(F.gelu(self.fc1(h))))
        return x + h.permute(0, 3, 1, 2)


class SelectiveKernel(nn.Module):
    """Two kernel sizes, stacked; a squeeze picks per-channel branch weights (softmax over the
    two branches); the weighted branches are summed."""

    def __init__(self, dim: int, mid: int) -> None:
        super().__init__()
        self.b3 = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False),
                                nn.BatchNorm2d(dim), nn.ReLU())
        self.b5 = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=2, dilation=2, bias=False),
                                nn.BatchNorm2d(dim), nn.ReLU())
        self.fc_reduce, self.fc_select = nn.Conv2d(dim, mid, 1), nn.Conv2d(mid, 2 * dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([self.b3(x), self.b5(x)], dim=1)  # [B, 2, C, H, W]
        s = feats.sum(1).mean((2, 3), keepdim=True)
        a = self.fc_select(F.relu(self.fc_reduce(s)))
        a = a.view(a.shape[0], 2, -1, 1, 1).softmax(dim=1)
        return (feats * a).sum(1)


class ConvNeXtV2(nn.Module):
    def __init__(self, dim: int = 16, blocks: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[ConvNeXtV2Block(dim) for _ in range(blocks)])
        self.sk = SelectiveKernel(dim, dim // 2)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sk(self.blocks(self.stem(x)))
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------- fused MoE, GQA, token selection


class FusedMoE(nn.Module):
    """Tokens [B, T, C]: pre-LN attention (q heads share kv heads by ``repeat_interleave``), the
    ``keep`` tokens the class token attends to most (``topk`` + ``gather``), and a dense-routed
    MoE FFN with expert weights ``w1 [E, C, F]``, ``w2 [E, F, C]`` applied by ``bmm``."""

    def __init__(self, vocab: int = 40, dim: int = 16, heads: int = 4, kv_heads: int = 2,
                 experts: int = 4, hidden: int = 16, keep: int = 6,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.keep = heads, kv_heads, dim // heads, keep
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = nn.Linear(dim, dim)
        self.router = nn.Linear(dim, experts)
        self.w1 = nn.Parameter(torch.randn(experts, dim, hidden) * dim ** -0.5)
        self.b1 = nn.Parameter(torch.rand(experts, 1, hidden) - 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, dim) * hidden ** -0.5)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, t, c = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn = ((q @ k.transpose(-2, -1)) * self.hd ** -0.5).softmax(-1)
        x = x + self.o((attn @ v).transpose(1, 2).reshape(b, t, c))
        idx = torch.topk(attn[:, :, 0].mean(1), self.keep, dim=-1).indices  # [B, keep]
        x = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, c))
        h = self.norm2(x).reshape(-1, c)  # [N, C]
        gates = self.router(h).softmax(-1)  # [N, E]
        e = self.w1.shape[0]
        y = F.gelu(torch.bmm(h.unsqueeze(0).expand(e, -1, -1), self.w1) + self.b1)
        y = torch.bmm(y, self.w2)  # [E, N, C]
        y = (y * gates.T.unsqueeze(-1)).sum(0)
        x = x + y.view(b, self.keep, c)
        return self.head(x.mean(1))


# ------------------------------------------------------- padding: F.pad, nn.*Pad2d


class ReflectResBlock(nn.Module):
    """pix2pix/CycleGAN ``ResnetBlock``: ``ReflectionPad2d(1)`` before each unpadded 3x3 conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3),
                                  nn.BatchNorm2d(dim), nn.ReLU(), nn.ReflectionPad2d(1),
                                  nn.Conv2d(dim, dim, 3), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class OptionABlock(nn.Module):
    """CIFAR ResNet basic block with the "option A" shortcut: where the width doubles, the
    input is subsampled and zero-padded on the channel dim,
    ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0)``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad is not None:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + x)


class Conv2dSame(nn.Conv2d):
    """timm ``Conv2dSame`` (TF "same" padding): the pad is computed from the input size at run
    time, ``F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])``, then an unpadded conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        k, st = self.kernel_size[0], self.stride[0]
        ph, pw = k - st + (-ih) % st, k - st + (-iw) % st
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PadNet(nn.Module):
    """Conv net padding every way public code does: a reflection-padded residual block, option-A
    CIFAR ResNet blocks (zero-padded channel shortcut), a timm ``Conv2dSame`` (depthwise, pad
    computed from the size), and ``ZeroPad2d((0, 1, 0, 1))`` before a stride-2 conv (TF ports)."""

    def __init__(self, dim: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 1, 1), nn.BatchNorm2d(dim), nn.ReLU())
        self.reflect = ReflectResBlock(dim)
        self.stage = nn.Sequential(OptionABlock(dim, dim, 1), OptionABlock(dim, 2 * dim, 2),
                                   OptionABlock(2 * dim, 2 * dim, 1))
        self.same = nn.Sequential(Conv2dSame(2 * dim, 2 * dim, 3, stride=2, groups=2 * dim),
                                  nn.BatchNorm2d(2 * dim), nn.ReLU())
        self.down = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(2 * dim, 3 * dim, 3, 2),
                                  nn.BatchNorm2d(3 * dim), nn.ReLU())
        self.head = nn.Linear(3 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.same(self.stage(self.reflect(self.stem(x)))))
        return self.head(x.mean((2, 3)))


ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="swin_window",
        build=seeded_build(WindowSwin),
        example_inputs=seeded_randn(1, 3, 40, 40),
        description="Swin-style shifted-window attention: shape unpacking, pad, window "
                    "partition/reverse, roll, crop by size expressions, patch merging",
        tags=frozenset({"attention", "window-attention", "layernorm", "transformer"}),
    ),
    ZooModel(
        name="convnext_tv",
        build=seeded_build(TvConvNeXt),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="torchvision-style ConvNeXt: torch.permute(x, dims), channels-last "
                    "LayerNorm, layer scale, wrapped stochastic_depth",
        tags=frozenset({"cnn", "residual", "layernorm", "depthwise", "stochastic-depth"}),
    ),
    ZooModel(
        name="efficientnet_tv",
        build=seeded_build(TvEfficientNet),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="torchvision-style EfficientNet: MBConv + squeeze-excite, stochastic_depth "
                    "on every residual",
        tags=frozenset({"cnn", "residual", "batchnorm", "depthwise", "squeeze-excite",
                        "stochastic-depth"}),
    ),
    ZooModel(
        name="stdconv_net",
        build=seeded_build(StdConvNet),
        example_inputs=seeded_randn(1, 3, 16, 16),
        description="weight standardisation: NF-Net ScaledStdConv2d blocks (gain, skip-init, SE) "
                    "and BiT StdConv2d + GroupNorm blocks",
        tags=frozenset({"cnn", "residual", "weight-standardisation", "groupnorm",
                        "squeeze-excite"}),
    ),
    ZooModel(
        name="split_net",
        build=seeded_build(SplitNet),
        example_inputs=seeded_randn(1, 3, 16, 16),
        description="Res2Net bottleneck (torch.split, spx[-1]) and EdgeNeXt split-depthwise "
                    "block (x.chunk, spx[-1])",
        tags=frozenset({"cnn", "residual", "batchnorm", "split", "depthwise"}),
    ),
    ZooModel(
        name="broadcast_net",
        build=seeded_build(BroadcastNet),
        example_inputs=seeded_randn(1, 3, 16, 16),
        description="1-channel broadcasts: FocalNet focal modulation gates[:, l:l+1] and "
                    "MobileViTv2 linear self-attention (1-channel query)",
        tags=frozenset({"cnn", "attention", "residual", "batchnorm", "broadcast"}),
    ),
    ZooModel(
        name="t5_buckets",
        build=seeded_build(T5Buckets),
        example_inputs=seeded_randint(50, 2, 12),
        description="T5 encoder layer: relative position buckets with binary torch.min and "
                    "full_like, bias Embedding(buckets, heads) on the scores",
        tags=frozenset({"attention", "transformer", "rmsnorm", "relative-position"}),
    ),
    ZooModel(
        name="convnextv2_grn",
        build=seeded_build(ConvNeXtV2),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="ConvNeXt-V2 block with global response norm (torch.addcmul) and a "
                    "selective-kernel merge (torch.stack)",
        tags=frozenset({"cnn", "residual", "layernorm", "depthwise", "stack"}),
    ),
    ZooModel(
        name="pad_net",
        build=seeded_build(PadNet),
        example_inputs=seeded_randn(1, 3, 16, 16),
        description="F.pad on the channel dim (CIFAR ResNet option-A shortcut), timm "
                    "Conv2dSame run-time pad, ReflectionPad2d residual block, ZeroPad2d",
        tags=frozenset({"cnn", "residual", "batchnorm", "depthwise", "pad"}),
    ),
    ZooModel(
        name="fused_moe",
        build=seeded_build(FusedMoE),
        example_inputs=seeded_randint(40, 2, 10),
        description="GQA by repeat_interleave, topk+gather token selection, fused MoE over "
                    "[E, in, out] expert weights (bmm), router gates via .T",
        tags=frozenset({"attention", "transformer", "layernorm", "moe", "gqa"}),
    ),
)
