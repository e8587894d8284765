"""Sparsity masks as data, the rules that choose them, and mask-preserving fine-tuning.

A mask is a ``bool`` tensor with the shape of the parameter it belongs to: ``True`` keeps the
entry, ``False`` forces it to zero. A model's masks are a plain ``dict[param_name, mask]``
(:data:`Masks`), saved next to the model as a ``.pt`` state dict, so the same sparsity can be
re-applied, audited and shipped.

Selection rules work on a 2-D *score* matrix ``S`` of shape ``[rows, cols]`` whose columns run
along the weight's reduction axis (see ``secateurs.passes.sparsify``); a larger score keeps:

* unstructured, sparsity ``s``: drop the ``round(s · numel)`` smallest scores (``per_row``: the
  ``round(s · cols)`` smallest of each row);
* N:M: split every row into consecutive groups of ``M`` columns and keep the ``N`` largest
  scores of each group;
* block (BSR) with block ``b``: tile ``S`` into ``b×b`` tiles, score a tile by ``ΣS``, drop the
  ``round(s · tiles)`` smallest tiles.

:class:`MaskedFineTune` keeps pruned weights at zero while training, as apex ASP does: the
gradient of a masked entry is zeroed by a tensor hook (so momentum and Adam moments never see
it), and the mask is re-applied after every ``optimizer.step()`` (so decoupled weight decay
and moment updates cannot move it away from zero).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from secateurs.errors import InputError

__all__ = [
    "Masks",
    "Pattern",
    "parse_pattern",
    "nm_mask",
    "unstructured_mask",
    "block_mask",
    "mask_from_scores",
    "apply_masks",
    "mask_sparsity",
    "save_masks",
    "load_masks",
    "MaskedFineTune",
]

Masks = dict[str, torch.Tensor]
"""``param_name -> bool tensor`` of the parameter's shape; ``True`` keeps the entry."""

PatternKind = Literal["unstructured", "nm", "bsr"]
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``unstructured``, ``nm`` (keep ``n`` of every ``m``) or ``bsr``."""

    kind: PatternKind
    n: int = 0
    m: int = 0
    block: int = 0

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "bsr":
            return f"bsr{self.block}"
        return "unstructured"

    @property
    def nm_sparsity(self) -> float:
        """The sparsity an N:M pattern implies, ``1 - n/m``."""
        return 1.0 - self.n / self.m if self.kind == "nm" else 0.0


def parse_pattern(spec: str | Pattern, block_size: int = 16) -> Pattern:
    """Parse ``"2:4"`` / ``"1:4"`` / ``"4:8"`` / ``"unstructured"`` / ``"bsr"`` into a :class:`Pattern`.

    Raises :class:`InputError` naming the ``pattern`` option when the string is not one of these.
    """
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"pattern must be a string such as '2:4', 'unstructured' or 'bsr', got {spec!r}")
    text = spec.strip().lower()
    if text == "unstructured":
        return Pattern("unstructured")
    if text in ("bsr", "block"):
        if not 2 <= block_size <= 256:
            raise InputError(f"block_size={block_size} is out of range; use a block size in 4..64")
        return Pattern("bsr", block=block_size)
    match = _NM_RE.match(text)
    if match is None:
        raise InputError(
            f"pattern={spec!r} is not understood; use 'unstructured', 'bsr' or 'N:M' with N<M (e.g. '2:4')"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise InputError(f"pattern={spec!r}: N:M needs 1 <= N < M (e.g. '2:4', '1:4', '4:8')")
    return Pattern("nm", n=n, m=m)


def _check_2d(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise InputError(f"scores must be 2-D [rows, cols], got shape {tuple(scores.shape)}")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity={sparsity} is out of range; use 0 <= sparsity < 1")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest scores in each consecutive group of ``m`` columns of each row."""
    _check_2d(scores)
    rows, cols = scores.shape
    if cols % m:
        raise InputError(f"{cols} columns are not a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Drop exactly ``round(sparsity · n)`` smallest scores, over the matrix or each row."""
    _check_2d(scores)
    _check_sparsity(sparsity)
    if per_row:
        k = int(round(scores.shape[1] * sparsity))
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            drop = torch.argsort(scores, dim=1, stable=True)[:, :k]
            mask.scatter_(1, drop, False)
        return mask
    flat = scores.reshape(-1)
    k = int(round(flat.numel() * sparsity))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k:
        mask[torch.argsort(flat, stable=True)[:k]] = False
    return mask.reshape(scores.shape)


def block_mask(scores: torch.Tensor, sparsity: float, block: int) -> torch.Tensor:
    """Drop the ``round(sparsity · tiles)`` ``block×block`` tiles with the smallest score sum."""
    _check_2d(scores)
    rows, cols = scores.shape
    if rows % block or cols % block:
        raise InputError(f"shape {rows}x{cols} does not divide into {block}x{block} blocks")
    tiles = scores.reshape(rows // block, block, cols // block, block).sum(dim=(1, 3))
    keep = unstructured_mask(tiles, sparsity)
    return keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def mask_from_scores(
    scores: torch.Tensor, pattern: Pattern, sparsity: float, per_row: bool = False
) -> torch.Tensor:
    """Dispatch to the rule for ``pattern`` (``sparsity`` is ignored for N:M)."""
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "bsr":
        return block_mask(scores, sparsity, pattern.block)
    return unstructured_mask(scores, sparsity, per_row=per_row)


def _named_params(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise InputError(f"masks name parameters the model does not have: {missing[:5]}")
    for name, mask in masks.items():
        if tuple(mask.shape) != tuple(params[name].shape):
            raise InputError(
                f"mask for '{name}' has shape {tuple(mask.shape)}, parameter has {tuple(params[name].shape)}"
            )
    return {name: params[name] for name in masks}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero every masked-out entry of ``model``'s parameters in place; returns ``model``."""
    for name, param in _named_params(model, masks).items():
        param.mul_(masks[name].to(device=param.device, dtype=param.dtype))
    return model


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all masks."""
    total = sum(int(m.numel()) for m in masks.values())
    if not total:
        return 0.0
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Save masks as a ``.pt`` state dict of bool tensors, atomically (temp file + ``os.replace``)."""
    from secateurs.runtime.io import atomic_save_torch

    return atomic_save_torch({k: v.detach().to("cpu", torch.bool) for k, v in masks.items()}, path)


def load_masks(path: str | os.PathLike[str]) -> Masks:
    """Load masks written by :func:`save_masks`."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or any(t.dtype != torch.bool for t in data.values()):
        raise InputError(f"{path} does not hold a dict of bool mask tensors")
    return dict(data)


class MaskedFineTune:
    """Keep masked weights at exactly zero through optimizer steps (apex ASP style).

    >>> ft = MaskedFineTune(model, masks).attach(optimizer)
    >>> ...train as usual...
    >>> ft.remove()

    ``attach`` zeroes masked entries now, registers a gradient hook per masked parameter that
    multiplies the gradient by the mask, and a post-step hook on the optimizer that re-applies
    the masks. Also usable as a context manager.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.params = _named_params(model, masks)
        self.masks = {
            name: masks[name].to(device=p.device, dtype=torch.bool) for name, p in self.params.items()
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> MaskedFineTune:
        """Zero the masked entries and install the hooks; returns ``self``."""
        self.reapply()
        for name, param in self.params.items():
            mask = self.masks[name]
            self._handles.append(param.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.reapply()))
        return self

    @torch.no_grad()
    def reapply(self) -> None:
        """Re-zero every masked entry (call after a manual optimizer step if not attached)."""
        for name, param in self.params.items():
            param.mul_(self.masks[name].to(param.dtype))

    def remove(self) -> None:
        """Remove the hooks; the weights keep their current values."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MaskedFineTune:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
