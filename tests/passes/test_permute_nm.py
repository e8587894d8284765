"""Channel permutation for 2:4: function unchanged before masking, more magnitude after."""

import numpy as np
import torch
from torch import nn

from secateurs import zoo
from secateurs.passes.permute_nm import nm_kept_magnitude, permute_for_nm
from secateurs.passes.sparsify import is_nm_sparse, sparsify


def _kept_after_mask(model):
    total = 0.0
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            total += nm_kept_magnitude(mod.weight.detach().numpy(), 2, 4)
    return total


def test_nm_kept_magnitude():
    w = np.array([[1.0, -4.0, 2.0, 3.0, 0.5, 0.1, 0.2, 0.3]])
    assert nm_kept_magnitude(w, 2, 4) == 4.0 + 3.0 + 0.5 + 0.3


def test_permutation_preserves_function_and_keeps_more():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 8)).eval()
    # make some channels strong so that random placement wastes magnitude
    with torch.no_grad():
        model[2].weight[:, ::4] *= 6
        model[2].weight[:, 1::4] *= 6
    x = torch.randn(5, 16)
    result = permute_for_nm(model, x, iters_per_channel=80)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    assert result.kept_after > result.kept_before
    assert _kept_after_mask(result.model) > _kept_after_mask(model)
    # and 2:4 sparsifying the permuted model keeps the pattern along the input axis
    sparse = sparsify(result.model, pattern="2:4").model
    for mod in sparse.modules():
        if isinstance(mod, nn.Linear) and mod.in_features % 4 == 0 and mod.in_features >= 64:
            assert is_nm_sparse(mod.weight, 2, 4, axis=1)


def test_permutation_on_zoo_is_exact_and_skips_with_reasons():
    entry = zoo.get("vit")
    model, x = entry.build(), entry.example_inputs()
    result = permute_for_nm(model, x, iters_per_channel=10)
    with torch.no_grad():
        torch.testing.assert_close(result.model(*x), model(*x), rtol=1e-4, atol=1e-5)
    assert result.permutations
    assert all(isinstance(r, str) and r for r in result.skipped.values())
    assert result.kept_after >= result.kept_before


def test_permutation_through_residual_and_bn_is_exact():
    entry = zoo.get("resnet")
    model, x = entry.build(), entry.example_inputs()
    result = permute_for_nm(model, x, iters_per_channel=5)
    with torch.no_grad():
        torch.testing.assert_close(result.model(*x), model(*x), rtol=1e-4, atol=1e-5)
    # the caller's model is not modified
    fresh = entry.build().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
