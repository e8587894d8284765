"""The channel rule table: how every canonical op maps channel positions.

ONE table, ``RULES``, keyed by canonical op name (the vocabulary frontends lower to). An entry
has a ``propagate`` function, which receives the label vectors of the node's inputs (one
``np.ndarray`` per dim, see ``labels.py``) and returns those of its outputs, recording
unifications, pins and lossy marks on the way; and optionally a ``rewrite`` function, which
computes the constants the node needs after pruning (new reshape sizes, split sizes, group
counts) from the labels it kept.

Families share helpers: ``_elementwise`` (numpy broadcasting), ``_norm`` (normalisation with
affine parameters), ``_conv``/``_linear`` (weights with groups), ``_concat``/``_split``/
``_index`` (offsets and slices fall out of slicing label vectors), ``_reshape`` (dims grouped by
equal products; a split dim is *factored* so heads and head dims become units), ``_permute``,
``_matmul`` (contraction), ``_reduce``.

An op with no entry is *blocking*: ``opaque`` pins every dim of every operand, with a reason
naming the op. Nothing is ever silently treated as elementwise.

Lossiness: removing a position is exact when the removed channel is dead (its slices zeroed) and
every op on the way maps zero to something the next parameter slice cancels. Ops that normalise
or reduce over a dim (LayerNorm, softmax, mean, GroupNorm within a group) or are singular at
zero (division, rsqrt) make removals along that dim lossy; they mark the dim, and the analysis
reports the group ``lossy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secateurs.graph.ir import Node, is_take, take
from secateurs.passes.labels import LabelSpace

__all__ = ["Rule", "RuleContext", "RULES", "rule_for", "UNARY_OPS", "ELEMENTWISE_OPS"]

Labels = list[np.ndarray]


@dataclass
class RuleContext:
    """What a rule sees: the node, its inputs' labels and shapes, its outputs' shapes."""

    node: Node
    ins: list[Labels | None]
    in_shapes: list[tuple[int, ...] | None]
    out_shapes: list[tuple[int, ...] | None]
    space: LabelSpace
    keep: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return self.node.describe()

    def fresh_dims(self, shape: tuple[int, ...], reason: str) -> Labels:
        return [self.space.fresh(s, pin=reason) for s in shape]

    def pin_all(self, labels: Labels | None, reason: str) -> None:
        for vec in labels or []:
            self.space.pin(vec, reason)


Count = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class Rule:
    propagate: Callable[[RuleContext], list[Labels | None]]
    rewrite: Callable[[Node, dict[str, Any], Count], dict[str, Any]] | None = None


RULES: dict[str, Rule] = {}


def _register(*ops: str, rewrite=None):
    def deco(fn):
        for op in ops:
            RULES[op] = Rule(fn, rewrite)
        return fn

    return deco


def rule_for(op: str) -> Rule:
    return RULES.get(op, RULES["opaque"])


# ---------------------------------------------------------------- blocking and sources


@_register("opaque")
def _opaque(ctx: RuleContext) -> list[Labels | None]:
    reason = f"no channel rule for {ctx.where}"
    if ctx.node.attrs.get("reason"):
        reason = f"{ctx.node.attrs['reason']} ({ctx.where})"
    for labels in ctx.ins:
        ctx.pin_all(labels, reason)
    return [None if s is None else ctx.fresh_dims(s, reason) for s in ctx.out_shapes]


def _source_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"shape": [count(v) for v in keep["out"]]}


@_register("source", rewrite=_source_rewrite)
def _source(ctx: RuleContext) -> list[Labels | None]:
    """A tensor created inside the graph (arange, zeros, constants): no channel is born.

    ``sized`` (``zeros``/``ones``/``full`` of explicit sizes that nothing writes into, such as
    a recurrence's initial state ``zeros(B, D, N)``): every position holds the same value, so
    its dims are free to follow whatever they meet and the apply rewrites the sizes. Other
    factories (``arange``, ``rand``, tensors) keep every position."""
    for labels in ctx.ins:
        ctx.pin_all(labels, f"consumed by tensor factory {ctx.where}")
    if ctx.node.attrs.get("sized") and len(ctx.out_shapes) == 1 \
            and ctx.out_shapes[0] is not None:
        out = [ctx.space.fresh(s) for s in ctx.out_shapes[0]]
        ctx.keep["out"] = out
        return [out]
    reason = (f"created by {ctx.where}: a tensor the forward makes whose values differ by "
              f"position (an arange, ALiBi slopes from the head count, a random or literal "
              f"tensor), so its positions stay")
    return [None if s is None else ctx.fresh_dims(s, reason) for s in ctx.out_shapes]


@_register("like")
def _like(ctx: RuleContext) -> list[Labels | None]:
    """``zeros_like(x)``, ``full_like(x, v)``...: a constant shaped like ``x`` at run time, so
    it has ``x``'s positions (a pruned ``x`` makes a pruned constant) and couples nothing.
    A removed position holds a constant instead of zero; every consumer that mixes positions
    without a parameter slice (reductions, softmax) marks that dim lossy by its own rule."""
    return [ctx.ins[0]]


# ---------------------------------------------------------------- elementwise families

UNARY_OPS = (
    "identity relu relu6 leaky_relu elu selu celu gelu silu mish sigmoid tanh hardswish "
    "hardsigmoid hardtanh softplus softsign dropout neg abs pow_scalar sqrt square exp sin cos "
    "erf clamp cast sign round floor ceil logsigmoid tanhshrink scalar_arith isnan isinf "
    "isfinite expm1 log1p"
).split()
SINGULAR_OPS = ("rsqrt", "reciprocal", "log")
ELEMENTWISE_OPS = ("add", "sub", "mul", "div", "maximum", "minimum", "pow", "where",
                   "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
                   "logical_or", "logical_not", "atan2", "fmod", "remainder")


@_register(*UNARY_OPS)
def _unary(ctx: RuleContext) -> list[Labels | None]:
    return [ctx.ins[0]]


@_register(*SINGULAR_OPS)
def _singular(ctx: RuleContext) -> list[Labels | None]:
    """Singular at zero: a removed (zeroed) unit would turn into inf/NaN, so every dim is lossy
    — unless the frontend proved the argument positive (``positive``: RMSNorm's
    ``rsqrt(mean(x**2) + eps)``; per head, as Qwen3/Gemma3 q/k norms do it, the reduced dim is
    lossy through the mean and the heads stay exact)."""
    if ctx.node.attrs.get("positive"):
        return [ctx.ins[0]]
    for vec, size in zip(ctx.ins[0] or [], ctx.in_shapes[0] or ()):
        if size > 1:
            ctx.space.mark_lossy(vec, f"{ctx.where} is singular at zero")
    return [ctx.ins[0]]


def _pin_broadcast(ctx: RuleContext, vec: np.ndarray, size: int) -> None:
    """A size-1 dim stretched to ``size``: its one position is not a channel of the result
    (FocalNet's ``gates[:, l:l+1]``, MobileViTv2's 1-channel query, a 1-channel spatial
    attention map) — removing it would leave an empty operand, so it stays."""
    ctx.space.pin(vec, f"size-1 dim broadcast against {size} in {ctx.where}")


def _broadcast_batch(ctx: RuleContext, vecs: list[tuple[Labels, tuple[int, ...]]],
                     out_shape: tuple[int, ...]) -> Labels:
    """numpy broadcasting over dims aligned from the right: every operand of the output's
    size on a dim unifies with the others; size-1 dims broadcast, carry nothing and stay
    (``_pin_broadcast``)."""
    out: Labels = []
    for d in range(len(out_shape)):
        back = len(out_shape) - d
        if out_shape[d] > 1:
            for lab, shp in vecs:
                if len(shp) >= back and shp[len(shp) - back] == 1:
                    _pin_broadcast(ctx, lab[len(lab) - back], out_shape[d])
        same = [lab[len(lab) - back] for lab, shp in vecs
                if len(shp) >= back and shp[len(shp) - back] == out_shape[d]]
        if not same:
            out.append(ctx.space.fresh(out_shape[d], pin=f"broadcast in {ctx.where}"))
            continue
        for other in same[1:]:
            ctx.space.unify(same[0], other)
        out.append(same[0])
    return out


@_register(*ELEMENTWISE_OPS)
def _elementwise(ctx: RuleContext) -> list[Labels | None]:
    """numpy broadcasting: dims aligned from the right; every operand of size > 1 on a dim
    unifies with the others; size-1 dims broadcast and carry nothing."""
    out_shape = ctx.out_shapes[0]
    assert out_shape is not None
    operands = [(lab, shp) for lab, shp in zip(ctx.ins, ctx.in_shapes)
                if lab is not None and shp is not None]
    out = _broadcast_batch(ctx, operands, out_shape)
    if ctx.node.op == "div" and len(ctx.ins) > 1 and ctx.ins[1] is not None \
            and not ctx.node.attrs.get("positive_divisor"):
        for vec, size in zip(ctx.ins[1], ctx.in_shapes[1] or ()):
            if size > 1:
                ctx.space.mark_lossy(vec, f"{ctx.where} divides by these channels")
    return [out]


# ---------------------------------------------------------------- weights


def _linear_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"in_features": count(keep["in"]), "out_features": count(keep["out"])}


@_register("linear", rewrite=_linear_rewrite)
def _linear(ctx: RuleContext) -> list[Labels | None]:
    """y = x Wᵀ + b: x[..., in] ~ W[:, in]; y[..., out] = W[out, :] ~ b."""
    x, w = ctx.ins[0], ctx.ins[1]
    assert x is not None and w is not None
    ctx.space.unify(x[-1], w[1])
    ctx.space.declare_root(w[0])
    ctx.keep["in"], ctx.keep["out"] = w[1], w[0]
    if len(ctx.ins) > 2 and ctx.ins[2] is not None:
        ctx.space.unify(w[0], ctx.ins[2][0])
    return [x[:-1] + [w[0]]]


def _conv_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    out = {"in_channels": count(keep["in"]), "out_channels": count(keep["out"])}
    out["groups"] = count(keep["groups"]) if "groups" in keep else 1
    return out


@_register("conv", rewrite=_conv_rewrite)
def _conv(ctx: RuleContext) -> list[Labels | None]:
    """Conv weight [K, C/g, *k] (transposed: [C, K/g, *k]). With g groups, input channels factor
    as (group, channel-in-group), output channels as (group, filter-in-group); the group factor
    is shared, so whole groups are units (depthwise: input channel c couples with its
    outputs), and channel-in-group positions are removed in every group at once."""
    x, w = ctx.ins[0], ctx.ins[1]
    assert x is not None and w is not None
    g = int(ctx.node.attrs.get("groups", 1))
    transposed = bool(ctx.node.attrs.get("transposed", False))
    sp = ctx.space
    for vec in w[2:]:
        sp.pin(vec, f"kernel window of {ctx.where}")
    x_c, w_in, w_out = x[1], (w[0] if transposed else w[1]), (w[1] if transposed else w[0])
    sp.declare_root(w_out)
    if g == 1:
        sp.unify(x_c, w_in)
        out_c = w_out
    else:
        grp, in_group = sp.factor(x_c, [g, len(x_c) // g])
        ctx.keep["groups"] = grp
        if transposed:
            sp.unify(w_in, x_c)
            out_c = sp.compose(grp, w_out)
        else:
            sp.unify(w_in, in_group)
            grp_w, _ = sp.factor(w_out, [g, len(w_out) // g])
            sp.unify(grp, grp_w)
            out_c = w_out
    if len(ctx.ins) > 2 and ctx.ins[2] is not None:
        sp.unify(out_c, ctx.ins[2][0])
    ctx.keep["in"], ctx.keep["out"] = x_c, out_c
    out_shape = ctx.out_shapes[0]
    assert out_shape is not None
    # a kernel window mixes neighbouring positions: the input's spatial dims stay whole too
    # (they are another op's output when a Linear's output is reshaped to a map: DCGAN's
    # Dense -> Reshape -> ConvTranspose)
    for vec in x[2:]:
        sp.pin(vec, f"spatial dim of {ctx.where}")
    spatial = [sp.fresh(s, pin=f"spatial dim of {ctx.where}") for s in out_shape[2:]]
    return [[x[0], out_c] + spatial]


def _channel_dim(ctx: RuleContext) -> int:
    shape = ctx.in_shapes[0] or ()
    return 1 if len(shape) >= 2 else 0


def _features_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"num_features": count(keep["c"])}


@_register("batch_norm", "instance_norm", rewrite=_features_rewrite)
def _batch_norm(ctx: RuleContext) -> list[Labels | None]:
    """Per-channel affine and statistics: every per-channel tensor follows the channel.

    With running statistics (BatchNorm in eval) that is all: a per-channel affine map. With
    statistics of the input itself (``batch_stats``: training mode, ``track_running_stats=False``,
    instance norm, and weight standardisation — ``batch_norm`` over ``w.reshape(1, K, -1)``,
    NF-Net/BiT) the mean and variance are taken over every other dim (instance norm: the dims
    after the channel), so removing a position of those dims changes them: lossy."""
    x, shape = ctx.ins[0], ctx.in_shapes[0] or ()
    assert x is not None
    cd = _channel_dim(ctx)
    c = x[cd]
    for p in ctx.ins[1:]:
        # per channel ([C]), or per position (``[C, H, W]``: ONNX's ``spatial=0``, opset < 9)
        for j, vec in enumerate(p or ()):
            ctx.space.unify(x[cd + j], vec)
    instance = ctx.node.op == "instance_norm"
    if ctx.node.attrs.get("batch_stats", instance):
        for d, (vec, size) in enumerate(zip(x, shape)):
            if d != cd and size > 1 and (d > cd or not instance):
                ctx.space.mark_lossy(vec, f"{ctx.where} normalises with statistics over "
                                          "this dim")
    ctx.keep["c"] = c
    return [x]


def _layer_norm_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"normalized_shape": [count(v) for v in keep["dims"]]}


@_register("layer_norm", "rms_norm", rewrite=_layer_norm_rewrite)
def _layer_norm(ctx: RuleContext) -> list[Labels | None]:
    """Normalises over the trailing ``ndim`` dims: their positions are lossy to remove."""
    x = ctx.ins[0]
    assert x is not None
    nd = int(ctx.node.attrs.get("ndim", 1))
    dims = x[len(x) - nd:]
    for p in ctx.ins[1:]:
        if p is None:
            continue
        for vec, pv in zip(dims, p):
            ctx.space.unify(vec, pv)
    for vec in dims:
        ctx.space.mark_lossy(vec, f"{ctx.where} normalises over this dim")
    ctx.keep["dims"] = dims
    return [x]


def _group_norm_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"num_groups": count(keep["groups"]), "num_channels": count(keep["c"])}


@_register("group_norm", rewrite=_group_norm_rewrite)
def _group_norm(ctx: RuleContext) -> list[Labels | None]:
    """Channels factor as (group, channel-in-group): removing whole groups is exact, removing a
    channel inside every group changes the group statistics (lossy)."""
    x = ctx.ins[0]
    assert x is not None
    g = int(ctx.node.attrs["num_groups"])
    c = x[1]
    grp, within = ctx.space.factor(c, [g, len(c) // g])
    if len(within) > 1:
        ctx.space.mark_lossy(within, f"{ctx.where} normalises within each group")
    for p in ctx.ins[1:]:
        if p is not None:
            ctx.space.unify(c, p[0])
    ctx.keep["groups"], ctx.keep["c"] = grp, c
    return [x]


def _embedding_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"embedding_dim": count(keep["d"])}


@_register("embedding", rewrite=_embedding_rewrite)
def _embedding(ctx: RuleContext) -> list[Labels | None]:
    idx, w = ctx.ins[0], ctx.ins[1]
    assert idx is not None and w is not None
    ctx.space.pin(w[0], f"vocabulary rows of {ctx.where} are addressed by index")
    ctx.space.declare_root(w[1])
    ctx.keep["d"] = w[1]
    return [idx + [w[1]]]


@_register("embedding_bag", rewrite=_embedding_rewrite)
def _embedding_bag(ctx: RuleContext) -> list[Labels | None]:
    """``EmbeddingBag``: rows looked up by index and reduced per bag (sum, mean or max, each
    channel on its own): the embedding dim passes to the output, rows and bags stay."""
    idx, w = ctx.ins[0], ctx.ins[1]
    assert idx is not None and w is not None
    ctx.pin_all(idx, f"indices of {ctx.where}")
    ctx.space.pin(w[0], f"vocabulary rows of {ctx.where} are addressed by index")
    ctx.space.declare_root(w[1])
    ctx.keep["d"] = w[1]
    out = ctx.out_shapes[0]
    assert out is not None
    return [[ctx.space.fresh(s, pin=f"bags of {ctx.where} (rows reduced by offsets)")
             for s in out[:-1]] + [w[1]]]


@_register("index_add")
def _index_add(ctx: RuleContext) -> list[Labels | None]:
    """``x.index_add(dim, index, src)`` / ``index_copy``: row ``i`` of ``src`` goes into row
    ``index[i]`` of ``x`` along ``dim`` (message passing's scatter-sum); which rows is data, so
    that dim stays in both; every other dim is position for position (as elementwise)."""
    x, idx, src = ctx.ins[0], ctx.ins[1], ctx.ins[2]
    assert x is not None and src is not None
    dim = int(ctx.node.attrs["dim"]) % len(x)
    if idx is not None:
        ctx.pin_all(idx, f"index of {ctx.where}")
    reason = f"{ctx.where} adds rows chosen at run time along this dim"
    ctx.space.pin(x[dim], reason)
    if len(src) == len(x):
        ctx.space.pin(src[dim], reason)
        for d in range(len(x)):
            if d != dim:
                ctx.space.unify(x[d], src[d])
    else:  # a 1-D index_add of scalars: nothing to couple
        ctx.pin_all(src, reason)
    return [list(x)]


# ---------------------------------------------------------------- layout


@_register("cat")
def _concat(ctx: RuleContext) -> list[Labels | None]:
    """Concatenation: the output dim is the inputs' label vectors end to end (concat offsets
    fall out); every other dim unifies across inputs. A 1-D empty operand is skipped, as
    ``torch.cat`` does (legacy: an empty cache ``torch.tensor([])`` joined with the first keys,
    T5's attention with ``use_cache=True``)."""
    nd = len(ctx.out_shapes[0] or ())
    ins = [(lab, shp) for lab, shp in zip(ctx.ins, ctx.in_shapes) if lab is not None and shp
           and not (nd > 1 and tuple(shp) == (0,))]
    dim = int(ctx.node.attrs["dim"]) % nd
    first = ins[0][0]
    for lab, _ in ins[1:]:
        for d in range(nd):
            if d != dim:
                ctx.space.unify(first[d], lab[d])
    out = list(first)
    for lab, _ in ins:
        ctx.space.note(lab[dim])  # copied into the output end to end
    out[dim] = np.concatenate([lab[dim] for lab, _ in ins])
    return [out]


def _split_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"sizes": [count(v) for v in keep["pieces"]]}


@_register("split", rewrite=_split_rewrite)
def _split(ctx: RuleContext) -> list[Labels | None]:
    x = ctx.ins[0]
    assert x is not None
    dim = int(ctx.node.attrs["dim"]) % len(x)
    outs: list[Labels | None] = []
    start = 0
    pieces = []
    for shape in ctx.out_shapes:
        if shape is None:
            outs.append(None)
            continue
        piece = x[dim][start:start + shape[dim]]
        start += shape[dim]
        if len(piece) == 1:  # removing it would empty an output (q, k, v = x.split(1, dim))
            ctx.space.pin(piece, f"{ctx.where} has a piece of size 1 along this dim: the "
                          "number of outputs depends on it")
        pieces.append(piece)
        lab = list(x)
        lab[dim] = piece
        outs.append(lab)
    ctx.keep["pieces"] = pieces
    return outs


@_register("unbind")
def _unbind(ctx: RuleContext) -> list[Labels | None]:
    """One output per position of ``dim``: the size sets the number of outputs (timm's fused
    ``q, k, v = qkv.unbind(0)``), so the dim is pinned; the other dims pass through."""
    x = ctx.ins[0]
    assert x is not None
    dim = int(ctx.node.attrs["dim"]) % len(x)
    ctx.space.pin(x[dim], f"{ctx.where} unbinds this dim: its size sets the number of outputs")
    return [x[:dim] + x[dim + 1:] for _ in ctx.out_shapes]


def _every_kth(ctx: RuleContext, vec: np.ndarray, it: slice) -> np.ndarray | None:
    """``x[..., o::k]`` over a whole dim of ``n = m * k`` positions reads inner position ``o``
    of the row-major factoring ``(m, k)``: the dim is factored and the slice's output is the
    outer factor, so removing an outer unit drops ``k`` consecutive positions of the input and
    one of the output, and ``start``/``step`` stay valid (interleaved rotary embeddings:
    ``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`` keeps pairs together and lets the
    heads around them prune). The inner factor is pinned: the step counts it. ``None`` (the
    caller pins the dim) for any other strided slice."""
    n, k = len(vec), int(it.step)
    start = 0 if it.start is None else int(it.start)
    if k <= 1 or n % k or n <= k or not 0 <= start < k or \
            (it.stop is not None and not int(it.stop) >= n):
        return None
    outer, inner = ctx.space.factor(vec, [n // k, k])
    ctx.space.pin(inner, f"the step of the strided slice in {ctx.where} counts these positions")
    return outer


def _bound(b: int | None, vec: np.ndarray, count: Count) -> int | None:
    """A slice bound (or constant index) counted over the surviving positions; a negative one
    stays negative (it counts from the end, so a run-time size there keeps working)."""
    if b is None or b >= 0:
        return None if b is None else count(vec[:b])
    tail = count(vec[b:])
    return -tail if tail else count(vec[:b])


def _index_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    items = []
    for it, vec in keep["items"]:
        if isinstance(it, slice) and vec is not None:
            items.append(slice(_bound(it.start, vec, count), _bound(it.stop, vec, count),
                               it.step))
        elif isinstance(it, int) and vec is not None:
            items.append(_bound(it, vec, count))
        elif is_take(it) and vec is not None:
            items.append(take(_bound(p, vec, count) for p in it[1]))
        else:
            items.append(it)
    return {"items": items}


@_register("index", rewrite=_index_rewrite)
def _index(ctx: RuleContext) -> list[Labels | None]:
    """Basic indexing: ``items`` holds one entry per indexed dim — a ``slice``, an ``int``
    (drops the dim), ``None`` (new size-1 dim), ``Ellipsis``, ``("take", positions)`` (a
    constant 1-D integer index: ``x[..., [-2], :]``), ``"gather"`` (an integer index tensor
    known only at run time, the node's next tensor operand) or ``"tensor"`` (any other
    advanced index, which pins everything). Slice bounds, constant indices and taken
    positions are rewritten to count only the surviving positions before them (after them,
    where they count from the end); the positions a constant index or a take addresses are
    pinned, the rest of their dim stays free (Falcon's ``qkv[..., :-2, :]``,
    ``qkv[..., [-2], :]``: the query head slots prune, the key and value slots stay).

    One index tensor (``table[index]``, ``biases[:, idx]``: relative-position and attention-bias
    tables) gathers along its dim like an embedding: that dim's rows are addressed by value and
    pinned, the index's own dims take its place in the output (its positions are positions of
    the result, never channels of their own) and the table's other dims pass through — so a
    bias table's head dim follows the heads it is added to."""
    x = ctx.ins[0]
    assert x is not None
    items = list(ctx.node.attrs["items"])
    gathers = list(ctx.ins[1:])
    takes = sum(1 for it in items if is_take(it))
    if items.count("gather") != len(gathers) or len(gathers) + takes > 1 or \
            ((gathers or takes) and "tensor" in items) or any(g is None for g in gathers):
        reason = f"advanced indexing in {ctx.where}"
        for vec in x:
            ctx.space.pin(vec, reason)
        for g in gathers:
            ctx.pin_all(g, f"index operand of {ctx.where}")
        shape = ctx.out_shapes[0]
        assert shape is not None
        return [ctx.fresh_dims(shape, reason)]
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(x) - n_real)
    items += [slice(None)] * (len(x) - sum(1 for it in items if it is not None))
    out: Labels = []
    kept: list[tuple[Any, np.ndarray | None]] = []
    d = 0
    for it in items:
        if it is None:
            out.append(ctx.space.fresh(1, pin=f"new axis in {ctx.where}"))
            kept.append((it, None))
            continue
        vec = x[d]
        d += 1
        kept.append((it, vec))
        if isinstance(it, slice):
            if it.step not in (None, 1):
                every = _every_kth(ctx, vec, it)
                if every is not None:
                    kept[-1] = (it, None)  # start, stop and step stay as they are
                    out.append(every)
                    continue
                ctx.space.pin(vec, f"strided slice in {ctx.where}")
            out.append(vec[it])
        elif isinstance(it, int):
            if not -len(vec) <= it < len(vec):
                out = []
                break
            at = it % len(vec)
            ctx.space.pin(vec[at:at + 1], f"constant index into this dim in {ctx.where}")
        elif is_take(it):
            if not all(-len(vec) <= p < len(vec) for p in it[1]):
                out = []
                break
            at = np.asarray([p % len(vec) for p in it[1]], dtype=np.int64)
            ctx.space.pin(vec[at], f"positions taken by a constant index in {ctx.where}")
            out.append(vec[at])
        elif it == "gather":
            ctx.space.pin(vec, f"rows of this dim are addressed by the index tensor of "
                          f"{ctx.where}")
            out.extend(gathers[0])
        else:
            out = []
            break
    shape = ctx.out_shapes[0]
    assert shape is not None
    if len(out) != len(shape) or any(len(v) != s for v, s in zip(out, shape)):
        for vec in x:
            ctx.space.pin(vec, f"advanced indexing in {ctx.where}")
        for g in gathers:
            ctx.pin_all(g, f"index operand of {ctx.where}")
        return [ctx.fresh_dims(shape, f"advanced indexing in {ctx.where}")]
    ctx.keep["items"] = kept
    return [out]


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source and destination dims with equal products (size-1 dims alone)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            raise ValueError(f"cannot reshape {src} to {dst}")
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= src[i]
                i += 1
            else:
                gj.append(j)
                pj *= dst[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _reshape_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"shape": [count(v) for v in keep["out"]]}


def common_refinement(src: list[int], dst: list[int]) -> list[int] | None:
    """Piece sizes of the coarsest row-major factoring that both ``src`` and ``dst`` (sizes of
    one run of :func:`reshape_groups`, equal products) are groupings of: the cumulative
    products of both sides, merged in order, where each divides the next. ``(B, E) ->
    (B * H, D)`` with ``E = H * D`` gives ``(B, H, D)``; ``None`` when the sides cut the run
    where no piece boundary can be (``(2, 3) -> (3, 2)``: positions really mix)."""
    bounds = sorted(set(math.prod(src[:k + 1]) for k in range(len(src))) |
                    set(math.prod(dst[:k + 1]) for k in range(len(dst))))
    pieces, prev = [], 1
    for b in bounds:
        if b % prev:
            return None
        if b > prev:
            pieces.append(b // prev)
        prev = b
    return pieces


def _split_pieces(sizes: list[int], pieces: list[int]) -> list[list[int]]:
    """For each dim of ``sizes``, the indices of the consecutive ``pieces`` it is made of (none
    for a size-1 dim)."""
    out, k = [], 0
    for size in sizes:
        mine, prod = [], 1
        while prod < size:
            mine.append(k)
            prod *= pieces[k]
            k += 1
        out.append(mine)
    return out


@_register("reshape", rewrite=_reshape_rewrite)
def _reshape(ctx: RuleContext) -> list[Labels | None]:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze.

    Dims pair in runs of equal products (:func:`reshape_groups`). A run is cut at the
    *common refinement* of its two sides (:func:`common_refinement`): every source dim is
    factored into its pieces (``factor``: fresh atoms whose composite is the dim) and every
    destination dim is the composite of its pieces. A merge is then the composite of the merged
    dims (flatten: linear expansion), a split makes each factor's positions units (heads and
    head dims), and a run of several dims into several, ``(L, B, E) -> (L, B * H, D)`` in
    ``F.multi_head_attention_forward``, makes the ``B * H`` positions (batch, head) pairs and
    ``D`` the head dim: composing the whole run first and factoring it into the destination
    sizes would tie ``B * H`` position ``i`` to batch ``i // H`` alone and every head's
    ``d``-th channel to one unit (heads merged; a later per-head reshape of the same channels
    then makes a composite contain itself, which pins it). Runs whose sides admit no common
    refinement (``(2, 3) -> (3, 2)``) compose and factor as a whole. A size-1 dim merged into
    others is no piece: it is pinned, as a size-1 dim squeezed away is."""
    x, src, dst = ctx.ins[0], ctx.in_shapes[0], ctx.out_shapes[0]
    assert x is not None and src is not None and dst is not None
    out: list[np.ndarray | None] = [None] * len(dst)
    for gi, gj in reshape_groups(tuple(src), tuple(dst)):
        if not gj:  # a size-1 dim squeezed away: removing its one position would empty it
            ctx.space.pin(x[gi[0]], f"size-1 dim squeezed by {ctx.where}")
            continue
        if not gi:
            out[gj[0]] = ctx.space.fresh(1, pin=f"new axis in {ctx.where}")
            continue
        for i in gi:  # a size-1 dim merged into others is no factor of the composite
            if len(gi) > 1 and src[i] == 1:
                ctx.space.pin(x[i], f"size-1 dim squeezed by {ctx.where}")
        if len(gj) == 1:
            out[gj[0]] = ctx.space.compose_all([x[i] for i in gi])
            continue
        src_sizes, dst_sizes = [src[i] for i in gi], [dst[j] for j in gj]
        pieces = common_refinement(src_sizes, dst_sizes)
        if pieces is None:
            flat = ctx.space.compose_all([x[i] for i in gi])
            for j, part in zip(gj, ctx.space.factor(flat, dst_sizes)):
                out[j] = part
            continue
        labels: list[np.ndarray] = []
        for i, mine in zip(gi, _split_pieces(src_sizes, pieces)):
            if mine:
                labels += ctx.space.factor(x[i], [pieces[k] for k in mine])
        for j, mine in zip(gj, _split_pieces(dst_sizes, pieces)):
            out[j] = ctx.space.compose_all([labels[k] for k in mine]) if mine else \
                ctx.space.fresh(1, pin=f"new axis in {ctx.where}")
    result = [v for v in out if v is not None]
    ctx.keep["out"] = result
    return [result]


@_register("permute")
def _permute(ctx: RuleContext) -> list[Labels | None]:
    x = ctx.ins[0]
    assert x is not None
    return [[x[p] for p in ctx.node.attrs["perm"]]]


@_register("roll")
def _roll(ctx: RuleContext) -> list[Labels | None]:
    """``roll`` moves positions along ``dims`` by a shift taken modulo the dim's size (Swin's
    cyclic shift of the spatial dims): a rolled dim's positions stay — removing one changes
    which positions wrap around — and the other dims, channels included, pass through. No
    ``dims`` rolls the flattened tensor: every dim stays."""
    x = ctx.ins[0]
    assert x is not None
    dims = ctx.node.attrs.get("dims")
    rolled = range(len(x)) if dims is None else {int(d) % len(x) for d in dims}
    what = "the flattened tensor" if dims is None else "this dim"
    for d in rolled:
        ctx.space.pin(x[d], f"{ctx.where} rolls {what}: positions move by a shift taken "
                            "modulo its size")
    return [list(x)]


@_register("pad")
def _pad(ctx: RuleContext) -> list[Labels | None]:
    """``pads`` holds one ``(before, after)`` per dim (None: computed at run time). An
    unpadded dim passes through (the channels of a spatial pad: Swin, timm's "same" conv
    padding). Constant padding is a concatenation with constant positions: the input's
    positions pass, the new ones stay (CIFAR ResNet's zero-padded channel shortcut). A dim
    padded by reflection, replication or wrap-around copies positions counted from its edges,
    one padded or cropped by an amount known only at run time or a negative one (a crop) has
    edges that move when positions go: those dims stay."""
    x, dst = ctx.ins[0], ctx.out_shapes[0]
    assert x is not None and dst is not None
    pads = list(ctx.node.attrs.get("pads") or [None] * len(x))
    mode = str(ctx.node.attrs.get("mode", "constant"))
    out: Labels = []
    for vec, pair, size in zip(x, pads + [None] * (len(x) - len(pads)), dst):
        if pair is not None and tuple(pair) == (0, 0):
            out.append(vec)
            continue
        if pair is None:
            reason = f"{ctx.where} pads this dim by an amount computed at run time"
        elif min(pair) < 0:
            reason = f"{ctx.where} crops this dim (negative padding {tuple(pair)})"
        elif mode != "constant":
            reason = (f"{ctx.where} pads this dim in {mode} mode: the new positions copy "
                      "positions counted from its edges")
        else:
            new = f"positions added by {ctx.where}"
            out.append(np.concatenate([ctx.space.fresh(int(pair[0]), pin=new), vec,
                                       ctx.space.fresh(int(pair[1]), pin=new)]))
            continue
        ctx.space.pin(vec, reason)
        out.append(ctx.space.fresh(size, pin=reason))
    if len(out) != len(dst) or any(len(v) != s for v, s in zip(out, dst)):
        ctx.pin_all(x, f"{ctx.where} whose output does not match its padding")
        return [ctx.fresh_dims(dst, f"output of {ctx.where}")]
    return [out]


def _expand_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"shape": [count(v) for v in keep["out"]]}


@_register("expand", rewrite=_expand_rewrite)
def _expand(ctx: RuleContext) -> list[Labels | None]:
    """Broadcast copies are equal, so removing some is exact if the expanded size is rewritten
    (``sized``: explicit sizes; sizes taken from another tensor, ``expand_as``, pin).

    Multi-query attention: ``repeat_kv`` (``k[:, :, None].expand(B, KV, n_rep, T, D)
    .reshape(B, KV * n_rep, T, D)``) makes q head ``(g, r)`` the composite of kv head ``g`` and
    repeat index ``r``. With one kv head the repeat index is the only way to remove q heads:
    a copy whose preceding dim is absent or of size 1 is a unit of its own, and removing q
    heads shrinks ``n_rep``. With several kv heads (GQA) the copies stay pinned and a kv head
    is the unit that takes its q heads (what the HF configs describe: ``num_key_value_groups``
    heads per kv head; the HF layer's reports count on it). ``repeat_interleave`` makes the
    copy index a unit in both cases."""
    x, src, dst = ctx.ins[0], ctx.in_shapes[0], ctx.out_shapes[0]
    assert x is not None and src is not None and dst is not None
    lead = len(dst) - len(src)
    sized = bool(ctx.node.attrs.get("sized"))
    for d, size in enumerate(src):
        if size == 1 and dst[lead + d] > 1:
            _pin_broadcast(ctx, x[d], dst[lead + d])
    out = []
    for d, size in enumerate(dst):
        if d >= lead and src[d - lead] == size:
            out.append(x[d - lead])
        elif sized and (d == 0 or dst[d - 1] == 1):
            out.append(ctx.space.fresh(size))
        elif sized:
            out.append(ctx.space.fresh(size, pin=(
                f"broadcast by {ctx.where}: copies following a dim of size {dst[d - 1]} stay "
                "(grouped-query attention's repeat index: a kv head is removed with all its "
                "q heads; `repeat_interleave` also removes q heads in every group)")))
        else:
            out.append(ctx.space.fresh(size, pin=f"broadcast by {ctx.where} to the size of "
                                                 "another tensor"))
    ctx.keep["out"] = out
    return [out]


@_register("repeat")
def _repeat(ctx: RuleContext) -> list[Labels | None]:
    """Tiling copies each position; copies share the label, so they go together."""
    x, src, dst = ctx.ins[0], ctx.in_shapes[0], ctx.out_shapes[0]
    assert x is not None and src is not None and dst is not None
    lead = len(dst) - len(src)
    out = [ctx.space.fresh(s, pin=f"new dim of {ctx.where}") for s in dst[:lead]]
    for d in range(len(src)):
        out.append(np.tile(x[d], dst[lead + d] // max(src[d], 1)))
    return [out]


# ---------------------------------------------------------------- contractions and reductions


@_register("matmul")
def _matmul(ctx: RuleContext) -> list[Labels | None]:
    """a[..., n, k] @ b[..., k, m]: the contraction dims unify; batch dims broadcast."""
    a, b = ctx.ins[0], ctx.ins[1]
    sa, sb = ctx.in_shapes[0], ctx.in_shapes[1]
    assert a is not None and b is not None and sa is not None and sb is not None
    if len(sa) == 1:
        ctx.space.unify(a[0], b[-2] if len(sb) > 1 else b[0])
        return [b[:-2] + [b[-1]] if len(sb) > 1 else []]
    if len(sb) == 1:
        ctx.space.unify(a[-1], b[0])
        return [a[:-1]]
    ctx.space.unify(a[-1], b[-2])
    out_shape = ctx.out_shapes[0]
    assert out_shape is not None
    batch = _broadcast_batch(ctx, [(a[:-2], sa[:-2]), (b[:-2], sb[:-2])], out_shape[:-2])
    return [batch + [a[-2], b[-1]]]


def einsum_terms(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]]:
    """Index keys of every operand dim and of the output for an einsum ``equation``: a letter,
    or ``...k`` for the k-th broadcast dim of an ellipsis (aligned from the right); without
    ``->`` the output is the letters used once, sorted (numpy's implicit mode)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    parts = lhs.split(",")
    if len(parts) != len(ranks):
        raise ValueError(f"einsum '{equation}' has {len(parts)} operands, got {len(ranks)}")
    n_ell = max((r - len(p.replace("...", "")) for p, r in zip(parts, ranks) if "..." in p),
                default=0)

    def expand(part: str, rank: int | None) -> list[str]:
        head, dots, tail = part.partition("...")
        if not dots:
            return list(part)
        k = (n_ell if rank is None else rank - len(head) - len(tail))
        return list(head) + [f"...{n_ell - k + j}" for j in range(k)] + list(tail)

    terms = [expand(p, r) for p, r in zip(parts, ranks)]
    if arrow:
        out = expand(rhs, None)
    else:
        letters = [c for p in parts for c in p.replace("...", "")]
        out = [f"...{j}" for j in range(n_ell)] + sorted(c for c in set(letters)
                                                          if letters.count(c) == 1)
    return terms, out


@_register("einsum")
def _einsum(ctx: RuleContext) -> list[Labels | None]:
    """Einstein summation (``attrs["equation"]``): each index is one dim, and every operand
    dim of an index unifies with the others — a contracted index is a matmul's ``k`` (a zero
    position adds nothing), a kept one carries its labels to the output (outer product
    ``i,j->ij``, batched matmul ``bhqd,bhkd->bhqk``). Size-1 dims broadcast and stay; an index
    repeated within one operand (a diagonal) pins its dims."""
    shapes = ctx.in_shapes
    if any(lab is None for lab in ctx.ins) or any(s is None for s in shapes):
        raise ValueError(f"{ctx.where}: einsum operands need labels and shapes")
    terms, out_terms = einsum_terms(str(ctx.node.attrs["equation"]),
                                    [len(s) for s in shapes])  # type: ignore[arg-type]
    members: dict[str, list[tuple[np.ndarray, int]]] = {}
    for lab, shp, term in zip(ctx.ins, shapes, terms):
        assert lab is not None and shp is not None
        for d, key in enumerate(term):
            if term.count(key) > 1:
                ctx.space.pin(lab[d], f"index '{key}' repeated within one operand of "
                                      f"{ctx.where} (a diagonal)")
            members.setdefault(key, []).append((lab[d], shp[d]))
    rep: dict[str, np.ndarray] = {}
    for key, vecs in members.items():
        size = max(s for _, s in vecs)
        full = [v for v, s in vecs if s == size]
        for v, s in vecs:
            if s == 1 and size > 1:
                _pin_broadcast(ctx, v, size)
        for other in full[1:]:
            ctx.space.unify(full[0], other)
        rep[key] = full[0]
    out_shape = ctx.out_shapes[0]
    assert out_shape is not None
    out = [rep[k] if k in rep else ctx.space.fresh(s, pin=f"new index in {ctx.where}")
           for k, s in zip(out_terms, out_shape)]
    if len(out) != len(out_shape) or any(len(v) != s for v, s in zip(out, out_shape)):
        for lab in ctx.ins:
            ctx.pin_all(lab, f"einsum {ctx.where} whose output does not match its indices")
        return [ctx.fresh_dims(out_shape, f"einsum output of {ctx.where}")]
    return [out]


@_register("outer")
def _outer(ctx: RuleContext) -> list[Labels | None]:
    a, b = ctx.ins[0], ctx.ins[1]
    assert a is not None and b is not None
    return [[a[0], b[0]]]


@_register("reduce")
def _reduce(ctx: RuleContext) -> list[Labels | None]:
    """mean/sum/max/var over ``dims``: positions along a reduced dim are lossy to remove."""
    x, shape = ctx.ins[0], ctx.in_shapes[0]
    assert x is not None and shape is not None
    nd = len(x)
    dims = ctx.node.attrs.get("dims")
    dims = set(range(nd)) if dims is None else {int(d) % nd for d in dims}
    keepdim = bool(ctx.node.attrs.get("keepdim", False))
    kind = ctx.node.attrs.get("kind", "reduce")
    out: Labels = []
    for d in range(nd):
        if d not in dims:
            out.append(x[d])
            continue
        if shape[d] > 1:
            ctx.space.mark_lossy(x[d], f"{ctx.where} takes the {kind} over this dim")
        if keepdim:
            out.append(ctx.space.fresh(1, pin=f"reduced by {ctx.where}"))
    return [out] + [out for _ in ctx.out_shapes[1:]]


@_register("cumulative")
def _cumulative(ctx: RuleContext) -> list[Labels | None]:
    """``cumsum``/``cumprod``/``cummax`` along ``dim``: every output position mixes the input
    positions up to it, so that dim is lossy (a removed position that is not zero in the
    masked model, or a zero in a product, reaches the later ones); the other dims, channels
    of a cumulative sum over tokens included, pass through."""
    x, shape = ctx.ins[0], ctx.in_shapes[0]
    assert x is not None and shape is not None
    d = int(ctx.node.attrs["dim"]) % len(x)
    if shape[d] > 1:
        ctx.space.mark_lossy(x[d], f"{ctx.where} accumulates along this dim")
    return [list(x)] + [list(x) for _ in ctx.out_shapes[1:]]


@_register("flip")
def _flip(ctx: RuleContext) -> list[Labels | None]:
    """``flip`` reverses the positions of ``dims``: the output's labels are the input's in
    reverse order there (a removed channel goes from both ends' view alike), the rest pass."""
    x = ctx.ins[0]
    assert x is not None
    dims = {int(d) % len(x) for d in ctx.node.attrs["dims"]}
    return [[vec[::-1].copy() if d in dims else vec for d, vec in enumerate(x)]]


@_register("weight_norm")
def _weight_norm(ctx: RuleContext) -> list[Labels | None]:
    """``torch._weight_norm(v, g, dim)`` (``nn.utils.weight_norm``: wav2vec2/HuBERT/WavLM's
    positional conv): ``v * g / ||v||`` with the norm over every dim but ``dim``. Each slice
    along ``dim`` scales by its own ``g``, so that dim unifies with ``g``'s; the others are
    normalised over, hence lossy. So is ``dim`` itself: a removed (zeroed) slice is ``0 / 0``,
    so the masked model the contract compares with is NaN there (the slicing itself is
    right; ``allow_lossy`` prunes it)."""
    v, g = ctx.ins[0], ctx.ins[1]
    assert v is not None
    dim = int(ctx.node.attrs.get("dim", 0)) % len(v)
    for d, labels in enumerate(v):
        if d != dim and len(labels) > 1:
            ctx.space.mark_lossy(labels, f"{ctx.where} normalises the weight over this dim")
        elif d == dim:
            ctx.space.mark_lossy(labels, f"{ctx.where} divides each slice of this dim by its "
                                         "own norm: a removed slice is 0 / 0")
    if g is not None and len(g) == len(v):
        ctx.space.unify(v[dim], g[dim])
    else:
        ctx.pin_all(g, f"gain of {ctx.where}")
    return [list(v)]


@_register("softmax", "local_response_norm")
def _softmax(ctx: RuleContext) -> list[Labels | None]:
    """Normalises over ``dim`` (softmax; LRN over a window of neighbouring channels, AlexNet /
    GoogLeNet): that dim is lossy to remove, every other dim passes."""
    x, shape = ctx.ins[0], ctx.in_shapes[0]
    assert x is not None and shape is not None
    dim = int(ctx.node.attrs["dim"]) % len(x)
    if shape[dim] > 1:
        ctx.space.mark_lossy(x[dim], f"{ctx.where} normalises over this dim")
    return [x]


@_register("pool")
def _pool(ctx: RuleContext) -> list[Labels | None]:
    """Pooling and interpolation act on the trailing ``spatial`` dims; channels pass. Every
    output position mixes input positions (a window, an interpolation, a global mean), so the
    input's spatial dims are pinned too: a conv's are already, a reshaped parameter's are not
    (DINOv2's position-embedding grid, bicubically resized to the input's grid)."""
    x = ctx.ins[0]
    out_shape = ctx.out_shapes[0]
    assert x is not None and out_shape is not None
    n = int(ctx.node.attrs.get("spatial", 2))
    reason = f"spatial dim of {ctx.where}"
    for labels in x[len(x) - n:]:
        ctx.space.pin(labels, reason)
    return [x[: len(x) - n] + [ctx.space.fresh(s, pin=reason) for s in out_shape[len(x) - n:]]]


@_register("grid_sample")
def _grid_sample(ctx: RuleContext) -> list[Labels | None]:
    """``grid_sample(x [N, C, *in], grid [N, *out, k])``: every channel is sampled at the same
    grid positions, so the channels pass; the batch unifies with the grid's, the input's
    spatial dims are pinned (positions addressed by coordinates) and the output's spatial dims
    are the grid's (deformable attention: RT-DETR, Deformable DETR, Mask2Former)."""
    x, grid = ctx.ins[0], ctx.ins[1]
    assert x is not None
    reason = f"sampled by coordinates in {ctx.where}"
    for labels in x[2:]:
        ctx.space.pin(labels, reason)
    out_shape = ctx.out_shapes[0]
    assert out_shape is not None
    if grid is None or len(grid) != len(x) or len(out_shape) != len(x):
        ctx.pin_all(grid, f"grid of {ctx.where}")
        return [x[:2] + [ctx.space.fresh(s, pin=reason) for s in out_shape[2:]]]
    ctx.space.unify(x[0], grid[0])
    ctx.space.pin(grid[-1], f"coordinates of the grid of {ctx.where}")
    return [[x[0], x[1], *grid[1:-1]]]


def _resize_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"shape": [count(v) for v in keep["out"]]}


@_register("resize", rewrite=_resize_rewrite)
def _resize(ctx: RuleContext) -> list[Labels | None]:
    """Interpolation: as pooling. The output shape is recorded for frontends that spell the
    target size as a whole shape, channels included (ONNX ``Resize`` ``sizes``, often
    ``Concat(Shape(x)[:2], hw)``), so the channel entry follows the pruned width."""
    out = _pool(ctx)
    ctx.keep["out"] = out[0]
    return out


def _keys_lossy(ctx: RuleContext, keys: np.ndarray, size: int) -> None:
    """The softmax inside attention normalises over the key positions: removing one (a
    learned token: a class, register or prompt token) changes every output."""
    if size > 1:
        ctx.space.mark_lossy(keys, f"the softmax of {ctx.where} normalises over the keys")


def _sdpa_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    e = keep["e"]
    if node.attrs.get("scale") is not None or count(e) == len(e):
        return {}
    return {"scale": 1.0 / math.sqrt(len(e))}


@_register("sdpa", rewrite=_sdpa_rewrite)
def _sdpa(ctx: RuleContext) -> list[Labels | None]:
    """softmax(q kᵀ · scale + mask) v: q and k contract over head dim E; k and v share the key
    axis; batch/head dims broadcast. The ``attn_mask`` broadcasts against the scores
    ``[..., L, S]``: a per-head mask (TinyViT's attention biases, BEiT's relative-position bias)
    has its head dim unified with the heads, so removing a head slices the mask's producer too.
    The default scale 1/sqrt(E) is made explicit when E shrinks. ``enable_gqa`` (fewer key/value
    heads than query heads) factors the query heads as (kv head, group member)."""
    q, k, v = ctx.ins[0], ctx.ins[1], ctx.ins[2]
    sq, sk, sv = ctx.in_shapes[0], ctx.in_shapes[1], ctx.in_shapes[2]
    assert q is not None and k is not None and v is not None
    assert sq is not None and sk is not None and sv is not None
    ctx.space.unify(q[-1], k[-1])
    ctx.space.unify(k[-2], v[-2])
    _keys_lossy(ctx, k[-2], sk[-2])
    out_shape = ctx.out_shapes[0]
    assert out_shape is not None
    mask = ctx.ins[3] if len(ctx.ins) > 3 else None
    sm = ctx.in_shapes[3] if len(ctx.in_shapes) > 3 else None
    gqa = bool(ctx.node.attrs.get("enable_gqa")) and len(sq) >= 3 and sk[:-1] == sv[:-1] \
        and sq[:-3] == sk[:-3] and 0 < sk[-3] != sq[-3] and sq[-3] % sk[-3] == 0
    # batch/head dims equal, or of size 1 and broadcast (multi-query: one key/value head)
    equal = all(len(sh) == len(out_shape) and all(a in (1, b) for a, b in
                                                  zip(sh[:-2], out_shape[:-2]))
                for sh in (sq, sk, sv)) and sk[:-2] == sv[:-2]
    if gqa:
        # enable_gqa: query head i reads key/value head i // (Hq / Hkv): the query heads
        # factor as (kv head, member of its group). Removing a kv head removes its group;
        # removing a member removes it from every group, so the groups stay equal.
        kv_heads, _members = ctx.space.factor(q[-3], [sk[-3], sq[-3] // sk[-3]])
        ctx.space.unify(kv_heads, k[-3])
        ctx.space.unify(k[-3], v[-3])
        batch = _broadcast_batch(ctx, [(q[:-3], sq[:-3]), (k[:-3], sk[:-3]),
                                       (v[:-3], sv[:-3])], out_shape[:-3]) + [q[-3]]
    elif equal:
        batch = _broadcast_batch(ctx, [(q[:-2], sq[:-2]), (k[:-2], sk[:-2]), (v[:-2], sv[:-2])],
                                 out_shape[:-2])
    if gqa or equal:
        scores = tuple(out_shape[:-2]) + (sq[-2], sk[-2])
        if mask is not None and sm is not None and len(sm) <= len(scores):
            _broadcast_batch(ctx, [(batch + [q[-2], k[-2]], scores), (mask, sm)], scores)
        else:
            ctx.pin_all(mask, f"attention mask of {ctx.where}")
    else:
        for lab in (q, k, v):
            ctx.pin_all(lab[:-2], f"unequal head counts in {ctx.where}")
        ctx.pin_all(mask, f"attention mask of {ctx.where}")
        batch = q[:-2]
    for extra in ctx.ins[4:]:
        ctx.pin_all(extra, f"extra operand of {ctx.where}")
    ctx.keep["e"] = q[-1]
    return [batch + [q[-2], v[-1]]]


def _mha_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    if "heads" not in keep:
        return {}
    return {"num_heads": count(keep["heads"]), "head_dim": count(keep["dim"]),
            "embed_dim": count(keep["in"]), "out_features": count(keep["out"]),
            "scale": 1.0 / math.sqrt(len(keep["dim"]))}


def _mha_pinned(ctx: RuleContext, reason: str) -> list[Labels | None]:
    for labels in ctx.ins:
        ctx.pin_all(labels, reason)
    return [None if s is None else ctx.fresh_dims(s, reason) for s in ctx.out_shapes]


@_register("mha", rewrite=_mha_rewrite)
def _mha(ctx: RuleContext) -> list[Labels | None]:
    """``nn.MultiheadAttention`` with a packed ``in_proj_weight [3E, E]``: operands query, key,
    value, key_padding_mask, attn_mask, then in_proj_weight, in_proj_bias, out_proj weight and
    bias (and the unpacked q/k/v weights, bias_k, bias_v, which pin). The packed rows factor as
    (3, heads, head_dim): q, k and v share one head count and one head dim (the module has one
    of each), the 3 stays; query, key and value widths are the weight's input dim; the output
    is ``out_proj``'s. Apply swaps in a module whose inner width is ``num_heads * head_dim``
    (torch's requires it to equal the query width) and keeps the original scale."""
    q, k, v, kpm, mask = (ctx.ins + [None] * 5)[:5]
    w, b, ow, ob, *unpacked = (ctx.ins[5:] + [None] * 9)[:9]
    if w is None or ow is None or any(u is not None for u in unpacked) or \
            ctx.node.attrs.get("add_zero_attn") or q is None or k is None or v is None:
        return _mha_pinned(ctx, f"{ctx.where}: separate q/k/v weights, bias_k/bias_v or "
                                "add_zero_attn are not rewritten; its heads and widths are kept")
    sp = ctx.space
    heads_n = int(ctx.node.attrs["num_heads"])
    inner = len(w[0]) // 3
    three, heads, dims = sp.factor(w[0], [3, heads_n, inner // heads_n])
    sp.pin(three, f"{ctx.where} packs q, k and v into in_proj_weight: the 3 stays")
    if b is not None:
        sp.unify(b[0], w[0])
    for x in (q, k, v):
        sp.unify(x[-1], w[1])
    if len(k) > 1:
        keys = k[-2] if ctx.node.attrs.get("batch_first") or len(k) == 2 else k[0]
        sp.unify(keys, v[-2] if ctx.node.attrs.get("batch_first") or len(v) == 2 else v[0])
        _keys_lossy(ctx, keys, len(keys))
    if len(q) == 3 and len(k) == 3 and len(v) == 3:
        bdim = 0 if ctx.node.attrs.get("batch_first") else 1
        sp.unify(q[bdim], k[bdim])
        sp.unify(q[bdim], v[bdim])
    sp.unify(ow[1], sp.compose(heads, dims))
    sp.declare_root(ow[0])
    if ob is not None:
        sp.unify(ob[0], ow[0])
    ctx.pin_all(kpm, f"key_padding_mask of {ctx.where}")
    if mask is not None and len(mask) == 3:  # (B * heads, L, S): batch and heads merged
        sp.pin(heads, f"{ctx.where} has a per-head attn_mask of shape (B * heads, L, S)")
    ctx.pin_all(mask, f"attn_mask of {ctx.where}")
    if ctx.node.attrs.get("weights_used"):
        sp.pin(heads, f"{ctx.where} returns attention weights (averaged over its heads)")
    ctx.keep.update({"heads": heads, "dim": dims, "in": w[1], "out": ow[0]})
    outs: list[Labels | None] = [q[:-1] + [ow[0]]]
    for shape in ctx.out_shapes[1:]:
        outs.append(None if shape is None else
                    ctx.fresh_dims(shape, f"attention weights of {ctx.where}"))
    return outs


def _ort_attention_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    if "heads" not in keep:
        return {}
    out: dict[str, Any] = {"num_heads": count(keep["heads"])}
    if count(keep["dim"]) != len(keep["dim"]):  # the default 1/sqrt(head_size) would move
        out["scale"] = float(node.attrs.get("scale") or 1.0 / math.sqrt(len(keep["dim"])))
    return out


@_register("ort_attention", rewrite=_ort_attention_rewrite)
def _ort_attention(ctx: RuleContext) -> list[Labels | None]:
    """ONNX Runtime's fused ``com.microsoft::Attention``: input ``[B, S, H_in]``, packed
    weights ``[H_in, 3 * H]`` whose columns factor as (q/k/v, heads, head_dim), bias
    ``[3 * H]``, output ``[B, S, H]``. q, k and v share one head count and one head dim (the
    op has one ``num_heads``); the 3 stays. A mask index passes; anything that carries heads
    of its own (past state, an attention bias) or unequal ``qkv_hidden_sizes`` keeps them."""
    x, w = ctx.ins[0], ctx.ins[1]
    b = ctx.ins[2] if len(ctx.ins) > 2 else None
    extra = [lab for lab in ctx.ins[4:] if lab is not None]
    attrs = ctx.node.attrs
    if x is None or w is None or len(x) != 3 or attrs.get("qkv_hidden_sizes") \
            or len(w[1]) % 3 or (len(w[1]) // 3) % int(attrs["num_heads"]):
        return _mha_pinned(ctx, f"{ctx.where}: unequal q/k/v widths or an unusual layout")
    sp = ctx.space
    heads_n = int(attrs["num_heads"])
    inner = len(w[1]) // 3
    three, heads, dims = sp.factor(w[1], [3, heads_n, inner // heads_n])
    sp.pin(three, f"{ctx.where} packs q, k and v into one weight: the 3 stays")
    if b is not None:
        sp.unify(b[0], w[1])
    sp.unify(x[-1], w[0])
    _keys_lossy(ctx, x[1], len(x[1]))  # self-attention: every token is a key
    ctx.pin_all(ctx.ins[3] if len(ctx.ins) > 3 else None, f"mask index of {ctx.where}")
    for lab in extra:
        ctx.pin_all(lab, f"past state / attention bias of {ctx.where}")
    if extra or len(ctx.out_shapes) > 1:
        sp.pin(heads, f"{ctx.where} reads or returns per-head state (past, present or an "
                      "attention bias): its heads are kept")
    if attrs.get("do_rotary"):
        sp.pin(dims, f"{ctx.where} rotates q and k inside (do_rotary): head dims pair up")
    ctx.keep.update({"heads": heads, "dim": dims})
    outs: list[Labels | None] = [list(x[:-1]) + [sp.compose(heads, dims)]]
    for shape in ctx.out_shapes[1:]:
        outs.append(None if shape is None else
                    ctx.fresh_dims(shape, f"present state of {ctx.where}"))
    return outs


@_register("ort_mha", rewrite=_ort_attention_rewrite)
def _ort_mha(ctx: RuleContext) -> list[Labels | None]:
    """ONNX Runtime's ``com.microsoft::MultiHeadAttention`` with separate 3-D query, key and
    value ``[B, S, D]``: each last dim factors as (heads, head dim), one head count for all
    three, q and k sharing the head dim; a packed bias ``[q | k | v]`` makes v share it too.
    A key padding mask passes; an attention bias, past or present state keeps the heads;
    packed or 4-D key/value layouts pin the node."""
    q, k, v = (list(ctx.ins) + [None] * 3)[:3]
    sq, sk, sv = (list(ctx.in_shapes) + [None] * 3)[:3]
    heads_n = int(ctx.node.attrs["num_heads"])
    bias = ctx.ins[3] if len(ctx.ins) > 3 else None
    if q is None or k is None or v is None or sq is None or sk is None or sv is None \
            or not (len(sq) == len(sk) == len(sv) == 3) or sq[-1] != sk[-1] \
            or sq[-1] % heads_n or sv[-1] % heads_n or (bias is not None and sq[-1] != sv[-1]):
        return _mha_pinned(ctx, f"{ctx.where}: packed or 4-D query/key/value layouts (or a "
                                "packed bias over unequal q/v widths) are not rewritten; its "
                                "heads and widths are kept")
    sp = ctx.space
    q_heads, q_dims = sp.factor(q[-1], [heads_n, sq[-1] // heads_n])
    k_heads, k_dims = sp.factor(k[-1], [heads_n, sk[-1] // heads_n])
    v_heads, v_dims = sp.factor(v[-1], [heads_n, sv[-1] // heads_n])
    sp.unify(q_heads, k_heads)
    sp.unify(q_heads, v_heads)
    sp.unify(q_dims, k_dims)
    sp.unify(k[-2], v[-2])
    _keys_lossy(ctx, k[-2], sk[-2])
    sp.unify(q[0], k[0])
    sp.unify(q[0], v[0])
    if bias is not None:
        three, b_heads, b_dims = sp.factor(bias[0], [3, heads_n, sq[-1] // heads_n])
        sp.pin(three, f"{ctx.where} packs the q, k and v biases: the 3 stays")
        sp.unify(b_heads, q_heads)
        sp.unify(b_dims, q_dims)
        sp.unify(v_dims, q_dims)
    ctx.pin_all(ctx.ins[4] if len(ctx.ins) > 4 else None, f"key padding mask of {ctx.where}")
    extra = [lab for lab in ctx.ins[5:] if lab is not None]
    for lab in extra:
        ctx.pin_all(lab, f"attention bias / past state of {ctx.where}")
    if extra or len(ctx.out_shapes) > 1:
        sp.pin(q_heads, f"{ctx.where} reads or returns per-head state (an attention bias, "
                        "past or present): its heads are kept")
    ctx.keep.update({"heads": q_heads, "dim": q_dims})
    outs: list[Labels | None] = [[q[0], q[1], sp.compose(q_heads, v_dims)]]
    for shape in ctx.out_shapes[1:]:
        outs.append(None if shape is None else
                    ctx.fresh_dims(shape, f"present state of {ctx.where}"))
    return outs


@_register("gather_nd")
def _gather_nd(ctx: RuleContext) -> list[Labels | None]:
    """ONNX ``GatherND``: the last dim of ``indices`` (size k) addresses data dims
    ``[b, b + k)`` after ``b`` batch dims; the data dims after those pass through. Addressed
    and batch dims are pinned (a removed position would move what an index means); the
    trailing ones keep their labels (dynamo writes fused-qkv slicing this way)."""
    data, indices = ctx.ins[0], ctx.ins[1]
    sd, si, out_shape = ctx.in_shapes[0], ctx.in_shapes[1], ctx.out_shapes[0]
    assert data is not None and sd is not None and out_shape is not None
    b = int(ctx.node.attrs.get("batch_dims", 0))
    if si is None or not si or b + si[-1] > len(sd):
        ctx.pin_all(data, f"data of {ctx.where}")
        return [ctx.fresh_dims(out_shape, f"output of {ctx.where}")]
    k = int(si[-1])
    for vec in data[:b + k]:
        ctx.space.pin(vec, f"dims addressed by the indices of {ctx.where}")
    ctx.pin_all(indices, f"indices of {ctx.where}")
    lead = ctx.fresh_dims(tuple(out_shape[:len(out_shape) - (len(sd) - b - k)]),
                          f"dims indexed by {ctx.where}")
    return [lead + list(data[b + k:])]


# ---------------------------------------------------------------- stacking, selection, experts


@_register("stack")
def _stack(ctx: RuleContext) -> list[Labels | None]:
    """``stack``: every input dim unifies across inputs (as ``cat``'s other dims); the new dim
    indexes the inputs and stays."""
    ins = [lab for lab in ctx.ins if lab is not None]
    out_shape = ctx.out_shapes[0]
    assert out_shape is not None and ins
    dim = int(ctx.node.attrs["dim"]) % len(out_shape)
    for lab in ins[1:]:
        for a, b in zip(ins[0], lab):
            ctx.space.unify(a, b)
    out = list(ins[0])
    out.insert(dim, ctx.space.fresh(out_shape[dim], pin=f"stacked inputs of {ctx.where}"))
    return [out]


@_register("size_value")
def _size_value(ctx: RuleContext) -> list[Labels | None]:
    """A run-time size of these dims is used as a value (``fx_lower.size_values``: an
    attention scale ``q.size(-1) ** -0.5``, a mean as ``x.sum() / x.numel()``): removing
    positions would change that value in the pruned model only, so the dims are pinned."""
    x = ctx.ins[0]
    assert x is not None
    for d, vec in enumerate(x):
        if d not in ctx.node.attrs["dims"]:
            ctx.space.note(vec)
    for d in ctx.node.attrs["dims"]:
        if d < len(x):
            ctx.space.pin(x[d], f"its run-time size ({ctx.where}) is used as a value by "
                          f"{ctx.node.attrs['reader']}, as in an attention scale "
                          "q.size(-1) ** -0.5: removing positions would change it")
    return []


@_register("complex_view")
def _complex_view(ctx: RuleContext) -> list[Labels | None]:
    """``view_as_complex`` (``to="complex"``): the last dim, of size 2, becomes the real and
    imaginary parts of one element and is pinned; the other dims pass. ``view_as_real`` adds
    such a dim back, pinned too. Meta's Llama rotary (``view_as_complex(x.reshape(..., -1,
    2)) * freqs_cis``, then ``view_as_real(...).flatten(3)``) thereby keeps each pair ``(2j,
    2j + 1)`` one unit, and the heads prune."""
    x = ctx.ins[0]
    assert x is not None
    reason = f"real and imaginary parts in {ctx.where}"
    if ctx.node.attrs["to"] == "complex":
        ctx.space.pin(x[-1], reason)
        return [list(x[:-1])]
    return [list(x) + [ctx.space.fresh(2, pin=reason)]]


def _repeat_interleave_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"repeats": count(keep["copy"])}


@_register("repeat_interleave", rewrite=_repeat_interleave_rewrite)
def _repeat_interleave(ctx: RuleContext) -> list[Labels | None]:
    """Each position ``i`` repeated ``repeats`` times in place: output position
    ``i * repeats + r`` is the composite (position, copy ``r``) — the row-major flattening, so
    removing a position removes its copies, and removing a copy index (copies are equal)
    removes one copy of every position and shrinks ``repeats``. Grouped-query attention by
    ``k.repeat_interleave(n_rep, dim=1)``: a kv head goes with its q heads, and q heads go
    uniformly in every kv group. A single copy stays (removing it would empty the output); a
    size-1 dim is broadcast, as ``expand`` does it: it stays and the copies are the units
    (multi-query attention)."""
    x = ctx.ins[0]
    assert x is not None
    dim = int(ctx.node.attrs["dim"]) % len(x)
    reps = int(ctx.node.attrs["repeats"])
    copy = ctx.space.fresh(reps, pin=None if reps > 1 else
                           f"single copy in {ctx.where}")
    out = list(x)
    if len(x[dim]) == 1:
        _pin_broadcast(ctx, x[dim], reps)
        out[dim] = copy
    else:
        out[dim] = ctx.space.compose(x[dim], copy)
    ctx.keep["copy"] = copy
    return [out]


def _rnn_rewrite(node: Node, keep: dict[str, Any], count: Count) -> dict[str, Any]:
    return {"input_size": count(keep["in"])}


@_register("rnn", rewrite=_rnn_rewrite)
def _rnn(ctx: RuleContext) -> list[Labels | None]:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and ONNX ``LSTM`` / ``GRU`` / ``RNN``: the input
    features are the columns of the first layer's input weights (torch ``weight_ih_l0`` and
    ``_reverse``, ``[gates·hidden, input]``; ONNX ``W``, ``[directions, gates·hidden, input]``),
    so removing an input channel slices them (and sets torch's ``input_size``): exact. The
    hidden state (gate rows, ``weight_hh`` / ONNX ``R``, biases, later layers, the outputs and
    the states) is recurrent and stays, pinned.

    Attrs, all optional (torch's defaults): ``input_dim``, the dim of an input weight that holds
    the input features (1; ONNX ``W``: 2); ``weights``, how many operands after ``x`` are input
    weights (all of them; ONNX: 1), the rest (ONNX ``R``, ``B``, ``sequence_lens``, initial
    states, peepholes) being recurrent state, pinned whole; ``sequence_output``, whether output
    0 keeps ``x``'s leading dims (True; ONNX ``Y`` has a directions dim: False);
    ``unfollowed``, why the input weights cannot be followed (ONNX ``W`` computed at run time):
    ``x``'s features and the weights are pinned then, never a free group."""
    a = ctx.node.attrs
    hidden = f"hidden state of {ctx.where} (recurrent: not pruned)"
    n = int(a.get("weights", len(ctx.ins) - 1))
    x, weights, state = ctx.ins[0], ctx.ins[1:1 + n], ctx.ins[1 + n:]
    for labels in state:
        ctx.pin_all(labels, hidden)
    if x is not None and len(x) >= 2:
        # every step's state depends on the steps before it: time steps stay whole (a
        # sequence reshaped from a Linear's output, Dense -> Reshape -> LSTM)
        seq = 1 if len(x) == 3 and (a.get("batch_first") or a.get("layout") == 1) else 0
        ctx.space.pin(x[seq], f"time steps of {ctx.where} (recurrent)")
        if not a.get("sequence_output", True):  # ONNX: Y has a directions dim
            for vec in x[:-1]:
                ctx.space.pin(vec, f"batch of {ctx.where} (its outputs add a directions dim)")
    unfollowed = a.get("unfollowed")
    if x is None or not weights or weights[0] is None:  # e.g. a PackedSequence input
        unfollowed = f"input of {ctx.where} is not a plain tensor"
    elif unfollowed:
        unfollowed = f"{unfollowed} ({ctx.where})"
    if unfollowed:
        if x is not None:
            ctx.space.pin(x[-1], unfollowed)
        for weight in weights:
            ctx.pin_all(weight, unfollowed)
        return [None if shape is None else ctx.fresh_dims(shape, hidden)
                for shape in ctx.out_shapes]
    assert x is not None
    dim = int(a.get("input_dim", 1))
    for weight in (v for v in weights if v is not None):
        ctx.space.unify(weight[dim], x[-1])
        for d, vec in enumerate(weight):
            if d != dim:
                ctx.space.pin(vec, hidden)
    ctx.keep["in"] = x[-1]
    outs: list[Labels | None] = []
    for k, shape in enumerate(ctx.out_shapes):
        if shape is None:
            outs.append(None)
        elif k == 0 and len(shape) == len(x) and a.get("sequence_output", True):
            outs.append(list(x[:-1]) + [ctx.space.fresh(shape[-1], pin=hidden)])
        else:
            outs.append(ctx.fresh_dims(shape, hidden))
    return outs


@_register("pixel_shuffle")
def _pixel_shuffle(ctx: RuleContext) -> list[Labels | None]:
    """``pixel_shuffle(x, r)`` / ONNX ``DepthToSpace``: the channel dim is ``(c, sub-pixel)``
    row-major (``order="crd"``; ONNX's default ``DCR`` is ``(sub-pixel, c)``), ``c`` becomes
    the output channel and the sub-pixel index moves into the (pinned) spatial dims; so a
    channel ``c`` of the output removes its ``r * r`` input channels. ``inverse``
    (``pixel_unshuffle`` / ``SpaceToDepth``): the output channel is the composite of the input
    channel and a pinned sub-pixel index."""
    x, out_shape = ctx.ins[0], ctx.out_shapes[0]
    assert x is not None and out_shape is not None
    r = int(ctx.node.attrs["factor"])
    c_first = ctx.node.attrs.get("order", "crd") == "crd"
    for vec in x[-2:]:  # every input position moves to another output position
        ctx.space.pin(vec, f"spatial dim of {ctx.where}")
    spatial = [ctx.space.fresh(s, pin=f"spatial dim of {ctx.where}") for s in out_shape[-2:]]
    sub_reason = f"sub-pixel position of {ctx.where}"
    if ctx.node.attrs.get("inverse"):
        sub = ctx.space.fresh(r * r, pin=sub_reason)
        channel = ctx.space.compose(x[-3], sub) if c_first else ctx.space.compose(sub, x[-3])
        return [list(x[:-3]) + [channel] + spatial]
    sizes = [out_shape[-3], r * r] if c_first else [r * r, out_shape[-3]]
    parts = ctx.space.factor(x[-3], sizes)
    channel, sub = (parts[0], parts[1]) if c_first else (parts[1], parts[0])
    ctx.space.pin(sub, sub_reason)
    return [list(x[:-3]) + [channel] + spatial]


@_register("windows")
def _windows(ctx: RuleContext) -> list[Labels | None]:
    """``Tensor.unfold(dim, size, step)``: ``dim`` becomes the window index and a new last dim
    the position inside a window (HaloNet's blocked keys/values over the spatial dims): both
    pinned, ``dim`` too (the windows overlap); every other dim, channels and heads included,
    passes through."""
    x, out_shape = ctx.ins[0], ctx.out_shapes[0]
    assert x is not None and out_shape is not None
    d = int(ctx.node.attrs["dim"]) % len(x)
    reason = f"windows of {ctx.where}"
    ctx.space.pin(x[d], reason)
    out = list(x)
    out[d] = ctx.space.fresh(out_shape[d], pin=reason)
    return [out + [ctx.space.fresh(out_shape[-1], pin=reason)]]


@_register("im2col")
def _im2col(ctx: RuleContext) -> list[Labels | None]:
    """``F.unfold`` / ``nn.Unfold`` (im2col): ``[B, C, *spatial] -> [B, C * K, L]`` with ``K``
    the kernel's positions, channel-major: an output column block is the composite (channel,
    kernel position), so removing a channel removes its ``K`` rows (VOLO's outlook attention
    over unfolded values); the kernel positions and the ``L`` window dim are pinned."""
    x, out_shape = ctx.ins[0], ctx.out_shapes[0]
    assert x is not None and out_shape is not None
    k = out_shape[-2] // max(len(x[1]), 1)
    reason = f"kernel window of {ctx.where}"
    for vec in x[2:]:
        ctx.space.pin(vec, reason)
    cols = ctx.space.compose(x[1], ctx.space.fresh(k, pin=reason))
    return [[x[0], cols, ctx.space.fresh(out_shape[-1], pin=f"windows of {ctx.where}")]]


@_register("col2im")
def _col2im(ctx: RuleContext) -> list[Labels | None]:
    """``F.fold`` / ``nn.Fold`` (col2im), the inverse: ``[B, C * K, L] -> [B, C, *spatial]``,
    the column dim factored as (channel, kernel position); the channel passes, the rest is
    pinned (overlapping windows are summed)."""
    x, out_shape = ctx.ins[0], ctx.out_shapes[0]
    assert x is not None and out_shape is not None
    c = out_shape[1]
    reason = f"kernel window of {ctx.where}"
    channel, kernel = ctx.space.factor(x[1], [c, len(x[1]) // max(c, 1)])
    ctx.space.pin(kernel, reason)
    ctx.space.pin(x[2], f"windows of {ctx.where}")
    return [[x[0], channel] + [ctx.space.fresh(s, pin=reason) for s in out_shape[2:]]]


@_register("gather")
def _gather(ctx: RuleContext) -> list[Labels | None]:
    """``out[..i..] = x[..index[..i..]..]`` along ``dim``: which positions of ``x`` are read is
    data, so that dim of ``x`` stays; the output's positions along it are the index's. On the
    other dims output, index and input are position for position (where the index covers the
    whole dim; a shorter index reads a prefix, which stays)."""
    x, idx = ctx.ins[0], ctx.ins[1]
    sx, si = ctx.in_shapes[0], ctx.in_shapes[1]
    assert x is not None and idx is not None and sx is not None and si is not None
    dim = int(ctx.node.attrs["dim"]) % len(x)
    ctx.space.pin(x[dim], f"{ctx.where} reads positions of this dim chosen at run time")
    out: Labels = []
    for d, (xv, iv) in enumerate(zip(x, idx)):
        if d == dim:
            out.append(iv)
        elif sx[d] == si[d]:
            ctx.space.unify(xv, iv)
            out.append(xv)
        else:
            ctx.space.pin(xv, f"{ctx.where} reads a prefix of this dim")
            out.append(iv)
    return [out]


@_register("select_along")
def _select_along(ctx: RuleContext) -> list[Labels | None]:
    """``topk``/``sort``/``argsort``: positions along ``dim`` are chosen (or ordered) by value,
    so removing one can change which are chosen; the other dims pass to values and indices."""
    x = ctx.ins[0]
    assert x is not None
    dim = int(ctx.node.attrs["dim"]) % len(x)
    reason = f"{ctx.where} chooses positions of this dim by value"
    ctx.space.pin(x[dim], reason)
    outs: list[Labels | None] = []
    for shape in ctx.out_shapes:
        if shape is None:
            outs.append(None)
            continue
        lab = list(x)
        lab[dim] = ctx.space.fresh(shape[dim], pin=reason)
        outs.append(lab)
    return outs


@_register("grouped_mm")
def _grouped_mm(ctx: RuleContext) -> list[Labels | None]:
    """Fused MoE ``_grouped_mm(x[T, K], w[E, K, N], offs)``: rows of ``x`` are routed to experts
    by ``offs``, so the expert dim stays; the kernel needs 16-byte aligned row strides, which an
    arbitrary pruned K or N breaks, so those stay too (a batched ``bmm`` over the same
    ``[E, K, N]`` weights prunes K and N: ``matmul``). ``aligned=False`` (transformers'
    ``grouped_mm_fallback``: one ``torch.mm`` per expert) prunes K and N."""
    x, w = ctx.ins[0], ctx.ins[1]
    assert x is not None and w is not None
    ctx.space.unify(x[-1], w[-2])
    ctx.space.pin(w[0], f"expert dim of {ctx.where} (rows routed by offsets)")
    if ctx.node.attrs.get("aligned", True):
        reason = f"{ctx.where} needs 16-byte aligned rows"
        ctx.space.pin(w[-2], reason)
        ctx.space.pin(w[-1], reason)
    return [x[:-1] + [w[-1]]]


_register("addcmul")(_elementwise)  # input + value * t1 * t2: broadcasting elementwise
# ``dst.copy_(src)`` (torch.export's form of ``out[:, t] = v`` on a view of ``out``): src
# broadcast into dst's positions, so their dims couple as an elementwise op's do; the view's
# own rule (select/slice) ties dst to the written tensor
_register("copy")(_elementwise)


@_register("addcdiv")
def _addcdiv(ctx: RuleContext) -> list[Labels | None]:
    """input + value * t1 / t2: elementwise; the divisor's channels are lossy (as ``div``)."""
    out = _elementwise(ctx)
    for vec, size in zip(ctx.ins[2] or [], ctx.in_shapes[2] or ()):
        if size > 1:
            ctx.space.mark_lossy(vec, f"{ctx.where} divides by these channels")
    return out
