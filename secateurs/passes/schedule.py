"""Pruning schedules: a MAC budget, gradual (iterative) pruning, sensitivity and depth.

* :func:`prune_to_macs` finds the ratio that keeps a fraction of the dense MACs. MACs kept are
  monotone (up to rounding) in the ratio, so a bisection over the ratio converges; each probe
  only re-runs selection and the cost model on one analysis (no re-trace, no apply), then one
  real ``prune`` applies the winner and its report is checked against the target.
* :func:`iterative_prune` reaches a target in ``n_steps`` prunes of the already-pruned model,
  optionally fine-tuning after each. The cumulative sparsity after step ``k`` of ``n`` follows
  ``s_k = s · f(k / n)`` with ``f(t) = t`` (linear) or ``f(t) = 1 - (1 - t)³`` (cubic, Zhu &
  Gupta 2017: prune fast while redundancy is high, slowly near the end). The last step reaches
  the target.
* :func:`sensitivity_scan` removes ``ratio`` of one group at a time and measures the metric.
  It uses the correctness contract instead of applying the plan: the pruned model equals the
  original with the plan's slices zeroed, so one analysis serves every probe.
  :func:`ratios_from_sensitivity` turns the drops into per-group ratios for ``prune(ratios=)``.
* :func:`prune_depth` removes whole residual blocks: an ``add(branch(x), x)`` whose branch has
  no other consumer becomes ``x`` and the branch is dead code. Exact when the branch already
  outputs zero (last BN's gamma and beta zero).
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from secateurs.errors import InputError
from secateurs.graph import from_fx
from secateurs.passes.cost import SizeRatios, count_macs
from secateurs.passes.group_channels import Analysis
from secateurs.passes.importance import ScoreContext
from secateurs.passes.plan import build_plan
from secateurs.passes.prune import Prepared, flat_outputs

__all__ = ["prune_to_macs", "macs_kept_at", "iterative_prune", "IterativeResult",
           "schedule_fractions", "sensitivity_scan", "Sensitivity", "ratios_from_sensitivity",
           "prune_depth", "DepthResult", "residual_blocks", "drop_residual_block"]

log = logging.getLogger(__name__)

MAX_RATIO = 0.995


# --------------------------------------------------------------------------------------------
# MAC budget
# --------------------------------------------------------------------------------------------


@dataclass
class _Selector:
    """One analysis with its scores; selection and the MAC count for any ratio."""

    analysis: Analysis
    scores: dict[int, np.ndarray]
    skip: set[int]
    group_ratios: dict[int, float]
    options: dict[str, Any]
    macs_before: int

    def removed(self, ratio: float) -> dict[int, np.ndarray]:
        from secateurs.passes.prune import select_units

        o = self.options
        return select_units(self.analysis, self.scores, ratio, o["round_to"],
                            o["global_pruning"], o["allow_lossy"], self.skip,
                            self.group_ratios, o["min_units"])

    def macs_kept(self, ratio: float) -> float:
        return _macs_after(self.analysis, self.removed(ratio)) / max(self.macs_before, 1)


def _macs_after(analysis: Analysis, removed: Mapping[int, np.ndarray]) -> int:
    graph = analysis.graph
    gone = analysis.removed_atoms(dict(removed))

    def after(v: str):
        return analysis.new_shape(v, gone) if v in analysis.labels else graph.values[v].shape

    return count_macs(graph, after)


def _selector(prep: Prepared, ratios: Mapping[str, float] | None,
              options: dict[str, Any]) -> _Selector:
    from secateurs.passes.prune import _group_ratios

    graph = prep.analysis.graph
    macs_before = count_macs(graph, lambda v: graph.values[v].shape)
    return _Selector(prep.analysis, prep.scores, set(prep.skip) | set(prep.repairs),
                     _group_ratios(prep.analysis, ratios or {}), options, macs_before)


def _prepare(model: nn.Module, example_inputs: Any, importance: Any, inplace: bool,
             kwargs: Mapping[str, Any]) -> Prepared:
    from secateurs.passes.prune import prepare

    return prepare(model, example_inputs, importance, ignore=kwargs.get("ignore", ()),
                   inplace=inplace, reduction=kwargs.get("reduction", "sum"),
                   normalization=kwargs.get("normalization", "mean"),
                   score_context=kwargs.get("score_context"))


def macs_kept_at(model: nn.Module, example_inputs: Any, ratio: float,
                 importance: Any = "l2", **kwargs: Any) -> float:
    """The fraction of MACs ``prune(model, example_inputs, ratio, importance, **kwargs)``
    would keep, computed without applying anything."""
    prep = _prepare(model, example_inputs, importance, True, kwargs)  # nothing is applied
    return _selector(prep, kwargs.get("ratios"), _options(kwargs)).macs_kept(ratio)


def _options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {"round_to": kwargs.get("round_to"),
            "global_pruning": kwargs.get("global_pruning", False),
            "allow_lossy": kwargs.get("allow_lossy", False),
            "min_units": kwargs.get("min_units", 1)}


def prune_to_macs(model: nn.Module, example_inputs: Any, target_macs: float,
                  importance: Any = "l2", tolerance: float = 0.05, iterations: int = 40,
                  **prune_kwargs: Any):
    """``prune`` with the ratio that keeps ``target_macs`` (a fraction of the dense MACs).

    Bisects the (global or per-group) ratio on the cost model, then prunes once. Raises
    ``InputError`` when the nearest reachable budget is more than ``tolerance`` (relative) away
    from the target, naming the reachable range.
    """
    from secateurs.passes.prune import _check_options, prune

    if not isinstance(target_macs, (int, float)) or not 0.0 < float(target_macs) <= 1.0:
        raise InputError(f"target_macs must be in (0, 1], got {target_macs!r}")
    prune_kwargs.pop("ratio", None)
    prune_kwargs.pop("target_macs", None)
    if target_macs >= 1.0:
        return prune(model, example_inputs, 0.0, importance, **prune_kwargs)
    _check_options(prune_kwargs.get("ratios"), prune_kwargs.get("round_to"))
    prep = _prepare(model, example_inputs, importance, prune_kwargs.get("inplace", False),
                    prune_kwargs)
    result, best_r = _search_and_finish(prep, target_macs, tolerance, iterations, prune_kwargs)
    for _ in range(3):  # the safety net pinned groups: search again with them skipped
        if abs(result.report.macs_kept - target_macs) <= tolerance * target_macs \
                or not result.report.repairs or prune_kwargs.get("inplace", False):
            break
        again = _prepare(model, example_inputs, importance, False, prune_kwargs)
        again.repairs.update(prep.repairs)
        prep = again
        result, best_r = _search_and_finish(prep, target_macs, tolerance, iterations,
                                            prune_kwargs)
    kept = result.report.macs_kept
    log.info("prune_to_macs: ratio %.4f keeps %.2f%% of MACs (target %.2f%%)", best_r,
             100 * kept, 100 * target_macs)
    if abs(kept - target_macs) > tolerance * target_macs:  # cost model and report disagree
        raise InputError(f"prune_to_macs: ratio {best_r:.4f} kept {kept:.3f} of the MACs, "
                         f"not {target_macs:.3f}; please report this model")
    result.plan.meta["target_macs"] = float(target_macs)
    return result


def _search_and_finish(prep: Prepared, target_macs: float, tolerance: float, iterations: int,
                       prune_kwargs: Mapping[str, Any]) -> tuple[Any, float]:
    """Bisect the ratio on the cost model (groups the safety net pinned are skipped), then
    finish at the best one."""
    from secateurs.passes.prune import finish

    sel = _selector(prep, prune_kwargs.get("ratios"), _options(prune_kwargs))
    lo, hi = 0.0, MAX_RATIO
    best_r, best_kept = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        kept = sel.macs_kept(mid)
        if abs(kept - target_macs) < abs(best_kept - target_macs):
            best_r, best_kept = mid, kept
        if kept > target_macs:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    extra: dict[str, float] = {}
    if abs(best_kept - target_macs) > tolerance * target_macs and not sel.options[
            "global_pruning"]:
        extra, kept = _refine(sel, target_macs, lo, hi)
        if abs(kept - target_macs) < abs(best_kept - target_macs):
            best_r, best_kept = lo, kept
        else:
            extra = {}
    floor = sel.macs_kept(MAX_RATIO)
    if abs(best_kept - target_macs) > tolerance * target_macs:
        raise InputError(f"target_macs={target_macs:.3f} is out of reach: the nearest budget "
                         f"is {best_kept:.3f} (too few channels for a finer step: try "
                         f"global_pruning=True or a larger tolerance; or pruning can keep between "
                         f"{floor:.3f} and 1.0 of the MACs with these settings: pinned, "
                         f"ignored and lossy groups are not pruned)")
    ratios = {**(prune_kwargs.get("ratios") or {}), **extra}
    result = finish(prep, best_r, ratios=ratios, verify=prune_kwargs.get("verify", False),
                    **sel.options)
    return result, best_r


def _refine(sel: _Selector, target: float, r_lo: float,
            r_hi: float) -> tuple[dict[str, float], float]:
    """Between two uniform ratios the MAC count can jump past the target (few, coupled
    channels). Move groups one at a time, largest first, from ``r_lo`` to ``r_hi`` and keep the
    mix closest to the target. Only groups with a parameter of their own take part, so that
    ``prune(ratios={that parameter: r_hi})`` selects exactly this mix."""
    base = dict(sel.group_ratios)
    movable = []
    for g in sorted(sel.analysis.groups, key=lambda g: (-g.size, g.id)):
        if g.id not in sel.scores or g.id in sel.skip or g.id in base:
            continue
        key = _group_key(sel.analysis, g.id, unique_only=True)
        if key:
            movable.append((g.id, key))
    best: tuple[dict[str, float], float] = ({}, sel.macs_kept(r_lo))
    chosen: dict[str, float] = {}
    try:
        for gid, key in movable:
            sel.group_ratios[gid] = r_hi
            chosen[key] = r_hi
            kept = sel.macs_kept(r_lo)
            if abs(kept - target) < abs(best[1] - target):
                best = (dict(chosen), kept)
    finally:
        sel.group_ratios = base
    return best


# --------------------------------------------------------------------------------------------
# Gradual pruning
# --------------------------------------------------------------------------------------------


def schedule_fractions(n_steps: int, schedule: str = "linear") -> list[float]:
    """Cumulative fraction of the final sparsity reached after each of ``n_steps`` steps."""
    if n_steps < 1:
        raise InputError(f"n_steps must be at least 1, got {n_steps}")
    ts = [(k + 1) / n_steps for k in range(n_steps)]
    if schedule == "linear":
        return ts
    if schedule == "cubic":
        return [1.0 - (1.0 - t) ** 3 for t in ts]
    raise InputError(f"unknown schedule '{schedule}'; choose linear or cubic")


@dataclass
class IterativeResult(SizeRatios):
    model: nn.Module
    steps: list[Any]  # PruneResult per step
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    targets: list[float] = field(default_factory=list)



def _prunable_units(model: nn.Module, example_inputs: Any, allow_lossy: bool = False) -> int:
    """Units ``prune`` may remove (as ``select_units`` counts them): unpinned units of groups
    wider than one whose removal is exact, or of any group under ``allow_lossy``."""
    from secateurs.passes.prune import analyze

    return sum(g.prunable for g in analyze(model, example_inputs).groups
               if g.size > 1 and (allow_lossy or not g.removal_is_lossy))


def iterative_prune(model: nn.Module, example_inputs: Any, target_ratio: float | None = None,
                    target_macs: float | None = None, n_steps: int = 3,
                    schedule: str = "linear",
                    fine_tune: Callable[[nn.Module, int], nn.Module] | None = None,
                    context_fn: Callable[[nn.Module], ScoreContext] | None = None,
                    importance: Any = "l2", **prune_kwargs: Any) -> IterativeResult:
    """Prune to ``target_ratio`` (fraction of prunable units) or ``target_macs`` (fraction of
    dense MACs kept) in ``n_steps`` steps, each pruning the previous step's GraphModule.

    ``fine_tune(model, step)`` runs after every step and returns the model to continue from;
    ``context_fn(model)`` rebuilds the ``ScoreContext`` of data-driven criteria for each step.
    """
    from secateurs.passes.prune import prune

    if (target_ratio is None) == (target_macs is None):
        raise InputError("iterative_prune needs exactly one of target_ratio or target_macs")
    fractions = schedule_fractions(n_steps, schedule)
    prune_kwargs.pop("inplace", None)
    current = model
    steps = []
    targets = []
    macs0 = params0 = 0
    lossy = bool(prune_kwargs.get("allow_lossy", False))
    units0 = _prunable_units(model, example_inputs, lossy) if target_ratio is not None else 0
    for k, f in enumerate(fractions):
        if context_fn is not None:
            prune_kwargs["score_context"] = context_fn(current)
        if target_macs is not None:
            goal = 1.0 - (1.0 - target_macs) * f  # of the dense MACs
            now = steps[-1].report.macs_after / macs0 if steps else 1.0
            targets.append(goal)
            res = prune_to_macs(current, example_inputs, min(goal / now, 1.0), importance,
                                **prune_kwargs)
        else:
            assert target_ratio is not None
            goal = target_ratio * f
            targets.append(goal)
            units = _prunable_units(current, example_inputs, lossy)
            step_ratio = 1.0 - (1.0 - goal) * units0 / units if units else 0.0
            res = prune(current, example_inputs, min(max(step_ratio, 0.0), MAX_RATIO),
                        importance, **prune_kwargs)
        if not steps:
            macs0, params0 = res.report.macs_before, res.report.params_before
        steps.append(res)
        current = res.model
        log.info("iterative_prune step %d/%d: MACs kept %.1f%%", k + 1, n_steps,
                 100 * res.report.macs_after / max(macs0, 1))
        if fine_tune is not None:
            current = fine_tune(current, k)
    last = steps[-1].report
    return IterativeResult(current, steps, macs0, last.macs_after, params0,
                           sum(p.numel() for p in current.parameters()), targets)


# --------------------------------------------------------------------------------------------
# Sensitivity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sensitivity:
    group: int
    members: str
    key: str  # a parameter name selecting this group in prune(ratios=...)
    size: int
    metric: float
    drop: float


def _group_key(analysis: Analysis, gid: int, unique_only: bool = False) -> str:
    """A parameter name that belongs to this group only (a BN scale, a bias), else its first
    member's parameter (or "" with ``unique_only``)."""
    owners: dict[str, set[int]] = {}
    for g in analysis.groups:
        if g.size > 1 and g.prunable:
            for p in g.params():
                owners.setdefault(p, set()).add(g.id)
    params = analysis.groups[gid].params()
    unique = sorted((p for p in params if owners.get(p) == {gid}),
                    key=lambda p: (not p.endswith(".weight"), p))
    if unique_only:
        return unique[0] if unique else ""
    return (unique or params)[0]


def sensitivity_scan(model: nn.Module, example_inputs: Any,
                     metric: Callable[[nn.Module], float], ratio: float = 0.5,
                     importance: Any = "l2", score_context: ScoreContext | None = None,
                     allow_lossy: bool = False, round_to: int | None = None,
                     ignore: Iterable[Any] = (), reduction: str = "sum",
                     normalization: str = "mean") -> list[Sensitivity]:
    """Remove ``ratio`` of one group at a time; ``metric(model)`` (higher is better) drop each.

    Probes evaluate the original model with the plan's slices zeroed, which the correctness
    contract makes equal to the pruned model for every lossless group.
    """
    from secateurs.passes.prune import zero_plan_slices

    prep = _prepare(model, example_inputs, importance, True,
                    {"ignore": ignore, "reduction": reduction, "normalization": normalization,
                     "score_context": score_context})
    sel = _selector(prep, None, {"round_to": round_to, "global_pruning": False,
                                 "allow_lossy": allow_lossy, "min_units": 1})
    base = float(metric(model))
    out = []
    ignored = set(sel.skip)
    everything = {h.id for h in sel.analysis.groups}
    for g in sel.analysis.groups:
        if g.id not in sel.scores or g.id in ignored:
            continue
        sel.skip = everything - {g.id}
        removed = sel.removed(ratio)
        if g.id not in removed:
            continue
        plan = build_plan(sel.analysis, removed, {"ratio": ratio, "probe": g.id})
        value = float(metric(zero_plan_slices(model, plan)))
        out.append(Sensitivity(g.id, g.describe(), _group_key(sel.analysis, g.id), g.size,
                               value, base - value))
    return out


def ratios_from_sensitivity(scan: Sequence[Sensitivity], target_ratio: float,
                            min_ratio: float = 0.0, max_ratio: float = 0.9,
                            power: float = 1.0, eps: float = 1e-3) -> dict[str, float]:
    """Per-group ratios for ``prune(ratios=...)``: inversely proportional to the metric drop
    (``(drop + eps) ** -power``), clipped to ``[min_ratio, max_ratio]`` and scaled so that the
    unit-weighted mean ratio is ``target_ratio``. Keys are each group's ``key``."""
    if not scan:
        return {}
    if not min_ratio <= target_ratio <= max_ratio:
        raise InputError(f"target_ratio {target_ratio} must lie in [{min_ratio}, {max_ratio}]")
    raw = np.array([(max(s.drop, 0.0) + eps) ** -power for s in scan])
    sizes = np.array([s.size for s in scan], dtype=np.float64)

    def mean_at(c: float) -> float:
        return float((np.clip(c * raw, min_ratio, max_ratio) * sizes).sum() / sizes.sum())

    lo, hi = 0.0, 1.0
    while mean_at(hi) < target_ratio and hi < 1e12:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_at(mid) < target_ratio else (lo, mid)
    ratios = np.clip(hi * raw, min_ratio, max_ratio)
    return {s.key: float(r) for s, r in zip(scan, ratios)}


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------

_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass(frozen=True)
class ResidualBlock:
    add: str  # name of the add node
    skip: str  # name of the node the add is replaced with
    branch: tuple[str, ...]  # node names that become dead
    modules: tuple[str, ...]  # call_module targets in the branch


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def residual_blocks(gm: torch.fx.GraphModule) -> list[ResidualBlock]:
    """Every ``add(branch, skip)`` whose branch consumes ``skip`` (directly or not), has no
    consumer outside itself but the add, and keeps the shape of ``skip``."""
    blocks = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS or node.kwargs:
            continue
        if len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
            continue
        for branch_out, skip in (node.args, node.args[::-1]):
            anc = _ancestors(branch_out)
            if skip not in anc:
                continue
            branch = ({branch_out} | anc) - (_ancestors(skip) | {skip})
            if not branch or any(n.op in ("placeholder", "output") for n in branch):
                continue
            if any(u not in branch and u is not node for n in branch for u in n.users):
                continue
            if not _same_shape(skip, node):
                continue
            order = [n for n in gm.graph.nodes if n in branch]
            blocks.append(ResidualBlock(node.name, skip.name, tuple(n.name for n in order),
                                        tuple(str(n.target) for n in order
                                              if n.op == "call_module")))
            break
    return blocks


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if va is None or vb is None:
        return True  # checked by running the model after the rewrite
    return getattr(va, "shape", None) == getattr(vb, "shape", None)


def drop_residual_block(gm: torch.fx.GraphModule, block: ResidualBlock) -> torch.fx.GraphModule:
    """A copy of ``gm`` with ``block``'s add replaced by its skip input and the branch gone."""
    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    add, skip = nodes[block.add], nodes[block.skip]
    add.replace_all_uses_with(skip)
    out.graph.erase_node(add)
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    out.delete_all_unused_submodules()
    return out


@dataclass
class DepthResult:
    model: torch.fx.GraphModule
    removed: list[ResidualBlock]
    metric_before: float
    metrics: list[float]  # metric after each removal
    params_before: int
    params_after: int


def prune_depth(model: nn.Module, example_inputs: Any, n_blocks: int,
                metric: Callable[[nn.Module], float]) -> DepthResult:
    """Greedily remove the ``n_blocks`` residual blocks whose removal costs the least
    ``metric`` (higher is better), one at a time, re-measuring after each removal."""
    if n_blocks < 0:
        raise InputError(f"n_blocks must be non-negative, got {n_blocks}")
    gm, tracer = from_fx.trace(copy.deepcopy(model), example_inputs)
    if tracer != "fx":
        raise InputError("prune_depth needs a model torch.fx.symbolic_trace can trace")
    from_fx.propagate_shapes(gm, example_inputs)
    base = float(metric(gm))
    removed: list[ResidualBlock] = []
    metrics: list[float] = []
    args = from_fx._as_tuple(example_inputs)
    with torch.no_grad():
        ref_shapes = [tuple(t.shape) for t in flat_outputs(gm.eval()(*args))]
    for _ in range(n_blocks):
        best: tuple[float, torch.fx.GraphModule, ResidualBlock] | None = None
        for block in residual_blocks(gm):
            trial = drop_residual_block(gm, block)
            with torch.no_grad():
                shapes = [tuple(t.shape) for t in flat_outputs(trial.eval()(*args))]
            if shapes != ref_shapes:
                continue
            value = float(metric(trial))
            if best is None or value > best[0]:
                best = (value, trial, block)
        if best is None:
            raise InputError(f"prune_depth: only {len(removed)} removable residual blocks "
                             f"(add(branch(x), x) with a private branch); asked for {n_blocks}")
        metrics.append(best[0])
        gm = best[1]
        removed.append(best[2])
        log.info("prune_depth: removed %s (metric %.4f)", best[2].modules, best[0])
    n_before = sum(p.numel() for p in model.parameters())
    return DepthResult(gm, removed, base, metrics, n_before,
                       sum(p.numel() for p in gm.parameters()))


