"""Data-driven importance for Hugging Face models: activation energy (Wanda-style) and
first-order Taylor, with calibration batches given as a user passes them (dicts of tokenizer
output or tuples of positional arguments; padding excluded through ``attention_mask``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.graph import from_fx
from secateurs.passes.calibration import call_batch
from secateurs.passes.group_channels import ChannelGroup
from secateurs.passes.importance import CRITERIA, ScoreContext

__all__ = ["token_mask", "activation_stats", "activation_criterion", "taylor_criterion",
           "gradients"]


def token_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as bool [batch, seq] (None: every position counts)."""
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if m is None else m.bool()


def activation_stats(model: nn.Module, batches: list[Any]) -> dict[str, torch.Tensor]:
    """Mean squared input of every Linear/Conv1D over real (unpadded) tokens, keyed by its
    weight FQN."""
    stats: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    mask: list[torch.Tensor | None] = [None]
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            key = f"{name}.weight"

            def hook(m, inp, out, key=key):
                x = inp[0].detach().float()
                keep = mask[0]
                if keep is not None and tuple(x.shape[:-1]) == tuple(keep.shape):
                    x = x[keep]
                x = x.reshape(-1, x.shape[-1])
                stats[key] = stats.get(key, 0) + (x * x).sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                mask[0] = token_mask(b)
                call_batch(model, b)
    finally:
        for h in hooks:
            h.remove()
    return {k: v / counts[k] for k, v in stats.items()}


def activation_criterion(lin: dict[str, tuple[int, int]]):
    """Output energy a unit feeds forward: sum over its input columns of E[x²]·‖W[:, c]‖²
    (Wanda-style); groups with no consumer projection fall back to L2 magnitude."""

    def score(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        acts: Mapping[str, torch.Tensor] = ctx.extra.get("activations", {})  # type: ignore
        total = np.zeros(group.size)
        hit = False
        for m in group.members:
            if m.param not in lin or lin[m.param][1] != m.dim or m.param not in acts:
                continue
            w = ctx.tensors[m.param].detach().float()
            col = (w * w).sum(dim=1 - m.dim) * acts[m.param].to(w.device)
            pos = col.double().cpu().numpy()[m.positions]
            total += np.bincount(m.units, weights=pos, minlength=group.size)
            hit = True
        return total if hit else CRITERIA["l2"](group, ctx)

    score.__name__ = "activation"
    return score


def taylor_criterion(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
    """First-order Taylor |Σ w·∂L/∂w| per unit over all of the group's slices."""
    total = np.zeros(group.size)
    for m in group.members:
        w, g = ctx.tensors.get(m.param), ctx.grads.get(m.param)
        if w is None or g is None:
            continue
        prod = (w.detach().float() * g.float())
        dims = [d for d in range(prod.dim()) if d != m.dim]
        per = prod.sum(dim=dims) if dims else prod
        pos = per.double().cpu().numpy()[m.positions]
        total += np.abs(np.bincount(m.units, weights=pos, minlength=group.size))
    return total


def gradients(model: nn.Module, batches: list[Any]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for b in batches:
            out = call_batch(model, b)
            ids = b.get("input_ids") if isinstance(b, Mapping) else from_fx._as_tuple(b)[0]
            keep = token_mask(b)
            if getattr(out, "logits", None) is not None and ids is not None and \
                    ids.dtype == torch.long:
                logits = out.logits[:, :-1]
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1))
            else:
                h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
                if keep is not None and tuple(h.shape[:2]) == tuple(keep.shape):
                    h = h[keep]
                loss = h.float().pow(2).mean()
            loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads

