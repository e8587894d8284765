"""The torch.export fallback keeps the batch symbolic, so a pruned model runs at any batch."""

import copy
import io

import pytest
import torch
from torch import nn

import secateurs
from secateurs.graph import fx_trace
from secateurs.passes.prune import verify_mask_equivalence


class _ChunkList(nn.Module):
    """YOLO/CSP style: ``list(x.chunk(2, 1))`` then ``y[-1]`` — FX cannot iterate a Proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(3, 16, 1)
        self.m = nn.Conv2d(8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(torch.relu(self.m(y[-1])))
        return self.fc(self.cv2(torch.cat(y, 1)).mean((2, 3)))


def test_export_fallback_prunes_a_model_that_runs_at_other_batches() -> None:
    model = _ChunkList().eval()
    x = torch.randn(1, 3, 8, 8)
    result = secateurs.prune(model, x, ratio=0.5)
    assert result.report.tracer == "export"
    assert result.report.params_after < result.report.params_before
    for batch in (1, 3, 5):
        xb = torch.randn(batch, 3, 8, 8)
        ok, diff = verify_mask_equivalence(model, result.model, result.plan, xb)
        assert ok, (batch, diff)


def test_an_exported_pruned_model_takes_its_own_mode_and_refuses_the_other() -> None:
    """torch.export's module refuses eval() outright; the pruned model accepts the mode it was
    traced in (so .eval() and ONNX export work) and names why it cannot train."""
    model = _ChunkList().eval()
    x = torch.randn(2, 3, 8, 8)
    pruned = secateurs.prune(model, x, ratio=0.5).model
    assert pruned.eval() is pruned and not pruned.training
    assert not any(m.training for m in pruned.modules())
    with pytest.raises(NotImplementedError, match="traced by torch.export in eval mode"):
        pruned.train()
    from secateurs.runtime.onnx_export import export_onnx

    assert export_onnx(pruned, x, exporter="torchscript").graph.node  # verified against torch
    raw = torch.export.export(model, (x,)).module()  # flagged training, refuses eval()
    assert export_onnx(raw, x, exporter="torchscript").graph.node


def _reloaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_an_exported_pruned_model_pickles_as_its_program() -> None:
    """torch.save(result.model), what users of pruning tools do first, failed on every
    export-traced model (torch's guard module and hooks are local functions); it stores the
    re-exported program, which loads back with its symbolic batch, mode and pickling."""
    model = _ChunkList().eval()
    pruned = secateurs.prune(model, torch.randn(2, 3, 8, 8), ratio=0.5).model
    back = _reloaded(pruned)
    assert back is not pruned and not back.training
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in pruned.parameters())
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        assert torch.equal(back(x), pruned(x))
    with pytest.raises(NotImplementedError, match="traced by torch.export in eval mode"):
        back.train()
    again = _reloaded(back)  # a reloaded model pickles again
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(again(x), pruned(x))
    copied = copy.deepcopy(pruned)  # and a copy, which keeps the mode rule too
    assert torch.equal(_reloaded(copied)(x), pruned(x))
    with pytest.raises(NotImplementedError, match="traced by torch.export in eval mode"):
        copied.train()
    assert model(x).shape == again(x).shape  # the user's model untouched and still runs


@pytest.mark.parametrize("name, tracer", [("resnet", "fx"), ("mamba_ssm", "export (batch >= 2)")])
def test_a_pruned_zoo_model_pickles(name: str, tracer: str) -> None:
    """fx: ``from __future__ import annotations`` (the zoo's modules) makes the forward's
    annotations strings, which symbolic_trace copied into the generated code, and torch.save
    failed with "'str' object has no attribute '__name__'". export: Mamba's selective scan
    exports with a guard ``batch != 1``, which the reloaded program keeps (refusing batch 1
    with torch's guard message) rather than running unchecked."""
    from secateurs import zoo

    entry = zoo.get(name)
    x = entry.example_inputs()
    result = secateurs.prune(entry.build(), x, ratio=0.3)
    assert result.report.tracer == tracer
    back = _reloaded(result.model)
    assert torch.equal(back(*x), result.model(*x))
    again = secateurs.apply_plan(entry.build(), x, result.plan)  # a saved plan's model too
    assert torch.equal(_reloaded(again)(*x), result.model(*x))
    if tracer.startswith("export"):
        one = tuple(a[:1] for a in x)
        for module in (result.model, back):
            with pytest.raises(Exception, match="Guard failed"):
                module(*one)


def test_a_pickled_static_program_stays_static() -> None:
    """CoaT from a batch-1 example exports at static shapes; its pickle is re-exported static
    too (its graph has batch 1 baked in), so the reloaded program refuses batch 2 as the
    pruned one does rather than running it."""
    from secateurs import zoo

    x = torch.randn(1, 3, 16, 16)
    result = secateurs.prune(zoo.get("coat_conv_relpos").build(), (x,), ratio=0.3)
    assert result.report.tracer == "export (static shapes)"
    back = _reloaded(result.model)
    assert torch.equal(back(x), result.model(x))
    for module in (result.model, back):
        with pytest.raises(Exception, match="Guard failed"):
            module(torch.randn(2, 3, 16, 16))


def test_optimize_an_exported_model_to_int8() -> None:
    """The pipeline's prune stage exports the pruned program to ONNX (it crashed on eval())."""
    model = _ChunkList().eval()
    result = secateurs.optimize(model, torch.randn(2, 3, 8, 8), prune=0.5, round_to=1,
                                quantize="int8", measure=False)
    assert [r.stage for r in result.stages] == ["input", "prune", "quantize"]
    assert result.stage("prune").details["mask_equivalent"] is True
    assert result.stage("prune").macs < result.stage("input").macs


def test_an_exported_program_says_which_sizes_it_fixed() -> None:
    """Only the batch stays symbolic under torch.export: the report says the pruned program
    runs at the example's other sizes, and for a Hugging Face model points to prune_hf."""
    result = secateurs.prune(_ChunkList().eval(), torch.randn(1, 3, 8, 8), ratio=0.5)
    assert any("other sizes [(3, 8, 8)]" in n for n in result.report.notes)
    assert not any("prune_hf" in n for n in result.report.notes)
    pytest.importorskip("transformers")
    from secateurs.hf.models import example_inputs, tiny_model

    lm = tiny_model("llama")
    result = secateurs.prune(lm, example_inputs(lm), ratio=0.5)
    assert any("other sizes [(8,)]" in n for n in result.report.notes)
    assert any("secateurs.hf.prune_hf prunes the model itself" in n
               for n in result.report.notes)


def test_batch_dims_only_when_inputs_share_a_batch() -> None:
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    assert fx_trace._batch_dims((a, b)) is not None
    assert fx_trace._batch_dims((a, torch.randn(3, 5))) is None
    assert fx_trace._batch_dims((torch.tensor(1.0),)) is None
    assert fx_trace._batch_dims((a, 4)) == ({0: torch.export.Dim.DYNAMIC}, None)


def test_bounded_batch_exports_static() -> None:
    class _Bounded(nn.Module):  # a batch the graph checks against a constant
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._check(x.shape[0] <= 2)
            return x * 2

    ep, symbolic = fx_trace._export(_Bounded(), (torch.randn(1, 3),), dynamic_batch=True)
    assert fx_trace._unbounded(ep) and not symbolic  # static export: no symbols left to bound
    assert not ep.range_constraints


class _BatchGuard(nn.Module):
    """A forward that branches on the batch (RT-DETR computes anchors from sizes): FX fails,
    the export with a symbolic batch fails, the static export has to work."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 2:
            x = x * 2
        return self.fc2(torch.relu(self.fc1(x)))


def test_static_export_after_a_failed_dynamic_one_and_the_inputs_stay_unmarked() -> None:
    """The failed dynamic attempt used to mark the user's example tensor dynamic
    (``_dynamo_dynamic_indices``), and the static retry on it then failed with "Constraints
    violated": a TraceError on a model torch.export accepts."""
    x = torch.randn(2, 16)
    result = secateurs.prune(_BatchGuard().eval(), (x,), ratio=0.5, verify=True)
    assert result.report.tracer == "export (static shapes)"
    assert result.report.exact is True
    assert not hasattr(x, "_dynamo_dynamic_indices")


class _LegacyAttention(nn.Module):
    """BART-era attention: ``reshape(bsz * num_heads, -1, head_dim)``, batch and heads merged
    into one run-time size next to a -1."""

    def __init__(self, untraceable: bool) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.heads, self.hd = 4, 8
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.untraceable:
            for _ in range(x.shape[-1] // 32):
                x = x * 1.0
        b, t, _ = x.size()

        def heads(z: torch.Tensor) -> torch.Tensor:
            z = z.view(b, -1, self.heads, self.hd).transpose(1, 2)
            return z.reshape(b * self.heads, -1, self.hd)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        w = torch.bmm(q, k.transpose(1, 2)).softmax(-1)
        y = torch.bmm(w, v).view(b, self.heads, t, self.hd).transpose(1, 2)
        return self.o(y.reshape(b, t, 32))


@pytest.mark.parametrize("untraceable", [False, True])
def test_batch_times_heads_next_to_minus_one_follows_the_batch(untraceable: bool) -> None:
    """``b * heads`` became the traced constant (2 * 2) where the heads shrank; next to the -1
    the pruned model ran at any batch and mixed samples at every batch but the example's:
    mask-equivalent at the example, silently wrong elsewhere. It is now ``b * heads * 2 // 4``
    at run time."""
    model = _LegacyAttention(untraceable).eval()
    x = torch.randn(2, 8, 32)
    result = secateurs.prune(model, (x,), ratio=0.5, verify=True)
    assert result.report.tracer.startswith("export" if untraceable else "fx")
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("o.weight").shape[1] == 16
    x3 = torch.randn(3, 8, 32)
    ok, diff = verify_mask_equivalence(model, result.model, result.plan, (x3,))
    assert ok, diff


def test_verify_also_checks_one_more_sample() -> None:
    """The final check runs at the example and at one more sample, so a program right at the
    traced batch only is caught even where no rule is at fault."""
    from secateurs.passes.plan import Plan
    from secateurs.passes.prune import _verify_batches

    class _RightAtTwo(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y if x.shape[0] == 2 else y + 1.0

    model = nn.Linear(4, 3).eval()
    x = torch.randn(2, 4)
    plan = Plan({}, {}, "fx", {})

    class _Prep:  # what _verify_batches reads
        example_inputs, tracer = (x,), "fx"

    ok, diff, at = _verify_batches(model, _RightAtTwo(model), plan, _Prep())
    assert not ok and diff == pytest.approx(1.0) and at[0].shape[0] == 3
    ok, _, _ = _verify_batches(model, model, plan, _Prep())
    assert ok
    _Prep.tracer = "export (static shapes)"  # the pruned program runs at the example only
    assert _verify_batches(model, _RightAtTwo(model), plan, _Prep())[0]


def test_alibi_slopes_computed_in_the_forward_are_folded_and_follow_the_heads() -> None:
    """torch.export records BLOOM/MPT's ``pow(base, arange(1, 1 + heads))``: a source whose
    positions no rule may slice (``arange(n)`` is not ``arange(n + 1)[:n]`` for every function
    of it), so the heads it is added to were pinned. Folded into a constant, it is sliced with
    the heads: each surviving head keeps its own slope."""
    from secateurs import zoo
    from secateurs.passes.plan import Plan
    from secateurs.zoo.attention_wild import alibi_slopes

    entry = zoo.get("alibi_decoder")
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer == "export"
    assert result.report.exact is True and not result.report.repairs
    dense_in = result.model.get_parameter("h.0.self_attention.dense.weight").shape[1]
    assert dense_in == 3 * 8  # 3 of 6 heads
    gone = set(result.plan.removed["h.0.self_attention.dense.weight"][1])
    kept = [h for h in range(6) if h * 8 not in gone]
    folded = [b for n, b in result.model.named_buffers() if n.startswith("_secateurs_const_")
              and b.is_floating_point() and b.numel() == 3]
    assert len(folded) == 1
    assert torch.allclose(folded[0].flatten(), alibi_slopes(6, torch.device("cpu"))[kept])
    for batch in (1, 3):
        xb = torch.randint(0, 64, (batch, 8))
        ok, diff = verify_mask_equivalence(model, result.model, result.plan, xb)
        assert ok, (batch, diff)
    # a saved plan names the folded constants; a fresh trace folds them the same way
    again = secateurs.apply_plan(model, x, Plan.from_json(result.plan.to_json()))
    with torch.no_grad():
        assert torch.equal(again(*x), result.model(*x))


class _Written(nn.Module):
    """``zeros(4)`` written into in place, an ``arange`` over the run-time batch, a literal."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(4)
        acc.add_(x.sum(0))
        rows = torch.arange(x.shape[0]).float()[:, None]
        scale = torch.exp(torch.arange(4) * -0.5)
        return self.fc(x * scale) + acc + rows


def test_fold_leaves_written_and_input_dependent_tensors_alone() -> None:
    from secateurs.graph.fx_fold import fold_constant_sources
    from secateurs.graph.fx_lower import call_key

    model = _Written().eval()
    x = torch.randn(3, 4)
    gm = torch.export.export(model, (x,), dynamic_shapes=(
        {0: torch.export.Dim("b", min=2)},)).module()
    with torch.no_grad():
        want = gm(x)
    assert fold_constant_sources(gm) == 1  # the exp(arange) table only
    keys = {call_key(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert "zeros" in keys  # written into: stays a factory call
    assert "arange" in keys  # over the run-time batch: stays
    assert "exp" not in keys
    with torch.no_grad():
        assert torch.equal(gm(x), want)
        gm(torch.randn(5, 4))
