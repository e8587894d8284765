"""The torch.export fallback keeps the batch symbolic, so a pruned model runs at any batch."""

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
