"""Encoder transformers: Vision Transformer in three attention spellings, and ``nn.MultiheadAttention``.

The three ViT attentions compute the same function but trace to different graphs, which is the
point: a pruner must find that heads and head dims are units whether q/k/v come from

* three ``nn.Linear`` with ``view(B, T, H, D).transpose(1, 2)`` (Hugging Face ``ViTModel``),
* one fused ``qkv`` Linear with ``reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)`` and indexing
  (timm ``Attention``), or
* ``qkv.chunk(3, dim=-1)`` into ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randn

__all__ = [
    "SeparateQKVAttention",
    "FusedQKVAttention",
    "SDPAAttention",
    "ViTBlock",
    "VisionTransformer",
    "MHAEncoder",
    "TorchEncoder",
    "ENTRIES",
]


class SeparateQKVAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections and explicit softmax."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.proj(x)


class FusedQKVAttention(nn.Module):
    """timm-style attention: one ``qkv`` Linear of width 3*dim, split by reshape/permute/index."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(x)


class SDPAAttention(nn.Module):
    """Fused ``qkv`` Linear, ``chunk(3, dim=-1)``, and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, t, -1)
        return self.proj(x)


AttentionFactory = Callable[[int, int], nn.Module]


class Mlp(nn.Module):
    """Transformer feed-forward: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, attention: AttentionFactory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): conv patch embedding, class token, learned positions,
    pre-LN blocks, final LayerNorm and a linear head on the class token."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        num_classes: int,
        attention: AttentionFactory,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(
            *[ViTBlock(dim, num_heads, mlp_dim, attention) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def _vit_small(attention: AttentionFactory) -> Callable[[], VisionTransformer]:
    def factory() -> VisionTransformer:
        """32x32 input, 8x8 patches (16 tokens + cls), dim 32, 4 heads, 2 blocks, MLP 64."""
        return VisionTransformer(32, 8, 32, 2, 4, 64, num_classes=10, attention=attention)

    return factory


def vit_b16() -> VisionTransformer:
    """ViT-B/16: dim 768, 12 heads, 12 blocks, MLP 3072, 224x224 (86.6M params); separate q/k/v
    as in Hugging Face ``ViTModel``."""
    return VisionTransformer(224, 16, 768, 12, 12, 3072, 1000, attention=SeparateQKVAttention)


def vit_s16() -> VisionTransformer:
    """ViT-S/16: dim 384, 6 heads, 12 blocks, MLP 1536, 224x224 (22.1M params); fused qkv as in
    timm ``vit_small_patch16_224``."""
    return VisionTransformer(224, 16, 384, 12, 6, 1536, 1000, attention=FusedQKVAttention)


# -------------------------------------------------------------------------- nn.MultiheadAttention


class MHABlock(nn.Module):
    """Pre-LN encoder block around ``nn.MultiheadAttention(batch_first=True)``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        x = x + h
        return x + self.mlp(self.norm2(x))


class MHAEncoder(nn.Module):
    """Sequence classifier: input projection, learned positions, MHA blocks, mean-pool, head."""

    def __init__(
        self,
        in_features: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        max_len: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(MHABlock(dim, num_heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos_embed[:, : x.size(1)]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).mean(dim=1)
        return self.head(x)


class TorchEncoder(nn.Module):
    """The same classifier built from ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer``
    (pre-LN, GELU, batch_first)."""

    def __init__(
        self,
        in_features: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        max_len: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            num_heads,
            mlp_dim,
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos_embed[:, : x.size(1)]
        x = self.encoder(x)
        return self.head(x.mean(dim=1))


def mha_encoder_small() -> MHAEncoder:
    """16 input features, dim 32, 4 heads, 2 blocks, MLP 64, up to 32 positions, 10 classes."""
    return MHAEncoder(16, 32, 2, 4, 64, max_len=32, num_classes=10)


def torch_encoder_small() -> TorchEncoder:
    """Same sizes as :func:`mha_encoder_small`."""
    return TorchEncoder(16, 32, 2, 4, 64, max_len=32, num_classes=10)


_VIT_TAGS = frozenset({"transformer", "attention", "layernorm"})

ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="vit",
        build=seeded_build(_vit_small(SeparateQKVAttention)),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="ViT, separate q/k/v Linears, view+transpose heads, explicit softmax attention",
        tags=_VIT_TAGS,
    ),
    ZooModel(
        name="vit_fused",
        build=seeded_build(_vit_small(FusedQKVAttention)),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="ViT, timm-style fused qkv Linear split by reshape/permute(2,0,3,1,4)/index",
        tags=_VIT_TAGS | {"fused-qkv"},
    ),
    ZooModel(
        name="vit_sdpa",
        build=seeded_build(_vit_small(SDPAAttention)),
        example_inputs=seeded_randn(1, 3, 32, 32),
        description="ViT, fused qkv Linear split by chunk(3), F.scaled_dot_product_attention",
        tags=_VIT_TAGS | {"fused-qkv", "sdpa"},
    ),
    ZooModel(
        name="vit_b_full",
        build=seeded_build(vit_b16),
        example_inputs=seeded_randn(1, 3, 224, 224),
        description="ViT-B/16 (768 dim, 12 heads, 12 blocks, 86.6M params), separate q/k/v",
        tags=_VIT_TAGS | {"bench"},
    ),
    ZooModel(
        name="vit_s_full",
        build=seeded_build(vit_s16),
        example_inputs=seeded_randn(1, 3, 224, 224),
        description="ViT-S/16 (384 dim, 6 heads, 12 blocks, 22.1M params), fused qkv",
        tags=_VIT_TAGS | {"fused-qkv", "bench"},
    ),
    ZooModel(
        name="mha_transformer",
        build=seeded_build(mha_encoder_small),
        example_inputs=seeded_randn(2, 16, 16),
        description="Pre-LN encoder blocks written around nn.MultiheadAttention(batch_first=True)",
        tags=frozenset({"transformer", "attention", "layernorm", "nn-mha"}),
    ),
    ZooModel(
        name="torch_encoder",
        build=seeded_build(torch_encoder_small),
        example_inputs=seeded_randn(2, 16, 16),
        description="nn.TransformerEncoder of nn.TransformerEncoderLayer (pre-LN); FX keeps it one leaf",
        tags=frozenset({"transformer", "attention", "layernorm", "nn-mha", "fx-leaf-module"}),
    ),
)
