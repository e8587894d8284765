"""MoE layers (``secateurs.hf.moe``): expert widths and whole experts, per family that
transformers builds from a config (random weights, no hub).

Contract: width pruning is mask-equivalent as usual (the removed slices zeroed); removing
experts changes the routing, so the reference is the original with the removed slices zeroed
*and the removed experts' router logits at -inf* (``moe.expert_reference``): they are never
chosen and take no probability mass.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402

from secateurs.errors import InputError  # noqa: E402
from secateurs.hf import PruneShortfall, from_pretrained_pruned, prune_hf, save_pretrained  # noqa: E402
from secateurs.hf.models import example_inputs, output_tensor, tiny_model  # noqa: E402
from secateurs.hf.moe import expert_reference, moe_blocks  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

# 3-D experts as recent transformers write them: concatenated gate_up (Mixtral, Qwen3-MoE),
# transposed + interleaved + biases (GPT-OSS), shared expert (Qwen2-MoE), dense first layer
# and sigmoid router with correction bias (DeepSeek-V3), OLMoE, PhiMoE (its own router)
MOE = ("mixtral", "gpt_oss", "qwen3_moe", "qwen2_moe", "olmoe", "phimoe", "deepseek_v3", "ernie4_5_moe",
       "hunyuan_v1_moe", "llama4_text")


@functools.cache
def _pruned(family: str):
    m = tiny_model(family)
    x = example_inputs(m)
    r = prune_hf(m, x, mlp=0.5, experts=2)
    return m, x, r


@pytest.mark.parametrize("family", MOE)
def test_experts_and_widths_pruned_reference_equal_and_reload(tmp_path, family):
    m, x, r = _pruned(family)
    before, after = moe_blocks(m), moe_blocks(r.model)
    assert before and len(after) == len(before)
    for b0, b1 in zip(before, after):
        assert b1.num_experts == b0.num_experts - 2
        assert b1.inter == b0.inter // 2
        for name in b1.expert_tensors:
            assert r.model.get_parameter(name).shape[0] == b1.num_experts
        for name in b1.router_tensors:  # biases, [E] or [1, E] (ERNIE 4.5's MoeStatics)
            t = dict(r.model.named_parameters()) | dict(r.model.named_buffers())
            assert t[name].shape[-1] == b1.num_experts
    assert r.report["experts"].removed == 2 * len(before)
    assert r.report["mlp"].removed >= len(before) * (before[0].inter // 2)
    assert r.verified
    # the contract for removed experts: the original never routing to them
    want, got = output_tensor(expert_reference(m, r.plan), x), output_tensor(r.model, x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), float((got - want).abs().max())
    save_pretrained(r, tmp_path / "m")
    back = from_pretrained_pruned(tmp_path / "m")
    cfg = back.config
    assert min(v for k, v in vars(cfg).items() if k in ("num_experts", "num_local_experts",
                                                         "n_routed_experts", "moe_num_experts")) \
        == before[0].num_experts - 2
    assert torch.equal(output_tensor(back, x), got)


def test_width_alone_is_mask_equivalent():
    from secateurs import zero_plan_slices

    m = tiny_model("qwen3_moe")
    x = example_inputs(m)
    r = prune_hf(m, x, heads=0.0, mlp=0.25)
    assert "moe" in r.plan.meta["hf"] and r.plan.meta["hf"]["moe"]["experts"] == [4, 4]
    assert r.model.config.moe_intermediate_size == 24
    want, got = output_tensor(zero_plan_slices(m, r.plan), x), output_tensor(r.model, x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_macs_kept_counts_the_experts_narrower_width():
    """The report's MACs after pruning are those of the pruned model traced afresh: the
    routed experts' projections (``grouped_mm``, sliced by the MoE selection, not by the
    channel groups) shrink with their width (Mixtral had read 0.878 where it kept 0.54)."""
    from secateurs.hf import analyze_hf
    from secateurs.passes.cost import count_macs

    m = tiny_model("mixtral")
    x = example_inputs(m)
    r = prune_hf(m, x, heads=0.5, mlp=0.5, experts=1)
    graph = analyze_hf(r.model, x).analysis.graph
    assert r.macs_after == count_macs(graph, lambda v: graph.values[v].shape)
    assert r.macs_kept < 0.6


def test_expert_width_stays_a_multiple_of_grouped_mm_rows():
    """HF's experts run through ``torch._grouped_mm``, which takes rows of a multiple of 16
    bytes only: a kept width of 54 fp32 values made the pruned model raise "strides should be
    multiple of 16 bytes", and the width was left out of the prune."""
    m = tiny_model("mixtral")
    x = example_inputs(m)
    r = prune_hf(m, x, heads=0.0, mlp=0.44)
    assert r.model.config.intermediate_size == 56 and r.report["mlp"].removed == 80
    assert r.verified


def test_reap_removes_the_expert_that_contributes_nothing():
    """REAP scores an expert by router probability x output norm on its routed tokens: an
    expert whose down projection is zero scores 0 and goes first."""
    m = tiny_model("mixtral")
    x = example_inputs(m)
    with torch.no_grad():
        for b in moe_blocks(m):
            m.get_submodule(b.experts).down_proj[1].zero_()
    r = prune_hf(m, x, heads=0.0, mlp=0.0, experts=1)
    removed = r.plan.meta["hf"]["moe"]["removed_experts"]
    assert removed and all(idx == [1] for idx in removed.values())


def test_experts_shortfall_is_reported():
    m = tiny_model("mixtral")  # 4 experts, top-2: at most 2 can go
    x = example_inputs(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruneShortfall)
        r = prune_hf(m, x, heads=0.0, mlp=0.0, experts=3)
    rep = r.report["experts"]
    assert (rep.asked, rep.removed) == (6, 4)
    assert any("top-k = 2" in why for why in rep.reasons)
    assert r.model.config.num_local_experts == 2


def test_experts_on_a_dense_model_warn():
    m = tiny_model("llama")
    x = example_inputs(m)
    with pytest.warns(PruneShortfall, match="no MoE layers"):
        r = prune_hf(m, x, heads=0.0, mlp=0.0, experts=0.5)
    assert r.report["experts"].removed == 0


def test_experts_argument_checked():
    m = tiny_model("mixtral")
    with pytest.raises(InputError, match="experts must be"):
        prune_hf(m, example_inputs(m), experts=1.5)
    with pytest.raises(InputError, match="expert_importance"):
        prune_hf(m, example_inputs(m), experts=1, expert_importance="magic")


def test_mla_attention_is_left_whole_with_a_reason():
    """DeepSeek-V3: MLP, shared and routed experts prune; multi-head latent attention is
    pinned by the HF layer with a reason, its low-rank widths are not called MLP, and the
    config alone describes the result."""
    m = tiny_model("deepseek_v3")
    x = example_inputs(m)
    with pytest.warns(PruneShortfall, match="heads=0.5 removed nothing"):
        r = prune_hf(m, x, heads=0.5, mlp=0.5, experts=1)
    rep = r.report["heads"]
    assert rep.removed == 0 and r.report["mlp"].removed > 0
    assert r.report["experts"].removed == 1  # layer 0 is dense (first_k_dense_replace)
    assert any("multi-head latent attention" in why for why in rep.reasons)
    attn = {n: p.shape for n, p in m.named_parameters() if ".self_attn." in n}
    assert {n: p.shape for n, p in r.model.named_parameters() if ".self_attn." in n} == attn
    assert r.model.config.num_attention_heads == m.config.num_attention_heads
    assert not any("lossy" in why for why in r.report["mlp"].reasons)
    assert not r.needs_loader


@pytest.mark.parametrize("family", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow),
                                    pytest.param("gpt_oss", marks=pytest.mark.slow)])
def test_meta_plan_applied_to_shards(tmp_path, family):
    """A plan made on meta (widths scored from the checkpoint, experts drawn at random) and
    applied shard by shard: transformers writes experts per expert (``experts.<e>.gate_proj``,
    Mixtral's ``block_sparse_moe.experts.<e>.w1``; GPT-OSS keeps 3-D tensors), which are
    dropped, renumbered and sliced like the fused tensors; the reloaded checkpoint equals the
    contract's reference, and the width choice equals the real-weights plan's."""
    from transformers import AutoModelForCausalLM

    from secateurs.hf.models import tiny_config
    from secateurs.hf.shards import checkpoint_score_context, meta_model, prune_checkpoint

    m = tiny_model(family)
    x = example_inputs(m)
    m.save_pretrained(tmp_path / "src")
    meta = meta_model(tiny_config(family))
    r = prune_hf(meta, x, heads=0.0, mlp=0.5, experts=1, expert_importance="random",
                 score_context=checkpoint_score_context(str(tmp_path / "src"), meta))
    prune_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), r.plan)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    want = output_tensor(expert_reference(m, r.plan), x)
    got = output_tensor(back, x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), float((got - want).abs().max())
    real = prune_hf(m, x, heads=0.0, mlp=0.5)
    by_block = r.plan.meta["hf"]["moe"]["by_block"]
    assert {b: v["neurons"] for b, v in by_block.items()} == \
        {b: v["neurons"] for b, v in real.plan.meta["hf"]["moe"]["by_block"].items()}


def test_generic_prune_shrinks_experts_through_the_grouped_mm_fallback() -> None:
    """Without ``prune_hf``: ``secateurs.prune`` on a traced Mixtral meets transformers'
    ``transformers::grouped_mm_fallback`` custom op (its fp32 CPU experts path, one ``mm``
    per expert). It was opaque and pinned the expert widths; it is ``_grouped_mm``'s product
    without the alignment rule, so the intermediate width prunes, exactly."""
    import secateurs

    model = tiny_model("mixtral")

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model.model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, use_cache=False).last_hidden_state

    ids = example_inputs(model)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = secateurs.prune(Hidden(), (ids,), ratio=0.5, verify=True)
    assert result.report.exact is True
    experts = [g for g in result.report.groups if "experts.gate_up_proj" in g.members
               and "down_proj" in g.members]
    assert experts and all(g.units_after < g.units_before and not g.pinned for g in experts)


@pytest.mark.parametrize("inter", [96, 32])
def test_experts_without_a_layout_flag_are_read_from_the_router_width(inter) -> None:
    """Llama 4's experts are ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` with no
    ``is_transposed``: read as the other layout, their width was never sliced while the report
    and the config said it was (96), or the wrong dim was sliced and the check dropped the
    whole MLP kind (32, where H = 2I)."""
    cfg = transformers.Llama4TextConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=inter, intermediate_size_mlp=96,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        attention_chunk_size=4, no_rope_layers=[1, 0], max_position_embeddings=64,
        use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    x = (torch.randint(3, 128, (2, 8)),)
    result = prune_hf(model, x, mlp=0.5)
    assert result.verified
    experts = result.model.model.layers[1].feed_forward.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 64, inter)  # 2 * inter / 2
    assert tuple(experts.down_proj.shape) == (4, inter // 2, 64)
    assert result.model.config.intermediate_size == inter // 2
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
