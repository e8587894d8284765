"""Kernel widths: a ``round_to`` per channel group, chosen for the runtime that will run the model.

``select_units`` rounds every plain channel group to one multiple (``round_to=16``). What a
width costs depends on the op that reads it, so :func:`ort_cpu_widths` picks a rule per group
from the ops its parameters feed, for ONNX Runtime's x86 CPU provider (MLAS). Measured on this
project's AVX-512 machine, ORT 1.32, 1 thread, single-op models timed interleaved
(``tools/bench/latency_efficiency.py``, its "micro" section; numbers from a quieter window
than the committed run's, load average ~1.9):

* **Conv** (NCHWc kernels, block 16 on AVX-512, 8 on AVX2): a width off the block costs what
  the next multiple of 16 costs (depthwise 3x3 at 56x56: 24 and 32 channels, 40 and 48, 56
  and 64 take the same time; 1x1 96->24 as long as 96->32), so conv groups keep a multiple of
  16. A conv group is also never narrowed below 32 channels (two blocks): a 16-wide NCHWc conv
  runs at ~60% of the MAC rate of a 32-wide one (1x1 96->16 vs 96->32 at 56x56: 39 vs 63
  GMAC/s; 16->96 vs 32->96: 50 vs 65), so halving a 32-channel group buys ~20% of its time
  for half its MACs, and a 24-channel group (off the block either way) stays whole.
* **Attention head dims** (the q/k/v/o positions of one head dim, in every head): a multiple
  of 16 (batched GEMMs over ``[heads, tokens, head_dim]`` lose ~7-10% of their MAC rate at
  head dims 40/45 against 48). **Heads** are not rounded: a head is a whole GEMM batch entry.
* **MatMul/Gemm only** (MLP hidden sizes, linear layers): MLAS SGEMM has no width preference
  (192->768 at 176, 184, 192, 200 input features: same MAC rate), so nothing here requires a
  multiple; they keep ``ORT_ROUND_TO`` (16) so the ONNX file keeps the widths other targets
  (AVX2 convs, GPU tensor cores) want.

An explicit integer ``round_to`` stays authoritative: the policy is used only when the caller
asks for it (``prune_onnx(round_to="auto")``, the default). The policy only changes how many
units each group keeps (never which positions a group couples), so every prune it shapes is as
mask-equivalent as any other selection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from secateurs.passes.group_channels import Analysis, ChannelGroup

__all__ = ["WidthRule", "KernelWidths", "ort_cpu_widths", "group_kind", "ORT_CPU_BLOCK",
           "ORT_CPU_MIN_CONV"]

ORT_CPU_BLOCK = 16  # MLAS NCHWc block on AVX-512 (a multiple of AVX2's 8)
ORT_CPU_MIN_CONV = 32  # two blocks: narrower NCHWc convs lose ~40% of their MAC rate


@dataclass(frozen=True)
class WidthRule:
    """Keep a multiple of ``multiple`` units, and at least ``minimum`` (capped by the group
    size: a group narrower than ``minimum`` stays whole). ``multiple=1, minimum=0``: as chosen.
    """

    multiple: int = 1
    minimum: int = 0

    def keep(self, size: int, keep: int) -> int:
        keep = max(keep, min(size, self.minimum))
        if self.multiple > 1 and size >= self.multiple:
            keep = max(self.multiple, int(math.ceil(keep / self.multiple)) * self.multiple)
        return min(size, keep)


@dataclass(frozen=True)
class KernelWidths:
    """A ``round_to`` policy: ``select_units`` calls it with a group and the number of units
    the ratio keeps, and keeps what it returns. ``kinds`` says why each group got its rule."""

    rules: Mapping[int, WidthRule]
    kinds: Mapping[int, str] = field(default_factory=dict)
    target: str = "ort-cpu"

    def __call__(self, group: ChannelGroup, keep: int) -> int:
        rule = self.rules.get(group.id)
        return keep if rule is None else rule.keep(group.size, keep)

    def summary(self) -> dict[str, int]:
        """How many groups got each kind of rule."""
        out: dict[str, int] = {}
        for kind in self.kinds.values():
            out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items()))


def _inner_repeat(group: ChannelGroup) -> bool | None:
    """For a group whose units repeat within a member (heads, head dims): ``True`` where
    neighbouring positions belong to different units (the inner, head-dim factor of a
    ``(heads, head_dim)`` split), ``False`` where runs of positions share a unit (heads);
    ``None`` for a plain group (one position per unit in every member)."""
    for m in group.members:
        if len(m.units) == len(np.unique(m.units)):
            continue
        units = m.units[np.argsort(m.positions, kind="stable")]
        return bool(units[0] != units[1])
    return None


def group_kind(analysis: Analysis, group: ChannelGroup) -> str:
    """What reads a group's channels: ``conv`` (any conv weight has the group on its in or out
    channels), ``head_dim``, ``heads``, ``dense`` (only linear/matmul/norm/other weights)."""
    inner = _inner_repeat(group)
    if inner is not None:
        return "head_dim" if inner else "heads"
    convs = _conv_weights(analysis)
    if any(m.param in convs and m.dim in (0, 1) for m in group.members):
        return "conv"
    return "dense"


def _conv_weights(analysis: Analysis) -> frozenset[str]:
    values = {v: p for p, v in analysis.param_values.items()}
    out = set()
    for node in analysis.graph.nodes:
        if node.op == "conv" and len(node.inputs) > 1 and node.inputs[1] in values:
            out.add(values[node.inputs[1]])
    return frozenset(out)


def ort_cpu_widths(analysis: Analysis, block: int = ORT_CPU_BLOCK,
                   min_conv: int = ORT_CPU_MIN_CONV) -> KernelWidths:
    """The ``round_to`` policy for ONNX Runtime's x86 CPU provider (see the module doc)."""
    convs = _conv_weights(analysis)
    rules: dict[int, WidthRule] = {}
    kinds: dict[int, str] = {}
    for g in analysis.groups:
        if g.size < 2:
            continue
        inner = _inner_repeat(g)
        if inner is True:
            kinds[g.id], rules[g.id] = "head_dim", WidthRule(block)
        elif inner is False:
            kinds[g.id] = "heads"
        elif any(m.param in convs and m.dim in (0, 1) for m in g.members):
            kinds[g.id], rules[g.id] = "conv", WidthRule(block, min_conv)
        else:
            kinds[g.id], rules[g.id] = "dense", WidthRule(block)
    return KernelWidths(rules, kinds)
