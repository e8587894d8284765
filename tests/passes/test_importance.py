"""Importance criteria and selection options: scores rank the right units, budgets are met."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs.errors import InputError
from secateurs.passes.importance import (
    CRITERIA,
    ScoreContext,
    activation_statistics,
    bn_l1_regularizer,
    calibration_context,
    get_criterion,
    member_scores,
)
from secateurs.passes.prune import analyze, prune

torch.set_num_threads(1)

DEAD = 3  # the unit made unimportant in each test


class Net(nn.Module):
    def __init__(self, widths=(8, 12), bn: bool = True) -> None:
        super().__init__()
        w0, w1 = widths
        self.conv1 = nn.Conv2d(3, w0, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(w0) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(w0, w1, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(w1) if bn else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w1, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g))
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _batches(n: int = 3):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g))
            for _ in range(n)]


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _group(analysis, param: str, dim: int = 0):
    for g in analysis.groups:
        if any(m.param == param and m.dim == dim for m in g.members):
            return g
    raise AssertionError(f"no group holds {param}[{dim}]")


def _tensors(model):
    t = dict(model.named_parameters())
    t.update(model.named_buffers())
    return t


def _zero_unit(model, group, unit: int) -> None:
    tensors = _tensors(model)
    with torch.no_grad():
        for m in group.members:
            pos = torch.as_tensor(m.positions[m.units == unit])
            tensors[m.param].index_fill_(m.dim, pos, 0.0)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return _randomise_bn(Net())


@pytest.fixture
def analysis(net):
    return analyze(net, X)


def test_every_criterion_scores_every_unit(net, analysis) -> None:
    ctx = calibration_context(net, _batches(), _loss, list(CRITERIA))
    for name, criterion in CRITERIA.items():
        for g in analysis.groups:
            if not g.prunable:
                continue
            scores = criterion(g, ctx)
            assert scores.shape == (g.size,), name
            assert np.isfinite(scores).all(), name
            assert (scores >= 0).all(), name


@pytest.mark.parametrize("name", ["l1", "l2", "lamp", "bn_scale"])
def test_unit_with_zero_weights_ranks_last_by_magnitude(net, analysis, name) -> None:
    g = _group(analysis, "conv1.weight")
    _zero_unit(net, g, DEAD)
    scores = CRITERIA[name](g, ScoreContext(_tensors(net)))
    assert int(np.argmin(scores)) == DEAD
    assert scores[DEAD] == 0.0
    assert (np.delete(scores, DEAD) > 0).all()


def test_bn_scale_reads_gamma_only(net, analysis) -> None:
    g = _group(analysis, "conv2.weight")
    with torch.no_grad():
        net.bn2.weight[DEAD] = 0.0
    scores = CRITERIA["bn_scale"](g, ScoreContext(_tensors(net)))
    assert int(np.argmin(scores)) == DEAD and scores[DEAD] == 0.0
    np.testing.assert_allclose(scores, net.bn2.weight.detach().abs().double().numpy())
    # l2 over all slices does not see it: the conv filter is still large
    assert CRITERIA["l2"](g, ScoreContext(_tensors(net)))[DEAD] > 0


def test_bn_scale_falls_back_to_l2_without_batchnorm() -> None:
    torch.manual_seed(0)
    net = Net(bn=False).eval()
    g = _group(analyze(net, X), "conv1.weight")
    ctx = ScoreContext(_tensors(net))
    np.testing.assert_allclose(CRITERIA["bn_scale"](g, ctx), CRITERIA["l2"](g, ctx))


def test_bn_l1_regularizer_is_l1_of_gammas(net) -> None:
    term = bn_l1_regularizer(net, 1e-3)
    expected = 1e-3 * (net.bn1.weight.abs().sum() + net.bn2.weight.abs().sum())
    torch.testing.assert_close(term, expected)
    term.backward()
    torch.testing.assert_close(net.bn1.weight.grad, 1e-3 * torch.sign(net.bn1.weight.detach()))
    assert float(bn_l1_regularizer(Net(bn=False))) == 0.0


def _grads_with_dead_unit(net, group, scale=1.0):
    g = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(p.shape, generator=g) * scale for n, p in net.named_parameters()}
    for m in group.members:
        if m.param in grads:
            grads[m.param].index_fill_(m.dim, torch.as_tensor(m.positions[m.units == DEAD]), 0.0)
    return grads


def test_taylor_zero_gradient_ranks_last(net, analysis) -> None:
    g = _group(analysis, "conv1.weight")
    ctx = ScoreContext(_tensors(net), grads=_grads_with_dead_unit(net, g))
    scores = CRITERIA["taylor"](g, ctx)
    assert int(np.argmin(scores)) == DEAD and scores[DEAD] == 0.0
    assert (np.delete(scores, DEAD) > 0).all()


def test_taylor_is_w_times_g(net, analysis) -> None:
    g = _group(analysis, "conv2.weight")
    grads = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    ctx = ScoreContext(_tensors(net), grads=grads)
    # with g = 1 everywhere, taylor is the L1 of the parameters (buffers have no gradient)
    def l1(m, t):
        if m.param not in grads:
            return None
        dims = [d for d in range(t.dim()) if d != m.dim]
        return t.detach().abs().sum(dim=dims) if dims else t.detach().abs()

    expected = member_scores(g, ctx, l1)
    np.testing.assert_allclose(CRITERIA["taylor"](g, ctx), expected, rtol=1e-6)


def test_fisher_zero_gradient_ranks_last(net, analysis) -> None:
    g = _group(analysis, "conv1.weight")
    ctx = ScoreContext(_tensors(net), extra={"fisher": _grads_with_dead_unit(net, g)})
    ctx.extra["fisher"] = {k: v * v for k, v in ctx.extra["fisher"].items()}
    scores = CRITERIA["fisher"](g, ctx)
    assert int(np.argmin(scores)) == DEAD and scores[DEAD] == 0.0


def test_gradient_criteria_need_calibration(net, analysis) -> None:
    g = _group(analysis, "conv1.weight")
    for name in ("taylor", "fisher", "activation"):
        with pytest.raises(InputError, match="calibration_context"):
            CRITERIA[name](g, ScoreContext(_tensors(net)))


def test_calibration_matches_autograd(net) -> None:
    batches = _batches(2)
    ctx = calibration_context(net, batches, _loss, ["taylor", "fisher"])
    net.zero_grad()
    (_loss(net, batches[0]) + _loss(net, batches[1])).backward()
    torch.testing.assert_close(ctx.grads["conv1.weight"], net.conv1.weight.grad)
    assert ctx.extra["fisher"]["conv1.weight"].shape == net.conv1.weight.shape
    assert (ctx.extra["fisher"]["conv1.weight"] >= 0).all()


def test_activation_dead_channel_ranks_last(net, analysis) -> None:
    g = _group(analysis, "conv1.weight")
    with torch.no_grad():  # BN output of channel DEAD is exactly zero
        net.bn1.weight[DEAD] = 0.0
        net.bn1.bias[DEAD] = 0.0
    ctx = calibration_context(net, _batches(), _loss, "activation")
    stats = ctx.extra["activations"]
    assert stats["bn1.weight"].shape == (8,) and stats["fc.weight"].shape == (5,)
    scores = CRITERIA["activation"](g, ctx)
    assert int(np.argmin(scores)) == DEAD and scores[DEAD] == 0.0
    np.testing.assert_allclose(scores, stats["bn1.weight"].double().numpy(), rtol=1e-6)


def test_activation_statistics_are_mean_abs_per_channel(net) -> None:
    x = _batches(1)[0][0]
    stats = activation_statistics(net, [x])
    expected = net.conv1(x).abs().mean(dim=(0, 2, 3))
    torch.testing.assert_close(stats["conv1.weight"], expected.detach())


def test_lamp_scores_are_layer_normalised(net, analysis) -> None:
    g = _group(analysis, "conv2.weight")
    scores = CRITERIA["lamp"](g, ScoreContext(_tensors(net), reduction="max"))
    assert np.isclose(scores.max(), 1.0)  # the largest unit of a layer: s / s
    assert (scores <= 1.0 + 1e-12).all()


def test_random_is_seeded(net, analysis) -> None:
    g = _group(analysis, "conv1.weight")
    a = CRITERIA["random"](g, ScoreContext(_tensors(net), seed=1))
    b = CRITERIA["random"](g, ScoreContext(_tensors(net), seed=1))
    c = CRITERIA["random"](g, ScoreContext(_tensors(net), seed=2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_reductions(net, analysis) -> None:
    g = _group(analysis, "conv1.weight")
    out = {r: CRITERIA["l1"](g, ScoreContext(_tensors(net), reduction=r))
           for r in ("sum", "mean", "max")}
    n = len([m for m in g.members])
    np.testing.assert_allclose(out["mean"] * n, out["sum"])
    assert (out["max"] <= out["sum"] + 1e-12).all() and (out["max"] >= out["mean"] - 1e-12).all()
    with pytest.raises(InputError, match="reduction"):
        CRITERIA["l1"](g, ScoreContext(_tensors(net), reduction="median"))


def test_custom_callable_decides_what_goes(net) -> None:
    def lowest_index_first(group, ctx):
        return np.arange(group.size, dtype=np.float64) + 1.0

    assert get_criterion(lowest_index_first) is lowest_index_first
    res = prune(net, X, 0.5, importance=lowest_index_first, verify=True)
    assert res.plan.removed["conv1.weight"][0] == [0, 1, 2, 3]
    assert res.plan.removed["conv2.weight"][0] == list(range(6))
    assert res.report.exact


def test_unknown_criterion_names_the_choices() -> None:
    with pytest.raises(InputError, match="taylor"):
        get_criterion("nope")


@pytest.mark.parametrize("name", ["taylor", "fisher", "activation", "bn_scale", "lamp"])
def test_data_criteria_prune_exactly(net, name) -> None:
    ctx = calibration_context(net, _batches(), _loss, name)
    res = prune(net, X, 0.5, importance=name, score_context=ctx, verify=True)
    assert res.report.exact
    assert res.model.conv1.out_channels == 4


# -- selection options -------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.75, 0.5, 0.3])
@pytest.mark.parametrize("global_pruning", [False, True])
def test_target_macs_within_five_percent(target, global_pruning) -> None:
    torch.manual_seed(0)
    net = _randomise_bn(Net((32, 48)))
    res = prune(net, X, importance="l2", target_macs=target, global_pruning=global_pruning,
                verify=True)
    assert abs(res.report.macs_kept - target) <= 0.05 * target
    assert res.plan.meta["target_macs"] == target


def test_target_macs_out_of_reach_says_so(net) -> None:
    with pytest.raises(InputError, match="out of reach"):
        prune(net, X, target_macs=0.5, ignore=["conv1", "conv2"])


def _widths(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("ratio", [0.2, 0.45, 0.7])
def test_round_to_holds_for_every_pruned_width(ratio) -> None:
    torch.manual_seed(0)
    net = _randomise_bn(Net((24, 40)))
    res = prune(net, X, ratio, round_to=8, verify=True)
    widths = _widths(res.model)
    assert widths != _widths(net)
    assert all(w % 8 == 0 for w in widths.values()), widths
    assert res.model.bn1.num_features == widths["conv1"]
    assert res.model.fc.in_features == widths["conv2"]


def test_min_units_and_ignore_and_ratios(net) -> None:
    res = prune(net, X, 0.9, min_units=3)
    assert min(_widths(res.model).values()) == 3
    res = prune(net, X, 0.5, ignore=["conv1"])
    assert _widths(res.model) == {"conv1": 8, "conv2": 6}
    res = prune(net, X, 0.5, ratios={"bn1": 0.25})
    assert _widths(res.model) == {"conv1": 6, "conv2": 6}
