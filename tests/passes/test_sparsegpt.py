"""SparseGPT: the OBS update lowers a layer's output error versus magnitude pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.passes.masks import parse_pattern
from secateurs.passes.sparsegpt import HessianAccumulator, SparseGPTOptions, sparsegpt_prune
from secateurs.passes.sparsify import _execution_order, is_block_sparse, is_nm_sparse, sparsify

torch.set_num_threads(1)


def _correlated_inputs(tokens: int, features: int, rank: int = 8) -> torch.Tensor:
    """Inputs with strongly correlated features (low-rank plus noise, uneven scales)."""
    latent = torch.randn(tokens, rank)
    mix = torch.randn(rank, features)
    scales = torch.logspace(-1, 1, features)
    return (latent @ mix + 0.1 * torch.randn(tokens, features)) * scales


def _output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "unstructured", "bsr"])
def test_sparsegpt_beats_magnitude_on_one_linear(pattern: str) -> None:
    layer = nn.Linear(64, 32)
    x = _correlated_inputs(512, 64)
    calibration = [x[i : i + 128] for i in range(0, 512, 128)]
    mag = sparsify(layer, pattern=pattern, sparsity=0.5, block_size=8)
    sgpt = sparsify(layer, pattern=pattern, sparsity=0.5, block_size=8, method="sparsegpt", calibration=calibration)
    w = layer.weight.detach()
    err_mag = _output_error(w, mag.model.weight.detach(), x)
    err_sgpt = _output_error(w, sgpt.model.weight.detach(), x)
    assert err_sgpt < err_mag
    assert sgpt.report.sparsity == pytest.approx(mag.report.sparsity)
    assert sgpt.report.all_valid


def test_sparsegpt_prune_returns_pattern_and_zeros() -> None:
    w = torch.randn(16, 32)
    x = _correlated_inputs(256, 32)
    acc = HessianAccumulator(32)
    acc.add(x)
    h = acc.hessian()
    assert torch.allclose(h.double(), 2 * x.double().T @ x.double() / 256, rtol=1e-5, atol=1e-5)
    new, keep = sparsegpt_prune(w, h, parse_pattern("2:4"), options=SparseGPTOptions(blocksize=8))
    assert is_nm_sparse(new, 2, 4, axis=1) and keep.sum() == w.numel() // 2
    assert (new[~keep] == 0).all()
    new_b, keep_b = sparsegpt_prune(w, h, parse_pattern("bsr", 4), sparsity=0.5, options=SparseGPTOptions(blocksize=8))
    assert is_block_sparse(new_b, 4, 0.5)


def test_dead_input_columns_are_pruned_first() -> None:
    w = torch.randn(8, 16)
    x = torch.randn(128, 16)
    x[:, 3] = 0.0
    acc = HessianAccumulator(16)
    acc.add(x)
    _, keep = sparsegpt_prune(w, acc.hessian(), parse_pattern("2:4"))
    assert not keep[:, 3].any()


def test_sequential_calibration_uses_sparse_prefix() -> None:
    """With sequential=True the second layer sees the first layer's *sparse* output."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    calibration = [torch.randn(64, 16) for _ in range(2)]
    seq = sparsify(model, method="sparsegpt", calibration=calibration)
    one_pass = sparsify(model, method="sparsegpt", calibration=calibration, sequential=False)
    assert torch.equal(seq.masks["0.weight"], one_pass.masks["0.weight"])
    # layer 1's Hessian differs, so its update does
    assert not torch.equal(seq.model[1].weight, one_pass.model[1].weight)
    # and matches a run on layer 1 alone fed by the sparse layer 0
    sparse_inputs = [seq.model[0](c).detach() for c in calibration]
    alone = sparsify(model[1], method="sparsegpt", calibration=sparse_inputs)
    assert torch.allclose(alone.model.weight, seq.model[1].weight, atol=1e-6)


def test_layers_reading_the_same_input_are_calibrated_in_one_pass() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.q(x) * self.k(x) + self.v(x))

    model = Attention()
    calibration = [torch.randn(32, 16) for _ in range(2)]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    calls, groups = _execution_order(model, linears, calibration[0])
    assert groups == [["q", "k", "v"], ["o"]] and set(calls.values()) == {1}
    result = sparsify(model, method="sparsegpt", calibration=calibration)
    alone = sparsify(model.v, method="sparsegpt", calibration=calibration)
    assert torch.equal(alone.model.weight, result.model.v.weight)
    sparse_hidden = [(result.model.q(c) * result.model.k(c) + result.model.v(c)).detach() for c in calibration]
    o_alone = sparsify(model.o, method="sparsegpt", calibration=sparse_hidden)
    assert torch.allclose(o_alone.model.weight, result.model.o.weight, atol=1e-6)
