"""Name the units of a traced Hugging Face model from the structure of their groups.

The generic analysis (``secateurs.passes.group_channels``) finds every unit kind by itself;
this module only *names* them:

* ``heads``: a group whose units are contiguous blocks of a projection's output (q/k/v/o
  slices of one head; with GQA one unit is a kv head together with its group of q heads,
  because ``repeat_kv`` composes the q head index as ``kv_head × group``);
* ``head_dim``: units strided across heads (one dim in every head). q/k head dims and v head
  dims are separate groups (``qk`` contract, ``v`` flows to the output projection); rotary
  embeddings make ``d`` and ``d + D/2`` one unit through ``rotate_half``;
* ``mlp``: one position per unit (intermediate neurons: gate/up rows and down columns), also
  when gate and up are one fused projection (``gate_up_proj``: two positions per unit, one in
  each half, a stride of the intermediate size — not of a head size);
  In models without attention (ConvNeXt, ResNet) the convolution channels are ``mlp`` units;
* ``hidden``: the lossy group of the residual stream (embeddings, every norm, lm_head input).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from secateurs.hf.layout import head_dim as head_dim_of
from secateurs.hf.layout import hidden_size, no_cache, positional_inputs, unit_dims
from secateurs.hf.scale import channel_analysis
from secateurs.passes.group_channels import Analysis, ChannelGroup

__all__ = ["KINDS", "UnitGroup", "HFAnalysis", "analyze_hf", "unit_counts", "classify_group",
           "mla_modules"]

KINDS = ("heads", "head_dim", "mlp", "hidden")


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
    pinned: dict[int, UnitGroup] = field(default_factory=dict)  # fully pinned, named too
    reasons: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kind -> HF-layer pins

    def of_kind(self, kind: str) -> list[UnitGroup]:
        return [u for u in self.units.values() if u.kind == kind]


def classify_group(group: ChannelGroup, lin: dict[str, tuple[int, int]], hidden: int,
              head_dim: int) -> UnitGroup:
    outs = [m for m in group.members if m.param in lin and lin[m.param][0] == m.dim]
    ins = [m for m in group.members if m.param in lin and lin[m.param][1] == m.dim]
    feeds = bool(ins)
    if group.is_lossy and (group.size == hidden or not outs):
        return UnitGroup(group.id, "hidden" if group.size == hidden else "other", "",
                         group.size, 1)
    if not outs:
        return UnitGroup(group.id, "other", "", group.size, 1)
    # a fused gate_up projection holds two positions per MLP neuron (one in each half); the
    # down projection still reads one position per neuron, which no head-dim group does
    if all(len(m.positions) == group.size for m in outs) or (
            any(len(m.positions) == group.size for m in ins)
            and all(len(m.positions) % group.size == 0 for m in outs)):
        return UnitGroup(group.id, "mlp", "", group.size, 1)
    best = max(outs, key=lambda m: len(m.positions))
    per_unit = len(best.positions) // max(group.size, 1)
    first = int(best.units.min()) if len(best.units) else 0
    pos = np.sort(best.positions[best.units == first])
    runs = np.split(pos, np.nonzero(np.diff(pos) != 1)[0] + 1) if len(pos) else []
    # blocks of consecutive dims: heads, at least a head wide where the head dim is known (an
    # interleaved rotary pair, ``(2j, 2j + 1)`` in every head, is a run of two head dims)
    if max((len(r) for r in runs), default=0) > (head_dim - 1 if head_dim > 1 else 1):
        return UnitGroup(group.id, "heads", "", group.size, per_unit)
    # strided: one dim (or a rotary pair d, d + D/2) in every head; count the unit's dims
    # inside the head that holds its first position
    start = (int(pos[0]) // head_dim) * head_dim if head_dim else 0
    pair = int(((pos >= start) & (pos < start + max(head_dim, 1))).sum()) or 1
    return UnitGroup(group.id, "head_dim", "v" if feeds else "qk", group.size, pair)


def analyze_hf(model: nn.Module, example_inputs: Any, *,
               replicate: bool | None = None) -> HFAnalysis:
    """Trace ``model`` (through torch.export; weights may live on ``meta``) and name its units.

    ``replicate``: trace 3 layers and replicate their analysis to all layers
    (``secateurs.hf.scale``); default on for ``meta`` models with more than 3 layers. Models
    whose layers are not uniform are traced whole (the reason is logged)."""
    t0 = time.perf_counter()
    args = positional_inputs(model, example_inputs)
    with no_cache(model):
        analysis, how = channel_analysis(model, args, replicate)
    lin = unit_dims(model)
    hidden = hidden_size(model.config)
    hd = head_dim_of(model.config)
    units, pinned = {}, {}
    for g in analysis.groups:
        if g.prunable == 0 and g.pin_reasons and all(
                r.startswith(("graph input", "graph output")) for r in g.pin_reasons):
            continue  # vocabulary, image channels: the interface, not a unit kind
        if g.size > 1:
            (units if g.prunable > 0 else pinned)[g.id] = classify_group(g, lin, hidden, hd)
    reasons = _pin_mla(model, analysis, units, pinned)
    return HFAnalysis(analysis, units, how, time.perf_counter() - t0, pinned, reasons)


def mla_modules(model: nn.Module) -> list[str]:
    """Multi-head latent attention modules (DeepSeek-V2/V3 style: ``kv_lora_rank``)."""
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "kv_lora_rank", None), int)
            and hasattr(m, "kv_b_proj") and hasattr(m, "kv_a_proj_with_mqa")]


def _pin_mla(model: nn.Module, analysis: Analysis, units: dict[int, UnitGroup],
             pinned: dict[int, UnitGroup]) -> dict[str, tuple[str, ...]]:
    """MLA attention is left whole: its heads read one shared low-rank latent through
    ``kv_b_proj`` and a rotary key part shared by every head (``qk_rope_head_dim``), and its
    low-rank widths (``q_lora_rank``, ``kv_lora_rank``) are not MLP neurons. Groups with a
    tensor in an MLA module are named ``other`` (pinned); the report of heads/head_dim says
    why."""
    mla = mla_modules(model)
    if not mla:
        return {}
    prefixes = tuple(f"{n}." for n in mla)
    why = (f"multi-head latent attention ({mla[0]}{' +' + str(len(mla) - 1) if len(mla) > 1 else ''}"
           ", DeepSeek-V3 style: heads read one low-rank latent through kv_b_proj and share "
           "the rotary key part): attention is not pruned")
    for gid, u in list(units.items()):
        if any(m.param.startswith(prefixes) for m in analysis.groups[gid].members):
            del units[gid]
            pinned[gid] = UnitGroup(gid, "other", "mla", u.size, u.dims_per_unit)
    return {"heads": (why,), "head_dim": (why,)}


def unit_counts(hfa: HFAnalysis) -> dict[str, int]:
    """Number of groups and prunable units of every kind."""
    out: dict[str, int] = {}
    for u in hfa.units.values():
        key = u.kind if u.kind != "head_dim" else f"head_dim_{u.sub}"
        out[f"{key}_groups"] = out.get(f"{key}_groups", 0) + 1
        out[f"{key}_units"] = out.get(f"{key}_units", 0) + u.size
    return out

