"""Compressed *storage* for sparse weights: N:M values + bit-packed indices, CSR/CSC/BSR, INT8.

These are file formats and size calculations: :func:`load_compressed` turns every entry back
into a dense float tensor, so nothing here runs in INT8 or sparse arithmetic. A model that a
runtime executes in INT8 comes from ``secateurs.passes.quantize`` (ONNX QDQ through
``onnxruntime.quantization``; ``secateurs optimize --quantize int8``), whose measured size and
latency are in ``tools/bench/results/optimize_pipeline.json``.

N:M packing (2:4: values + 2-bit indices)
    Along the reduction axis (moved last) every group of ``M`` entries keeps exactly ``N``
    slots: its non-zeros, padded with zeros of the group when it has fewer. ``values`` holds
    the ``N`` kept entries per group (``numel·N/M`` values) and ``indices`` their positions
    ``0..M-1`` in ascending order, bit-packed at ``ceil(log2 M)`` bits each (2 bits for 2:4, so
    a 2:4 fp16 weight costs ``numel·(N/M)·2 + numel·(N/M)·2/8`` bytes, 56.25% of dense).
    Unpacking scatters the values back; the roundtrip is exact.

CSR / CSC / BSR
    ``torch.sparse`` layouts of the 2-D view ``W.reshape(out, -1)``; their size is the sum of the
    index and value buffers. ``torch.mm(W_csr, X)`` runs on them directly. Files store the
    indices as int32 where they fit (torch builds them as int64).

INT8 storage (Deep Compression style stacking; dequantized on load)
    Per-output-channel symmetric quantization ``q = clamp(round(W / s_k), -127, 127)``,
    ``s_k = max|W_k| / 127``; zeros stay zeros, so the sparsity pattern survives and the
    compressed forms above can hold ``q`` instead of ``W``, adding one float32 scale per
    output channel. It is the weight scheme ``passes.quantize`` asks
    ``onnxruntime.quantization`` for (per channel, symmetric, zero point 0), so these sizes
    estimate the weight bytes of an executed QDQ model; activations are not quantized here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from secateurs.errors import InputError

__all__ = [
    "NMPacked",
    "pack_nm",
    "unpack_nm",
    "pack_bits",
    "unpack_bits",
    "to_csr",
    "to_csc",
    "to_bsr",
    "sparse_nbytes",
    "quantize_int8",
    "dequantize_int8",
    "CompressionSizes",
    "compression_sizes",
    "save_compressed",
    "load_compressed",
]

Format = Literal["nm", "csr", "bsr", "dense"]


# --------------------------------------------------------------------------- bit packing


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` into a flat ``uint8`` tensor, little-endian."""
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise InputError(f"values do not fit in {bits} bits")
    bit_array = (flat.unsqueeze(1) >> torch.arange(bits)) & 1
    stream = bit_array.reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` integers, as ``int64``."""
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits)).sum(1)


# --------------------------------------------------------------------------- N:M packing


@dataclass(frozen=True)
class NMPacked:
    """An N:M sparse weight as kept values plus bit-packed in-group indices."""

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple[int, ...]
    n: int
    m: int
    axis: int

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.m)))

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel()


def pack_nm(weight: torch.Tensor, n: int = 2, m: int = 4, axis: int = 1) -> NMPacked:
    """Pack an N:M sparse ``weight`` (groups of ``m`` along ``axis``); raises if it is not N:M."""
    moved = torch.movedim(weight.detach(), axis, -1)
    if moved.shape[-1] % m:
        raise InputError(f"size {moved.shape[-1]} along axis {axis} is not a multiple of M={m}")
    groups = moved.reshape(-1, m)
    nonzero = groups != 0
    if bool((nonzero.sum(1) > n).any()):
        raise InputError(f"weight is not {n}:{m} sparse along axis {axis}; sparsify it first")
    position = torch.arange(m)
    # non-zeros first, then the group's leading zeros as padding; stored in ascending order
    key = nonzero.to(torch.int64) * (2 * m) + (m - 1 - position)
    chosen = torch.topk(key, n, dim=1).indices.sort(dim=1).values
    values = torch.gather(groups, 1, chosen)
    return NMPacked(
        values=values.reshape(*moved.shape[:-1], -1).contiguous(),
        indices=pack_bits(chosen, max(1, math.ceil(math.log2(m)))),
        shape=tuple(weight.shape), n=n, m=m, axis=axis,
    )


def unpack_nm(packed: NMPacked) -> torch.Tensor:
    """Dense weight from :func:`pack_nm`; exact."""
    values = packed.values.reshape(-1, packed.n)
    chosen = unpack_bits(packed.indices, packed.bits, values.numel()).reshape(-1, packed.n)
    groups = torch.zeros(values.shape[0], packed.m, dtype=values.dtype)
    groups.scatter_(1, chosen, values)
    moved_shape = list(packed.shape)
    moved_shape.append(moved_shape.pop(packed.axis))
    return torch.movedim(groups.reshape(moved_shape), -1, packed.axis).contiguous()


# --------------------------------------------------------------------------- torch.sparse layouts


def _as_2d(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1)


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """CSR of the 2-D view ``[out, -1]``."""
    return _as_2d(weight).to_sparse_csr()


def to_csc(weight: torch.Tensor) -> torch.Tensor:
    """CSC of the 2-D view ``[out, -1]``."""
    return _as_2d(weight).to_sparse_csc()


def to_bsr(weight: torch.Tensor, block: int) -> torch.Tensor:
    """BSR with ``block×block`` blocks of the 2-D view ``[out, -1]``."""
    w2 = _as_2d(weight)
    if w2.shape[0] % block or w2.shape[1] % block:
        raise InputError(f"shape {tuple(w2.shape)} does not divide into {block}x{block} blocks")
    return w2.to_sparse_bsr((block, block))


def sparse_nbytes(tensor: torch.Tensor) -> int:
    """Bytes held by a tensor's buffers: indices plus values for sparse layouts."""
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    elif tensor.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
    elif tensor.layout == torch.sparse_coo:
        parts = [tensor.indices(), tensor.values()]
    else:
        parts = [tensor]
    return sum(p.numel() * p.element_size() for p in parts)


# --------------------------------------------------------------------------- INT8


def quantize_int8(weight: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric INT8 along ``axis``: returns ``(q int8, scale float32)``."""
    w = weight.detach().float()
    reduce = [d for d in range(w.dim()) if d != axis]
    amax = w.abs().amax(dim=reduce, keepdim=True) if reduce else w.abs()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)
    return q, scale.reshape(-1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``q · scale`` broadcast along ``axis``."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.float() * scale.reshape(shape)


@dataclass(frozen=True)
class CompressionSizes:
    """Bytes of one weight in each storage form (``None`` where the form does not apply)."""

    dense: int
    csr: int
    bsr: int | None
    nm: int | None
    int8_dense: int
    int8_nm: int | None
    int8_csr: int

    def ratios(self) -> dict[str, float]:
        """Dense bytes over each form's bytes."""
        out = {}
        for key in ("csr", "bsr", "nm", "int8_dense", "int8_nm", "int8_csr"):
            value = getattr(self, key)
            if value:
                out[key] = self.dense / value
        return out


def compression_sizes(
    weight: torch.Tensor, n: int = 2, m: int = 4, axis: int = 1, block: int | None = None
) -> CompressionSizes:
    """Sizes of ``weight`` stored dense, CSR, BSR, N:M packed, and each with INT8 values."""
    dense = weight.numel() * weight.element_size()
    q, scale = quantize_int8(weight)
    scale_bytes = scale.numel() * scale.element_size()
    moved = torch.movedim(weight, axis, -1) if weight.dim() > axis else weight
    nm_ok = moved.shape[-1] % m == 0 and bool(((moved != 0).reshape(-1, m).sum(1) <= n).all())
    nm = pack_nm(weight, n, m, axis).nbytes if nm_ok else None
    bsr = None
    w2 = _as_2d(weight)
    if block and w2.shape[0] % block == 0 and w2.shape[1] % block == 0:
        bsr = sparse_nbytes(to_bsr(weight, block))
    return CompressionSizes(
        dense=dense,
        csr=sparse_nbytes(to_csr(weight)),
        bsr=bsr,
        nm=nm,
        int8_dense=q.numel() + scale_bytes,
        int8_nm=pack_nm(q, n, m, axis).nbytes + scale_bytes if nm_ok else None,
        int8_csr=sparse_nbytes(to_csr(q)) + scale_bytes,
    )


# --------------------------------------------------------------------------- model files


def _encode(weight: torch.Tensor, fmt: Format, n: int, m: int, block: int) -> dict[str, Any]:
    if fmt == "nm":
        p = pack_nm(weight, n, m, axis=1)
        return {"format": "nm", "values": p.values, "indices": p.indices, "shape": p.shape,
                "n": n, "m": m, "axis": 1}
    if fmt in ("csr", "bsr"):
        t = to_bsr(weight, block) if fmt == "bsr" else to_csr(weight)
        index_dtype = torch.int32 if t.col_indices().numel() < 2**31 else torch.int64
        return {"format": fmt, "crow": t.crow_indices().to(index_dtype).clone(),
                "col": t.col_indices().to(index_dtype).clone(), "values": t.values().clone(),
                "shape": tuple(weight.shape), "block": block}
    return {"format": "dense", "values": weight.detach().clone(), "shape": tuple(weight.shape)}


def _decode(entry: Mapping[str, Any]) -> torch.Tensor:
    fmt = entry["format"]
    shape = tuple(entry["shape"])
    if fmt == "nm":
        w = unpack_nm(NMPacked(entry["values"], entry["indices"], shape, entry["n"], entry["m"], entry["axis"]))
    elif fmt in ("csr", "bsr"):
        rows = shape[0]
        cols = math.prod(shape[1:])
        ctor = torch.sparse_csr_tensor if fmt == "csr" else torch.sparse_bsr_tensor
        w = ctor(entry["crow"], entry["col"], entry["values"], size=(rows, cols), check_invariants=True).to_dense().reshape(shape)
    else:
        w = entry["values"].reshape(shape)
    if "scale" in entry:
        w = dequantize_int8(w, entry["scale"]).to(entry["dtype"])
    return w


def _choose_format(weight: torch.Tensor, fmt: Format, n: int, m: int, block: int) -> Format:
    """``fmt`` where it applies to ``weight``, else CSR."""
    if fmt == "nm":
        moved = torch.movedim(weight, 1, -1) if weight.dim() > 1 else weight
        ok = weight.dim() > 1 and moved.shape[-1] % m == 0 and bool(((moved != 0).reshape(-1, m).sum(1) <= n).all())
        return "nm" if ok else "csr"
    if fmt == "bsr":
        w2 = _as_2d(weight)
        return "bsr" if w2.shape[0] % block == 0 and w2.shape[1] % block == 0 else "csr"
    return fmt


def save_compressed(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    fmt: Format = "nm",
    n: int = 2,
    m: int = 4,
    block: int = 16,
    int8: bool = False,
) -> int:
    """Write the model's state with every masked weight compressed; returns bytes on disk.

    Masked weights are stored as ``fmt`` (falling back to CSR where it does not apply), with
    INT8 per-channel values if ``int8`` (a storage form: :func:`load_compressed` dequantizes);
    everything else is stored dense. Written atomically (``runtime.io``).
    """
    state = model.state_dict()
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise InputError(f"masks name parameters the model does not have: {unknown[:5]}")
    entries: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        if name not in masks:
            entries[name] = _encode(tensor, "dense", n, m, block)
            continue
        weight = tensor.detach().cpu() * masks[name].to(tensor.dtype)
        stored, extra = weight, {}
        if int8:
            stored, scale = quantize_int8(weight)
            extra = {"scale": scale, "dtype": tensor.dtype}
        entries[name] = {**_encode(stored, _choose_format(stored, fmt, n, m, block), n, m, block), **extra}
    from secateurs.runtime.io import atomic_save_torch

    target = atomic_save_torch({"secateurs_compressed": 1, "entries": entries}, path)
    return target.stat().st_size


def load_compressed(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Dense state dict from :func:`save_compressed` (INT8 entries dequantized)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "entries" not in data:
        raise InputError(f"{path} is not a file written by save_compressed")
    return {name: _decode(entry) for name, entry in data["entries"].items()}
