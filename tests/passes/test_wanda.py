"""Wanda scores |W_ij|·‖X_j‖₂; with equal activation norms it is magnitude pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.passes.masks import mask_from_scores, parse_pattern, unstructured_mask
from secateurs.passes.sparsify import is_nm_sparse, sparsify
from secateurs.passes.wanda import ColumnNormAccumulator, wanda_mask, wanda_scores

torch.set_num_threads(1)


def _equal_norm_inputs(tokens: int, features: int) -> torch.Tensor:
    """±1 entries: every column has norm sqrt(tokens)."""
    return torch.randint(0, 2, (tokens, features)).float() * 2 - 1


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_wanda_equals_magnitude_for_equal_norms_nm(pattern: str) -> None:
    layer = nn.Linear(32, 16)
    calibration = [_equal_norm_inputs(64, 32)]
    wanda = sparsify(layer, pattern=pattern, method="wanda", calibration=calibration)
    mag = sparsify(layer, pattern=pattern, method="magnitude")
    assert torch.equal(wanda.masks["weight"], mag.masks["weight"])
    assert torch.equal(wanda.model.weight, mag.model.weight)


def test_wanda_equals_magnitude_for_equal_norms_unstructured() -> None:
    w = torch.randn(16, 32)
    acc = ColumnNormAccumulator(32)
    acc.add(_equal_norm_inputs(64, 32))
    assert torch.allclose(acc.norm_sq(), torch.full((32,), 64.0))
    pattern = parse_pattern("unstructured")
    # Wanda compares per output row; so does per-row magnitude
    assert torch.equal(wanda_mask(w, acc.norm_sq(), pattern, 0.5), unstructured_mask(w.abs(), 0.5, per_row=True))
    assert torch.equal(
        wanda_mask(w, acc.norm_sq(), pattern, 0.6, per_row=False), mask_from_scores(w.abs(), pattern, 0.6)
    )


def test_wanda_score_and_row_comparison() -> None:
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    norms_sq = torch.tensor([1.0, 4.0, 9.0, 16.0])
    scores = wanda_scores(w, norms_sq)
    assert torch.allclose(scores, torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 6.0, 6.0, 4.0]]))
    keep = wanda_mask(w, norms_sq, parse_pattern("unstructured"), 0.5)
    assert keep.sum(1).tolist() == [2, 2]  # per-row: every row keeps half
    assert keep[0].tolist() == [False, False, True, True]


def test_wanda_follows_activation_outliers() -> None:
    """A small weight on a large-norm input survives Wanda but not magnitude."""
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[:, 0] = 0.1
    x = torch.randn(64, 8)
    x[:, 0] *= 100
    wanda = sparsify(layer, pattern="2:4", method="wanda", calibration=[x])
    mag = sparsify(layer, pattern="2:4")
    assert wanda.masks["weight"][:, 0].all() and not mag.masks["weight"][:, 0].any()
    assert is_nm_sparse(wanda.model.weight, 2, 4)
