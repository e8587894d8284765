"""Cost model: parameter counts and multiply-accumulates from the channel graph's shapes.

MACs are counted for the ops that dominate inference (conv, linear, matmul, einsum, attention);
elementwise ops and normalisations are ignored, as in the usual FLOP counters. The same
function counts before and after pruning by taking the shapes as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from secateurs.graph.ir import ChannelGraph, Node

__all__ = ["count_macs", "node_macs", "SizeRatios"]

Shape = tuple[int, ...]


def _prod(xs: Shape) -> int:
    return int(math.prod(xs)) if xs else 1


class SizeRatios:
    """``macs_kept``/``params_kept`` for any result with ``*_before``/``*_after`` counts."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    @property
    def macs_kept(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0


_MAC_OPS = frozenset({"conv", "linear", "matmul", "sdpa", "mha", "einsum", "ort_attention",
                      "ort_mha", "grouped_mm"})


def count_macs(graph: ChannelGraph, shape: Callable[[str], Shape | None]) -> int:
    return sum(node_macs(node, shape) for node in graph.nodes)


def node_macs(node: Node, shape: Callable[[str], Shape | None]) -> int:
    """One node's multiply-accumulates at the shapes ``shape`` gives (0 for a non-MAC op)."""
    if node.op not in _MAC_OPS:
        return 0
    ins = [None if i is None else shape(i) for i in node.inputs]
    out = shape(node.outputs[0]) if node.outputs else None
    if out is None:
        return 0
    if node.op == "conv" and ins[1] is not None:
        w = ins[1]
        if node.attrs.get("transposed"):
            return _prod(ins[0] or ()) * _prod(w[1:])
        return _prod(out) * _prod(w[1:])
    if node.op == "linear" and ins[1] is not None:
        return _prod(out) * ins[1][1]
    if node.op == "matmul" and ins[0] is not None:
        return _prod(out) * ins[0][-1]
    if node.op == "sdpa" and ins[0] is not None and ins[1] is not None:
        q, k = ins[0], ins[1]
        return _prod(q[:-1]) * k[-2] * q[-1] + _prod(out[:-1]) * k[-2] * out[-1]
    if node.op == "einsum" and len(ins) >= 2 and all(i is not None for i in ins):
        return _einsum_macs(str(node.attrs.get("equation", "")), ins)  # type: ignore[arg-type]
    if node.op == "grouped_mm" and ins[0] is not None and ins[1] is not None:
        return _prod(ins[0]) * ins[1][-1]  # x[T, K] rows, each through one expert's [K, N]
    if node.op == "ort_attention" and ins[0] is not None and ins[1] is not None:
        # com.microsoft::Attention: the packed q/k/v projection, then q.k^T and p.v over the
        # sequence (self-attention: keys are the input's tokens)
        x, w = ins[0], ins[1]
        v_width = out[-1]
        qk_width = (w[-1] - v_width) // 2
        tokens = x[-2] if len(x) >= 2 else 1
        return _prod(x) * w[-1] + _prod(x[:-1]) * tokens * (qk_width + v_width)
    if node.op == "ort_mha" and ins[0] is not None and len(ins) > 1 and ins[1] is not None:
        q, k = ins[0], ins[1]  # 3-D [B, S, D] (or 4-D [B, N, S_kv, H]) keys
        return _prod(q[:-1]) * k[-2] * (q[-1] + out[-1])
    if node.op == "mha" and ins[0] is not None:  # q, k, v, masks, in_proj, ..., out_proj
        q, k = ins[0], ins[1] or ins[0]
        w, ow = (ins + [None] * 8)[5], (ins + [None] * 8)[7]
        e_in = q[-1]
        inner = w[0] // 3 if w is not None else e_in
        e_out = ow[0] if ow is not None else e_in
        tq, tk = _prod(q[:-1]), _prod(k[:-1])
        seq = k[0] if len(k) < 3 else (k[1] if node.attrs.get("batch_first") else k[0])
        return (tq + 2 * tk) * inner * e_in + 2 * tq * seq * inner + tq * inner * e_out
    return 0


def _einsum_macs(equation: str, shapes: list[Shape]) -> int:
    """A contraction of two or more operands: one multiply-add per point of the full index
    space (output indices x contracted indices); broadcast size-1 dims count once."""
    from secateurs.passes.channel_rules import einsum_terms

    try:
        terms, _ = einsum_terms(equation, [len(s) for s in shapes])
    except ValueError:
        return 0
    sizes: dict[str, int] = {}
    for keys, shape in zip(terms, shapes):
        for key, size in zip(keys, shape):
            sizes[key] = max(sizes.get(key, 1), int(size))
    return math.prod(sizes.values())
