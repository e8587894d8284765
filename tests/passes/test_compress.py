"""Compressed storage: exact roundtrips and identical outputs to the masked dense weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs.errors import InputError
from secateurs.passes.compress import (
    compression_sizes,
    dequantize_int8,
    load_compressed,
    pack_bits,
    pack_nm,
    quantize_int8,
    save_compressed,
    sparse_nbytes,
    to_bsr,
    to_csc,
    to_csr,
    unpack_bits,
    unpack_nm,
)
from secateurs.passes.sparsify import sparsify

torch.set_num_threads(1)


def _nm_weight(rows: int, cols: int, n: int = 2, m: int = 4) -> torch.Tensor:
    layer = nn.Linear(cols, rows)
    return sparsify(layer, pattern=f"{n}:{m}").model.weight.detach()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bit_packing_roundtrip(bits: int) -> None:
    values = torch.randint(0, 1 << bits, (1001,))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pack_roundtrip_exact(n: int, m: int) -> None:
    w = _nm_weight(16, 64, n, m)
    w[0, :m] = 0  # a group with fewer than n non-zeros
    packed = pack_nm(w, n, m)
    assert packed.values.numel() == w.numel() * n // m
    assert torch.equal(unpack_nm(packed), w)


def test_2_4_uses_two_bit_indices() -> None:
    w = _nm_weight(32, 64)
    packed = pack_nm(w)
    assert packed.bits == 2
    assert packed.indices.numel() == w.numel() // 2 * 2 // 8
    assert packed.nbytes == w.numel() // 2 * 4 + w.numel() // 8


def test_conv_nm_pack_along_channels() -> None:
    conv = sparsify(nn.Conv2d(8, 4, 3), pattern="2:4").model.weight.detach()
    packed = pack_nm(conv, axis=1)
    assert torch.equal(unpack_nm(packed), conv)
    with pytest.raises(InputError, match="not 2:4 sparse"):
        pack_nm(torch.randn(4, 8, 3, 3))


def test_outputs_identical_dense_packed_and_sparse_matmul() -> None:
    w = _nm_weight(32, 64)
    x = torch.randn(5, 64)
    dense_out = F.linear(x, w)
    assert torch.equal(F.linear(x, unpack_nm(pack_nm(w))), dense_out)
    for sparse in (to_csr(w), to_bsr(w, 4)):
        assert torch.allclose(torch.mm(sparse, x.T).T, dense_out, atol=1e-5)
        assert torch.equal(sparse.to_dense(), w)
    assert torch.equal(to_csc(w).to_dense(), w)


def test_sizes_and_int8_stacking() -> None:
    w = _nm_weight(64, 128)
    sizes = compression_sizes(w, block=4)
    assert sizes.dense == 64 * 128 * 4
    assert sizes.nm == 64 * 64 * 4 + 64 * 128 // 8
    assert sizes.csr == sparse_nbytes(to_csr(w)) > sizes.nm
    assert sizes.int8_nm == 64 * 64 + 64 * 128 // 8 + 64 * 4
    assert sizes.ratios()["int8_nm"] > 6.0  # 2:4 (~1.8x) stacked with int8 (4x)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and ((q == 0) == (w == 0)).all()  # sparsity survives
    assert (dequantize_int8(q, scale) - w).abs().max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("fmt", ["nm", "csr", "bsr"])
@pytest.mark.parametrize("int8", [False, True])
def test_save_load_compressed_model(tmp_path, fmt: str, int8: bool) -> None:
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Conv1d(128, 8, 1), nn.Linear(3, 4))
    result = sparsify(model, pattern="2:4", ignore=("3",))
    path = tmp_path / "model.pt"
    size = save_compressed(result.model, result.masks, path, fmt=fmt, block=4, int8=int8)
    assert size == path.stat().st_size > 0
    state = load_compressed(path)
    for name, tensor in result.model.state_dict().items():
        if int8 and name in result.masks:
            q, scale = quantize_int8(tensor)
            assert torch.equal(state[name], dequantize_int8(q, scale))
        else:
            assert torch.equal(state[name], tensor), name
    dense_path = tmp_path / "dense.pt"
    torch.save(result.model.state_dict(), dense_path)
    dense_size = dense_path.stat().st_size
    if fmt == "nm":  # 2:4 values + 2-bit indices: ~56% of fp32, ~16% with int8 values
        assert size < dense_size * (0.3 if int8 else 0.65)
