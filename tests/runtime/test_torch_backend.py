"""torch.compile(backend="secateurs"): same outputs as eager, dead groups really removed."""

import pytest
import torch
from torch import nn

from secateurs import zoo
from secateurs.errors import InputError
from secateurs.runtime import torch_backend as tb


def _with_dead_channels(name):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.shape[0] >= 8 \
                    and mod.weight.shape[0] != 10:
                mod.weight[:4] = 0
                if mod.bias is not None:
                    mod.bias[:4] = 0
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight[:4] = 0
                mod.bias[:4] = 0
    return model, x


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="secateurs", options={"backend": "eager", **options})


def test_backend_is_registered_by_entry_point():
    assert "secateurs" in torch._dynamo.list_backends()


@pytest.mark.parametrize("name", ["resnet", "vit", "llama", "mobilenetv2", "densenet"])
def test_dead_groups_removed_and_outputs_equal(name):
    model, x = _with_dead_channels(name)
    with torch.no_grad():
        ref = model(*x)
        out = _compile(model)(*x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    rec = tb.LAST_COMPILE
    assert rec.removed_units > 0 and rec.exact
    # the compiled graph's tensors really are smaller
    total_before = sum(p.numel() for p in model.parameters())
    total_after = sum(p.numel() for p in rec.graph.parameters())
    assert rec.removed and total_after < total_before


def test_dense_model_is_left_alone():
    entry = zoo.get("resnet")
    model, x = entry.build(), entry.example_inputs()
    with torch.no_grad():
        torch.testing.assert_close(_compile(model)(*x), model(*x))
    assert tb.LAST_COMPILE.removed_units == 0


def test_training_graph_untouched():
    model, x = _with_dead_channels("vgg")
    model.train()
    out = _compile(model)(*x)
    out.sum().backward()
    assert tb.LAST_COMPILE.training and tb.LAST_COMPILE.removed_units == 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_explicit_prune_ratio():
    entry = zoo.get("resnet")
    model, x = entry.build(), entry.example_inputs()
    with torch.no_grad():
        out = _compile(model, prune=0.5)(*x)
    assert out.shape == (1, 10)
    assert tb.LAST_COMPILE.removed_units > 0


def test_unknown_option():
    with pytest.raises(InputError, match="nonsense"):
        tb.BackendOptions.parse({"nonsense": 1})
    with pytest.raises(InputError, match="prune"):
        tb.BackendOptions.parse({"prune": 1.5})


@pytest.mark.slow
def test_inductor_downstream():
    model, x = _with_dead_channels("resnet")
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="secateurs")(*x)
        torch.testing.assert_close(out, model(*x), rtol=1e-4, atol=1e-4)
