"""What prune_hf says and what save_pretrained refuses: per-kind reports and shortfall
warnings, kinds that break the model left out with the reason, a checked save that refuses
a round trip which would differ (and leaves the target untouched), configs the architecture
refuses (CLIP with 3 heads), tokenizer-style dict inputs and default (KV cache) configs,
``secateurs.hf`` after ``import secateurs``, and meta plans scored from the checkpoint."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402

import secateurs  # noqa: E402
from secateurs import zero_plan_slices  # noqa: E402
from secateurs.errors import InputError  # noqa: E402
from secateurs.hf import (  # noqa: E402
    PruneShortfall,
    RoundTripError,
    from_pretrained_pruned,
    prune_hf,
    save_pretrained,
)
from secateurs.hf.loader import TENSORS_FILE  # noqa: E402
from secateurs.hf.models import example_inputs, output_tensor, tiny_config, tiny_model  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama_pruned():
    m = tiny_model("llama")
    x = example_inputs(m)
    return m, x, prune_hf(m, x, heads=0.5, mlp=0.5)


def test_secateurs_hf_is_reachable_after_import_secateurs():
    assert secateurs.hf.prune_hf is prune_hf
    assert secateurs.hf.from_pretrained_pruned is from_pretrained_pruned


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_default_config_with_kv_cache_and_tokenizer_dict(family):
    cfg = tiny_config(family, use_cache=True)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = example_inputs(family)[0]
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding in the second sentence
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    r = prune_hf(m, batch, heads=0.5, mlp=0.5)
    assert r.report["heads"].removed > 0 and r.report["mlp"].removed > 0
    assert m.config.use_cache is True and r.model.config.use_cache is True  # restored
    ref = zero_plan_slices(m, r.plan)
    with torch.no_grad():
        got, want = r.model(**batch).logits, ref(**batch).logits
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(InputError, match="no positional argument 'pixel_values'"):
        prune_hf(m, {"input_ids": ids, "pixel_values": ids}, mlp=0.5)


def test_report_counts_what_was_asked_and_removed(llama_pruned):
    m, x, r = llama_pruned
    heads, mlp = r.report["heads"], r.report["mlp"]
    # per layer 4 query heads: 2 kv-head units, each carrying the 2 query heads of its group
    # (the repeat index is a pinned factor: repeat_kv broadcasts the kv head by expand). The
    # report counts query heads: half of them were asked for and went as one kv group per
    # layer, so nothing is short and no pin is reported (it counted kv groups, 2 of 4 asked)
    assert (heads.units, heads.asked, heads.removed) == (8, 4, 4)
    assert heads.reasons == ()
    assert m.config.num_attention_heads == 4 and r.model.config.num_attention_heads == 2
    assert (mlp.units, mlp.asked, mlp.removed) == (192, 96, 96)
    assert mlp.reasons == ()
    assert r.summary()["report"]["heads"]["removed"] == 4


def test_kind_without_units_warns_with_the_reason():
    m = tiny_model("resnet")
    with pytest.warns(PruneShortfall, match="heads=0.5 removed nothing"):
        r = prune_hf(m, example_inputs(m), heads=0.5, mlp=0.5)
    assert r.report["heads"].removed == 0
    assert "no heads units" in r.report["heads"].reasons[0]
    assert r.report["mlp"].removed > 0  # the conv channels are pruned instead


def test_kind_that_breaks_the_model_is_left_out_and_said(monkeypatch):
    """The repair net: a kind whose pruned model fails the check is not applied."""
    import sys

    ph = sys.modules["secateurs.hf.prune_hf"]  # the attribute of secateurs.hf is the function

    real = ph.apply_hf_plan

    def broken_heads(model, plan):
        changes = real(model, plan)
        if any(n.endswith("o_proj.weight") for n in plan.removed):
            model.model.layers[0].self_attn.head_dim = 5  # a wrong attribute refresh
        return changes

    monkeypatch.setattr(ph, "apply_hf_plan", broken_heads)
    m = tiny_model("llama")
    x = example_inputs(m)
    with pytest.warns(PruneShortfall, match="heads"):
        r = prune_hf(m, x, heads=0.5, mlp=0.5)
    assert r.report["heads"].removed == 0
    assert r.report["heads"].reasons[0].startswith("not applied: the model pruned this way")
    assert r.report["mlp"].removed == 96
    ref = zero_plan_slices(m, r.plan)
    assert torch.allclose(output_tensor(r.model, x), output_tensor(ref, x), atol=1e-5)


def test_target_macs_out_of_reach_names_what_blocks_it():
    m = tiny_model("resnet")
    with pytest.raises(InputError, match="out of reach.*what blocks it: heads: the analysis"):
        prune_hf(m, example_inputs(m), target_macs=0.01)


def test_checked_save_refuses_a_reload_that_would_differ(tmp_path, llama_pruned):
    m, x, r = llama_pruned
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    norm = r.model.model.norm
    norm.forward = lambda h: h * 2.0  # an override the record cannot see
    try:
        with pytest.raises(RoundTripError, match="would reload differently.*output 0"):
            save_pretrained(r, target)
    finally:
        del norm.forward
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left
    save_pretrained(r, target)  # the same model, unmodified, saves
    assert not (target / "keep.txt").exists()
    assert torch.equal(output_tensor(from_pretrained_pruned(target), x),
                       output_tensor(r.model, x))


def test_checked_save_refuses_a_structure_no_config_builds(tmp_path, llama_pruned):
    m, x, r = llama_pruned
    layer = r.model.model.layers[0].mlp
    act = layer.act_fn
    layer.act_fn = torch.nn.Tanh()
    try:
        with pytest.raises(RoundTripError, match="act_fn' is a Tanh"):
            save_pretrained(r, tmp_path / "m")
    finally:
        layer.act_fn = act
    assert not (tmp_path / "m").exists()


def test_tensors_outside_the_checkpoint_travel_in_their_own_file(tmp_path):
    m = tiny_model("bert")
    x = example_inputs(m)
    r = prune_hf(m, x, heads=0.25)
    attn = r.model.encoder.layer[0].attention.self
    attn.register_buffer("secateurs_probe", torch.arange(3.0), persistent=False)
    save_pretrained(r, tmp_path / "m")
    back = from_pretrained_pruned(tmp_path / "m")
    assert torch.equal(back.encoder.layer[0].attention.self.secateurs_probe, torch.arange(3.0))
    assert torch.equal(output_tensor(back, x), output_tensor(r.model, x))
    (tmp_path / "m" / TENSORS_FILE).unlink()
    with pytest.raises(InputError, match="secateurs.hf.save_pretrained"):
        from_pretrained_pruned(tmp_path / "m")


def test_clip_with_three_heads_saves_through_the_loader(tmp_path):
    m = tiny_model("clip_vision")
    x = example_inputs(m)
    r = prune_hf(m, x, heads=0.25)
    assert r.model.config.num_attention_heads == 3 and r.needs_loader
    with pytest.raises(Exception, match="not a multiple"):  # the config refuses 64 % 3
        r.model.save_pretrained(tmp_path / "plain")
    r.save_pretrained(tmp_path / "m")
    back = from_pretrained_pruned(tmp_path / "m")
    assert back.config.num_attention_heads == 3
    assert torch.equal(output_tensor(back, x), output_tensor(r.model, x))


def test_meta_plan_refuses_magnitude_without_values_and_scores_from_the_checkpoint(tmp_path):
    from secateurs.hf.shards import checkpoint_score_context, meta_model

    m = tiny_model("qwen2")
    x = example_inputs(m)
    meta = meta_model(tiny_config("qwen2"))
    with pytest.raises(InputError, match="meta device.*checkpoint_score_context"):
        prune_hf(meta, x, heads=0.5, mlp=0.5, importance="l2")
    m.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    ctx = checkpoint_score_context(str(tmp_path / "src"), meta)
    r_meta = prune_hf(meta, x, heads=0.5, mlp=0.5, importance="l2", score_context=ctx)
    r_real = prune_hf(m, x, heads=0.5, mlp=0.5, importance="l2")
    assert r_meta.plan.removed == r_real.plan.removed
    # the units kept are not simply the last ones (the tie a meta plan would make)
    mlp = next(v[0] for k, v in r_real.plan.removed.items() if k.endswith("up_proj.weight"))
    assert mlp != list(range(len(mlp)))


def test_blocks_zero_needs_no_layer_list():
    m = tiny_model("albert")  # shared layers: no ModuleList of num_hidden_layers
    r = prune_hf(m, example_inputs(m), mlp=0.5, blocks=0)
    assert r.report["mlp"].removed > 0
    with pytest.raises(InputError, match="list of 2 layers"):
        prune_hf(m, example_inputs(m), mlp=0.5, blocks=1)


warnings.filterwarnings("ignore", category=PruneShortfall)
