"""Layers the zoo writes by hand because torch has no (or a differently traced) built-in."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm as in Llama: ``x * rsqrt(mean(x**2, -1) + eps) * weight``.

    Written out (not ``nn.RMSNorm``) so that a traced graph shows the ops the way Hugging Face's
    ``LlamaRMSNorm`` produces them, including the upcast to float32.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)
