"""A latency estimate, and pruning to a latency instead of a ratio.

A deployment engineer asks for a latency, not a ratio: ``prune_onnx(target_latency=0.4)``
(and ``prune``, ``secateurs prune/optimize --target-latency``) bisects the ratio until the
estimated latency of the pruned model is at most 40% of the dense model's
(:func:`ratio_for_latency`). The selection at that ratio is the ordinary one (same groups,
same kernel-width policy, same safety net), so the plan is as mask-equivalent as any other.

The estimate is :class:`OrtCpuCost`: seconds per channel-graph node from its MACs at a rate
per op kind, plus a cost per output element for the ops whose time follows activations
(elementwise, norms, softmax, copies); views and the activations ORT fuses into a conv are
free. Shapes after a removal come from the analysis (``Analysis.new_shape``), so every node,
whatever groups it touches, is costed at its pruned shape without applying the plan. Rates
are this project's measurements of ORT 1.32 on an AVX-512 CPU at 1 thread, per node under
ORT's profiler (``tools/bench/latency_efficiency.py``). Only ratios between kinds matter for
a fraction of the dense latency; ``tools/bench/latency_estimate.py`` measures how close the
estimated fraction comes to the measured one.

Tried and not kept: a knapsack that removes, step by step, the group step with the least
importance per estimated second saved (HALP, Shen et al., NeurIPS 2022). With per-group
normalised scores it emptied the high-resolution layers first; on the digits CNN at the same
estimated latency it kept 0.3-2.2 points less accuracy after the demo's fine-tune than the
uniform ratio, and on MobileNetV2 / ViT-S its speedup per MAC removed was lower (0.73-0.83
against 0.84-0.85).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from secateurs.graph.ir import Node
from secateurs.passes.cost import node_macs
from secateurs.passes.group_channels import Analysis

__all__ = ["OrtCpuCost", "ORT_CPU_COST", "LatencyModel", "ratio_for_latency", "latency_note"]

Shape = tuple[int, ...]

_VIEWS = frozenset({"reshape", "expand", "identity", "source", "flatten", "squeeze",
                    "unsqueeze", "dropout"})
_MOVES = frozenset({"permute", "cat", "index", "split", "pad", "repeat", "gather_nd",
                    "pixel_shuffle", "resize"})
_REDUCES = frozenset({"softmax", "layer_norm", "rms_norm", "group_norm", "instance_norm",
                      "batch_norm", "reduce", "pool"})
# what ORT fuses into the conv or GEMM that produced its input (Conv+Relu/Clip, NCHWc Sum)
# (a chain of them: Conv -> BatchNorm -> Add -> Relu is one NCHWc kernel)
_ACTIVATIONS = frozenset({"clamp", "relu", "relu6", "hardtanh", "leaky_relu", "sigmoid",
                          "tanh", "hardsigmoid"})
_FUSED_AFTER = {"conv": _ACTIVATIONS | {"batch_norm", "add"},
                "linear": _ACTIVATIONS}


@dataclass(frozen=True)
class OrtCpuCost:
    """Seconds per node on ONNX Runtime's x86 CPU provider (MLAS), 1 thread.

    * ``gemm_gmacs``: MatMul/Gemm with a weight (SGEMM: no width preference), at
      ``rows / (rows + gemm_rows)`` of it for few rows (a batch-1 classifier is a GEMV bound by
      reading its weight: ~7 GMAC/s);
    * ``attention_gmacs``: activation x activation matmuls (``q @ k^T``, ``p @ v``, sdpa);
    * ``conv_gmacs``: dense convs at wide channel counts; narrow ones run slower, at
      ``c / (c + conv_narrow)`` of it, ``c`` the narrower of the output channels per group and
      the reduction (input channels per group x kernel); MobileNetV2's 1x1 convs: 16 wide
      ~50 GMAC/s, 32: ~65, 96: ~80;
    * ``depthwise_gmacs``: depthwise convs (memory-bound: time follows activations);
    * ``*_ns``: per output element for elementwise ops, norms/softmax/pools, and copies
      (transposes, concat, split, slices); ``skip_norm_ns`` for an Add whose sum only a
      LayerNormalization reads, which ORT fuses into ``SkipLayerNormalization``: its CPU kernel
      (ORT 1.32, AVX-512) takes ~4.9 ns per element where Add + LayerNormalization unfused
      take ~0.7 (``disabled_optimizers=["SkipLayerNormFusion"]`` gets the difference back).
    """

    gemm_gmacs: float = 90.0
    gemm_rows: float = 8.0
    attention_gmacs: float = 50.0
    conv_gmacs: float = 85.0
    conv_narrow: float = 10.0
    depthwise_gmacs: float = 16.0
    elementwise_ns: float = 0.2
    reduce_ns: float = 0.5
    move_ns: float = 0.3
    skip_norm_ns: float = 4.9

    def seconds(self, node: Node, shape: Callable[[str], Shape | None],
                weight: Callable[[str | None], bool], producer: str | None) -> float:
        if node.op in _VIEWS or node.op in _FUSED_AFTER.get(producer or "", ()):
            return 0.0
        macs = node_macs(node, shape)
        if macs:
            return macs / (self._rate(node, shape, weight) * 1e9)
        out = shape(node.outputs[0]) if node.outputs else None
        if out is None:
            return 0.0
        per = (self.reduce_ns if node.op in _REDUCES else
               self.move_ns if node.op in _MOVES else self.elementwise_ns)
        return math.prod(out) * per * 1e-9

    def _rate(self, node: Node, shape: Callable[[str], Shape | None],
              weight: Callable[[str | None], bool]) -> float:
        if node.op == "conv":
            w = shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
            if w is None or len(w) < 2:
                return self.conv_gmacs
            if w[1] == 1 and int(node.attrs.get("groups", 1)) > 1:
                return self.depthwise_gmacs
            # the narrower of the output channels per group and the reduction (in x kernel)
            # (the groups attribute is the dense one: a pruned grouped conv may have fewer)
            narrow = max(1, min(w[0] // max(int(node.attrs.get("groups", 1)), 1),
                                math.prod(w[1:])))
            return self.conv_gmacs * narrow / (narrow + self.conv_narrow)
        if node.op in ("linear", "einsum") or (
                node.op == "matmul" and any(weight(i) for i in node.inputs[:2])):
            out = shape(node.outputs[0]) if node.outputs else None
            rows = max(1, math.prod(out[:-1])) if out else 1  # batch 1: a GEMV, weight-bound
            return self.gemm_gmacs * rows / (rows + self.gemm_rows)
        return self.attention_gmacs


ORT_CPU_COST = OrtCpuCost()


class LatencyModel:
    """Estimated seconds of an analysis' graph, node by node, at its dense shapes or at the
    shapes a removal (a mask over the analysis' atoms) leaves."""

    def __init__(self, analysis: Analysis, cost: OrtCpuCost = ORT_CPU_COST):
        self.analysis = analysis
        self.cost = cost
        graph = analysis.graph
        self._weights = {v.name for v in graph.values.values() if v.param is not None}
        # per value, the op whose kernel computes it: a fused op's output is its producer's
        self._producer: dict[str, str] = {}
        for node in graph.nodes:
            src = self._producer.get(node.inputs[0]) if node.inputs and node.inputs[0] else None
            kernel = src if src is not None and node.op in _FUSED_AFTER.get(src, ()) \
                else node.op
            for out in node.outputs:
                self._producer[out] = kernel
        self._nodes = list(graph.nodes)
        self._dense: float | None = None
        # Add -> LayerNormalization, the sum read by the norm alone: ORT's SkipLayerNormFusion
        # makes them one SkipLayerNormalization (post-norm transformers: BERT, MiniLM)
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(self._nodes):
            for v in node.inputs:
                if v is not None:
                    readers.setdefault(v, []).append(i)
        self._skip_norm: dict[int, str] = {}
        for i, node in enumerate(self._nodes):
            if node.op != "add" or len(node.outputs) != 1:
                continue
            users = readers.get(node.outputs[0], [])
            if len(users) == 1 and self._nodes[users[0]].op == "layer_norm" \
                    and self._nodes[users[0]].inputs[0] == node.outputs[0]:
                self._skip_norm[i], self._skip_norm[users[0]] = "add", "norm"

    @classmethod
    def of(cls, analysis: Analysis, cost: OrtCpuCost = ORT_CPU_COST) -> LatencyModel:
        """The analysis' model for ``cost``, built once (its dense estimate with it)."""
        key = ("latency", cost)
        if key not in analysis.memo:
            analysis.memo[key] = cls(analysis, cost)
        return analysis.memo[key]

    def _shape_fn(self, removed: np.ndarray | None) -> Callable[[str], Shape | None]:
        analysis, values = self.analysis, self.analysis.graph.values

        def shape(v: str) -> Shape | None:
            if removed is not None and v in analysis.labels:
                return analysis.new_shape(v, removed)
            return values[v].shape if v in values else None

        return shape

    def node_seconds(self, index: int, removed: np.ndarray | None) -> float:
        node = self._nodes[index]
        shape = self._shape_fn(removed)
        skip = self._skip_norm.get(index)
        if skip == "add":
            return 0.0  # inside the SkipLayerNormalization
        if skip == "norm":
            out = shape(node.outputs[0])
            return 0.0 if out is None else math.prod(out) * self.cost.skip_norm_ns * 1e-9
        producer = self._producer.get(node.inputs[0]) if node.inputs and node.inputs[0] else None
        return self.cost.seconds(node, shape, lambda v: v is not None and v in self._weights,
                                 producer)

    def seconds(self, removed: np.ndarray | None = None) -> float:
        return sum(self.node_seconds(i, removed) for i in range(len(self._nodes)))

    def kept(self, removed_units: Mapping[int, np.ndarray]) -> float:
        """The fraction of the dense estimate a selection keeps."""
        if self._dense is None:
            self._dense = self.seconds()
        if self._dense <= 0.0:
            return 1.0
        return self.seconds(self.analysis.removed_atoms(dict(removed_units))) / self._dense


def ratio_for_latency(analysis: Analysis,
                      select: Callable[[float, Mapping[int, float]], dict[int, np.ndarray]],
                      target: float, spaces: Sequence[Sequence[int]] = (),
                      cost: OrtCpuCost = ORT_CPU_COST, max_ratio: float = 0.95,
                      iterations: int = 10) -> tuple[float, dict[int, np.ndarray], float]:
    """The selection that keeps at most ``target`` of the dense model's estimated latency at
    the smallest ratio. ``select(ratio, overrides)`` selects at ``ratio``, with a ratio of
    their own for the group ids in ``overrides``. Returns the ratio, the selection and the
    fraction of the estimated latency it keeps; where even ``max_ratio`` keeps more, that one.

    Bisection over the ratio (the estimate falls with it) brackets the target between two
    ratios a hair apart; with every group rounded to a kernel width, the latency can still
    jump across the target between them (many groups cross a multiple of 16 at once). Then the
    groups that differ move, largest first, from the lower ratio to the upper one, and the
    shortest such prefix of moves that meets the target is taken (found by bisection): every
    group keeps one of the two widths, so the prune stays as uniform as the ratio's.
    ``spaces``: groups that move together (the factors of one channel space, heads x head
    dim)."""
    kept = LatencyModel.of(analysis, cost).kept
    lo, hi = 0.0, max_ratio
    top = select(hi, {})
    best = (hi, top, kept(top))
    if best[2] > target:
        return best
    low = select(lo, {})
    if kept(low) <= target:
        return lo, low, kept(low)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        removed = select(mid, {})
        fraction = kept(removed)
        if fraction <= target:
            best, hi = (mid, removed, fraction), mid
        else:
            lo, low = mid, removed
    upper = best[1]
    differ = {gid for gid in set(low) | set(upper)
              if len(low.get(gid, ())) != len(upper.get(gid, ()))}
    together = {gid: tuple(sp) for sp in spaces for gid in sp}
    moves: list[tuple[int, ...]] = []
    for gid in sorted(differ, key=lambda g: (-analysis.groups[g].size, g)):
        move = together.get(gid, (gid,))
        if move not in moves:
            moves.append(move)
    # moving more groups only removes more: the shortest prefix of moves that meets the
    # target, by bisection over its length (all of them is the upper ratio, which meets it)
    short, enough = 0, len(moves)
    while enough - short > 1:
        mid = (short + enough) // 2
        removed = select(lo, {gid: hi for move in moves[:mid] for gid in move})
        fraction = kept(removed)
        if fraction <= target:
            best, enough = (lo, removed, fraction), mid
        else:
            short = mid
    return best


def latency_note(analysis: Analysis, removed: Mapping[int, np.ndarray], target: float) -> str:
    """What a ``target_latency`` prune reached, for the report."""
    kept = LatencyModel.of(analysis).kept(removed)
    short = "" if kept <= target + 1e-9 else (
        " (the nearest the groups allow: the rest is pinned, ignored or at its width floor)")
    return (f"target_latency {target:g}: the pruned model keeps an estimated {kept:.3f} of the "
            f"dense model's ONNX Runtime CPU latency{short} (secateurs bench measures it)")
