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

Save and load: the config is updated so ``save_pretrained`` + ``from_pretrained`` rebuild the
pruned model where the config can say it: counts and widths, and after head-dim pruning the
original ``1/sqrt(D)`` scale and the kept rotary frequencies (``rope_type: "longrope"`` with
per-frequency factors; see "attention scale and rotary" below). Where it cannot (BERT/GPT-2
derive the head size from ``hidden_size / num_heads``; per-layer widths from
``uniform=False``), ``config.secateurs`` records the shapes and ``from_pretrained_pruned``
loads the checkpoint. Every apply checks this by building the architecture from the new config
on ``meta`` and comparing shapes and attention scales.
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
from secateurs.graph.fx_apply import slice_tensors, tensor_slots
from secateurs.passes.calibration import call_batch
from secateurs.passes.cost import SizeRatios, count_macs
from secateurs.passes.group_channels import Analysis, ChannelGroup
from secateurs.passes.importance import CRITERIA, ScoreContext, normalize
from secateurs.passes.plan import Plan, build_plan
from secateurs.passes.prune import select_units

__all__ = ["HFAnalysis", "HFPruneResult", "analyze_hf", "prune_hf", "apply_hf_plan",
           "drop_blocks", "block_influence", "unit_counts", "KINDS", "from_pretrained_pruned",
           "check_head_dim_pruning", "call_batch", "token_mask"]

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


def analyze_hf(model: nn.Module, example_inputs: Any, *,
               replicate: bool | None = None) -> HFAnalysis:
    """Trace ``model`` (through torch.export; weights may live on ``meta``) and name its units.

    ``replicate``: trace 3 layers and replicate their analysis to all layers
    (``secateurs.hf.scale``); default on for ``meta`` models with more than 3 layers. Models
    whose layers are not uniform are traced whole (the reason is logged)."""
    from secateurs.hf.scale import channel_analysis  # scale builds on this module

    t0 = time.perf_counter()
    analysis, how = channel_analysis(model, from_fx._as_tuple(example_inputs), replicate)
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


def token_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as bool [batch, seq] (None: every position counts)."""
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if m is None else m.bool()


def _activation_stats(model: nn.Module, batches: list[Any]) -> dict[str, torch.Tensor]:
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


def _grads(model: nn.Module, batches: list[Any]) -> dict[str, torch.Tensor]:
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


# ---------------------------------------------------------------- selection


def _select(hfa: HFAnalysis, scores: dict[int, np.ndarray], ratios: dict[str, float],
            allow_lossy: bool, head_dim_per_head: int, round_to: int | None,
            uniform: bool = True):
    """Per-kind ratios. ``uniform``: every group of a kind loses the same number of units so
    the config (one num_heads, one intermediate_size, one head_dim per model) describes the
    result; otherwise heads and MLP neurons are ranked across layers (per-layer widths)."""
    by_group: dict[int, float] = {}
    global_kinds = () if uniform else ("heads", "mlp")
    for u in hfa.units.values():
        if u.kind in global_kinds:
            continue
        if u.kind in ("heads", "mlp") or (u.kind == "hidden" and allow_lossy):
            r = ratios.get(u.kind, 0.0)
            if r > 0:
                by_group[u.gid] = r
    removed = select_units(hfa.analysis, scores, 0.0, round_to=round_to,
                           allow_lossy=allow_lossy, ratios=by_group,
                           skip={g for g in hfa.units if g not in by_group})
    for kind in global_kinds:
        removed.update(_select_across_layers(hfa, scores, hfa.of_kind(kind),
                                             ratios.get(kind, 0.0),
                                             round_to if kind == "mlp" else None))
    dims_removed = 0
    r = ratios.get("head_dim", 0.0)
    if r > 0:
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


def _fit_ratio(hfa: HFAnalysis, scores: dict[int, np.ndarray], ratios: dict[str, float],
               free: tuple[str, ...], target: float, select_kw: dict[str, Any]) -> float:
    """Bisect one ratio shared by the ``free`` kinds so the pruned model keeps at most
    ``target`` of the MACs (the closest such ratio; discrete head counts make it a step)."""
    def kept(r: float) -> float:
        removed, _ = _select(hfa, scores, {**ratios, **{k: r for k in free}}, **select_kw)
        before, after = _macs(hfa.analysis, removed)
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


def block_influence(model: nn.Module, batches: list[Any]) -> np.ndarray:
    """ShortGPT's Block Influence: 1 - mean cos(h_in, h_out) per layer (low = redundant)."""
    sims = None
    with torch.no_grad():
        for b in batches:
            hs = call_batch(model, b, output_hidden_states=True).hidden_states
            cur = np.array([torch.nn.functional.cosine_similarity(
                hs[i].float(), hs[i + 1].float(), dim=-1).mean().item()
                for i in range(len(hs) - 1)])
            sims = cur if sims is None else sims + cur
    assert sims is not None
    return 1.0 - sims / len(batches)


def _update_config(config: Any, facts: dict, head_dim: int, hidden: int,
                   head_dim_changed: bool) -> dict[str, Any]:
    """Write the new widths to ``config``. Where layers differ, the config gets the largest
    width (the model then needs ``from_pretrained_pruned``, see ``_loader_record``)."""
    changes: dict[str, Any] = {}

    def put(attr: str, val: Any) -> None:
        if getattr(config, attr, None) != val:
            changes[attr] = val
            setattr(config, attr, val)

    put("hidden_size", hidden)
    for key, attr in (("heads", "num_attention_heads"), ("kv", "num_key_value_heads")):
        if facts[key] and (attr != "num_key_value_heads" or hasattr(config, attr)):
            put(attr, max(facts[key]))
    if facts["inter"]:
        put("n_inner" if config.model_type == "gpt2" else "intermediate_size",
            max(facts["inter"]))
    if head_dim_changed or "num_attention_heads" in changes or \
            getattr(config, "head_dim", None) is not None:  # ViT/Llama read config.head_dim
        put("head_dim", head_dim)
    return changes


# ---------------------------------------------------------------- attention scale and rotary
#
# Removing head dims changes what a rebuilt attention module computes from the config:
# ``scaling = head_dim ** -0.5`` and the rotary frequencies ``inv_freq`` (recomputed from
# ``head_dim`` and ``rope_theta`` on load; the buffer is not saved). The pruned model keeps
# the original ``1/sqrt(D)`` and the kept frequencies, expressed so that a rebuild reproduces
# them:
#
# * rotary models: ``rope_type: "longrope"`` with ``short_factor = long_factor = f`` where
#   ``1 / (f_j * theta ** (2j / D')) == inv_freq[kept_j]`` (f is nudged in float32 until
#   HF's own float32 formula returns the kept frequency bit for bit), and
#   ``attention_factor = a0 * (D'/D) ** 0.25``: cos and sin are scaled by it, so q·k gains
#   ``sqrt(D'/D)``, which turns the rebuilt ``D' ** -0.5`` back into ``D ** -0.5``;
# * models without rotary: q (rows and bias) is multiplied by ``sqrt(D'/D)`` and the module's
#   ``scaling`` set to the architecture's value for ``D'``.
#
# The in-memory model is then rebuilt the same way (a new rotary module from the new config),
# so the saved and reloaded models compute bit-identical frequencies. RoPE types whose
# frequencies depend on the sequence length through ``head_dim`` at run time ("dynamic"),
# partial rotary and per-layer-type rope parameters cannot be expressed: head-dim pruning
# refuses them (``InputError``) before touching the model.


def _rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "rope_type")]


def check_head_dim_pruning(model: nn.Module) -> None:
    """Raise ``InputError`` when head dims of ``model`` cannot be removed in a way its config
    can describe (so that ``save_pretrained`` + ``from_pretrained`` reproduce it)."""
    if not _rotary_modules(model):
        return
    rp = getattr(model.config, "rope_parameters", None) or {}
    if not isinstance(rp.get("rope_type"), str):
        raise InputError("head-dim pruning: rope_parameters are set per layer type "
                         f"({sorted(rp)}); one rotary frequency set cannot describe them. "
                         "Prune heads and MLP neurons instead (head_dim=None).")
    if "dynamic" in rp["rope_type"]:
        raise InputError(f"head-dim pruning: rope_type {rp['rope_type']!r} recomputes the "
                         "rotary frequencies from head_dim at run time, so no config can keep "
                         "the pruned set; prune heads and MLP neurons instead (head_dim=None).")
    if float(rp.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise InputError("head-dim pruning: partial rotary embeddings "
                         f"(partial_rotary_factor={rp['partial_rotary_factor']}) are not "
                         "supported; prune heads and MLP neurons instead (head_dim=None).")


def _rope_frequencies(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(short, long, attention factor) the config gives now, on CPU (works for meta models)."""
    rot = _rotary_modules(model)
    if not rot:
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg, mod = model.config, rot[0][1]
    rtype = cfg.rope_parameters["rope_type"]
    if rtype == "default":
        short, attn = type(mod).compute_default_rope_parameters(cfg)
        return short.float(), short.float(), float(attn)
    init = ROPE_INIT_FUNCTIONS[rtype]
    short, attn = init(cfg, torch.device("cpu"))
    long = short
    if rtype == "longrope":
        omax = cfg.rope_parameters["original_max_position_embeddings"]
        long, _ = init(cfg, torch.device("cpu"), seq_len=omax + 1)
    return short.float(), long.float(), float(attn)


def _longrope_factors(target: torch.Tensor, theta: float, dim: int) -> list[float]:
    """Per-frequency factors f such that HF's float32 ``1.0 / (f * theta ** (arange(0, dim, 2)
    / dim))`` is ``target``: the float32 neighbours of the exact quotient are tried and the
    closest kept (bit-exact for most frequencies, else one float32 step away)."""
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    pw = theta ** shape
    f = (1.0 / (target.double() * pw.double())).float()
    cands = [f]
    lo = hi = f
    for _ in range(4):
        lo = torch.nextafter(lo, torch.zeros_like(lo))
        hi = torch.nextafter(hi, torch.full_like(hi, float("inf")))
        cands += [lo, hi]
    stack = torch.stack(cands)
    err = ((1.0 / (stack * pw)).double() - target.double()).abs()
    best = stack.gather(0, err.argmin(0, keepdim=True))[0]
    return [float(v) for v in best]


def _express_rotary(model: nn.Module, before: tuple[torch.Tensor, torch.Tensor, float],
                    kept: list[int], old_hd: int, new_hd: int) -> dict[str, Any]:
    """New rope_parameters for the kept frequencies and the lost ``1/sqrt`` factor; rebuild
    the rotary modules from them."""
    cfg = model.config
    short, long, attn = before
    rp = dict(cfg.rope_parameters)
    theta = float(rp["rope_theta"])
    idx = torch.as_tensor(kept, dtype=torch.long)
    new = {"rope_type": "longrope", "rope_theta": theta,
           "short_factor": _longrope_factors(short[idx], theta, new_hd),
           "long_factor": _longrope_factors(long[idx], theta, new_hd),
           "factor": float(rp.get("factor") or 1.0) if rp["rope_type"] == "longrope" else 1.0,
           "attention_factor": attn * (new_hd / old_hd) ** 0.25,
           "original_max_position_embeddings": int(
               rp.get("original_max_position_embeddings") or cfg.max_position_embeddings)}
    cfg.rope_parameters = new
    for name, mod in _rotary_modules(model):
        device = mod.inv_freq.device
        rebuilt = type(mod)(cfg).to(device)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], rebuilt)
        if device.type != "meta" and not torch.allclose(rebuilt.inv_freq.cpu(), short[idx],
                                                        rtol=1e-6, atol=0):
            raise InputError(f"{name}: rebuilt rotary frequencies differ from the kept ones")
    for mod in model.modules():  # the rebuilt D' ** -0.5; the rotary factor restores D ** -0.5
        if _is_attention(mod):
            mod.scaling = float(mod.scaling) * math.sqrt(old_hd / new_hd)
    return new


def _is_attention(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "scaling", None), float) and \
        any(hasattr(mod, q) for q in ("q_proj", "query", "c_attn"))


@torch.no_grad()
def _fold_qk_scale(model: nn.Module, old_hd: int, new_hd: int) -> dict[str, list[Any]]:
    """Models without rotary: q *= sqrt(D'/D) and ``scaling`` becomes the rebuilt value.

    Returns what was scaled, ``{parameter name: [factor, dim, stop]}`` (positions ``[:stop]``
    of ``dim``, all of them for ``None``), so ``shards.prune_checkpoint`` scales the streamed
    tensors the same way."""
    c = math.sqrt(new_hd / old_hd)
    scaled: dict[str, list[Any]] = {}

    def scale(name: str, t: torch.Tensor, dim: int, stop: int | None) -> None:
        t.narrow(dim, 0, t.shape[dim] if stop is None else stop).mul_(c)
        scaled[name] = [c, dim, stop]

    for name, mod in model.named_modules():
        if not _is_attention(mod):
            continue
        if getattr(mod.config, "model_type", "") == "gpt2" and \
                not getattr(mod.config, "scale_attn_weights", True):
            continue  # GPT-2 without scaling: nothing depends on head_dim
        if hasattr(mod, "c_attn"):  # GPT-2 Conv1D [in, 3 * width]: q is the first third
            scale(f"{name}.c_attn.weight", mod.c_attn.weight, 1, mod.split_size)
            scale(f"{name}.c_attn.bias", mod.c_attn.bias, 0, mod.split_size)
        else:
            q_name = "q_proj" if hasattr(mod, "q_proj") else "query"
            q = getattr(mod, q_name)
            scale(f"{name}.{q_name}.weight", q.weight, 0, None)
            if q.bias is not None:
                scale(f"{name}.{q_name}.bias", q.bias, 0, None)
        mod.scaling = float(mod.scaling) / c
    return scaled


# ---------------------------------------------------------------- configs that need a loader


LOADER = "secateurs.hf.from_pretrained_pruned"
_COUNT_ATTRS = ("num_attention_heads", "num_key_value_heads")


def _config_mismatches(model: nn.Module) -> list[str]:
    """What a model rebuilt from ``model.config`` (on meta) would get wrong: parameter shapes
    and attention ``scaling``; an architecture that refuses the config counts too."""
    cfg = copy.deepcopy(model.config)
    try:
        with torch.device("meta"):
            ref = type(model)(cfg)
    except Exception as e:  # noqa: BLE001 - any constructor failure means "needs the loader"
        return [f"{type(model).__name__}(config) raises {type(e).__name__}: {e}"]
    out = []
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = ref_params.get(name)
        if r is None or tuple(r.shape) != tuple(p.shape):
            out.append(f"{name}: {tuple(p.shape)} but the config builds "
                       f"{None if r is None else tuple(r.shape)}")
    ref_mods = dict(ref.named_modules())
    for name, mod in model.named_modules():
        if _is_attention(mod) and name in ref_mods and \
                not math.isclose(mod.scaling, float(ref_mods[name].scaling), rel_tol=1e-9):
            out.append(f"{name}.scaling: {mod.scaling} but the config builds "
                       f"{ref_mods[name].scaling}")
    return out


def _meta_build(model: nn.Module, overrides: Mapping[str, Any]) -> nn.Module:
    cfg = copy.deepcopy(model.config)
    for attr, val in overrides.items():
        setattr(cfg, attr, val)
    if hasattr(cfg, "secateurs"):
        del cfg.secateurs
    with torch.device("meta"):
        return type(model)(cfg)


def _loader_record(model: nn.Module, reasons: list[str], head_dim: int) -> dict[str, Any]:
    """``config.secateurs``: what ``from_pretrained_pruned`` needs to rebuild the model: a
    config the architecture accepts (one head), the shape of every parameter that config
    builds differently, head_dim and every attention module's ``scaling``."""
    cfg = model.config
    build = {a: 1 for a in _COUNT_ATTRS if getattr(cfg, a, None) is not None}
    ref = dict(_meta_build(model, build).named_parameters())
    shapes = {n: list(p.shape) for n, p in model.named_parameters()
              if n not in ref or tuple(ref[n].shape) != tuple(p.shape)}
    return {"loader": LOADER, "reasons": reasons[:5], "build": build, "head_dim": head_dim,
            "shapes": shapes,
            "attention_scaling": {n: float(m.scaling) for n, m in model.named_modules()
                                  if _is_attention(m)}}


def apply_hf_plan(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Apply a plan made by ``prune_hf`` to ``model`` in place (real or meta weights):
    slice tensors by FQN, refresh module attributes, update ``model.config``, drop layers.

    When the config alone cannot describe the result (BERT/GPT-2 head counts, per-layer
    widths), ``config.secateurs`` records what ``from_pretrained_pruned`` needs; the returned
    changes then hold ``"needs_loader": True``."""
    hf = plan.meta.get("hf", {})
    cfg = model.config
    old_hidden = _hidden_size(cfg)
    old_hd = int(hf.get("head_dim_before", _head_dim(cfg)))
    head_dim = old_hd - int(hf.get("head_dim_removed", 0))
    freq_removed = next((d.get(0, []) for n, d in plan.removed.items()
                         if n.endswith("inv_freq")), [])
    rope_before = None
    if head_dim != old_hd:
        check_head_dim_pruning(model)
        rope_before = _rope_frequencies(model)
    slice_tensors(model, plan.removed)
    new_hidden = old_hidden - int(hf.get("hidden_removed", 0))
    facts = _update_modules(model, head_dim, old_hidden, new_hidden)
    changes = _update_config(cfg, facts, head_dim, new_hidden, head_dim != old_hd)
    if head_dim != old_hd and rope_before is not None:
        kept = [i for i in range(old_hd // 2) if i not in set(freq_removed)]
        changes["rope_parameters"] = _express_rotary(model, rope_before, kept, old_hd, head_dim)
    elif head_dim != old_hd:
        changes["scaled"] = _fold_qk_scale(model, old_hd, head_dim)
    if hf.get("drop_layers"):
        drop_blocks(model, hf["drop_layers"])
        changes["num_hidden_layers"] = cfg.num_hidden_layers
    if hasattr(cfg, "secateurs"):
        del cfg.secateurs
    reasons = _config_mismatches(model)
    if reasons:
        if getattr(cfg, "head_dim", None) != head_dim:  # the loader builds with one head
            cfg.head_dim = changes["head_dim"] = head_dim
        cfg.secateurs = _loader_record(model, reasons, head_dim)
        changes["needs_loader"] = True
        log.info("the config cannot describe the pruned %s (%s); load it with %s",
                 type(model).__name__, reasons[0], LOADER)
    return changes


def _resize_parameters(model: nn.Module, shapes: Mapping[str, list[int]]) -> None:
    """Give the named parameters new (uninitialised) storage of the recorded shapes, on their
    device and dtype; a tensor tied to several modules stays one tensor."""
    owners: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for slots, attr, t in tensor_slots(model):
        owners.setdefault(id(t), []).append((slots, attr))
    params = dict(model.named_parameters())
    for name, shape in shapes.items():
        p = params[name]
        new = nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device),
                           requires_grad=p.requires_grad)
        for slots, attr in owners.get(id(p), []):
            slots[attr] = new


def _pruned_class(cls: type, rec: Mapping[str, Any]) -> type:
    """``cls`` whose constructor reshapes the recorded parameters and refreshes the module
    attributes, so ``from_pretrained`` loads the pruned tensors as they are (the key renames
    and tying of transformers stay in charge). Same class name, so a re-save keeps it."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        _resize_parameters(self, rec["shapes"])
        hidden = _hidden_size(config)
        _update_modules(self, int(rec["head_dim"]), hidden, hidden)
        for name, s in rec["attention_scaling"].items():
            self.get_submodule(name).scaling = float(s)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def from_pretrained_pruned(path: str, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by ``save_pretrained`` after ``prune_hf``, including the cases its
    config cannot describe (``config.secateurs`` present): BERT/GPT-2 with pruned heads or
    head dims, per-layer head counts or MLP widths (``prune_hf(..., uniform=False)``).

    The architecture is built from the config with one attention head (a shape every
    architecture accepts); its constructor then gives the recorded parameters their pruned
    shapes and sets the attention attributes (head counts from the weights, head_dim, the
    recorded ``scaling``), and ``from_pretrained`` loads the checkpoint into it unchanged. A
    model without ``config.secateurs`` is loaded by plain ``from_pretrained``. ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ...)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    cls = model_class or getattr(transformers, (config.architectures or ["AutoModel"])[0])
    rec = getattr(config, "secateurs", None)
    if not rec:
        return cls.from_pretrained(path, config=config, **kwargs).eval()
    if rec.get("loader") != LOADER or "shapes" not in rec:
        raise InputError(f"{path}: config.secateurs was not written by this version of "
                         f"secateurs (loader {rec.get('loader')!r})")
    kept = {a: getattr(config, a) for a in rec["build"]}
    for a, v in rec["build"].items():
        setattr(config, a, v)
    model = _pruned_class(cls, rec).from_pretrained(path, config=config, **kwargs)
    for a, v in kept.items():
        setattr(model.config, a, v)
    return model.eval()


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

    @property
    def needs_loader(self) -> bool:
        """True when the config cannot describe the pruned model on its own: load what
        ``save_pretrained`` writes with ``secateurs.hf.from_pretrained_pruned``."""
        return bool(getattr(self.model.config, "secateurs", None))

    def summary(self) -> dict[str, Any]:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_kept": self.macs_kept, "params_before": self.params_before,
                "params_after": self.params_after, "params_kept": self.params_kept,
                "config_changes": self.config_changes, "seconds": self.seconds,
                "needs_loader": self.needs_loader, "units": unit_counts(self.hf_analysis)}


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
             calibration: list[Any] | None = None, inplace: bool = False,
             score_context: ScoreContext | None = None, uniform: bool = True,
             target_macs: float | None = None) -> HFPruneResult:
    """Prune a Hugging Face model and return it (a real ``PreTrainedModel``, so
    ``save_pretrained`` works) with its plan.

    ``ratio`` is the default fraction of ``heads`` and ``mlp`` units to remove; each kind has
    its own ratio. ``head_dim`` (dims removed from every head, rotary pairs together) is off by
    default; ``hidden`` is lossy and needs ``allow_lossy=True``. ``blocks`` drops that many
    layers (or that fraction when < 1) by Block Influence on ``calibration``/example inputs.
    ``importance``: ``l1``/``l2``/``random`` (or any registered criterion), ``taylor``
    (first-order, gradients of the LM loss or of the output energy), ``activation``
    (E[x²]·‖W[:,c]‖² on calibration batches) or a callable ``(group, ctx) -> scores``.
    ``calibration``: batches of positional arguments (tuples) or keyword arguments (dicts, e.g.
    tokenizer output; their ``attention_mask`` keeps padding out of the activation statistics).

    ``uniform=False`` ranks heads and MLP neurons across layers instead of removing the same
    number from every layer. ``target_macs`` (fraction of MACs to keep) bisects one ratio
    shared by ``heads`` and ``mlp`` (those not given explicitly).

    Saving: ``result.model.save_pretrained(path)``. Where the config can describe the pruned
    model (uniform heads/MLP on Llama-family and ViT, head dims incl. rotary, MLP and hidden
    everywhere), plain ``from_pretrained`` reloads it; otherwise (BERT/GPT-2 heads or head dims,
    per-layer widths) ``result.needs_loader`` is True and ``from_pretrained_pruned(path)``
    reloads it. Rotary models whose frequencies cannot be expressed after head-dim pruning
    (dynamic RoPE, partial rotary, per-layer-type rope) raise ``InputError``.
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
    select_kw = dict(allow_lossy=allow_lossy, head_dim_per_head=hd_before, round_to=round_to,
                     uniform=uniform)
    if free:
        t = time.perf_counter()
        r_fit = _fit_ratio(hfa, scores, ratios, free, float(target_macs), select_kw)
        ratios.update({k: r_fit for k in free})
        seconds["fit_ratio"] = time.perf_counter() - t
    removed, dims_removed = _select(hfa, scores, ratios, **select_kw)
    hidden_removed = sum(len(removed.get(u.gid, ())) for u in hfa.of_kind("hidden"))
    drop: list[int] = []
    n_blocks = blocks if blocks >= 1 else int(blocks * len(_block_list(work)[1]))
    if n_blocks:
        bi = block_influence(work, batches)
        drop = sorted(int(i) for i in np.argsort(bi, kind="stable")[:int(n_blocks)])
    meta = {"importance": getattr(criterion, "__name__", str(importance)), "ratios": ratios,
            "uniform": uniform, "target_macs": target_macs,
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
