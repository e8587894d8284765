"""What the public-architecture look-alikes (``zoo/public_lookalikes.py``) must show beyond
mask-equivalence (which ``test_prune_zoo.py`` checks for every one): the right things pinned,
with a reason a user can read, and the structure a real checkpoint relies on kept intact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs
from secateurs import zoo


def _prune(name: str, **kwargs):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=0.5, **kwargs)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    return model, x, result, ok, diff


def _reasons(result) -> list[str]:
    return [row.pinned for row in result.report.groups if row.pinned]


def test_eca_conv_across_channels_pins_them_with_the_conv_named() -> None:
    _, _, result, ok, _ = _prune("eca_channel_conv")
    assert ok and result.report.macs_after == result.report.macs_before
    assert "spatial dim of conv 'e1_conv' (e1.conv: Conv1d)" in _reasons(result)


def test_cbam_mean_over_channels_is_lossy_not_exact() -> None:
    model, x, exact, ok, _ = _prune("cbam_attention")
    assert ok
    # the residual channels feed mean/amax over C: kept in exact mode, only the MLP shrinks
    shapes = {k: v.shape for k, v in exact.model.state_dict().items()}
    assert shapes["c1.0.weight"][0] == 32
    assert shapes["a1.mlp.0.weight"][0] < 8
    assert any("reduced by reduce 'mean'" in r for r in _reasons(exact))
    lossy = secateurs.prune(model, x, ratio=0.5, allow_lossy=True)
    assert lossy.model.state_dict()["c1.0.weight"].shape[0] < 32


@pytest.mark.parametrize("allow_lossy", [False, True])
def test_tied_embedding_stays_tied(allow_lossy: bool) -> None:
    entry = zoo.get("gpt2_tied")
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=0.5, allow_lossy=allow_lossy)
    pruned = result.model
    assert pruned.lm_head.weight is pruned.wte.weight
    assert pruned.wte.weight.shape[0] == 50  # vocabulary rows are addressed by index
    # no group needed the safety net: with the hidden size pruned and whole heads removed,
    # `view(B, T, h, C // h)` computes C from the pruned width, so the apply writes the kept
    # head dim as a constant (it was left as computed: 16 // 4 = 4 for head dim 8)
    assert not result.report.repairs, result.report.repairs
    if allow_lossy:
        assert pruned.wte.weight.shape[1] < 32
        assert pruned.get_submodule("blocks.0.qkv").weight.shape[0] == 3 * 16  # 2 heads x 8
    with torch.no_grad():
        assert pruned(torch.randint(0, 50, (3, 12))).shape == (3, 12, 50)


def test_talking_heads_linear_over_heads_is_sliced_both_ways() -> None:
    _, _, result, ok, diff = _prune("cait_talking_heads")
    assert ok, diff
    attn = result.model.a1
    heads = attn.proj_l.weight.shape[0]
    assert heads < 4 and attn.proj_l.weight.shape == (heads, heads)
    assert attn.proj_w.weight.shape == (heads, heads)
    # qkv = 3 x heads x head_dim
    assert attn.qkv.weight.shape[0] % (3 * heads) == 0


def test_pixel_shuffle_removes_whole_sub_pixel_blocks() -> None:
    _, _, result, ok, diff = _prune("edsr_pixel_shuffle")
    assert ok, diff
    shapes = {k: tuple(v.shape) for k, v in result.model.state_dict().items()}
    c = shapes["tail.weight"][1]
    assert c < 16 and shapes["up.0.weight"][0] == 4 * c  # r * r = 4 channels per output one
    assert shapes["head.weight"][1] == 12  # the unshuffled image channels stay
    reasons = _reasons(result)
    assert any("sub-pixel position of" in r for r in reasons)
    assert not any("no channel rule" in r for r in reasons)


def test_lstm_input_features_prune_and_the_hidden_state_stays() -> None:
    _, _, result, ok, diff = _prune("crnn_lstm")
    assert ok, diff
    rnn = result.model.rnn
    shapes = {k: tuple(v.shape) for k, v in result.model.state_dict().items()}
    assert rnn.input_size < 128 and shapes["rnn.weight_ih_l0"] == (128, rnn.input_size)
    assert shapes["rnn.weight_ih_l0_reverse"] == (128, rnn.input_size)
    assert shapes["rnn.weight_hh_l0"] == (128, 32)  # recurrent: kept
    assert any("hidden state of" in r for r in _reasons(result))
    with torch.no_grad():  # the module's cached weight list follows the sliced weights
        assert result.model(torch.randn(2, 1, 16, 20)).shape == (2, 20, 11)


def test_every_lookalike_runs_at_another_batch_size() -> None:
    for name in zoo.names("public-lookalike"):
        entry = zoo.get(name)
        model, x = entry.build(), entry.example_inputs()
        pruned = secateurs.prune(model, x, ratio=0.5).model
        batch3 = tuple(torch.cat([t] * 3) for t in x)
        with torch.no_grad():
            out, ref = pruned(*batch3), model(*batch3)
        assert out.shape == ref.shape, name


def test_unfolded_attention_keeps_its_run_time_rows() -> None:
    """MobileViT attends over ``batch x patch_area`` rows: the apply must leave that size as
    computed (batch and spatial atoms are no channel), or the pruned model runs only at the
    example batch and the net pins every attention group."""
    model, x, result, ok, diff = _prune("mobilevit_unfold")
    assert ok, diff
    assert not result.report.repairs, [r.reason for r in result.report.repairs]
    heads = result.model.get_submodule("vit.attn.query").weight.shape[0]
    assert heads < 32 and heads % 8 == 0  # whole heads of 8
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 16, 16)
        ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, (xb,))
        assert ok, (batch, diff)


# ---------------------------------------------------------------- zoo/timm_wild.py


def test_trace_time_constant_in_the_plan_is_verified_against_the_model() -> None:
    """``symbolic_trace`` freezes the timestep frequencies (computed from constants only) into
    ``_tensor_constant0``; the plan slices it with the embedding's features, and the contract's
    reference (the user's model, which recomputes it) used to fail with a KeyError."""
    model, x, result, ok, diff = _prune("unet_timestep")
    assert ok, diff
    assert "_tensor_constant0" in result.plan.removed
    for t in (0.0, 999.0):  # another timestep: other frequencies' phases
        ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan,
                                                     (x[0], torch.tensor([t])))
        assert ok, (t, diff)
    verified = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert verified.report.exact is True
    # a plan made for another model names tensors this one lacks: a clear error
    with pytest.raises(secateurs.InputError, match="does not have.*another model"):
        secateurs.zero_plan_slices(zoo.get("ghostnet_slice").build(), result.plan)


def test_a_static_export_is_named_and_warned(caplog) -> None:
    """A batch-1 example of CoaT cannot keep a symbolic batch under torch.export: the pruned
    program then runs at that batch only, and the report and the log say so; nor can a
    batch-2 example keep batch 1."""
    model = zoo.get("coat_conv_relpos").build()
    x = (torch.randn(1, 3, 16, 16),)
    with caplog.at_level("WARNING", logger="secateurs.graph.fx_trace"):
        result = secateurs.prune(model, x, ratio=0.5)
    assert result.report.tracer == "export (static shapes)"
    assert "runs at the example's input shapes [(1, 3, 16, 16)] only" in caplog.text
    assert any("runs at the example inputs' shapes only" in n for n in result.report.notes)
    assert "export (static shapes)" in result.report.table()
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, diff
    # from a batch-2 example the batch stays symbolic, but torch.export's program guards
    # `batch > 1`: the pruned program refuses batch 1 as well, and the report says so
    with caplog.at_level("WARNING", logger="secateurs.graph.fx_trace"):
        dynamic = secateurs.prune(model, zoo.get("coat_conv_relpos").example_inputs(),
                                  ratio=0.5)
    assert dynamic.report.tracer == "export (batch >= 2)"
    assert "refuses batch 1 (Guard failed" in caplog.text
    assert any("refuses batch 1" in n for n in dynamic.report.notes)
    with pytest.raises(AssertionError, match="Guard failed"):
        dynamic.model(torch.randn(1, 3, 16, 16))
    assert dynamic.model(torch.randn(5, 3, 16, 16)).shape == (5, 10)


def test_uneven_head_splits_prune_per_split() -> None:
    """CoaT splits v's channels by head groups of 2, 3 and 3 heads into depthwise convs of
    kernel 3, 5 and 7: removing a head shrinks its split and its conv only."""
    model, x, result, ok, diff = _prune("coat_conv_relpos")
    assert ok, diff
    convs = result.model.get_submodule("attn.crpe.convs")
    widths = [convs.get_submodule(str(i)).weight.shape[0] for i in range(3)]
    kept = result.model.get_submodule("attn.qkv").weight.shape[0] // 3
    assert sum(widths) == kept < 32 and all(w % 4 == 0 for w in widths)  # whole heads of 4


def test_cosine_attention_heads_slice_logit_scale_and_position_mlp() -> None:
    """Swin V2: each head has a logit scale and one output of the position-bias MLP; q/k are
    normalised over the head dim, so head dims stay whole (lossy) and heads prune."""
    _, _, result, ok, diff = _prune("swinv2_cosine")
    assert ok, diff
    attn = result.model.get_submodule("blocks.0.attn")
    heads = attn.logit_scale.shape[0]
    assert heads < 4
    assert attn.get_submodule("cpb_mlp.2").weight.shape[0] == heads
    assert attn.qkv.weight.shape[0] == 3 * heads * 8  # head dim 8 kept
    assert attn.q_bias.shape[0] == heads * 8


def test_cross_covariance_head_dims_are_lossy() -> None:
    """XCiT's softmax runs over head-dim channels (a d x d attention), so removing one changes
    the others: the head-dim groups are lossy, whole heads (and their temperature) prune."""
    model, x, result, ok, diff = _prune("xcit_xca")
    assert ok, diff
    attn = result.model.get_submodule("blocks.0.attn")
    heads = attn.temperature.shape[0]
    assert heads < 4 and attn.qkv.weight.shape[0] == 3 * heads * 8
    analysis = secateurs.analyze(model, x)
    analysis = getattr(analysis, "analysis", analysis)
    head_dims = [g for g in analysis.groups if g.size == 8
                 and any(m.param == "blocks.0.attn.qkv.weight" for m in g.members)]
    assert head_dims and all(g.is_lossy for g in head_dims)


def test_ghost_and_res2net_splits_follow_the_kept_channels() -> None:
    """GhostNet slices ``cat([primary, cheap])[:, :oup]``; Res2Net splits by an int width that
    no longer fits once the scales keep different counts (the apply writes the sizes)."""
    _, _, ghost, ok, diff = _prune("ghostnet_slice")
    assert ok, diff
    cheap = ghost.model.get_submodule("b2.ghost1.cheap.0")
    assert cheap.groups == cheap.weight.shape[0] < 24  # still depthwise over what is kept
    _, _, res2, ok, diff = _prune("res2net_split")
    assert ok, diff
    splits = [n for n in res2.model.graph.nodes if n.target is torch.split]
    kept = res2.model.get_submodule("l1.conv1.0").weight.shape[0]
    sizes = splits[0].args[1]
    assert isinstance(sizes, (list, tuple)) and sum(sizes) == kept < 32


def test_weights_used_more_than_once_are_sliced_once() -> None:
    """One conv head serves every FPN level, one encoder both Siamese inputs, one conv weight
    the encoder and (transposed) the decoder, one block every loop step: each is sliced once,
    consistently for all its uses."""
    _, _, fpn, ok, diff = _prune("fpn_shared_head")
    assert ok, diff
    tower = fpn.model.get_submodule("tower.0").weight.shape
    assert tower[0] == tower[1] < 16  # the FPN width, shared by every level and the head
    assert fpn.model.get_submodule("logits").weight.shape[:2] == (12, tower[0])
    _, _, tied, ok, diff = _prune("tied_autoencoder")
    assert ok, diff
    w = tied.model.get_submodule("enc2").weight
    assert w.shape[0] < 24 and w.shape[1] < 16
    assert tied.model.dec1_bias.shape[0] == w.shape[1]  # the decoder's output = enc2's input
    graph = tied.model.graph
    read = [n for n in graph.nodes if n.op == "get_attr" and n.target == "enc2.weight"]
    assert [u.target for n in read for u in n.users] == [F.conv_transpose2d]
    assert any(n.op == "call_module" and n.target == "enc2" for n in graph.nodes)  # one tensor
    _, _, looped, ok, diff = _prune("looped_block")
    assert ok, diff
    assert looped.model.get_submodule("fc1").weight.shape[0] < 64


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_sdpa_enable_gqa_prunes_kv_heads_with_their_groups(ratio: float) -> None:
    """``scaled_dot_product_attention(enable_gqa=True)``: query head i reads kv head
    i // (Hq / Hkv). The query heads factor as (kv head, group member): the pruned model keeps
    equal groups, and its per-head bias follows the query heads (it used to be opaque: every
    attention channel pinned)."""
    entry = zoo.get("sdpa_gqa")
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=ratio)
    for batch in (1, 3):
        xb = (torch.randn(batch, 8, 12),)
        ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, xb)
        assert ok, (batch, diff)
    pruned = result.model
    q_rows, k_rows = pruned.q.weight.shape[0], pruned.k.weight.shape[0]
    heads_q = pruned.head_bias.shape[0]
    head_dim = q_rows // heads_q
    assert q_rows == heads_q * head_dim and k_rows % head_dim == 0
    kv = k_rows // head_dim
    assert heads_q % kv == 0 and pruned.v.weight.shape[0] == k_rows
    assert result.report.macs_after < result.report.macs_before
    assert not any("enable_gqa" in row.pinned for row in result.report.groups)


# ---------------------------------------------------------------- zoo/mixers.py


def test_mamba_state_from_zeros_prunes_the_inner_width() -> None:
    """transformers' Mamba slow path starts its scan from ``zeros(B, inner, state)``: filled
    with one value, so the inner width and the state size prune through it (the apply writes
    the new sizes); it used to pin both, and Mamba kept 93% of its MACs."""
    model, x, result, ok, diff = _prune("mamba_ssm")
    assert ok, diff
    inner = next(r for r in result.report.groups if "mixers.0.A_log[0]" in r.members)
    assert inner.units_after < inner.units_before and not inner.pinned
    assert result.report.macs_kept < 0.6
    assert not any("zeros" in r for r in _reasons(result))


class _Written(nn.Module):
    """A zeros buffer written in place (``add_`` on it, ``mul_`` through a view of it): its
    positions are no longer all alike, so its dims must stay."""

    def __init__(self, through_view: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.through_view = through_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        buf = x.new_zeros(x.shape[0], 16)  # symbolic_trace records the in-place calls
        buf.add_(h)
        if self.through_view:
            buf[:, :4].mul_(3.0)
        return self.b(buf)


@pytest.mark.parametrize("through_view", [False, True])
def test_a_zeros_buffer_written_in_place_keeps_its_positions(through_view: bool) -> None:
    model = _Written(through_view).eval()
    x = torch.randn(3, 8)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer == "fx"
    assert result.report.exact is True
    assert any("zeros" in r for r in _reasons(result))


class _Recurrent(nn.Module):
    """An Elman RNN unrolled over 4 steps from ``zeros`` / ``x.new_zeros`` / ``full`` initial
    states (varargs, a tuple and a list of sizes)."""

    def __init__(self, init: str) -> None:
        super().__init__()
        self.init = init
        self.inp, self.rec, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.init == "varargs":
            h = torch.zeros(b, 16)
        elif self.init == "tuple":
            h = x.new_zeros((b, 16))
        else:
            h = torch.full([b, 16], 0.5)
        for t in range(4):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.out(h)


@pytest.mark.parametrize("init", ["varargs", "tuple", "list"])
def test_a_filled_initial_state_follows_the_pruned_width(init: str) -> None:
    model = _Recurrent(init).eval()
    x = torch.randn(2, 4, 6)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact is True
    assert result.report.macs_kept < 0.7
    y = result.model(torch.randn(5, 4, 6))  # another batch: the batch size stays symbolic
    assert tuple(y.shape) == (5, 3)


# ---------------------------------------------------------------- zoo/foundation.py


def test_interpolated_position_grid_keeps_its_rows() -> None:
    """DINOv2 resizes its position-embedding grid (a parameter reshaped to [1, C, 4, 4])
    bicubically to the input's grid: every output position mixes input rows, so the grid's
    rows stay (the resize pins its input's spatial dims), where the safety net used to find
    them "not mask-equivalent" and pin them after the fact."""
    _, _, result, ok, diff = _prune("dinov2_registers")
    assert ok, diff
    assert not result.report.repairs, [r.reason for r in result.report.repairs]
    assert any("spatial dim of resize" in r for r in _reasons(result))
    assert result.report.macs_kept < 0.6


def test_batch_times_heads_merge_from_a_batch_one_example() -> None:
    """SAM's attention reshapes q/k/v to ``(3, b * heads, tokens, d)``. From a batch-1
    example that merged dim looks like a heads-only channel dim, and the apply froze
    ``b * heads`` into the example's constant: the pruned model failed at any other batch and
    the safety net pinned the attention. A size read from a dim 0 now stays computed (or is
    inferred, -1, where its dim shrank)."""
    model, x, result, ok, diff = _prune("sam_encoder")
    assert ok, diff
    assert not result.report.repairs, [r.reason for r in result.report.repairs]
    assert result.report.macs_kept < 0.65
    big = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(result.model(big).shape, model(big).shape)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, (big,))
    assert ok, diff


class _WrittenByOut(nn.Module):
    """``torch.mul(h, 2, out=buf)``: the zeros buffer is written through ``out=``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buf = x.new_zeros(x.shape[0], 16)
        torch.mul(self.a(x), 2.0, out=buf)
        return self.b(buf)


def test_a_zeros_buffer_written_through_out_keeps_its_positions() -> None:
    model = _WrittenByOut().eval()
    x = torch.randn(3, 8)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer == "fx" and result.report.exact is True
    assert any("new_zeros" in r for r in _reasons(result))
