"""Channel permutation for N:M sparsity (offline, no run-time cost).

An N:M mask keeps the N largest of every M consecutive weights along a layer's input channels.
Which channels share a block of M is an accident of training order; reordering them can keep
much more magnitude. Reordering the input channels of a consumer is only allowed if every
coupled tensor is reordered the same way — exactly the channel groups the dependency analysis
finds. For a group with units ``u`` and a permutation ``σ`` of its units, every member tensor
moves the slice at ``pos_M(u)`` to ``pos_M(σ(u))``; since all members move together (the
producer's rows, the BN vectors, the consumers' columns, through shuffles and concats), the
network computes the same function (as in NVIDIA apex's permutation search).

The search is greedy: random swaps of two channels in different blocks, accepted when the
magnitude kept by the N:M mask over the group's consumer weights grows.

Only *plain* groups are permuted: every member holds every unit once (no heads, no slices that
keep part of the group), unpinned; others are skipped with a reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.graph import from_fx
from secateurs.passes.group_channels import ChannelGroup, group_channels

__all__ = ["permute_for_nm", "PermuteResult", "nm_kept_magnitude"]


@dataclass
class PermuteResult:
    model: nn.Module
    permutations: dict[int, list[int]]  # group id -> order (unit placed at each slot)
    kept_before: float
    kept_after: float
    skipped: dict[int, str] = field(default_factory=dict)


def nm_kept_magnitude(w: np.ndarray, n: int, m: int) -> float:
    """Sum of |w| kept by an N:M mask along axis 1 (columns in blocks of M)."""
    rows, cols = w.shape
    usable = cols - cols % m
    blocks = np.abs(w[:, :usable]).reshape(rows, usable // m, m)
    return float(np.sort(blocks, axis=2)[:, :, m - n:].sum())


def _consumers(group: ChannelGroup, tensors: dict[str, torch.Tensor]):
    """Members that are a 2-D linear weight's input dim or a conv weight's channel dim."""
    out = []
    for mem in group.members:
        t = tensors.get(mem.param)
        if t is None or mem.dim != 1 or t.dim() < 2 or not mem.param.endswith("weight"):
            continue
        out.append((mem, t))
    return out


def _plain(group: ChannelGroup) -> str | None:
    if group.pinned.any():
        return "pinned units"
    for mem in group.members:
        if len(mem.units) != group.size or len(np.unique(mem.units)) != group.size:
            return f"{mem.param}[{mem.dim}] does not hold every unit once"
    return None


def _search(mat: np.ndarray, n: int, m: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy swap search over column order; returns order[k] = column placed at slot k."""
    cols = mat.shape[1]
    order = np.arange(cols)
    a = np.abs(mat)
    nblocks = cols // m
    if nblocks < 2:
        return order

    def kept(block_cols: np.ndarray) -> float:
        return float(np.sort(a[:, block_cols], axis=1)[:, m - n:].sum())

    block_kept = [kept(order[b * m:(b + 1) * m]) for b in range(nblocks)]
    for _ in range(iters):
        i, j = rng.integers(0, nblocks * m, size=2)
        bi, bj = i // m, j // m
        if bi == bj:
            continue
        order[i], order[j] = order[j], order[i]
        ki, kj = kept(order[bi * m:(bi + 1) * m]), kept(order[bj * m:(bj + 1) * m])
        if ki + kj > block_kept[bi] + block_kept[bj] + 1e-12:
            block_kept[bi], block_kept[bj] = ki, kj
        else:
            order[i], order[j] = order[j], order[i]
    return order


def permute_for_nm(model: nn.Module, example_inputs: Any, n: int = 2, m: int = 4,
                   iters_per_channel: int = 40, seed: int = 0,
                   inplace: bool = False) -> PermuteResult:
    """Reorder coupled channels so an N:M mask on the consumers keeps more magnitude."""
    work = model if inplace else copy.deepcopy(model)
    graph, gm, _ = from_fx.from_fx(work, example_inputs, copy_model=False)
    analysis = group_channels(graph)
    tensors = dict(gm.named_parameters())
    tensors.update(gm.named_buffers())
    rng = np.random.default_rng(seed)
    perms: dict[int, list[int]] = {}
    skipped: dict[int, str] = {}
    before = after = 0.0
    for g in analysis.groups:
        cons = _consumers(g, tensors)
        if not cons or g.size < 2 * m:
            continue
        reason = _plain(g)
        if reason is None and any(not np.all(np.diff(mem.positions[np.argsort(mem.units)]) > 0)
                                  for mem, _ in cons):
            reason = "consumer columns are not in unit order (shuffled)"
        if reason:
            skipped[g.id] = reason
            continue
        # unit-ordered consumer matrix: rows of every consumer, one column per unit
        blocks = []
        for mem, t in cons:
            w = t.detach().float().transpose(0, mem.dim).reshape(t.shape[mem.dim], -1).T
            idx = mem.positions[np.argsort(mem.units)]
            blocks.append(w.cpu().numpy()[:, idx])
        mat = np.concatenate(blocks, axis=0)
        kept0 = nm_kept_magnitude(mat, n, m)
        order = _search(mat, n, m, iters_per_channel * g.size, rng)
        kept1 = nm_kept_magnitude(mat[:, order], n, m)
        before += kept0
        if kept1 <= kept0:
            after += kept0
            continue
        after += kept1
        sigma = np.empty_like(order)
        sigma[order] = np.arange(len(order))  # unit order[k] moves to slot k
        _apply(g, sigma, tensors)
        perms[g.id] = order.tolist()
    return PermuteResult(gm, perms, before, after, skipped)


def _apply(group: ChannelGroup, sigma: np.ndarray, tensors: dict[str, torch.Tensor]) -> None:
    """Move every member's slice of unit u to the position of unit sigma[u]."""
    with torch.no_grad():
        for mem in group.members:
            t = tensors[mem.param]
            pos_of = np.empty(group.size, dtype=np.int64)
            pos_of[mem.units] = mem.positions
            index = np.arange(t.shape[mem.dim])
            index[pos_of[sigma]] = pos_of  # new[pos(σ(u))] = old[pos(u)]
            moved = t.index_select(mem.dim, torch.as_tensor(index, device=t.device))
            t.copy_(moved)
