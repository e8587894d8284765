"""Apply a ``prune_hf`` plan to the original HF module: slice tensors by name, refresh the
module attributes HF reads at run time, update the config, drop layers, and record what a
rebuild from the new config would get wrong (``secateurs.hf.loader``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.graph.fx_apply import slice_tensors
from secateurs.hf.layout import block_list, hidden_size, out_features
from secateurs.hf.layout import head_dim as head_dim_of
from secateurs.hf.loader import LOADER, loader_record
from secateurs.hf.moe import refresh_moe
from secateurs.hf.rotary import (
    check_head_dim_pruning,
    express_rotary,
    fold_qk_scale,
    rope_frequencies,
)
from secateurs.passes.calibration import call_batch
from secateurs.passes.plan import Plan

__all__ = ["apply_hf_plan", "drop_blocks", "block_influence"]

log = logging.getLogger(__name__)


_KV_WORDS = ("kv", "key_value")
_SIZE_NAMES = ("head_dim", "head_size", "attention_head_size", "attn_head_size", "d_kv",
               "key_value_proj_dim", "dim_head", "dim_per_head")


@dataclass
class _Attention:
    """One attention module before slicing: its head counts and projections."""

    name: str
    nq: int
    nkv: int
    hd: int
    inputs: list[str]  # projections reading the residual stream, in definition order
    output: str | None  # the projection writing back (input width nq * hd)


def _is_proj(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D") and \
        isinstance(getattr(mod, "weight", None), torch.Tensor)


def _in_features(mod: nn.Module) -> int:
    w = mod.weight
    return int(w.shape[0] if type(mod).__name__ == "Conv1D" else w.shape[1])


def _head_count_attr(k: str) -> str:
    """'q', 'kv', 'groups', 'size' or '' for an attribute name."""
    low = k.lower()
    if low in _SIZE_NAMES or "head_dim" in low or "head_size" in low:
        return "size"
    if "head" not in low and low not in ("n_head", "n_heads"):
        return "groups" if "key_value_groups" in low or "queries_per_kv" in low else ""
    if "group" in low:
        return "groups"
    if any(w in low for w in _KV_WORDS):
        return "kv"
    if "dim" in low or "size" in low or "proj" in low:
        return ""
    return "q"


def attention_snapshot(model: nn.Module, hidden: int, head_dim: int) -> list[_Attention]:
    """Every module holding a head count (an int attribute named like ``num_heads``) with
    its projections, taken before slicing; the new counts are read from the sliced widths."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "kv_lora_rank", None), int):
            continue  # MLA attention is never pruned (classify._pin_mla): its counts stay
        counts: dict[str, int] = {}
        for k, v in vars(mod).items():
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                role = _head_count_attr(k)
                if role:
                    counts.setdefault(role, v)
        cfg = getattr(mod, "config", None)
        cfg_q = getattr(cfg, "num_attention_heads", None)
        if "q" not in counts and counts and isinstance(cfg_q, int):
            # Llama/Phi-3 keep no q head count of their own and read it from their config
            counts["q"] = cfg_q
            cfg_kv = getattr(cfg, "num_key_value_heads", None)
            if "kv" not in counts and isinstance(cfg_kv, int):
                counts["kv"] = cfg_kv
        if "q" not in counts:
            continue
        nq, hd = counts["q"], counts.get("size", head_dim)
        nkv = counts.get("kv", nq)
        if not hd:
            continue
        kids = [(n, c) for n, c in mod.named_children() if _is_proj(c)]
        # a two-tower model (SigLIP, CLIP, BLIP) has no hidden size of its own: each tower's
        # attention reads its own config's
        width = hidden_size(getattr(mod, "config", None)) or hidden
        outs = [n for n, c in kids if _in_features(c) == nq * hd and out_features(c) == width]
        # hidden == nq * hd makes q/k/v and the output projection look alike: the output is
        # the one named like it (o_proj, out_proj, dense, c_proj, wo); unnamed, only when its
        # shape says it (nq * hd != hidden)
        named = [n for n in outs if n.lower() in ("o", "wo", "dense", "c_proj", "o_proj",
                                                   "out_proj", "out_lin", "fc_out", "proj", "projection")
                 or n.lower().startswith("out")]
        unnamed = outs if len(outs) == 1 and nq * hd != width else []
        output = (named or unnamed or [None])[0]
        widths = (nq * hd, nkv * hd, (nq + 2 * nkv) * hd, 2 * nkv * hd)
        inputs = [n for n, c in kids if n != output and _in_features(c) == width and
                  out_features(c) in widths]
        if not inputs and not output:
            # a stage width of its own (MobileViT's hidden_sizes, no config hidden size): the
            # projections that all read one width and write head widths; one alone must be a
            # fused q/k/v (a lone ``out_proj`` of ``nn.MultiheadAttention``, whose q/k/v is a
            # packed parameter, is not an input)
            local = {_in_features(c) for n, c in kids if out_features(c) in widths}
            found = [n for n, c in kids if out_features(c) in widths]
            fused = len(found) == 1 and \
                out_features(dict(kids)[found[0]]) == (nq + 2 * nkv) * hd
            if len(local) == 1 and (len(found) > 1 or fused):
                inputs = found
        if inputs or output:
            out.append(_Attention(name, nq, nkv, hd, inputs, output))
    return out


def _new_counts(model: nn.Module, a: _Attention, hd: int) -> tuple[int, int] | None:
    """(q heads, kv heads) of a sliced attention module, from its projection widths."""
    mod = model.get_submodule(a.name) if a.name else model
    widths = [out_features(getattr(mod, n)) for n in a.inputs]
    nq = _in_features(getattr(mod, a.output)) // hd if a.output else None
    total = sum(widths)
    if nq is None:
        if len(widths) >= 2 and a.nq != a.nkv:
            nq = widths[0] // hd
        elif len(widths) == 3:
            nq = widths[0] // hd
        elif len(widths) == 1 and a.nq == a.nkv:
            nq = widths[0] // (3 * hd)
        else:
            return None
    if a.nq == a.nkv:
        return nq, nq
    nkv = (total // hd - nq) // 2 if total else a.nkv
    if a.nkv == 1 and nkv != 1:
        nkv = 1
    return nq, max(nkv, 1)


def _refresh_attention(model: nn.Module, a: _Attention, dims_removed: int,
                       facts: dict) -> None:
    hd = a.hd - dims_removed
    counts = _new_counts(model, a, hd)
    if counts is None:
        return
    nq, nkv = counts
    facts["heads"].add(nq)
    facts["kv"].add(nkv)
    facts["pairs"].add((a.nq, a.nkv, nq, nkv))  # old -> new counts of this module
    old = {"q": a.nq, "kv": a.nkv, "size": a.hd, "groups": a.nq // max(a.nkv, 1)}
    new = {"q": nq, "kv": nkv, "size": hd, "groups": nq // max(nkv, 1)}
    root = model.get_submodule(a.name) if a.name else model
    for mod in root.modules():
        has_kv_dim = isinstance(getattr(mod, "kv_dim", None), int)
        for k, v in list(vars(mod).items()):
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            role = _head_count_attr(k)
            if role and v == old[role]:
                setattr(mod, k, new[role])
            elif k in ("all_head_size", "split_size", "inner_dim") or \
                    (k == "embed_dim" and (has_kv_dim or mod is root)):
                # the attention module's own embed_dim is its heads' width where it equals it
                # (XGLM/M2M100-era ``attn_output.reshape(bsz, tgt_len, self.embed_dim)``)
                if v == a.nq * a.hd:
                    setattr(mod, k, nq * hd)
            elif k == "kv_dim" and v == a.nkv * a.hd:
                setattr(mod, k, nkv * hd)


def _update_modules(model: nn.Module, head_dim: int, old_hidden: int, new_hidden: int,
                    attention: list[_Attention] | None = None, dims_removed: int = 0) -> dict:
    """Refresh every attribute HF modules read at run time from the sliced weights: layer
    widths, and for each attention module of ``attention`` (``attention_snapshot`` before
    slicing) every head count, group count, head size and head width attribute."""
    facts: dict[str, set] = {"heads": set(), "kv": set(), "inter": set(), "pairs": set()}
    for a in attention or []:
        _refresh_attention(model, a, dims_removed, facts)
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
        for up in ("up_proj", "fc1", "c_fc"):
            if hasattr(mod, up) and isinstance(getattr(mod, up), nn.Module) and \
                    hasattr(getattr(mod, up), "weight"):
                n = out_features(getattr(mod, up))
                facts["inter"].add(n)
                if hasattr(mod, "intermediate_size"):
                    mod.intermediate_size = n
        if type(mod).__name__.endswith("Intermediate") and hasattr(mod, "dense"):
            facts["inter"].add(out_features(mod.dense))
    return facts



def drop_blocks(model: nn.Module, indices: list[int]) -> list[int]:
    """Remove decoder/encoder layers ``indices`` in place; update config and layer indices."""
    name, layers = block_list(model)
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


_WIDTH_WORDS = ("intermediate", "ffn", "inner", "d_ff", "hidden_dim", "mlp_dim")


def _config_ints(config: Any) -> dict[str, int]:
    return {k: v for k, v in vars(config).items()
            if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}


def _update_config(config: Any, facts: dict, head_dim: int, hidden: int,
                   head_dim_changed: bool, mlp_sizes: list[list[int]] | None = None
                   ) -> dict[str, Any]:
    """Write the new widths to ``config``: every head-count field (named like
    ``num_attention_heads`` / ``num_key_value_heads`` / ``n_head``) that held the old count,
    every MLP width field (``intermediate_size``, ``ffn_dim``, ``n_inner``, ...) that held a
    pruned group's old size. Where layers differ, the config gets the largest width (the
    model then needs ``from_pretrained_pruned``, see ``loader.loader_record``)."""
    changes: dict[str, Any] = {}
    ints = _config_ints(config)

    def put(attr: str, val: Any) -> None:
        if getattr(config, attr, None) != val:
            try:
                setattr(config, attr, val)
            except AttributeError:  # a derived property (Falcon's head_dim)
                return
            changes[attr] = val

    if hidden:
        put("hidden_size", hidden)
    old_q = ints.get("num_attention_heads",
                     next((v for k, v in ints.items() if _head_count_attr(k) == "q"), None))
    # each count field follows the attention modules that had its value: a hybrid's Mamba or
    # linear-attention mixers hold head counts of their own (``mamba_n_heads``), which a
    # field of the attention's count must not take
    pairs = facts.get("pairs", set())
    old_kv = ints.get("num_key_value_heads")
    for k, v in ints.items():
        role = _head_count_attr(k)
        if role == "q" and facts["heads"]:
            if pairs:
                # the attention's kv count tells its modules from a mixer with as many heads
                # (Bamba: 4 attention heads over 2 kv heads, 4 Mamba heads); another count
                # field (``mamba_n_heads``) follows the modules with no kv heads of their own
                mine = (lambda p: p[1] == old_kv) if k == "num_attention_heads" else \
                    (lambda p: p[1] == p[0])
                news = [p[2] for p in pairs if p[0] == v and mine(p)] or \
                    [p[2] for p in pairs if p[0] == v]
                if news:
                    put(k, max(news))
            elif v == old_q:
                put(k, max(facts["heads"]))
        elif role == "kv" and facts["kv"]:
            if pairs:
                news = [p[3] for p in pairs if p[1] == v and p[0] == old_q] or \
                    [p[3] for p in pairs if p[1] == v]
                if news:
                    put(k, max(news))
            else:
                put(k, max(facts["kv"]))
    done = False
    for k, v in ints.items():
        if any(w in k.lower() for w in _WIDTH_WORDS):
            news = [int(n) for o, n in (mlp_sizes or []) if int(o) == v]
            if news:
                put(k, max(news))
                done = True
    if not done and facts["inter"] and not mlp_sizes:
        put("n_inner" if config.model_type == "gpt2" else "intermediate_size",
            max(facts["inter"]))
    elif not done and mlp_sizes and getattr(config, "n_inner", 0) is None:
        put("n_inner", max(int(n) for _, n in mlp_sizes))  # GPT-2's default 4 * hidden
    if head_dim and (head_dim_changed or any(k in changes for k in ints
                                             if _head_count_attr(k) == "q")
                     or getattr(config, "head_dim", None) is not None):
        put("head_dim", head_dim)  # ViT/Llama read config.head_dim
    return changes


# counts a module keeps as attributes that the plan rewrites (the rule table's names are the
# torch modules' own: ``channel_rules._conv_rewrite``, the group_norm rule)
_MODULE_COUNTS = {"conv": ("groups", "in_channels", "out_channels"),
                  "group_norm": ("num_groups", "num_channels")}


def module_attrs(graph: Any, constants: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{module path: {attribute: new value}}`` for the counts the plan rewrites on conv and
    group-norm nodes of the traced graph (a depthwise conv's ``groups``, a per-channel
    GroupNorm's ``num_groups``), which the weight shapes alone cannot tell: a grouped conv's
    ``[out, in/groups, k]`` weight reads the same after whole groups or filters within every
    group are removed. The module is the owner of the node's weight."""
    out: dict[str, dict[str, int]] = {}
    for node in graph.nodes:
        names = _MODULE_COUNTS.get(node.op)
        consts = constants.get(node.name)
        if not names or not consts or len(node.inputs) < 2 or not node.inputs[1]:
            continue
        weight = node.inputs[1]
        if not weight.endswith(".weight"):
            continue
        attrs = {k: int(consts[k]) for k in names if k in consts}
        if attrs:
            out.setdefault(weight[:-len(".weight")], {}).update(attrs)
    return out


def apply_hf_plan(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Apply a plan made by ``prune_hf`` to ``model`` in place (real or meta weights):
    slice tensors by FQN, refresh module attributes, update ``model.config``, drop layers.

    When the config alone cannot describe the result (BERT/GPT-2 head counts, per-layer
    widths), ``config.secateurs`` records what ``from_pretrained_pruned`` needs; the returned
    changes then hold ``"needs_loader": True``."""
    hf = plan.meta.get("hf", {})
    cfg = model.config
    old_hidden = hidden_size(cfg)
    old_hd = int(hf.get("head_dim_before", head_dim_of(cfg)))
    head_dim = old_hd - int(hf.get("head_dim_removed", 0))
    freq_removed = next((d.get(0, []) for n, d in plan.removed.items()
                         if n.endswith("inv_freq")), [])
    rope_before = None
    if head_dim != old_hd:
        check_head_dim_pruning(model)
        rope_before = rope_frequencies(model)
    attention = attention_snapshot(model, old_hidden, old_hd)
    slice_tensors(model, plan.removed)
    new_hidden = old_hidden - int(hf.get("hidden_removed", 0))
    facts = _update_modules(model, head_dim, old_hidden, new_hidden, attention,
                            old_hd - head_dim)
    for path, attrs in hf.get("module_attrs", {}).items():
        mod = model.get_submodule(path)
        for attr, value in attrs.items():
            if isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, int(value))
    changes = _update_config(cfg, facts, head_dim, new_hidden, head_dim != old_hd,
                             hf.get("mlp_sizes"))
    if hf.get("moe"):
        changes.update(refresh_moe(model, hf["moe"]))
    if head_dim != old_hd and rope_before is not None:
        kept = [i for i in range(old_hd // 2) if i not in set(freq_removed)]
        changes["rope_parameters"] = express_rotary(model, rope_before, kept, old_hd, head_dim)
    elif head_dim != old_hd:
        changes["scaled"] = fold_qk_scale(model, old_hd, head_dim)
    if hf.get("drop_layers"):
        drop_blocks(model, hf["drop_layers"])
        changes["num_hidden_layers"] = cfg.num_hidden_layers
    if hasattr(cfg, "secateurs"):
        del cfg.secateurs
    rec = loader_record(model)
    if rec is not None:
        cfg.secateurs = rec
        changes["needs_loader"] = True
        log.info("the config cannot describe the pruned %s (%s); load it with %s",
                 type(model).__name__, (rec["reasons"] or ["?"])[0], LOADER)
    return changes
