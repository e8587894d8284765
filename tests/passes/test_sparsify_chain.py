"""Sequential calibration through a chain of blocks (cached block inputs) equals the prefix runs.

The chained mode runs each layer's own block on cached inputs instead of the whole model
prefix; it must give exactly the masks and (up to float rounding) the weights of the prefix
runs, be refused where a block is not a function of the previous block's output and the same
other arguments, and run O(blocks) block forwards instead of O(blocks²).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.passes import sparsify as sp

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.calls = 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) * scale + mask, -1)
        x = x + self.o(att @ self.v(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Encoder(nn.Module):
    """Blocks called as ``block(x, mask, scale=...)``, then a head outside the chain."""

    def __init__(self, n: int = 4, d: int = 16, per_block_scale: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 4)
        self.per_block_scale = per_block_scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, scale=1.0 / (i + 1) if self.per_block_scale else 0.5)
        return self.head(h)


def _calibration(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(2, 6, 8, generator=g),
             "mask": torch.zeros(2, 1, 6).masked_fill(torch.rand(2, 1, 6, generator=g) < 0.2, -1e4)}
            for _ in range(n)]


def _prefix_run(monkeypatch, model, pattern: str, method: str, calibration):
    """``sparsify`` with the block chain disabled: every layer's statistics from a prefix run
    of the model (the reference the chained path must reproduce)."""
    with monkeypatch.context() as m:
        m.setattr(sp, "_chain_container", lambda model, layers: None)
        return sp.sparsify(model, pattern, method=method, calibration=calibration,
                           sequential="layer")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_chained_equals_prefix_runs(monkeypatch, method, pattern):
    torch.manual_seed(0)
    model = Encoder()
    chained = sp.sparsify(model, pattern, method=method, calibration=_calibration(),
                          sequential="layer")
    prefix = _prefix_run(monkeypatch, model, pattern, method, _calibration())
    assert chained.masks.keys() == prefix.masks.keys() and len(chained.masks) == 26
    for name, mask in prefix.masks.items():
        assert torch.equal(chained.masks[name], mask), name
    for (name, a), (_, b) in zip(chained.model.named_parameters(), prefix.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_chain_detected_and_forwards_linear_in_blocks(monkeypatch):
    torch.manual_seed(0)
    model = Encoder(n=6)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    container = sp._chain_container(model, layers)
    assert container == tuple(f"layers.{i}" for i in range(6))
    _, _, chain = sp._probe(model, layers, _calibration()[0], container)
    assert chain is not None and not chain.first
    assert chain.block_of(["layers.2.q", "layers.2.k"]) == 2 and chain.block_of(["head"]) is None

    def block_calls(prefix_only: bool, sequential) -> int:
        work = Encoder(n=6)
        work.load_state_dict(model.state_dict())
        with monkeypatch.context() as m:
            if prefix_only:
                m.setattr(sp, "_chain_container", lambda model, layers: None)
            sp.sparsify(work, "2:4", method="wanda", calibration=_calibration(), inplace=True,
                        sequential=sequential)
        return sum(b.calls for b in work.layers)

    samples = len(_calibration())
    for sequential, runs_per_block in (("layer", 4), (True, 1)):
        chained, prefix = block_calls(False, sequential), block_calls(True, sequential)
        # chained: probe (6) + replay (2 + a forward of the last sample: 6) + per block
        # `runs_per_block` stopped statistics runs and one output run, per sample, + the head
        # (outside the chain: one full forward per sample)
        assert chained <= 6 + 2 + 6 + 6 * (runs_per_block + 1) * samples + 6 * samples
        assert prefix > 2 * chained  # the prefix runs re-run every earlier block


def test_chain_refused_when_blocks_get_different_arguments():
    model = Encoder(per_block_scale=True)  # scale differs per block: not a chain
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    _, _, chain = sp._probe(model, layers, _calibration()[0], sp._chain_container(model, layers))
    assert chain is None
    result = sp.sparsify(model, "2:4", method="sparsegpt", calibration=_calibration())
    assert result.report.all_valid and len(result.report.layers) == 26


def test_chain_refused_when_a_layer_is_called_from_another_block():
    model = Encoder()
    model.layers[2].fc2 = model.layers[1].fc2  # one module, two blocks
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    _, _, chain = sp._probe(model, layers, _calibration()[0], sp._chain_container(model, layers))
    assert chain is None


class StatefulBlock(nn.Module):
    """Reads a per-sample tensor the model stores on itself: not a function of its arguments."""

    def __init__(self, owner: list[torch.Tensor], d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.owner = owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.owner[0]


class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.state: list[torch.Tensor] = [torch.ones(1)]
        self.blocks = nn.Sequential(*(StatefulBlock(self.state) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.state[0] = x.mean().reshape(1)
        return self.blocks(x)


def test_chain_refused_when_a_replay_does_not_reproduce(monkeypatch):
    model = Stateful()
    samples = [torch.randn(8, 16), torch.randn(8, 16) + 3.0]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    container = sp._chain_container(model, layers)
    _, _, chain = sp._probe(model, layers, samples[0], container)
    assert chain is not None  # arguments chain, but the blocks read the model's state
    assert not sp._replays(chain, model, samples)
    result = sp.sparsify(model, "2:4", method="wanda", calibration=samples, sequential="layer")
    prefix = _prefix_run(monkeypatch, model, "2:4", "wanda", samples)
    for name, mask in prefix.masks.items():
        assert torch.equal(result.masks[name], mask), name


def test_chain_on_hugging_face_bert(monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, 64, (2, 7), generator=g),
                    "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    container = sp._chain_container(model, layers)
    assert container == tuple(f"encoder.layer.{i}" for i in range(3))
    _, _, chain = sp._probe(model, layers, calibration[0], container)
    assert chain is not None
    chained = sp.sparsify(model, "2:4", method="sparsegpt", calibration=calibration,
                          sequential="layer")
    prefix = _prefix_run(monkeypatch, model, "2:4", "sparsegpt", calibration)
    for name, mask in prefix.masks.items():
        assert torch.equal(chained.masks[name], mask), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_mode_calibrates_a_block_on_its_dense_self_after_sparse_blocks(method):
    """sequential=True (the papers' loop): every layer of block i sees the inputs the model
    gives with blocks < i sparse and block i still dense."""
    torch.manual_seed(0)
    model = Encoder(n=3)
    calib = _calibration()
    result = sp.sparsify(model, "2:4", method=method, calibration=calib)
    dense1 = model.layers[1]
    captured: list[torch.Tensor] = []
    hook = dense1.o.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        for batch in calib:  # sparse embed + block 0 (from the result), dense block 1
            h = result.model.embed(batch["x"])
            h = result.model.layers[0](h, batch["mask"], scale=0.5)
            dense1(h, batch["mask"], scale=0.5)
    hook.remove()
    alone = sp.sparsify(dense1.o, "2:4", method=method, calibration=captured)
    assert torch.equal(alone.masks["weight"], result.masks["layers.1.o.weight"])
    assert torch.allclose(alone.model.weight, result.model.layers[1].o.weight, atol=1e-5)
    layer = sp.sparsify(model, "2:4", method=method, calibration=calib, sequential="layer")
    assert torch.equal(layer.masks["layers.0.q.weight"], result.masks["layers.0.q.weight"])
    with pytest.raises(sp.InputError, match="sequential"):
        sp.sparsify(model, "2:4", method=method, calibration=calib, sequential="blocks")
