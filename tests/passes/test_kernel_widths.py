"""The ORT CPU kernel-width policy (``round_to="auto"``) and the shape-patch fold: the widths
the policy keeps per op kind, an explicit ``round_to`` staying authoritative, and every prune
still mask-equivalent."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _passes_testlib import export_onnx
from torch import nn

from secateurs.graph.onnx_apply import apply_plan_onnx
from secateurs.passes.kernel_widths import WidthRule, group_kind, ort_cpu_widths
from secateurs.passes.onnx_fold_patches import fold_shape_patches
from secateurs.passes.prune_onnx import analyze_onnx, prune_onnx

torch.set_num_threads(1)


class _Convs(nn.Module):
    """Conv groups of 24, 32 and 96 channels, then a linear hidden group of 100."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 96, 1)
        self.fc1 = nn.Linear(96, 100)
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


class _Attention(nn.Module):
    """One self-attention block with 4 heads of dim 40, shapes computed at run time."""

    def __init__(self, dim: int = 160, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def _out_channels(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: int(t.dims[0]) for t in model.graph.initializer
            if t.name.endswith(".weight") and len(t.dims) == 4}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_width_rule_multiples_minimum_and_small_groups() -> None:
    rule = WidthRule(16, 32)
    assert rule.keep(96, 48) == 48
    assert rule.keep(96, 41) == 48  # up to the block
    assert rule.keep(64, 16) == 32  # never below two blocks
    assert rule.keep(32, 16) == 32  # a 32-channel group stays whole
    assert rule.keep(24, 12) == 24  # narrower than the minimum: whole
    assert WidthRule(16).keep(10, 3) == 3  # smaller than the block: as chosen
    assert WidthRule().keep(50, 7) == 7


def test_policy_widths_on_convs_and_linears() -> None:
    model = export_onnx(_Convs(), torch.rand(1, 3, 8, 8))
    analysis = analyze_onnx(model, {"x": [1, 3, 8, 8]})
    policy = ort_cpu_widths(analysis)
    kinds = {g.size: group_kind(analysis, g) for g in analysis.groups if g.prunable}
    assert kinds[24] == kinds[32] == kinds[96] == "conv"
    assert kinds[100] == "dense"
    assert policy.summary()["conv"] >= 3
    result = prune_onnx(model, ratio=0.5, input_shapes={"x": [1, 3, 8, 8]}, verify=True)
    assert result.report.exact
    widths = _out_channels(result.model)
    assert widths == {"a.weight": 24, "b.weight": 32, "c.weight": 48}
    fc1 = next(t for t in result.model.graph.initializer if t.name == "fc1.weight")
    assert fc1.dims[0] == 64  # 100 -> 50, rounded up to the next multiple of 16


def test_explicit_round_to_stays_authoritative() -> None:
    model = export_onnx(_Convs(), torch.rand(1, 3, 8, 8))
    result = prune_onnx(model, ratio=0.5, round_to=1, input_shapes={"x": [1, 3, 8, 8]},
                        verify=True)
    assert result.report.exact
    assert _out_channels(result.model) == {"a.weight": 12, "b.weight": 16, "c.weight": 48}
    r16 = prune_onnx(model, ratio=0.5, round_to=16, input_shapes={"x": [1, 3, 8, 8]})
    assert _out_channels(r16.model) == {"a.weight": 16, "b.weight": 16, "c.weight": 48}
    with pytest.raises(Exception, match="round_to"):
        prune_onnx(model, ratio=0.5, round_to="fast")


def test_head_dims_rounded_heads_not_and_exact() -> None:
    torch.manual_seed(0)
    model = export_onnx(_Attention(), torch.rand(1, 10, 160))
    shapes = {"x": [1, 10, 160]}
    analysis = analyze_onnx(model, shapes)
    kinds = sorted((group_kind(analysis, g), g.size) for g in analysis.groups if g.prunable)
    assert ("head_dim", 40) in kinds and ("heads", 4) in kinds
    result = prune_onnx(model, ratio=0.7, input_shapes=shapes, verify=True)
    assert result.report.exact
    qkv = next(t for t in result.model.graph.initializer if t.name == "qkv.bias")
    # width 0.3 of 4 x 40: heads first, 4 -> 2 (a head is not rounded); the head dims make up
    # the rest, 40 -> 24 (0.3 / 0.5 of 40), rounded up to 32
    assert qkv.dims[0] == 3 * 2 * 32
    unrounded = prune_onnx(model, ratio=0.7, round_to=1, input_shapes=shapes)
    qkv1 = next(t for t in unrounded.model.graph.initializer if t.name == "qkv.bias")
    assert qkv1.dims[0] == 3 * 2 * 24


def test_fold_removes_shape_patches_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = export_onnx(_Attention(), torch.rand(1, 10, 160))
    shapes = {"x": [1, 10, 160]}
    result = prune_onnx(model, ratio=0.5, round_to=16, input_shapes=shapes, verify=True)
    assert result.report.exact
    patched = apply_plan_onnx(model, result.plan)  # the apply alone: run-time shapes patched
    assert any(n.op_type == "Where" for n in patched.graph.node)
    assert not any(n.op_type == "Where" for n in result.model.graph.node)
    onnx.checker.check_model(result.model, full_check=True)
    for batch in (1, 3):  # the batch stays dynamic
        x = np.random.default_rng(batch).standard_normal((batch, 10, 160)).astype(np.float32)
        np.testing.assert_array_equal(_run(patched, x), _run(result.model, x))
    again = fold_shape_patches(result.model)
    assert again.folded == 0  # a second run changes nothing
