"""Positions a consumer mixes stay whole even where they are another op's output channels.

A conv's input spatial dims, a pixel shuffle's input spatial dims and a recurrent layer's
time steps: each is a free group when a Linear's output is reshaped into them (Keras/DCGAN
``Dense -> Reshape -> Conv2DTranspose``, ``Dense -> Reshape -> LSTM``, a learned constant map).
The rules pin them; and ``group_channels`` pins any input dim a rule leaves unmapped, so a rule
that forgets one keeps it whole instead of emitting a wrong program."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs
from secateurs.graph.ir import ChannelGraph, Node, Value
from secateurs.passes.channel_rules import RULES, Rule
from secateurs.passes.group_channels import group_channels


class _DenseToMap(nn.Module):
    """A generator head: Linear -> view to a 4x4 map -> a conv layer -> pooled logits."""

    def __init__(self, layer: str):
        super().__init__()
        self.dense = nn.Linear(16, 32 * 4 * 4)
        self.layer = layer
        if layer == "conv":
            self.conv = nn.Conv2d(32, 32, 3, padding=1)
        elif layer == "conv_transpose":
            self.conv = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1)
        else:
            self.conv = nn.Sequential(nn.PixelShuffle(2), nn.Conv2d(8, 32, 1))
        self.head = nn.Linear(32, 5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.dense(z).view(-1, 32, 4, 4)
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class _DenseToSequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 8 * 12)
        self.lstm = nn.LSTM(12, 10, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.dense(z).view(-1, 8, 12))
        return self.head(y[:, -1])


def _pinned_units(analysis, param: str, dim: int) -> tuple[int, str]:
    for g in analysis.groups:
        for m in g.members:
            if m.param == param and m.dim == dim and g.size > 1:
                return int(g.pinned.sum()), "; ".join(g.pin_reasons)
    raise AssertionError(f"no group of {param}[{dim}]")


@pytest.mark.parametrize("layer", ["conv", "conv_transpose", "pixel_shuffle"])
def test_map_reshaped_from_a_linear_keeps_its_positions(layer):
    torch.manual_seed(0)
    model, z = _DenseToMap(layer).eval(), torch.randn(2, 16)
    analysis = secateurs.analyze(model, z)
    # dense.weight rows are (channel, row, column) of the map: row and column stay whole
    groups = [g for g in analysis.groups if any(m.param == "dense.weight" for m in g.members)]
    spatial = [g for g in groups if g.size == 4 if not any(
        m.param.startswith("conv") for m in g.members)]
    assert spatial and all(g.is_pinned for g in spatial)
    # (pixel shuffle: one of them is the sub-pixel factor of the channels)
    assert all("spatial dim of" in "; ".join(g.pin_reasons) or "sub-pixel" in
               "; ".join(g.pin_reasons) for g in spatial)
    assert sum("spatial dim of" in "; ".join(g.pin_reasons) for g in spatial) >= 2
    result = secateurs.prune(model, z, ratio=0.5, round_to=1)
    assert result.report.params_after < result.report.params_before  # the channels go
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, z)
    assert ok, diff
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan,
                                                 torch.randn(3, 16))
    assert ok, diff


def test_sequence_reshaped_from_a_linear_keeps_its_time_steps():
    torch.manual_seed(0)
    model, z = _DenseToSequence().eval(), torch.randn(2, 16)
    analysis = secateurs.analyze(model, z)
    steps = [g for g in analysis.groups if g.size == 8
             and any(m.param == "dense.weight" for m in g.members)]
    assert steps and all(g.is_pinned for g in steps)
    assert any("time steps of" in r for g in steps for r in g.pin_reasons)
    result = secateurs.prune(model, z, ratio=0.5, round_to=1)
    assert result.model.lstm.input_size == 6  # the features prune, the steps do not
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, z)
    assert ok, diff


def test_an_input_dim_a_rule_leaves_unmapped_is_pinned(monkeypatch):
    """A rule that maps the channel dim but says nothing of another input dim (as the conv
    rule once did of the input's spatial dims): that dim is pinned, naming the op."""
    def channels_only(ctx):  # dim 0 passes, dim 1 is read but mapped nowhere
        return [[ctx.ins[0][0], ctx.space.fresh(ctx.out_shapes[0][1], pin="test output")]]

    monkeypatch.setitem(RULES, "forgetful", Rule(channels_only))
    values = [Value("x", (6, 3), kind="input"), Value("w", (4, 3), param="w", kind="parameter"),
              Value("y", (6, 4)), Value("out", (6, 4))]
    graph = ChannelGraph({v.name: v for v in values},
                         [Node("fc", "linear", ["x", "w", None], ["y"]),
                          Node("f", "forgetful", ["y"], ["out"])], ["x"], ["out"])
    (dim1,) = [g for g in group_channels(graph).groups
               if any(m.param == "w" and m.dim == 0 for m in g.members)]
    assert dim1.is_pinned
    assert any("reads dim 1 of operand 0" in r and "does not map" in r
               for r in dim1.pin_reasons)
