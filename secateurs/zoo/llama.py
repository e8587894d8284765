"""Llama-style decoder (Touvron et al. 2023), written as Hugging Face ``modeling_llama`` does.

Hand-written RMSNorm, rotary position embedding via ``rotate_half`` with cos/sin computed from an
``inv_freq`` buffer, grouped-query attention whose kv heads are repeated with
``x[:, :, None].expand(...).reshape(...)`` (``repeat_kv``), an additive causal mask, and a SwiGLU
MLP ``down(silu(gate(x)) * up(x))``. No projection has a bias.

Pruning consequence: every kv head is coupled with its group of ``num_heads // num_kv_heads``
query heads, and the rotary dims pair ``i`` with ``i + head_dim / 2`` inside every head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, seeded_build, seeded_randint, seeded_randn
from secateurs.zoo.layers import RMSNorm

__all__ = [
    "LlamaConfig",
    "RotaryEmbedding",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaBlockModel",
    "rotate_half",
    "repeat_kv",
    "ENTRIES",
]


@dataclass(frozen=True)
class LlamaConfig:
    """The subset of Hugging Face ``LlamaConfig`` the zoo uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``0..T-1`` from ``inv_freq = theta ** (-2i / head_dim)``."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate half the hidden dims: (x1, x2) -> (-x2, x1)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k of shape (B, H, T, D) by position-dependent angles; cos/sin are (T, D)."""
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV * n_rep, T, D), each kv head repeated for its group of q heads."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(
        batch, num_key_value_heads, n_rep, slen, head_dim
    )
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def causal_mask(x: torch.Tensor) -> torch.Tensor:
    """Additive (T, T) mask: 0 on and below the diagonal, -inf above; T = x.shape[1]."""
    seq_len = x.shape[1]
    mask = torch.full((seq_len, seq_len), float("-inf"), device=x.device, dtype=x.dtype)
    return torch.triu(mask, diagonal=1)


class LlamaAttention(nn.Module):
    """Grouped-query attention with rotary embeddings and an additive mask."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        bsz, q_len, _ = x.size()
        q = self.q_proj(x).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        attn = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        attn = attn + mask
        attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(attn, v)
        out = out.transpose(1, 2).contiguous().reshape(bsz, q_len, -1)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-RMSNorm residual block: attention then SwiGLU MLP."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        residual = x
        x = self.input_layernorm(x)
        x = self.self_attn(x, cos, sin, mask)
        x = residual + x
        residual = x
        x = self.post_attention_layernorm(x)
        x = self.mlp(x)
        return residual + x


class LlamaForCausalLM(nn.Module):
    """Token embedding, decoder layers, final RMSNorm and an untied ``lm_head``; returns logits."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x)
        mask = causal_mask(x)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


class LlamaBlockModel(nn.Module):
    """One decoder layer on hidden states (B, T, hidden): rotary tables and mask built inside."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layer = LlamaDecoderLayer(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary_emb(hidden_states)
        return self.layer(hidden_states, cos, sin, causal_mask(hidden_states))


TINY_LLAMA = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
)


def llama_small() -> LlamaForCausalLM:
    """2 layers, hidden 32, 4 query heads / 2 kv heads of dim 8, SwiGLU 64, vocab 128."""
    return LlamaForCausalLM(TINY_LLAMA)


def llama3_8b_block() -> LlamaBlockModel:
    """One Llama-3-8B decoder layer: hidden 4096, 32/8 heads, intermediate 14336 (218M params)."""
    return LlamaBlockModel(LLAMA3_8B)


ENTRIES: tuple[ZooModel, ...] = (
    ZooModel(
        name="llama",
        build=seeded_build(llama_small),
        example_inputs=seeded_randint(TINY_LLAMA.vocab_size, 1, 16),
        description="Llama decoder: RMSNorm, rotary (rotate_half), GQA 4q/2kv with repeat_kv, SwiGLU",
        tags=frozenset({"transformer", "attention", "decoder", "gqa", "rmsnorm", "embedding"}),
    ),
    ZooModel(
        name="llama_block_full",
        build=seeded_build(llama3_8b_block),
        example_inputs=seeded_randn(1, 128, LLAMA3_8B.hidden_size),
        description="One Llama-3-8B decoder layer (4096 hidden, 32q/8kv heads, 14336 MLP) on hidden states",
        tags=frozenset({"transformer", "attention", "decoder", "gqa", "rmsnorm", "bench"}),
    ),
)
