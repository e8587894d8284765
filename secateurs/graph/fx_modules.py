"""Modules that pruned GraphModules call where torch's own cannot express the pruned shape.

``nn.MultiheadAttention`` ties its query width, its inner width (``num_heads * head_dim``) and
its scale (``head_dim ** -0.5``) to one ``embed_dim``; a pruned one has fewer heads or head dims
than its input width. ``PrunedMultiheadAttention`` is the same module (same parameters and
names: ``in_proj_weight``, ``in_proj_bias``, ``out_proj``) with the widths decoupled and the
original scale kept, computing ``out_proj(softmax(q kᵀ · scale + mask) v)`` per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrunedMultiheadAttention", "prune_multihead_attention"]


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width ``num_heads * head_dim`` may differ from
    ``embed_dim`` (the query width); ``scale`` is the original ``1 / sqrt(head_dim)``."""

    scale: float

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt, bsz, _ = query.shape
        src = key.shape[0]
        h, d = self.num_heads, self.head_dim
        inner = h * d
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = b.split(inner) if b is not None else (None, None, None)
        wq, wk, wv = w.split(inner)
        q = F.linear(query, wq, bq).view(tgt, bsz, h, d).permute(1, 2, 0, 3)
        k = F.linear(key, wk, bk).view(src, bsz, h, d).permute(1, 2, 0, 3)
        v = F.linear(value, wv, bv).view(src, bsz, h, d).permute(1, 2, 0, 3)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(bsz, h, tgt, src)
            scores = _masked(scores, attn_mask)
        if key_padding_mask is not None:
            scores = _masked(scores, key_padding_mask.view(bsz, 1, 1, src))
        attn = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = (attn @ v).permute(2, 0, 1, 3).reshape(tgt, bsz, inner)
        out = self.out_proj(out)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


def prune_multihead_attention(mod: nn.MultiheadAttention, num_heads: int, head_dim: int,
                              embed_dim: int, scale: float) -> None:
    """Turn ``mod`` (its tensors already sliced) into a ``PrunedMultiheadAttention``."""
    mod.__class__ = PrunedMultiheadAttention
    mod.num_heads, mod.head_dim = int(num_heads), int(head_dim)
    mod.embed_dim = mod.kdim = mod.vdim = int(embed_dim)
    mod.scale = float(scale) if scale else 1.0 / math.sqrt(head_dim)
    out = mod.out_proj
    out.out_features, out.in_features = (int(s) for s in out.weight.shape)
