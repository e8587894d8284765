"""Bad input: a clear error naming the problem, and the user's model untouched."""

import pytest
import torch
from torch import nn

import secateurs
from secateurs import zoo


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:  # neither FX nor torch.export can follow this
            return self.conv(x)
        return self.conv(-x)


def _resnet():
    entry = zoo.get("resnet")
    return entry.build(), entry.example_inputs()


def test_untraceable_model_names_both_tracers():
    with pytest.raises(secateurs.TraceError, match="symbolic_trace.*torch.export"):
        secateurs.prune(DataDependent(), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half"])
def test_ratio_out_of_range(ratio):
    model, x = _resnet()
    with pytest.raises(secateurs.InputError, match="ratio"):
        secateurs.prune(model, x, ratio=ratio)


def test_unknown_ignore_name():
    model, x = _resnet()
    with pytest.raises(secateurs.InputError, match="layer9"):
        secateurs.prune(model, x, ignore=["layer9.conv"])


def test_ignore_keeps_channels():
    model, x = _resnet()
    result = secateurs.prune(model, x, ratio=0.5, ignore=["conv1"])
    assert not any(k.startswith("conv1.") for k in result.plan.removed)
    assert result.plan.removed


@pytest.mark.parametrize("inplace", [False, True])
def test_ignore_takes_the_callers_module_objects(inplace):
    """Torch-Pruning's ``ignored_layers=[model.fc]``: the module objects are the caller's, and
    ``prune`` works on a copy — it looked them up in the copy and said "not part of the
    model"."""
    model, x = _resnet()
    result = secateurs.prune(model, x, ratio=0.5, ignore=[model.conv1], inplace=inplace)
    assert not any(k.startswith("conv1.") for k in result.plan.removed)
    assert result.plan.removed
    with pytest.raises(secateurs.InputError, match="not part of the model"):
        secateurs.prune(model, x, ignore=[torch.nn.Linear(2, 2)])


def test_wrong_input_shape_is_clear_and_model_untouched():
    model, _ = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(secateurs.InputError, match=r"shapes \[\(1, 5, 32, 32\)\]"):
        secateurs.prune(model, torch.randn(1, 5, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_importance():
    model, x = _resnet()
    with pytest.raises(secateurs.InputError, match="importance"):
        secateurs.prune(model, x, importance="nonsense")


def test_inplace_modifies_the_model():
    model, x = _resnet()
    width = model.conv1.out_channels
    secateurs.prune(model, x, ratio=0.5, inplace=True)
    assert model.conv1.out_channels < width


def test_plan_for_another_model():
    model, x = _resnet()
    plan = secateurs.Plan({"nope.weight": {0: [0]}})
    with pytest.raises(secateurs.PlanError, match="nope.weight"):
        secateurs.apply_plan(model, x, plan)


def test_plan_from_bad_json():
    with pytest.raises(secateurs.PlanError):
        secateurs.Plan.from_json("{not json")
    with pytest.raises(secateurs.PlanError, match="format"):
        secateurs.Plan.from_json("{}")


def test_keyword_inputs_point_to_positional_or_prune_hf():
    model = nn.Linear(4, 4)
    with pytest.raises(secateurs.InputError, match="input_ids.*positionally.*prune_hf"):
        secateurs.prune(model, {"input_ids": torch.zeros(1, 4)})


def test_a_trace_error_says_what_positional_inputs_bind_to():
    """(input_ids, attention_mask) given positionally to a Hugging Face causal LM binds the
    mask to its cache parameter; the trace error names the binding and the way out."""
    pytest.importorskip("transformers")
    from secateurs.hf.models import example_inputs, tiny_model

    model = tiny_model("gpt2")
    ids = example_inputs(model)[0]
    with pytest.raises(secateurs.TraceError) as info:
        secateurs.prune(model, (ids, torch.ones_like(ids)), ratio=0.5)
    text = str(info.value)
    assert "The example inputs bind to GPT2LMHeadModel.forward(input_ids=Tensor, " in text
    assert "pass only input_ids positionally, or use secateurs.hf.prune_hf" in text


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x, scale):
        if x.sum() > 0:
            return self.conv(x) * scale
        return self.conv(-x)


def test_the_binding_hint_stays_out_of_the_way_of_plain_models():
    with pytest.raises(secateurs.TraceError) as info:
        secateurs.prune(_TwoInputs(), (torch.randn(1, 3, 8, 8), torch.ones(1)))
    text = str(info.value)
    assert "bind to _TwoInputs.forward(x=Tensor, scale=Tensor)." in text
    assert "prune_hf" not in text


class _RandomMasking(nn.Module):
    """ViTMAE's ``random_masking``: token order from fresh ``torch.rand`` noise, in eval mode
    too (or a dropout run with ``training=True``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rand":
            order = torch.argsort(torch.rand(x.shape[0], x.shape[1]), dim=1)
            x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[2]))
        else:
            x = torch.nn.functional.dropout(x, 0.1, training=self.kind == "dropout")
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("kind", ["rand", "dropout"])
def test_verify_refuses_a_random_forward_and_names_the_node(kind):
    """The safety net used to blame missing channel rules for the noise, pin every group and
    then fail verification with "please report this model"."""
    x = torch.randn(2, 8, 16)
    with pytest.raises(secateurs.InputError, match="random numbers") as err:
        secateurs.prune(_RandomMasking(kind).eval(), (x,), ratio=0.5, verify=True)
    assert ("rand '" if kind == "rand" else "training=True") in str(err.value)
    result = secateurs.prune(_RandomMasking(kind).eval(), (x,), ratio=0.5)  # no check asked
    assert result.model.get_parameter("fc1.weight").shape[0] == 16


def test_dropout_in_eval_mode_is_deterministic():
    x = torch.randn(2, 8, 16)
    result = secateurs.prune(_RandomMasking("eval").eval(), (x,), ratio=0.5, verify=True)
    assert result.report.exact is True


class _MaskRouted(nn.Module):
    """Tokens routed by a boolean mask (a sparse MoE's dispatch): the routed width depends on
    the data."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 1)
        self.expert = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = x[self.gate(x)[:, 0] > 0]
        return x.index_add(0, torch.nonzero(self.gate(x)[:, 0] > 0)[:, 0], self.expert(routed))


def test_a_data_dependent_size_is_a_trace_error_not_a_bad_input():
    """The model runs on its inputs: saying "does not run on example inputs" (as FakeTensor's
    refusal of ``nonzero`` once read) would send the user after the wrong problem."""
    model, x = _MaskRouted().eval(), torch.randn(6, 8)
    model(x)
    with pytest.raises(secateurs.TraceError, match="depends on the data"):
        secateurs.prune(model, x, ratio=0.5)


class _MaskRoutedExportOnly(_MaskRouted):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:  # a branch on a size: symbolic_trace refuses, torch.export traces
            return super().forward(x)
        return x


def test_an_unbacked_size_in_an_exported_graph_is_a_trace_error():
    model, x = _MaskRoutedExportOnly().eval(), torch.randn(6, 8)
    with pytest.raises(secateurs.TraceError, match="depends on the data"):
        secateurs.prune(model, x, ratio=0.5)
