"""Apply a plan to a torch ``GraphModule`` (in place on the module it is given).

1. Slice every tensor the plan names (parameters keep ``requires_grad``; tied tensors are
   replaced everywhere they are referenced, so they stay one tensor).
2. Rewrite constants: module attributes (``in_channels``, ``num_features``, ``normalized_shape``,
   ``groups``...) and node arguments (view/reshape/expand sizes, split sizes — a ``chunk`` whose
   pieces became unequal turns into a ``split`` — slice bounds, the sdpa ``scale``).
3. Recompile the GraphModule.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from secateurs.errors import PlanError
from secateurs.graph.fx_fold import written_through
from secateurs.graph.fx_lower import _SIGS, _node_shape, call_key
from secateurs.graph.fx_modules import prune_multihead_attention
from secateurs.graph.fx_trace import _fetch_attr
from secateurs.graph.ir import is_take
from secateurs.passes.plan import Plan

__all__ = ["apply_plan_fx", "slice_tensors", "slice_tensor", "tensor_slots"]

_SHAPE_ARG_OPS = {"view", "reshape", "_unsafe_view", "expand", "broadcast_to"}
_FACTORY_OPS = {"zeros", "ones", "full", "new_zeros", "new_ones", "new_full"}


def tensor_slots(model: nn.Module) -> Iterator[tuple[dict[str, Any], str, torch.Tensor]]:
    """Every (``_parameters``/``_buffers`` dict, attribute, tensor) of ``model``'s modules; a
    tied tensor appears once per module that holds it."""
    for mod in model.modules():
        for slots in (mod._parameters, mod._buffers):
            for attr, t in slots.items():
                if t is not None:
                    yield slots, attr, t


def slice_tensor(t: torch.Tensor, dims: Mapping[int, Sequence[int]],
                 name: str = "tensor") -> torch.Tensor:
    """``t`` without the listed indices along each dim (a narrowed view on ``meta``)."""
    new = t.detach()
    for d, idx in sorted(dims.items()):
        gone = np.asarray(idx, dtype=np.int64)
        if d >= new.dim() or (len(gone) and gone.max() >= new.shape[d]):
            raise PlanError(f"plan removes index {gone.max()} of dim {d} of '{name}' with "
                            f"shape {tuple(t.shape)}; was the plan made for another model?")
        keep = np.ones(new.shape[d], dtype=bool)
        keep[gone] = False
        new = new.index_select(d, torch.from_numpy(np.nonzero(keep)[0]).to(new.device)) \
            if not new.is_meta else new.narrow(d, 0, int(keep.sum()))
    return new


def slice_tensors(root: nn.Module, removed: dict[str, dict[int, list[int]]]) -> None:
    """Replace each named tensor by its slice that keeps the non-removed indices (tied tensors
    stay one object; parameters keep ``requires_grad``)."""
    refs: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for slots, attr, t in tensor_slots(root):
        refs.setdefault(id(t), []).append((slots, attr))
    named = dict(root.named_parameters(remove_duplicate=False))
    named.update(root.named_buffers(remove_duplicate=False))
    for name, dims in removed.items():
        t = named.get(name)
        if t is None:
            raise PlanError(f"plan removes channels of '{name}', which the model does not have; "
                            "was the plan made for another model?")
        new = slice_tensor(t, dims, name)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        for slots, attr in refs.get(id(t), []):
            slots[attr] = new


def _set_arg(node: torch.fx.Node, key: str, name: str, value: Any) -> None:
    target = node.target
    if hasattr(target, "_schema"):
        names = ["input" if a.name == "self" else a.name
                 for a in target._schema.arguments]  # type: ignore[union-attr]
    else:
        names = list(_SIGS.get(key, ()))
    if name in names and names.index(name) < len(node.args):
        args = list(node.args)
        args[names.index(name)] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _reads_batch(node: torch.fx.Node, depth: int = 6) -> bool:
    """Whether a run-time size is computed from some tensor's dim-0 size (``x.shape[0]``,
    ``x.size(0)``, ``aten.sym_size.int(x, 0)``), through at most ``depth`` arithmetic steps."""
    if depth < 0 or not isinstance(node, torch.fx.Node):
        return False
    key = call_key(node) if node.op in ("call_function", "call_method") else ""
    if key in ("size", "sym_size") and len(node.args) > 1 and node.args[1] == 0:
        return True
    if key == "getitem" and len(node.args) > 1 and node.args[1] == 0 and \
            isinstance(node.args[0], torch.fx.Node) and (
                call_key(node.args[0]) == "size" if node.args[0].op == "call_method"
                else node.args[0].op == "call_function" and node.args[0].target is getattr):
        return True
    if key in ("mul", "floor_divide", "add", "sub", "div", "sym_float", "sym_int"):
        return any(_reads_batch(a, depth - 1) for a in node.args)
    return False


def _rewrite_shape(seq: Any, new: list[int], old: Any = None,
                   channels: Sequence[int] = (), infer: bool = True) -> Any:
    """Replace the integer sizes; a size computed at run time (``x.size(2)`` of another
    tensor, ``C // heads``) becomes the new constant where its dim shrank or is a channel dim
    (``channels``: its size may follow another tensor's pruned width even where this dim
    kept its own, e.g. ``view(B, T, heads, C // heads)`` with C pruned and head dims not).
    ``infer``: a view's one shrunk run-time size may be -1 (inferred); a factory's may not
    (``torch.ones(y.shape[1])``: -1 is no size)."""
    if isinstance(seq, torch.fx.Node):
        return _rewrite_shape_node(seq, new, old, channels)
    out = []
    shrunk: list[int] = []  # run-time sizes (no channel dim) whose dim shrank
    for i, v in enumerate(seq):
        changed = isinstance(old, tuple) and i < len(old) and old[i] != new[i]
        if i >= len(new):
            out.append(v)
        elif isinstance(v, int) and v != -1:
            out.append(new[i])
        elif isinstance(v, torch.fx.Node) and _reads_batch(v):
            # ``b * heads`` read from a dim 0 (the batch, or batch x windows): from a
            # batch-1 example the merge looks like a channel dim, yet it grows with the batch.
            # Where its dim shrank it is scaled at run time (``b * heads * new // old``: exact,
            # the size is the batch times the traced factor); a constant would hold at the
            # traced batch only, and next to a -1 it made a wrong view that still runs
            # (BART-era ``reshape(b * heads, -1, d)`` at another batch)
            if changed and isinstance(old[i], int) and old[i] > 0:
                out.append(_scaled(v, new[i], old[i]))
            else:
                out.append(v)
        elif isinstance(v, torch.fx.Node) and i in channels:
            out.append(new[i])
        elif isinstance(v, torch.fx.Node) and changed:
            out.append(new[i])
            shrunk.append(i)
        else:
            out.append(v)
    # such a size may fold the batch into the pruned dim (SAM's ``b * heads`` windows):
    # a constant holds at the traced batch only, -1 (inferred) at every batch
    if infer and len(shrunk) == 1 and not any(isinstance(v, int) and v == -1 for v in seq):
        out[shrunk[0]] = -1
    return type(seq)(out) if isinstance(seq, tuple) else out


def _scaled(size: torch.fx.Node, new: int, old: int) -> torch.fx.Node:
    """``size * new // old`` computed at run time, after ``size`` (trials erase the nodes)."""
    graph = size.graph
    with graph.inserting_after(size):
        times = graph.call_function(operator.mul, (size, new))
    with graph.inserting_after(times):
        return graph.call_function(operator.floordiv, (times, old))


def _is_shape_node(arg: Any) -> bool:
    """A node whose value is a whole shape: ``x.size()``, ``x.shape``, a slice of one, or a
    tuple sum with one (``x.size()[:-1] + (heads, d)``) — not a single run-time size."""
    if not isinstance(arg, torch.fx.Node) or arg.op not in ("call_function", "call_method"):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return len(arg.args) == 1 and not arg.kwargs
    if arg.target is getattr and len(arg.args) > 1:
        return arg.args[1] == "shape"
    if arg.target is operator.getitem and len(arg.args) > 1:
        return isinstance(arg.args[1], slice) and _is_shape_node(arg.args[0])
    if arg.target is operator.add and len(arg.args) == 2:
        return any(isinstance(v, (tuple, list)) or _is_shape_node(v) for v in arg.args)
    return False


def _rewrite_shape_node(seq: torch.fx.Node, new: list[int], old: Any,
                        channels: Sequence[int]) -> torch.fx.Node:
    """A shape computed as a whole. Read at run time (``broadcast_to(k, q.shape)``), it follows
    the pruned tensor it is read from. Built as a tuple sum (``x.size()[:-1] + (heads, d)``:
    BERT-era ``transpose_for_scores``, PVTv2), its literal part is rewritten: the run-time part
    follows its tensor. Either way the trial checks the result against the plan's shape."""
    if not (seq.op == "call_function" and seq.target is operator.add and len(seq.args) == 2):
        return seq
    a, b = seq.args
    n = len(new)
    if isinstance(a, torch.fx.Node) and isinstance(b, (tuple, list)) and 0 < len(b) <= n:
        k = n - len(b)  # the literal part is the last len(b) dims
        part = _rewrite_shape(list(b), new[k:], old[k:] if isinstance(old, tuple) else None,
                              [c - k for c in channels if c >= k])
        args: tuple[Any, Any] = (a, tuple(part))
    elif isinstance(b, torch.fx.Node) and isinstance(a, (tuple, list)) and 0 < len(a) <= n:
        part = _rewrite_shape(list(a), new[:len(a)],
                              old[:len(a)] if isinstance(old, tuple) else None,
                              [c for c in channels if c < len(a)])
        args = (tuple(part), b)
    else:
        return seq
    if args == tuple(seq.args):
        return seq
    with seq.graph.inserting_after(seq):  # a new sum: the traced one may have other readers
        return seq.graph.call_function(operator.add, args)


def _apply_node(gm: torch.fx.GraphModule, node: torch.fx.Node, consts: dict[str, Any]) -> None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.MultiheadAttention) and "num_heads" in consts:
            prune_multihead_attention(mod, consts["num_heads"], consts["head_dim"],
                                      consts["embed_dim"], consts["scale"])
            return
        for attr, value in consts.items():
            if attr == "normalized_shape" and hasattr(mod, attr):
                mod.normalized_shape = tuple(value)
            elif hasattr(mod, attr):
                setattr(mod, attr, value)
        if isinstance(mod, nn.RNNBase):
            mod._init_flat_weights()  # its cached weight list still holds the unsliced ones
        return
    key = call_key(node)
    if "shape" in consts and key in _SHAPE_ARG_OPS:
        new = consts["shape"]
        old = _node_shape(node)
        ch = consts.get("channel_dims", ())
        if node.op == "call_method" and not isinstance(node.args[1], (list, tuple)) \
                and not _is_shape_node(node.args[1]):
            node.args = (node.args[0], *_rewrite_shape(list(node.args[1:]), new, old, ch))
        else:
            node.args = (node.args[0], _rewrite_shape(node.args[1], new, old, ch),
                         *node.args[2:])
    elif "shape" in consts and key == "unflatten":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs["sizes"]
        # ``dim`` counts in the input, which has len(sizes) - 1 dims fewer than the output
        dim = int(dim) % (len(consts["shape"]) - len(sizes) + 1)
        end = dim + len(sizes)
        old = _node_shape(node)
        # a run-time size (``unflatten(-1, (3, E))`` with ``E`` read from the unpruned input
        # of a packed in-projection) is rewritten where it is a channel dim or its dim shrank,
        # as in a view's sizes
        _set_arg(node, key, "sizes", _rewrite_shape(
            sizes, consts["shape"][dim:end],
            old[dim:end] if isinstance(old, tuple) else None,
            [c - dim for c in consts.get("channel_dims", ()) if dim <= c < end]))
    elif "shape" in consts and key in _FACTORY_OPS:
        _apply_factory(node, key, consts["shape"])
    elif "sizes" in consts:
        _apply_split(node, key, consts["sizes"])
    elif "items" in consts:
        _apply_index(gm, node, key, consts["items"])
    if "scale" in consts and key == "scaled_dot_product_attention":
        node.kwargs = {**node.kwargs, "scale": consts["scale"]}
    if "repeats" in consts and key == "repeat_interleave":
        _set_arg(node, key, "repeats", consts["repeats"])
    if "groups" in consts and key.startswith("conv"):
        _set_arg(node, key, "groups", consts["groups"])
    if "normalized_shape" in consts and key in ("layer_norm", "rms_norm"):
        _set_arg(node, key, "normalized_shape", list(consts["normalized_shape"]))
    if "num_groups" in consts and key == "group_norm":
        _set_arg(node, key, "num_groups", consts["num_groups"])


def _apply_factory(node: torch.fx.Node, key: str, shape: list[int]) -> None:
    """``zeros``/``ones``/``full`` (or ``x.new_*``) at the pruned sizes: one sequence argument
    or one argument per size, from the first size argument on."""
    at = 1 if key.startswith("new_") else 0
    args = list(node.args)
    old = _node_shape(node)  # a run-time size (the batch) stays where its dim kept its size
    if len(args) > at and isinstance(args[at], (list, tuple)):
        args[at] = _rewrite_shape(args[at], shape, old, infer=False)
    elif key in ("full", "new_full"):
        return
    else:
        args[at:] = _rewrite_shape(args[at:], shape, old, infer=False)
    node.args = tuple(args)


def _apply_split(node: torch.fx.Node, key: str, sizes: list[int]) -> None:
    x = node.args[0]
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if key == "chunk" and len(set(sizes)) == 1:
        return
    if hasattr(node.target, "_schema"):
        node.target = torch.ops.aten.split_with_sizes.default
        node.args, node.kwargs = (x, list(sizes), dim), {}
    elif node.op == "call_method":
        node.target = "split"
        node.args, node.kwargs = (x, list(sizes)), {"dim": dim}
    else:
        node.target = torch.split
        node.args, node.kwargs = (x, list(sizes)), {"dim": dim}


def _index_constant(gm: torch.fx.GraphModule, node: torch.fx.Node,
                    old: torch.fx.Node, positions: tuple[int, ...]) -> torch.fx.Node:
    """A fresh constant holding the rewritten positions of a taken index (the traced one may
    be shared; it is left as it is)."""
    ref = old.args[0] if old.op == "call_function" and old.args else old
    dtype = getattr(_fetch_attr(gm, str(ref.target), missing_ok=True), "dtype", torch.int64)
    k = 0
    while hasattr(gm, f"_secateurs_index_{k}"):
        k += 1
    name = f"_secateurs_index_{k}"
    setattr(gm, name, torch.tensor(positions, dtype=dtype))
    with gm.graph.inserting_before(node):
        return gm.graph.get_attr(name)


def _apply_index(gm: torch.fx.GraphModule, node: torch.fx.Node, key: str,
                 items: list[Any]) -> None:
    if key == "index":  # aten.index.Tensor(x, [None, ..., idx]): one item per index entry
        entries = list(node.args[1])
        for i, it in enumerate(items[:len(entries)]):
            if is_take(it) and isinstance(entries[i], torch.fx.Node):
                entries[i] = _index_constant(gm, node, entries[i], it[1])
        node.args = (node.args[0], entries, *node.args[2:])
        return
    items = [list(it[1]) if is_take(it) else it for it in items]
    if key == "getitem":
        orig = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if Ellipsis in orig:  # the rule expanded the ellipsis: fold it back
            at = orig.index(Ellipsis)
            tail = len(orig) - at - 1
            items = list(items[:at]) + [Ellipsis] + (list(items[len(items) - tail:])
                                                    if tail else [])
        # a bound computed at run time (x.shape[-1] // 2) follows the pruned size by itself
        # an index tensor (the rule's "gather") stays the tensor it is
        items = [orig[i] if isinstance(n, str) and i < len(orig) else n
                 for i, n in enumerate(items)]
        items = [o if isinstance(o, slice) and any(isinstance(v, torch.fx.Node) for v in
                                                  (o.start, o.stop, o.step)) else n
                 for o, n in zip(orig, items)] if len(items) == len(orig) else items
        node.args = (node.args[0], tuple(items))
        return
    dim = next(i for i, it in enumerate(items) if not (isinstance(it, slice) and
                                                         it == slice(None)) or i == len(items) - 1)
    it = items[dim]
    if isinstance(it, int) and key == "select":
        _set_arg(node, key, "index", it)
        return
    if not isinstance(it, slice):
        return
    if key == "narrow":
        _set_arg(node, key, "start", it.start or 0)
        _set_arg(node, key, "length", it.stop - (it.start or 0))
    elif key == "slice":
        _set_arg(node, key, "start", it.start)
        _set_arg(node, key, "end", it.stop)


def apply_plan_fx(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """Apply ``plan`` to ``gm`` in place and return it."""
    slice_tensors(gm, plan.removed)
    by_name = {n.name: n for n in gm.graph.nodes}
    code_changed = False
    for name, consts in plan.constants.items():
        node = by_name.get(name)
        if node is None:
            raise PlanError(f"plan rewrites node '{name}', which the traced model does not have; "
                            "was the plan made for another model or torch version?")
        before = (node.target, node.args, node.kwargs)
        _apply_node(gm, node, consts)
        code_changed |= before != (node.target, node.args, node.kwargs)
    if plan.removed:
        code_changed |= _views_as_reshapes(gm)
    if code_changed:
        gm.recompile()
    return gm


def _views_as_reshapes(gm: torch.fx.GraphModule) -> bool:
    """``aten.view`` becomes ``aten.reshape`` (the same view wherever a view is possible, a copy
    elsewhere) unless something downstream writes through the alias. torch.export records a
    ``.contiguous()`` that was a no-op at trace time as nothing, so a graph is specialised to
    its traced strides: once a head dim shrinks, sdpa may pick another kernel (CPU flash
    attention needs equal q and v head dims) whose output ``transpose(1, 2)`` is no longer
    contiguous, and Llama's ``.transpose(1, 2).contiguous().view(B, T, -1)`` would fail in the
    pruned model only."""
    changed = False
    view = torch.ops.aten.view.default
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not view:
            continue
        if not written_through(node):
            node.target = torch.ops.aten.reshape.default
            changed = True
    return changed
