"""Issue 11, non-attention classes 3-7, 10, 11 and the §3 complexity property: each class has a
zoo look-alike (``secateurs/zoo/conv_wild.py``) that prunes exactly, prunes what it should, and
names its reason where something stays pinned or lossy."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import secateurs
from secateurs import zoo
from secateurs.graph import fx_lower
from secateurs.graph.fx_shapes import propagate_shapes


def _prune(name: str, ratio: float, **kw):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=ratio, **kw)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, f"{name} at {ratio}: max |diff| {diff}"
    with torch.no_grad():
        assert torch.isfinite(result.model(*x)).all()
    return model, result


def _width(model: nn.Module, path: str, attr: str) -> int:
    return int(getattr(model.get_submodule(path), attr))


def _reasons(analysis, param: str, kind: str = "pin") -> list[str]:
    out = []
    for g in analysis.groups:
        if any(m.param == param for m in g.members):
            out += list(g.pin_reasons if kind == "pin" else g.lossy_reasons)
    return out


# ------------------------------------------------------------------ class 4: size expressions


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_window_attention_prunes_heads_and_mlp_exactly(ratio):
    model, result = _prune("swin_window", ratio)
    pruned = result.model
    # MLP hidden units and attention heads / head dims are removed, the crop still runs
    assert _width(pruned, "layers.0.fc1", "out_features") < _width(model, "layers.0.fc1",
                                                                     "out_features")
    assert _width(pruned, "layers.1.attn.qkv", "out_features") < _width(
        model, "layers.1.attn.qkv", "out_features")
    with torch.no_grad():  # the pruned model runs at another batch size too
        assert pruned(torch.randn(2, 3, 40, 40)).shape == (2, 10)


class _CropChain(nn.Module):
    """A residual chain whose every block crops by a size read off the residual stream: every
    size expression reaches back through all earlier blocks."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            h = x.shape[2]
            y = conv(x)
            x = x + y[:, :, : h - 0, : x.shape[3] // 1]
        return x


def test_size_expressions_are_evaluated_once_per_node(monkeypatch):
    """``_static_int`` walks only the size expression and memoises: lowering calls ``call_key``
    a bounded number of times per node (exponential in the depth before)."""
    gm = torch.fx.symbolic_trace(_CropChain(14))
    propagate_shapes(gm, (torch.randn(1, 4, 8, 8),))
    calls = 0
    real = fx_lower.call_key

    def counting(node):
        nonlocal calls
        calls += 1
        return real(node)

    monkeypatch.setattr(fx_lower, "call_key", counting)
    graph = fx_lower.lower_graph_module(gm)
    n = len(gm.graph.nodes)
    assert calls <= 4 * n, f"{calls} call_key calls for {n} nodes"
    assert any(node.op == "index" for node in graph.nodes)
