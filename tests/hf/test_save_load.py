"""Pruned Hugging Face models survive save_pretrained + from_pretrained: rotary head dims (the
kept frequencies and the 1/sqrt(D) scale expressed in the config), uniform heads and MLP,
BERT/GPT-2 head counts and per-layer widths (through from_pretrained_pruned), meta plans
applied to shards, and refusals where no config can describe the result."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402

from secateurs import zero_plan_slices  # noqa: E402
from secateurs.errors import InputError  # noqa: E402
from secateurs.hf import prune_hf  # noqa: E402
from secateurs.hf.models import FAMILIES, example_inputs, output_tensor, tiny_config, tiny_model  # noqa: E402
from secateurs.hf.prune_hf import from_pretrained_pruned  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

ROTARY = ("llama", "qwen2", "mistral")


_out = output_tensor


def _assert_same(a, b, x, atol=1e-5):
    ya, yb = _out(a, x), _out(b, x)
    assert ya.shape == yb.shape
    assert torch.allclose(ya, yb, atol=atol), float((ya - yb).abs().max())


def _q_widths(model) -> list[int]:
    """Output width of every layer's query projection, in layer order."""
    out = []
    for name, mod in model.named_modules():
        for q in ("q_proj", "query", "c_attn"):
            if name.endswith(q) and hasattr(mod, "weight"):
                w = mod.weight
                out.append(int(w.shape[1] // 3 if q == "c_attn" else w.shape[0]))
    return out


def _skewed(group, ctx):
    """Layer 0's units score low except one, later layers flat: ranking across layers then
    takes most units from layer 0 (per-layer widths differ)."""
    m = re.search(r"(?:^|\.)(\d+)\.", group.members[0].param)
    scores = np.ones(group.size)
    if m and int(m.group(1)) == 0:
        scores[-1] = 100.0
    return scores


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.mark.parametrize("family", ROTARY)
def test_rotary_head_dim_round_trips_with_plain_from_pretrained(tmp_path, models, family):
    m = models[family]
    x = example_inputs(family, seq=64)  # every rotary position the config allows
    r = prune_hf(m, x, heads=0.5, head_dim=0.25)
    assert not r.needs_loader
    rope = r.model.config.rope_parameters
    assert rope["rope_type"] == "longrope" and len(rope["short_factor"]) == 6
    _assert_same(r.model, zero_plan_slices(m, r.plan), x)
    r.model.save_pretrained(tmp_path)
    back = type(r.model).from_pretrained(tmp_path).eval()
    kept = [i for i in range(8) if i not in r.plan.removed["model.rotary_emb.inv_freq"][0]]
    # the kept frequencies, to float32 rounding (the config's factors are float32 numbers)
    assert torch.allclose(back.model.rotary_emb.inv_freq, m.model.rotary_emb.inv_freq[kept],
                          rtol=2e-7, atol=0)
    assert torch.equal(back.model.rotary_emb.inv_freq, r.model.model.rotary_emb.inv_freq)
    assert back.model.layers[0].self_attn.scaling == r.model.model.layers[0].self_attn.scaling
    assert torch.equal(_out(back, x), _out(r.model, x))


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
     "rope_theta": 10000.0},
], ids=lambda r: r["rope_type"])
def test_static_rope_types_keep_their_frequencies(tmp_path, rope):
    m = tiny_model("llama", rope_parameters=rope)
    x = example_inputs("llama", seq=40)  # past original_max_position_embeddings for longrope
    r = prune_hf(m, x, head_dim=0.5)
    _assert_same(r.model, zero_plan_slices(m, r.plan), x, atol=1e-4)
    r.model.save_pretrained(tmp_path)
    back = type(r.model).from_pretrained(tmp_path).eval()
    assert torch.equal(_out(back, x), _out(r.model, x))


def test_dynamic_rope_refuses_head_dim_before_tracing():
    m = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                             "rope_theta": 10000.0})
    with pytest.raises(InputError, match="dynamic"):
        prune_hf(m, example_inputs("llama"), head_dim=0.25)


def test_longrope_refuses_head_dim_but_prunes_heads(tmp_path):
    # longrope switches frequency sets at run time: the trace pins the q/k head dims
    m = tiny_model("llama", rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0 + i / 10 for i in range(8)],
        "long_factor": [2.0 + i / 5 for i in range(8)], "original_max_position_embeddings": 16,
        "factor": 4.0, "rope_theta": 10000.0})
    x = example_inputs("llama")
    with pytest.raises(InputError, match="q/k head dims"):
        prune_hf(m, x, head_dim=0.25)
    r = prune_hf(m, x, heads=0.5, mlp=0.25)
    r.model.save_pretrained(tmp_path)
    _assert_same(type(r.model).from_pretrained(tmp_path).eval(), r.model, x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kinds", [dict(mlp=0.3), dict(heads=0.5, mlp=0.3, head_dim=0.25)],
                         ids=["mlp", "heads+mlp+head_dim"])
def test_uniform_pruning_round_trips(tmp_path, models, family, kinds):
    m, x = models[family], example_inputs(family)
    r = prune_hf(m, x, **kinds)
    # only BERT/GPT-2 cannot say "fewer heads" or "smaller heads" in their config
    assert r.needs_loader == (family in ("bert", "gpt2") and "heads" in kinds)
    r.model.save_pretrained(tmp_path)
    back = from_pretrained_pruned(str(tmp_path))
    _assert_same(back, r.model, x)
    if not r.needs_loader:
        _assert_same(type(r.model).from_pretrained(tmp_path).eval(), r.model, x)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_widths_round_trip_through_the_loader(tmp_path, models, family):
    m, x = models[family], example_inputs(family)
    r = prune_hf(m, x, heads=0.25, mlp=0.3, importance=_skewed, uniform=False)
    widths = _q_widths(r.model)
    assert len(set(widths)) == 2 and widths[0] < widths[1], widths  # layer 0 lost heads
    assert r.needs_loader
    _assert_same(r.model, zero_plan_slices(m, r.plan), x)
    r.model.save_pretrained(tmp_path)
    with pytest.raises((RuntimeError, ValueError)):  # plain loading cannot rebuild it
        type(r.model).from_pretrained(tmp_path)
    back = from_pretrained_pruned(str(tmp_path))
    assert type(back).__name__ == type(r.model).__name__
    assert _q_widths(back) == widths
    _assert_same(back, r.model, x)
    # a loaded model saves and loads again
    back.save_pretrained(tmp_path / "again")
    _assert_same(from_pretrained_pruned(str(tmp_path / "again")), r.model, x)


def test_bert_heads_record_what_the_loader_needs(models):
    m, x = models["bert"], example_inputs("bert")
    r = prune_hf(m, x, heads=0.25, head_dim=0.25)
    rec = r.model.config.secateurs
    assert rec["loader"] == "secateurs.hf.from_pretrained_pruned" and not rec["problems"]
    # BERT refuses 64 / 3 heads: the loader builds with one head, then restores 3
    assert rec["build"] == {"num_attention_heads": 1}
    assert rec["config"] == {"num_attention_heads": 3}
    assert r.model.config.num_attention_heads == 3
    assert rec["reasons"]
    assert rec["shapes"]["encoder.layer.0.attention.self.query.weight"] == [36, 64]
    for i in range(2):
        attrs = rec["attrs"][f"encoder.layer.{i}.attention.self"]
        assert attrs["attention_head_size"] == 12 and attrs["num_attention_heads"] == 3
        assert attrs["all_head_size"] == 36
        # the scale moved into q: the rebuilt module's 1/sqrt(12), not the original 1/sqrt(16)
        if "scaling" in attrs:
            assert attrs["scaling"] == pytest.approx(12**-0.5)


def test_unpruned_config_has_no_record(models):
    m, x = models["llama"], example_inputs("llama")
    r = prune_hf(m, x, mlp=0.5)
    assert not r.needs_loader and not hasattr(r.model.config, "secateurs")


def test_meta_plan_with_rotary_head_dims_applies_to_shards(tmp_path, models):
    from transformers import AutoModelForCausalLM

    from secateurs.hf.shards import meta_model, prune_checkpoint

    m, x = models["llama"], example_inputs("llama", seq=32)
    meta = meta_model(tiny_config("llama"))
    r = prune_hf(meta, x, heads=0.5, head_dim=0.25, importance="random")
    m.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    prune_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), r.plan)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    _assert_same(back, zero_plan_slices(m, r.plan), x)


def test_target_macs_bisects_one_ratio(models):
    m, x = models["qwen2"], example_inputs("qwen2")
    r = prune_hf(m, x, target_macs=0.6)
    assert 0.5 < r.macs_kept <= 0.6
    assert r.plan.meta["ratios"]["heads"] == r.plan.meta["ratios"]["mlp"]
    with pytest.raises(InputError, match="either"):
        prune_hf(m, x, ratio=0.3, target_macs=0.6)
    with pytest.raises(InputError, match="out of reach"):
        prune_hf(m, x, mlp=0.0, target_macs=0.01)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_meta_plan_with_head_dims_without_rotary_applies_to_shards(tmp_path, models, family):
    """Without rotary the 1/sqrt(D) scale is folded into q; the shards get the same fold."""
    import copy

    from secateurs.hf.prune_hf import apply_hf_plan
    from secateurs.hf.shards import meta_model, prune_checkpoint

    m, x = models[family], example_inputs(family, seq=16)
    cls = type(m)
    meta = meta_model(tiny_config(family), cls)
    r = prune_hf(meta, x, head_dim=0.25, importance="random")
    assert r.plan.meta["hf"].get("head_dim_removed", 0) > 0
    reference = copy.deepcopy(m)
    changes = apply_hf_plan(reference, r.plan)
    assert changes["scaled"]  # the fold happened, and was recorded for the shards
    m.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    prune_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), r.plan, cls)
    back = from_pretrained_pruned(tmp_path / "dst", cls).eval()
    _assert_same(back, reference.eval(), x)
