"""Apply a plan to a safetensors checkpoint shard by shard (models larger than memory).

The plan is made on a ``meta``-device model (``prune_hf`` on
``AutoModelForCausalLM.from_config(cfg)`` under ``torch.device("meta")``, or with real
importance scores on a smaller machine). ``prune_checkpoint`` then:

1. applies the plan to a meta model built from the checkpoint's config, which gives the new
   config (heads, kv heads, head_dim, intermediate and hidden sizes, layer count) for free;
2. streams every shard: each tensor is loaded alone, sliced by the plan (tied aliases follow
   their canonical tensor; MoE experts stored per expert — ``experts.<e>.gate_proj`` /
   ``w1`` ..., as transformers writes them — are dropped, renumbered and sliced as the fused
   3-D tensors of the plan: ``moe.checkpoint_key``) and, where step 1 folded the attention scale into q (head-dim
   pruning without rotary), scaled the same way; dropped layers are skipped and the remaining
   layers renumbered;
3. writes the pruned shards, a new ``model.safetensors.index.json`` and ``config.json``.

Peak memory is one tensor plus one output shard.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs.errors import InputError
from secateurs.graph.fx_apply import slice_tensor
from secateurs.passes.importance import ScoreContext
from secateurs.passes.plan import Plan

__all__ = ["prune_checkpoint", "meta_model", "CheckpointTensors", "checkpoint_score_context"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def meta_model(config: Any, model_cls: Any = None) -> torch.nn.Module:
    """An HF model on the ``meta`` device (no weights materialised)."""
    if model_cls is None:
        from transformers import AutoModelForCausalLM as model_cls  # noqa: N813
    with torch.device("meta"):
        if hasattr(model_cls, "from_config"):
            return model_cls.from_config(config).eval()
        return model_cls(config).eval()


class CheckpointTensors(Mapping):
    """The tensors of a safetensors checkpoint (a ``save_pretrained`` directory, sharded or
    not) by parameter name, each read from its shard when asked for (the last few are kept):
    magnitude scores for a plan made on ``meta`` stream the checkpoint tensor by tensor.
    ``aliases`` maps a model name to the name the checkpoint stores (tied weights)."""

    def __init__(self, path: str, aliases: Mapping[str, str] | None = None,
                 keep: int = 4) -> None:
        self.path = str(path)
        index = os.path.join(self.path, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                self.where: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(self.path, SINGLE)):
            with safe_open(os.path.join(self.path, SINGLE), "pt") as f:
                self.where = {k: SINGLE for k in f.keys()}
        else:
            raise InputError(f"{self.path} holds no {SINGLE} or {INDEX}")
        self.aliases = dict(aliases or {})
        self.keep = keep
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _key(self, name: str) -> str | None:
        if name in self.where:
            return name
        alias = self.aliases.get(name)
        return alias if alias in self.where else None

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._key(name)
        if key is None:
            return self._fused_experts(name)
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        with safe_open(os.path.join(self.path, self.where[key]), "pt") as f:
            t = f.get_tensor(key)
        self._recent[key] = t
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return t

    def _fused_experts(self, name: str) -> torch.Tensor:
        """A 3-D expert tensor the model fuses on load (``experts.gate_up_proj [E, 2I, H]``,
        ``experts.down_proj [E, H, I]``) from the checkpoint's per-expert tensors."""
        from secateurs.hf.moe import per_expert_keys

        per = per_expert_keys(name, self.where)
        if per is None:
            raise KeyError(name)
        return torch.stack([torch.cat([self[k] for k in keys], dim=0) for keys in per])

    def __iter__(self) -> Iterator[str]:
        return iter(set(self.where) | {a for a, k in self.aliases.items() if k in self.where})

    def __len__(self) -> int:
        return len(set(self))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None


def checkpoint_score_context(path: str, model: torch.nn.Module | None = None) -> ScoreContext:
    """A ``ScoreContext`` reading the checkpoint at ``path`` tensor by tensor, for
    ``prune_hf(meta_model, ..., importance="l2", score_context=...)``: the plan of a model
    larger than memory gets the magnitude scores of its real weights. ``model`` (the meta
    model) resolves tied names (``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
    aliases: dict[str, str] = {}
    if model is not None:
        by_id: dict[int, list[str]] = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + \
                list(model.named_buffers(remove_duplicate=False)):
            by_id.setdefault(id(t), []).append(name)
        for names in by_id.values():
            for n in names:
                for other in names:
                    if other != n:
                        aliases.setdefault(n, other)
    tensors = CheckpointTensors(path, aliases)
    if model is not None:
        for name, tied in list(aliases.items()):
            if tied not in tensors.where and name in tensors.where:
                aliases[tied] = name
    return ScoreContext(tensors)


def prune_checkpoint(src: str, dst: str, plan: Plan, model_cls: Any = None) -> dict[str, Any]:
    """Write the pruned checkpoint of ``src`` (a ``save_pretrained`` directory) to ``dst``."""
    from transformers import AutoConfig

    from secateurs.hf.apply import apply_hf_plan
    from secateurs.hf.layout import block_list

    os.makedirs(dst, exist_ok=True)
    config = AutoConfig.from_pretrained(src)
    model = meta_model(config, model_cls)
    # aliases: every name of a tied tensor maps to the name the plan uses
    canonical: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        alias[name] = canonical.setdefault(id(t), name)
    block_name, blocks = block_list(model)
    n_layers = len(blocks)
    drop = set(plan.meta.get("hf", {}).get("drop_layers", []))
    renumber = {}
    j = 0
    for i in range(n_layers):
        if i not in drop:
            renumber[i] = j
            j += 1
    layer_re = re.compile(rf"^{re.escape(block_name)}\.(\d+)\.(.*)$")
    changes = apply_hf_plan(model, plan)
    scaled = changes.get("scaled", {})
    model.config.save_pretrained(dst)
    if os.path.exists(os.path.join(src, INDEX)):
        with open(os.path.join(src, INDEX)) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
    else:
        with safe_open(os.path.join(src, SINGLE), "pt") as f:
            weight_map = {k: SINGLE for k in f.keys()}
    from secateurs.hf.moe import checkpoint_key

    moe_keys = {k: checkpoint_key(k, plan) for k in weight_map}
    seen = {alias.get(k, k) for k in weight_map} | {h[1] for h in moe_keys.values() if h}
    stored = set(model.state_dict())  # non-persistent buffers (inv_freq) are not saved
    missing = sorted(n for n in plan.removed if n not in seen and n in stored)
    if missing:
        raise InputError(f"the plan slices {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                         f"which the checkpoint {src} does not hold (was the plan made for "
                         "another model?)")
    new_map: dict[str, str] = {}
    total = 0
    for shard in sorted(set(weight_map.values())):
        out: dict[str, torch.Tensor] = {}
        with safe_open(os.path.join(src, shard), "pt") as f:
            for key in f.keys():
                hit = moe_keys.get(key)
                if hit is not None and hit[0] is None:
                    continue  # a removed expert
                name = key if hit is None else hit[0]
                m = layer_re.match(name)
                if m:
                    i = int(m.group(1))
                    if i in drop:
                        continue
                    name = f"{block_name}.{renumber[i]}.{m.group(2)}"
                t = f.get_tensor(key)
                dims = plan.removed.get(alias.get(key, key)) if hit is None else hit[2]
                if dims:
                    t = slice_tensor(t, dims, key).contiguous()
                factor = scaled.get(alias.get(key, key))
                if factor is not None:  # the attention scale folded into q (no rotary)
                    c, dim, stop = factor
                    t = t.clone()
                    t.narrow(dim, 0, t.shape[dim] if stop is None else stop).mul_(c)
                out[name] = t
                total += t.numel() * t.element_size()
        save_file(out, os.path.join(dst, shard), metadata={"format": "pt"})
        new_map.update({k: shard for k in out})
        del out
    from secateurs.runtime.io import atomic_write_text

    atomic_write_text(os.path.join(dst, INDEX),
                      json.dumps({"metadata": {"total_size": total}, "weight_map": new_map},
                                 indent=2))
    return {"config_changes": changes, "shards": len(set(new_map.values())),
            "tensors": len(new_map), "bytes": total}
