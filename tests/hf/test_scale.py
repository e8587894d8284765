"""Layer replication (secateurs.hf.scale): the analysis of 3 traced layers expanded to N equals
the full trace (groups, members, units, MACs), plans made from it prune real weights exactly as
the full analysis does, and models whose layers differ fall back to the full trace."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from secateurs.hf import analyze_hf, prune_hf, unit_counts  # noqa: E402
from secateurs.hf.models import example_inputs, tiny_config, tiny_model  # noqa: E402
from secateurs.hf.select import macs as _macs  # noqa: E402
from secateurs.hf.shards import meta_model  # noqa: E402
from secateurs.passes.importance import ScoreContext  # noqa: E402
from secateurs.passes.plan import build_plan  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def _layers(family: str, n: int) -> dict:
    return {"n_layer": n} if family == "gpt2" else {"num_hidden_layers": n}


def _canon(analysis) -> set:
    """Groups as sets of (param, dim, positions, units) members with their unit marks."""
    return {(g.size, g.pinned.tobytes(), g.lossy.tobytes(),
             frozenset((m.param, m.dim, m.positions.tobytes(), m.units.tobytes())
                       for m in g.members))
            for g in analysis.groups}


def _same_analysis(rep, full) -> None:
    assert "replicate" in rep.tracer and "replicate" not in full.tracer
    assert _canon(rep.analysis) == _canon(full.analysis)
    assert unit_counts(rep) == unit_counts(full)
    assert sorted((u.kind, u.sub, u.size, u.dims_per_unit) for u in rep.units.values()) == \
        sorted((u.kind, u.sub, u.size, u.dims_per_unit) for u in full.units.values())
    assert _macs(rep.analysis, {}) == _macs(full.analysis, {})
    groups, res = rep.analysis.groups, rep.analysis.resolution
    assert [g.id for g in groups] == list(range(len(groups)))
    # the expanded Resolution agrees with the groups: one resolution group per channel group,
    # numbered in order of first atom, with the groups' pins and lossy marks
    firsts = [int(res.group[g.atoms[0]]) for g in groups]
    assert firsts == sorted(set(firsts))
    for g in groups:
        assert res.is_atom[g.atoms].all() and (res.group[g.atoms] == res.group[g.atoms[0]]).all()
        assert [int(a) in res.pin_reason for a in g.atoms] == g.pinned.tolist()
        assert [int(a) in res.lossy_reason for a in g.atoms] == g.lossy.tolist()


def test_llama_meta_replicated_equals_full_trace():
    cfg = tiny_config("llama", num_hidden_layers=7)
    model, x = meta_model(cfg), example_inputs("llama")
    rep = analyze_hf(model, x)  # the default on meta models with more than 3 layers
    full = analyze_hf(model, x, replicate=False)
    _same_analysis(rep, full)
    assert "3->7" in rep.tracer
    assert len(model.model.layers) == 7 and model.config.num_hidden_layers == 7  # restored
    c = unit_counts(rep)
    assert c["heads_groups"] == 7 and c["mlp_groups"] == 7 and c["head_dim_v_groups"] == 7
    assert c["head_dim_qk_groups"] == 1  # rotary head dims: one group through inv_freq


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
def test_replicated_equals_full_trace(family):
    model = tiny_model(family, **_layers(family, 5))
    x = example_inputs(family)
    _same_analysis(analyze_hf(model, x, replicate=True), analyze_hf(model, x))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_replicated_equals_full_trace_gqa_families(family):
    model = meta_model(tiny_config(family, num_hidden_layers=6))
    x = example_inputs(family)
    _same_analysis(analyze_hf(model, x), analyze_hf(model, x, replicate=False))


def test_removed_slices_match_the_full_analysis():
    """Every parameter slice a removal implies (build_plan on the expanded labels) is the one
    the full trace implies, for units removed in every kind of group."""
    model, x = meta_model(tiny_config("llama", num_hidden_layers=5)), example_inputs("llama")
    rep, full = analyze_hf(model, x), analyze_hf(model, x, replicate=False)
    assert _plans_match(rep, full) > 20


def test_meta_plan_on_real_shards_matches_full_prune(tmp_path):
    """A plan made on a meta model through replication (scores from the real weights) and
    applied shard by shard equals prune_hf on the real model with the full trace."""
    from transformers import AutoModelForCausalLM

    from secateurs.hf.shards import prune_checkpoint

    real = tiny_model("llama", num_hidden_layers=6)
    x = example_inputs("llama")
    meta = meta_model(tiny_config("llama", num_hidden_layers=6))
    tensors = dict(real.named_parameters())
    tensors.update(dict(real.named_buffers()))
    ratios = dict(heads=0.5, mlp=0.25, head_dim=0.25)
    on_meta = prune_hf(meta, x, score_context=ScoreContext(tensors), **ratios)
    on_real = prune_hf(real, x, **ratios)
    assert "replicate" in on_meta.plan.meta["tracer"] and on_real.plan.meta["tracer"] == "export"
    assert on_meta.plan.removed == on_real.plan.removed
    assert on_meta.macs_before == on_real.macs_before
    assert on_meta.macs_after == on_real.macs_after
    real.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    prune_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), on_meta.plan)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    want = on_real.model.state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.allclose(back(*x).logits, on_real.model(*x).logits, atol=1e-5)


def _llama_macs(cfg, tokens: int) -> int:
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = h // q
    seq = tokens
    proj = h * q * hd * 2 + h * kv * hd * 2 + 3 * h * i  # q, o, k, v, gate/up/down
    attn = 2 * q * seq * hd * seq  # q·k and p·v, per batch
    return n * (tokens * proj + attn) + tokens * h * cfg.vocab_size


def test_32_layer_meta_config_units_and_macs():
    cfg = tiny_config("llama", num_hidden_layers=32, hidden_size=128, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=256)
    hfa = analyze_hf(meta_model(cfg), (torch.zeros(1, 16, dtype=torch.long),))
    assert hfa.tracer == "export+replicate(3->32)"
    c = unit_counts(hfa)
    assert c["heads_groups"] == 32 and c["heads_units"] == 32 * 2
    assert c["mlp_groups"] == 32 and c["mlp_units"] == 32 * 256
    assert c["head_dim_v_groups"] == 32 and c["head_dim_v_units"] == 32 * 16
    assert c["head_dim_qk_groups"] == 1 and c["head_dim_qk_units"] == 8  # 16 dims, pairs
    assert c["hidden_groups"] == 1 and c["hidden_units"] == 128
    assert _macs(hfa.analysis, {})[0] == _llama_macs(cfg, 16)
    names = {m.param for g in hfa.analysis.groups for m in g.members}
    assert {f"model.layers.{i}.mlp.down_proj.weight" for i in range(32)} <= names


@pytest.mark.slow
def test_32_layer_meta_config_equals_full_trace():
    cfg = tiny_config("llama", num_hidden_layers=32)
    model, x = meta_model(cfg), example_inputs("llama")
    _same_analysis(analyze_hf(model, x), analyze_hf(model, x, replicate=False))


# ---------------------------------------------------------------- fallback


def test_non_uniform_layer_falls_back_to_full_trace(caplog):
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = tiny_model("llama", num_hidden_layers=5)
    model.model.layers[3].mlp = LlamaMLP(tiny_config("llama", intermediate_size=48))
    x = example_inputs("llama")
    with caplog.at_level(logging.WARNING, logger="secateurs.hf.scale"):
        hfa = analyze_hf(model, x, replicate=True)
    assert hfa.tracer == "export"
    assert "layer 3 (LlamaDecoderLayer) differs from layer 0" in caplog.text
    assert unit_counts(hfa)["mlp_units"] == 4 * 96 + 48


def test_mixed_layer_types_fall_back(caplog):
    cfg = tiny_config("qwen2", num_hidden_layers=5, use_sliding_window=True, sliding_window=4,
                      max_window_layers=2)
    with caplog.at_level(logging.WARNING, logger="secateurs.hf.scale"):
        hfa = analyze_hf(meta_model(cfg), example_inputs("qwen2"))
    assert hfa.tracer == "export"
    assert "config.layer_types mixes" in caplog.text


class _Block(nn.Module):
    def __init__(self, hidden: int, idx: int, variant: str) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)
        self.layer_idx = idx  # ignored by the uniformity check, as in HF layers
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x)
        # same modules and attributes in every layer, but some layers trace differently
        if self.variant == "odd" and self.layer_idx % 2:
            y = y[..., : y.shape[-1] // 2].repeat(1, 1, 2)
        elif self.variant == "late" and self.layer_idx >= 2:
            y = y.flip(-1)
        else:
            y = torch.relu(y)
        return x + self.down(y)


class _Stack(nn.Module):
    """A plain torch stack with an HF config (traced by torch.fx, not torch.export)."""

    def __init__(self, variant: str = "") -> None:
        from transformers import LlamaConfig

        super().__init__()
        self.config = LlamaConfig(hidden_size=16, num_hidden_layers=5, num_attention_heads=2,
                                  vocab_size=32, intermediate_size=32)
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList(_Block(16, i, variant) for i in range(5))
        self.head = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_fx_traced_stack_replicates():
    model, x = _Stack(), (torch.randint(0, 32, (2, 4)),)
    rep, full = analyze_hf(model, x, replicate=True), analyze_hf(model, x)
    assert rep.tracer == "fx+replicate(3->5)" and full.tracer == "fx"
    assert _canon(rep.analysis) == _canon(full.analysis)
    assert unit_counts(rep) == unit_counts(full)
    assert sum(u.size == 32 for u in rep.of_kind("mlp")) == 5  # one 2*hidden group a layer


@pytest.mark.parametrize("variant, reason", [
    ("odd", "layer nodes are not 3 consecutive runs of equal length"),
    ("late", "layer 2 differs from layer 1 at"),
])
def test_layers_whose_graphs_differ_fall_back(caplog, variant, reason):
    """Uniform modules whose layers trace differently: the traced analysis shows that layer 2
    is not the image of layer 1, so every layer is traced."""
    model, x = _Stack(variant), (torch.randint(0, 32, (2, 4)),)
    with caplog.at_level(logging.WARNING, logger="secateurs.hf.scale"):
        hfa = analyze_hf(model, x, replicate=True)
    assert hfa.tracer == "fx"
    assert reason in caplog.text
    assert _canon(hfa.analysis) == _canon(analyze_hf(model, x).analysis)


def test_random_importance_does_not_depend_on_group_numbering():
    """Replication numbers groups differently from a full trace; the random criterion is
    seeded by a group's members, so both analyses score every group the same."""
    from secateurs.passes.importance import CRITERIA

    model, x = meta_model(tiny_config("llama", num_hidden_layers=5)), example_inputs("llama")
    rep, full = analyze_hf(model, x), analyze_hf(model, x, replicate=False)
    ctx = ScoreContext({})

    def scores(hfa):
        return {frozenset((m.param, m.dim, m.positions.tobytes()) for m in g.members):
                (g.id, CRITERIA["random"](g, ctx).tolist()) for g in hfa.analysis.groups}

    a, b = scores(rep), scores(full)
    assert a.keys() == b.keys()
    assert any(a[k][0] != b[k][0] for k in a)  # the numbering really differs
    assert all(a[k][1] == b[k][1] for k in a)


def _plans_match(rep, full) -> int:
    """Remove one unit of every prunable group in both analyses (groups matched by their
    members): the plans (sliced tensors, dims, indices) must be equal. Returns tensors sliced."""
    key = {frozenset((m.param, m.dim, m.positions.tobytes()) for m in g.members): g
           for g in full.analysis.groups}
    rng = np.random.default_rng(0)
    removed_rep, removed_full = {}, {}
    for g in rep.analysis.groups:
        if g.size < 2 or g.is_pinned:
            continue
        units = np.sort(rng.choice(np.nonzero(~g.pinned)[0], 1, replace=False))
        removed_rep[g.id] = units
        removed_full[key[frozenset((m.param, m.dim, m.positions.tobytes())
                                   for m in g.members)].id] = units
    plan_rep = build_plan(rep.analysis, removed_rep)
    plan_full = build_plan(full.analysis, removed_full)
    assert plan_rep.removed == plan_full.removed
    assert _macs(rep.analysis, removed_rep) == _macs(full.analysis, removed_full)
    return len(plan_rep.removed)


def test_gemma2_alternating_layers_replicate_by_period():
    """Gemma-2 alternates sliding and global attention (config.layer_types): the stack has
    period 2, so 3 periods (6 layers) are traced and expanded to 8; analysis and plans equal
    the full trace."""
    cfg = tiny_config("gemma2", num_hidden_layers=8)
    assert cfg.layer_types[:2] == ["sliding_attention", "full_attention"]
    model, x = meta_model(cfg), example_inputs("gemma2")
    rep = analyze_hf(model, x)
    full = analyze_hf(model, x, replicate=False)
    assert rep.tracer.endswith("replicate(6->8, period 2)"), rep.tracer
    _same_analysis(rep, full)
    assert unit_counts(rep)["heads_groups"] == 8
    assert _plans_match(rep, full) > 30
    assert len(model.model.layers) == 8 and model.config.num_hidden_layers == 8


def test_layer_period():
    from secateurs.hf.scale import layer_period

    cfg = tiny_config("gemma2", num_hidden_layers=6)
    model = meta_model(cfg)
    assert layer_period(model, model.model.layers) == (2, None)
    cfg = tiny_config("gemma2", num_hidden_layers=6,
                      layer_types=["sliding_attention"] * 2 + ["full_attention"] * 4)
    model = meta_model(cfg)
    p, why = layer_period(model, model.model.layers)
    assert p == 0 and "layer_types mixes" in why and "no period dividing 6" in why
    model = meta_model(tiny_config("llama", num_hidden_layers=4))
    assert layer_period(model, model.model.layers) == (1, None)
