"""Zoo models exported to ONNX: pruning is exact under ONNX Runtime and the ONNX analysis finds
the same channel groups as the torch analysis of the same model."""

from __future__ import annotations

import onnx
import pytest
import torch
from _onnx_testlib import export_zoo

from secateurs import zoo
from secateurs.passes.prune import analyze, prune
from secateurs.passes.prune_onnx import analyze_onnx, prune_onnx

MODELS = ["resnet", "densenet", "mobilenetv2", "vgg", "vit", "vit_fused", "shufflenet",
          "groupnorm_cnn", "conv1d_net", "mlp"]


def _exact_sizes(analysis) -> list[int]:
    """Sizes of groups that can be pruned exactly (no pinned, no lossy unit)."""
    return sorted(g.size for g in analysis.groups
                  if g.size > 1 and not g.pinned.any() and not g.is_lossy)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", MODELS)
def test_prune_exported_model_is_exact(name: str, ratio: float, export_dir) -> None:
    path = export_zoo(name, export_dir)
    original = onnx.load(str(path))
    before = original.SerializeToString()
    result = prune_onnx(original, ratio=ratio, round_to=1, verify=True)
    assert original.SerializeToString() == before, "the input model was modified"
    assert result.report.exact is True
    onnx.checker.check_model(result.model, full_check=True)
    assert result.plan.frontend == "onnx"
    inits = {t.name for t in original.graph.initializer}
    consts = {n.output[0] for n in original.graph.node if n.op_type == "Constant"}
    assert set(result.plan.removed) <= inits | consts
    if name != "mlp":  # mlp's only wide groups feed a LayerNorm: lossy, left alone
        assert result.plan.n_removed > 0
        assert result.report.macs_after < result.report.macs_before
        assert result.report.params_after < result.report.params_before


@pytest.mark.parametrize("name", MODELS)
def test_onnx_analysis_matches_torch(name: str, export_dir) -> None:
    entry = zoo.get(name)
    torch_groups = _exact_sizes(analyze(entry.build(), entry.example_inputs()))
    onnx_groups = _exact_sizes(analyze_onnx(export_zoo(name, export_dir)))
    assert onnx_groups == torch_groups


@pytest.mark.parametrize("name", ["resnet", "vgg", "mobilenetv2", "conv1d_net", "densenet"])
def test_same_macs_removed_as_torch(name: str, export_dir) -> None:
    entry = zoo.get(name)
    t = prune(entry.build(), entry.example_inputs(), ratio=0.5)
    o = prune_onnx(export_zoo(name, export_dir), ratio=0.5, round_to=None)
    assert o.report.macs_before == t.report.macs_before
    assert o.report.macs_after == t.report.macs_after


def test_plan_round_trips_through_json(export_dir) -> None:
    from secateurs.graph.onnx_apply import apply_plan_onnx
    from secateurs.passes.plan import Plan

    path = export_zoo("vit", export_dir)
    result = prune_onnx(path, ratio=0.5, round_to=1)
    again = apply_plan_onnx(onnx.load(str(path)), Plan.from_json(result.plan.to_json()))
    assert again.SerializeToString() == result.model.SerializeToString()


def test_default_round_to_keeps_widths_multiples_of_16(export_dir) -> None:
    result = prune_onnx(export_zoo("resnet", export_dir), ratio=0.5)
    assert result.plan.meta["round_to"] == 16
    for t in result.model.graph.initializer:
        if len(t.dims) == 4 and t.dims[0] > 16:
            assert t.dims[0] % 16 == 0, (t.name, list(t.dims))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_dynamo_export_prunes_exactly(name: str, export_dir) -> None:
    torch.set_num_threads(1)
    path = export_zoo(name, export_dir, dynamo=True)
    result = prune_onnx(path, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    entry = zoo.get(name)
    if name != "groupnorm_cnn":  # dynamo shares the ones/zeros of its GroupNorm decompositions
        assert _exact_sizes(result.analysis) == _exact_sizes(
            analyze(entry.build(), entry.example_inputs()))
