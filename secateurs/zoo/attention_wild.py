"""Attention as public vision and language models write it, in small look-alikes.

Each model reproduces one pattern that public architectures use and that a pruner has to get
right (issue 11, "Real-world coverage"); the code is written here from the patterns, not copied:

* ``vit_unbind`` — timm's fused qkv ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`` split by
  ``unbind(0)``, by tuple unpacking and by ``split(1, dim)``; a PVTv2-style block with a fused
  kv projection (``k, v = kv.unbind(0)``) over spatially reduced tokens. The factor 3 (or 2)
  sets the number of outputs and must stay; heads and head dims prune.
* ``beit_relpos``, ``levit_bias`` — relative-position and attention-bias tables read through
  index buffers (``table[index]``, ``biases[:, idx]``, FX tensor constants), added to the
  scores or passed as the sdpa ``attn_mask``: index operands carry no channels, the tables'
  head dim follows the heads.
* ``hiera_unroll`` — Hiera's unroll of spatial dims into the batch dim and an MHA-style packed
  in-projection merging batch and heads: reshapes that factor one dim in incompatible ways.
* ``mqa_qknorm`` — GPT-BigCode multi-query attention (q heads over one repeated kv head) and
  Qwen3/Gemma3 q/k RMSNorm per head: q heads prune by the repeat index, whole heads stay exact
  under the per-head norm (only the normalised head dim is lossy); gpt-fast GQA by
  ``repeat_interleave``: kv groups prune, and so do q heads uniformly in every group.
* ``einsum_vit`` — attention spelled in ``torch.einsum`` (scores, context, an ``[H, D, C]``
  output weight contracting heads and head dims at once) and an outer-product head: the FX
  einsum lowers to the canonical ``einsum`` the ONNX frontend uses.
* ``tv_vit_mha`` — torchvision's ViT ``EncoderBlock`` around ``nn.MultiheadAttention``, a
  post-norm ``nn.TransformerEncoderLayer`` and an attention pooling that uses its weights:
  heads and FFNs prune through the modules' projections.
* ``falcon_fused`` — Falcon's fused query/key/value: ``view(B, T, heads + 2, D)`` read as
  ``[..., :-2, :]``, ``[..., [-2], :]``, ``[..., [-1], :]`` (multi-query, Falcon-7B) and
  ``view(B, T, kv, heads / kv + 2, D)`` with ``torch.broadcast_to(k, q.shape)`` (Falcon-40B's
  grouped layout), in parallel attention + MLP blocks. The constant indices pin only the key
  and value slots they read: the query slots prune and the indices follow.
* ``gptj_rotary`` — interleaved rotary embeddings: GPT-J/CodeGen's ``rotate_every_two``
  (``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)``) over the first ``rotary_dim`` dims
  of each head, sin/cos tables widened by ``repeat_interleave(2)``, parallel attention + MLP;
  and a Helium/GLM-style block rotating whole heads the same way under grouped-query
  attention. The strided slices factor the head dim into pairs ``(2j, 2j + 1)``: heads prune,
  the pairs stay together.
* ``meta_llama`` — Meta's reference Llama (and torchtitan's) rotary in complex numbers:
  ``view_as_complex(x.float().reshape(..., -1, 2)) * freqs_cis`` then
  ``view_as_real(...).flatten(3).type_as(x)``, ``freqs_cis`` from ``torch.polar``; grouped
  query heads by ``repeat_kv`` and a ``transpose(1, 2).contiguous().view(B, T, -1)`` output,
  which torch.export records without the ``contiguous``.
* ``alibi_decoder`` — BLOOM/MPT ALiBi: per-head slopes computed inside the forward from the
  head count (``pow(base, arange(1, 1 + closest_power_of_2))``, extra slopes for 6 heads),
  times the positions ``(mask.cumsum(-1) - 1) * mask``, reshaped to ``[B * H, 1, T]`` and
  added by ``baddbmm``; BLOOM's fused ``view(B, T, H, 3, D)`` query/key/value; a Python branch
  on the sequence length sends it through torch.export, which records the factories (the
  slopes are folded into a constant and follow the heads).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randint, seeded_randn
from secateurs.zoo.layers import RMSNorm

__all__ = ["UnbindAttention", "FusedKVAttention", "UnbindViT", "RelPosAttention", "RelPosViT",
           "AttentionBiasAttention", "AttentionBiasNet", "relative_position_index",
           "attention_offsets_index", "unroll", "MaskUnitAttention", "PackedInProjAttention",
           "UnrollNet", "repeat_kv", "MultiQueryAttention", "QKNormAttention",
           "InterleaveGQAAttention", "MQADecoder", "TorchvisionEncoderBlock", "TorchAttentionViT",
           "EinsumAttention", "EinsumViT", "FalconAttention", "FalconDecoder",
           "rotate_every_two", "InterleavedRotaryAttention", "RotaryDecoder",
           "ComplexRotaryAttention", "MetaLlama", "alibi_slopes", "AlibiAttention",
           "AlibiDecoder", "ENTRIES"]


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


# ------------------------------------------------------- class 2 and 9: bias tables by index


def relative_position_index(window: int, cls_token: bool = False) -> torch.Tensor:
    """BEiT/Swin relative-position index of a ``window x window`` grid: entry (i, j) is the row
    of the bias table for the offset of token j from token i; with ``cls_token`` three extra rows
    (cls->token, token->cls, cls->cls) as BEiT adds them."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    index = rel[..., 0] * (2 * window - 1) + rel[..., 1]
    if not cls_token:
        return index
    n, r = window * window, (2 * window - 1) ** 2
    full = torch.zeros(n + 1, n + 1, dtype=torch.long)
    full[1:, 1:] = index
    full[0, 0:] = r
    full[0:, 0] = r + 1
    full[0, 0] = r + 2
    return full


def attention_offsets_index(resolution: int) -> tuple[int, torch.Tensor]:
    """LeViT/EfficientFormer/TinyViT attention-bias index: one bias per distinct absolute
    offset ``(|dy|, |dx|)``; returns the number of offsets and the ``[N, N]`` index."""
    pts = [(y, x) for y in range(resolution) for x in range(resolution)]
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in pts:
        for p2 in pts:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    n = len(pts)
    return len(offsets), torch.tensor(idxs, dtype=torch.long).view(n, n)


class RelPosAttention(nn.Module):
    """BEiT attention over a cls token and a ``window x window`` grid: q and v biases with a
    zero k-bias buffer concatenated into ``F.linear``'s bias, fused qkv ``unbind(0)``, and a
    relative-position bias ``table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)`` (table
    ``[rows, heads]``). ``how="add"`` adds it to the scores (timm's unfused path),
    ``"sdpa"`` passes it as the ``attn_mask`` of ``F.scaled_dot_product_attention`` (fused
    path), ``"heads_first"`` uses a MaxViT/CoAtNet table ``[heads, rows]`` read as
    ``table[:, index.view(-1)]``."""

    def __init__(self, dim: int, num_heads: int, window: int, how: str = "add") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.how = how
        self.n = window * window + 1
        rows = (2 * window - 1) ** 2 + 3
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        shape = (num_heads, rows) if how == "heads_first" else (rows, num_heads)
        self.relative_position_bias_table = nn.Parameter(torch.randn(shape) * 0.5)
        self.register_buffer("relative_position_index",
                             relative_position_index(window, cls_token=True), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def rel_pos_bias(self) -> torch.Tensor:
        index = self.relative_position_index.view(-1)
        if self.how == "heads_first":
            bias = self.relative_position_bias_table[:, index].view(-1, self.n, self.n)
        else:
            bias = self.relative_position_bias_table[index].view(self.n, self.n, -1)
            bias = bias.permute(2, 0, 1).contiguous()
        return bias.unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.how == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_pos_bias())
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + self.rel_pos_bias()
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class RelPosViT(nn.Module):
    """BEiT look-alike: 16x16 image, 4x4 patches (a 4x4 grid + cls token), three blocks with
    relative-position bias tables (added to the scores, as an sdpa ``attn_mask``, and a
    heads-first MaxViT table), head on the cls token."""

    def __init__(self, dim: int = 32, heads: int = 4, mlp: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, RelPosAttention(dim, heads, 4, how), mlp)
                                      for how in ("add", "sdpa", "heads_first")])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


class AttentionBiasAttention(nn.Module):
    """LeViT / EfficientFormer / TinyViT attention: a qkv Linear whose output is laid out per
    head, ``view(B, N, H, -1).split([key_dim, key_dim, val_dim], dim=3)``; attention biases
    ``[heads, offsets]`` read as ``biases[:, bias_idxs]`` (``[H, N, N]``) and added to the
    scores (``how="add"``: LeViT, EfficientFormer) or passed as the sdpa ``attn_mask``
    (``"sdpa"``: TinyViT). ``index_as="constant"`` keeps the index a plain tensor attribute,
    which FX records as a tensor constant instead of a buffer."""

    def __init__(self, dim: int, num_heads: int, key_dim: int, val_dim: int, resolution: int,
                 how: str = "add", index_as: str = "buffer") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim, self.val_dim = key_dim, val_dim
        self.scale = key_dim**-0.5
        self.how = how
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + val_dim))
        n_off, idxs = attention_offsets_index(resolution)
        self.attention_biases = nn.Parameter(torch.randn(num_heads, n_off) * 0.5)
        if index_as == "buffer":
            self.register_buffer("attention_bias_idxs", idxs, persistent=False)
        else:
            self.attention_bias_idxs = idxs
        self.proj = nn.Sequential(nn.Hardswish(), nn.Linear(num_heads * val_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        if self.how == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale + bias
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class AttentionBiasNet(nn.Module):
    """LeViT/TinyViT look-alike: conv stem to a 4x4 grid, three attention-bias blocks (buffer
    index added to the scores, buffer index as sdpa mask, tensor-constant index), mean pool."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.Hardswish(),
                                  nn.Conv2d(dim, dim, 3, 2, 1))
        self.blocks = nn.Sequential(*[
            _Block(dim, AttentionBiasAttention(dim, heads, 4, 8, 4, how, index_as), 64)
            for how, index_as in (("add", "buffer"), ("sdpa", "buffer"), ("add", "constant"))])
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(dim=1))


# ------------------------------------------------ class 8: reshapes that refactor a dim twice


def unroll(x: torch.Tensor, size: list[int], schedule: list[list[int]]) -> torch.Tensor:
    """Hiera's unroll: move strided patches of the ``size`` token grid into the batch dim,
    ``[B, H*W, C] -> [B * prod(strides), ..., C]`` (one view/permute/flatten per stage), then
    back to ``[B, H*W, C]`` in the unrolled order."""
    b, _, c = x.shape
    cur = list(size)
    x = x.view(*([b] + cur + [c]))
    for strides in schedule:
        cur = [i // s for i, s in zip(cur, strides)]
        shape = [b] + sum([[i, s] for i, s in zip(cur, strides)], []) + [c]
        x = x.view(shape)
        n = len(shape)
        x = x.permute([0] + list(range(2, n - 1, 2)) + list(range(1, n - 1, 2)) + [n - 1])
        x = x.flatten(0, len(strides))
        b *= strides[0] * strides[1]
    return x.reshape(-1, size[0] * size[1], c)


class MaskUnitAttention(nn.Module):
    """Hiera's mask-unit attention: qkv laid out as ``(B, tokens, windows, 3, heads, D)``,
    permuted to ``(3, B, heads, windows, tokens, D)`` and unbound; attention within windows."""

    def __init__(self, dim: int, heads: int, windows: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.windows = windows
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, -1, self.windows, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 2, 1, 5).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 3).reshape(b, -1, c))


class PackedInProjAttention(nn.Module):
    """Attention written the way ``F.multi_head_attention_forward`` computes it, around a packed
    ``in_proj_weight`` parameter: ``(T, B, E)`` in, ``unflatten(-1, (3, E)).unsqueeze(0)
    .transpose(0, -2).squeeze(-2)``, ``view(T, B * H, D)`` (batch and heads merged), ``bmm``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) * dim**-0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b, e = x.shape
        d = e // self.heads
        proj = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q = proj[0].view(t, b * self.heads, d).transpose(0, 1)
        k = proj[1].view(t, b * self.heads, d).transpose(0, 1)
        v = proj[2].view(t, b * self.heads, d).transpose(0, 1)
        attn = torch.bmm(q * d**-0.5, k.transpose(-2, -1)).softmax(dim=-1)
        o = torch.bmm(attn, v).transpose(0, 1).contiguous().view(t * b, e)
        return self.out_proj(o).view(t, b, e)


class UnrollNet(nn.Module):
    """Hiera look-alike: 4x4 patches of a 16x16 image (a 4x4 grid) plus learned positions,
    unrolled by two stride-2
    stages into the batch dim, a mask-unit attention block over 4 windows, a global attention
    block, then attention with a packed in-projection over ``(T, B, E)``; mean pool, head."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(_Block(dim, MaskUnitAttention(dim, heads, 4), 64),
                                    _Block(dim, MaskUnitAttention(dim, heads, 1), 64))
        self.norm = nn.LayerNorm(dim)
        self.packed = PackedInProjAttention(dim, heads)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.blocks(unroll(x, [4, 4], [[2, 2], [2, 2]]))
        x = self.norm(x).transpose(0, 1)
        x = x + self.packed(x)
        return self.head(x.mean(dim=0))


# ------------------------------------------- classes 12 and 13: q/k norms, multi-query heads


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, KV, T, D) -> (B, KV * n_rep, T, D)`` by ``expand`` (Hugging Face ``repeat_kv``)."""
    b, kv, t, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


class MultiQueryAttention(nn.Module):
    """GPT-BigCode multi-query attention: one fused ``c_attn`` of width ``E + 2 D`` split into
    q (all heads) and a single k and v head, ``unsqueeze(1).split((E, D, D), dim=3)``; the kv
    head is repeated for every q head."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.c_attn = nn.Linear(dim, dim + 2 * self.head_dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = self.c_attn(x).unsqueeze(1).split((e, self.head_dim, self.head_dim), dim=3)
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k, v = repeat_kv(k, self.heads), repeat_kv(v, self.heads)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(x.transpose(1, 2).reshape(b, t, e))


class QKNormAttention(nn.Module):
    """Qwen3 / Gemma3 attention: grouped kv heads and an RMSNorm over each head's dims of q and
    k (``q_norm(q_proj(x).view(B, T, H, D))``), rsqrt of a per-head mean square."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        n_rep = self.heads // self.kv_heads
        x = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                           is_causal=True)
        return self.o_proj(x.transpose(1, 2).reshape(b, t, -1))


class InterleaveGQAAttention(nn.Module):
    """gpt-fast-style grouped-query attention: one fused ``wqkv``, kv heads repeated by
    ``k.repeat_interleave(n_rep, dim=1)`` (the q heads of kv head ``g`` are ``g * n_rep`` to
    ``g * n_rep + n_rep - 1``, as ``repeat_kv`` orders them)."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        kv = kv_heads * self.head_dim
        self.wqkv = nn.Linear(dim, dim + 2 * kv, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.sizes = [dim, kv, kv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        n_rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(x.transpose(1, 2).reshape(b, t, -1))


class _DecoderBlock(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, mlp: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = attn
        self.norm2 = RMSNorm(dim)
        self.mlp = _Mlp(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MQADecoder(nn.Module):
    """Token embedding, a GPT-BigCode multi-query block (4 q heads over 1 kv head), a Qwen3
    block (q/k RMSNorm per head, 4 q heads over 2 kv heads by ``repeat_kv``), a gpt-fast block
    (4 q heads over 2 kv heads by ``repeat_interleave``), final RMSNorm, lm head."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(_DecoderBlock(dim, MultiQueryAttention(dim, heads), 64),
                                    _DecoderBlock(dim, QKNormAttention(dim, heads, 2), 64),
                                    _DecoderBlock(dim, InterleaveGQAAttention(dim, heads, 2),
                                                  64))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.embed(ids))))


# --------------------------------------- class 11: nn.MultiheadAttention / TransformerEncoder


class TorchvisionEncoderBlock(nn.Module):
    """torchvision ``EncoderBlock``: ``ln_1``, ``nn.MultiheadAttention(batch_first=True)`` called
    as ``x, _ = self_attention(x, x, x, need_weights=False)``, residual, ``ln_2``, MLP."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        h, _ = self.self_attention(h, h, h, need_weights=False)
        x = x + h
        return x + self.mlp(self.ln_2(x))


class TorchAttentionViT(nn.Module):
    """torchvision-ViT look-alike: conv patch projection, class token, positions, two
    torchvision encoder blocks, a post-norm sequence-first ``nn.TransformerEncoderLayer``
    (ReLU), and an ``nn.MultiheadAttention`` pooling whose attention weights are returned and
    used (its heads stay); head on the class token."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.layers = nn.Sequential(TorchvisionEncoderBlock(dim, heads, 64),
                                    TorchvisionEncoderBlock(dim, heads, 64))
        self.post = nn.TransformerEncoderLayer(dim, heads, 64, dropout=0.0)
        self.pool = nn.MultiheadAttention(dim, heads)
        self.head = nn.Linear(dim + 17, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.layers(x + self.pos_embedding)
        x = self.post(x.transpose(0, 1))  # (T, B, E)
        pooled, weights = self.pool(x[:1], x, x)  # weights averaged over heads: (B, 1, T)
        return self.head(torch.cat([pooled[0], weights[:, 0]], dim=-1))


# ---------------------------------------------------------------- attention written in einsum


class EinsumAttention(nn.Module):
    """Attention written with ``torch.einsum`` (Perceiver/Flax ports, lucidrains): scores
    ``bhqd,bhkd->bhqk``, context ``bhqk,bhkd->bhqd``, and the output projection as an einsum
    with a ``[H, D, C]`` weight, ``bhnd,hdc->bnc`` (heads and head dims contracted at once)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.w_o = nn.Parameter(torch.randn(heads, self.head_dim, dim) * dim ** -0.5)
        self.b_o = nn.Parameter(torch.rand(dim) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        attn = (torch.einsum("bhqd,bhkd->bhqk", q, k) * self.head_dim ** -0.5).softmax(-1)
        ctx = torch.einsum("bhqk,bhkd->bhqd", attn, v)
        return torch.einsum("bhnd,hdc->bnc", ctx, self.w_o) + self.b_o


class EinsumViT(nn.Module):
    """Patch embedding, two blocks of einsum attention, and a bilinear-pooling head: the
    outer product of two projections of the mean token, ``torch.einsum("bi,bj->bij", [a, b])``
    (list form), flattened into the classifier.."""

    def __init__(self, dim: int = 32, heads: int = 4, mlp: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.blocks = nn.Sequential(*[_Block(dim, EinsumAttention(dim, heads), mlp)
                                      for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.pa, self.pb = nn.Linear(dim, 8), nn.Linear(dim, 6)
        self.head = nn.Linear(8 * 6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        h = self.norm(x).mean(1)
        outer = torch.einsum("bi,bj->bij", [self.pa(h), torch.tanh(self.pb(h))])
        return self.head(outer.flatten(1))


_TAGS = frozenset({"transformer", "attention", "layernorm", "wild"})

# ------------------------------------------------------------------ Falcon's fused qkv


class FalconAttention(nn.Module):
    """Falcon ``_split_heads``: one fused projection, the slots of a head dim listed per
    (group of) query heads and then the key and value, read by constant indices."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_groups: int = 0) -> None:
        super().__init__()
        self.heads, self.head_dim, self.kv = heads, head_dim, kv_groups
        slots = heads + 2 if kv_groups == 0 else kv_groups * (heads // kv_groups + 2)
        self.query_key_value = nn.Linear(dim, slots * head_dim, bias=False)
        self.dense = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self.query_key_value(x)
        if self.kv == 0:  # multi-query: [heads + 2] slots
            qkv = fused.view(b, t, self.heads + 2, self.head_dim)
            q, k, v = qkv[..., :-2, :], qkv[..., [-2], :], qkv[..., [-1], :]
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        else:  # grouped: per kv group, its query slots then one key and one value slot
            qkv = fused.view(b, t, -1, self.heads // self.kv + 2, self.head_dim)
            q, k, v = qkv[:, :, :, :-2], qkv[:, :, :, [-2]], qkv[:, :, :, [-1]]
            k, v = torch.broadcast_to(k, q.shape), torch.broadcast_to(v, q.shape)
            q, k, v = (z.flatten(2, 3).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class _FalconBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, kv_groups: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.self_attention = FalconAttention(dim, heads, head_dim, kv_groups)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)  # parallel attention and MLP over one norm
        return x + self.self_attention(h) + self.mlp(h)


class FalconDecoder(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(_FalconBlock(dim, heads, head_dim, 0),
                                    _FalconBlock(dim, heads, head_dim, 2))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(self.blocks(self.embed(ids))))


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotation: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class InterleavedRotaryAttention(nn.Module):
    """Rotary embeddings on interleaved pairs, over the first ``rotary_dim`` dims of each head
    (GPT-J/CodeGen, ``rotary_dim < head_dim``) or the whole head (Helium/GLM, with ``kv_heads``
    key/value heads repeated by ``repeat_kv``). The angles (positions times an ``inv_freq``
    buffer) have half the rotary width and are widened by ``repeat_interleave(2)`` as GPT-J
    does it."""

    def __init__(self, dim: int, heads: int, head_dim: int, rotary_dim: int,
                 kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.head_dim, self.rotary_dim = heads, head_dim, rotary_dim
        self.kv_heads = kv_heads or heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rotate(self, x: torch.Tensor, t: int) -> torch.Tensor:  # x: [B, T, H, D]
        angles = torch.arange(t, device=x.device).float()[:, None] * self.inv_freq[None, :]
        sin = torch.repeat_interleave(angles.sin()[None, :, None, :], 2, 3)
        cos = torch.repeat_interleave(angles.cos()[None, :, None, :], 2, 3)
        if self.rotary_dim == self.head_dim:
            return x * cos + rotate_every_two(x) * sin
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat([rot * cos + rotate_every_two(rot) * sin, rest], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._rotate(self.q_proj(x).view(b, t, self.heads, self.head_dim), t)
        k = self._rotate(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim), t)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        k, v = repeat_kv(k, self.heads // self.kv_heads), repeat_kv(v, self.heads // self.kv_heads)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class _ParallelBlock(nn.Module):
    """GPT-J's block: one LayerNorm feeding attention and the MLP in parallel."""

    def __init__(self, dim: int, attn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        return x + self.attn(h) + self.mlp(h)


class RotaryDecoder(nn.Module):
    """A GPT-J block (4 heads of 16, rotary over the first 8 dims of each) and a Helium-style
    block (4 query heads over 2 kv heads, rotary over the whole head), final norm, lm head."""

    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(
            _ParallelBlock(dim, InterleavedRotaryAttention(dim, 4, 16, 8), 64),
            _DecoderBlock(dim, InterleavedRotaryAttention(dim, 4, 8, 8, kv_heads=2), 64))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(self.blocks(self.embed(ids))))


class ComplexRotaryAttention(nn.Module):
    """Meta's reference Llama attention: ``wq``/``wk``/``wv``/``wo``, rotary applied to pairs
    as complex numbers, kv heads repeated by ``repeat_kv``, sdpa, and the output gathered by
    ``.transpose(1, 2).contiguous().view(B, T, -1)``."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        angles = torch.outer(torch.arange(t, device=x.device).float(), self.inv_freq)
        freqs_cis = torch.polar(torch.ones_like(angles), angles).view(1, t, 1, -1)
        xq = self.wq(x).view(b, t, self.heads, self.head_dim)
        xk = self.wk(x).view(b, t, self.kv_heads, self.head_dim)
        xv = self.wv(x).view(b, t, self.kv_heads, self.head_dim)
        rot = []
        for z in (xq, xk):
            zc = torch.view_as_complex(z.float().reshape(b, t, z.shape[2], -1, 2))
            rot.append(torch.view_as_real(zc * freqs_cis).flatten(3).type_as(z))
        q, k, v = (z.transpose(1, 2) for z in (rot[0], rot[1], xv))
        n_rep = self.heads // self.kv_heads
        a = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                           is_causal=True)
        return self.wo(a.transpose(1, 2).contiguous().view(b, t, -1))


class _SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _MetaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = ComplexRotaryAttention(dim, heads, kv_heads)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = _SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLlama(nn.Module):
    """Two blocks of Meta's reference Llama (4 query heads over 2 kv heads, head dim 8)."""

    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.Sequential(*(_MetaBlock(dim, 4, 2, 64) for _ in range(2)))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(self.layers(self.tok_embeddings(ids))))


def alibi_slopes(heads: int, device: torch.device) -> torch.Tensor:
    """ALiBi's geometric slopes, one per head, computed from the head count (as BLOOM's
    ``_get_alibi_slopes`` does, with torch ops, so a traced program records them)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), device=device)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, device=device, dtype=torch.int32))
    if closest != heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), device=device)
        rest = min(closest, heads - closest)
        odd = torch.arange(1, 1 + 2 * rest, 2, device=device, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra, odd)], dim=0)
    return slopes


class AlibiAttention(nn.Module):
    """BLOOM's attention: fused ``query_key_value`` viewed ``(B, T, H, 3, D)``, scores by
    ``alibi.baddbmm(q, k^T)`` over ``B * H`` rows, a causal mask, ``dense`` output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query_key_value = nn.Linear(dim, 3 * dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, alibi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self.query_key_value(x).view(b, t, self.heads, 3, self.head_dim)
        q, k, v = (fused[..., i, :].transpose(1, 2).reshape(b * self.heads, t, self.head_dim)
                   for i in range(3))
        scores = alibi.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha=self.head_dim ** -0.5)
        scores = scores.view(b, self.heads, t, t).masked_fill(mask, torch.finfo(x.dtype).min)
        probs = scores.softmax(-1).view(b * self.heads, t, t)
        ctx = torch.bmm(probs, v).view(b, self.heads, t, self.head_dim).transpose(1, 2)
        return self.dense(ctx.reshape(b, t, self.heads * self.head_dim))


class _AlibiBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(dim)
        self.self_attention = AlibiAttention(dim, heads)
        self.post_attention_layernorm = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, alibi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), alibi, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class AlibiDecoder(nn.Module):
    """Embedding, two ALiBi blocks of 6 heads (slopes for a head count that is no power of
    two), final norm, lm head."""

    def __init__(self, vocab: int = 64, dim: int = 48, heads: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.h = nn.ModuleList(_AlibiBlock(dim, heads) for _ in range(2))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        if t > 1:  # a branch on a size: torch.fx cannot trace it, torch.export can
            causal = torch.arange(t, device=ids.device)[None, :] > \
                torch.arange(t, device=ids.device)[:, None]
        else:
            causal = torch.zeros(1, 1, dtype=torch.bool, device=ids.device)
        attention = torch.ones_like(ids)
        positions = ((attention.cumsum(-1) - 1) * attention)[:, None, :]
        alibi = alibi_slopes(self.heads, ids.device)[..., None] * positions
        alibi = alibi.reshape(b * self.heads, 1, t)
        x = self.word_embeddings(ids)
        for block in self.h:
            x = block(x, alibi, causal)
        return self.lm_head(self.ln_f(x))


ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="vit_unbind",
        build=seeded_build(UnbindViT),
        example_inputs=seeded_randn(2, 3, 16, 16),
        description="timm fused qkv split by unbind(0) / tuple unpacking / split(1), PVTv2 "
                    "fused kv unbind(0)",
        tags=_TAGS | {"fused-qkv"},
    ),
    ZooModel(
        name="beit_relpos",
        build=seeded_build(RelPosViT),
        example_inputs=seeded_randn(2, 3, 16, 16),
        description="BEiT relative-position bias table[index] added to scores / as sdpa "
                    "attn_mask; MaxViT heads-first table[:, index]",
        tags=_TAGS | {"fused-qkv", "relative-position", "sdpa"},
    ),
    ZooModel(
        name="levit_bias",
        build=seeded_build(AttentionBiasNet),
        example_inputs=seeded_randn(2, 3, 16, 16),
        description="LeViT/EfficientFormer attention_biases[:, idxs] (buffer and tensor "
                    "constant), TinyViT bias as sdpa attn_mask, per-head split qkv",
        tags=_TAGS | {"relative-position", "sdpa"},
    ),
    ZooModel(
        name="hiera_unroll",
        build=seeded_build(UnrollNet),
        example_inputs=seeded_randn(2, 3, 16, 16),
        description="Hiera unroll into the batch dim, mask-unit attention, attention with an "
                    "MHA-style packed in_proj_weight and view(T, B*H, D)",
        tags=_TAGS | {"fused-qkv", "sdpa"},
    ),
    ZooModel(
        name="mqa_qknorm",
        build=seeded_build(MQADecoder),
        example_inputs=seeded_randint(64, 2, 8),
        description="GPT-BigCode multi-query attention (1 kv head, fused c_attn split), "
                    "Qwen3 per-head q/k RMSNorm with GQA, gpt-fast GQA by repeat_interleave",
        tags=_TAGS | {"fused-qkv", "sdpa", "gqa", "rmsnorm"},
    ),
    ZooModel(
        name="einsum_vit",
        build=seeded_build(EinsumViT),
        example_inputs=seeded_randn(2, 3, 16, 16),
        description="attention in torch.einsum (bhqd,bhkd->bhqk, an [H, D, C] output weight "
                    "bhnd,hdc->bnc) and a bilinear outer-product head (bi,bj->bij)",
        tags=_TAGS | {"einsum"},
    ),
    ZooModel(
        name="tv_vit_mha",
        build=seeded_build(TorchAttentionViT),
        example_inputs=seeded_randn(2, 3, 16, 16),
        description="torchvision ViT EncoderBlocks around nn.MultiheadAttention, a post-norm "
                    "nn.TransformerEncoderLayer, MHA pooling returning its weights",
        tags=_TAGS | {"nn-mha"},
    ),
    ZooModel(
        name="falcon_fused",
        build=seeded_build(FalconDecoder),
        example_inputs=seeded_randint(64, 2, 8),
        description="Falcon fused qkv read by constant indices ([..., :-2, :], [..., [-2], :]): "
                    "multi-query and Falcon-40B grouped slots with broadcast_to, parallel blocks",
        tags=_TAGS | {"fused-qkv", "sdpa", "gqa", "decoder"},
    ),
    ZooModel(
        name="gptj_rotary",
        build=seeded_build(RotaryDecoder),
        example_inputs=seeded_randint(64, 2, 8),
        description="interleaved rotary (GPT-J rotate_every_two over rotary_dim < head_dim, "
                    "repeat_interleave sin/cos; Helium-style whole-head rotation with GQA)",
        tags=_TAGS | {"sdpa", "gqa", "decoder", "rotary"},
    ),
    ZooModel(
        name="meta_llama",
        build=seeded_build(MetaLlama),
        example_inputs=seeded_randint(64, 2, 8),
        description="Meta reference Llama: complex rotary (view_as_complex * polar freqs_cis, "
                    "view_as_real.flatten), repeat_kv GQA, transpose.contiguous.view output",
        tags=_TAGS | {"sdpa", "gqa", "decoder", "rotary", "rmsnorm"},
    ),
    ZooModel(
        name="alibi_decoder",
        build=seeded_build(AlibiDecoder),
        example_inputs=seeded_randint(64, 2, 8),
        description="BLOOM/MPT ALiBi slopes computed in the forward (pow(base, arange), 6 "
                    "heads), baddbmm over B*H rows, fused view(B, T, H, 3, D) qkv; torch.export",
        tags=_TAGS | {"fused-qkv", "decoder", "alibi", "fx-untraceable"},
    ),
)
