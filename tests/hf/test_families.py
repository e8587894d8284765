"""Every family buildable from a small transformers config (random weights, no hub): prune
heads and MLP, the pruned model equals the original with the removed slices zeroed, the
checked save reloads through the documented path with identical outputs, and the report
says what was not done.

One prune per family (cached for the module); the assertions are per family and per check.
Where a family's heads (or MLP) are pinned by an op-level cause owned by the rule table, the
"prunes heads" expectation is an ``xfail(strict=False)`` naming that cause; the round trip
and the report must hold for every family regardless.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402

from secateurs import zero_plan_slices  # noqa: E402
from secateurs.hf import PruneShortfall, from_pretrained_pruned, prune_hf, save_pretrained  # noqa: E402
from secateurs.hf.models import ZOO, example_inputs, output_tensor, tiny_model  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

# families whose heads the analysis cannot remove yet, and the op-level cause (the rule
# table's, not the HF layer's); the report must name it
HEADS_BLOCKED = {
    # (gptj/cohere's interleaved rotary, falcon's constant slot indices, gpt_bigcode's MQA
    # expand, qwen3/gemma3's per-head q/k norms and swin's bias table prune their heads now)
    "olmoe": "lossy",  # q/k RMSNorm over all heads at once: removing a head is lossy by nature
    "bloom": "",  # ALiBi slopes from arange over the head count
    "deepseek_v3": "multi-head latent attention",  # MLA left whole by the HF layer
    "convnext": "no heads",  # no attention at all: the report says so
    "resnet": "no heads",
    "mobilenet_v2": "no heads",
}
# families whose MLP the analysis cannot remove yet (MoE expert widths are pruned by
# secateurs.hf.moe since issue 12 item 3)
MLP_BLOCKED: dict[str, str] = {}
# families the analysis cannot trace at all yet (op-level rule fixes pending)
BLOCKED: dict[str, str] = {}  # (T5's binary torch.min got its rule in the rule table)


# the families the issue names run by default; the others (covered by test_prune_hf and
# test_save_load in depth) run with -m slow
NAMED = ("gptj", "bloom", "clip_vision", "siglip_vision", "gpt_neox", "stablelm", "distilbert",
         "modernbert", "gpt_bigcode", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3",
         "falcon", "cohere", "qwen3", "gemma3", "phi3", "swin", "convnext", "resnet", "t5",
         "deberta_v2", "albert", "gemma2", "mobilenet_v2", "regnet", "wav2vec2", "mobilevit",
         "siglip")
FAMILIES = [f if f in NAMED else pytest.param(f, marks=pytest.mark.slow) for f in ZOO]


@functools.cache
def _pruned(family: str):
    m = tiny_model(family)
    x = example_inputs(m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = prune_hf(m, x, heads=0.5, mlp=0.5)
    return m, x, r, [w for w in caught if issubclass(w.category, PruneShortfall)]


def _family(family: str):
    if family in BLOCKED:
        pytest.xfail(BLOCKED[family])
    return _pruned(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_is_mask_equivalent_and_reloads_identically(tmp_path, family):
    m, x, r, _ = _family(family)
    assert r.verified
    ref = zero_plan_slices(m, r.plan)
    want, got = output_tensor(ref, x), output_tensor(r.model, x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), float((got - want).abs().max())
    save_pretrained(r, tmp_path / "m")
    back = from_pretrained_pruned(tmp_path / "m")
    assert type(back).__name__ == type(m).__name__
    # identical tensors; the outputs equal up to the kernels' rounding (a tensor read from a
    # safetensors file may sit at another memory alignment, which picks another CPU code path)
    mine, theirs = r.model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.allclose(output_tensor(back, x), got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_prunes_heads(family):
    m, x, r, shortfalls = _family(family)
    rep = r.report["heads"]
    if family in HEADS_BLOCKED and rep.removed == 0:
        # what must hold already: nothing removed is said, with the cause
        assert rep.reasons and any(HEADS_BLOCKED[family] in why for why in rep.reasons), \
            rep.reasons
        assert any("heads=0.5 removed nothing" in str(w.message) for w in shortfalls)
        pytest.xfail(f"heads blocked by an op-level cause: {HEADS_BLOCKED[family]!r}")
    assert rep.removed > 0, rep.reasons
    assert r.model.config.to_dict() != m.config.to_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_prunes_mlp(family):
    m, x, r, shortfalls = _family(family)
    rep = r.report["mlp"]
    if family in MLP_BLOCKED and rep.removed == 0:
        assert any("mlp=0.5 removed nothing" in str(w.message) for w in shortfalls)
        pytest.xfail(MLP_BLOCKED[family])
    assert rep.removed > 0, rep.reasons
    assert r.params_after < r.params_before


# families whose convs keep counts the weights cannot tell (a depthwise or grouped conv's
# ``groups``, a per-channel GroupNorm's ``num_groups``): the plan's counts must reach the
# modules, or the safety net pins every such group (the report would hide a wrong apply)
CONV_COUNTS = ("mobilenet_v2", "regnet", "wav2vec2", "mobilevit")


@pytest.mark.parametrize("family", CONV_COUNTS)
def test_conv_counts_follow_the_plan(family):
    m, x, r, _ = _family(family)
    assert not r.repairs, [rep.reason for rep in r.repairs]
    changed = 0
    for name, mod in r.model.named_modules():
        if isinstance(mod, torch.nn.Conv1d | torch.nn.Conv2d):
            w = mod.weight
            assert mod.out_channels == w.shape[0] and mod.in_channels == w.shape[1] * mod.groups
            before = m.get_submodule(name)
            changed += mod.groups != before.groups
        elif isinstance(mod, torch.nn.GroupNorm):
            assert mod.num_channels == mod.weight.shape[0]
            assert mod.num_channels % mod.num_groups == 0
            changed += mod.num_groups != m.get_submodule(name).num_groups
    assert changed, "no group count changed: the plan removed no whole conv groups"


def test_plain_prune_keeps_the_run_time_batch_of_an_unfold():
    """MobileViT attends over ``batch x patch_area`` rows: ``view(B * P, N, -1, d)`` with
    ``B * P`` computed at run time. That dim holds batch and spatial atoms, so it is no
    channel dim and stays computed; made the example's constant, the pruned model ran only at
    the example batch and the safety net pinned every attention group."""
    from secateurs import prune

    m = tiny_model("mobilevit")
    x = example_inputs(m)
    r = prune(m, x, ratio=0.5, verify=True)
    assert r.report.exact and not r.report.repairs, [rep.reason for rep in r.report.repairs]
    assert any(k.endswith("attention.query.weight") for k in r.plan.removed)
    ref = zero_plan_slices(m, r.plan)
    for batch in (1, 3):
        xb = example_inputs(m, batch=batch)
        want, got = output_tensor(ref, xb), output_tensor(r.model, xb)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (batch, float((got - want).abs().max()))


def test_interleaved_rotary_pairs_are_head_dims_not_heads():
    """An interleaved rotary pair ``(2j, 2j + 1)`` of every head is a run of two consecutive
    dims of the projection: it was named a head, so GPT-J's report counted 4 pair units per
    layer among its heads and the heads ratio could take pairs for heads. A run shorter than
    the head dim is a head dim."""
    m, _, r, _ = _family("gptj")
    cfg = m.config
    assert r.report["heads"].units == cfg.n_layer * cfg.n_head


def test_codegen_heads_go_within_its_model_parallel_shards():
    """CodeGen interleaves its fused qkv over ``mp_num = 4`` hard-coded shards; the heads
    space factors as (shard, head in shard) and the ratio took whole shards first, which the
    HF code (``local_dim = embed_dim // mp_num``) cannot read: the check failed and heads were
    left out. The retry keeps the outer factor whole: every shard loses the same heads."""
    m, x, r, _ = _family("codegen")
    assert r.verified and r.report["heads"].removed > 0
    assert r.model.config.n_head == m.config.n_head // 2
    heads = r.report["heads"]  # counted as heads (shard x head in shard), not factor units
    assert heads.units == m.config.n_layer * m.config.n_head
    assert heads.removed == heads.asked == heads.units // 2 and not heads.reasons
    assert any("model-parallel shards" in n for n in r.notes)
    ref = zero_plan_slices(m, r.plan)
    assert torch.allclose(output_tensor(r.model, x), output_tensor(ref, x), atol=1e-5)


@pytest.mark.parametrize("family", ZOO)
def test_tiny_model_output_is_alive(family):
    """Every check above compares outputs: a tiny model whose output is ~0 (HF's std-0.02 init
    in a deep narrow CNN) would pass them all whatever the plan did."""
    m = tiny_model(family)
    assert float(output_tensor(m, example_inputs(m)).std()) > 1e-3
