"""transformers' own Mamba (``MambaModel``, its PyTorch reference path: no ``mamba_ssm`` /
``causal_conv1d`` kernels here) through the generic ``secateurs.prune``: the selective scan
starts from ``torch.zeros(batch, intermediate, state)``, which pinned the intermediate width
until filled factories learned to follow it."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import MambaConfig, MambaModel  # noqa: E402

import secateurs  # noqa: E402


class _Hidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids, use_cache=False).last_hidden_state


def test_hf_mamba_prunes_its_intermediate_width_exactly() -> None:
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=2,
                      intermediate_size=64, time_step_rank=4, conv_kernel=4, use_cache=False)
    model = _Hidden(MambaModel(cfg).eval())
    ids = torch.randint(0, 50, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = secateurs.prune(model, (ids,), ratio=0.5, verify=True)
    assert result.report.exact is True
    assert result.report.macs_kept < 0.6  # 0.955 while the zero state pinned the width
    inner = next(g for g in result.report.groups
                 if g.members.startswith("m.layers.0.mixer.A_log[0]"))
    assert inner.units_after <= inner.units_before // 2 and not inner.pinned
    with torch.no_grad():  # another batch and length
        out = result.model(torch.randint(0, 50, (3, 7)))
    assert tuple(out.shape) == (3, 7, 32)
