"""SparseGPT: one-shot pruning with an optimal-brain-surgeon weight update (Frantar & Alistarh, 2023).

For a layer ``y = W x`` (``W``: ``[rows, cols]``, a convolution viewed as its im2col matrix with
columns in channel-last order) and calibration inputs ``X`` (``[cols, tokens]``), SparseGPT
minimises the layer's output error ``‖W X − Ŵ X‖²`` row by row under the sparsity pattern.
The error's Hessian, shared by all rows, is

    H = 2 X Xᵀ / tokens,       H ← H + λ I,   λ = percdamp · mean(diag H)

(columns whose inputs are always zero get ``H_jj = 1`` and a zero weight). Let ``U`` be the
upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = Uᵀ U``); row ``j`` of ``U`` is the inverse Hessian of
the columns ``j..`` after the columns before ``j`` have been eliminated. Columns are processed
left to right in blocks of ``B``; in each block, for column ``j``:

    pruned entries:  q_j = w_j ⊙ m_j            (m_j: keep mask of column j)
    error:           e_j = (w_j − q_j) / U_jj
    update:          W[:, j:] ← W[:, j:] − e_j · U[j, j:]       (inside the block)

and after the block, the accumulated errors ``E`` (``[rows, B]``) go to all later columns:
``W[:, b:] ← W[:, b:] − E · U[block, b:]``. Masks are chosen as the weights are updated:

* unstructured, sparsity ``s``: at the start of each block, prune the ``round(s · rows · B)``
  entries of the block with the smallest saliency ``w_ij² / U_jj²`` (adaptive mask selection);
* N:M: at every ``M``-th column ``j``, prune in each row the ``M − N`` entries of columns
  ``j..j+M`` with the smallest ``w² / U_jj²``;
* block ``b×b``: at the start of each block, sum the saliency over ``b×b`` tiles and prune the
  ``round(s · tiles)`` smallest tiles.

The pruned error is thus pushed onto the weights not yet visited, which is why SparseGPT's
output error is lower than magnitude pruning's at the same pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secateurs.errors import InputError, SecateursError
from secateurs.passes.masks import Pattern, unstructured_mask

__all__ = ["HessianAccumulator", "SparseGPTOptions", "sparsegpt_prune"]


class HessianAccumulator:
    """Accumulates ``Σ_t x_t x_tᵀ`` over calibration rows ``X`` of shape ``[tokens, cols]``.

    float32, as the paper's code (one ``addmm`` per batch); the dampening below absorbs the
    rounding, and a float64 copy of every activation cost as much as the pruning itself."""

    def __init__(self, cols: int) -> None:
        self.xtx = torch.zeros(cols, cols, dtype=torch.float32)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.xtx.shape[0]:
            raise InputError(f"expected inputs [tokens, {self.xtx.shape[0]}], got {tuple(x.shape)}")
        x = x.detach().to(device="cpu", dtype=torch.float32)
        self.xtx.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``H = 2 X Xᵀ / tokens``."""
        return self.xtx * (2.0 / max(self.rows, 1))


@dataclass(frozen=True)
class SparseGPTOptions:
    """``percdamp``: dampening as a fraction of ``mean(diag H)``; ``blocksize``: OBS column block;
    ``dtype``: the arithmetic (float32 as the paper's code; float64 for a reference run)."""

    percdamp: float = 0.01
    blocksize: int = 128
    dtype: torch.dtype = torch.float32


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, raising λ tenfold if ``H`` is not positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    damp = percdamp * float(torch.diag(h).mean())
    for _ in range(5):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            damp = max(damp * 10.0, 1e-8)
    raise SecateursError("SparseGPT: the calibration Hessian is not positive definite even after "
                         "dampening; give more calibration data or raise percdamp")


def _block_size_for(pattern: Pattern, cols: int, blocksize: int) -> int:
    unit = pattern.m if pattern.kind == "nm" else pattern.block if pattern.kind == "bsr" else 1
    size = max(unit, (blocksize // unit) * unit)
    return min(size, cols) if cols % unit == 0 else size


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    sparsity: float = 0.5,
    options: SparseGPTOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a 2-D weight ``[rows, cols]`` with SparseGPT; returns ``(new_weight, keep_mask)``.

    ``new_weight`` is zero wherever ``keep_mask`` is ``False`` and has the dtype of ``weight``.
    """
    opts = options or SparseGPTOptions()
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise InputError(f"weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    rows, cols = weight.shape
    if pattern.kind == "nm" and cols % pattern.m:
        raise InputError(f"{cols} columns are not a multiple of M={pattern.m}")
    if pattern.kind == "bsr" and (rows % pattern.block or cols % pattern.block):
        raise InputError(f"shape {rows}x{cols} does not divide into {pattern.block}x{pattern.block} blocks")

    dtype = opts.dtype
    w = weight.detach().to(device="cpu", dtype=dtype).clone()
    h = hessian.detach().to(device="cpu", dtype=dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, opts.percdamp)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    step = _block_size_for(pattern, cols, opts.blocksize)
    nm = pattern.kind == "nm"

    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        if pattern.kind == "unstructured":
            mask1 = ~unstructured_mask(w1.square() / d1.square().unsqueeze(0), sparsity)
        elif pattern.kind == "bsr":
            b = pattern.block
            sal = (w1.square() / d1.square().unsqueeze(0)).reshape(rows // b, b, (i2 - i1) // b, b)
            keep_tiles = unstructured_mask(sal.sum(dim=(1, 3)), sparsity)
            mask1 = ~keep_tiles.repeat_interleave(b, 0).repeat_interleave(b, 1)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        # e_i = (w_i - q_i) / U_ii = w_i · pruned_i / U_ii: one multiply by a precomputed
        # column of `pruned / U_ii` (for N:M, made when the group's mask is chosen)
        scale = None if nm else mask1.to(dtype) / d1
        errs = []
        for i in range(i2 - i1):
            if nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                sal = w1[:, group].square() / d1[group].square()
                drop = torch.topk(sal, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1[:, group].scatter_(1, drop, True)
                scale_g = mask1[:, group].to(dtype) / d1[group]
            err = w1[:, i] * (scale_g[:, i % pattern.m] if nm else scale[:, i])
            # the update of column i itself would only turn it into q_i: skip it, q is masked
            # from w1 after the block
            w1[:, i + 1:].addr_(err, hinv1[i, i + 1:], alpha=-1.0)
            errs.append(err)
        w[:, i1:i2] = w1.masked_fill_(mask1, 0.0)
        pruned[:, i1:i2] = mask1
        if i2 < cols:
            w[:, i2:].addmm_(torch.stack(errs, dim=1), hinv[i1:i2, i2:], alpha=-1.0)

    keep = ~pruned
    w[pruned] = 0.0
    return w.to(device=weight.device, dtype=weight.dtype), keep.to(weight.device)
