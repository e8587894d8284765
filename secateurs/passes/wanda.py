"""Wanda: pruning by weights and activations (Sun et al., 2023), one shot, no weight update.

For a layer ``y = W x`` with ``W`` of shape ``[out, in]`` (a convolution is viewed as its
im2col matrix, columns in channel-last order, see ``secateurs.passes.sparsify``) and calibration
inputs stacked as the rows of ``X`` (``[tokens, in]``), the score of weight ``W_ij`` is

    S_ij = |W_ij| · ‖X_{:,j}‖₂

the weight magnitude times the L2 norm of the input feature it multiplies. Scores are compared
*per output row* for unstructured sparsity (each row drops ``round(s · in)`` weights), within
each group of ``M`` consecutive inputs for N:M, and summed over tiles for block sparsity. When
every input feature has the same norm the score is magnitude times a constant, so Wanda picks
the same mask as magnitude pruning compared over the same groups.
"""

from __future__ import annotations

import torch

from secateurs.errors import InputError
from secateurs.passes.masks import Pattern, mask_from_scores

__all__ = ["ColumnNormAccumulator", "wanda_scores", "wanda_mask"]


class ColumnNormAccumulator:
    """Accumulates ``Σ_t X_tj²`` over calibration rows ``X`` of shape ``[tokens, cols]``.

    float32, as the paper's code: a column's sum of squares has no cancellation, so its
    relative error stays near float32's epsilon times log(tokens) (a float64 copy of every
    activation cost more than the rest of Wanda)."""

    def __init__(self, cols: int) -> None:
        self.sum_sq = torch.zeros(cols, dtype=torch.float32)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.sum_sq.numel():
            raise InputError(f"expected inputs [tokens, {self.sum_sq.numel()}], got {tuple(x.shape)}")
        x = x.detach()
        x = x if x.dtype == torch.float32 else x.float()
        # ‖x_j‖² per column as one reduction (torch.linalg.vector_norm) without an x² temporary
        self.sum_sq += torch.linalg.vector_norm(x, dim=0).square_().cpu()
        self.rows += x.shape[0]

    def norm_sq(self) -> torch.Tensor:
        """``‖X_{:,j}‖₂²`` for every column ``j``."""
        return self.sum_sq.clone()


def wanda_scores(weight: torch.Tensor, col_norm_sq: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| · sqrt(col_norm_sq_j)`` for a 2-D weight ``[out, in]``."""
    if weight.dim() != 2 or col_norm_sq.shape != (weight.shape[1],):
        raise InputError(
            f"wanda_scores needs weight [out, in] and norms [in]; got {tuple(weight.shape)} "
            f"and {tuple(col_norm_sq.shape)}"
        )
    norms = col_norm_sq.to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().float().abs() * norms.unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor,
    col_norm_sq: torch.Tensor,
    pattern: Pattern,
    sparsity: float = 0.5,
    per_row: bool = True,
) -> torch.Tensor:
    """Keep-mask chosen by Wanda scores; ``per_row`` compares unstructured scores within rows."""
    scores = wanda_scores(weight, col_norm_sq)
    return mask_from_scores(scores, pattern, sparsity, per_row=per_row and pattern.kind == "unstructured")
