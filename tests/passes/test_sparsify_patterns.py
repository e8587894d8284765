"""Patterns, layer eligibility, report and errors of secateurs.passes.sparsify."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.passes.masks import parse_pattern
from secateurs.passes.sparsify import (
    Sparsify,
    is_block_sparse,
    is_nm_sparse,
    sparsify,
    weight_from_2d,
    weight_to_2d,
)

torch.set_num_threads(1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 48)
        self.fc3 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv1d(32, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = self.dw(x).flatten(2)
        x = self.pw(x).mean(-1)
        return self.head(x)


def _calib(shape: tuple[int, ...], count: int = 3) -> list[torch.Tensor]:
    return [torch.randn(*shape) for _ in range(count)]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_mlp_nm_along_in_features(n: int, m: int, method: str) -> None:
    model = MLP()
    result = sparsify(model, pattern=f"{n}:{m}", method=method, calibration=_calib((8, 32)))
    weights = dict(result.model.named_parameters())
    assert set(result.masks) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for name, mask in result.masks.items():
        w = weights[name]
        assert is_nm_sparse(w, n, m, axis=1)
        assert (w[~mask] == 0).all()
        assert mask.sum(1).eq(w.shape[1] * n // m).all()  # exactly n kept per group
    # the pattern runs along `in` only: the output axis of a random weight is not N:M
    assert not is_nm_sparse(weights["fc1.weight"], n, m, axis=0)
    assert result.report.all_valid
    assert result.report.sparsity == pytest.approx(1 - n / m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_cnn_nm_along_channels_and_skips(n: int, m: int, method: str) -> None:
    model = CNN()
    result = sparsify(model, pattern=f"{n}:{m}", method=method, calibration=_calib((2, 3, 8, 8)))
    params = dict(result.model.named_parameters())
    for name in ("conv.weight", "pw.weight", "head.weight"):
        w = params[name]
        assert is_nm_sparse(w, n, m, axis=1), name
        groups = (w.movedim(1, -1) != 0).reshape(-1, m).sum(-1)
        assert (groups <= n).all()
    reasons = {s.name: s.reason for s in result.report.skipped}
    assert reasons["stem.weight"] == f"Conv 'stem' has C=3, not a multiple of {m}"
    assert "groups=32" in reasons["dw.weight"]
    assert "stem.weight" not in result.masks and "dw.weight" not in result.masks
    assert torch.equal(params["stem.weight"], model.stem.weight)  # skipped layers untouched


def test_is_nm_sparse_checks_the_axis() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0], [5.0, 0.0, 6.0, 0.0], [0.0, 0.0, 7.0, 8.0]])
    assert is_nm_sparse(w, 2, 4, axis=1)
    assert not is_nm_sparse(w, 2, 4, axis=0)  # column 2 has three non-zeros
    assert not is_nm_sparse(w, 1, 4, axis=1)
    assert not is_nm_sparse(torch.ones(4, 6), 2, 4, axis=1)  # 6 not a multiple of 4
    conv = torch.zeros(2, 8, 3, 3)
    conv[:, 0] = 1
    conv[:, 5] = 1
    assert is_nm_sparse(conv, 2, 4, axis=1)
    conv[:, 4] = 1  # channels 4 and 5 are fine, three of 4..7 are not
    assert is_nm_sparse(conv, 2, 4, axis=1)
    conv[:, 7] = 1
    assert not is_nm_sparse(conv, 2, 4, axis=1)


def test_weight_2d_view_roundtrip_and_channel_last() -> None:
    w = torch.randn(4, 8, 3, 2)
    w2 = weight_to_2d(w)
    assert w2.shape == (4, 48)
    assert torch.equal(w2[1, (1 * 2 + 1) * 8 + 5], w[1, 5, 1, 1])
    assert torch.equal(weight_from_2d(w2, w.shape), w)


def test_unstructured_per_layer_and_global() -> None:
    model = MLP()
    local = sparsify(model, pattern="unstructured", sparsity=0.7)
    for layer in local.report.layers:
        assert layer.sparsity == pytest.approx(0.7, abs=1e-3)
    glob = sparsify(model, pattern="unstructured", sparsity=0.7, global_=True)
    assert glob.report.sparsity == pytest.approx(0.7, abs=1e-3)
    per_layer = [x.sparsity for x in glob.report.layers]
    assert max(per_layer) - min(per_layer) > 0.01  # a global threshold spreads unevenly
    # every kept weight is at least as large as every pruned one, across layers
    kept = torch.cat([p[m].abs() for p, m in ((dict(glob.model.named_parameters())[k], v) for k, v in glob.masks.items())])
    pruned = torch.cat([dict(model.named_parameters())[k].detach()[~v].abs() for k, v in glob.masks.items()])
    assert kept.min() >= pruned.max()


@pytest.mark.parametrize("block", [4, 8, 16])
def test_bsr_blocks(block: int) -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.Conv2d(4, 4, 1))
    result = sparsify(model, pattern="bsr", sparsity=0.75, block_size=block)
    w = result.model[0].weight.detach()
    assert is_block_sparse(w, block, 0.75)
    tiles = (w != 0).reshape(32 // block, block, 64 // block, block).any(dim=(1, 3))
    assert (~tiles).float().mean().item() == pytest.approx(0.75, abs=1 / tiles.numel())
    reasons = {s.name: s.reason for s in result.report.skipped}
    assert "not divisible into" in reasons["2.weight"]
    assert "Linear layers only" in reasons["3.weight"]


def test_not_inplace_by_default_and_inplace() -> None:
    model = MLP()
    before = model.fc1.weight.detach().clone()
    result = sparsify(model)
    assert torch.equal(model.fc1.weight, before)
    assert result.model is not model
    again = sparsify(model, inplace=True)
    assert again.model is model and (model.fc1.weight == 0).float().mean() == 0.5


def test_second_run_changes_nothing() -> None:
    first = sparsify(MLP(), pattern="2:4").model
    second = sparsify(first, pattern="2:4")
    for (_, a), (_, b) in zip(first.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b)


def test_ignore_and_min_numel_are_reported() -> None:
    result = sparsify(MLP(), ignore=("fc3",), min_numel=2100)
    reasons = {s.name: s.reason for s in result.report.skipped}
    assert reasons["fc3.weight"] == "ignored by request"
    assert reasons["fc1.weight"] == "Linear 'fc1' has 2048 weights, below min_numel=2100"
    assert set(result.masks) == {"fc2.weight"}


def test_report_table_and_dict() -> None:
    result = sparsify(CNN(), pattern="2:4")
    table = result.report.table()
    assert "conv.weight" in table and "skipped: Conv 'stem' has C=3" in table
    data = result.report.to_dict()
    assert data["pattern"] == "2:4" and data["skipped"][0]["reason"]
    conv = next(x for x in data["layers"] if x["name"] == "conv.weight")
    assert conv["shape"] == [32, 16, 3, 3] and conv["valid"] and conv["sparsity"] == 0.5
    assert data["total_zeros"] == sum(x["zeros"] for x in data["layers"])


def test_layer_not_run_in_calibration_is_skipped() -> None:
    model = MLP()
    model.unused = nn.Linear(8, 8)
    result = sparsify(model, method="wanda", calibration=_calib((4, 32)))
    reasons = {s.name: s.reason for s in result.report.skipped}
    assert reasons["unused.weight"].startswith("not executed on the calibration inputs")


def test_calibration_dict_and_tuple_inputs() -> None:
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.b(self.a(x) * scale)

    res_dict = sparsify(KW(), method="wanda", calibration=[{"x": torch.randn(3, 8), "scale": 2.0}])
    res_tuple = sparsify(KW(), method="sparsegpt", calibration=[(torch.randn(3, 8), 2.0)])
    assert res_dict.report.all_valid and res_tuple.report.all_valid and len(res_tuple.masks) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pattern": "3:3"}, "pattern='3:3'"),
        ({"pattern": "two:four"}, "pattern='two:four'"),
        ({"pattern": "unstructured", "sparsity": 1.5}, "sparsity=1.5"),
        ({"method": "obs"}, "method='obs'"),
        ({"method": "wanda"}, "calibration"),
        ({"method": "sparsegpt", "calibration": []}, "calibration"),
        ({"ignore": ("fc9",)}, "fc9"),
        ({"global_": True}, "global_"),
        ({"pattern": "bsr", "block_size": 1}, "block_size"),
    ],
)
def test_bad_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        sparsify(MLP(), **kwargs)


def test_parse_pattern() -> None:
    assert parse_pattern("2:4").n == 2 and parse_pattern(" 4:8 ").m == 8
    assert parse_pattern("BSR", 32).block == 32
    assert str(parse_pattern("unstructured")) == "unstructured"
    assert Sparsify(pattern="1:4").target_sparsity == 0.75


def test_parametrized_weights_are_skipped_with_the_reason() -> None:
    """``weight_norm`` / ``spectral_norm`` recompute ``weight`` at every forward: the sparse
    copy went into the recomputed tensor, so the layer stayed dense while the report said
    50% (and its mask named no parameter). Such layers are skipped, saying why."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(32, 64)), nn.ReLU(),
                          spectral_norm(nn.Linear(64, 16)), nn.ReLU(), nn.Linear(16, 8))
    result = sparsify(model, "2:4")
    assert [layer.name for layer in result.report.layers] == ["4.weight"]
    skipped = {s.name: s.reason for s in result.report.skipped}
    assert set(skipped) == {"0.weight", "2.weight"}
    assert all("parametrization" in r for r in skipped.values())
    assert result.report.total_zeros == int((result.model[4].weight == 0).sum())


def test_zeros_reported_are_the_weights_zeros() -> None:
    """``zeros`` counted the entries the mask dropped; a weight with zero rows already (an
    embedding's padding row, SparseGPT's dead inputs) has more zeros than that."""
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[:4] = 0  # 4 rows of 64 already zero
    result = sparsify(model, "2:4")
    layer = next(x for x in result.report.layers if x.name == "fc2.weight")
    assert layer.zeros == int((result.model.fc2.weight == 0).sum()) > 48 * 64 // 2


def test_matrix_parameters_outside_layers_are_reported_dense() -> None:
    """A module that multiplies by its own matrix parameter (a router, an RNN, batched
    experts) is not a Linear: the report lists it as left dense instead of leaving it out."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 16, 32))
            self.cls = nn.Parameter(torch.randn(1, 1, 32))  # a token, not a GEMM weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bi,eoi->beo", x, self.w).sum(1) + self.cls[0, 0, :16].sum()

    model = nn.Sequential(nn.Linear(8, 32), Experts(), nn.GRU(16, 16))
    result = sparsify(model, "2:4")
    skipped = {s.name: s.reason for s in result.report.skipped}
    assert "outside a recognised MoE block" in skipped["1.w"]
    assert "not an nn.Linear" in skipped["2.weight_ih_l0"]
    assert "1.cls" not in skipped
