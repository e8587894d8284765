"""Attention patterns of public models (issue 11, "Real-world coverage"): each class of failure
has a zoo look-alike (``secateurs/zoo/attention_wild.py``); the prune must be mask-equivalent,
the units that can go must go, and what stays pinned says why."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import secateurs
from secateurs import zoo
from secateurs.passes.group_channels import Analysis, ChannelGroup
from secateurs.passes.plan import build_plan


def _prune(name: str, ratio: float, **kw):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=ratio, **kw)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, f"{name} at {ratio}: max |diff| {diff}"
    # the rules got it right by themselves: the safety net (if present) repaired nothing
    assert not getattr(result.report, "repairs", ()), result.report.repairs
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


# ------------------------------------------- class 2 and 9: bias tables read through an index


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", ["beit_relpos", "levit_bias"])
def test_bias_tables_follow_the_heads(name, ratio):
    model, x, result = _prune(name, ratio)
    _runs_at_batch(result.model, x, 3)
    orig = dict(model.named_parameters()) | dict(model.named_buffers())
    pruned = dict(result.model.named_parameters()) | dict(result.model.named_buffers())
    table = ("relative_position_bias_table" if name == "beit_relpos" else "attention_biases")
    for i in range(3):
        key = f"blocks.{i}.attn.{table}"
        head_dim = 0 if name == "levit_bias" or i == 2 else 1
        # a head went, and with it the head's row/column of the bias table; offsets stay
        assert pruned[key].shape[head_dim] < orig[key].shape[head_dim], key
        assert pruned[key].shape[1 - head_dim] == orig[key].shape[1 - head_dim], key
    for key, t in orig.items():  # index buffers are never sliced
        if ("idx" in key or "index" in key) and key in pruned:
            assert torch.equal(pruned[key], t), key
    assert not any(("idx" in k or "index" in k) for k in result.plan.removed)


def test_index_operands_carry_no_channels_and_table_rows_say_why():
    analysis = _analysis("levit_bias")
    rows = _groups_of(analysis, "blocks.0.attn.attention_biases", 1)
    assert len(rows) == 1 and rows[0].is_pinned
    assert "addressed by the index tensor" in rows[0].pin_reasons[0]
    heads = _groups_of(analysis, "blocks.0.attn.attention_biases", 0)
    assert len(heads) == 1 and heads[0].prunable == heads[0].size == 4
    assert any(m.param == "blocks.0.attn.qkv.weight" for m in heads[0].members)
    for g in analysis.groups:  # an index buffer's dims only ever follow the tokens (pinned)
        if any(m.param.endswith("attention_bias_idxs") for m in g.members):
            assert g.is_pinned


def test_sdpa_per_head_mask_is_sliced_with_its_heads():
    analysis = _analysis("beit_relpos")
    heads = _groups_of(analysis, "blocks.1.attn.relative_position_bias_table", 1)
    assert len(heads) == 1 and heads[0].prunable == 4  # block 1 passes it as attn_mask
    assert any(m.param == "blocks.1.attn.qkv.weight" for m in heads[0].members)


# ---------------------------------------- class 8: composites that expand to no atom at all


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_unroll_and_packed_in_projection_prune_without_crashing(ratio):
    model, x, result = _prune("hiera_unroll", ratio)
    _runs_at_batch(result.model, x, 3)
    pruned = dict(result.model.named_parameters())
    for i in range(2):  # mask-unit attention heads still prune
        assert pruned[f"blocks.{i}.attn.qkv.weight"].shape[0] < 96
    # the packed attention merges batch and heads, ``view(T, B * H, D)``: the common
    # refinement (B, H, D) of that reshape makes its heads units, and its ``unflatten(-1,
    # (3, E))`` (E read from the unpruned input) and views are rewritten
    rows = pruned["packed.in_proj_weight"].shape[0]
    assert rows < 96 and rows % 3 == 0
    assert pruned["packed.out_proj.weight"].shape == (32, rows // 3)
    assert not any("incompatible ways" in (r.pinned or "") for r in result.report.groups)


def test_a_reshape_of_several_dims_into_several_is_cut_at_the_common_refinement():
    from secateurs.passes.channel_rules import common_refinement

    assert common_refinement([2, 32], [8, 8]) == [2, 4, 8]  # (B, E) -> (B * H, D)
    assert common_refinement([3, 4], [12]) == [3, 4]  # a merge
    assert common_refinement([12], [3, 1, 4]) == [3, 4]  # a split; size 1 is no piece
    assert common_refinement([2, 3], [3, 2]) is None  # positions mix: composed whole


def test_a_reshape_cycle_pins_its_atoms_with_the_node_that_made_it():
    from secateurs.passes.labels import LabelSpace

    space = LabelSpace()
    space.origin("view 'v0'")
    a = space.fresh(4)
    space.origin("view 'v1'")
    head = space.fresh(2)
    space.unify(a, space.compose(head, a[:2]))  # a dim made of a part of itself
    res = space.resolve()
    assert (res.atoms_of(a) < 0).all()  # no atom: never removed
    for atom in np.unique(res.comp[head]).tolist():
        assert "view 'v1'" in res.pin_reason[atom]


# ------------------------------------------- class 13 and 12: multi-query heads, q/k norms


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_multi_query_heads_and_qk_normed_heads_prune(ratio):
    model, x, result = _prune("mqa_qknorm", ratio)
    _runs_at_batch(result.model, x, 3)
    pruned = dict(result.model.named_parameters())
    # MQA: q heads go (uniformly: the repeat index), the single kv head stays
    c_attn = pruned["blocks.0.attn.c_attn.weight"].shape[0]
    assert c_attn < 32 + 16
    assert pruned["blocks.0.attn.c_proj.weight"].shape[1] < 32
    # Qwen3: a kv head goes with its q heads although q and k are RMS-normalised per head
    if ratio >= 0.5:  # floor(0.3 * 2 kv heads) = 0
        assert pruned["blocks.1.attn.k_proj.weight"].shape[0] < 16
    assert pruned["blocks.1.attn.q_norm.weight"].shape == (8,)  # the normalised dim stays


def test_per_head_rms_norm_marks_only_the_normalised_dim_lossy():
    analysis = _analysis("mqa_qknorm")
    kv = [g for g in _groups_of(analysis, "blocks.1.attn.k_proj.weight", 0) if g.size == 2]
    assert len(kv) == 1 and not kv[0].is_lossy and kv[0].prunable == 2
    dims = _groups_of(analysis, "blocks.1.attn.q_norm.weight", 0)
    assert len(dims) == 1 and dims[0].lossy.all()
    assert any("mean over this dim" in r for r in dims[0].lossy_reasons), dims[0].lossy_reasons


def test_multi_query_repeat_index_is_a_unit_and_gqa_keeps_kv_groups():
    analysis = _analysis("mqa_qknorm")
    q_heads = [g for g in _groups_of(analysis, "blocks.0.attn.c_proj.weight", 1) if g.size == 4]
    assert len(q_heads) == 1 and q_heads[0].prunable == 4 and not q_heads[0].is_lossy
    # with several kv heads a kv head is the unit: the repeat index stays, and says why
    rep = [g for g in _groups_of(analysis, "blocks.1.attn.o_proj.weight", 1) if g.is_pinned]
    assert rep and any("broadcast by expand" in r for g in rep for r in g.pin_reasons)


def test_gqa_by_repeat_interleave_removes_kv_groups_and_q_heads_in_every_group():
    analysis = _analysis("mqa_qknorm")
    heads = [g for g in _groups_of(analysis, "blocks.2.attn.wo.weight", 1) if g.size == 2]
    # two units of 2: the kv heads (each with its q heads) and the copy index in every group
    assert len(heads) == 2 and all(g.prunable == 2 and not g.is_lossy for g in heads)
    rows = sorted(len(m.positions) for g in heads for m in g.members
                  if m.param == "blocks.2.attn.wqkv.weight")
    # a kv unit holds its k and v rows and its 2 q heads; a copy unit one q head per group
    assert rows == [4 * 8, 2 * (2 * 8 + 8 + 8)]
    # ratio = attention width: the kv heads (outer) go first, the copies make up the rest
    for ratio, q_kept, kv_kept in ((0.5, 2, 1), (0.75, 1, 1)):
        model, x, result = _prune("mqa_qknorm", ratio)
        pruned = dict(result.model.named_parameters())
        q_heads = pruned["blocks.2.attn.wo.weight"].shape[1] // 8  # whole heads: head dim 8
        kv_rows = (pruned["blocks.2.attn.wqkv.weight"].shape[0] - 8 * q_heads) // 2
        assert (q_heads, kv_rows) == (q_kept, 8 * kv_kept), ratio
        _runs_at_batch(result.model, x, 3)


def test_gqa_by_expand_keeps_q_heads_within_a_group_and_says_why():
    analysis = _analysis("mqa_qknorm")
    (rep,) = [g for g in _groups_of(analysis, "blocks.1.attn.o_proj.weight", 1) if g.is_pinned]
    assert rep.size == 2 and rep.prunable == 0
    assert any("grouped-query attention's repeat index: a kv head is removed with all its q "
               "heads" in r for r in rep.pin_reasons), rep.pin_reasons


def test_rsqrt_of_a_possibly_zero_value_stays_lossy():
    import torch.nn as nn

    class Bad(nn.Module):  # rsqrt of a plain mean square: zero for a removed channel
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            h = self.fc(x)
            return self.out(h * torch.rsqrt(h.pow(2)))

    analysis = secateurs.analyze(Bad(), (torch.randn(2, 8),))
    (g,) = _groups_of(analysis, "fc.weight", 0)
    assert g.lossy.all() and any("singular at zero" in r for r in g.lossy_reasons)


# ------------------------ class 11: nn.MultiheadAttention and nn.TransformerEncoderLayer


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", ["tv_vit_mha", "torch_encoder", "mha_transformer"])
def test_multihead_attention_heads_and_ffn_prune(name, ratio):
    from secateurs.graph.fx_modules import PrunedMultiheadAttention

    model, x, result = _prune(name, ratio)
    _runs_at_batch(result.model, x, 3)
    before = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    after = dict(result.model.named_modules())
    assert before
    fewer_heads = 0
    for n, m in before.items():
        p = after[n]
        assert p.in_proj_weight.shape[0] == 3 * p.num_heads * p.head_dim
        assert p.out_proj.weight.shape[1] == p.num_heads * p.head_dim
        assert p.head_dim <= m.head_dim and p.num_heads <= m.num_heads
        if (p.num_heads, p.head_dim) != (m.num_heads, m.head_dim):
            assert isinstance(p, PrunedMultiheadAttention)
            assert p.scale == pytest.approx(m.head_dim ** -0.5)  # the original scale
        fewer_heads += p.num_heads < m.num_heads
    if ratio >= 0.5:
        assert fewer_heads >= 2
    ffn = [k for k in result.plan.removed if "linear1" in k or "mlp.0" in k]
    assert ffn  # the feed-forward widths prune too


def test_mha_whose_weights_are_used_keeps_its_heads_and_says_why():
    analysis = _analysis("tv_vit_mha")
    heads = [g for g in _groups_of(analysis, "pool.in_proj_weight", 0) if g.size == 4]
    assert len(heads) == 1 and heads[0].is_pinned
    assert "returns attention weights" in heads[0].pin_reasons[0]
    (count,) = [g for g in _groups_of(analysis, "pool.in_proj_weight", 0) if g.size == 3]
    assert count.is_pinned and "the 3 stays" in count.pin_reasons[0]


def test_pruned_multihead_attention_matches_torch_unpruned():
    from secateurs.graph.fx_modules import prune_multihead_attention

    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[0, -1] = True
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        with torch.no_grad():
            want, w_want = mha(x, x, x, key_padding_mask=mask if batch_first else None,
                               attn_mask=causal)
            prune_multihead_attention(mha, 4, 4, 16, 0.5)
            got, w_got = mha(x, x, x, key_padding_mask=mask if batch_first else None,
                             attn_mask=causal)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(w_got, w_want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------ einsum: one canonical op for FX and ONNX


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_einsum_attention_prunes_heads_head_dims_and_outer_product(ratio):
    model, x, result = _prune("einsum_vit", ratio)
    _runs_at_batch(result.model, x, 3)
    pruned = dict(result.model.named_parameters())
    for i in range(2):
        h, d, c = pruned[f"blocks.{i}.attn.w_o"].shape  # [H, D, C]: heads and v's head dims
        # whole heads first; the head dims go only where the heads cannot make the width
        assert h < 4 and c == 32 and (d < 8 if ratio > 0.75 else d == 8)
        assert pruned[f"blocks.{i}.attn.v.weight"].shape[0] == h * d
        assert pruned[f"blocks.{i}.attn.q.weight"].shape[0] == \
            pruned[f"blocks.{i}.attn.k.weight"].shape[0] < 32
    # the outer product's flattened [i, j] feeds the head: both factors shrink
    a, b = pruned["pa.weight"].shape[0], pruned["pb.weight"].shape[0]
    assert a < 8 and b < 6 and pruned["head.weight"].shape[1] == a * b


def test_fx_einsum_lowers_to_the_canonical_einsum_with_its_equation():
    analysis = _analysis("einsum_vit")
    eqs = sorted(n.attrs["equation"] for n in analysis.graph.nodes if n.op == "einsum")
    assert eqs == sorted(["bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", "bhnd,hdc->bnc"] * 2
                         + ["bi,bj->bij"])
    assert not [n for n in analysis.graph.nodes if n.op == "opaque"]


def test_einsum_in_sublist_form_pins_with_a_reason():
    class Sublist(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(4, 5)
            self.out = torch.nn.Linear(30, 3)

        def forward(self, x):
            return self.out(torch.einsum(self.a(x), [0, 1], self.b(x), [0, 2], [0, 1, 2])
                            .flatten(1))

    analysis = secateurs.analyze(Sublist().eval(), (torch.randn(2, 4),))
    (g,) = _groups_of(analysis, "a.weight", 0)
    assert g.is_pinned and any("sublist form" in r for r in g.pin_reasons), g.pin_reasons


def test_einsum_attention_macs_equal_the_matmul_spelling() -> None:
    """The cost model counts einsum contractions as the matmuls they are: attention written
    with einsum and with ``@`` reports the same MACs before and after pruning."""
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    class Attn(nn.Module):
        def __init__(self, einsum: bool) -> None:
            super().__init__()
            self.einsum = einsum
            self.qkv, self.proj = nn.Linear(32, 96), nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
            if self.einsum:
                a = F.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), -1)
                y = torch.einsum("bhqk,bhkd->bhqd", a, v)
            else:
                y = F.softmax(q @ k.transpose(-1, -2), -1) @ v
            return self.proj(y.transpose(1, 2).reshape(b, t, c))

    x = torch.randn(1, 6, 32)
    reports = []
    for einsum in (True, False):
        torch.manual_seed(0)
        result = secateurs.prune(Attn(einsum).eval(), (x,), ratio=0.5)
        reports.append((result.report.macs_before, result.report.macs_after))
    assert reports[0] == reports[1]
    assert reports[0][1] < reports[0][0]


# ------------------------------------------------------------------ constant indices (Falcon)


class _FalconSplit(torch.nn.Module):
    """Falcon-7B's multi-query split, ``qkv.view(b, t, heads + 2, d)`` read as
    ``[..., :-2, :]``, ``[..., [-2], :]``, ``[..., [-1], :]``; sdpa broadcasts the one key and
    value head. ``untraceable``: a loop over a run-time size sends it through torch.export,
    where the list becomes ``aten.index.Tensor`` over a lifted constant."""

    def __init__(self, untraceable: bool) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.qkv, self.out = torch.nn.Linear(16, 6 * 8), torch.nn.Linear(4 * 8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.untraceable:
            for _ in range(x.shape[-1] // 16):  # a Python loop over a size: not FX-traceable
                x = x * 1.0
        qkv = self.qkv(x).view(b, t, 6, 8)
        q, k, v = (z.transpose(1, 2) for z in (qkv[..., :-2, :], qkv[..., [-2], :],
                                                qkv[..., [-1], :]))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_constant_index_lists_pin_the_key_and_value_slots_and_query_heads_prune(tracer):
    """A constant index list was advanced indexing that pinned every slot (and torch.export's
    ``aten.index.Tensor`` had no rule): Falcon's attention kept all its heads. Now the slots
    it reads are pinned, the query heads prune, and ``[-2]`` still reads the key."""
    model = _FalconSplit(untraceable=tracer == "export").eval()
    x = (torch.randn(2, 5, 16),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer.startswith(tracer)
    assert result.report.exact is True and not result.report.repairs
    # 2 of 4 query heads go (the ratio counts the prunable slots), key and value stay
    assert tuple(result.model.get_parameter("out.weight").shape) == (16, 2 * 8)
    assert tuple(result.model.get_parameter("qkv.weight").shape) == ((2 + 2) * 8, 16)
    _runs_at_batch(result.model, x, 3)


def test_falcon_fused_lookalike_prunes_both_slot_layouts():
    _, _, result = _prune("falcon_fused", 0.5)
    attn = [result.model.get_parameter(f"blocks.{i}.self_attention.dense.weight").shape[1]
            for i in (0, 1)]
    assert attn[0] < 4 * 8 and attn[1] < 4 * 8  # multi-query and grouped slots both prune


class _RotateEveryTwo(torch.nn.Module):
    """Helium/GLM's interleaved rotary over whole heads: ``x[..., 0::2]``, ``x[..., 1::2]``,
    ``stack(..., -1).flatten(-2)``; ``odd`` reads ``x[..., 1:7:2]`` instead (a strided slice
    over part of the dim, which must stay pinned). ``untraceable`` sends it through
    torch.export (``aten.slice`` with a step)."""

    def __init__(self, odd: bool = False, untraceable: bool = False) -> None:
        super().__init__()
        self.odd, self.untraceable = odd, untraceable
        self.q, self.k, self.v = (torch.nn.Linear(16, 4 * 8) for _ in range(3))
        self.out = torch.nn.Linear(4 * 8, 16)
        self.register_buffer("cos", torch.randn(5, 8))
        self.register_buffer("sin", torch.randn(5, 8))

    def _rot(self, x: torch.Tensor) -> torch.Tensor:
        if self.odd:
            return x[..., 1:7:2].sum(-1, keepdim=True) * x
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return x * self.cos + rotated * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.untraceable:
            for _ in range(x.shape[-1] // 16):
                x = x * 1.0
        q, k, v = (p(x).view(b, t, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(self._rot(q), self._rot(k), v)
        return self.out(a.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_interleaved_rotary_keeps_pairs_together_and_heads_prune(tracer):
    """``x[..., 1::2]`` pinned its whole dim as a strided slice, and with it (through the
    reshape into heads) every head: Helium, GLM, ERNIE 4.5, Cohere and GPT-J kept all their
    heads. A slice of every k-th position over the whole dim now factors it into ``(D / k,
    k)`` and reads the outer factor: heads prune, a q/k head-dim unit is a pair ``(2j, 2j +
    1)``, and the step is pinned."""
    model = _RotateEveryTwo(untraceable=tracer == "export").eval()
    x = (torch.randn(2, 5, 16),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer.startswith(tracer)
    assert result.report.exact is True and not result.report.repairs
    assert tuple(result.model.get_parameter("q.weight").shape) == (2 * 8, 16)  # 2 of 4 heads
    _runs_at_batch(result.model, x, 3)
    def first_unit(g: ChannelGroup) -> list[int]:
        member = next(m for m in g.members if m.param == "q.weight" and m.dim == 0)
        return np.sort(member.positions[member.units == member.units.min()]).tolist()

    units = {tuple(first_unit(g)): g for g in _groups_of(result.analysis, "q.weight", 0)}
    assert (0, 1, 2, 3, 4, 5, 6, 7) in units  # a head
    qk_dims = [units[(0, 1, 8, 9, 16, 17, 24, 25)]]  # a pair, in every head
    assert not qk_dims[0].pinned.any()
    assert any(m.param == "k.weight" for m in qk_dims[0].members)
    steps = [g for g in _groups_of(result.analysis, "q.weight", 0) if g.size == 2]
    assert steps and all(g.pinned.all() for g in steps)
    assert any("step of the strided slice" in r for g in steps for r in g.pin_reasons)
    # removing pairs (the head-dim factor) is exact too, and the odd slice still reads odd dims
    plan = build_plan(result.analysis, {qk_dims[0].id: np.array([1, 2])})
    assert plan.removed["q.weight"][0][:4] == [2, 3, 4, 5]
    pruned = secateurs.apply_plan(model, x, plan)
    ok, diff = secateurs.verify_mask_equivalence(model, pruned, plan, x)
    assert ok, diff


def test_a_strided_slice_over_part_of_a_dim_stays_pinned():
    model = _RotateEveryTwo(odd=True).eval()
    analysis = secateurs.passes.prune.analyze(model, (torch.randn(2, 5, 16),))
    dims = [g for g in _groups_of(analysis, "q.weight", 0) if g.size == 8]  # the head dims
    assert dims and all(g.pinned.all() for g in dims)
    assert any("strided slice" in r for g in dims for r in g.pin_reasons)


def test_gptj_rotary_lookalike_prunes_heads_under_partial_and_grouped_rotary():
    _, _, result = _prune("gptj_rotary", 0.5)
    shapes = {n: tuple(p.shape) for n, p in result.model.named_parameters()}
    assert shapes["blocks.0.attn.out_proj.weight"] == (32, 2 * 16)  # GPT-J: rotary_dim 8 of 16
    assert shapes["blocks.1.attn.q_proj.weight"] == (2 * 8, 32)  # Helium: 4 q heads over 2 kv
    assert shapes["blocks.1.attn.k_proj.weight"] == (1 * 8, 32)


class _ComplexRotary(torch.nn.Module):
    """Meta's reference Llama rotary, written as there: ``view_as_complex(x.float().reshape(
    *x.shape[:-1], -1, 2))`` (the star-unpacked shape is not FX-traceable: torch.export),
    times a complex ``freqs_cis`` buffer, ``view_as_real(...).flatten(3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (torch.nn.Linear(16, 4 * 8, bias=False) for _ in range(3))
        self.wo = torch.nn.Linear(4 * 8, 16, bias=False)
        angles = torch.outer(torch.arange(5).float(), 1.0 / 100 ** (torch.arange(4) / 4))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 4, 8) for p in (self.wq, self.wk, self.wv))
        cis = self.freqs_cis[:t].view(1, t, 1, 4)
        q, k = (torch.view_as_real(torch.view_as_complex(
            z.float().reshape(*z.shape[:-1], -1, 2)) * cis).flatten(3).type_as(z) for z in (q, k))
        a = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(a.transpose(1, 2).contiguous().view(b, t, -1))


def test_complex_rotary_prunes_heads_through_view_as_complex():
    """``view_as_complex``/``view_as_real`` had no rule: opaque, so Meta's Llama (and
    torchtitan's, Llama 4's) kept every head. The real/imaginary dim is pinned, pairs and heads
    prune, and the complex ``freqs_cis`` follows the pairs (scored by its modulus)."""
    model = _ComplexRotary().eval()
    x = (torch.randn(2, 5, 16),)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "casting complex values to real" while scoring
        result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer.startswith("export")
    assert result.report.exact is True and not result.report.repairs
    assert tuple(result.model.get_parameter("wq.weight").shape) == (2 * 8, 16)
    _runs_at_batch(result.model, x, 3)
    pinned = [r for g in result.analysis.groups for r in g.pin_reasons]
    assert any("real and imaginary parts" in r for r in pinned)


class _ViewAfterSdpa(torch.nn.Module):
    """Llama's ``a.transpose(1, 2).contiguous().view(B, T, -1)`` after sdpa, through
    torch.export (a Python loop over a size). At trace time CPU flash attention returns its
    output in ``[B, T, H, D]`` memory, so the ``contiguous`` is a no-op and export records
    none."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 4 * 8) for _ in range(3))
        self.o = torch.nn.Linear(4 * 8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        for _ in range(x.shape[-1] // 16):
            x = x * 1.0
        q, k, v = (p(x).view(b, t, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).contiguous().view(b, t, -1))


def test_a_pruned_value_head_dim_does_not_break_a_view_export_specialised_to_strides():
    """With the query heads and head dims kept (``ignore``), the value head dim prunes 8 -> 4;
    sdpa then runs the math kernel, whose output ``transpose(1, 2)`` is not contiguous, and the
    exported ``view`` (its ``contiguous`` dropped) failed in the pruned model only — returned
    by ``prune`` without ``verify``. The apply now writes ``aten.view`` as ``aten.reshape``."""
    model = _ViewAfterSdpa().eval()
    x = (torch.randn(2, 5, 16),)
    result = secateurs.prune(model, x, ratio=0.5, ignore=[model.q])
    assert result.report.tracer.startswith("export")
    assert tuple(result.model.get_parameter("o.weight").shape) == (16, 4 * 4)
    with torch.no_grad():
        result.model(*x)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, diff
    ops = {n.target for n in result.model.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.view.default not in ops


def test_a_pruned_model_that_fails_to_run_is_a_failed_check_the_net_repairs(monkeypatch):
    """Without the reshape rewrite, the pruned model raises at the example: ``verify`` used to
    fail the whole prune with that error; it is a failed check, and the net pins the group."""
    from secateurs.graph import fx_apply

    monkeypatch.setattr(fx_apply, "_views_as_reshapes", lambda gm: False)
    model = _ViewAfterSdpa().eval()
    x = (torch.randn(2, 5, 16),)
    result = secateurs.prune(model, x, ratio=0.5, ignore=[model.q], verify=True)
    assert result.report.exact is True and result.report.repairs
    with torch.no_grad():
        result.model(*x)


class _ScaleFromSize(torch.nn.Module):
    """Attention scaled by its run-time head size, as timm's ``Attention2d`` (MobileNetV4)
    writes it: ``q.size(-1) ** -0.5``, ``/ math.sqrt(q.size(-1))`` or sdpa's ``scale=``; the
    heads' count ``C // 2`` in the reshape is a size read used as a size only."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.qkv, self.proj = torch.nn.Linear(16, 3 * 16), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mode == "pow":
            a = ((q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5).softmax(-1) @ v
        elif self.mode == "sqrt":
            a = ((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))).softmax(-1) @ v
        else:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                 scale=q.shape[-1] ** -0.5)
        return self.proj(a.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("mode", ["pow", "sqrt", "sdpa"])
def test_a_size_read_as_a_value_pins_its_dim(mode):
    """``q.size(-1) ** -0.5`` in an FX graph is computed from the pruned size in the pruned
    model: with the q/k head dim pruned the scale changed, and ``prune`` without ``verify``
    returned a model that differed from the zeroed original (0.02-0.04) with no repair. The
    size read as a value pins the head dim; the heads still prune."""
    model = _ScaleFromSize(mode).eval()
    x = (torch.randn(2, 5, 16),)
    result = secateurs.prune(model, x, ratio=0.5)
    assert not result.report.repairs
    for batch in (2, 3):
        xb = (torch.randn(batch, 5, 16),)
        ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, xb)
        assert ok, (batch, diff)
    reasons = [r for g in result.analysis.groups for r in g.pin_reasons]
    assert any("run-time size" in r and "used as a value" in r for r in reasons), reasons
    assert result.model.get_parameter("proj.weight").shape[1] == 8  # one of 2 heads went


class _PickChannel(torch.nn.Module):
    """A constant index into a channel dim (``h[:, 5]``) and a slice with a negative bound
    over the tokens (``h[:, :-1]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))  # [B, T, 16]
        return self.fc2(h[:, :-1]) * h[:, :-1, 5:6] + h[:, 1:, 3].unsqueeze(-1)


def test_a_constant_index_pins_its_position_and_a_negative_bound_stays_negative():
    """``h[:, :-1, 5:6]`` and ``h[:, 1:, 3]`` read channels 5 and 3: those two are pinned, the
    rest of the width prunes and both indices follow; ``:-1`` over the tokens stays ``-1``, so
    the pruned model drops the last token of a longer sequence too (a rewrite that counted
    ``:-1`` at the traced length would have baked in ``:7``)."""
    model = _PickChannel().eval()
    torch.nn.init.normal_(model.fc1.weight)
    with torch.no_grad():
        model.fc1.weight[[0, 1, 2, 4]] *= 1e-3  # the channels before 3 and 5 are the weakest
    x = (torch.randn(2, 8, 8),)
    analysis = secateurs.analyze(model, x)
    group = _groups_of(analysis, "fc1.weight", 0)[0]
    assert np.nonzero(group.pinned)[0].tolist() == [3, 5]
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("fc1.weight").shape[0] == 16 - 7
    longer = (torch.randn(2, 11, 8),)
    with torch.no_grad():
        assert tuple(result.model(*longer).shape) == (2, 10, 4)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, longer)
    assert ok, diff


class _Registers(torch.nn.Module):
    """Learned tokens (a class token and two registers) attended to through sdpa and
    ``nn.MultiheadAttention``; only the class token is read out."""

    def __init__(self, mha: bool) -> None:
        super().__init__()
        self.mha = mha
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.registers = torch.nn.Parameter(torch.randn(1, 2, 16))
        self.qkv, self.proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = torch.cat([self.cls.expand(b, -1, -1), self.registers.expand(b, -1, -1), x], 1)
        if self.mha:
            a = self.attn(t, t, t, need_weights=False)[0]
        else:
            q, k, v = self.qkv(t).view(b, -1, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            a = self.proj(a.transpose(1, 2).reshape(b, -1, 16))
        return a[:, 0]


@pytest.mark.parametrize("mha", [False, True])
def test_learned_key_tokens_are_lossy_through_the_attention_softmax(mha):
    """Removing a register token changes the softmax over the keys. Only the class token's
    constant index used to keep the registers (it pinned the whole token dim); with it pinning
    its own position, the attention rules say the keys are normalised over."""
    model = _Registers(mha).eval()
    x = (torch.randn(2, 5, 16),)
    analysis = secateurs.analyze(model, x)
    group = _groups_of(analysis, "registers", 1)[0]
    assert group.is_lossy and not group.pinned.any()
    assert any("normalises over the keys" in r for r in group.lossy_reasons)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("registers").shape[1] == 2


class _TakeChannels(torch.nn.Module):
    """``h[:, [5, 9]]``: constant positions after prunable channels, so the list itself has to
    change (``untraceable``: through torch.export's lifted constant)."""

    def __init__(self, untraceable: bool) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.untraceable:
            for _ in range(x.shape[-1] // 8):
                x = x * 1.0
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h[:, [5, 9]].sum(-1, keepdim=True)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_constant_index_list_after_removed_channels_is_rewritten(tracer):
    model = _TakeChannels(untraceable=tracer == "export").eval()
    with torch.no_grad():
        model.fc1.weight[:5] *= 1e-3  # channels 0-4, before the taken ones, go first
    x = (torch.randn(3, 8),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer.startswith(tracer)
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("fc1.weight").shape[0] == 16 - 7
    _runs_at_batch(result.model, x, 5)


class _SizeTupleHeads(torch.nn.Module):
    """BERT-era ``transpose_for_scores`` (PVTv2, many HF vision/audio models):
    ``t.view(t.size()[:-1] + (heads, head_size))``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.size()[:-1] + (4, 8)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.o(a.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1))


def test_a_view_to_a_size_tuple_sum_is_rewritten():
    """The literal ``(heads, head_size)`` of ``t.size()[:-1] + (heads, head_size)`` was never
    rewritten: the safety net pinned every attention group (MACs kept 1.0)."""
    model = _SizeTupleHeads().eval()
    x = (torch.randn(2, 8, 32),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("o.weight").shape[1] == 16
    _runs_at_batch(result.model, x, 3)


# ---------------------- batch x heads: a reshape of several dims into several (WavLM, nn.MHA)


def _untraceable(x: torch.Tensor) -> torch.Tensor:
    for _ in range(x.shape[-1] // 32):  # a Python loop over a size: torch.export, not FX
        x = x * 1.0
    return x


class _GatedRelPosAttention(torch.nn.Module):
    """WavLM's attention: a gated relative-position bias — ``hidden.view(B, T, H, -1)``, a
    per-head gate from ``gru_rel_pos_linear``, times a per-head bias ``view(B * H, T, T)`` —
    passed as the ``attn_mask`` of ``F.multi_head_attention_forward`` with separate q/k/v
    weights, which reshapes ``(T, B, E) -> (T, B * H, D)``."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 8) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.pre = torch.nn.Linear(dim, dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            torch.nn.Linear(dim, dim) for _ in range(4))
        self.gru_rel_pos_linear = torch.nn.Linear(dim // heads, 8)
        self.gru_rel_pos_const = torch.nn.Parameter(torch.ones(1, heads, 1, 1))
        self.rel_bias = torch.nn.Parameter(torch.randn(heads, tokens, tokens))
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.pre(_untraceable(x))
        b, t, _ = hidden.shape
        pos = self.rel_bias.unsqueeze(0).repeat(b, 1, 1, 1).view(b * self.heads, t, t)
        gated = hidden.view(hidden.shape[:-1] + (self.heads, -1)).permute(0, 2, 1, 3)
        proj = self.gru_rel_pos_linear(gated).view(gated.shape[:-1] + (2, 4)).sum(-1)
        gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0
        bias = (gate.view(b * self.heads, -1, 1) * pos).view(-1, t, t)
        q = hidden.transpose(0, 1)
        y, _ = torch.nn.functional.multi_head_attention_forward(
            q, q, q, self.dim, self.heads, torch.empty([0]),
            torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)), None, None,
            False, 0.0, self.out_proj.weight, self.out_proj.bias, self.training, None, False,
            attn_mask=bias, use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight)
        return self.fc(y.transpose(0, 1))


class _SequenceFirstMHA(torch.nn.Module):
    """``nn.MultiheadAttention`` over ``(T, B, E)``, traced by torch.export: its packed
    in-projection is ``unflatten(-1, (3, E))``, then ``view(T, B * H, D)``."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(dim, dim)
        self.mha = torch.nn.MultiheadAttention(dim, heads)
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.pre(_untraceable(x)).transpose(0, 1)
        y, _ = self.mha(hidden, hidden, hidden, need_weights=False)
        return self.fc(y.transpose(0, 1))


_MERGED = {"wavlm_gated_bias": _GatedRelPosAttention, "mha": _SequenceFirstMHA}


def _heads_kept(name: str, report: secateurs.PruneReport, params: dict[str, tuple]) -> int:
    """Attention heads left: the per-head gate constant's (WavLM), else the heads row's units."""
    if name == "wavlm_gated_bias":
        return params["gru_rel_pos_const"][1]
    rows = [g for g in report.groups if g.units_before == 4 and "out_proj.weight[1]" in g.members]
    assert len(rows) == 1, [(g.units_before, g.members) for g in report.groups]
    return rows[0].units_after


@pytest.mark.parametrize("name", sorted(_MERGED))
def test_batch_times_heads_reshape_under_export_prunes_heads(name):
    """``(T, B, E) -> (T, B * H, D)`` was composed whole and factored into ``(B * H, D)``:
    ``B * H`` positions were batch atoms, every head was merged into the head-dim factor, so
    heads never pruned; WavLM's per-head ``view(B, T, H, -1)`` of the same channels then made a
    composite contain itself and pinned the head dims too. Cut at the common refinement
    ``(B, H, D)``, heads are units and prune exactly."""
    torch.manual_seed(0)
    model = _MERGED[name]().eval()
    x = (torch.randn(2, 8, 32),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer.startswith("export")
    assert result.report.exact is True and not result.report.repairs
    assert not any("incompatible ways" in (g.pinned or "") for g in result.report.groups)
    params = {k: tuple(v.shape) for k, v in result.model.named_parameters()}
    assert _heads_kept(name, result.report, params) == 2
    xs = torch.randn(3, 8, 32)
    with torch.no_grad():  # B * H follows the batch: no sample mixes with another
        torch.testing.assert_close(result.model(xs)[:2], result.model(xs[:2]))


@pytest.mark.parametrize("name", sorted(_MERGED))
def test_batch_times_heads_reshape_prunes_heads_through_onnx(name):
    """The same attention exported by the TorchScript exporter with a dynamic batch: ONNX
    ``Reshape`` targets computed from ``Shape`` (``B * H``) are rewritten and stay dynamic."""
    import io

    import onnx
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _MERGED[name]().eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, 8, 32),), buf, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    result = secateurs.prune_onnx(onnx.load_from_string(buf.getvalue()), ratio=0.5,
                                  round_to=1, verify=True, input_shapes={"x": [2, 8, 32]})
    assert result.report.exact is True and not result.report.repairs
    onnx.checker.check_model(result.model, full_check=True)
    params = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert _heads_kept(name, result.report, params) == 2
    session = ort.InferenceSession(result.model.SerializeToString())
    xs = np.random.default_rng(0).standard_normal((3, 8, 32)).astype(np.float32)
    full = session.run(None, {"x": xs})[0]
    each = np.concatenate([session.run(None, {"x": xs[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(full, each, rtol=1e-4, atol=1e-5)


class _CosineAttention(torch.nn.Module):
    """Swin V2's scaled cosine attention (``F.normalize`` of q and k: a norm over the head
    dim, ``clamp_min(eps)``, a division) with a per-head logit scale, and an xIELU-style MLP
    activation (``expm1``, Apertus)."""

    def __init__(self, untraceable: bool) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.qkv, self.proj = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
        self.logit_scale = torch.nn.Parameter(torch.rand(4, 1, 1))
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.untraceable:
            for _ in range(x.shape[-1] // 32):
                x = x * 1.0
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.nn.functional.normalize(q, dim=-1) @ \
            torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
        a = (scores * self.logit_scale.clamp(max=4.6).exp()).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        h = self.fc1(x)
        return x + self.fc2(torch.where(h > 0, h * h, torch.expm1(h.clamp_max(0.0))))


@pytest.mark.parametrize("untraceable", [False, True])
def test_cosine_attention_heads_and_expm1_prune(untraceable):
    """The normalising division was singular (its divisor ``clamp_min(norm, eps)`` through
    ``expand_as`` was not known to be > 0), so Swin V2's heads were lossy; ``expm1`` and
    ``clamp_min``/``clamp_max`` had no rule (opaque, the MLP pinned)."""
    model = _CosineAttention(untraceable).eval()
    x = (torch.randn(2, 6, 32),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer.startswith("export" if untraceable else "fx")
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("logit_scale").shape[0] == 2  # heads went
    assert result.model.get_parameter("fc1.weight").shape[0] == 32
