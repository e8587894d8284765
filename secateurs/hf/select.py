"""Selection of HF units per kind: uniform across layers (one config describes the result),
ranked across layers (``uniform=False``), head dims removed alike from q/k and v, and the
bisection of one shared ratio for a MACs target."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from secateurs.errors import InputError
from secateurs.hf.classify import HFAnalysis, UnitGroup
from secateurs.passes.cost import count_macs, node_macs
from secateurs.passes.group_channels import Analysis
from secateurs.passes.prune import select_units

__all__ = ["select_hf", "fit_ratio", "macs"]


def select_hf(hfa: HFAnalysis, scores: dict[int, np.ndarray], ratios: dict[str, float],
            allow_lossy: bool, head_dim_per_head: int, round_to: int | None,
            uniform: bool = True, skip: set[int] | frozenset[int] = frozenset()):
    """Per-kind ratios. ``uniform``: every group of a kind loses the same number of units so
    the config (one num_heads, one intermediate_size, one head_dim per model) describes the
    result; otherwise heads and MLP neurons are ranked across layers (per-layer widths).
    ``skip``: groups kept whole (pinned by the safety net); a skipped head-dim group keeps
    every head dim (HF attention reads one head_dim for q, k and v)."""
    by_group: dict[int, float] = {}
    global_kinds = () if uniform else ("heads", "mlp")
    for u in hfa.units.values():
        if u.kind in global_kinds or u.gid in skip:
            continue
        if u.kind in ("heads", "mlp") or (u.kind == "hidden" and allow_lossy):
            r = ratios.get(u.kind, 0.0)
            if r > 0:
                by_group[u.gid] = r
    removed = select_units(hfa.analysis, scores, 0.0, round_to=round_to,
                           allow_lossy=allow_lossy, ratios=by_group,
                           skip={g for g in hfa.units if g not in by_group})
    for kind in global_kinds:
        removed.update(_select_across_layers(hfa, scores,
                                             [u for u in hfa.of_kind(kind) if u.gid not in skip],
                                             ratios.get(kind, 0.0),
                                             round_to if kind == "mlp" else None))
    dims_removed = 0
    r = ratios.get("head_dim", 0.0)
    if r > 0 and not any(u.gid in skip for u in hfa.of_kind("head_dim")):
        qk = [u for u in hfa.of_kind("head_dim") if u.sub == "qk"]
        v = [u for u in hfa.of_kind("head_dim") if u.sub == "v"]
        pair = max([u.dims_per_unit for u in qk] + [1])
        dims_removed = int(math.floor(r * head_dim_per_head / pair)) * pair
        dims_removed = min(dims_removed, head_dim_per_head - pair)
        if not qk or not v:  # HF attention reads one head_dim for q, k and v
            raise InputError(
                f"head-dim pruning: the {'q/k' if not qk else 'v'} head dims of this model are "
                "not prunable (pinned by the analysis, e.g. rotary frequencies computed at run "
                "time), and HF attention reads one head_dim for q, k and v; prune heads and "
                "MLP neurons instead (head_dim=None)")
        picks = {}
        for u in qk + v:
            n = dims_removed // u.dims_per_unit
            g = hfa.analysis.groups[u.gid]
            ok = np.nonzero(~g.pinned)[0]
            if len(ok) < n:
                raise InputError(f"head-dim pruning: group {u.gid} ({u.sub}) has {len(ok)} "
                                 f"unpinned units, {n} must go (every head loses the same dims)")
            order = np.argsort(scores[u.gid][ok], kind="stable")
            picks[u.gid] = np.sort(ok[order[:n]])
        removed.update({gid: idx for gid, idx in picks.items() if len(idx)})
    return removed, dims_removed


def _select_across_layers(hfa: HFAnalysis, scores: dict[int, np.ndarray],
                          units: list[UnitGroup], ratio: float,
                          round_to: int | None) -> dict[int, np.ndarray]:
    """Remove ``floor(ratio * all units)`` of the lowest (per-group normalised) scores of one
    kind wherever they are; every group keeps at least one unit (``round_to`` of them)."""
    if ratio <= 0 or not units:
        return {}
    pool = []
    for u in units:
        ok = np.nonzero(~hfa.analysis.groups[u.gid].pinned)[0]
        pool += [(float(scores[u.gid][i]), u.gid, int(i)) for i in ok]
    pool.sort()
    budget = int(math.floor(ratio * sum(u.size for u in units)))
    chosen: dict[int, list[int]] = {}
    for _score, gid, i in pool[:budget]:
        chosen.setdefault(gid, []).append(i)
    out = {}
    for gid, idx in chosen.items():
        size = hfa.analysis.groups[gid].size
        keep = max(1, size - len(idx))
        if round_to and round_to > 1 and size > round_to:
            keep = min(size, int(math.ceil(keep / round_to)) * round_to)
        order = np.argsort(scores[gid][idx], kind="stable")
        n = size - keep
        if n > 0:
            out[gid] = np.sort(np.asarray(idx)[order[:n]])
    return out


def fit_ratio(hfa: HFAnalysis, scores: dict[int, np.ndarray], ratios: dict[str, float],
               free: tuple[str, ...], target: float, select_kw: dict[str, Any]) -> float:
    """Bisect one ratio shared by the ``free`` kinds so the pruned model keeps at most
    ``target`` of the MACs (the closest such ratio; discrete head counts make it a step).
    The routed experts (``grouped_mm``, sliced by the MoE selection after this) are counted
    at the ``mlp`` ratio's width."""
    analysis = hfa.analysis
    graph = analysis.graph
    routed = [n for n in graph.nodes if n.op == "grouped_mm"]
    experts = sum(node_macs(n, lambda v: graph.values[v].shape) for n in routed)

    def kept(r: float) -> float:
        chosen = {**ratios, **{k: r for k in free}}
        removed, _ = select_hf(hfa, scores, chosen, **select_kw)
        before, after = macs(analysis, removed)
        if routed:
            after_shape = pruned_shapes(analysis, removed)
            counted = sum(node_macs(n, after_shape) for n in routed)
            after += round(experts * (1.0 - chosen.get("mlp", 0.0))) - counted
        return after / max(before, 1)

    lo, hi = 0.0, 0.99
    if kept(hi) > target:
        raise InputError(f"target_macs={target} is out of reach by pruning {'/'.join(free)} "
                         f"(at ratio 0.99 the model keeps {kept(hi):.3f} of its MACs)")
    for _ in range(30):
        mid = (lo + hi) / 2
        if kept(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi



def pruned_shapes(analysis: Analysis, removed: dict[int, np.ndarray]):
    """The shape of every value of the analysis' graph once ``removed`` is gone."""
    graph = analysis.graph
    gone = analysis.removed_atoms(removed)

    def after(v: str):
        return analysis.new_shape(v, gone) if v in analysis.labels else graph.values[v].shape

    return after


def macs(analysis: Analysis, removed: dict[int, np.ndarray]) -> tuple[int, int]:
    graph = analysis.graph
    return (count_macs(graph, lambda v: graph.values[v].shape),
            count_macs(graph, pruned_shapes(analysis, removed)))
