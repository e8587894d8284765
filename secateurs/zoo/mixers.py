"""Look-alikes of token mixers and state-space blocks whose channel bookkeeping is unusual,
written afresh from the published structure (held-out checks like ``timm_wild``):

* ``MLPMixer`` — timm's Mixer layer: a token-mixing MLP applied to the *transposed* patch
  embedding (``Linear`` over the tokens axis, its hidden width prunable, the tokens pinned by
  the input), then a channel MLP; pre-norm LayerNorms over channels;
* ``PoolFormer`` — MetaFormer with a pooling token mixer, ``pool(x) - x`` after a
  ``GroupNorm(1, C)`` (normalised over channels *and* space together), per-channel layer
  scales ``[C, 1, 1]`` on both branches, 1x1-conv MLPs;
* ``RepVGG`` — the training-time RepVGG block: a 3x3 conv + BN, a 1x1 conv + BN and a BN
  identity branch summed before the ReLU (the identity exists only where in == out channels
  and stride 1);
* ``MambaSSM`` — the Mamba mixer as transformers' ``MambaMixer.slow_forward`` writes it:
  ``in_proj`` chunked into the SSM input and a gate, a causal depthwise ``conv1d`` sliced back
  to the sequence length, ``x_proj`` split into ``(dt_rank, d_state, d_state)``, ``dt_proj``
  with softplus, the discretised ``A = -exp(A_log)`` and a selective scan unrolled over the
  sequence (``state = dA[:, :, t] * state + dBx[:, :, t]``, ``y_t = state @ C_t``) from a
  zero state built with the layer's sizes, the skip ``D`` and the SiLU gate; RMSNorm pre-norm.
  The loop runs over ``x.shape[1]``, which ``symbolic_trace`` cannot iterate: it goes through
  ``torch.export``, which keeps the batch symbolic from this batch-2 example (batch >= 2, as
  ``trace`` reports; from batch 1 it exports static shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.zoo._common import ZooModel, lookalike, seeded_randn
from secateurs.zoo.layers import RMSNorm

__all__ = ["ENTRIES"]


# ------------------------------------------------------------------ MLP-Mixer


class MixerLayer(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, token_hidden)
        self.token_fc2 = nn.Linear(token_hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, channel_hidden)
        self.channel_fc2 = nn.Linear(channel_hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm1(x).transpose(1, 2)  # [B, C, N]: the MLP runs over the tokens
        x = x + self.token_fc2(F.gelu(self.token_fc1(t))).transpose(1, 2)
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class MLPMixer(nn.Module):
    def __init__(self, dim: int = 24, patch: int = 4, image: int = 16) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.layers = nn.Sequential(MixerLayer(tokens, dim, 32, 48),
                                    MixerLayer(tokens, dim, 32, 48))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # [B, N, C]
        return self.head(self.norm(self.layers(x)).mean(1))


# ------------------------------------------------------------------ PoolFormer


class PoolFormerBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.norm2 = nn.GroupNorm(1, dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.scale1 = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.scale2 = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.scale1 * (self.pool(y) - y)
        return x + self.scale2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PoolFormer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.stage1 = PoolFormerBlock(16, 48)
        self.down = nn.Conv2d(16, 32, 3, 2, 1)
        self.stage2 = PoolFormerBlock(32, 64)
        self.norm = nn.GroupNorm(1, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x).mean((2, 3)))


# ------------------------------------------------------------------ RepVGG


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                   nn.BatchNorm2d(cout))
        self.point = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False),
                                   nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.point(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class RepVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(RepVGGBlock(3, 16, 2), RepVGGBlock(16, 16),
                                    RepVGGBlock(16, 32, 2), RepVGGBlock(32, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


# ------------------------------------------------------------------ Mamba


class MambaMixer(nn.Module):
    def __init__(self, dim: int, inner: int, state: int, dt_rank: int, kernel: int = 4) -> None:
        super().__init__()
        self.inner, self.state, self.dt_rank = inner, state, dt_rank
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, kernel, groups=inner, padding=kernel - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        a = torch.arange(1, state + 1, dtype=torch.float32).repeat(inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        hidden, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, D, L] each
        hidden = F.silu(self.conv1d(hidden)[..., :length])
        ssm = self.x_proj(hidden.transpose(1, 2))
        dt, bmat, cmat = torch.split(ssm, [self.dt_rank, self.state, self.state], dim=-1)
        dt = F.softplus(self.dt_proj(dt)).transpose(1, 2)  # [B, D, L]
        a = -torch.exp(self.A_log)  # [D, N]
        da = torch.exp(a[None, :, None, :] * dt[:, :, :, None])  # [B, D, L, N]
        dbx = dt[:, :, :, None] * bmat[:, None, :, :] * hidden[:, :, :, None]
        state = torch.zeros(b, self.inner, self.state, dtype=x.dtype)
        ys = []
        for t in range(length):
            state = da[:, :, t, :] * state + dbx[:, :, t, :]
            ys.append(torch.matmul(state, cmat[:, t, :].unsqueeze(-1))[:, :, 0])
        y = torch.stack(ys, dim=-1) + hidden * self.D[None, :, None]
        return self.out_proj((y * F.silu(gate)).transpose(1, 2))


class MambaSSM(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norms = nn.ModuleList([RMSNorm(dim) for _ in range(layers)])
        self.mixers = nn.ModuleList([MambaMixer(dim, 32, 8, 4) for _ in range(layers)])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(self.norm(h))[:, -1]


ENTRIES: tuple[ZooModel, ...] = (
    lookalike("mlp_mixer", MLPMixer, seeded_randn(1, 3, 16, 16),
           "MLP-Mixer: token-mixing MLP over the transposed patch embedding, channel MLP, "
           "pre-norm LayerNorm", "transformer", "layernorm"),
    lookalike("poolformer", PoolFormer, seeded_randn(1, 3, 32, 32),
           "PoolFormer: pool(x) - x token mixer after GroupNorm(1, C), per-channel layer "
           "scales, 1x1-conv MLP", "cnn", "residual"),
    lookalike("repvgg_train", RepVGG, seeded_randn(1, 3, 32, 32),
           "RepVGG training-time block: 3x3 + 1x1 conv-BN branches and a BN identity summed",
           "cnn", "residual"),
    lookalike("mamba_ssm", MambaSSM, seeded_randn(2, 6, 8),
           "Mamba mixer (transformers' slow path): chunked in_proj, causal depthwise conv1d "
           "sliced to the length, x_proj split into dt/B/C, selective scan over the sequence "
           "from a zero state, D skip, SiLU gate", "ssm", "layernorm", "fx-untraceable"),
)
