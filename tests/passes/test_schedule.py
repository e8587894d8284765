"""Schedules: gradual pruning reaches its target, sensitivity, depth pruning, lottery tickets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs.demo.digits import DigitsCNN
from secateurs.errors import InputError
from secateurs.passes.lottery import LotteryTicket
from secateurs.passes.prune import prune
from secateurs.passes.schedule import (
    iterative_prune,
    prune_depth,
    ratios_from_sensitivity,
    residual_blocks,
    schedule_fractions,
    sensitivity_scan,
)

torch.set_num_threads(1)

X = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _cnn(widths=(16, 32, 32)) -> DigitsCNN:
    torch.manual_seed(0)
    model = DigitsCNN(widths)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def test_schedule_fractions() -> None:
    assert schedule_fractions(4, "linear") == [0.25, 0.5, 0.75, 1.0]
    cubic = schedule_fractions(4, "cubic")
    assert cubic[-1] == 1.0 and cubic[0] > 0.25  # prunes faster early
    assert all(a < b for a, b in zip(cubic, cubic[1:]))
    with pytest.raises(InputError):
        schedule_fractions(3, "exponential")


@pytest.mark.parametrize("schedule", ["linear", "cubic"])
def test_iterative_reaches_the_mac_target(schedule) -> None:
    model = _cnn((32, 64, 64))
    calls = []

    def tune(m, step):
        calls.append(step)
        return m

    res = iterative_prune(model, X, target_macs=0.4, n_steps=3, schedule=schedule,
                          fine_tune=tune, verify=True)
    assert calls == [0, 1, 2]
    kept = [s.report.macs_after / res.macs_before for s in res.steps]
    assert all(a > b for a, b in zip(kept, kept[1:]))  # every step prunes further
    for k, goal in zip(kept, res.targets):
        assert abs(k - goal) <= 0.05 * goal
    assert abs(res.macs_kept - 0.4) <= 0.05 * 0.4
    assert res.params_kept < 1.0
    assert res.model(X).shape == (2, 10)


def test_iterative_ratio_matches_one_shot_widths() -> None:
    model = _cnn()
    res = iterative_prune(model, X, target_ratio=0.5, n_steps=2)
    one_shot = prune(model, X, 0.5)
    widths = {n: m.out_channels for n, m in res.model.named_modules()
              if isinstance(m, nn.Conv2d)}
    expected = {n: m.out_channels for n, m in one_shot.model.named_modules()
                if isinstance(m, nn.Conv2d)}
    assert widths.keys() == expected.keys()
    for name in widths:
        assert abs(widths[name] - expected[name]) <= 1, (name, widths, expected)


def test_iterative_needs_one_target() -> None:
    with pytest.raises(InputError):
        iterative_prune(_cnn(), X, target_ratio=0.5, target_macs=0.5)


def _metric(reference_model):
    with torch.no_grad():
        ref = reference_model(X)

    def metric(m):
        with torch.no_grad():
            return -float((m(X) - ref).abs().max())

    return metric


def test_sensitivity_scan_finds_the_dead_group() -> None:
    model = _cnn()
    with torch.no_grad():  # layer2.conv1's channels: only the first half does anything
        model.layer2.bn1.weight[:16] = 0.0
        model.layer2.bn1.bias[:16] = -1.0  # relu(-1) = 0: those channels are dead
    scan = sensitivity_scan(model, X, _metric(model), ratio=0.5, importance="bn_scale")
    by_key = {s.key: s for s in scan}
    assert "layer2.bn1.weight" in by_key
    assert by_key["layer2.bn1.weight"].drop == pytest.approx(0.0, abs=1e-5)
    assert all(s.drop > 1e-4 for s in scan if s.key != "layer2.bn1.weight")
    ratios = ratios_from_sensitivity(scan, target_ratio=0.4, max_ratio=0.9)
    assert max(ratios, key=ratios.get) == "layer2.bn1.weight"
    sizes = {s.key: s.size for s in scan}
    mean = sum(ratios[k] * sizes[k] for k in ratios) / sum(sizes.values())
    assert mean == pytest.approx(0.4, abs=1e-6)
    res = prune(model, X, 0.0, ratios=ratios, verify=True)
    assert res.model.layer2.conv1.out_channels < 32


def test_residual_blocks_are_the_identity_skips() -> None:
    import torch.fx

    gm = torch.fx.symbolic_trace(_cnn())
    blocks = residual_blocks(gm)
    mods = [set(b.modules) for b in blocks]
    # layer1 and layer3 have identity skips; layer2 has a downsample on both paths
    assert len(blocks) == 2
    assert {"layer1.conv1", "layer1.bn1", "layer1.conv2", "layer1.bn2"} <= mods[0]
    assert {"layer3.conv1", "layer3.bn2"} <= mods[1]


def test_depth_pruning_is_exact_for_a_dead_block() -> None:
    model = _cnn()
    with torch.no_grad():
        model.layer3.bn2.weight.zero_()
        model.layer3.bn2.bias.zero_()
        ref = model(X)
    res = prune_depth(model, X, 1, _metric(model))
    assert [set(b.modules) >= {"layer3.conv1", "layer3.conv2"} for b in res.removed] == [True]
    names = {n for n, _ in res.model.named_modules()}
    assert "layer3.conv1" not in names and "layer1.conv1" in names
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), ref, rtol=1e-5, atol=1e-6)
    assert res.metrics[0] == pytest.approx(0.0, abs=1e-6)
    assert res.params_after < res.params_before
    # the shallower model is still a prunable, runnable GraphModule
    again = prune(res.model, X, 0.5, verify=True)
    assert again.model(X).shape == (2, 10)


def test_depth_pruning_asks_for_too_many_blocks() -> None:
    res = prune_depth(_cnn(), X, 2, _metric(_cnn()))
    assert len(res.removed) == 2
    assert res.model(X).shape == (2, 10)
    with pytest.raises(InputError, match="removable"):
        prune_depth(_cnn(), X, 3, _metric(_cnn()))


# -- lottery tickets ---------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _trainer(masks_seen: list, steps: int = 5):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)

    def train(model, on_step):
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        for i in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            on_step(i)
        masks_seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    return train


def test_lottery_masked_weights_stay_zero_and_survivors_rewind_to_init() -> None:
    model = _mlp()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ticket = LotteryTicket(model, prune_fraction=0.5)
    trained: list = []
    masks = ticket.step(_trainer(trained))
    assert set(masks) == {"0.weight", "2.weight"}
    assert ticket.sparsity == pytest.approx(0.5, abs=0.01)
    for name, mask in masks.items():
        w = dict(model.named_parameters())[name].detach()
        assert (w[~mask] == 0).all()
        torch.testing.assert_close(w[mask], init[name][mask])
    torch.testing.assert_close(model[0].bias.detach(), init["0.bias"])  # not masked: rewound
    # second round: training keeps the masked weights at zero, then prunes half the survivors
    first = {n: m.clone() for n, m in masks.items()}
    masks = ticket.step(_trainer(trained))
    for name, mask in first.items():
        assert (trained[-1][name][~mask] == 0).all()
        assert not (masks[name] & ~mask).any()  # nothing comes back
    assert ticket.sparsity == pytest.approx(0.75, abs=0.01)
    assert ticket.rounds == 2


def test_lottery_rewinds_to_an_early_step() -> None:
    model = _mlp()
    snapshots = {}

    def train(m, on_step):
        inner = _trainer([], steps=4)

        def spy(i):
            on_step(i)
            if i == 1:
                snapshots["w"] = m[0].weight.detach().clone()

        inner(m, spy)

    ticket = LotteryTicket(model, prune_fraction=0.2, rewind_to=1, scope="global")
    masks = ticket.step(train)
    w = model[0].weight.detach()
    torch.testing.assert_close(w[masks["0.weight"]], snapshots["w"][masks["0.weight"]])
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == int(0.2 * total) or \
        ticket.sparsity == pytest.approx(0.2, abs=0.01)


def test_lottery_rewind_step_must_be_reported() -> None:
    ticket = LotteryTicket(_mlp(), rewind_to=10)
    with pytest.raises(InputError, match="on_step"):
        ticket.step(_trainer([], steps=3))
    assert np.isfinite(ticket.sparsity)


def test_iterative_recalibrates_data_driven_criteria() -> None:
    from secateurs.passes.importance import calibration_context

    g = torch.Generator().manual_seed(4)
    batches = [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))]
    seen = []

    def ctx_fn(m):
        seen.append(m.layer1.conv1.out_channels)
        return calibration_context(m, batches, lambda mod, b: F.cross_entropy(mod(b[0]), b[1]),
                                   "taylor")

    res = iterative_prune(_cnn(), X, target_ratio=0.5, n_steps=2, importance="taylor",
                          context_fn=ctx_fn, verify=True)
    assert seen[0] == 16 and seen[1] < 16  # the second context sees the pruned model
    assert all(s.report.exact for s in res.steps)


@pytest.mark.parametrize("target", [0.8, 0.5, 0.4])
def test_target_macs_mixes_ratios_when_uniform_steps_are_too_coarse(target) -> None:
    from secateurs.passes.schedule import macs_kept_at

    model = _cnn()  # 16/32 channels: one uniform step moves the MACs by several percent
    res = prune(model, X, target_macs=target, verify=True)
    assert abs(res.report.macs_kept - target) <= 0.05 * target
    assert res.report.exact
    assert macs_kept_at(model, X, res.plan.meta["ratio"]) <= 1.0


def test_target_macs_traces_the_model_once(monkeypatch) -> None:
    """The bisection selects on the analysis that is then applied: one trace, not two."""
    from secateurs.graph import from_fx

    calls = []
    real = from_fx.trace
    monkeypatch.setattr(from_fx, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = DigitsCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    result = prune(model, x, target_macs=0.6)
    assert len(calls) == 1
    assert abs(result.report.macs_kept - 0.6) <= 0.05 * 0.6


def test_iterative_ratio_counts_the_units_prune_may_remove() -> None:
    """The step ratios are scaled by the prunable units left; they were counted without lossy
    groups even under ``allow_lossy=True`` (and without groups whose lossy units are all
    pinned, which ``prune`` does remove from), so the steps' ratios did not compose to the
    target."""
    from secateurs import zoo
    from secateurs.passes.prune import analyze
    from secateurs.passes.schedule import _prunable_units

    entry = zoo.get("vit")
    model, x = entry.build(), entry.example_inputs()
    groups = [g for g in analyze(model, x).groups if g.size > 1]
    exact = sum(g.prunable for g in groups if not g.removal_is_lossy)
    everything = sum(g.prunable for g in groups)
    assert everything > exact
    assert _prunable_units(model, x) == exact
    assert _prunable_units(model, x, allow_lossy=True) == everything
