"""Structured pruning of Hugging Face transformers, applied to the original module.

    inputs (tuple or tokenizer dict, KV cache off) -> trace + group_channels + name the units
    (``classify``) -> score (``criteria``) -> select per kind (``select``) -> plan
    -> apply to a copy (``apply``: slice by FQN, module attributes, config, loader record)
    -> check (forward, mask-equivalence) -> report what was asked, removed, and why not

The stages live in their own modules; this one is the entry point and the report. Kinds:
``heads``, ``head_dim``, ``mlp``, ``hidden`` (lossy), ``blocks`` (whole layers by Block
Influence). Per kind asked, ``result.report`` says how many units were asked for and removed,
and why fewer (pinned by which op, lossy because of which op, no such units in the model, the
pruned model failed the check); a kind that removes nothing warns (``PruneShortfall``).

**Never a wrong program.** With real weights the pruned model is run on the example inputs
and compared with the original whose removed slices are zeroed (``verify``, on by default; the
depth cut applied to both). If a kind breaks that, each kind is tried alone, those that fail
are not applied, the report names the failure, and the rest is applied and checked again.

Saving: ``secateurs.hf.save_pretrained(result, path)`` (or ``result.save_pretrained(path)``)
writes the model and checks that ``from_pretrained_pruned`` reloads it identically, or refuses
(``secateurs.hf.loader``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import InputError, SecateursError
from secateurs.hf.apply import (
    _update_modules,
    apply_hf_plan,
    block_influence,
    drop_blocks,
    module_attrs,
)
from secateurs.hf.classify import KINDS, HFAnalysis, UnitGroup, analyze_hf, unit_counts
from secateurs.hf.criteria import (
    activation_criterion,
    activation_stats,
    gradients,
    taylor_criterion,
    token_mask,
)
from secateurs.hf.layout import block_list, linear_dims, positional_inputs
from secateurs.hf.layout import head_dim as head_dim_of
from secateurs.hf.loader import from_pretrained_pruned, save_pretrained
from secateurs.hf.moe import (
    EXPERT_CRITERIA,
    MoeSelection,
    expert_reference,
    merge_slices,
    select_moe,
)
from secateurs.hf.net import HFNet, describe_group
from secateurs.hf.rotary import check_head_dim_pruning
from secateurs.hf.select import fit_ratio, macs, pruned_shapes, select_hf
from secateurs.passes.calibration import call_batch
from secateurs.passes.cost import SizeRatios, node_macs
from secateurs.passes.importance import CRITERIA, ScoreContext, normalize
from secateurs.passes.plan import Plan, build_plan
from secateurs.passes.repair import Repair, repair

__all__ = ["HFAnalysis", "HFPruneResult", "KindReport", "PruneShortfall", "analyze_hf",
           "prune_hf", "apply_hf_plan", "drop_blocks", "block_influence", "unit_counts",
           "KINDS", "from_pretrained_pruned", "save_pretrained", "check_head_dim_pruning",
           "call_batch", "token_mask", "UnitGroup"]

log = logging.getLogger(__name__)

# kept for callers of the pre-split module
_block_list = block_list
_update_modules = _update_modules
_activation_stats = activation_stats
_grads = gradients
_linear_dims = linear_dims


class PruneShortfall(UserWarning):
    """A kind asked for removed nothing (or less than asked); the report says why."""


@dataclass(frozen=True)
class KindReport:
    """One kind asked for: units asked (before pins), removed, and why fewer."""

    kind: str
    ratio: float
    units: int  # units of this kind in the model (prunable or not)
    asked: int
    removed: int
    reasons: tuple[str, ...] = ()

    @property
    def shortfall(self) -> int:
        return max(self.asked - self.removed, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ratio": self.ratio, "units": self.units,
                "asked": self.asked, "removed": self.removed, "reasons": list(self.reasons)}


@dataclass
class HFPruneResult(SizeRatios):
    model: nn.Module
    plan: Plan
    hf_analysis: HFAnalysis = field(repr=False)
    removed_units: dict[int, np.ndarray] = field(repr=False)
    config_changes: dict[str, Any]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    seconds: dict[str, float]
    report: dict[str, KindReport] = field(default_factory=dict)
    example_inputs: Any = field(default=None, repr=False)
    verified: bool = False
    repairs: tuple[Repair, ...] = ()  # groups the safety net pinned (each a missing rule)
    notes: tuple[str, ...] = ()  # what the safety net could not check

    @property
    def needs_loader(self) -> bool:
        """True when the config cannot describe the pruned model on its own: load what
        ``save_pretrained`` writes with ``secateurs.hf.from_pretrained_pruned``."""
        return bool(getattr(self.model.config, "secateurs", None))

    def save_pretrained(self, path: str, **kwargs: Any) -> Any:
        """Save and check the round trip (``secateurs.hf.save_pretrained``)."""
        return save_pretrained(self, path, **kwargs)

    def summary(self) -> dict[str, Any]:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_kept": self.macs_kept, "params_before": self.params_before,
                "params_after": self.params_after, "params_kept": self.params_kept,
                "config_changes": self.config_changes, "seconds": self.seconds,
                "needs_loader": self.needs_loader, "units": unit_counts(self.hf_analysis),
                "report": {k: r.to_dict() for k, r in self.report.items()},
                "verified": self.verified, "repairs": [r.to_dict() for r in self.repairs],
                "notes": list(self.notes)}


# ---------------------------------------------------------------- what was not done


def _reasons_of(groups: list[Any], lossy: bool) -> list[str]:
    out: list[str] = []
    for g in groups:
        for r in (g.lossy_reasons if lossy else g.pin_reasons):
            if r not in out:
                out.append(r)
    return out


def _heads_per_unit(hfa: HFAnalysis, mine: list[Any], pinned: list[Any]) -> dict[Any, Any]:
    """For each free heads group that is the one free factor of a channel space whose other
    factors are pinned (a kv head over the pinned repeat index of GQA's ``repeat_kv``), the
    query heads one of its units stands for; ``"covered"``: those pinned factors."""
    from secateurs.passes.prune import factor_spaces

    groups = hfa.analysis.groups
    free, fixed = {u.gid for u in mine}, {u.gid for u in pinned}
    spaces, _ = factor_spaces(hfa.analysis, sorted(free | fixed))
    out: dict[Any, Any] = {"covered": set()}
    for sp in spaces:
        loose = [g for g in sp if g in free]
        held = [g for g in sp if g in fixed]
        if len(loose) == 1 and held and loose[0] not in out:
            out[loose[0]] = math.prod(groups[g].size for g in held)
            out["covered"].update(held)
    return out


def _free_head_spaces(hfa: HFAnalysis, mine: list[Any]) -> list[tuple[int, ...]]:
    """Heads spaces factored into several free heads groups (CodeGen's (shard, head in
    shard)): counted as heads, the product of their sizes, not as units of each factor."""
    from secateurs.passes.prune import factor_spaces

    free = {u.gid for u in mine}
    spaces, _ = factor_spaces(hfa.analysis, sorted(free))
    return [sp for sp in spaces if len(sp) > 1 and all(g in free for g in sp)]


def _kind_report(hfa: HFAnalysis, kind: str, ratio: float, removed: dict[int, np.ndarray],
                 allow_lossy: bool, dims_removed: int, head_dim: int,
                 failed: dict[str, str]) -> KindReport:
    groups = hfa.analysis.groups
    mine = [u for u in hfa.units.values() if u.kind == kind]
    pinned = [u for u in hfa.pinned.values() if u.kind == kind]
    reasons: list[str] = []
    if kind == "head_dim":
        qk = [u for u in mine if u.sub == "qk"]
        pair = max([u.dims_per_unit for u in qk] + [1])
        asked = int(math.floor(ratio * head_dim / pair)) * pair if head_dim else 0
        got, units = dims_removed, head_dim
    else:
        # GQA: a kv head is one unit carrying the query heads of its group (the repeat index
        # is a pinned factor of the same space): count query heads, not kv groups
        per = _heads_per_unit(hfa, mine, pinned) if kind == "heads" else {}
        covered = {g for g in per.get("covered", ())}
        weight = {gid: m for gid, m in per.items() if gid != "covered"}
        spaces = _free_head_spaces(hfa, mine) if kind == "heads" else []
        inside = {g for sp in spaces for g in sp}
        counted = [(u, weight.get(u.gid, 1)) for u in mine if u.gid not in inside] + \
            [(u, 1) for u in pinned if u.gid not in covered]
        asked = sum(int(math.floor(ratio * u.size * w)) for u, w in counted)
        got = sum(len(removed.get(u.gid, ())) * weight.get(u.gid, 1) for u in mine
                  if u.gid not in inside)
        units = sum(u.size * w for u, w in counted)
        for sp in spaces:  # (shard, head in shard): a head is one unit of every factor
            total = math.prod(groups[g].size for g in sp)
            kept = math.prod(groups[g].size - len(removed.get(g, ())) for g in sp)
            asked += int(math.floor(ratio * total))
            got += total - kept
            units += total
        pinned = [u for u in pinned if u.gid not in covered or got < asked]
    if kind in failed:
        reasons.append(f"not applied: the model pruned this way {failed[kind]}")
    reasons += list(hfa.reasons.get(kind, ()))
    if not mine and not pinned and not hfa.reasons.get(kind):
        other = [g for g in groups if g.size > 1 and g.id not in hfa.units
                 and g.id not in hfa.pinned]
        other += [groups[u.gid] for u in list(hfa.units.values()) + list(hfa.pinned.values())
                  if u.kind == "other"]
        why = _reasons_of(other, lossy=False)[:3] + _reasons_of(other, lossy=True)[:2]
        reasons.append(f"the analysis found no {kind} units" +
                       (f"; units it could not name are pinned or lossy: {'; '.join(why)}"
                        if why else ""))
    if pinned:
        reasons.append(f"{len(pinned)} {kind} group(s) pinned: "
                       + "; ".join(_reasons_of([groups[u.gid] for u in pinned], False)[:3]))
    part = [groups[u.gid] for u in mine if groups[u.gid].pinned.any()]
    if part:
        reasons.append("units pinned: " + "; ".join(_reasons_of(part, False)[:3]))
    lossy = [groups[u.gid] for u in mine if groups[u.gid].lossy.any()]
    if lossy and not allow_lossy:
        reasons.append("lossy (removing them changes the output): "
                       + "; ".join(_reasons_of(lossy, True)[:3]) + "; pass allow_lossy=True "
                       "to remove them anyway")
    if got < asked and not reasons:
        reasons.append("rounding: every group keeps at least one unit (round_to, GQA "
                       "groups and head-dim pairs remove whole units)")
    return KindReport(kind, ratio, units, asked, got, tuple(reasons))


def _warn_shortfalls(report: dict[str, KindReport], model: nn.Module) -> None:
    for r in report.values():
        if r.ratio > 0 and r.removed == 0:
            warnings.warn(f"prune_hf({type(model).__name__}): {r.kind}={r.ratio} removed "
                          f"nothing (asked {r.asked} of {r.units} units): "
                          f"{'; '.join(r.reasons) or 'no reason recorded'}",
                          PruneShortfall, stacklevel=3)
        elif r.shortfall:
            log.info("prune_hf: %s removed %d of %d asked: %s", r.kind, r.removed, r.asked,
                     "; ".join(r.reasons))


# ---------------------------------------------------------------- the check


def _outputs(model: nn.Module, args: tuple[Any, ...]) -> list[torch.Tensor]:
    from secateurs.passes.prune import flat_outputs

    with torch.no_grad():
        return [t for t in flat_outputs(model(*args)) if t.is_floating_point()]


def _check(original: nn.Module, pruned: nn.Module, plan: Plan, args: tuple[Any, ...],
           exact: bool, drop: list[int]) -> str:
    """'' when the pruned model runs (and, ``exact``, equals the original with the removed
    slices zeroed and the same layers dropped); else what went wrong."""
    try:
        got = _outputs(pruned, args)
    except Exception as e:  # noqa: BLE001 - any failure of the pruned forward is the finding
        return f"raises {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not exact:
        return ""
    ref = expert_reference(original, plan)  # zero_plan_slices (+ removed experts unrouted)
    if drop:
        drop_blocks(ref, drop)
    want = _outputs(ref, args)
    if len(got) != len(want):
        return f"returns {len(got)} tensors instead of {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)}, the reference {tuple(b.shape)}"
        scale = float(b.abs().max()) if b.numel() else 1.0
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
            return (f"differs from the original with the removed slices zeroed (output {i}, "
                    f"max error {float((a - b).abs().max()):.3g})")
    return ""


# ---------------------------------------------------------------- the entry point


def _ratios(ratio: float | None, kinds: dict[str, float | None]) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind, val in kinds.items():
        r = val if val is not None else (ratio if kind in ("heads", "mlp") else None)
        if r is not None:
            if not 0.0 <= float(r) < 1.0:
                raise InputError(f"{kind} ratio must be in [0, 1), got {r!r}")
            out[kind] = float(r)
    return out


def _criterion(importance: Any, work: nn.Module, ctx: ScoreContext, batches: list[Any],
               on_meta: bool) -> Any:
    name = importance if isinstance(importance, str) else None
    if on_meta and name in ("l1", "l2", "taylor", "activation", "bn_scale"):
        raise InputError(
            f"importance={name!r} reads weight values, but the model is on the meta device "
            "(no values: every unit would tie and the first ones would go). Options: "
            "importance='random' (on purpose), a plan from real weights (prune_hf on the "
            "loaded model), scores from the checkpoint "
            "(secateurs.hf.shards.checkpoint_score_context(path) as score_context=, L1/L2 "
            "streamed tensor by tensor), or a callable importance")
    if importance == "activation":
        ctx.extra["activations"] = activation_stats(work, batches)
        return activation_criterion(linear_dims(work))
    if importance == "taylor" and "taylor" not in CRITERIA:
        ctx.grads = gradients(work, batches)
        return taylor_criterion
    if importance == "taylor" and not ctx.grads:
        ctx.grads = gradients(work, batches)
    criterion = importance if callable(importance) else CRITERIA.get(importance)
    if criterion is None:
        raise InputError(f"unknown importance {importance!r}; choose one of "
                         f"{sorted(set(CRITERIA) | {'taylor', 'activation'})}")
    return criterion


def prune_hf(model: nn.Module, example_inputs: Any, ratio: float | None = None, *,
             heads: float | None = None, mlp: float | None = None,
             head_dim: float | None = None, hidden: float | None = None,
             blocks: int | float = 0, experts: int | float = 0,
             expert_importance: str = "reap", importance: str | Any = "l2",
             allow_lossy: bool = False, round_to: int | None = None,
             calibration: list[Any] | None = None, inplace: bool = False,
             score_context: ScoreContext | None = None, uniform: bool = True,
             target_macs: float | None = None, verify: bool = True,
             safety_net: bool = True) -> HFPruneResult:
    """Prune a Hugging Face model and return it (a real ``PreTrainedModel``, so
    ``save_pretrained`` works) with its plan and a per-kind report.

    ``example_inputs``: a tensor, a tuple of positional arguments, or a dict of keyword
    arguments (tokenizer output); the KV cache is switched off while tracing, so default
    configs (``use_cache=True``) work. ``ratio`` is the default fraction of ``heads`` and
    ``mlp`` units to remove; each kind has its own ratio. ``head_dim`` (dims removed from every
    head, rotary pairs together) is off by default; ``hidden`` is lossy and needs
    ``allow_lossy=True``. ``blocks`` drops that many layers (or that fraction when < 1) by
    Block Influence on ``calibration``/example inputs. ``importance``: ``l1``/``l2``/``random``
    (or any registered criterion), ``taylor``, ``activation`` or a callable
    ``(group, ctx) -> scores``; on a ``meta`` model value-reading criteria refuse (pass
    ``score_context=`` from the checkpoint, see ``shards.checkpoint_score_context``).
    ``calibration``: batches of positional arguments (tuples) or keyword arguments (dicts).

    MoE layers (``secateurs.hf.moe``): ``mlp`` also removes that fraction of every routed
    expert's intermediate width (all experts of a layer alike); ``experts`` removes that many
    experts per layer (a fraction when < 1; at least top-k stay), chosen by
    ``expert_importance`` (``reap``: mean router probability x expert output norm over the
    tokens routed to it on the calibration batches; ``frequency``; ``random``). Removing
    experts changes the routing: the contract is the original with the removed experts'
    router logits at ``-inf`` (``moe.expert_reference``).

    ``uniform=False`` ranks heads and MLP neurons across layers. ``target_macs`` (fraction of
    MACs to keep) bisects one ratio shared by ``heads`` and ``mlp`` (those not given).

    ``safety_net`` (``secateurs.passes.repair`` with an HF probe, ``hf.net``): before the
    apply, the plan is applied to a meta copy that must run at the example shapes and at a
    second batch size; groups that break it are found by bisection, pinned with the reason
    (``result.repairs``, and in the report of their kind) and the units re-selected.
    ``verify`` (real weights only): the pruned model must run and equal the original with the
    removed slices zeroed; a kind that breaks this is left out and the report says so.
    ``result.report[kind]``: units asked, removed, and the reasons for any shortfall.

    Saving: ``result.save_pretrained(path)`` checks that ``from_pretrained_pruned`` reloads
    the model identically (or refuses, naming the difference).
    """
    ratios = _ratios(ratio, {"heads": heads, "mlp": mlp, "head_dim": head_dim,
                             "hidden": hidden})
    if not (experts >= 0 and (experts >= 1 and float(experts).is_integer() or experts < 1)):
        raise InputError(f"experts must be a count (int >= 1) or a fraction in [0, 1), got "
                         f"{experts!r}")
    if expert_importance not in EXPERT_CRITERIA:
        raise InputError(f"unknown expert_importance {expert_importance!r}; choose one of "
                         f"{EXPERT_CRITERIA}")
    if ratios.get("hidden") and not allow_lossy:
        raise InputError("hidden-size pruning is lossy (every norm normalises over it); "
                         "pass allow_lossy=True")
    free: tuple[str, ...] = ()
    if target_macs is not None:
        if not 0.0 < float(target_macs) < 1.0:
            raise InputError(f"target_macs must be in (0, 1), got {target_macs!r}")
        if ratio is not None:
            raise InputError("give either ratio or target_macs, not both")
        free = tuple(k for k, v in (("heads", heads), ("mlp", mlp)) if v is None)
        if not free:
            raise InputError("target_macs needs heads or mlp left free (not given)")
    if ratios.get("head_dim"):
        check_head_dim_pruning(model)
    args = positional_inputs(model, example_inputs)
    batches = calibration or [example_inputs if isinstance(example_inputs, dict) else args]
    on_meta = any(p.is_meta for p in model.parameters())
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    # tracing may leave attributes behind (export assigns fake tensors to some rotary
    # modules): analyse the copy that the first apply then prunes, never the caller's model
    probe = model if inplace else copy.deepcopy(model)
    hfa = analyze_hf(probe, args)
    seconds["analyze"] = time.perf_counter() - t
    analysis = hfa.analysis
    tensors = dict(probe.named_parameters())
    tensors.update(dict(probe.named_buffers()))
    ctx = score_context or ScoreContext(tensors)
    t = time.perf_counter()
    criterion = _criterion(importance, probe, ctx, batches,
                           on_meta and not _has_values(score_context))
    scores = {gid: normalize(np.asarray(criterion(analysis.groups[gid], ctx), dtype=np.float64))
              for gid in hfa.units}
    seconds["importance"] = time.perf_counter() - t
    hd_before = head_dim_of(model.config)
    select_kw = dict(allow_lossy=allow_lossy, head_dim_per_head=hd_before, round_to=round_to,
                     uniform=uniform)
    if free:
        t = time.perf_counter()
        try:
            r_fit = fit_ratio(hfa, scores, ratios, free, float(target_macs), select_kw)
        except InputError as e:  # name what holds the MACs back
            why = [f"{k}: " + "; ".join(_kind_report(hfa, k, 0.99, {}, allow_lossy, 0,
                                                     hd_before, {}).reasons or ("-",))
                   for k in free]
            raise InputError(f"{e}; what blocks it: {' | '.join(why)}") from None
        ratios.update({k: r_fit for k in free})
        seconds["fit_ratio"] = time.perf_counter() - t
    n_blocks = 0
    if blocks:
        n_blocks = int(blocks) if blocks >= 1 else int(blocks * len(block_list(model)[1]))
    drop: list[int] = []
    if n_blocks:
        bi = block_influence(probe, batches)
        drop = sorted(int(i) for i in np.argsort(bi, kind="stable")[:n_blocks])
    t = time.perf_counter()
    moe = select_moe(probe, ratios.get("mlp", 0.0), float(experts), ctx.tensors, importance,
                     expert_importance, batches, round_to, on_meta)
    if moe.blocks:
        seconds["moe"] = time.perf_counter() - t
    failed: dict[str, str] = {}
    active = dict(ratios)
    if experts:
        active["experts"] = float(experts)
    params_before = sum(p.numel() for p in model.parameters())
    check = verify and not on_meta
    net_pins: dict[int, Repair] = {}
    notes: list[str] = []
    outer: set[int] | None = None  # outer head factors kept whole after a failed check
    while True:
        removed, dims_removed = select_hf(hfa, scores, active,
                                          skip=set(net_pins) | (outer or set()), **select_kw)
        if safety_net and removed:
            t = time.perf_counter()
            removed, dims_removed = _safety_net(
                model, hfa, args, removed, dims_removed, net_pins, notes,
                lambda sel, dims: _plan(hfa, dict(sel), dims, drop, hd_before, ratios,
                                        importance, criterion, uniform, target_macs, model,
                                        moe, active),
                lambda pinned: select_hf(hfa, scores, active, skip=pinned, **select_kw))
            seconds["check"] = seconds.get("check", 0.0) + time.perf_counter() - t
        plan = _plan(hfa, removed, dims_removed, drop, hd_before, ratios, importance,
                     criterion, uniform, target_macs, model, moe, active)
        t = time.perf_counter()
        work = probe if probe is not None else copy.deepcopy(model)
        probe = None
        changes = apply_hf_plan(work, plan)
        seconds["apply"] = time.perf_counter() - t
        if not check or inplace:
            break
        t = time.perf_counter()
        exact = not _removes_lossy(hfa, removed)
        problem = _check(model, work.eval(), plan, args, exact, drop)
        seconds["verify"] = seconds.get("verify", 0.0) + time.perf_counter() - t
        if not problem:
            break
        kinds = [k for k, r in active.items() if r > 0]
        if not kinds:
            raise SecateursError(f"prune_hf({type(model).__name__}): the pruned model "
                                 f"{problem} with no width pruning at all (blocks={blocks})")
        bad = _failing_kinds(model, hfa, scores, active, select_kw, kinds, args, drop, plan,
                             hd_before, ratios, importance, criterion, uniform, target_macs,
                             problem, moe)
        if "heads" in bad and outer is None:
            outer = _outer_head_factors(hfa)
            if outer:  # once: heads within the outer factors instead of whole ones
                notes.append("heads: removing whole outer head factors (CodeGen's "
                             "model-parallel shards of its fused qkv) made a model the HF "
                             "code reads differently; heads were removed within every one "
                             "of them instead")
                continue
        for k, why in bad.items():
            failed[k] = why
            active[k] = 0.0
        log.warning("prune_hf(%s): %s left out: %s", type(model).__name__, sorted(bad),
                    "; ".join(f"{k} {v}" for k, v in bad.items()))
    macs_before, macs_after = macs(analysis, removed)
    macs_after += _expert_macs_change(analysis, removed, plan.meta["hf"].get("moe"))
    if drop:  # blocks: scale the per-layer share of MACs (approximate, reported as such)
        macs_after = int(macs_after * (1 - len(drop) / len(block_list(model)[1])))
    report = {k: _kind_report(hfa, k, r, removed, allow_lossy, dims_removed, hd_before, failed)
              for k, r in ratios.items() if r > 0}
    _moe_report(report, moe, active, failed, float(experts))
    _net_report(report, hfa, net_pins)
    if n_blocks:
        report["blocks"] = KindReport("blocks", float(blocks), len(block_list(model)[1]),
                                      n_blocks, len(drop))
    _warn_shortfalls(report, model)
    params_after = sum(p.numel() for p in work.parameters())
    return HFPruneResult(work, plan, hfa, removed, changes, macs_before, macs_after,
                         params_before, params_after, seconds, report, example_inputs,
                         verified=check and not inplace,
                         repairs=tuple(net_pins[g] for g in sorted(net_pins)),
                         notes=tuple(notes))


def _expert_macs_change(analysis: Any, removed: dict[int, np.ndarray],
                        moe: dict[str, Any] | None) -> int:
    """The MACs the routed experts' narrower width saves, which the channel groups do not
    hold (``moe.select_moe`` slices the experts' weights itself): every ``grouped_mm`` (the
    experts' projections, one row per routed token) shrinks by the kept width, and every
    router (a Linear of a MoE block writing one logit per expert) by the experts kept.
    Removing experts leaves the routed rows, top-k per token, as they were."""
    moe = moe or {}
    i0, i1 = moe.get("inter", (0, 0))
    e0, e1 = moe.get("experts", (0, 0))
    blocks = tuple(f"{b}." for b in moe.get("blocks", ()))
    graph = analysis.graph
    after_shape = pruned_shapes(analysis, removed)
    change = 0
    for node in graph.nodes:
        if node.op == "grouped_mm" and i0:
            kept = i1 / i0
        elif node.op == "linear" and e0 and len(node.inputs) > 1 and node.inputs[1]:
            w = graph.values[node.inputs[1]]
            if not (w.param and w.param.startswith(blocks) and w.shape and w.shape[0] == e0):
                continue
            kept = e1 / e0
        else:
            continue
        before = node_macs(node, lambda v: graph.values[v].shape)
        change += round(before * kept) - node_macs(node, after_shape)
    return change


def _safety_net(model: nn.Module, hfa: HFAnalysis, args: tuple[Any, ...],
                removed: dict[int, np.ndarray], dims_removed: int,
                pinned: dict[int, Repair], notes: list[str], plan_of: Any,
                select: Any) -> tuple[dict[int, np.ndarray], int]:
    """``repair.repair`` with the HF probe (``hf.net``): the selection whose plan runs on a
    meta copy at the example shapes and a second batch size; culprits land in ``pinned``."""
    state = {"dims": dims_removed}

    def reselect(skip: set[int]) -> dict[int, np.ndarray]:
        sel, state["dims"] = select(skip)
        return sel

    net = HFNet(model, hfa, args, lambda sel: plan_of(sel, state["dims"]))
    before = len(pinned)
    try:
        removed = repair(removed, reselect, net.runs, pinned, net.candidates,
                         describe_group(hfa))
    except SecateursError as e:  # not the groups' doing (MoE slices, dropped layers)
        notes.append(f"safety net: {e}")
    notes.extend(n for n in net.notes if n not in notes)
    if len(pinned) > before:
        log.warning("prune_hf(%s): the safety net pinned %d group(s) (a missing or wrong "
                    "rule each; please report this model): %s", type(model).__name__,
                    len(pinned) - before,
                    "; ".join(r.reason for g, r in sorted(pinned.items())))
    return removed, state["dims"]


def _net_report(report: dict[str, KindReport], hfa: HFAnalysis,
                pinned: dict[int, Repair]) -> None:
    by_kind: dict[str, list[str]] = {}
    for g, rep in sorted(pinned.items()):
        u = hfa.units.get(g)
        if u is not None:
            by_kind.setdefault(u.kind, []).append(rep.reason)
    for kind, why in by_kind.items():
        if kind in report:
            r = report[kind]
            text = f"{len(why)} group(s) pinned by the safety net: " + "; ".join(why[:3])
            kept = tuple(x for x in r.reasons if not x.startswith("rounding:"))
            report[kind] = dataclasses.replace(r, reasons=(*kept, text))


def _has_values(ctx: ScoreContext | None) -> bool:
    """A score context whose tensors carry values (not meta stand-ins)."""
    if ctx is None:
        return False
    from secateurs.hf.shards import CheckpointTensors

    if isinstance(ctx.tensors, CheckpointTensors):
        return True
    first = next(iter(ctx.tensors.values()), None)
    return first is not None and not first.is_meta


def _removes_lossy(hfa: HFAnalysis, removed: dict[int, np.ndarray]) -> bool:
    groups = hfa.analysis.groups
    return any(groups[g].lossy[idx].any() for g, idx in removed.items() if len(idx))


def _moe_report(report: dict[str, KindReport], moe: MoeSelection, active: dict[str, float],
                failed: dict[str, str], experts: float) -> None:
    """Merge the MoE layers' expert widths into ``mlp`` and add ``experts``."""
    for kind, (units, asked, got, why) in moe.counts.items():
        if kind == "experts" and not experts:
            continue
        got = got if active.get(kind, 0) > 0 else 0
        reasons = list(why)
        if kind in failed:
            reasons.append(f"not applied: the model pruned this way {failed[kind]}")
        base = report.get(kind)
        if base is None:
            report[kind] = KindReport(kind, experts if kind == "experts" else 0.0, units,
                                      asked, got, tuple(reasons))
            continue
        # the analysis sees the 3-D expert tensors as pinned 'other' groups: with their
        # widths pruned here, "found no mlp units" is no longer the story
        kept = [r for r in base.reasons if not (got and r.startswith("the analysis found no"))]
        report[kind] = KindReport(kind, base.ratio, base.units + units, base.asked + asked,
                                  base.removed + got, tuple(kept + reasons))


def _plan(hfa: HFAnalysis, removed: dict[int, np.ndarray], dims_removed: int, drop: list[int],
          hd_before: int, ratios: dict[str, float], importance: Any, criterion: Any,
          uniform: bool, target_macs: float | None, model: nn.Module,
          moe: MoeSelection | None = None, active: dict[str, float] | None = None) -> Plan:
    hidden_removed = sum(len(removed.get(u.gid, ())) for u in hfa.of_kind("hidden"))
    meta = {"importance": getattr(criterion, "__name__", str(importance)), "ratios": ratios,
            "uniform": uniform, "target_macs": target_macs,
            "tracer": hfa.tracer, "torch": torch.__version__,
            "hf": {"head_dim_before": hd_before, "head_dim_removed": dims_removed,
                   "hidden_removed": hidden_removed, "drop_layers": drop,
                   "mlp_sizes": sorted({(u.size, u.size - len(removed.get(u.gid, ())))
                                        for u in hfa.of_kind("mlp")}),
                   "model_type": getattr(model.config, "model_type", "")}}
    plan = build_plan(hfa.analysis, removed, meta)
    attrs = module_attrs(hfa.analysis.graph, plan.constants)
    if attrs:
        plan.meta["hf"]["module_attrs"] = attrs
    moe_meta = moe.meta(active or ratios) if moe is not None else {}
    if moe_meta:
        merge_slices(plan.removed, moe.slices(active or ratios))
        hf = plan.meta["hf"]
        hf["moe"] = moe_meta
        i0, i1 = moe_meta["inter"]
        if i0 != i1:
            hf["mlp_sizes"] = sorted(set(map(tuple, hf["mlp_sizes"])) | {(i0, i1)})
    return plan


def _outer_head_factors(hfa: HFAnalysis) -> set[int]:
    """The outer factor of every channel space the heads groups factor (CodeGen's shard of a
    (shard, head-in-shard) head index): keeping them whole leaves the ratio to the inner
    factors, which remove heads uniformly within each outer unit."""
    from secateurs.passes.prune import factor_spaces

    spaces, _ = factor_spaces(hfa.analysis, [u.gid for u in hfa.of_kind("heads")])
    return {sp[0] for sp in spaces if len(sp) > 1}


def _failing_kinds(model: nn.Module, hfa: HFAnalysis, scores: dict[int, np.ndarray],
                   active: dict[str, float], select_kw: dict[str, Any], kinds: list[str],
                   args: tuple[Any, ...], drop: list[int], plan: Plan, hd_before: int,
                   ratios: dict[str, float], importance: Any, criterion: Any, uniform: bool,
                   target_macs: float | None, problem: str,
                   moe: MoeSelection | None = None) -> dict[str, str]:
    """Each kind alone: those whose pruned model fails the check, with what went wrong (all
    of them, with the combined failure, when each passes alone)."""
    if len(kinds) == 1:
        return {kinds[0]: problem}
    bad = {}
    for k in kinds:
        alone = {kk: (r if kk == k else 0.0) for kk, r in active.items()}
        removed, dims = select_hf(hfa, scores, alone, **select_kw)
        p = _plan(hfa, removed, dims, drop, hd_before, ratios, importance, criterion, uniform,
                  target_macs, model, moe, alone)
        work = copy.deepcopy(model)
        apply_hf_plan(work, p)
        why = _check(model, work.eval(), p, args, not _removes_lossy(hfa, removed), drop)
        if why:
            bad[k] = why
    return bad or {kinds[-1]: f"{problem} (combined with {', '.join(kinds[:-1])})"}
