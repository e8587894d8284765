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


def _resnet_eval():
    entry = zoo.get("resnet")
    return entry.build().eval(), entry.example_inputs()[0]


def test_one_compile_serves_every_batch_size_and_stays_pruned():
    """12 batch sizes under prune=0.3: at most 2 compiles (static first call, then dynamo's
    automatic dynamic batch) and every output is the pruned model's, never the dense one's."""
    model, x = _resnet_eval()
    compiled = _compile(model, prune=0.3)
    before = tb.compile_count()
    reference = None
    with torch.no_grad():
        for batch in range(1, 13):
            xb = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
            out = compiled(xb)
            if reference is None:
                reference = tb.LAST_COMPILE.graph  # the pruned GraphModule of the first compile
                assert tb.LAST_COMPILE.removed_units > 0
                assert sum(p.numel() for p in reference.parameters()) < \
                    sum(p.numel() for p in model.parameters())
            torch.testing.assert_close(out, reference(xb)[0], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(out, model(xb), rtol=1e-3, atol=1e-3)  # not dense
    assert tb.compile_count() - before <= 2


def test_dynamic_true_compiles_once():
    model, x = _resnet_eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="secateurs", dynamic=True,
                             options={"backend": "eager", "prune": 0.3})
    before = tb.compile_count()
    with torch.no_grad():
        for batch in (2, 5, 9, 3):
            assert compiled(torch.randn(batch, *x.shape[1:])).shape == (batch, 10)
    assert tb.compile_count() - before == 1


def test_recompile_limit_raises_instead_of_running_the_dense_model():
    model, x = _resnet_eval()
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False,
                                    fail_on_recompile_limit_hit=False):
        compiled = _compile(model, prune=0.3)
        with torch.no_grad():
            compiled(torch.randn(1, *x.shape[1:]))
            compiled(torch.randn(2, *x.shape[1:]))
            with pytest.raises(Exception, match="recompile_limit|recompile limit"):
                compiled(torch.randn(3, *x.shape[1:]))


def test_recompile_limit_warn_mode_warns_at_the_last_compile():
    model, x = _resnet_eval()
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False,
                                    fail_on_recompile_limit_hit=False):
        compiled = _compile(model, prune=0.3, on_recompile_limit="warn")
        with torch.no_grad():
            compiled(torch.randn(1, *x.shape[1:]))
            with pytest.warns(tb.DenseFallbackWarning, match="DENSE"):
                compiled(torch.randn(2, *x.shape[1:]))


def test_grads_enabled_with_prune_raises_instead_of_silently_dense():
    """Documented: a graph that needs gradients cannot be pruned (the weights are frozen);
    with an explicit prune ratio that is an error, not a silent dense model."""
    model, x = _resnet_eval()
    compiled = _compile(model, prune=0.3)
    with pytest.raises(Exception, match="no_grad"):
        compiled(x)  # grad mode on, parameters require grad


def test_grads_enabled_without_prune_is_the_unpruned_model_and_trains():
    model, x = _with_dead_channels("resnet")
    model.eval()
    out = _compile(model)(*x)
    torch.testing.assert_close(out, model(*x))
    assert tb.LAST_COMPILE.training and tb.LAST_COMPILE.removed_units == 0
    out.sum().backward()
    assert model.fc.weight.grad is not None if hasattr(model, "fc") else True
