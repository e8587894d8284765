"""Structured pruning of Hugging Face transformers, applied to the original module.

    trace (torch.export) -> group_channels -> classify units -> score -> select -> plan
        -> slice tensors by FQN + update module attributes + update config

The generic analysis (``secateurs.passes.group_channels``) finds every unit kind on a traced
HF model by itself; this module only *names* them from the structure of their members:

* ``heads``: a group whose units are contiguous blocks of a projection's output (q/k/v/o
  slices of one head; with GQA one unit is a kv head together with its group of q heads,
  because ``repeat_kv`` composes the q head index as ``kv_head × group``);
* ``head_dim``: units strided across heads (one dim in every head). q/k head dims and v head
  dims are separate groups (``qk`` contract, ``v`` flows to the output projection); rotary
  embeddings make ``d`` and ``d + D/2`` one unit through ``rotate_half`` and share the dims of
  every layer through the rotary frequencies (``inv_freq``), so q/k head dims are one group
  for the whole model. HF attention reads one ``head_dim`` for q, k and v, so the same number
  of dims is removed from both;
* ``mlp``: one position per unit (intermediate neurons: gate/up rows and down columns);
* ``hidden``: the lossy group of the residual stream (embeddings, every norm, lm_head input).

Depth: ``blocks=`` drops whole decoder layers (lowest Block Influence, 1 - cos(h_in, h_out)).

The plan's ``meta["hf"]`` records the constants (new head_dim, dropped layers) so a plan made
on a ``meta``-device model can be applied to real weights later (``secateurs.hf.shards``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.graph import from_fx
from secateurs.graph.fx_apply import slice_tensors
from secateurs.passes.cost import SizeRatios, count_macs
from secateurs.passes.group_channels import Analysis, ChannelGroup, group_channels
from secateurs.passes.importance import CRITERIA, ScoreContext, normalize
from secateurs.passes.plan import Plan, build_plan
from secateurs.passes.prune import select_units

__all__ = ["HFAnalysis", "HFPruneResult", "analyze_hf", "prune_hf", "apply_hf_plan",
           "drop_blocks", "block_influence", "unit_counts", "KINDS"]

log = logging.getLogger(__name__)

KINDS = ("heads", "head_dim", "mlp", "hidden")


# ---------------------------------------------------------------- analysis and classification


@dataclass(frozen=True)
class UnitGroup:
    gid: int
    kind: str  # heads | head_dim | mlp | hidden | other
    sub: str  # head_dim: "qk" or "v"; else ""
    size: int
    dims_per_unit: int  # head_dim: dims of one head removed per unit (2 with rotary pairs)


@dataclass(frozen=True)
class HFAnalysis:
    analysis: Analysis
    units: dict[int, UnitGroup]
    tracer: str
    seconds: float

    def of_kind(self, kind: str) -> list[UnitGroup]:
        return [u for u in self.units.values() if u.kind == kind]


def _linear_dims(model: nn.Module) -> dict[str, tuple[int, int]]:
    """weight FQN -> (out dim, in dim) for nn.Linear and HF Conv1D (weight [in, out])."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Linear):
            out[prefix + "weight"] = (0, 1)
        elif type(mod).__name__ == "Conv1D":
            out[prefix + "weight"] = (1, 0)
    return out


def _classify(group: ChannelGroup, lin: dict[str, tuple[int, int]], hidden: int,
              head_dim: int) -> UnitGroup:
    if group.is_lossy:
        kind = "hidden" if group.size == hidden else "other"
        return UnitGroup(group.id, kind, "", group.size, 1)
    outs = [m for m in group.members if m.param in lin and lin[m.param][0] == m.dim]
    feeds = any(m.param in lin and lin[m.param][1] == m.dim for m in group.members)
    if not outs:
        return UnitGroup(group.id, "other", "", group.size, 1)
    best = max(outs, key=lambda m: len(m.positions))
    per_unit = len(best.positions) // max(group.size, 1)
    if all(len(m.positions) == group.size for m in outs):
        return UnitGroup(group.id, "mlp", "", group.size, 1)
    pos = np.sort(best.positions[best.units == 0])
    runs = np.split(pos, np.nonzero(np.diff(pos) != 1)[0] + 1) if len(pos) else []
    if max((len(r) for r in runs), default=0) > 1:  # blocks of consecutive dims: heads
        return UnitGroup(group.id, "heads", "", group.size, per_unit)
    # strided: one dim (or a rotary pair d, d + D/2) in every head; count the unit's dims
    # inside the head that holds its first position
    start = (int(pos[0]) // head_dim) * head_dim if head_dim else 0
    pair = int(((pos >= start) & (pos < start + max(head_dim, 1))).sum()) or 1
    return UnitGroup(group.id, "head_dim", "v" if feeds else "qk", group.size, pair)


def _hidden_size(config: Any) -> int:
    return int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)


def analyze_hf(model: nn.Module, example_inputs: Any) -> HFAnalysis:
    """Trace ``model`` (through torch.export; weights may live on ``meta``) and name its units."""
    t0 = time.perf_counter()
    args = from_fx._as_tuple(example_inputs)
    gm, how = from_fx.trace(model, args)
    for n in gm.graph.nodes:  # export's guard check has no value; don't re-propagate for it
        if n.op == "call_module" and n.target == "_guards_fn":
            n.meta.setdefault("val", None)
    from_fx.propagate_shapes(gm, args)
    graph = from_fx.lower_graph_module(gm)
    analysis = group_channels(graph)
    lin = _linear_dims(model)
    hidden = _hidden_size(model.config)
    hd = _head_dim(model.config)
    units = {g.id: _classify(g, lin, hidden, hd) for g in analysis.groups
             if g.size > 1 and g.prunable > 0}
    return HFAnalysis(analysis, units, how, time.perf_counter() - t0)


def unit_counts(hfa: HFAnalysis) -> dict[str, int]:
    """Number of groups and prunable units of every kind."""
    out: dict[str, int] = {}
    for u in hfa.units.values():
        key = u.kind if u.kind != "head_dim" else f"head_dim_{u.sub}"
        out[f"{key}_groups"] = out.get(f"{key}_groups", 0) + 1
        out[f"{key}_units"] = out.get(f"{key}_units", 0) + u.size
    return out


# ---------------------------------------------------------------- importance


def _activation_stats(model: nn.Module, batches: list[tuple[Any, ...]]) -> dict[str, torch.Tensor]:
    """Mean squared input of every Linear/Conv1D, keyed by its weight FQN."""
    stats: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            key = f"{name}.weight"

            def hook(m, inp, out, key=key):
                x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
                stats[key] = stats.get(key, 0) + (x * x).sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                model(*b)
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


def _grads(model: nn.Module, batches: list[tuple[Any, ...]]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for b in batches:
            out = model(*b)
            if getattr(out, "logits", None) is not None and b[0].dtype == torch.long:
                logits = out.logits[:, :-1]
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   b[0][:, 1:].reshape(-1))
            else:
                h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
                loss = h.float().pow(2).mean()
            loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


# ---------------------------------------------------------------- selection


def _select(hfa: HFAnalysis, scores: dict[int, np.ndarray], ratios: dict[str, float],
            allow_lossy: bool, head_dim_per_head: int, round_to: int | None):
    """Per-kind ratios; every group of a kind loses the same number of units so the config
    (one num_heads, one intermediate_size, one head_dim per model) describes the result."""
    by_group: dict[int, float] = {}
    for u in hfa.units.values():
        if u.kind in ("heads", "mlp") or (u.kind == "hidden" and allow_lossy):
            r = ratios.get(u.kind, 0.0)
            if r > 0:
                by_group[u.gid] = r
    removed = select_units(hfa.analysis, scores, 0.0, round_to=round_to,
                           allow_lossy=allow_lossy, ratios=by_group,
                           skip={g for g in hfa.units if g not in by_group})
    dims_removed = 0
    r = ratios.get("head_dim", 0.0)
    if r > 0:
        qk = [u for u in hfa.of_kind("head_dim") if u.sub == "qk"]
        v = [u for u in hfa.of_kind("head_dim") if u.sub == "v"]
        pair = max([u.dims_per_unit for u in qk] + [1])
        dims_removed = int(math.floor(r * head_dim_per_head / pair)) * pair
        dims_removed = min(dims_removed, head_dim_per_head - pair)
        for u in qk + v:
            n = dims_removed // u.dims_per_unit
            g = hfa.analysis.groups[u.gid]
            ok = np.nonzero(~g.pinned)[0]
            if n <= 0 or len(ok) < n:
                continue
            order = np.argsort(scores[u.gid][ok], kind="stable")
            removed[u.gid] = np.sort(ok[order[:n]])
    return removed, dims_removed


# ---------------------------------------------------------------- applying to the HF module


def _head_dim(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    if hd:
        return int(hd)
    heads = int(getattr(config, "num_attention_heads", 0) or config.n_head)
    return _hidden_size(config) // heads


def _out_features(mod: nn.Module) -> int:
    w = mod.weight
    return int(w.shape[1] if type(mod).__name__ == "Conv1D" else w.shape[0])


def _update_modules(model: nn.Module, head_dim: int, old_hidden: int, new_hidden: int) -> dict:
    """Refresh every attribute HF modules read at run time from the sliced weights."""
    facts: dict[str, set] = {"heads": set(), "kv": set(), "inter": set()}
    for _name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = int(w.shape[0]), int(w.shape[1])
        elif type(mod).__name__ == "Conv1D":
            mod.nx, mod.nf = int(w.shape[0]), int(w.shape[1])
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = int(w.shape[0]), int(w.shape[1])
        elif isinstance(mod, nn.LayerNorm) and w is not None:
            mod.normalized_shape = tuple(int(s) for s in w.shape)
        elif isinstance(mod, nn.Conv2d):
            mod.out_channels, mod.in_channels = int(w.shape[0]), int(w.shape[1]) * mod.groups
        for attr in ("hidden_size", "embed_dim"):
            if getattr(mod, attr, None) == old_hidden and isinstance(getattr(mod, attr), int):
                setattr(mod, attr, new_hidden)
        if hasattr(mod, "q_proj") and hasattr(mod, "k_proj") and hasattr(mod, "head_dim"):
            nq = _out_features(mod.q_proj) // head_dim
            nkv = _out_features(mod.k_proj) // head_dim
            mod.head_dim = head_dim
            if hasattr(mod, "num_key_value_groups"):
                mod.num_key_value_groups = nq // max(nkv, 1)
            for attr, val in (("num_heads", nq), ("num_attention_heads", nq),
                              ("num_key_value_heads", nkv), ("all_head_size", nq * head_dim)):
                if hasattr(mod, attr):
                    setattr(mod, attr, val)
            facts["heads"].add(nq)
            facts["kv"].add(nkv)
        elif hasattr(mod, "query") and hasattr(mod, "attention_head_size"):  # BERT
            nq = _out_features(mod.query) // head_dim
            mod.attention_head_size, mod.num_attention_heads = head_dim, nq
            mod.all_head_size = nq * head_dim
            facts["heads"].add(nq)
            facts["kv"].add(nq)
        elif hasattr(mod, "c_attn") and hasattr(mod, "split_size"):  # GPT-2
            width = _out_features(mod.c_attn) // 3
            mod.split_size, mod.head_dim, mod.num_heads = width, head_dim, width // head_dim
            facts["heads"].add(width // head_dim)
            facts["kv"].add(width // head_dim)
        for up in ("up_proj", "fc1", "c_fc"):
            if hasattr(mod, up) and isinstance(getattr(mod, up), nn.Module) and \
                    hasattr(getattr(mod, up), "weight"):
                n = _out_features(getattr(mod, up))
                facts["inter"].add(n)
                if hasattr(mod, "intermediate_size"):
                    mod.intermediate_size = n
        if type(mod).__name__.endswith("Intermediate") and hasattr(mod, "dense"):
            facts["inter"].add(_out_features(mod.dense))
    return facts


def _update_config(config: Any, facts: dict, head_dim: int, hidden: int,
                   head_dim_changed: bool) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    notes = []

    def put(attr: str, val: Any) -> None:
        if getattr(config, attr, None) != val:
            changes[attr] = val
            setattr(config, attr, val)

    put("hidden_size", hidden)
    for key, attr in (("heads", "num_attention_heads"), ("kv", "num_key_value_heads")):
        vals = facts[key]
        if len(vals) == 1 and (attr != "num_key_value_heads" or hasattr(config, attr)):
            put(attr, vals.pop())
        elif len(vals) > 1:
            notes.append(f"{attr} differs between layers {sorted(vals)}")
    if len(facts["inter"]) == 1:
        n = facts["inter"].pop()
        put("n_inner" if config.model_type == "gpt2" else "intermediate_size", n)
    elif len(facts["inter"]) > 1:
        notes.append(f"intermediate size differs between layers {sorted(facts['inter'])}")
    if head_dim_changed or "num_attention_heads" in changes or \
            getattr(config, "head_dim", None) is not None:  # ViT/Llama read config.head_dim
        put("head_dim", head_dim)
    if notes:
        log.warning("config cannot describe the pruned model exactly: %s", "; ".join(notes))
    return changes


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0))
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            if best is None or len(name) < len(best[0]):
                best = (name, mod)
    if best is None:
        raise InputError(f"cannot find the list of {n} layers in {type(model).__name__}")
    return best


def drop_blocks(model: nn.Module, indices: list[int]) -> list[int]:
    """Remove decoder/encoder layers ``indices`` in place; update config and layer indices."""
    name, layers = _block_list(model)
    drop = sorted(set(int(i) for i in indices))
    kept = [layers[i] for i in range(len(layers)) if i not in drop]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.ModuleList(kept))
    for new_idx, layer in enumerate(kept):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]
    return drop


def block_influence(model: nn.Module, batches: list[tuple[Any, ...]]) -> np.ndarray:
    """ShortGPT's Block Influence: 1 - mean cos(h_in, h_out) per layer (low = redundant)."""
    sims = None
    with torch.no_grad():
        for b in batches:
            hs = model(*b, output_hidden_states=True).hidden_states
            cur = np.array([torch.nn.functional.cosine_similarity(
                hs[i].float(), hs[i + 1].float(), dim=-1).mean().item()
                for i in range(len(hs) - 1)])
            sims = cur if sims is None else sims + cur
    assert sims is not None
    return 1.0 - sims / len(batches)


def apply_hf_plan(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Apply a plan made by ``prune_hf`` to ``model`` in place (real or meta weights):
    slice tensors by FQN, refresh module attributes, update ``model.config``, drop layers."""
    hf = plan.meta.get("hf", {})
    cfg = model.config
    old_hidden = _hidden_size(cfg)
    old_hd = int(hf.get("head_dim_before", _head_dim(cfg)))
    head_dim = old_hd - int(hf.get("head_dim_removed", 0))
    slice_tensors(model, plan.removed)
    # keep the rotary frequency copies in step with the sliced inv_freq
    for mod in model.modules():
        inv, orig = getattr(mod, "inv_freq", None), getattr(mod, "original_inv_freq", None)
        if isinstance(inv, torch.Tensor) and isinstance(orig, torch.Tensor) and \
                inv.shape != orig.shape:
            kept = [i for i in range(orig.shape[0]) if i not in set(
                next((d[0] for n, d in plan.removed.items() if n.endswith("inv_freq")), []))]
            mod.original_inv_freq = orig[kept].clone()
    new_hidden = old_hidden - int(hf.get("hidden_removed", 0))
    facts = _update_modules(model, head_dim, old_hidden, new_hidden)
    changes = _update_config(cfg, facts, head_dim, new_hidden, head_dim != old_hd)
    if hf.get("drop_layers"):
        drop_blocks(model, hf["drop_layers"])
        changes["num_hidden_layers"] = cfg.num_hidden_layers
    return changes


# ---------------------------------------------------------------- the entry point


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


    def summary(self) -> dict[str, Any]:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_kept": self.macs_kept, "params_before": self.params_before,
                "params_after": self.params_after, "params_kept": self.params_kept,
                "config_changes": self.config_changes, "seconds": self.seconds,
                "units": unit_counts(self.hf_analysis)}


def _macs(analysis: Analysis, removed: dict[int, np.ndarray]) -> tuple[int, int]:
    graph = analysis.graph
    gone = analysis.removed_atoms(removed)

    def after(v: str):
        return analysis.new_shape(v, gone) if v in analysis.labels else graph.values[v].shape

    return count_macs(graph, lambda v: graph.values[v].shape), count_macs(graph, after)


def prune_hf(model: nn.Module, example_inputs: Any, ratio: float | None = None, *,
             heads: float | None = None, mlp: float | None = None,
             head_dim: float | None = None, hidden: float | None = None,
             blocks: int | float = 0, importance: str | Any = "l2",
             allow_lossy: bool = False, round_to: int | None = None,
             calibration: list[tuple[Any, ...]] | None = None, inplace: bool = False,
             score_context: ScoreContext | None = None) -> HFPruneResult:
    """Prune a Hugging Face model and return it (a real ``PreTrainedModel``, so
    ``save_pretrained`` works) with its plan.

    ``ratio`` is the default fraction of ``heads`` and ``mlp`` units to remove; each kind has
    its own ratio. ``head_dim`` (dims removed from every head, rotary pairs together) is off by
    default; ``hidden`` is lossy and needs ``allow_lossy=True``. ``blocks`` drops that many
    layers (or that fraction when < 1) by Block Influence on ``calibration``/example inputs.
    ``importance``: ``l1``/``l2``/``random`` (or any registered criterion), ``taylor``
    (first-order, gradients of the LM loss or of the output energy), ``activation``
    (E[x²]·‖W[:,c]‖² on calibration batches) or a callable ``(group, ctx) -> scores``.
    """
    ratios: dict[str, float] = {}
    for kind, val in (("heads", heads), ("mlp", mlp), ("head_dim", head_dim),
                      ("hidden", hidden)):
        r = val if val is not None else (ratio if kind in ("heads", "mlp") else None)
        if r is not None:
            if not 0.0 <= float(r) < 1.0:
                raise InputError(f"{kind} ratio must be in [0, 1), got {r!r}")
            ratios[kind] = float(r)
    if ratios.get("hidden") and not allow_lossy:
        raise InputError("hidden-size pruning is lossy (every norm normalises over it); "
                         "pass allow_lossy=True")
    args = from_fx._as_tuple(example_inputs)
    batches = calibration or [args]
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    work = model if inplace else copy.deepcopy(model)
    hfa = analyze_hf(work, args)
    seconds["analyze"] = time.perf_counter() - t
    analysis = hfa.analysis
    lin = _linear_dims(work)
    tensors = dict(work.named_parameters())
    tensors.update(dict(work.named_buffers()))
    ctx = score_context or ScoreContext(tensors)
    t = time.perf_counter()
    if importance == "activation":
        ctx.extra["activations"] = _activation_stats(work, batches)
        criterion = activation_criterion(lin)
    elif importance == "taylor" and "taylor" not in CRITERIA:
        ctx.grads = _grads(work, batches)
        criterion = taylor_criterion
    else:
        if importance == "taylor" and not ctx.grads:
            ctx.grads = _grads(work, batches)
        criterion = importance if callable(importance) else CRITERIA.get(importance)
        if criterion is None:
            raise InputError(f"unknown importance {importance!r}; choose one of "
                             f"{sorted(set(CRITERIA) | {'taylor', 'activation'})}")
    scores = {gid: normalize(np.asarray(criterion(analysis.groups[gid], ctx), dtype=np.float64))
              for gid in hfa.units}
    seconds["importance"] = time.perf_counter() - t
    hd_before = _head_dim(work.config)
    removed, dims_removed = _select(hfa, scores, ratios, allow_lossy, hd_before, round_to)
    hidden_removed = sum(len(removed.get(u.gid, ())) for u in hfa.of_kind("hidden"))
    drop: list[int] = []
    n_blocks = blocks if blocks >= 1 else int(blocks * len(_block_list(work)[1]))
    if n_blocks:
        bi = block_influence(work, batches)
        drop = sorted(int(i) for i in np.argsort(bi, kind="stable")[:int(n_blocks)])
    meta = {"importance": getattr(criterion, "__name__", str(importance)), "ratios": ratios,
            "tracer": hfa.tracer, "torch": torch.__version__,
            "hf": {"head_dim_before": hd_before, "head_dim_removed": dims_removed,
                   "hidden_removed": hidden_removed, "drop_layers": drop,
                   "model_type": getattr(work.config, "model_type", "")}}
    t = time.perf_counter()
    plan = build_plan(analysis, removed, meta)
    seconds["plan"] = time.perf_counter() - t
    macs_before, macs_after = _macs(analysis, removed)
    if drop:  # blocks: scale the per-layer share of MACs (approximate, reported as such)
        n_layers = len(_block_list(work)[1])
        macs_after = int(macs_after * (1 - len(drop) / n_layers))
    params_before = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    changes = apply_hf_plan(work, plan)
    seconds["apply"] = time.perf_counter() - t
    params_after = sum(p.numel() for p in work.parameters())
    return HFPruneResult(work, plan, hfa, removed, changes, macs_before, macs_after,
                         params_before, params_after, seconds)
