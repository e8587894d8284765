"""The safety net on the HF path (``secateurs.hf.net`` + ``secateurs.passes.repair``): with a
rule broken on purpose (as tests/passes/test_repair.py does: the residual ``add`` read as
unary, so the attention and MLP output rows look like free "mlp" groups), ``prune_hf`` still
returns a model that runs at the example shapes and at another batch size; the culprit groups
are pinned with a reason naming the module that fails, the rest is pruned, and the report of
the kind says so. A correct model is not repaired."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from secateurs.hf import prune_hf  # noqa: E402
from secateurs.hf.models import example_inputs, output_tensor, tiny_config, tiny_model  # noqa: E402
from secateurs.hf.shards import meta_model  # noqa: E402
from secateurs.passes import channel_rules  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def _broken_add(monkeypatch) -> None:
    """``add`` as a unary op that claims not to read its second operand (so
    ``group_channels``'s check of unmapped dims lets the wrong rule through)."""
    def propagate(ctx):
        for labels in ctx.ins[1:]:
            for vec in labels or ():
                ctx.space.note(vec)
        return channel_rules.RULES["relu"].propagate(ctx)

    monkeypatch.setitem(channel_rules.RULES, "add", channel_rules.Rule(propagate))


def test_broken_rule_is_repaired_and_the_model_runs(monkeypatch):
    _broken_add(monkeypatch)
    m = tiny_model("llama")
    x = example_inputs(m)
    r = prune_hf(m, x, heads=0.0, mlp=0.5)
    assert r.repairs
    for rep in r.repairs:
        assert rep.check == "runs"
        assert "pruned model fails at `model.layers." in rep.reason
        assert "broadcast" in rep.reason
    pinned = {rep.group for rep in r.repairs}
    assert not pinned & set(r.removed_units)
    rep = r.report["mlp"]
    assert rep.removed > 0  # the real MLP neurons are still pruned
    assert any("pinned by the safety net" in why for why in rep.reasons)
    for batch in (2, 3):
        out = output_tensor(r.model, example_inputs(m, batch=batch))
        assert out.shape == (batch, 8, m.config.vocab_size)
    assert r.verified  # and the numeric check passed on what is left
    assert r.summary()["repairs"] and r.summary()["repairs"][0]["group"] in pinned


def test_meta_plan_goes_through_the_net(monkeypatch):
    _broken_add(monkeypatch)
    model = meta_model(tiny_config("llama", num_hidden_layers=2))
    r = prune_hf(model, example_inputs("llama"), heads=0.0, mlp=0.5, importance="random")
    assert r.repairs and not r.verified
    assert all(p.is_meta for p in r.model.parameters())


def test_a_correct_model_is_not_repaired():
    m = tiny_model("qwen2")
    r = prune_hf(m, example_inputs(m), heads=0.5, mlp=0.5)
    assert r.repairs == () and r.notes == ()
    assert "check" in r.seconds
