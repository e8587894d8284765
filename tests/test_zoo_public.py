"""What the public-architecture look-alikes (``zoo/public_lookalikes.py``) must show beyond
mask-equivalence (which ``test_prune_zoo.py`` checks for every one): the right things pinned,
with a reason a user can read, and the structure a real checkpoint relies on kept intact."""

from __future__ import annotations

import pytest
import torch

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
