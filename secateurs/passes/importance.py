"""Importance: score every unit of a channel group.

A criterion reduces over *all* of a group's parameter slices (the conv's filters, the BN's
scales, the next layer's input columns...) so a unit is judged by everything that goes with it,
then scores are normalised per group so groups can be ranked together (global pruning). How the
per-member scores of one unit are combined is ``ScoreContext.reduction`` (sum, mean or max).

A criterion is any callable ``(group, ctx) -> np.ndarray`` of length ``group.size``; the
built-ins are registered in ``CRITERIA`` by name. Per unit ``u`` with slices ``W_u`` (every
member's positions of ``u``):

* ``l1`` / ``l2``: ``sum |w|`` / ``sum w²`` over ``W_u``.
* ``bn_scale`` (network slimming, Liu et al. 2017): ``|gamma_u|`` of the group's BatchNorm
  members; a group without BatchNorm falls back to ``l2``. :func:`bn_l1_regularizer` is the
  L1-on-gamma training term that makes this criterion sharp.
* ``taylor`` (Molchanov et al. 2019, first order): ``sum |w · g|`` with ``g`` the loss
  gradient accumulated over calibration batches (:func:`calibrate_gradients`).
* ``fisher`` / ``hessian`` (OBD, LeCun et al. 1990, with the empirical Fisher as the Hessian
  diagonal): ``sum_w  w² · F_w / 2`` with ``F_w = sum_batches g_w²``
  (:func:`calibrate_fisher`).
* ``activation``: mean ``|activation|`` of channel ``u`` over calibration data. Statistics
  are collected with forward hooks on every module that owns a ``weight`` (conv, linear,
  norms) and filed under that weight's source name, which is exactly how channel groups name
  their members: a group's member ``(M.weight, dim 0)`` says "module ``M`` produces these
  channels". The score reads the statistics of those producers, preferring normalisation
  layers (the value that flows on after BN) over the conv/linear that feeds them; a residual
  group with several producers reduces over all of them.
* ``lamp`` (Lee et al. 2021) adapted to channels: within each conv/linear member, with
  ``s_u = ||W_u||²`` of that layer's slices sorted ascending, ``lamp_u = s_u / sum_{v: s_v >=
  s_u} s_v``; the layer-wise normalisation makes scores comparable across layers.
* ``random``: uniform, seeded by ``ctx.seed`` and the group's first member (stable across
  analyses that number groups differently).

Criteria that need data carry ``needs`` (``{"grads"}``, ``{"fisher"}``, ``{"activations"}``);
:func:`calibration_context` builds a ``ScoreContext`` with exactly what a criterion needs.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.passes.group_channels import ChannelGroup, Member

__all__ = ["ScoreContext", "Criterion", "CRITERIA", "get_criterion", "member_scores",
           "normalize", "calibrate_gradients", "calibrate_fisher", "activation_statistics",
           "calibration_context", "bn_l1_regularizer", "criterion_needs", "is_batchnorm_weight",
           "rounded_keep"]


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
                  per_position: Callable[[Member, torch.Tensor],
                                         torch.Tensor | np.ndarray | None],
                  members: Iterable[Member] | None = None) -> np.ndarray:
    """Reduce a per-position score over the members of ``group`` into per-unit scores.

    ``per_position(member, tensor)`` returns one value per position of ``member.dim`` of the
    member's tensor (or None to skip the member); ``members`` restricts the reduction (default:
    all of the group's members).
    """
    parts = []
    for m in group.members if members is None else members:
        t = ctx.tensors.get(m.param)
        if t is None or t.is_meta or t.dim() == 0:
            continue
        value = per_position(m, t)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().double().cpu().numpy()
        pos = value[m.positions]
        parts.append(np.bincount(m.units, weights=pos, minlength=group.size))
    if not parts:
        return np.zeros(group.size)
    stack = np.stack(parts)
    if ctx.reduction == "mean":
        return stack.mean(0)
    if ctx.reduction == "max":
        return stack.max(0)
    if ctx.reduction != "sum":
        raise InputError(f"unknown reduction '{ctx.reduction}'; choose sum, mean or max")
    return stack.sum(0)


def _real(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor to score: a complex one (Meta's Llama ``freqs_cis``) by its modulus,
    an integer one (a folded constant) by its values."""
    t = t.detach()
    return t.abs().float() if t.is_complex() else t.float()


def _reduce_except(t: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    dims = [d for d in range(t.dim()) if d != dim]
    v = fn(_real(t))
    return v.sum(dim=dims) if dims else v


_BLOCK = 1 << 16  # elements per row block of the torch path
_NUMPY_FLOATS = (torch.float32, torch.float64)


def _lp_per_position(t: torch.Tensor, dim: int, p: int, cache: dict[Any, Any],
                     key: Any) -> np.ndarray:
    """sum of |w|^p over every dim but ``dim``, cached per (tensor, dim): a tensor split
    across many groups (a DenseNet conv reading a long concat) is reduced once.

    A conv/linear weight is read once for both its output and input channels and ``|w|^p``
    is never materialised for the whole tensor (freshly allocated weight-sized temporaries
    cost more in page faults than the arithmetic): on CPU, numpy sums the products directly
    (``einsum``, ~2x the torch loop); elsewhere, torch reduces a block of rows at a time."""
    hit = cache.get((key, dim))
    if hit is not None:
        return hit
    x = t.detach() if t.is_floating_point() else _real(t)  # complex, integer constants
    out: dict[int, Any]
    if x.device.type == "cpu" and x.dtype in _NUMPY_FLOATS and (x.dim() == 1 or dim < 2):
        a = x.reshape(x.shape[0], -1).numpy()
        if x.dim() == 1:
            out = {0: a[:, 0] * a[:, 0] if p == 2 else np.abs(a[:, 0]) ** p}
        elif p == 2:
            out = {0: np.einsum("ij,ij->i", a, a),
                   1: np.einsum("ij,ij->j", a, a).reshape(x.shape[1], -1).sum(1)}
        else:
            powered = np.abs(a) ** p
            out = {0: powered.sum(1), 1: powered.sum(0).reshape(x.shape[1], -1).sum(1)}
    elif x.dim() == 1:
        out = {0: x.float().abs().pow(p)}
    elif dim < 2:
        x2 = x.reshape(x.shape[0], -1)
        rows_out, cols = [], torch.zeros(x2.shape[1], dtype=torch.float32, device=x.device)
        for rows in x2.split(max(1, _BLOCK // max(1, x2.shape[1]))):
            rows = rows.float()
            powered = rows.square() if p == 2 else rows.abs().pow(p)
            rows_out.append(powered.sum(1))
            cols += powered.sum(0)
        out = {0: torch.cat(rows_out), 1: cols.view(x.shape[1], -1).sum(1)}
    else:
        dims = [d for d in range(x.dim()) if d != dim]
        out = {dim: torch.linalg.vector_norm(x, ord=p, dim=dims, dtype=torch.float32).pow(p)}
    for d, v in out.items():
        cache[(key, d)] = v.astype(np.float64) if isinstance(v, np.ndarray) \
            else v.double().cpu().numpy()
    return cache[(key, dim)]


def magnitude(p: int) -> Criterion:
    def score(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        cache = ctx.extra.setdefault("_lp_cache", {})
        return member_scores(group, ctx, lambda m, t: _lp_per_position(
            t, m.dim, p, cache, (m.param, p, id(t), t._version)))

    score.__name__ = f"l{p}"
    return score


def random_criterion(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
    """Uniform scores seeded by ``ctx.seed`` and the group's first member (not its id, which
    depends on how the analysis was made: a replicated HF analysis numbers groups differently
    from a full trace, yet must pick the same units)."""
    first = f"{group.members[0].param}:{group.members[0].dim}" if group.members else ""
    rng = np.random.default_rng([ctx.seed, zlib.crc32(first.encode())])
    return rng.random(group.size)


random_criterion.__name__ = "random"


# --------------------------------------------------------------------------------------------
# BatchNorm scale
# --------------------------------------------------------------------------------------------


def is_batchnorm_weight(name: str, tensors: Mapping[str, torch.Tensor]) -> bool:
    """A 1-D ``*.weight`` with a sibling ``running_var`` buffer: a BatchNorm (or an instance
    norm tracking statistics) scale, recognised from source names alone."""
    if not name.endswith(".weight") and name != "weight":
        return False
    prefix = name[: -len("weight")]
    t = tensors.get(name)
    return t is not None and t.dim() == 1 and f"{prefix}running_var" in tensors


def bn_scale(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
    bns = [m for m in group.members if m.dim == 0 and is_batchnorm_weight(m.param, ctx.tensors)]
    if not bns:
        return CRITERIA["l2"](group, ctx)
    return member_scores(group, ctx, lambda m, t: _real(t).abs(), bns)


bn_scale.__name__ = "bn_scale"


def bn_l1_regularizer(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """Network slimming's sparsity term ``strength * sum |gamma|`` over every BatchNorm scale
    of ``model``; add it to the training loss so unimportant channels' scales go to zero."""
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not terms:
        return torch.zeros(())
    return strength * torch.stack(terms).sum()


# --------------------------------------------------------------------------------------------
# Gradient-based: Taylor and Fisher (OBD)
# --------------------------------------------------------------------------------------------


def _need(ctx: ScoreContext, what: str, criterion: str) -> Mapping[str, torch.Tensor]:
    data = ctx.grads if what == "grads" else ctx.extra.get(what)
    if not data:
        raise InputError(f"importance '{criterion}' needs {what} in the ScoreContext; build one "
                         "with secateurs.passes.importance.calibration_context(model, batches, "
                         "loss_fn, criterion) and pass it as score_context=...")
    return data  # type: ignore[return-value]


def taylor(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
    grads = _need(ctx, "grads", "taylor")

    def per_position(m: Member, t: torch.Tensor) -> torch.Tensor | None:
        g = grads.get(m.param)
        if g is None or g.shape != t.shape:
            return None
        return _reduce_except(t * g.to(t.device, t.dtype), m.dim, torch.abs)

    return member_scores(group, ctx, per_position)


taylor.__name__ = "taylor"
taylor.needs = frozenset({"grads"})  # type: ignore[attr-defined]


def fisher(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
    fisher_diag = _need(ctx, "fisher", "fisher")

    def per_position(m: Member, t: torch.Tensor) -> torch.Tensor | None:
        f = fisher_diag.get(m.param)
        if f is None or f.shape != t.shape:
            return None
        w = _real(t)
        return _reduce_except(w * w * f.to(w.device, w.dtype) / 2, m.dim, lambda x: x)

    return member_scores(group, ctx, per_position)


fisher.__name__ = "fisher"
fisher.needs = frozenset({"fisher"})  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Activation statistics
# --------------------------------------------------------------------------------------------


def activation(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
    stats = _need(ctx, "activations", "activation")
    producers = [m for m in group.members if m.dim == 0 and m.param in stats]
    norms = [m for m in producers if m.param in stats and stats[m.param].dim() == 1
             and is_batchnorm_weight(m.param, ctx.tensors)]
    chosen = norms or producers
    if not chosen:
        return CRITERIA["l2"](group, ctx)
    return member_scores(group, ctx, lambda m, t: stats[m.param], chosen)


activation.__name__ = "activation"
activation.needs = frozenset({"activations"})  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# LAMP
# --------------------------------------------------------------------------------------------


def _lamp_positions(t: torch.Tensor, dim: int) -> torch.Tensor:
    s = _reduce_except(t, dim, lambda x: x * x).double()
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    denom = sorted_s.flip(0).cumsum(0).flip(0)  # sum of the scores >= this one
    out = torch.zeros_like(s)
    out[order] = torch.where(denom > 0, sorted_s / denom.clamp_min(1e-300),
                             torch.zeros_like(sorted_s))
    return out


def lamp(group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
    layers = [m for m in group.members
              if (t := ctx.tensors.get(m.param)) is not None and t.dim() >= 2]
    if not layers:
        return CRITERIA["l2"](group, ctx)
    return member_scores(group, ctx, lambda m, t: _lamp_positions(t, m.dim), layers)


lamp.__name__ = "lamp"


CRITERIA: dict[str, Criterion] = {
    "l1": magnitude(1),
    "l2": magnitude(2),
    "bn_scale": bn_scale,
    "taylor": taylor,
    "fisher": fisher,
    "hessian": fisher,
    "activation": activation,
    "lamp": lamp,
    "random": random_criterion,
}


def get_criterion(importance: str | Criterion) -> Criterion:
    if callable(importance):
        return importance
    if importance not in CRITERIA:
        raise InputError(f"unknown importance '{importance}'; choose one of "
                         f"{sorted(CRITERIA)} or pass a callable (group, ctx) -> scores")
    return CRITERIA[importance]


def criterion_needs(importance: str | Criterion) -> frozenset[str]:
    """What calibration data a criterion reads: a subset of {grads, fisher, activations}."""
    return frozenset(getattr(get_criterion(importance), "needs", frozenset()))


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> scalar loss``; ``batch`` is whatever the batches iterable yields."""


def _grad_pass(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn,
               on_batch: Callable[[dict[str, torch.Tensor]], None]) -> int:
    """Run ``loss_fn`` on each batch in eval mode (BN uses running statistics, so scores do
    not depend on batch composition) and hand each batch's gradients to ``on_batch``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            on_batch({k: p.grad.detach().clone() for k, p in params.items()
                      if p.grad is not None})
            n += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n == 0:
        raise InputError("calibration needs at least one batch")
    return n


def calibrate_gradients(model: nn.Module, batches: Iterable[Any],
                        loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Loss gradients summed over ``batches``, by parameter source name (for ``taylor``)."""
    total: dict[str, torch.Tensor] = {}

    def add(grads: dict[str, torch.Tensor]) -> None:
        for k, g in grads.items():
            total[k] = total[k] + g if k in total else g

    _grad_pass(model, batches, loss_fn, add)
    return total


def calibrate_fisher(model: nn.Module, batches: Iterable[Any],
                     loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal: per-batch squared gradients summed over ``batches``."""
    total: dict[str, torch.Tensor] = {}

    def add(grads: dict[str, torch.Tensor]) -> None:
        for k, g in grads.items():
            total[k] = total[k] + g * g if k in total else g * g

    _grad_pass(model, batches, loss_fn, add)
    return total


def activation_statistics(model: nn.Module, batches: Iterable[Any],
                          forward: Callable[[nn.Module, Any], Any] | None = None
                          ) -> dict[str, torch.Tensor]:
    """Mean ``|output|`` per output channel of every module owning a ``weight``, filed under
    ``"<module>.weight"``, averaged over ``batches``. The channel dim is 1 (conv, batch/group
    norm) or the last dim (linear, layer norm, embedding); an output whose channel count is not
    the weight's first dim is skipped.

    ``forward(model, batch)`` runs one batch (default: ``model(batch[0])`` for tuples/lists,
    else ``model(batch)``).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str, channels_last: bool, width: int):
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() < 2:
                return
            x = out.detach().float().abs()
            ch = -1 if channels_last else 1
            if x.shape[ch] != width:  # not one statistic per weight row: skip
                return
            per = x.movedim(ch, 0).reshape(x.shape[ch], -1)
            key = f"{name}.weight" if name else "weight"
            sums[key] = sums.get(key, 0) + per.sum(1)
            counts[key] = counts.get(key, 0) + per.shape[1]
        return hook

    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 1:
            last = isinstance(mod, (nn.Linear, nn.LayerNorm, nn.Embedding)) or \
                type(mod).__name__ == "RMSNorm"
            hooks.append(mod.register_forward_hook(hook_for(name, last, w.shape[0])))
    run = forward or (lambda m, b: m(b[0]) if isinstance(b, (tuple, list)) else m(b))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: sums[k] / counts[k] for k in sums}


def calibration_context(model: nn.Module, batches: Iterable[Any] | None = None,
                        loss_fn: LossFn | None = None,
                        importance: str | Criterion | Iterable[str] = ("taylor", "fisher",
                                                                       "activation"),
                        reduction: str = "sum", seed: int = 0) -> ScoreContext:
    """A ``ScoreContext`` over ``model``'s tensors with the calibration data ``importance``
    needs (one criterion, or several names). ``batches`` is re-iterated once per kind of data,
    so pass a list rather than a one-shot iterator."""
    names = [importance] if isinstance(importance, str) or callable(importance) \
        else list(importance)
    needs: set[str] = set()
    for name in names:
        needs |= criterion_needs(name)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    ctx = ScoreContext(tensors, reduction=reduction, seed=seed)
    if not needs:
        return ctx
    if batches is None:
        raise InputError(f"importance {sorted(needs)} needs calibration batches")
    batches = list(batches)
    if needs & {"grads", "fisher"} and loss_fn is None:
        raise InputError("gradient-based importance needs loss_fn(model, batch) -> loss")
    if "grads" in needs:
        assert loss_fn is not None
        ctx.grads = calibrate_gradients(model, batches, loss_fn)
    if "fisher" in needs:
        assert loss_fn is not None
        ctx.extra["fisher"] = calibrate_fisher(model, batches, loss_fn)
    if "activations" in needs:
        ctx.extra["activations"] = activation_statistics(model, batches)
    return ctx


def normalize(scores: np.ndarray, how: str = "mean") -> np.ndarray:
    """Per-group normalisation so scores of different groups are comparable."""
    if how == "none" or len(scores) == 0:
        return scores
    denom = {"mean": scores.mean(), "max": scores.max(), "sum": scores.sum()}[how]
    return scores / denom if denom > 0 else scores


def rounded_keep(size: int, keep: int, round_to: int | None) -> int:
    """How many units a plain channel group keeps under ``round_to``: ``keep`` rounded up to
    a multiple of ``round_to``, never below ``round_to`` itself once the group has that many.

    A group of exactly ``round_to`` channels stays whole: halving a 16-channel group to 8
    takes its convolutions off ONNX Runtime's NCHWc kernels (block 16 on AVX-512, 8 on AVX2)
    onto the plain NCHW path with reorders around it; measured on MobileNetV2's first block
    (112x112, 16 channels) that cost more than the MACs it removed
    (``tools/bench/latency_efficiency.py``). Groups smaller than ``round_to`` are left as
    chosen (they cannot be aligned either way).
    """
    if not round_to or round_to <= 1 or size < round_to:
        return keep
    return min(size, max(round_to, int(math.ceil(keep / round_to)) * round_to))
