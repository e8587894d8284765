"""Hugging Face models from tiny configs: units found, mask-equivalence, config updates,
save/load round trip, GQA grouping, shard-by-shard application, meta analysis."""

from __future__ import annotations

import warnings

import pytest
import torch

from secateurs.errors import InputError

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from secateurs import zero_plan_slices  # noqa: E402
from secateurs.hf import analyze_hf, prune_hf, unit_counts  # noqa: E402
from secateurs.hf.models import FAMILIES, example_inputs, output_tensor, tiny_config, tiny_model  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


_out = output_tensor


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_equivalence_heads_head_dim_mlp(models, family):
    m, x = models[family], example_inputs(family)
    r = prune_hf(m, x, heads=0.5, mlp=0.3, head_dim=0.25)
    ref = zero_plan_slices(m, r.plan)
    assert torch.allclose(_out(r.model, x), _out(ref, x), atol=1e-5)
    cfg = r.model.config
    assert cfg.num_attention_heads == 2
    assert r.plan.meta["hf"]["head_dim_removed"] == 4
    assert r.macs_kept < 0.7
    counts = unit_counts(r.hf_analysis)
    assert counts["heads_groups"] == 2 and counts["mlp_groups"] == 2
    assert counts["mlp_units"] == 2 * 96


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_gqa_kv_head_takes_its_q_heads(models, family):
    m, x = models[family], example_inputs(family)
    hfa = analyze_hf(m, x)
    heads = hfa.of_kind("heads")
    assert len(heads) == 2 and all(u.size == 2 for u in heads)  # 2 kv heads per layer
    qk = [u for u in hfa.of_kind("head_dim") if u.sub == "qk"]
    assert len(qk) == 1 and qk[0].size == 8 and qk[0].dims_per_unit == 2  # rotary pairs
    r = prune_hf(m, x, heads=0.5)
    gid = heads[0].gid
    kv = int(r.removed_units[gid][0])
    layer = next(mm.param.split(".self_attn")[0] for mm in hfa.analysis.groups[gid].members)
    q_rm = r.plan.removed[f"{layer}.self_attn.q_proj.weight"][0]
    k_rm = r.plan.removed[f"{layer}.self_attn.k_proj.weight"][0]
    assert q_rm == list(range(kv * 32, kv * 32 + 32))  # q heads 2kv, 2kv+1 (16 dims each)
    assert k_rm == list(range(kv * 16, kv * 16 + 16))
    assert r.model.config.num_key_value_heads == 1
    assert r.model.model.layers[0].self_attn.num_key_value_groups == 2


def test_hidden_lossy_runs_with_consistent_shapes(models):
    m, x = models["llama"], example_inputs("llama")
    with pytest.raises(InputError, match="lossy"):
        prune_hf(m, x, hidden=0.25)
    r = prune_hf(m, x, hidden=0.25, allow_lossy=True)
    assert r.model.config.hidden_size == 48
    assert r.model.model.embed_tokens.weight.shape == (128, 48)
    assert r.model.model.norm.weight.shape == (48,)
    assert r.model.lm_head.weight.shape == (128, 48)
    assert _out(r.model, x).shape == (2, 8, 128)


def test_tied_embedding_stays_one_tensor():
    m = tiny_model("gpt2")
    x = example_inputs("gpt2")
    r = prune_hf(m, x, hidden=0.25, mlp=0.5, allow_lossy=True)
    assert r.model.lm_head.weight is r.model.transformer.wte.weight
    assert r.model.lm_head.weight.shape == (128, 48)
    assert _out(r.model, x).shape == (2, 8, 128)


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_save_pretrained_round_trip(tmp_path, models, family):
    m, x = models[family], example_inputs(family)
    r = prune_hf(m, x, heads=0.5 if family != "bert" else 0.0, mlp=0.5, importance="l1")
    r.model.save_pretrained(tmp_path)
    back = type(r.model).from_pretrained(tmp_path).eval()
    assert torch.allclose(_out(back, x), _out(r.model, x), atol=1e-5)


def test_blocks_and_shards_match_in_memory(tmp_path, models):
    from transformers import AutoModelForCausalLM

    from secateurs.hf.shards import prune_checkpoint

    m, x = models["llama"], example_inputs("llama")
    r = prune_hf(m, x, heads=0.5, mlp=0.5, hidden=0.25, allow_lossy=True, blocks=1)
    assert r.model.config.num_hidden_layers == 1 and len(r.model.model.layers) == 1
    m.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    info = prune_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), r.plan)
    assert info["shards"] > 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert torch.allclose(_out(back, x), _out(r.model, x), atol=1e-5)


def test_plan_made_on_meta_applies_to_shards(tmp_path, models):
    from transformers import AutoModelForCausalLM

    from secateurs.hf.shards import meta_model, prune_checkpoint

    m, x = models["qwen2"], example_inputs("qwen2")
    meta = meta_model(tiny_config("qwen2"))
    r = prune_hf(meta, x, heads=0.5, mlp=0.25, importance="random")
    assert all(p.is_meta for p in r.model.parameters())
    m.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    prune_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), r.plan)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    ref = zero_plan_slices(m, r.plan)
    assert torch.allclose(_out(back, x), _out(ref, x), atol=1e-5)


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_data_driven_criteria(models, importance):
    m, x = models["llama"], example_inputs("llama")
    r = prune_hf(m, x, heads=0.5, mlp=0.5, importance=importance)
    ref = zero_plan_slices(m, r.plan)
    assert torch.allclose(_out(r.model, x), _out(ref, x), atol=1e-5)


def test_meta_many_layers_unit_counts():
    cfg = tiny_config("llama", num_hidden_layers=32, hidden_size=128, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=256)
    from secateurs.hf.shards import meta_model

    hfa = analyze_hf(meta_model(cfg), (torch.zeros(1, 4, dtype=torch.long),))
    c = unit_counts(hfa)
    assert c["heads_groups"] == 32 and c["heads_units"] == 32 * 2
    assert c["mlp_groups"] == 32 and c["mlp_units"] == 32 * 256
    assert c["head_dim_qk_groups"] == 1 and c["head_dim_qk_units"] == 8  # 16 dims, rotary pairs
    assert c["head_dim_v_groups"] == 32 and c["hidden_units"] == 128


def test_an_attention_that_reshapes_to_its_own_embed_dim_prunes_heads() -> None:
    """XGLM (and the M2M100 era) ends its attention with ``attn_output.reshape(bsz, tgt_len,
    self.embed_dim)``: embed_dim stayed the dense width, the pruned attention failed and the
    safety net pinned every head group (0 of 4 heads removed)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.XGLMForCausalLM(transformers.XGLMConfig(
        vocab_size=64, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
        max_position_embeddings=32)).eval()
    x = (torch.randint(0, 64, (2, 8)),)
    result = prune_hf(model, x, heads=0.5, mlp=0.5)
    assert result.verified and not result.repairs
    assert result.report["heads"].removed == 4
    attn = result.model.model.layers[0].self_attn
    assert attn.num_heads == 2 and attn.embed_dim == 2 * attn.head_dim
    assert attn.out_proj.in_features == attn.embed_dim


def test_a_hybrid_config_gets_its_attention_head_counts() -> None:
    """Bamba (Mamba2 layers and attention layers, 4 Mamba heads as many as the 4 attention
    heads over 2 kv heads): the config took the largest count over every module holding one,
    the Mamba mixers included: num_key_value_heads went 2 -> 4 and num_attention_heads stayed
    4 while each attention layer kept 2 heads over 1 kv head."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BambaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
        mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    model = transformers.BambaForCausalLM(config).eval()
    x = (torch.randint(3, 128, (2, 8)),)
    result = prune_hf(model, x, heads=0.5, mlp=0.5)
    assert result.verified
    cfg = result.model.config
    attn = result.model.model.layers[1].self_attn
    hd = attn.head_dim
    assert cfg.num_attention_heads == attn.q_proj.out_features // hd == 2
    assert cfg.num_key_value_heads == attn.k_proj.out_features // hd == 1
    assert cfg.mamba_n_heads == 4  # the Mamba heads are not the attention's


def test_generic_prune_of_bloom_folds_the_alibi_slopes_and_prunes_heads() -> None:
    """``secateurs.prune`` on an HF BLOOM (torch.export): the ALiBi slopes, computed in the
    forward from the head count, pinned every head ("created by source 'arange'"). Folded
    into a constant they follow the heads; the folded positions of its attention-mask
    arithmetic, which meet no parameter, stay pinned with that reason (the net had to catch
    them being pruned on their own)."""
    import secateurs

    m = tiny_model("bloom")
    ids = example_inputs(m)["input_ids"] if isinstance(example_inputs(m), dict) else \
        example_inputs(m)[0]

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(ids, attention_mask=torch.ones_like(ids)).logits

    model = LM().eval()
    result = secateurs.prune(model, (ids,), ratio=0.5, verify=True)
    assert result.report.exact is True and not result.report.repairs
    qkv = result.model.get_parameter("m.transformer.h.0.self_attention.query_key_value.weight")
    dense = result.model.get_parameter("m.transformer.h.0.self_attention.dense.weight")
    heads, hd = m.config.n_head, m.config.hidden_size // m.config.n_head
    assert dense.shape[1] == heads // 2 * hd and qkv.shape[0] == 3 * heads // 2 * hd
    reasons = [r for g in result.analysis.groups for r in g.pin_reasons]
    assert any("coupled to no parameter" in r for r in reasons)
    assert not any("created by source" in r for g in result.analysis.groups
                   if any("query_key_value" in mm.param for mm in g.members)
                   for r in g.pin_reasons)
