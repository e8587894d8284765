"""Structure: the units and members the analysis finds on small, known graphs."""

import dataclasses

import numpy as np
import pytest
from torch import nn

import secateurs
from secateurs import zoo


def _analyze(name):
    entry = zoo.get(name)
    return secateurs.analyze(entry.build(), entry.example_inputs()), entry.build()


def _group_with(analysis, param, dim):
    for g in analysis.groups:
        for m in g.members:
            if m.param == param and m.dim == dim:
                return g, m
    raise AssertionError(f"no group has {param}[{dim}]")


def test_conv_bn_residual_one_group():
    a, _ = _analyze("resnet")
    g, _ = _group_with(a, "layer1.0.downsample.0.weight", 0)
    params = g.params()
    assert "layer1.0.conv3.weight" in params  # residual add couples branch and skip
    assert "layer1.0.bn3.running_var" in params
    assert not g.is_lossy and g.prunable == g.size


def test_heads_and_head_dims_are_units():
    a, model = _analyze("vit")
    blk = model.blocks[0].attn
    heads, dim = blk.num_heads, blk.head_dim
    q = "blocks.0.attn.q.weight"
    groups = [(g, m) for g in a.groups for m in g.members if m.param == q and m.dim == 0]
    sizes = sorted(g.size for g, _ in groups)
    assert sizes == sorted([heads, dim]), sizes
    for g, m in groups:
        per_unit = np.bincount(m.units, minlength=g.size)
        # a head owns head_dim rows; a head dim owns one row in every head
        assert set(per_unit) == {dim if g.size == heads else heads}
    head_group = next(g for g, _ in groups if g.size == heads)
    assert "blocks.0.attn.k.weight" in head_group.params()
    assert "blocks.0.attn.v.weight" in head_group.params()
    assert "blocks.0.attn.proj.weight" in head_group.params()


def test_fused_qkv_heads():
    a, model = _analyze("vit_fused")
    g, m = next((g, m) for g in a.groups for m in g.members
                if m.param == "blocks.0.attn.qkv.weight" and m.dim == 0
                and g.size == model.blocks[0].attn.num_heads)
    per_unit = np.bincount(m.units, minlength=g.size)
    # each head owns its q, k and v rows: 3 * head_dim
    assert set(per_unit) == {3 * model.blocks[0].attn.head_dim}


def test_gqa_kv_head_owns_its_query_heads():
    a, model = _analyze("llama")
    attn = model.layers[0].self_attn
    n_rep = attn.num_heads // attn.num_key_value_heads
    kv = [g for g in a.groups if g.size == attn.num_key_value_heads and not g.is_pinned
          and "layers.0.self_attn.q_proj.weight" in g.params()]
    assert len(kv) == 1
    qm = next(m for m in kv[0].members if m.param == "layers.0.self_attn.q_proj.weight")
    per_unit = np.bincount(qm.units, minlength=kv[0].size)
    assert set(per_unit) == {n_rep * attn.head_dim}
    km = next(m for m in kv[0].members if m.param == "layers.0.self_attn.k_proj.weight")
    assert set(np.bincount(km.units)) == {attn.head_dim}


def test_rotary_pairs_are_one_unit():
    a, model = _analyze("llama")
    g, m = _group_with(a, "rotary_emb.inv_freq", 0)
    head_dim = model.layers[0].self_attn.head_dim
    assert g.size == head_dim // 2
    qm = next(m for m in g.members if m.param == "layers.0.self_attn.q_proj.weight")
    # unit u covers rows d and d + head_dim/2 of every head
    rows = np.sort(qm.positions[qm.units == 0]) % head_dim
    assert set(rows.tolist()) == {0, head_dim // 2}


def test_concat_offsets_keep_groups_separate():
    a, _ = _analyze("densenet")
    stem, stem_m = _group_with(a, "features.0.weight", 0)
    grow, _ = _group_with(a, "features.denseblock1.denselayer1.conv2.weight", 0)
    assert stem.id != grow.id
    # the BN after the first concat follows both: stem channels first, then growth
    bn = "features.denseblock1.denselayer2.norm1.weight"
    s = next(m for m in stem.members if m.param == bn)
    gm = next(m for m in grow.members if m.param == bn)
    assert s.positions.max() < gm.positions.min()


def test_flatten_linear_expansion():
    a, model = _analyze("vgg")
    convs = [n for n, mod in model.named_modules() if isinstance(mod, nn.Conv2d)]
    g, _ = _group_with(a, f"{convs[-1]}.weight", 0)
    fc = next(m for m in g.members if m.dim == 1 and m.param.endswith("weight")
              and m.param.startswith("classifier"))
    spatial = np.bincount(fc.units, minlength=g.size)
    assert len(set(spatial)) == 1 and spatial[0] > 1  # each channel owns H*W columns


def test_depthwise_couples_in_and_out():
    a, model = _analyze("mobilenetv2")
    dw = next(n for n, mod in model.named_modules()
              if isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels)
    g, _ = _group_with(a, f"{dw}.weight", 0)
    # the expand conv before it is in the same group
    assert any(p.endswith("weight") and p != f"{dw}.weight" for p in g.params())


def test_unknown_op_pins_with_reason():
    a, _ = _analyze("unsupported_op")
    reasons = [r for g in a.groups for r in g.pin_reasons]
    assert any("no channel rule for 'glu'" in r for r in reasons), reasons


def test_mha_heads_prunable_packed_count_pinned_with_reason():
    a, _ = _analyze("mha_transformer")
    reasons = " ".join(r for g in a.groups for r in g.pin_reasons)
    assert "packs q, k and v into in_proj_weight" in reasons
    heads = [g for g in a.groups if g.size == 4 and g.prunable == 4 and not g.is_lossy]
    assert len(heads) == 2 and all(any(m.param.endswith("in_proj_weight") for m in g.members)
                                   for g in heads)


def test_layernorm_group_is_lossy_with_reason():
    a, _ = _analyze("vit")
    hidden = [g for g in a.groups if g.is_lossy]
    assert hidden and any("normalises" in r for g in hidden for r in g.lossy_reasons)


def test_analysis_is_pure():
    entry = zoo.get("resnet")
    model, x = entry.build(), entry.example_inputs()
    a1 = secateurs.analyze(model, x)
    a2 = secateurs.analyze(model, x)
    assert [(g.size, g.params()) for g in a1.groups] == [(g.size, g.params()) for g in a2.groups]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a1.groups[0].size = 3  # frozen
