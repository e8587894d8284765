"""The pruned model owns its tensors: prune copies the module tree, shares the caller's tensors
only until they are sliced, then clones whatever is still shared (copy_sharing_tensors /
unshare_tensors). Nothing the pruned model does may reach the original."""

from __future__ import annotations

import torch
from torch import nn

import secateurs
from secateurs import zoo
from secateurs.passes.prune import copy_sharing_tensors, unshare_tensors


def _storages(model: nn.Module) -> set[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def test_pruned_model_shares_no_storage_with_original():
    entry = zoo.get("resnet")
    model, x = entry.build(), entry.example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = secateurs.prune(model, x, ratio=0.5)
    assert not _storages(model) & _storages(result.model)
    # a training step on the pruned model leaves the original bit-identical
    pruned = result.model.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    pruned(*x).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_plan_result_owns_its_tensors():
    entry = zoo.get("vgg")
    model, x = entry.build(), entry.example_inputs()
    plan = secateurs.prune(model, x, ratio=0.3).plan
    again = secateurs.apply_plan(model, x, plan)
    assert not _storages(model) & _storages(again)


def test_unshare_keeps_tied_tensors_tied():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    model = Tied()
    copied = copy_sharing_tensors(model)
    assert copied.a is not model.a and copied.a.weight is model.a.weight
    unshare_tensors(copied, model)
    assert copied.a.weight is copied.b.weight
    assert copied.a.weight is not model.a.weight
    assert torch.equal(copied.a.weight, model.a.weight)
    assert copied.a.weight.requires_grad
