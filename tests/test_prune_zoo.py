"""Mask-equivalence on every zoo model: the pruned model equals the original with the plan's
slices zeroed (eval mode, non-trivial BN statistics)."""

import pytest
import torch

import secateurs
from secateurs import zoo

MODELS = [n for n in zoo.names() if "bench" not in zoo.get(n).tags]
# models whose every channel is normalised (LayerNorm everywhere) or opaque prune nothing exact
NOTHING_EXACT = {"mlp", "untraceable_cond", "eca_channel_conv", "gmlp_sgu"}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", MODELS)
def test_mask_equivalence(name, ratio):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = secateurs.prune(model, x, ratio=ratio)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, f"{name}: max |diff| {diff}"
    # the caller's model is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if name in NOTHING_EXACT:
        assert result.report.macs_after == result.report.macs_before
    else:
        assert result.report.macs_after < result.report.macs_before
        assert result.plan.removed
        assert result.report.params_after < result.report.params_before
    with torch.no_grad():
        out = result.model(*x)
    assert torch.isfinite(out if isinstance(out, torch.Tensor) else out[0]).all()


@pytest.mark.parametrize("name", ["resnet", "vit_fused", "llama", "densenet", "shufflenet"])
def test_plan_json_roundtrip_and_apply_plan(name):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=0.4, round_to=2)
    text = result.plan.to_json()
    plan = secateurs.Plan.from_json(text)
    assert plan == result.plan
    again = secateurs.apply_plan(model, x, plan)
    a, b = result.model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(result.model(*x), again(*x))
    # a second prune at ratio 0 changes nothing
    second = secateurs.prune(result.model, x, ratio=0.0)
    assert not second.plan.removed


def test_plan_keys_are_original_names():
    entry = zoo.get("resnet")
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=0.5)
    names = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    assert set(result.plan.removed) <= names
    # every sliced tensor has the shape the plan implies
    pruned = dict(result.model.named_parameters()) | dict(result.model.named_buffers())
    orig = dict(model.named_parameters()) | dict(model.named_buffers())
    for pname, dims in result.plan.removed.items():
        for d, idx in dims.items():
            assert pruned[pname].shape[d] == orig[pname].shape[d] - len(idx)


def test_round_to_holds_for_every_pruned_width():
    entry = zoo.get("resnet")
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=0.6, round_to=4)
    for name, mod in result.model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            orig = model.get_submodule(name).out_channels
            if mod.out_channels != orig:
                assert mod.out_channels % 4 == 0, name


def test_global_pruning_is_exact_and_removes_the_ratio():
    entry = zoo.get("vgg")
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=0.5, global_pruning=True, verify=True)
    assert result.report.exact
    assert result.report.macs_kept < 0.9


def test_allow_lossy_prunes_layernorm_groups():
    entry = zoo.get("mlp")
    model, x = entry.build(), entry.example_inputs()
    exact = secateurs.prune(model, x, ratio=0.5)
    lossy = secateurs.prune(model, x, ratio=0.5, allow_lossy=True)
    assert exact.report.params_after == exact.report.params_before
    assert lossy.report.params_after < lossy.report.params_before
    with torch.no_grad():
        assert lossy.model(*x).shape == model(*x).shape


def test_meta_device_analysis_matches_real():
    entry = zoo.get("vit")
    x = entry.example_inputs()
    real = secateurs.analyze(entry.build(), x)
    with torch.device("meta"):
        meta_model = entry.build()
    meta = secateurs.analyze(meta_model, tuple(t.to("meta") for t in x))
    assert [g.size for g in real.groups] == [g.size for g in meta.groups]
    assert [g.prunable for g in real.groups] == [g.prunable for g in meta.groups]
