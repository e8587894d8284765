"""Streaming sparsification from safetensors shards gives the in-memory masks and weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.passes.sparsify import (
    ShardedCheckpoint,
    Sparsify,
    is_nm_sparse,
    save_sharded,
    sparsify,
    sparsify_streaming,
)

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


def _model() -> nn.Sequential:
    return nn.Sequential(Block(), Block(), Block())


def test_sharded_checkpoint_loads_only_what_is_asked(tmp_path) -> None:
    model = _model()
    index = save_sharded(model.state_dict(), tmp_path, max_shard_bytes=3000)
    files = set(json.loads(index.read_text())["weight_map"].values())
    assert len(files) > 2
    ckpt = ShardedCheckpoint(tmp_path)
    block = ckpt.load_prefix("1")
    assert set(block) == set(Block().state_dict())
    assert torch.equal(block["up.weight"], model[1].up.weight)
    with pytest.raises(InputError, match="nope"):
        ckpt.load(["nope"])


@pytest.mark.parametrize("method,pattern", [("sparsegpt", "2:4"), ("wanda", "unstructured"), ("magnitude", "4:8")])
def test_streaming_equals_in_memory(tmp_path, method: str, pattern: str) -> None:
    model = _model()
    save_sharded(model.state_dict(), tmp_path / "dense", max_shard_bytes=4000)
    calibration = [torch.randn(4, 8, 16) for _ in range(3)]
    options = Sparsify(pattern=pattern, method=method, sparsity=0.6)
    in_memory = options(model, calibration)
    blocks = [(str(i), lambda: Block()) for i in range(3)]
    streamed = sparsify_streaming(blocks, tmp_path / "dense", calibration, tmp_path / "sparse", options)

    assert streamed.masks.keys() == in_memory.masks.keys() and len(streamed.masks) == 6
    for name, mask in in_memory.masks.items():
        assert torch.equal(streamed.masks[name], mask), name
    out = ShardedCheckpoint(tmp_path / "sparse")
    state = out.load(out.names())
    for name, tensor in in_memory.model.state_dict().items():
        assert torch.allclose(state[name], tensor, atol=1e-6), name
    if pattern == "2:4":
        assert is_nm_sparse(state["2.down.weight"], 2, 4)
    assert streamed.report.sparsity == pytest.approx(in_memory.report.sparsity)
    assert (tmp_path / "sparse" / "masks.pt").exists()


def test_streaming_meta_factories_and_passthrough_tensors(tmp_path) -> None:
    model = nn.ModuleDict({"blocks": _model(), "head": nn.Linear(16, 3)})
    save_sharded(model.state_dict(), tmp_path / "dense")

    def meta_block() -> nn.Module:
        with torch.device("meta"):
            return Block()

    blocks = [(f"blocks.{i}", meta_block) for i in range(3)]
    calibration = [torch.randn(8, 16)]
    result = sparsify_streaming(blocks, tmp_path / "dense", calibration, tmp_path / "sparse",
                                Sparsify(method="sparsegpt"))
    out = ShardedCheckpoint(tmp_path / "sparse")
    assert torch.equal(out.load(["head.weight"])["head.weight"], model["head"].weight)
    reference = sparsify(model["blocks"], method="sparsegpt", calibration=calibration)
    for name, mask in reference.masks.items():
        assert torch.equal(result.masks[f"blocks.{name}"], mask)
