"""Importance: score every unit of a channel group.

A criterion reduces over *all* of a group's parameter slices (the conv's filters, the BN's
scales, the next layer's input columns...) so a unit is judged by everything that goes with it,
then scores are normalised per group so groups can be ranked together (global pruning).

A criterion is any callable ``(group, ctx) -> np.ndarray`` of length ``group.size``; the
built-ins are registered in ``CRITERIA`` by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from secateurs.errors import InputError
from secateurs.passes.group_channels import ChannelGroup, Member

__all__ = ["ScoreContext", "Criterion", "CRITERIA", "get_criterion", "member_scores",
           "normalize"]


@dataclass
class ScoreContext:
    """What criteria may read: tensors by source name, optional gradients / statistics."""

    tensors: Mapping[str, torch.Tensor]
    grads: Mapping[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)
    reduction: str = "sum"
    seed: int = 0


Criterion = Callable[[ChannelGroup, ScoreContext], np.ndarray]


def member_scores(group: ChannelGroup, ctx: ScoreContext,
                  per_position: Callable[[Member, torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Reduce a per-position score over every member of ``group`` into per-unit scores."""
    parts = []
    for m in group.members:
        t = ctx.tensors.get(m.param)
        if t is None or t.is_meta or t.dim() == 0:
            continue
        pos = per_position(m, t).detach().double().cpu().numpy()[m.positions]
        parts.append(np.bincount(m.units, weights=pos, minlength=group.size))
    if not parts:
        return np.zeros(group.size)
    stack = np.stack(parts)
    if ctx.reduction == "mean":
        return stack.mean(0)
    if ctx.reduction == "max":
        return stack.max(0)
    return stack.sum(0)


def _reduce_except(t: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    dims = [d for d in range(t.dim()) if d != dim]
    v = fn(t.detach().float())
    return v.sum(dim=dims) if dims else v


def magnitude(p: int) -> Criterion:
    def score(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        return member_scores(group, ctx, lambda m, t: _reduce_except(
            t, m.dim, lambda x: x.abs().pow(p)))

    score.__name__ = f"l{p}"
    return score


def random_criterion(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
    rng = np.random.default_rng(ctx.seed + group.id)
    return rng.random(group.size)


CRITERIA: dict[str, Criterion] = {
    "l1": magnitude(1),
    "l2": magnitude(2),
    "random": random_criterion,
}


def get_criterion(importance: str | Criterion) -> Criterion:
    if callable(importance):
        return importance
    if importance not in CRITERIA:
        raise InputError(f"unknown importance '{importance}'; choose one of "
                         f"{sorted(CRITERIA)} or pass a callable (group, ctx) -> scores")
    return CRITERIA[importance]


def normalize(scores: np.ndarray, how: str = "mean") -> np.ndarray:
    """Per-group normalisation so scores of different groups are comparable."""
    if how == "none" or len(scores) == 0:
        return scores
    denom = {"mean": scores.mean(), "max": scores.max(), "sum": scores.sum()}[how]
    return scores / denom if denom > 0 else scores
