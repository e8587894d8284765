"""Mixture-of-experts layers: expert intermediate width and whole experts.

Recent transformers store a layer's routed experts as 3-D tensors in one module
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``; ``is_transposed``
swaps the last two dims, ``is_concatenated=False`` interleaves gate and up rows, ``has_gate``
False has ``up_proj [E, I, H]``, biases ``[E, 2I]``/``[E, H]``) next to a router whose weight
is ``[E, H]`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...). The trace sees the experts
through ``index``/``grouped_mm`` ops that pin them, so this module finds the blocks by
structure and adds their slices to the plan:

* **width** (kind ``mlp``): neuron ``j`` of every expert of a layer is its gate row, up row
  (and biases) and its ``down_proj`` column. One config field (``moe_intermediate_size`` /
  ``intermediate_size``) describes every expert, so all experts of a layer lose the same
  neuron indices (scores: the per-expert normalised L2/L1 norm of the neuron's slices,
  averaged over the experts). Zeroing those slices leaves the layer's output unchanged
  (the ``down_proj`` column is zero), so width pruning is mask-equivalent as usual.
* **experts** (kind ``experts``): expert ``e`` of a layer is its slice ``e`` of every expert
  tensor, router row ``e`` (and router bias / ``e_score_correction_bias`` entry). Removing an
  expert changes the routing, so the contract is: the pruned model equals the original whose
  removed experts' router logits are ``-inf`` (they are never chosen and take no probability
  mass: a softmax over the kept experts is the softmax over all with the removed at
  ``-inf``; sigmoid routers get ``-inf`` correction biases too) with the removed slices
  zeroed — ``expert_reference``. Every layer keeps the same number of experts (one
  ``num_experts`` in the config) and at least ``top_k``.

Expert criterion (``reap``, after REAP, Lasby et al. 2025): on the calibration batches, for
every token routed to expert ``e`` (in its top-k), the router probability of ``e``
(softmax of the logits; sigmoid for routers with an ``e_score_correction_bias``) times the
L2 norm of the expert's output on that token; the score is the mean over the routed tokens
(0 for an expert never routed to). ``frequency`` counts routed tokens; ``random`` draws.
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.passes.calibration import call_batch
from secateurs.passes.plan import Plan

__all__ = ["MoeBlock", "MoeSelection", "select_moe", "moe_blocks", "checkpoint_key",
           "per_expert_keys", "expert_width_slices", "expert_slices", "width_scores",
           "expert_scores", "refresh_moe", "expert_reference", "EXPERT_CRITERIA"]

EXPERT_CRITERIA = ("reap", "frequency", "random")


@dataclass(frozen=True)
class MoeBlock:
    """One MoE layer: router and routed experts (names are FQNs in the model)."""

    name: str  # the block (e.g. model.layers.1.mlp)
    router: str  # router module
    router_weight: str  # [E, H]
    router_tensors: tuple[str, ...]  # other tensors indexed by expert (bias, correction bias)
    experts: str  # experts module
    num_experts: int
    top_k: int
    inter: int  # intermediate width of every expert
    width: tuple[tuple[str, int, str], ...]  # (tensor, dim, layout: cat|interleaved|plain)
    expert_tensors: tuple[str, ...]  # every tensor of the experts module, expert dim 0
    groups: int  # routing groups (DeepSeek n_group): experts must divide into them
    router_dims: tuple[int, ...] = ()  # the expert dim of each router tensor (0, or 1 of [1, E])


def _int(mod: nn.Module, *names: str) -> int | None:
    for n in names:
        v = getattr(mod, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _transposed(experts: nn.Module, hidden: int | None) -> bool | None:
    """Whether the expert tensors are ``[E, H, 2I]`` / ``[E, I, H]`` (else ``[E, 2I, H]`` /
    ``[E, H, I]``): the module's ``is_transposed`` where it has one, else read from where the
    router's hidden size ``H`` sits in ``down_proj`` (Llama 4's experts keep the transposed
    layout without saying so); None where that cannot tell (``H == I``)."""
    if hasattr(experts, "is_transposed"):
        return bool(experts.is_transposed)
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.dim() != 3 or hidden is None:
        return False
    if down.shape[1] == down.shape[2]:
        return None
    return bool(down.shape[2] == hidden)


def _width_dims(experts: nn.Module, e: int, inter: int,
                hidden: int | None = None) -> list[tuple[str, int, str]]:
    transposed = _transposed(experts, hidden)
    if transposed is None:
        return []
    cat = bool(getattr(experts, "is_concatenated", True))
    out = []
    for n, t in list(experts.named_parameters(recurse=False)) + \
            list(experts.named_buffers(recurse=False)):
        if t.dim() < 2 or t.shape[0] != e:
            continue
        if n.startswith("gate_up_proj"):
            d = (2 if transposed else 1) if t.dim() == 3 else 1
            if t.shape[d] == 2 * inter:
                out.append((n, d, "cat" if cat else "interleaved"))
        elif n.startswith(("up_proj", "gate_proj")):
            d = (2 if transposed else 1) if t.dim() == 3 else 1
            if t.shape[d] == inter:
                out.append((n, d, "plain"))
        elif n == "down_proj" and t.dim() == 3:
            d = 1 if transposed else 2
            if t.shape[d] == inter:
                out.append((n, d, "plain"))
    # the width is removable only where both its sides were found
    ups = [w for w in out if w[0] != "down_proj"]
    downs = [w for w in out if w[0] == "down_proj"]
    return out if ups and downs else []


def moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every module with a router child (``gate``/``router``: a ``[E, H]`` weight) and an
    ``experts`` child holding 3-D expert tensors of ``E`` experts."""
    found = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if not isinstance(experts, nn.Module) or isinstance(experts, nn.ModuleList):
            continue
        e = _int(experts, "num_experts", "num_local_experts")
        params = dict(experts.named_parameters(recurse=False))
        if e is None or not any(p.dim() == 3 and p.shape[0] == e for p in params.values()):
            continue
        router_name = next((r for r in ("gate", "router")
                            if isinstance(getattr(mod, r, None), nn.Module)
                            and _router_weight(getattr(mod, r), e) is not None), None)
        if router_name is None:
            continue
        router = getattr(mod, router_name)
        weight_name, weight = _router_weight(router, e)  # type: ignore[misc]
        k = _int(router, "top_k", "num_experts_per_tok") or _int(mod, "top_k") or \
            _int(getattr(model, "config", None), "num_experts_per_tok") or 1
        down = params.get("down_proj")
        hidden = int(weight.shape[1])
        inter = _int(experts, "intermediate_dim", "intermediate_size", "expert_dim") or (
            int(down.shape[1 if _transposed(experts, hidden) else 2])
            if down is not None else 0)
        prefix = f"{name}." if name else ""
        per_expert = [(f"{prefix}{router_name}.{n}", t.dim() - 1) for n, t in
                      list(router.named_parameters()) + list(router.named_buffers())
                      if n != weight_name and _per_expert(t, e)]
        rt = tuple(n for n, _ in per_expert)
        width = tuple((f"{prefix}experts.{n}", d, lay) for n, d, lay in
                      _width_dims(experts, e, inter, hidden))
        tensors = tuple(f"{prefix}experts.{n}" for n, t in
                        list(experts.named_parameters(recurse=False)) +
                        list(experts.named_buffers(recurse=False))
                        if t.dim() >= 1 and t.shape[0] == e)
        found.append(MoeBlock(name, f"{prefix}{router_name}", f"{prefix}{router_name}.{weight_name}",
                              rt, f"{prefix}experts", e, int(k), inter, width, tensors,
                              _int(router, "num_group", "n_group") or 1,
                              tuple(d for _, d in per_expert)))
    return found


# ---------------------------------------------------------------- slices


def _positions(idx: np.ndarray, inter: int, layout: str) -> list[int]:
    idx = np.asarray(idx, dtype=np.int64)
    if layout == "cat":
        pos = np.concatenate([idx, idx + inter])
    elif layout == "interleaved":
        pos = np.concatenate([2 * idx, 2 * idx + 1])
    else:
        pos = idx
    return sorted(int(p) for p in pos)


def expert_width_slices(block: MoeBlock, neurons: np.ndarray) -> dict[str, dict[int, list[int]]]:
    """Plan entries removing intermediate ``neurons`` from every expert of ``block``."""
    if not len(neurons):
        return {}
    return {n: {d: _positions(neurons, block.inter, lay)} for n, d, lay in block.width}


def expert_slices(block: MoeBlock, experts: np.ndarray) -> dict[str, dict[int, list[int]]]:
    """Plan entries removing whole ``experts`` of ``block`` (router rows and every expert
    tensor, dim 0)."""
    if not len(experts):
        return {}
    idx = sorted(int(i) for i in experts)
    names = (block.router_weight, *block.expert_tensors)
    out = {n: {0: idx} for n in names}
    for n, d in zip(block.router_tensors, block.router_dims or (0,) * len(block.router_tensors)):
        out[n] = {d: idx}  # [E], or [1, E] (ERNIE 4.5's MoeStatics): the last dim
    return out


def merge_slices(into: dict[str, dict[int, list[int]]],
                 more: dict[str, dict[int, list[int]]]) -> None:
    for name, dims in more.items():
        cur = into.setdefault(name, {})
        for d, idx in dims.items():
            cur[d] = sorted(set(cur.get(d, [])) | set(int(i) for i in idx))


# ---------------------------------------------------------------- scores


def width_scores(block: MoeBlock, tensors: Any, importance: str, seed: int = 0) -> np.ndarray:
    """Score of each intermediate neuron of ``block`` (higher = keep), shape ``[inter]``."""
    if importance == "random":
        return np.random.default_rng(seed).random(block.inter)
    p = 1 if importance == "l1" else 2
    total = None
    for n, d, lay in block.width:
        t = tensors[n].detach().float()
        t = t.movedim(d, 1).reshape(t.shape[0], t.shape[d], -1)  # [E, W, rest]
        per = t.abs().sum(-1) if p == 1 else t.pow(2).sum(-1)  # [E, W]
        if lay == "cat":
            per = per[:, :block.inter] + per[:, block.inter:]
        elif lay == "interleaved":
            per = per[:, 0::2] + per[:, 1::2]
        total = per if total is None else total + per
    if total is None:
        return np.zeros(block.inter)
    s = total if p == 1 else total.sqrt()
    s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)  # each expert weighs the same
    return s.mean(0).double().numpy()


def _router_output(out: Any, e: int, n_tokens: int) -> tuple[torch.Tensor | None,
                                                             torch.Tensor | None]:
    """(logits [T, E], top-k indices [T, k]) from a router's output tuple."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    logits = next((t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()
                   and t.shape == (n_tokens, e)), None)
    index = next((t for t in items if isinstance(t, torch.Tensor) and
                  not t.is_floating_point() and t.dim() == 2 and t.shape[0] == n_tokens), None)
    return logits, index


@torch.no_grad()
def expert_scores(model: nn.Module, blocks: list[MoeBlock], batches: list[Any],
                  criterion: str = "reap", seed: int = 0) -> dict[str, np.ndarray]:
    """Router-statistics score of every expert of every block (higher = keep)."""
    if criterion not in EXPERT_CRITERIA:
        raise InputError(f"unknown expert criterion {criterion!r}; choose one of "
                         f"{EXPERT_CRITERIA}")
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return {b.name: rng.random(b.num_experts) for b in blocks}
    sums = {b.name: np.zeros(b.num_experts) for b in blocks}
    counts = {b.name: np.zeros(b.num_experts) for b in blocks}
    handles = []

    def hook_for(b: MoeBlock):
        experts = model.get_submodule(b.experts)
        router = model.get_submodule(b.router)
        weight = model.get_parameter(b.router_weight)
        sigmoid = any(n.endswith("e_score_correction_bias") for n in b.router_tensors)

        def hook(_mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            h = args[0].reshape(-1, args[0].shape[-1])
            logits, index = _router_output(out, b.num_experts, h.shape[0])
            prob = None
            if logits is not None and index is None:
                # scores without indices (Llama 4: sigmoid gate weights, 0 off the top-k):
                # the top-k of the router's own logits, the gate weights as the probability
                own = torch.nn.functional.linear(h.float(), weight.float())
                index = own.topk(b.top_k, dim=-1).indices
                items = out if isinstance(out, (tuple, list)) else (out,)
                prob = next((t.float() for t in items if isinstance(t, torch.Tensor)
                             and t.shape == own.shape and t.is_floating_point()
                             and int((t != 0).sum()) == index.numel()
                             and bool((t.gather(1, index) != 0).all())), None)
            if logits is None or index is None:
                raise InputError(f"MoE router '{b.router}' ({type(router).__name__}) returns "
                                 "no (logits, top-k indices) pair; use "
                                 "expert_importance='random'")
            if prob is None:
                prob = logits.float().sigmoid() if sigmoid else logits.float().softmax(-1)
            for e in range(b.num_experts):
                tok = (index == e).any(-1).nonzero().flatten()
                if not len(tok):
                    continue
                counts[b.name][e] += len(tok)
                if criterion == "frequency":
                    continue
                y = _expert_output(experts, b.num_experts, e, h[tok], index.dtype)
                norm = y.float().norm(dim=-1)
                sums[b.name][e] += float((prob[tok, e] * norm).sum())
        return router.register_forward_hook(hook)

    try:
        for b in blocks:
            handles.append(hook_for(b))
        for batch in batches:
            call_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    if criterion == "frequency":
        return counts
    return {n: np.where(counts[n] > 0, sums[n] / np.maximum(counts[n], 1), 0.0) for n in sums}


def _expert_output(experts: nn.Module, n: int, e: int, x: torch.Tensor,
                   index_dtype: torch.dtype) -> torch.Tensor:
    """Expert ``e``'s output on tokens ``x`` by the experts module's own forward: transformers'
    interface ``(hidden, top_k_index, top_k_weights)`` with every token routed to ``e`` at
    weight 1, or Llama 4's batched ``forward(hidden)`` over ``[experts * tokens, H]`` (the
    tokens in ``e``'s block, zeros elsewhere)."""
    params = [p for p in inspect.signature(experts.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) >= 3:
        ones = torch.ones(len(x), 1, dtype=x.dtype)
        return experts(x, torch.full((len(x), 1), e, dtype=index_dtype), ones)
    blocks = x.new_zeros(n, *x.shape)
    blocks[e] = x
    return experts(blocks.reshape(-1, x.shape[-1])).reshape(n, *x.shape)[e]


def experts_to_remove(block: MoeBlock, asked: int, scores: np.ndarray) -> np.ndarray:
    """The ``asked`` lowest-scored experts (ties: the earlier index first)."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[:asked])


def experts_limit(block: MoeBlock) -> tuple[int, str]:
    """Most experts a block may lose, and why not more."""
    if block.groups > 1:
        return 0, (f"'{block.router}' routes by {block.groups} expert groups (group-limited "
                   "top-k); removing experts would unbalance the groups")
    return max(block.num_experts - block.top_k, 0), \
        f"top-k = {block.top_k} keeps at least {block.top_k} of {block.num_experts} experts"


def width_to_remove(block: MoeBlock, ratio: float, round_to: int | None,
                    align: int = 1) -> int:
    """Expert width to remove at ``ratio``: the kept width a multiple of ``round_to`` and of
    ``align`` (``torch._grouped_mm``, which HF's experts run through, takes only rows of a
    multiple of 16 bytes: 4 fp32 / 8 bf16 values; a kept width of 42 raised "strides should
    be multiple of 16 bytes" in the pruned model)."""
    n = int(math.floor(ratio * block.inter))
    keep = max(1, block.inter - n)
    if round_to and round_to > 1 and block.inter > round_to:
        keep = min(block.inter, int(math.ceil(keep / round_to)) * round_to)
    if align > 1 and block.inter % align == 0:
        keep = min(block.inter, int(math.ceil(keep / align)) * align)
    return block.inter - keep


# ---------------------------------------------------------------- selection


@dataclass(frozen=True)
class MoeSelection:
    """What ``prune_hf`` removes from the MoE layers: neurons of every expert and whole
    experts, per block; and per kind (``mlp``, ``experts``) units, asked, removed, reasons."""

    blocks: tuple[MoeBlock, ...] = ()
    width: dict[str, np.ndarray] = field(default_factory=dict)
    experts: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, tuple[int, int, int, tuple[str, ...]]] = field(default_factory=dict)

    def slices(self, active: dict[str, float]) -> dict[str, dict[int, list[int]]]:
        out: dict[str, dict[int, list[int]]] = {}
        for b in self.blocks:
            if active.get("mlp", 0) > 0:
                merge_slices(out, expert_width_slices(b, self.width.get(b.name, [])))
            if active.get("experts", 0) > 0:
                merge_slices(out, expert_slices(b, self.experts.get(b.name, [])))
        return out

    def meta(self, active: dict[str, float]) -> dict[str, Any]:
        """``plan.meta["hf"]["moe"]`` (JSON): blocks, expert count and width before/after,
        removed experts by router."""
        if not self.blocks:
            return {}
        b0 = self.blocks[0]
        nw = len(self.width.get(b0.name, ())) if active.get("mlp", 0) > 0 else 0
        ne = len(self.experts.get(b0.name, ())) if active.get("experts", 0) > 0 else 0
        if not nw and not ne:
            return {}
        return {"blocks": [b.name for b in self.blocks],
                "experts": [b0.num_experts, b0.num_experts - ne],
                "inter": [b0.inter, b0.inter - nw],
                "removed_experts": {b.router: [int(i) for i in self.experts.get(b.name, [])]
                                    for b in self.blocks if ne},
                "by_block": {b.name: {
                    "experts": [int(i) for i in self.experts.get(b.name, [])] if ne else [],
                    "neurons": [int(i) for i in self.width.get(b.name, [])] if nw else []}
                    for b in self.blocks}}


def select_moe(model: nn.Module, mlp: float, experts: float, tensors: Any, importance: Any,
               expert_importance: str, batches: list[Any], round_to: int | None,
               on_meta: bool, seed: int = 0) -> MoeSelection:
    """Choose the neurons (``mlp`` ratio of every expert's width) and the experts
    (``experts``: a count per layer when >= 1, else a fraction) to remove. Every block loses
    the same number of each (one config field describes all layers)."""
    blocks = tuple(moe_blocks(model))
    counts: dict[str, tuple[int, int, int, tuple[str, ...]]] = {}
    if not blocks:
        if experts:
            counts["experts"] = (0, 0, 0, ("the model has no MoE layers (a router with a "
                                           "[E, H] weight next to 3-D expert tensors)",))
        return MoeSelection(counts=counts)
    sizes = {(b.num_experts, b.inter, b.top_k) for b in blocks}
    width: dict[str, np.ndarray] = {}
    if mlp > 0:
        name = importance if importance in ("l1", "l2", "random") else "l2"
        asked = done = 0
        reasons: list[str] = []
        if importance not in ("l1", "l2", "random"):
            reasons.append(f"expert widths are scored by L2 magnitude (importance="
                           f"{importance!r} is not implemented for 3-D expert tensors)")
        for i, b in enumerate(blocks):
            first = tensors[b.expert_tensors[0]] if b.expert_tensors else None
            align = 16 // first.element_size() if isinstance(first, torch.Tensor) else 1
            n = width_to_remove(b, mlp, round_to, align) if b.width else 0
            asked += int(math.floor(mlp * b.inter))
            if not b.width:
                reasons.append(f"the expert tensors of '{b.experts}' are laid out in a way "
                               "secateurs cannot read (no up and down projection of the "
                               "expert width found); their width is kept")
                continue
            s = width_scores(b, tensors, name, seed + i)
            width[b.name] = np.sort(np.argsort(s, kind="stable")[:n])
            done += n
        counts["mlp"] = (sum(b.inter for b in blocks), asked, done, tuple(reasons))
    removed: dict[str, np.ndarray] = {}
    if experts:
        per = [int(experts) if experts >= 1 else int(math.floor(experts * b.num_experts))
               for b in blocks]
        limits = [experts_limit(b) for b in blocks]
        n = min(min(p, lim) for p, (lim, _) in zip(per, limits))
        reasons = []
        if len(sizes) > 1:
            reasons.append("MoE layers differ in expert count, width or top-k; experts are "
                           "not removed")
            n = 0
        elif n < max(per):
            reasons.append(next(why for p, (lim, why) in zip(per, limits) if lim < p))
        if n > 0:
            if on_meta and expert_importance != "random":
                raise InputError(f"expert_importance={expert_importance!r} routes calibration "
                                 "tokens, but the model is on the meta device; use "
                                 "expert_importance='random' or the loaded model")
            scores = expert_scores(model, list(blocks), batches, expert_importance, seed)
            removed = {b.name: experts_to_remove(b, n, scores[b.name]) for b in blocks}
        counts["experts"] = (sum(b.num_experts for b in blocks), sum(per),
                             n * len(blocks), tuple(reasons))
    return MoeSelection(blocks, width, removed, counts)


# ---------------------------------------------------------------- checkpoints

# transformers 5 writes routed experts back in the per-expert layout of the hub checkpoints
# (``experts.<e>.gate_proj/up_proj/down_proj.weight``; Mixtral/PhiMoE ``block_sparse_moe.
# experts.<e>.w1/w3/w2.weight``) and fuses them on load; GPT-OSS keeps the 3-D tensors
_ROWS = ("gate_proj", "up_proj", "w1", "w3")  # [I, H]: neuron = row
_COLS = ("down_proj", "w2")  # [H, I]: neuron = column
_LEGACY_BLOCK = ("block_sparse_moe",)


def _block_spellings(block: str) -> list[str]:
    parent, _, last = block.rpartition(".")
    return [block] + [f"{parent}.{alt}" if parent else alt for alt in _LEGACY_BLOCK
                      if alt != last]


def per_expert_keys(name: str, keys: Any) -> list[tuple[str, ...]] | None:
    """For a fused expert tensor name (``<block>.experts.gate_up_proj`` / ``down_proj``) the
    checkpoint keys holding it per expert: ``[(gate, up), ...]`` or ``[(down,), ...]``."""
    head, _, leaf = name.rpartition(".experts.")
    if leaf not in ("gate_up_proj", "down_proj") or not head:
        return None
    for block in _block_spellings(head):
        for gate, up, down in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
            e, out = 0, []
            while f"{block}.experts.{e}.{down}.weight" in keys:
                key = f"{block}.experts.{e}"
                out.append((f"{key}.{gate}.weight", f"{key}.{up}.weight")
                           if leaf == "gate_up_proj" else (f"{key}.{down}.weight",))
                e += 1
            if out:
                return out
    return None


def checkpoint_key(key: str, plan: Plan) -> tuple[str | None, str, dict[int, list[int]]] | None:
    """How a checkpoint tensor under an MoE block of ``plan`` is written: ``(new key or None
    to drop it, the model name the plan knows it by, dims to slice)``; None when ``key`` is
    not under an MoE block (the plain path applies)."""
    moe = plan.meta.get("hf", {}).get("moe") or {}
    for block, what in (moe.get("by_block") or {}).items():
        for spelled in _block_spellings(block):
            if not key.startswith(spelled + "."):
                continue
            rest = key[len(spelled) + 1:]
            parts = rest.split(".")
            if len(parts) >= 3 and parts[0] == "experts" and parts[1].isdigit():
                e = int(parts[1])
                gone = what.get("experts", [])
                fused = f"{block}.experts." + ("down_proj" if parts[2] in _COLS
                                               else "gate_up_proj")
                if e in gone:
                    return None, fused, {}
                new_e = e - sum(1 for g in gone if g < e)
                neurons = what.get("neurons", [])
                dims: dict[int, list[int]] = {}
                if neurons and parts[2] in _ROWS:
                    dims = {0: list(neurons)}
                elif neurons and parts[2] in _COLS and parts[-1] == "weight":
                    dims = {1: list(neurons)}
                return ".".join([spelled, "experts", str(new_e), *parts[2:]]), fused, dims
            model_name = f"{block}.{rest}"
            return key, model_name, dict(plan.removed.get(model_name, {}))
    return None


# ---------------------------------------------------------------- apply


_EXPERT_SKIP = ("per_tok", "top", "shared", "group", "topk")


def _is_expert_count(attr: str) -> bool:
    low = attr.lower()
    return "expert" in low and not any(w in low for w in _EXPERT_SKIP)


def refresh_moe(model: nn.Module, moe: dict[str, Any]) -> dict[str, Any]:
    """After slicing: every expert-count attribute (the blocks', their routers', the model's
    own for the auxiliary loss), the width attributes of the blocks and their experts
    modules, and the config's expert count. ``moe``: the plan's
    ``meta["hf"]["moe"]`` (``experts`` and ``inter``: ``[before, after]``)."""
    e0, e1 = moe.get("experts", (0, 0))
    i0, i1 = moe.get("inter", (0, 0))
    changes: dict[str, Any] = {}
    experts_mods = set()  # the blocks, their experts and routers: width attributes
    for n in moe.get("blocks", []):
        block = model.get_submodule(n)
        experts_mods |= {id(block), id(block.experts)}
    for mod in model.modules():  # the blocks, and the model's own count (aux loss)
        for k, v in list(vars(mod).items()):
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            if e0 != e1 and v == e0 and _is_expert_count(k):
                setattr(mod, k, e1)
            elif id(mod) in experts_mods and i0 != i1 and v == i0 and \
                    k in ("intermediate_dim", "intermediate_size", "expert_dim", "ffn_dim"):
                setattr(mod, k, i1)
    cfg = getattr(model, "config", None)
    if cfg is not None and e0 != e1:
        for k, v in list(vars(cfg).items()):
            if isinstance(v, int) and not isinstance(v, bool) and v == e0 and \
                    not k.startswith("_") and _is_expert_count(k):
                setattr(cfg, k, e1)
                changes[k] = e1
        k = getattr(cfg, "num_experts_per_tok", None)
        if isinstance(k, int) and k > e1:
            raise InputError(f"top-k {k} > {e1} experts left")
    return changes


def expert_reference(model: nn.Module, plan: Plan) -> nn.Module:
    """The contract's reference for a plan that removes experts: a copy of ``model`` with
    every removed slice zeroed and each removed expert's router logit at ``-inf`` (and its
    correction bias, for sigmoid routers), so it is never routed to. Without removed experts
    this is ``zero_plan_slices``."""
    from secateurs.passes.prune import zero_plan_slices

    ref = zero_plan_slices(model, plan)
    removed = plan.meta.get("hf", {}).get("moe", {}).get("removed_experts", {})
    for router_name, idx in removed.items():
        if idx:
            _mask_router(ref.get_submodule(router_name), [int(i) for i in idx])
    return ref


def _router_weight(router: nn.Module, e: int | None = None) -> tuple[str, torch.Tensor] | None:
    """The router's ``[E, H]`` weight (``E`` experts where given), its own or its one Linear
    child's (HunYuan-MoE's ``gate.wg``), with its name in the router."""
    own = getattr(router, "weight", None)
    if isinstance(own, torch.Tensor):
        return ("weight", own) if own.dim() == 2 and e in (None, own.shape[0]) else None
    kids = [(n, c) for n, c in router.named_children() if isinstance(c, nn.Linear)]
    if len(kids) == 1 and e in (None, kids[0][1].weight.shape[0]):
        return f"{kids[0][0]}.weight", kids[0][1].weight
    return None


def _per_expert(t: torch.Tensor, e: int) -> bool:
    """A router tensor indexed by expert: ``[E]``, or ``[1, E]`` (ERNIE 4.5's correction bias
    in a ``MoeStatics`` submodule)."""
    return t.dim() >= 1 and int(t.shape[-1]) == e and all(int(s) == 1 for s in t.shape[:-1])


def _mask_router(router: nn.Module, idx: list[int]) -> None:
    found = _router_weight(router)
    assert found is not None, "moe_blocks found this router by its weight"
    e = int(found[1].shape[0])
    with torch.no_grad():
        for n, t in list(router.named_buffers()) + list(router.named_parameters()):
            if n.endswith("correction_bias") and _per_expert(t, e):
                t[..., idx] = float("-inf")
    mask = torch.zeros(e)
    mask[idx] = float("-inf")
    inner = router.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        real = torch.nn.functional.linear

        def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
                   ) -> torch.Tensor:
            out = real(x, w, b)
            return out + mask.to(out) if out.shape[-1] == e else out

        torch.nn.functional.linear = linear
        try:
            return inner(*args, **kwargs)
        finally:
            torch.nn.functional.linear = real

    router.forward = types.MethodType(forward, router)
