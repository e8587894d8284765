"""Masks as data and mask-preserving fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.passes.masks import (
    MaskedFineTune,
    apply_masks,
    load_masks,
    mask_sparsity,
    save_masks,
)
from secateurs.passes.sparsify import is_nm_sparse, sparsify

torch.set_num_threads(1)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_masks_save_load_apply(tmp_path) -> None:
    result = sparsify(_model(), pattern="2:4")
    path = save_masks(result.masks, tmp_path / "sub" / "masks.pt")
    loaded = load_masks(path)
    assert loaded.keys() == result.masks.keys()
    assert all(torch.equal(loaded[k], result.masks[k]) for k in loaded)
    assert mask_sparsity(loaded) == 0.5
    dense = _model()
    apply_masks(dense, loaded)
    assert is_nm_sparse(dense[0].weight, 2, 4)
    with pytest.raises(InputError, match="9.weight"):
        apply_masks(dense, {"9.weight": torch.ones(2, 2, dtype=torch.bool)})


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_zeros_survive_optimizer_steps(make_opt) -> None:
    result = sparsify(_model(), pattern="2:4")
    model, masks = result.model, result.masks
    opt = make_opt(model.parameters())
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with MaskedFineTune(model, masks).attach(opt):
        for _ in range(5):
            opt.zero_grad()
            loss = model(torch.randn(8, 16)).square().mean()
            loss.backward()
            for name, mask in masks.items():
                assert (dict(model.named_parameters())[name].grad[~mask] == 0).all()
            opt.step()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
        assert is_nm_sparse(params[name], 2, 4)
        assert not torch.equal(params[name][mask], before[name][mask])  # kept weights trained


def test_without_helper_zeros_do_not_survive() -> None:
    result = sparsify(_model(), pattern="2:4")
    opt = torch.optim.AdamW(result.model.parameters(), lr=0.01)
    result.model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    assert not is_nm_sparse(result.model[0].weight, 2, 4)
