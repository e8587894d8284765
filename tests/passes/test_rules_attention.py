"""Attention patterns of public models (issue 11, "Real-world coverage"): each class of failure
has a zoo look-alike (``secateurs/zoo/attention_wild.py``); the prune must be mask-equivalent,
the units that can go must go, and what stays pinned says why."""

from __future__ import annotations

import pytest
import torch

import secateurs
from secateurs import zoo
from secateurs.passes.group_channels import Analysis, ChannelGroup


def _prune(name: str, ratio: float, **kw):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=ratio, **kw)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, f"{name} at {ratio}: max |diff| {diff}"
    return model, x, result


def _groups_of(analysis: Analysis, param: str, dim: int) -> list[ChannelGroup]:
    return [g for g in analysis.groups
            if any(m.param == param and m.dim == dim for m in g.members)]


def _analysis(name: str) -> Analysis:
    entry = zoo.get(name)
    return secateurs.analyze(entry.build(), entry.example_inputs())


def _runs_at_batch(model: torch.nn.Module, x: tuple[torch.Tensor, ...], batch: int) -> None:
    xs = tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() for t in x)
    with torch.no_grad():
        out = model(*xs)
    assert out.shape[0] == batch


# ------------------------------------------------------------------ class 1: unbind / unpacking


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_fused_qkv_unbind_prunes_heads_and_keeps_q_k_v(ratio):
    model, x, result = _prune("vit_unbind", ratio)
    _runs_at_batch(result.model, x, 3)
    pruned = dict(result.model.named_parameters())
    for i in range(3):
        w = pruned[f"blocks.{i}.attn.qkv.weight"]
        assert w.shape[0] < 96 and w.shape[0] % 3 == 0  # q, k and v all kept, each narrower
    assert pruned["blocks.3.attn.kv.weight"].shape[0] < 64
    assert pruned["blocks.3.attn.kv.weight"].shape[0] % 2 == 0


def test_fused_qkv_count_dims_are_pinned_with_the_op_that_needs_them():
    analysis = _analysis("vit_unbind")
    for param, why in [("blocks.0.attn.qkv.weight", "unbinds this dim"),
                       ("blocks.1.attn.qkv.weight", "constant index"),
                       ("blocks.2.attn.qkv.weight", "piece of size 1"),
                       ("blocks.3.attn.kv.weight", "unbinds this dim")]:
        groups = _groups_of(analysis, param, 0)
        count = [g for g in groups if g.size in (2, 3) and g.is_pinned]
        assert len(count) == 1, param
        assert any(why in r for r in count[0].pin_reasons), count[0].pin_reasons
        heads = [g for g in groups if g.size == 4]  # 4 heads, 8 head dims: prunable units
        dims = [g for g in groups if g.size == 8]
        assert heads and heads[0].prunable == 4 and dims and dims[0].prunable == 8, param
