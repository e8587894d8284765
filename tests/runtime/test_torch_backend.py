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


# ---- found by the torch.compile sweep of session 12


class _FrozenBatchNorm2d(nn.Module):
    """As torchvision's: scale and shift held in buffers, not parameters."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n) * 0.1)
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class _FrozenBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = _FrozenBatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        gate = x.mean((1, 2, 3), keepdim=True)  # zero on a zeros warm-up batch
        h = torch.relu(self.bn1(self.c1(x))) * gate
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("options", [{}, {"verify": False}])
def test_zero_conv_rows_are_not_dead_when_buffers_add_to_them(options):
    """A conv with zero rows before a FrozenBatchNorm (scale/shift are buffers): the
    channels carry the shift, but dead-channel removal looked at parameters only and removed
    them (max diff 0.055); a zeros warm-up batch made the numeric check pass too."""
    torch.manual_seed(0)
    model = _FrozenBNNet().eval()
    with torch.no_grad():
        model.c1.weight[:4] = 0
    compiled = _compile(model, **options)
    x = torch.randn(2, 3, 16, 16) + 0.5
    with torch.no_grad():
        compiled(torch.zeros(2, 3, 16, 16))
        assert torch.allclose(compiled(x), model(x), atol=1e-6)


def test_dead_channel_removal_is_checked_on_more_than_the_first_input():
    """zero rows followed by sigmoid: the channel is 0.5, not 0, downstream; on a zeros
    first batch whose gate is zero the pruned graph looked exact."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)) * x.sum(-1, keepdim=True))

    model = Gated().eval()
    with torch.no_grad():
        model.a.weight[:4] = 0
        model.a.bias[:4] = 0
    compiled = _compile(model)
    with torch.no_grad():
        compiled(torch.zeros(2, 8))
        x = torch.randn(2, 8)
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert tb.LAST_COMPILE.removed_units == 0 and tb.LAST_COMPILE.exact is False


def test_dead_channels_with_dynamic_shapes():
    """The numeric check ran the graphs on dynamo's SymInt inputs: "SymIntArrayRef expected
    to contain only concrete integers" at the second batch size (every call with
    dynamic=True)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            b, n, _ = x.shape
            return self.fc2(torch.relu(self.fc1(x)).reshape(b, n, 4, 8).reshape(b, n, 32))

    torch.manual_seed(0)
    model = M().eval()
    with torch.no_grad():
        model.fc1.weight[:8] = 0
        model.fc1.bias[:8] = 0
    for dynamic in (None, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="secateurs", dynamic=dynamic,
                                 options={"backend": "eager"})
        with torch.no_grad():
            for batch in (2, 3, 5):
                x = torch.randn(batch, 4, 16)
                assert torch.allclose(compiled(x), model(x), atol=1e-6)
        removed = tb.LAST_COMPILE.removed
        rows = next(v[0] for k, v in removed.items() if k.endswith("fc1_parameters_weight_"))
        assert rows == list(range(8))


def _zeroed(model, records, names):
    """``model`` with every slice any compiled graph removed set to zero."""
    import copy

    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    for record in records:
        for attr, dims in record.removed.items():
            fqn = next(v for k, v in names.items() if attr.endswith(k))
            for d, index in dims.items():
                params[fqn].data.index_fill_(d, torch.tensor(index), 0.0)
    return masked


def _recording(records, **options):
    def backend(gm, example_inputs):
        fn = tb.secateurs_backend(gm, example_inputs, options={"backend": "eager", **options})
        records.append(tb.LAST_COMPILE)
        return fn
    return backend


def test_prune_is_one_mask_across_graph_breaks_and_recompiles():
    """Each compiled graph chose its own channels: a Linear called on both sides of a graph
    break kept its rows in one graph and lost them in the other; a call with and without an
    optional kwarg (two graphs) removed different rows of the same weight. No masking of the
    model reproduced the compiled program (0.019 / 0.2 off)."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.shared = nn.Linear(16, 32), nn.Linear(32, 32)
            self.mid, self.out, self.g = nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(16, 32)

        def forward(self, x, gate=None):
            h = torch.relu(self.shared(torch.relu(self.inp(x))))
            torch._dynamo.graph_break()
            h = torch.relu(self.mid(h))
            if gate is not None:
                h = h * torch.sigmoid(self.g(gate))
            return self.out(torch.relu(self.shared(h)))

    torch.manual_seed(0)
    model = Shared().eval()
    names = {f"_modules_{a}_parameters_{p}_": f"{a}.{p}"
             for a, mod in model.named_children() for p, _ in mod.named_parameters()}
    records: list = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_recording(records, prune=0.5))
    x, gate = torch.randn(4, 16), torch.randn(4, 16)
    with torch.no_grad():
        y_plain = compiled(x)
        y_gate = compiled(x, gate=gate)
        assert len(records) >= 3 and sum(r.removed_units for r in records) > 0
        masked = _zeroed(model, records, names)
        assert torch.allclose(y_plain, masked(x), atol=1e-6)
        assert torch.allclose(y_gate, masked(x, gate=gate), atol=1e-6)


def test_train_mode_batchnorm_updates_the_models_statistics():
    """BatchNorm recalibration (train mode under no_grad): the backend froze and cloned the
    buffers, so the model's running statistics stopped updating (num_batches_tracked 0 or 1
    against eager's 5). Such a graph is compiled untouched; with prune it is an error."""
    import copy

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 64, 4))

    model = net()
    eager = copy.deepcopy(model)
    compiled = _compile(model)
    model.train()
    eager.train()
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i))
            compiled(x)
            eager(x)
    assert int(model[1].num_batches_tracked) == 3
    assert torch.allclose(model[1].running_mean, eager[1].running_mean)
    compiled = _compile(net().train(), prune=0.3)
    with torch.no_grad(), pytest.raises(Exception, match="updates the model's tensors in place"):
        compiled(torch.randn(4, 3, 8, 8))


def test_prune_leaves_dynamos_recompile_setting_alone_until_its_limit():
    """One prune compile set dynamo's process-wide fail_on_recompile_limit_hit for good: an
    unrelated model then raised at its recompile limit instead of falling back."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=False):
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        with torch.no_grad():
            _compile(model, prune=0.3)(torch.randn(2, 8))
        assert torch._dynamo.config.fail_on_recompile_limit_hit is False


def test_compile_mode_reaches_the_inductor_downstream():
    """torch.compile(mode=...) with this backend was refused as "unknown secateurs backend
    options ['mode']"."""
    assert tb.BackendOptions.parse({"mode": "max-autotune-no-cudagraphs"}).mode
    with pytest.raises(InputError, match="configures the inductor downstream"):
        tb.BackendOptions.parse({"mode": "reduce-overhead", "backend": "eager"})


def test_prune_that_removes_nothing_from_a_graph_says_so():
    """Graph breaks between every layer make each channel a graph output: prune=0.5 removed
    nothing from any of the three graphs and said nothing ("never silently dense")."""

    class Printing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            torch._dynamo.graph_break()
            h = torch.relu(self.fc2(h))
            torch._dynamo.graph_break()
            return self.fc3(h)

    compiled = _compile(Printing().eval(), prune=0.5)
    with torch.no_grad(), pytest.warns(tb.DenseFallbackWarning, match="removed nothing"):
        compiled(torch.randn(2, 16))


def test_changed_weights_are_refrozen_not_stale(caplog):
    """The frozen copies ignored the tensors dynamo passes at each call: after an in-place
    update (an optimizer step, ``load_state_dict``) or a reassigned parameter the compiled
    model answered with the old weights — zeroed weights still gave 0.48. Dead channels that
    came alive were still removed. Each call now checks identity and ``_version``, and a
    change recompiles the graph on the current weights (a fresh analysis)."""
    model, x = _with_dead_channels("resnet")
    model.eval()
    compiled = _compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-4, atol=1e-5)
        assert tb.LAST_COMPILE.removed_units > 0
        count = tb.compile_count()
        # the dead channels come alive: removing them now would be a wrong program
        fresh = zoo.get("resnet").build().eval()
        model.load_state_dict(fresh.state_dict())
        with caplog.at_level("WARNING"):
            out = compiled(*x)
        assert "a weight changed" in caplog.text
        torch.testing.assert_close(out, model(*x), rtol=1e-4, atol=1e-5)
        assert tb.compile_count() == count + 1 and tb.LAST_COMPILE.removed_units == 0
        compiled(*x)
        assert tb.compile_count() == count + 1  # unchanged weights: no recompile
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        conv.weight = nn.Parameter(conv.weight * 3)  # a reassigned parameter
        torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-4, atol=1e-5)


def test_prune_after_a_weight_update_is_the_masked_current_model():
    """With ``prune``, the graph recompiled after an in-place update removes units chosen on
    the current weights and equals the current model with those slices zeroed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    names = {"_modules_0_parameters_weight_": "0.weight", "_modules_0_parameters_bias_": "0.bias",
             "_modules_2_parameters_weight_": "2.weight", "_modules_2_parameters_bias_": "2.bias"}
    records: list = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_recording(records, prune=0.5))
    x = torch.randn(4, 16)
    with torch.no_grad():
        compiled(x)
        model[0].weight.mul_(torch.rand(64, 1) * 4)  # other rows become the important ones
        y = compiled(x)
    last = tb.LAST_COMPILE
    assert last is not records[-1] and last.removed_units > 0  # the recompile's record
    assert torch.allclose(y, _zeroed(model, [last], names)(x), atol=1e-5)
