"""Structured pruning of torch models: the pipeline as one flat list of named stages.

    trace -> shapes -> lower -> group_channels -> importance -> select -> plan -> apply -> verify

``prune`` runs them and returns a ``PruneResult``; ``analyze`` stops after grouping;
``apply_plan`` re-applies a saved plan. A failure names the stage it happened in.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import InputError, PlanError, SecateursError
from secateurs.graph import from_fx
from secateurs.graph.fx_apply import apply_plan_fx, tensor_slots
from secateurs.graph.fx_lower import RANDOM_CALLS, call_key
from secateurs.graph.fx_trace import picklable
from secateurs.graph.ir import is_trace_constant
from secateurs.passes.cost import SizeRatios, count_macs
from secateurs.passes.group_channels import Analysis, ChannelGroup, Member, group_channels
from secateurs.passes.importance import (
    Criterion,
    ScoreContext,
    get_criterion,
    normalize,
    rounded_keep,
)
from secateurs.passes.plan import Plan, build_plan
from secateurs.passes.repair import FxNet, Repair, batch_of, compare_outputs, conclude, repair

__all__ = ["analyze", "prune", "apply_plan", "select_units", "PruneResult", "PruneReport",
           "GroupRow", "verify_mask_equivalence", "zero_plan_slices", "group_rows",
           "flat_outputs", "StageTimer", "copy_sharing_tensors", "unshare_tensors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupRow:
    id: int
    members: str
    units_before: int
    units_after: int
    lossy: bool
    pinned: str


@dataclass(frozen=True)
class PruneReport(SizeRatios):
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: tuple[GroupRow, ...]
    seconds: dict[str, float]
    tracer: str
    exact: bool | None = None
    max_abs_diff: float | None = None
    repairs: tuple[Repair, ...] = ()  # groups the safety net pinned (each a missing rule)
    notes: tuple[str, ...] = ()  # what the net could not check

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "macs_kept": self.macs_kept, "params_kept": self.params_kept,
            "seconds": self.seconds, "tracer": self.tracer, "exact": self.exact,
            "max_abs_diff": self.max_abs_diff,
            "groups": [row.__dict__ for row in self.groups],
            "repairs": [r.to_dict() for r in self.repairs],
            "notes": list(self.notes),
        }

    def table(self, max_groups: int = 40) -> str:
        lines = [
            f"{'':<10}{'before':>16}{'after':>16}{'kept':>8}",
            f"{'params':<10}{self.params_before:>16,}{self.params_after:>16,}"
            f"{self.params_kept:>8.1%}",
            f"{'MACs':<10}{self.macs_before:>16,}{self.macs_after:>16,}{self.macs_kept:>8.1%}",
            "",
            f"{'group':>5}  {'units':>11}  {'lossy':<5}  members / pinned because",
        ]
        changed = [r for r in self.groups if r.units_after != r.units_before]
        rest = [r for r in self.groups if r.units_after == r.units_before]
        for row in (changed + rest)[:max_groups]:
            note = row.members + (f"  [pinned: {row.pinned}]" if row.pinned else "")
            lines.append(f"{row.id:>5}  {row.units_before:>5}->{row.units_after:<5}  "
                         f"{'yes' if row.lossy else 'no':<5}  {note}")
        if len(self.groups) > max_groups:
            lines.append(f"  ... {len(self.groups) - max_groups} more groups")
        if self.repairs:
            lines += ["", f"repaired by the safety net ({len(self.repairs)} groups pinned; "
                      "each is a missing channel rule, please report):"]
            lines += [f"  {r.reason}" for r in self.repairs]
        lines += [f"note: {n}" for n in self.notes]
        timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.seconds.items())
        lines += ["", f"time: {timing} (traced with {self.tracer})"]
        if self.exact is not None:
            lines.append(f"mask-equivalence: {'exact' if self.exact else 'NOT exact'} "
                         f"(max |diff| {self.max_abs_diff:.3g})")
        return "\n".join(lines)


@dataclass
class PruneResult:
    model: nn.Module
    plan: Plan
    report: PruneReport
    analysis: Analysis = field(repr=False)


class StageTimer:
    """Runs named stages, records each one's time, and names the failing stage (and the
    ones done before it) in the error."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stage = ""

    def run(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.stage = stage
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except SecateursError:
            raise
        except Exception as exc:
            done = ", ".join(self.seconds) or "none"
            raise SecateursError(f"stage '{stage}' failed (stages done: {done}): "
                                 f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def analyze(model: nn.Module, example_inputs: Any) -> Analysis:
    """Dependency analysis of ``model`` (not modified; meta-device weights are fine)."""
    graph, _, _ = from_fx.from_fx(model, example_inputs, copy_model=False)
    return group_channels(graph)


def _check_ratio(name: str, ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise InputError(f"{name} must be in [0, 1), got {ratio!r}")


def _ignored_groups(analysis: Analysis, model: nn.Module, ignore: Iterable[Any]) -> set[int]:
    ignore = list(ignore)
    if not ignore:
        return set()
    names: list[str] = []
    module_names = {id(m): n for n, m in model.named_modules()}
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in module_names:
                raise InputError(f"ignore: module {type(item).__name__} is not part of the model")
            names.append(module_names[id(item)])
        else:
            names.append(str(item))
    params = set(analysis.param_values)
    known = {n for n, _ in model.named_modules()} | params
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"ignore names {unknown} match no module or parameter of the model; "
                         f"module names look like {sorted(known)[:5]}")
    out = set()
    for g in analysis.groups:
        for p in g.params():
            if any(p == n or p.startswith(n + ".") or n == "" for n in names):
                out.add(g.id)
    return out


def _plain_member(member: Member) -> bool:
    """Every unit of the group has one position in this parameter dim (no unit repeats)."""
    return member.plain


def _plain(group: ChannelGroup) -> bool:
    """Units are single channels (not heads): round_to applies to their count."""
    return all(_plain_member(m) for m in group.members)


def select_units(analysis: Analysis, scores: Mapping[int, np.ndarray], ratio: float,
                 round_to: int | str | Callable[[ChannelGroup, int], int] | None = None,
                 global_pruning: bool = False,
                 allow_lossy: bool = False, skip: set[int] | None = None,
                 ratios: Mapping[int, float] | None = None,
                 min_units: int = 1,
                 target_latency: float | None = None) -> dict[int, np.ndarray]:
    """Choose the units to remove, per group (or ranked globally). ``round_to``: one
    multiple for every plain channel group, a policy ``(group, keep) -> keep`` that rounds
    any group it chooses to, or ``"auto"``: the policy for ONNX Runtime's CPU kernels
    (``kernel_widths.ort_cpu_widths``, widths per op kind).

    Per group, ``ratio`` (or the group's entry in ``ratios``) is the fraction of its prunable
    width removed (units a rule pins, such as Falcon's key and value slots next to its query
    heads, are not counted). Where one channel space is factored into several groups (heads x head dim,
    conv groups x channels per group, shuffle groups), the ratio applies to the space's width,
    not to every factor: the outer factor (heads) loses its share first and the inner ones only
    what is still missing (:func:`factor_spaces`), so ``ratio=0.5`` keeps half of a ViT's
    attention width in whole heads at their full head dim, not a quarter of it.

    ``target_latency`` (a fraction of the dense model's estimated ONNX Runtime CPU latency)
    replaces ``ratio`` by the smallest one whose selection meets it (``passes/latency.py``)."""
    skip = skip or set()
    if round_to == "auto":
        from secateurs.passes.kernel_widths import ort_cpu_widths

        round_to = ort_cpu_widths(analysis)
    eligible: dict[int, np.ndarray] = {}
    for g in analysis.groups:
        if g.id in skip or g.size < 2 or g.id not in scores:
            continue
        if g.removal_is_lossy and not allow_lossy:
            continue
        ok = ~g.pinned
        if ok.any():
            eligible[g.id] = np.nonzero(ok)[0]

    def removal(g: ChannelGroup, n_remove: int) -> int:
        """``n_remove`` after the width policy, the pinned units and ``min_units``."""
        keep = g.size - n_remove
        if callable(round_to):
            keep = round_to(g, keep)
        elif _plain(g):
            keep = rounded_keep(g.size, keep, round_to)
        keep = max(keep, min_units, int(g.pinned.sum()))
        return max(0, min(g.size - keep, len(eligible[g.id])))

    def choose(gid: int, n_remove: int) -> np.ndarray:
        """The ``n_remove`` lowest-scoring eligible units (no member left empty)."""
        units = eligible[gid]
        order = np.argsort(scores[gid][units], kind="stable")
        return _keep_every_member(analysis.groups[gid], np.sort(units[order[:n_remove]]),
                                  scores[gid])

    if target_latency is not None:
        from secateurs.passes.latency import ratio_for_latency

        spaces, _ = factor_spaces(analysis, eligible)
        return ratio_for_latency(analysis, lambda r, extra: select_units(
            analysis, scores, r, round_to, global_pruning, allow_lossy, skip,
            {**(ratios or {}), **extra}, min_units), target_latency, spaces)[1]
    counts: dict[int, int] = {}
    if global_pruning:
        pool = [(float(scores[gid][u]), gid, int(u)) for gid, units in eligible.items()
                for u in units]
        pool.sort()
        budget = int(ratio * sum(len(units) for units in eligible.values()))
        for _, gid, _ in pool[:budget]:
            counts[gid] = counts.get(gid, 0) + 1
        counts = {gid: removal(analysis.groups[gid], n) for gid, n in counts.items()}
    else:
        asked = {gid: (ratios or {}).get(gid, ratio) for gid in eligible}
        for gid, r in asked.items():
            counts[gid] = removal(analysis.groups[gid],
                                  int(math.floor(r * len(eligible[gid]))))
    removed = {gid: choose(gid, n) for gid, n in counts.items() if n > 0}
    if not global_pruning:
        spaces, order = factor_spaces(analysis, eligible)
        spaces = [sp for sp in spaces if len({asked[gid] for gid in sp}) == 1]
        kept: dict[int, float] = {}
        for gid in (g for g in order if any(g in sp for sp in spaces)):  # outer factors first
            g = analysis.groups[gid]
            # what the factors before this one already took from each space it is part of
            # (the least of them: no space loses more than its ratio)
            done = min(math.prod(kept[o] for o in sp[:sp.index(gid)])
                       for sp in spaces if gid in sp)
            share = max(0.0, 1.0 - (1.0 - asked[gid]) / done)
            n = removal(g, int(math.floor(share * len(eligible[gid]) + 1e-9)))
            removed.pop(gid, None)
            if n > 0:
                removed[gid] = choose(gid, n)
            kept[gid] = 1.0 - len(removed.get(gid, ())) / len(eligible[gid])
    return {gid: idx for gid, idx in removed.items() if len(idx)}


def factor_spaces(analysis: Analysis,
                  among: Iterable[int]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Channel spaces factored into several groups (of ``among``): the groups whose units
    share positions of one parameter dim (each position is one head *and* one head dim).
    Returns the spaces, each outer factor first (the factor whose units cover the longest runs
    of positions: heads before head dims), and every factor in that same order. A group
    that is some conv's or linear's own output channels (the operands of a flattened outer
    product, a conv's channels split by a shuffle) is a channel space of its own and keeps its
    ratio; groups over disjoint positions of one dim (concat parts) are not factors of each
    other."""
    among = frozenset(among)
    key_ = ("factor_spaces", among)
    if key_ not in analysis.memo:
        analysis.memo[key_] = _factor_spaces(analysis, among)
    spaces, factors = analysis.memo[key_]
    return list(spaces), list(factors)


def _factor_spaces(analysis: Analysis,
                   among: frozenset[int]) -> tuple[list[tuple[int, ...]], list[int]]:
    slots: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    run_length: dict[int, float] = {}
    outputs = _layer_outputs(analysis)
    for gid in sorted(among):
        g = analysis.groups[gid]
        if any((m.param, m.dim) in outputs and _plain_member(m) for m in g.members):
            continue  # a layer's own output channels (an outer product's operand)
        for m in g.members:
            if _plain_member(m):
                continue
            units = m.units[np.argsort(m.positions, kind="stable")]
            runs = 1 + int(np.count_nonzero(units[1:] != units[:-1]))
            run_length[gid] = max(run_length.get(gid, 0.0), len(units) / runs)
            slots.setdefault((m.param, m.dim), []).append((gid, m.positions))

    def key(gid: int) -> tuple[float, int]:
        return -run_length[gid], gid

    spaces: set[tuple[int, ...]] = set()
    for entries in slots.values():
        parent = list(range(len(entries)))

        def find(i: int, parent: list[int] = parent) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        for i, (a, pa) in enumerate(entries):
            for j in range(i + 1, len(entries)):
                b, pb = entries[j]
                if a != b and np.intersect1d(pa, pb).size:
                    parent[find(i)] = find(j)
        parts: dict[int, set[int]] = {}
        for i, (gid, _) in enumerate(entries):
            parts.setdefault(find(i), set()).add(gid)
        spaces.update(tuple(sorted(p, key=key)) for p in parts.values() if len(p) > 1)
    factors = sorted({gid for sp in spaces for gid in sp}, key=key)
    return sorted(spaces), factors


def _layer_outputs(analysis: Analysis) -> set[tuple[str, int]]:
    """``(parameter, dim)`` of every conv's and linear's output channels."""
    values = {v: p for p, v in analysis.param_values.items()}
    out: set[tuple[str, int]] = set()
    for node in analysis.graph.nodes:
        if node.op in ("conv", "linear") and len(node.inputs) > 1 and node.inputs[1] in values:
            out.add((values[node.inputs[1]], 1 if node.attrs.get("transposed") else 0))
    return out


def _keep_every_member(group: ChannelGroup, chosen: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """No tensor may lose all of its positions: where a member's units are all chosen, keep
    the best-scoring one (e.g. a conv feeding one half of a split that the ranking emptied)."""
    gone = np.zeros(group.size, dtype=bool)
    gone[chosen] = True
    for m in group.members:
        if len(m.units) and gone[m.units].all():
            units = np.unique(m.units)
            gone[units[np.argmax(scores[units])]] = False
    return np.nonzero(gone)[0]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    return out


def copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that still shares its parameters and buffers.

    Pruning replaces most tensors by their slices anyway, so copying them first (what
    ``deepcopy`` does) is wasted work: the pipeline copies the structure, slices, then
    :func:`unshare_tensors` clones whatever is still the caller's. Plain modules are copied
    attribute by attribute (3-5x faster than ``deepcopy``'s reduce protocol); a module class
    with its own copy or pickle hooks (``GraphModule``, RNNs) goes through ``deepcopy``."""
    memo: dict[int, Any] = {id(t): t for _, _, t in tensor_slots(model)}
    return _copy_module(model, memo)


# A class that changes what deepcopy would copy goes through deepcopy itself (``__setstate__``
# alone only patches old pickles, e.g. Conv's ``padding_mode``).
_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__copy__")
_ATOMIC = (int, float, bool, str, type(None), torch.dtype, torch.device)
_FLAT = (tuple, list, set, dict, OrderedDict)  # copied shallowly when they hold atomics only


def _copy_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    hit = memo.get(id(mod))
    if hit is not None:
        return hit
    cls = type(mod)
    if any(getattr(cls, a, None) is not getattr(nn.Module, a, None) for a in _COPY_HOOKS):
        return copy.deepcopy(mod, memo)
    new = cls.__new__(cls)
    memo[id(mod)] = new
    state: dict[str, Any] = {}
    for key, value in mod.__dict__.items():
        if key == "_modules":
            state[key] = {n: None if c is None else _copy_module(c, memo)
                          for n, c in value.items()}
        elif key in ("_parameters", "_buffers"):
            state[key] = dict(value)  # the tensors stay shared until unshare_tensors
        elif type(value) in _ATOMIC:
            state[key] = value
        elif type(value) in _FLAT and all(type(v) in _ATOMIC for v in (
                [*value, *value.values()] if isinstance(value, dict) else value)):
            # kernel sizes, paddings, empty hook registries, non-persistent buffer names
            state[key] = value if type(value) is tuple else value.copy()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def unshare_tensors(copied: nn.Module, original: nn.Module) -> nn.Module:
    """Clone every tensor ``copied`` still shares with ``original`` (tied ones stay tied)."""
    theirs = {id(t) for _, _, t in tensor_slots(original)}
    clones: dict[int, torch.Tensor] = {}
    for slots, attr, t in list(tensor_slots(copied)):
        if id(t) not in theirs:
            continue
        new = clones.get(id(t))
        if new is None:
            data = t.detach().clone()
            new = nn.Parameter(data, requires_grad=t.requires_grad) \
                if isinstance(t, nn.Parameter) else data
            clones[id(t)] = new
        slots[attr] = new
    return copied


def _report(analysis: Analysis, removed: dict[int, np.ndarray], n_before: int,
            model_after: nn.Module, seconds: dict[str, float], tracer: str,
            repairs: Mapping[int, Repair] | None = None) -> PruneReport:
    graph = analysis.graph
    gone = analysis.removed_atoms(removed)

    def before(v: str):
        return graph.values[v].shape

    def after(v: str):
        if v in analysis.labels:
            return analysis.new_shape(v, gone)
        return graph.values[v].shape

    n_after = sum(p.numel() for p in model_after.parameters())
    repairs = dict(repairs or {})
    return PruneReport(n_before, n_after, count_macs(graph, before), count_macs(graph, after),
                       group_rows(analysis, removed, repairs), dict(seconds), tracer,
                       repairs=tuple(repairs[g] for g in sorted(repairs)))


def group_rows(analysis: Analysis, removed: Mapping[int, np.ndarray],
               repairs: Mapping[int, Repair] | None = None) -> tuple[GroupRow, ...]:
    """One report row per channel group: members, widths before/after, why pinned (a group
    the safety net pinned shows the net's reason)."""
    repairs = repairs or {}
    rows = []
    for g in analysis.groups:
        n_rm = len(removed.get(g.id, ()))
        mem = ", ".join(f"{m.param}[{m.dim}]" for m in g.members[:3])
        if len(g.members) > 3:
            mem += f" +{len(g.members) - 3}"
        pinned = "; ".join(g.pin_reasons[:2]) if g.is_pinned else ""
        if g.id in repairs:
            pinned = repairs[g.id].reason
        rows.append(GroupRow(g.id, mem, g.size, g.size - n_rm, g.is_lossy, pinned))
    return tuple(rows)




def zero_plan_slices(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with every slice the plan removes set to zero (the contract's
    reference).

    A plan may also slice tensors that exist only in the traced program: ``symbolic_trace``
    freezes a tensor computed from constants alone (a timestep embedding's frequencies,
    ``exp(-log(1e4) * arange(d) / d)``) into a ``_tensor_constantN`` attribute, and
    ``graph.fx_fold`` does the same for what torch.export records (``_secateurs_const_N``:
    ALiBi slopes). The model
    recomputes it on every call, so there is nothing to zero: the reference zeroes the model's
    own tensors only (the consumers' slices are zeroed, so the comparison still holds; it can
    only be stricter). Any other name the model lacks is an error (a plan made for another
    model)."""
    ref = copy.deepcopy(model)
    tensors = _tensors(ref)
    unknown = [n for n in plan.removed if n not in tensors and not is_trace_constant(n)]
    if unknown:
        raise InputError(f"the plan removes slices of {unknown[:5]}, which the model does not "
                         f"have (was the plan made for another model?); the model's tensors "
                         f"look like {sorted(tensors)[:5]}")
    with torch.no_grad():
        for name, dims in plan.removed.items():
            if name not in tensors:
                continue  # a trace-time constant (see above)
            t = tensors[name]
            for d, idx in dims.items():
                t.index_fill_(d, torch.as_tensor(idx, dtype=torch.long, device=t.device), 0)
    return ref


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flat_outputs(o)]
    return []


def _eval(model: nn.Module) -> nn.Module:
    """eval() where the module supports it (an exported program's module was exported in the
    mode it runs in and refuses mode switches)."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def verify_mask_equivalence(original: nn.Module, pruned: nn.Module, plan: Plan,
                            example_inputs: Any, rtol: float = 1e-4,
                            atol: float = 1e-5) -> tuple[bool, float]:
    """The correctness contract: original with the plan's slices zeroed == pruned model."""
    args = from_fx._as_tuple(example_inputs)
    ref = _eval(zero_plan_slices(original, plan))
    with torch.no_grad():
        expected = flat_outputs(ref(*args))
        got = flat_outputs(_eval(pruned)(*args))
    return compare_outputs(expected, got, rtol, atol)


def prune(model: nn.Module, example_inputs: Any, ratio: float = 0.5,
          importance: str | Criterion = "l2", round_to: int | str | None = None,
          ignore: Iterable[Any] = (), global_pruning: bool = False, allow_lossy: bool = False,
          verify: bool = False, inplace: bool = False,
          ratios: Mapping[str, float] | None = None, reduction: str = "sum",
          normalization: str = "mean", min_units: int = 1,
          score_context: ScoreContext | None = None,
          target_macs: float | None = None,
          target_latency: float | None = None) -> PruneResult:
    """Remove the least important ``ratio`` of units in every exact channel group.

    ``ratios`` maps module (or parameter) names to their own ratio for the groups they belong
    to. ``target_macs`` (a fraction of the dense MACs to keep) replaces ``ratio`` by the one
    that meets it (``schedule.prune_to_macs``); ``target_latency`` (a fraction of the dense
    model's estimated ONNX Runtime CPU latency) by the smallest one whose selection meets it
    (``passes/latency.py``). ``round_to``: kept widths are multiples of it (default: as the
    ratio falls), or ``"auto"``: widths per op kind for ONNX Runtime's CPU kernels, as
    ``prune_onnx`` does by default. The caller's model is not modified unless ``inplace=True``.
    """
    check_target_latency(target_latency, target_macs=target_macs)
    if target_macs is not None:
        from secateurs.passes.schedule import prune_to_macs

        return prune_to_macs(model, example_inputs, target_macs, importance, round_to=round_to,
                             ignore=ignore, global_pruning=global_pruning,
                             allow_lossy=allow_lossy, verify=verify, inplace=inplace,
                             ratios=ratios, reduction=reduction, normalization=normalization,
                             min_units=min_units, score_context=score_context)
    _check_ratio("ratio", ratio)
    _check_options(ratios, round_to)
    prep = prepare(model, example_inputs, importance, ignore=ignore, inplace=inplace,
                   reduction=reduction, normalization=normalization,
                   score_context=score_context)
    return finish(prep, ratio, round_to=round_to, global_pruning=global_pruning,
                  allow_lossy=allow_lossy, ratios=ratios, min_units=min_units, verify=verify,
                  target_latency=target_latency)


def check_target_latency(target: float | None, **others: Any) -> None:
    """``target_latency`` is a fraction in (0, 1) and replaces the other selection options."""
    if target is None:
        return
    if isinstance(target, bool) or not isinstance(target, (int, float)) \
            or not 0.0 < float(target) < 1.0:
        raise InputError(f"target_latency must be in (0, 1) (the fraction of the dense "
                         f"model's estimated latency to keep), got {target!r}")
    given = [k for k, v in others.items() if v]
    if given:
        raise InputError(f"target_latency chooses the ratio itself: give it without "
                         f"{', '.join(given)}")


def _check_options(ratios: Mapping[str, float] | None, round_to: int | str | None) -> None:
    for name, r in (ratios or {}).items():
        _check_ratio(f"ratios[{name!r}]", r)
    if round_to is not None and round_to != "auto" and (
            isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise InputError(f"round_to must be a positive integer or 'auto', got {round_to!r}")


@dataclass
class Prepared:
    """Everything before selection: the traced copy, its analysis and the unit scores. A
    schedule (``prune_to_macs``) selects on it as often as it likes, then ``finish`` applies
    one selection, so the model is traced and analysed once."""

    model: nn.Module
    example_inputs: Any
    inplace: bool
    gm: torch.fx.GraphModule
    tracer: str
    analysis: Analysis
    scores: dict[int, np.ndarray]
    skip: set[int]
    criterion_name: str
    timer: StageTimer
    repairs: dict[int, Repair] = field(default_factory=dict)  # pinned by the net, kept
    notes: list[str] = field(default_factory=list)


def prepare(model: nn.Module, example_inputs: Any, importance: str | Criterion = "l2", *,
            ignore: Iterable[Any] = (), inplace: bool = False, reduction: str = "sum",
            normalization: str = "mean",
            score_context: ScoreContext | None = None) -> Prepared:
    """Copy (unless ``inplace``), trace, analyse and score ``model``."""
    criterion = get_criterion(importance)
    timer = StageTimer()
    work = model if inplace else timer.run("copy", copy_sharing_tensors, model)
    gm, tracer = timer.run("trace", from_fx.trace_folded, work, example_inputs)
    timer.run("shapes", from_fx.propagate_shapes, gm, example_inputs)
    graph = timer.run("lower", from_fx.lower_graph_module, gm)
    analysis = timer.run("group_channels", group_channels, graph)
    skip = _ignored_groups(analysis, model, ignore)  # the caller's modules, not the copy's
    ctx = score_context or ScoreContext(_tensors(gm), reduction=reduction)
    scores = timer.run("importance", lambda: {
        g.id: normalize(np.asarray(criterion(g, ctx), dtype=np.float64), normalization)
        for g in analysis.groups if g.prunable and g.size > 1})
    prep = Prepared(model, example_inputs, inplace, gm, tracer, analysis, scores, skip,
                    getattr(criterion, "__name__", str(importance)), timer)
    if tracer == "export (static shapes)":
        prep.notes.append("torch.export could not keep the batch symbolic: the pruned program "
                          "runs at the example inputs' shapes only (pass examples at the batch "
                          "you deploy)")
    elif tracer == "export (batch >= 2)":
        prep.notes.append("the program torch.export traced refuses batch 1, and so does the "
                          "pruned one (a batch-1 example keeps batch 1; torch.export may then "
                          "fix the batch)")
    if tracer.startswith("export"):
        sizes = [tuple(a.shape[1:]) for a in from_fx._as_tuple(example_inputs)
                 if isinstance(a, torch.Tensor)]
        if tracer != "export (static shapes)" and any(sizes):
            prep.notes.append(f"torch.export keeps only the batch symbolic: the pruned "
                              f"program runs at the example's other sizes {sizes} only "
                              f"(image size, sequence length)")
        if type(model).__module__.startswith("transformers."):
            prep.notes.append("a Hugging Face model: secateurs.hf.prune_hf prunes the model "
                              "itself (any batch and sequence length, its config updated, "
                              "save_pretrained) instead of its traced program")
    return prep


def finish(prep: Prepared, ratio: float, *, round_to: int | str | None = None,
           global_pruning: bool = False, allow_lossy: bool = False,
           ratios: Mapping[str, float] | None = None, min_units: int = 1,
           verify: bool = False, target_latency: float | None = None) -> PruneResult:
    """Select at ``ratio`` on ``prep``, then plan, apply, report (and optionally verify)."""
    model, timer, tracer, analysis = prep.model, prep.timer, prep.tracer, prep.analysis
    if verify:
        _check_deterministic_fx(prep.gm)
    if verify and prep.inplace:
        raise InputError("verify=True needs the original model; it cannot be combined with "
                         "inplace=True")
    group_ratios = _group_ratios(analysis, ratios or {})

    def reselect(pinned: set[int]) -> dict[int, np.ndarray]:
        return select_units(analysis, prep.scores, ratio, round_to, global_pruning,
                            allow_lossy, prep.skip | pinned, group_ratios, min_units,
                            target_latency)

    removed = timer.run("select", reselect, set(prep.repairs))
    meta = {"ratio": None if target_latency is not None else ratio,
            "target_latency": target_latency, "round_to": round_to,
            "global_pruning": global_pruning,
            "allow_lossy": allow_lossy, "importance": prep.criterion_name, "tracer": tracer,
            "torch": torch.__version__}
    lossy = frozenset(g.id for g in analysis.groups if g.is_lossy) if allow_lossy \
        else frozenset()
    net = FxNet(prep.gm, analysis, from_fx._as_tuple(prep.example_inputs), meta,
                exclude_exact=lossy)
    # with allow_lossy, verify checks the lossless part by trials, before the apply
    removed = timer.run("check", repair, removed, reselect,
                        net.both if verify and lossy else net.runs, prep.repairs,
                        net.candidates, _describe(analysis))
    plan = timer.run("plan", net.plan, removed)
    n_params_before = sum(p.numel() for p in model.parameters())
    pruned = timer.run("apply", apply_plan_fx, prep.gm, plan)
    if not prep.inplace:
        timer.run("apply", unshare_tensors, pruned, model)
    ok, diff = None, None
    if verify and lossy & set(removed):
        ok, diff = True, net.last_diff
        net.notes.append("mask-equivalence covers the lossless groups only: lossy groups "
                         f"{sorted(lossy & set(removed))} were pruned (allow_lossy=True)")
    elif verify:
        ok, diff, at = timer.run("verify", _verify_batches, model, pruned, plan, prep)
        if not ok:  # the net, numerically: find the groups, pin them, prune again
            fresh = timer.run("repair", _retrace, prep)
            net = FxNet(fresh, analysis, at, meta, exclude_exact=lossy, notes=net.notes)
            removed = timer.run("repair", repair, removed, reselect, net.both, prep.repairs,
                                net.candidates, _describe(analysis))
            plan = timer.run("plan", build_plan, analysis, removed, meta)
            pruned = timer.run("apply", apply_plan_fx, fresh, plan)
            timer.run("apply", unshare_tensors, pruned, model)
            ok, diff, _ = timer.run("verify", _verify_batches, model, pruned, plan, prep)
    if target_latency is not None:
        from secateurs.passes.latency import latency_note

        net.notes.append(latency_note(analysis, removed, target_latency))
    prep.notes[:] = list(dict.fromkeys([*prep.notes, *net.notes]))
    report = timer.run("report", _report, analysis, removed, n_params_before, pruned,
                       timer.seconds, tracer, prep.repairs)
    report = dataclasses.replace(report, seconds=dict(timer.seconds), exact=ok,
                                 max_abs_diff=diff, notes=tuple(prep.notes))
    conclude(report, verify, ok, diff, log, "prune")
    log.info("pruned: MACs kept %.1f%%, params kept %.1f%%", 100 * report.macs_kept,
             100 * report.params_kept)
    if isinstance(pruned, torch.fx.GraphModule):
        picklable(pruned, prep.example_inputs)
    return PruneResult(pruned, plan, report, analysis)


_DROPOUTS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
             "dropout1d", "dropout2d", "dropout3d"}


def random_nodes_fx(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes that make the traced forward's outputs random: sampling calls (ViTMAE's
    ``random_masking`` draws ``torch.rand`` noise in eval mode too) and dropout run with
    ``training=True``."""
    found = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        key = call_key(n)
        if key in RANDOM_CALLS:
            found.append(f"{key} '{n.name}'")
        elif key in _DROPOUTS:
            train = n.kwargs.get("training", n.kwargs.get("train",
                                 n.args[2] if len(n.args) > 2 else False))
            if train is True:
                found.append(f"{key} '{n.name}' (training=True)")
    return found


def _check_deterministic_fx(gm: torch.fx.GraphModule) -> None:
    found = random_nodes_fx(gm)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise InputError(
            f"verify=True needs a deterministic forward, and this one draws random numbers: "
            f"{', '.join(found[:3])}{more}. A pruned model cannot be checked against a random "
            "one: pass the randomness as an input (ViTMAE: noise=...), call model.eval(), or "
            "prune without verify")


def _verify_batches(model: nn.Module, pruned: nn.Module, plan: Plan,
                    prep: Prepared) -> tuple[bool, float, tuple[Any, ...]]:
    """The contract at the example inputs and, where the traced batch is symbolic, at one
    more sample (the example's first row appended): a size the rewrite fixed to the traced
    batch can make a view with the right element count and the wrong layout, which runs and
    is mask-equivalent at the example only (BART-era ``reshape(b * heads, -1, d)``). Returns
    whether both hold, the largest difference and the inputs that failed."""
    args = from_fx._as_tuple(prep.example_inputs)
    ref, run = _eval(zero_plan_slices(model, plan)), _eval(pruned)  # one zeroed copy for both
    with torch.no_grad():
        want = flat_outputs(ref(*args))
        try:
            got = flat_outputs(run(*args))
        except Exception:  # noqa: BLE001 - a pruned model that fails to run is a failed check
            return False, float("inf"), args
        ok, diff = compare_outputs(want, got, 1e-4, 1e-5)
        more = None if prep.tracer == "export (static shapes)" else _one_more_sample(args)
        if not ok or more is None:
            return ok, diff, args
        try:
            expected = flat_outputs(ref(*more))
        except Exception:  # noqa: BLE001 - the original itself runs at the example batch only
            return ok, diff, args
        try:
            got = flat_outputs(run(*more))
        except Exception:  # noqa: BLE001 - the pruned one fails where the original runs
            return False, float("inf"), more
    ok2, diff2 = compare_outputs(expected, got, 1e-4, 1e-5)
    return ok2, max(diff, diff2), (args if ok2 else more)


def _one_more_sample(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``args`` with dim 0 of every tensor one longer (its first row repeated); None unless
    every tensor input has the same dim 0 (a DLRM's offsets and index rows are no batch)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    b = batch_of(args)
    if b is None or any(t.dim() == 0 or t.shape[0] != b for t in tensors):
        return None
    return tuple(torch.cat([a, a[:1]], 0) if isinstance(a, torch.Tensor) else a for a in args)


def _describe(analysis: Analysis) -> Callable[[int], str]:
    def describe(gid: int) -> str:
        g = analysis.groups[gid]
        mem = ", ".join(f"{m.param}[{m.dim}]" for m in g.members[:2])
        more = f" +{len(g.members) - 2}" if len(g.members) > 2 else ""
        return f"group {gid} ({mem}{more})"
    return describe


def _retrace(prep: Prepared) -> torch.fx.GraphModule:
    """A fresh traced copy of the caller's (unmodified) model for the net's trials, with
    the node names the analysis was made on."""
    gm, _ = from_fx.trace_folded(copy_sharing_tensors(prep.model), prep.example_inputs)
    from_fx.propagate_shapes(gm, prep.example_inputs)
    if [n.name for n in gm.graph.nodes] != [n.name for n in prep.gm.graph.nodes]:
        raise SecateursError("re-tracing the model for the safety net gave different node "
                             "names; please report this model")
    return gm


def _group_ratios(analysis: Analysis, ratios: Mapping[str, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    if not ratios:
        return out
    known = set(analysis.param_values)
    for name in ratios:
        if not any(p == name or p.startswith(name + ".") for p in known):
            raise InputError(f"ratios: '{name}' matches no parameter of the model")
    for g in analysis.groups:
        for name, r in ratios.items():
            if any(p == name or p.startswith(name + ".") for p in g.params()):
                out[g.id] = max(out.get(g.id, 0.0), r)
    return out


def apply_plan(model: nn.Module, example_inputs: Any, plan: Plan,
               inplace: bool = False) -> nn.Module:
    """Re-apply a saved plan to (a copy of) the model it was made for."""
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a secateurs.Plan, got {type(plan).__name__}")
    work = model if inplace else copy_sharing_tensors(model)
    gm, _ = from_fx.trace_folded(work, example_inputs)
    from_fx.propagate_shapes(gm, example_inputs)
    failure = FxNet(gm, None, from_fx._as_tuple(example_inputs)).plan_runs(plan)
    if failure is not None:  # checked before anything is sliced (inplace stays intact)
        raise PlanError(f"the plan does not run on this model: {failure.text()}. Was it made "
                        "for another model or input shape? Make a new one with "
                        "secateurs.prune.")
    pruned = apply_plan_fx(gm, plan)
    return picklable(pruned if inplace else unshare_tensors(pruned, model), example_inputs)
