"""torch frontend, lowering: every FX node becomes zero or more canonical channel-graph nodes.

Functions, methods and ATen ops are keyed by one name (``conv2d``, ``view``, ``add``...) in
``_CALLS``; ``nn`` leaf modules by type (``_module_lowering``). This file is the one home of an
op's FX lowering; its channel semantics live in ``passes/channel_rules.py`` and its shape
formula (if any) in ``graph/fx_shapes.py``. Parameters and buffers become values named by their
qualified name, so plans are keyed by ``named_parameters()``/``named_buffers()`` names.
Anything unknown lowers to ``opaque``, which pins what touches it.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Container
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.passes.shape_prop import TensorMetadata

from secateurs.errors import TraceError
from secateurs.graph.fx_trace import _fetch_attr
from secateurs.graph.ir import ChannelGraph, Node, Value, is_trace_constant, take

log = logging.getLogger(__name__)

__all__ = ["lower_graph_module", "call_key"]

# ---------------------------------------------------------------- shapes as recorded by fx_shapes

_SHAPE_KEY = "secateurs_val"

def _shape_of(meta: Any) -> Any:
    """A shape tuple, a list of shapes (tuple outputs), or None (non-tensor)."""
    if isinstance(meta, torch.Tensor):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (list, tuple)):
        return [_shape_of(m) for m in meta]
    return None


def _node_shape(node: torch.fx.Node) -> Any:
    try:
        return _recorded_shape(node)
    except GuardOnDataDependentSymNode:
        where = node.meta.get("stack_trace", "").strip().splitlines()[-2:]
        raise TraceError(
            f"node '{node.name}' ({node.target}) has a size that depends on the data "
            f"(torch.export recorded an unbacked size: routing tokens by a boolean mask, "
            f"nonzero, .item()); channel groups need static sizes: make the forward "
            f"index with fixed shapes (an HF MoE: a grouped_mm/batched_mm experts "
            f"implementation where the model has one){': ' + ' '.join(w.strip() for w in where) if where else ''}"
        ) from None


def _recorded_shape(node: torch.fx.Node) -> Any:
    if _SHAPE_KEY in node.meta:
        return _shape_of(node.meta[_SHAPE_KEY])
    if "val" in node.meta:
        return _shape_of(node.meta["val"])
    if "example_value" in node.meta:
        return _shape_of(node.meta["example_value"])
    if "tensor_meta" in node.meta:
        return _shape_of(node.meta["tensor_meta"])
    return None



# ---------------------------------------------------------------- call lowering table


def call_key(node: torch.fx.Node) -> str:
    """One name for a function, method or ATen op: ``F.conv2d``, ``aten.conv2d`` -> conv2d."""
    target = node.target
    if node.op == "call_method":
        key = str(target)
    elif hasattr(target, "_overloadpacket"):
        key = target._overloadpacket.__name__  # type: ignore[union-attr]
    else:
        key = _OPERATORS.get(target, getattr(target, "__name__", str(target)))
    if key == "getattr" and len(node.args) > 1 and node.args[1] in _TENSOR_ATTR_OPS:
        return str(node.args[1])  # ``x.T`` / ``x.mT``: an op spelled as an attribute
    if key.endswith("_") and not key.startswith("_") and key != "__getitem__":
        key = key[:-1]
    return key


# Tensor attributes that are ops (FX records ``x.T`` as ``getattr(x, "T")``).
_TENSOR_ATTR_OPS = ("T", "mT", "H", "mH")

_OPERATORS: dict[Any, str] = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div",
    operator.itruediv: "div", operator.floordiv: "floor_divide", operator.matmul: "matmul",
    operator.neg: "neg", operator.pow: "pow", operator.getitem: "getitem",
    operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.gt: "gt",
    operator.le: "le", operator.ge: "ge", operator.and_: "logical_and",
    operator.or_: "logical_or", operator.invert: "logical_not", operator.mod: "remainder",
    getattr: "getattr",
}

# Positional parameter names of the torch Python API (ATen ops are bound by their schema).
_SIGS: dict[str, tuple[str, ...]] = {
    "linear": ("input", "weight", "bias"),
    "conv1d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv3d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose1d": ("input", "weight", "bias", "stride", "padding", "output_padding",
                         "groups", "dilation"),
    "conv_transpose2d": ("input", "weight", "bias", "stride", "padding", "output_padding",
                         "groups", "dilation"),
    "conv_transpose3d": ("input", "weight", "bias", "stride", "padding", "output_padding",
                         "groups", "dilation"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training",
                   "momentum", "eps"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias",
                      "use_input_stats", "momentum", "eps"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "embedding": ("input", "weight"),
    "embedding_bag": ("input", "weight"),
    "index_add": ("input", "dim", "index", "source"),
    "index_copy": ("input", "dim", "index", "source"),
    "softmax": ("input", "dim"), "log_softmax": ("input", "dim"),
    "local_response_norm": ("input", "size", "alpha", "beta", "k"),
    "normalize": ("input", "p", "dim"),
    "cat": ("tensors", "dim"), "concat": ("tensors", "dim"), "concatenate": ("tensors", "dim"),
    "split": ("input", "split_size", "dim"), "chunk": ("input", "chunks", "dim"),
    "tensor_split": ("input", "sections", "dim"), "unbind": ("input", "dim"),
    "split_with_sizes": ("input", "split_sizes", "dim"),
    "narrow": ("input", "dim", "start", "length"), "select": ("input", "dim", "index"),
    "slice": ("input", "dim", "start", "end", "step"),
    "flatten": ("input", "start_dim", "end_dim"), "unflatten": ("input", "dim", "sizes"),
    "squeeze": ("input", "dim"), "unsqueeze": ("input", "dim"),
    "transpose": ("input", "dim0", "dim1"), "swapaxes": ("input", "dim0", "dim1"),
    "swapdims": ("input", "dim0", "dim1"), "movedim": ("input", "source", "destination"),
    "mean": ("input", "dim", "keepdim"), "sum": ("input", "dim", "keepdim"),
    "amax": ("input", "dim", "keepdim"), "amin": ("input", "dim", "keepdim"),
    "max": ("input", "dim", "keepdim"), "min": ("input", "dim", "keepdim"),
    "var": ("input", "dim"), "std": ("input", "dim"), "logsumexp": ("input", "dim", "keepdim"),
    "norm": ("input", "p", "dim", "keepdim"), "prod": ("input", "dim", "keepdim"),
    "linalg_vector_norm": ("input", "ord", "dim", "keepdim"),
    "_weight_norm": ("v", "g", "dim"),
    "grid_sample": ("input", "grid"), "grid_sampler": ("input", "grid"),
    "grid_sampler_2d": ("input", "grid"), "grid_sampler_3d": ("input", "grid"),
    "stack": ("tensors", "dim"), "repeat_interleave": ("input", "repeats", "dim"),
    "gather": ("input", "dim", "index"), "take_along_dim": ("input", "index", "dim"),
    "topk": ("input", "k", "dim"), "sort": ("input", "dim"), "argsort": ("input", "dim"),
    "_grouped_mm": ("input", "mat2", "offs"), "argmax": ("input", "dim", "keepdim"),
    "grouped_mm_fallback": ("input", "weight", "offs"),
    "argmin": ("input", "dim", "keepdim"), "addcmul": ("input", "tensor1", "tensor2"),
    "scaled_dot_product_attention": ("query", "key", "value", "attn_mask", "dropout_p",
                                     "is_causal", "scale"),
    "pow": ("input", "exponent"), "type_as": ("input", "other"),
    "permute": ("input", "dims"),
    "masked_fill": ("input", "mask", "value"), "where": ("condition", "input", "other"),
    "addmm": ("input", "mat1", "mat2"), "baddbmm": ("input", "batch1", "batch2"),
    "interpolate": ("input", "size", "scale_factor"),
    "roll": ("input", "shifts", "dims"), "pad": ("input", "pad", "mode", "value"),
    "cumsum": ("input", "dim", "dtype"), "cumprod": ("input", "dim", "dtype"),
    "cummax": ("input", "dim"), "cummin": ("input", "dim"), "logcumsumexp": ("input", "dim"),
    "flip": ("input", "dims"), "fliplr": ("input",), "flipud": ("input",),
    "pixel_shuffle": ("input", "upscale_factor"), "pixel_unshuffle": ("input", "downscale_factor"),
}


def bind(node: torch.fx.Node, key: str) -> dict[str, Any]:
    """Arguments by name: ATen ops by schema, everything else by ``_SIGS``."""
    target = node.target
    if hasattr(target, "_schema"):
        names = [a.name for a in target._schema.arguments]  # type: ignore[union-attr]
        names = ["input" if n == "self" else n for n in names]
    else:
        names = list(_SIGS.get(key, ("input", "other")))
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    if key == "embedding" and "indices" in out:  # aten.embedding(weight, indices)
        out["input"] = out["indices"]
    return out


Lowered = tuple[str, list[Any], dict[str, Any]]  # canonical op, tensor operands, attrs


def _ndim(arg: Any) -> int:
    shape = _node_shape(arg) if isinstance(arg, torch.fx.Node) else None
    return len(shape) if isinstance(shape, tuple) else 0


def _dims(value: Any, nd: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value % max(nd, 1)]
    return [int(v) % max(nd, 1) for v in value]


def _unary(op: str) -> Callable[[torch.fx.Node, dict[str, Any]], Lowered]:
    return lambda node, b: (op, [b.get("input", node.args[0] if node.args else None)], {})


def _elementwise(op: str) -> Callable[[torch.fx.Node, dict[str, Any]], Lowered]:
    def lower(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
        operands = [a for a in list(node.args) + list(node.kwargs.values())
                    if isinstance(a, torch.fx.Node)]
        return op, operands, {}

    return lower


def _conv(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    transposed = bool(b.get("transposed", False)) or "transpose" in call_key(node)
    return "conv", [b["input"], b["weight"], b.get("bias")], {
        "groups": int(b.get("groups", 1) or 1), "transposed": transposed}


def _batch_norm(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``batch_stats``: normalised with statistics of the input itself (``training=True``,
    instance norm's ``use_input_stats``), not running ones: weight standardisation
    (``F.batch_norm(w.reshape(1, K, -1), None, None, training=True)``) is one of these."""
    op = "instance_norm" if "instance" in call_key(node) else "batch_norm"
    stats = b.get("use_input_stats", True) if op == "instance_norm" else b.get("training", False)
    return op, [b["input"], b.get("weight"), b.get("bias"), b.get("running_mean"),
                b.get("running_var")], {"batch_stats": bool(stats)}


def _layer_norm(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    shape = b.get("normalized_shape")
    nd = 1 if isinstance(shape, int) else len(shape or (0,))
    return "layer_norm", [b["input"], b.get("weight"), b.get("bias")], {"ndim": nd}


def _group_norm(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "group_norm", [b["input"], b.get("weight"), b.get("bias")], {
        "num_groups": int(b["num_groups"])}


def _softmax(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    dim = b.get("dim")
    if dim is None:
        return "opaque", [b["input"]], {"reason": "softmax without an explicit dim"}
    return "softmax", [b["input"]], {"dim": int(dim)}


def _cat(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "cat", list(b["tensors"]), {"dim": int(b.get("dim", 0))}


def _split(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "split", [b["input"]], {"dim": int(b.get("dim", 0))}


def _unbind(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "unbind", [b["input"]], {"dim": int(b.get("dim", 0))}


def _reshape(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "reshape", [b.get("input", node.args[0])], {}


def _perm(node: torch.fx.Node, key: str, b: dict[str, Any]) -> list[int] | None:
    x = b.get("input", node.args[0])
    nd = _ndim(x)
    if key == "permute":
        # x.permute(0, 2, 1), x.permute((0, 2, 1)), torch.permute(x, dims), dims=...
        dims = node.args[1:] if node.op == "call_method" and len(node.args) > 1 \
            else [b.get("dims")]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        if any(not isinstance(d, int) for d in dims):
            return None  # a dim computed at run time
        return [int(d) % nd for d in dims]
    perm = list(range(nd))
    if key in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = int(b["dim0"]) % nd, int(b["dim1"]) % nd
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if key in ("T", "H", "numpy_T"):
        return perm[::-1]
    if key in ("t", "mT", "mH") and nd >= 2:
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if key == "movedim" and isinstance(b.get("source"), int):
        src, dst = int(b["source"]) % nd, int(b["destination"]) % nd
        perm.remove(src)
        perm.insert(dst, src)
        return perm
    return None


def _permute(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    key = call_key(node)
    perm = _perm(node, key, b)
    x = b.get("input", node.args[0])
    if perm is None or any(isinstance(p, torch.fx.Node) for p in perm):
        return "opaque", [x], {"reason": f"{key} with dims unknown at trace time"}
    return "permute", [x], {"perm": perm}


def _reduce(kind: str) -> Callable[[torch.fx.Node, dict[str, Any]], Lowered]:
    def lower(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
        x = b["input"]
        dim = b.get("dim")
        other = b.get("other", dim)
        if kind in ("min", "max") and isinstance(other, torch.fx.Node) \
                and isinstance(_node_shape(other), tuple):
            # torch.min(a, b) / aten.min.other: elementwise, not a reduction (T5's buckets)
            return {"min": "minimum", "max": "maximum"}[kind], [x, other], {}
        if isinstance(dim, torch.fx.Node):
            return "opaque", [x], {"reason": f"{kind} over a dim unknown at trace time"}
        return "reduce", [x], {"dims": _dims(dim, _ndim(x)), "keepdim": bool(b.get("keepdim")),
                               "kind": kind}

    return lower


def _pool(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    key = call_key(node)
    x = b.get("input", node.args[0])
    spatial = int(key[-2]) if key[-2:-1].isdigit() else max(_ndim(x) - 2, 1)
    return "pool", [x], {"spatial": spatial}


def _resize(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    x = b.get("input", node.args[0])
    return "resize", [x], {"spatial": max(_ndim(x) - 2, 1)}


def _sdpa(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "sdpa", [b["query"], b["key"], b["value"], b.get("attn_mask")], {
        "scale": b.get("scale"), "is_causal": bool(b.get("is_causal", False)),
        "enable_gqa": bool(b.get("enable_gqa", False))}


def _embedding(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "embedding", [b["input"], b["weight"]], {}


def _linear(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "linear", [b["input"], b["weight"], b.get("bias")], {}


def _pow(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    if isinstance(b.get("exponent", b.get("other")), torch.fx.Node):
        return _elementwise("pow")(node, b)
    return "pow_scalar", [b.get("input", node.args[0])], {}


_NONNEG_UNARY = {"abs", "exp", "sigmoid", "softplus", "relu", "relu6", "sqrt", "square",
                 "var", "std", "norm", "linalg_vector_norm"}
_PASS = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "_to_copy",
         "contiguous", "clone", "detach", "alias", "mean", "sum", "amax", "max", "expand",
         "expand_as", "broadcast_to",
         "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
         "permute", "transpose"}


def _bounded(arg: Any, positive: bool, depth: int = 8) -> bool:
    """``arg`` is >= 0 (``positive``: > 0) wherever it is defined, by its producers: a mean
    square plus ``eps`` (RMSNorm, also per head: Qwen3/Gemma3 q/k norms), a variance plus
    ``eps``, their square roots; casts, reductions, reshapes and broadcasts keep the bound.
    A parameter or buffer whose values are >= 0 (a frozen BatchNorm's ``running_var``) is
    non-negative, never positive: a removed unit's entries are zeros."""
    if isinstance(arg, (int, float)):
        return arg > 0 if positive else arg >= 0
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and not positive:
        t = _fetch_attr(arg.graph.owning_module, str(arg.target), missing_ok=True)
        return isinstance(t, torch.Tensor) and t.is_floating_point() and \
            t.device.type != "meta" and bool((t >= 0).all())
    if not isinstance(arg, torch.fx.Node) or depth == 0 or \
            arg.op not in ("call_function", "call_method"):
        return False
    key = call_key(arg)
    x = arg.args[0] if arg.args else None
    if key in _PASS:
        return _bounded(x, positive, depth - 1)
    if key == "sqrt":
        return _bounded(x, positive, depth - 1)
    if key in ("clamp_min", "clamp", "clip"):  # F.normalize: x / norm(x).clamp_min(eps)
        low = arg.args[1] if len(arg.args) > 1 else arg.kwargs.get("min")
        return isinstance(low, (int, float)) and (low > 0 if positive else low >= 0)
    if key in _NONNEG_UNARY:
        return not positive
    if key == "pow" and len(arg.args) > 1 and isinstance(arg.args[1], (int, float)):
        return not positive and float(arg.args[1]) % 2 == 0
    if key == "mul" and len(arg.args) > 1 and arg.args[0] is arg.args[1]:
        return not positive
    if key == "add" and len(arg.args) > 1:
        a, b = arg.args[0], arg.args[1]
        return (_bounded(a, False, depth - 1) and _bounded(b, positive, depth - 1)) or \
            (_bounded(a, positive, depth - 1) and _bounded(b, False, depth - 1))
    return False


def _singular(op: str) -> Callable[[torch.fx.Node, dict[str, Any]], Lowered]:
    """rsqrt/reciprocal/log: ``positive`` when the argument cannot be zero (RMSNorm's
    ``rsqrt(mean(x**2) + eps)``), so a removed (zeroed) unit stays finite."""
    def lower(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
        x = b.get("input", node.args[0] if node.args else None)
        return op, [x], {"positive": _bounded(x, True)}

    return lower


def _div(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    op, operands, _ = _elementwise("div")(node, b)
    divisor = node.args[1] if len(node.args) > 1 else b.get("other")
    return op, operands, {"positive_divisor": _bounded(divisor, True)}


def _normalize(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "softmax", [b["input"]], {"dim": int(b.get("dim", 1))}


def _source(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "source", [a for a in node.args if isinstance(a, torch.fx.Node)], \
        _filled_attrs(node, 0)


def _stack(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "stack", list(b["tensors"]), {"dim": int(b.get("dim", 0))}


def _repeat_interleave(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    x, reps, dim = b["input"], b.get("repeats"), b.get("dim")
    if not isinstance(reps, int) or not isinstance(dim, int):
        return "opaque", [x], {"reason": "repeat_interleave with tensor repeats or no dim"}
    return "repeat_interleave", [x], {"repeats": reps, "dim": dim}


def _gather(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    if not isinstance(b.get("dim"), int):
        return "opaque", [b["input"], b.get("index")], {"reason": "gather over the flattened "
                                                                  "input"}
    return "gather", [b["input"], b["index"]], {"dim": int(b["dim"])}


def _select_along(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """topk / sort / argsort: a data-dependent choice of positions along ``dim``."""
    return "select_along", [b["input"]], {"dim": int(b.get("dim", -1) if b.get("dim")
                                                      is not None else -1)}


def _grouped_mm(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "grouped_mm", [b["input"], b["mat2"]], {"aligned": True}


def _copy(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``dst.copy_(src)`` (``out[:, t] = v`` as torch.export writes it): dst and src only."""
    operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    if len(operands) < 2:
        return "opaque", operands, {"reason": "copy_ from a non-tensor"}
    return "copy", operands, {}


def _embedding_bag(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    return "embedding_bag", [b["input"], b["weight"]], {}


def _index_add(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``x.index_add(dim, index, source)`` (and ``index_copy``): rows of ``source`` summed
    (copied) into the rows of ``x`` that ``index`` names, along ``dim``."""
    if not isinstance(b.get("dim"), int):
        return "opaque", [b["input"]], {"reason": f"{call_key(node)} over a run-time dim"}
    return "index_add", [b["input"], b["index"], b["source"]], {"dim": int(b["dim"])}


def _grouped_mm_fallback(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """transformers' ``transformers::grouped_mm_fallback(input, weight, offs)``: the same
    product as ``_grouped_mm``, one ``torch.mm`` per expert (no alignment to keep)."""
    return "grouped_mm", [b["input"], b["weight"]], {"aligned": False}


def _new_tensor(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``x.new_zeros(size)``: ``x`` only lends dtype and device, so it is no operand."""
    return "source", [a for a in node.args[1:] if isinstance(a, torch.fx.Node)], \
        _filled_attrs(node, 1)


# one value at every position: removing positions is exact once the sizes are rewritten
_FILLED = frozenset({"zeros", "ones", "full", "new_zeros", "new_ones", "new_full"})
# ops whose output may share the input's storage (a write through them writes the input)
_ALIASING = frozenset({"view", "reshape", "_unsafe_view", "transpose", "permute", "t",
                       "getitem", "narrow", "select", "slice", "unsqueeze", "squeeze",
                       "expand", "flatten", "unflatten", "chunk", "split", "unbind",
                       "contiguous", "as_strided", "view_as", "movedim", "swapaxes",
                       "swapdims", "diagonal", "detach", "alias", "to", "type_as"})


def _writes(node: torch.fx.Node) -> bool:
    """Whether the graph writes into ``node``'s tensor: an in-place call (``add_``,
    ``copy_``, ``x[i] = v``, a mutable ATen overload, an ``out=`` argument) on it or on a view
    of it."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            target = user.target
            name = str(target) if user.op == "call_method" else getattr(target, "__name__", "")
            schema = getattr(target, "_schema", None)
            if (target is operator.setitem or (name.endswith("_") and not name.startswith("_"))
                    or (schema is not None and schema.is_mutable)
                    or user.kwargs.get("out") is n):  # torch.mm(a, b, out=buf)
                return True
            if user.op in ("call_method", "call_function") and call_key(user) in _ALIASING:
                todo.append(user)
    return False


def _filled_attrs(node: torch.fx.Node, at: int) -> dict[str, Any]:
    """``{"sized": True}`` for ``zeros``/``ones``/``full`` whose sizes are arguments from
    ``at`` on (a sequence, or one size per argument) and whose tensor nothing writes into."""
    if call_key(node) not in _FILLED or _writes(node):
        return {}
    sizes = node.args[at:] if call_key(node) not in ("full", "new_full") else node.args[at:at + 1]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = tuple(sizes[0])
    if not sizes or not all(isinstance(v, (int, torch.fx.Node)) for v in sizes):
        return {}
    return {"sized": True}


def _like(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``zeros_like(x)`` & co.: a constant whose shape follows ``x`` at run time."""
    return "like", [b.get("input", node.args[0])], {}


def _einsum(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``torch.einsum(eq, a, b)``, ``torch.einsum(eq, [a, b])``, ``aten.einsum(eq, tensors)``:
    the canonical ``einsum`` with its ``equation`` (the ONNX ``Einsum`` lowers to the same)."""
    args = list(node.args)
    eq = node.kwargs.get("equation", args.pop(0) if args else None)
    operands = node.kwargs.get("tensors", args)
    if len(operands) >= 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(eq, str) or not operands or \
            not all(isinstance(o, torch.fx.Node) for o in operands):
        flat = [a for a in _flat(node.args) + _flat(node.kwargs) if isinstance(a, torch.fx.Node)]
        return "opaque", flat, {"reason": "einsum in sublist form (no equation string)"}
    return "einsum", list(operands), {"equation": eq}


def _roll(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``torch.roll(x, shifts, dims)``: ``dims`` are the rolled dims; none (or ``[]``, ATen's
    default) rolls the flattened tensor."""
    x = b.get("input", node.args[0])
    dims = b.get("dims")
    if isinstance(dims, torch.fx.Node) or (isinstance(dims, (list, tuple)) and
                                           any(not isinstance(d, int) for d in dims)):
        return "opaque", [x], {"reason": "roll over dims unknown at trace time"}
    return "roll", [x], {"dims": _dims(dims, _ndim(x)) or None}


def _cumulative(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    x = b.get("input", node.args[0])
    dim = b.get("dim")
    if not isinstance(dim, int):
        return "opaque", [x], {"reason": "a cumulative op over a dim unknown at trace time"}
    return "cumulative", [x], {"dim": dim % max(_ndim(x), 1)}


def _flip(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    x = b.get("input", node.args[0])
    key = call_key(node)
    if key in ("fliplr", "flipud"):
        return "flip", [x], {"dims": [1 if key == "fliplr" else 0]}
    dims = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else b.get("dims")
    if isinstance(dims, (list, tuple)) and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if dims is None or isinstance(dims, torch.fx.Node) or \
            any(not isinstance(d, int) for d in _as_list(dims)):
        return "opaque", [x], {"reason": "flip over dims unknown at trace time"}
    return "flip", [x], {"dims": _dims(list(_as_list(dims)), _ndim(x))}


def _unfold(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``x.unfold(dim, size, step)`` (and ``aten.unfold``): sliding windows along one dim;
    ``F.unfold`` (a function of the same name) is im2col."""
    x = node.args[0] if node.args else b.get("input")
    if node.op == "call_function" and node.target is torch.nn.functional.unfold:
        return "im2col", [x], {}
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dimension")
    if not isinstance(dim, int):
        return "opaque", [x], {"reason": "unfold over a dim unknown at trace time"}
    return "windows", [x], {"dim": dim % max(_ndim(x), 1)}


def _pixel_shuffle(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``F.pixel_shuffle(x, r)`` / ``F.pixel_unshuffle(x, r)``: channel ``c * r * r + i * r + j``
    <-> channel ``c`` at sub-pixel ``(i, j)``."""
    x = b.get("input", node.args[0])
    inverse = call_key(node) == "pixel_unshuffle"
    r = b.get("downscale_factor" if inverse else "upscale_factor")
    if not isinstance(r, int) or _ndim(x) < 3:
        return "opaque", [x], {"reason": "pixel shuffle factor unknown at trace time"}
    return "pixel_shuffle", [x], {"factor": r, "inverse": inverse, "order": "crd"}


_PAD_MODES = {"reflection": "reflect", "replication": "replicate", "_pad_circular": "circular",
              "constant_pad_nd": "constant"}


def _pad_pairs(pad: Any, nd: int) -> list[tuple[int, int] | None]:
    """``F.pad``'s flat ``(last_before, last_after, 2nd_last_before, ...)`` as one
    ``(before, after)`` per dim; an amount computed at run time (Swin's and timm's "same"
    padding: a size expression) makes its dim's entry None."""
    if not isinstance(pad, (list, tuple)) or len(pad) % 2 or len(pad) > 2 * nd:
        return [None] * nd
    pairs: list[tuple[int, int] | None] = [(0, 0)] * nd
    for i in range(len(pad) // 2):
        lo, hi = pad[2 * i], pad[2 * i + 1]
        pairs[nd - 1 - i] = (lo, hi) if isinstance(lo, int) and isinstance(hi, int) else None
    return pairs


def _pad(node: torch.fx.Node, b: dict[str, Any]) -> Lowered:
    """``F.pad``, ``aten.constant_pad_nd``/``pad``/``reflection_padNd``/``replication_padNd``:
    the canonical ``pad`` with one ``(before, after)`` per dim and the ``mode``."""
    key = call_key(node)
    x = b.get("input", node.args[0])
    mode = next((m for k, m in _PAD_MODES.items() if key.startswith(k)), None) or \
        str(b.get("mode") or "constant")
    return "pad", [x], {"pads": _pad_pairs(b.get("pad", b.get("padding")), _ndim(x)),
                        "mode": mode}


def _first_only(op: str) -> Callable[[torch.fx.Node, dict[str, Any]], Lowered]:
    return lambda node, b: (op, [node.args[0]], {})


_CALLS: dict[str, Callable[[torch.fx.Node, dict[str, Any]], Lowered]] = {}
for _op in ("relu relu6 leaky_relu elu selu celu gelu silu mish sigmoid tanh hardswish "
            "hardsigmoid hardtanh softplus softsign neg abs sqrt square exp sin cos erf "
            "sign round floor ceil logsigmoid tanhshrink isnan isinf isfinite expm1 "
            "log1p").split():
    _CALLS[_op] = _unary(_op)
for _op in ("rsqrt", "reciprocal", "log"):
    _CALLS[_op] = _singular(_op)
for _op in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
            "feature_alpha_dropout", "contiguous", "clone", "detach", "float", "half",
            "bfloat16", "double", "alias", "lift_fresh_copy", "_to_copy", "clamp", "clip",
            "clamp_min", "clamp_max"):
    _CALLS[_op] = _first_only("clamp" if _op.startswith(("clamp", "clip")) else "identity")
# torchvision.ops.stochastic_depth (FX-wrapped, so one call): the identity in eval, in training
# a per-sample (or per-batch) scalar times the input; channels pass like dropout.
_CALLS["stochastic_depth"] = _first_only("dropout")
_CALLS["to"] = _first_only("cast")
_CALLS["type"] = _first_only("cast")
_CALLS["type_as"] = _first_only("cast")
_CALLS["real"] = _first_only("cast")  # a complex tensor's parts: same positions
_CALLS["imag"] = _first_only("cast")
_CALLS["view_as_complex"] = lambda n, b: ("complex_view", [n.args[0]], {"to": "complex"})
_CALLS["view_as_real"] = lambda n, b: ("complex_view", [n.args[0]], {"to": "real"})
for _op in ("add", "sub", "rsub", "mul", "div", "true_divide", "maximum", "minimum", "where",
            "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
            "logical_not", "atan2", "fmod", "remainder", "floor_divide",
            # bool masks combined (DETR's query masks): ATen's and torch's spellings
            "__and__", "__or__", "__xor__", "bitwise_and", "bitwise_or", "bitwise_xor",
            "logical_xor", "bitwise_not", "__invert__"):
    _CALLS[_op] = _elementwise({"rsub": "sub", "true_divide": "div", "floor_divide": "div",
                                "__and__": "logical_and", "bitwise_and": "logical_and",
                                "__or__": "logical_or", "bitwise_or": "logical_or",
                                "__xor__": "logical_or", "bitwise_xor": "logical_or",
                                "logical_xor": "logical_or", "bitwise_not": "logical_not",
                                "__invert__": "logical_not"}.get(_op, _op))
_CALLS.update({
    "pow": _pow, "linear": _linear, "embedding": _embedding, "div": _div, "true_divide": _div,
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "convolution": _conv,
    "conv_transpose1d": _conv, "conv_transpose2d": _conv, "conv_transpose3d": _conv,
    "batch_norm": _batch_norm, "instance_norm": _batch_norm,
    "layer_norm": _layer_norm, "rms_norm": _layer_norm, "group_norm": _group_norm,
    "local_response_norm": lambda node, b: ("local_response_norm", [b["input"]], {"dim": 1}),
    "softmax": _softmax, "log_softmax": _softmax, "_softmax": _softmax, "normalize": _normalize,
    "cat": _cat, "concat": _cat, "concatenate": _cat,
    "split": _split, "chunk": _split, "split_with_sizes": _split, "tensor_split": _split,
    "unsafe_split": _split, "unbind": _unbind, "stack": _stack,
    "repeat_interleave": _repeat_interleave, "gather": _gather, "take_along_dim": _gather,
    "topk": _select_along, "sort": _select_along, "argsort": _select_along,
    "_grouped_mm": _grouped_mm, "grouped_mm": _grouped_mm,
    "grouped_mm_fallback": _grouped_mm_fallback,
    "copy": _copy,
    "embedding_bag": _embedding_bag, "index_add": _index_add, "index_copy": _index_add,
    "addcmul": _elementwise("addcmul"), "addcdiv": _elementwise("addcdiv"),
    "argmax": _reduce("argmax"), "argmin": _reduce("argmin"),
    "view": _reshape, "reshape": _reshape, "_unsafe_view": _reshape, "flatten": _reshape,
    "unflatten": _reshape, "squeeze": _reshape, "unsqueeze": _reshape, "view_as": _reshape,
    "reshape_as": _reshape,
    "permute": _permute, "transpose": _permute, "swapaxes": _permute, "swapdims": _permute,
    "t": _permute, "movedim": _permute, "T": _permute, "mT": _permute, "H": _permute,
    "mH": _permute, "numpy_T": _permute,
    # explicit sizes ("sized") are rewritten after pruning, so broadcast copies may go
    "expand": lambda n, b: ("expand", [b.get("input", n.args[0])], {"sized": True}),
    "expand_as": lambda n, b: ("expand", [n.args[0]], {}),
    "broadcast_to": lambda n, b: ("expand", [n.args[0]], {"sized": True}),
    "repeat": lambda n, b: ("repeat", [n.args[0]], {}),
    "matmul": _elementwise("matmul"), "mm": _elementwise("matmul"),
    # addmm/baddbmm are lowered by ``emit_addmm`` (matmul + add); the entry makes them reachable
    "addmm": _elementwise("matmul"), "baddbmm": _elementwise("matmul"),
    "bmm": _elementwise("matmul"),
    "outer": _elementwise("outer"), "ger": _elementwise("outer"), "einsum": _einsum,
    "pixel_shuffle": _pixel_shuffle, "pixel_unshuffle": _pixel_shuffle,
    **{k: (lambda n, b: ("grid_sample", [b["input"], b["grid"]], {}))
       for k in ("grid_sample", "grid_sampler", "grid_sampler_2d", "grid_sampler_3d")},
    "_weight_norm": lambda n, b: ("weight_norm", [b["v"], b["g"]],
                                  {"dim": int(b.get("dim", 0))}),
    "roll": _roll, "pad": _pad, "constant_pad_nd": _pad, "_pad_circular": _pad,
    **{f"{kind}_pad{n}d": _pad for kind in ("reflection", "replication") for n in (1, 2, 3)},
    "mean": _reduce("mean"), "sum": _reduce("sum"), "amax": _reduce("max"),
    "amin": _reduce("min"), "max": _reduce("max"), "min": _reduce("min"),
    "var": _reduce("var"), "std": _reduce("std"), "logsumexp": _reduce("logsumexp"),
    "norm": _reduce("norm"), "prod": _reduce("prod"), "linalg_vector_norm": _reduce("norm"),
    "adaptive_avg_pool1d": _pool, "adaptive_avg_pool2d": _pool, "adaptive_avg_pool3d": _pool,
    "adaptive_max_pool1d": _pool, "adaptive_max_pool2d": _pool, "adaptive_max_pool3d": _pool,
    "avg_pool1d": _pool, "avg_pool2d": _pool, "avg_pool3d": _pool,
    "max_pool1d": _pool, "max_pool2d": _pool, "max_pool3d": _pool,
    "max_pool1d_with_indices": _pool, "max_pool2d_with_indices": _pool,
    "interpolate": _resize, "upsample_nearest2d": _resize, "upsample_bilinear2d": _resize,
    "upsample_bicubic2d": _resize, "upsample_nearest1d": _resize, "upsample_linear1d": _resize,
    "upsample_nearest3d": _resize, "upsample_trilinear3d": _resize,
    "cumsum": _cumulative, "cumprod": _cumulative, "cummax": _cumulative,
    "cummin": _cumulative, "logcumsumexp": _cumulative,
    "flip": _flip, "fliplr": _flip, "flipud": _flip,
    "unfold": _unfold, "im2col": lambda n, b: ("im2col", [n.args[0]], {}),
    "fold": lambda n, b: ("col2im", [n.args[0]], {}),
    "col2im": lambda n, b: ("col2im", [n.args[0]], {}),
    "scaled_dot_product_attention": _sdpa,
    "arange": _source, "zeros": _source, "ones": _source, "full": _source, "empty": _source,
    "rand": _source, "randn": _source, "tensor": _source, "zeros_like": _like,
    "ones_like": _like, "full_like": _like, "empty_like": _like, "rand_like": _like,
    "randn_like": _like, "triu": _source,
    "tril": _source, "scalar_tensor": _source, "new_zeros": _new_tensor,
    "new_ones": _new_tensor, "new_full": _new_tensor, "new_empty": _new_tensor,
})

# Fields of torch.return_types (topk, sort, max/min over a dim): output index by name.
_NAMED_OUTPUTS = {"values": 0, "indices": 1}

# Non-tensor or bookkeeping calls: no canonical node.
_SKIP = {"size", "dim", "numel", "getattr", "_assert", "_assert_async", "sym_size", "item",
         "_guards_fn", "sym_constrain_range_for_size", "_assert_tensor_metadata"}


# ---------------------------------------------------------------- module lowering

_UNARY_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.SELU: "selu", nn.CELU: "celu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish",
    nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Hardtanh: "hardtanh", nn.Softplus: "softplus",
    nn.Softsign: "softsign", nn.Dropout: "dropout", nn.Dropout1d: "dropout",
    nn.Dropout2d: "dropout", nn.Dropout3d: "dropout", nn.AlphaDropout: "dropout",
    nn.Identity: "identity", nn.LogSigmoid: "logsigmoid", nn.Tanhshrink: "tanhshrink",
}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d,
                 nn.LPPool2d)


_PAD_MODULES_MODE = ((nn.modules.padding._ConstantPadNd, "constant"),
                     (nn.modules.padding._ReflectionPadNd, "reflect"),
                     (nn.modules.padding._ReplicationPadNd, "replicate"),
                     (nn.modules.padding._CircularPadNd, "circular"))
_PAD_MODULES = tuple(cls for cls, _ in _PAD_MODULES_MODE)


def _module_lowering(mod: nn.Module, x: Any) -> tuple[str, list[str], dict[str, Any]]:
    """Canonical op, parameter attribute names (in operand order, '' for absent), attrs."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return "conv", ["weight", "bias"], {
            "groups": mod.groups, "transposed": bool(mod.transposed)}
    if isinstance(mod, nn.Linear):
        return "linear", ["weight", "bias"], {}
    if isinstance(mod, nn.modules.batchnorm._NormBase):  # batch and instance norms
        op = "instance_norm" if isinstance(mod, nn.modules.instancenorm._InstanceNorm) \
            else "batch_norm"
        stats = mod.training or not mod.track_running_stats or mod.running_mean is None
        return op, ["weight", "bias", "running_mean", "running_var"], {"batch_stats": stats}
    if isinstance(mod, nn.LayerNorm):
        return "layer_norm", ["weight", "bias"], {"ndim": len(mod.normalized_shape)}
    if hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm):
        return "rms_norm", ["weight"], {"ndim": len(mod.normalized_shape)}
    if isinstance(mod, nn.GroupNorm):
        return "group_norm", ["weight", "bias"], {"num_groups": mod.num_groups}
    if isinstance(mod, nn.Embedding):
        return "embedding", ["weight"], {}
    if isinstance(mod, nn.EmbeddingBag):
        return "embedding_bag", ["weight"], {}
    if isinstance(mod, nn.MultiheadAttention):
        return "mha", ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias",
                       "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"], {
            "num_heads": mod.num_heads, "batch_first": bool(mod.batch_first),
            "add_zero_attn": bool(mod.add_zero_attn)}
    if type(mod) in _UNARY_MODULES:
        return _UNARY_MODULES[type(mod)], [], {}
    if isinstance(mod, _POOL_MODULES):
        kind = type(mod).__name__
        return "pool", [], {"spatial": int(kind[-2]) if kind[-2].isdigit()
                            else max(_ndim(x) - 2, 1)}
    if isinstance(mod, nn.RNNBase) and not getattr(mod, "proj_size", 0):
        params = ["weight_ih_l0"] + (["weight_ih_l0_reverse"] if mod.bidirectional else [])
        return "rnn", params, {"batch_first": bool(mod.batch_first)}
    if isinstance(mod, (nn.PixelShuffle, nn.PixelUnshuffle)):
        inverse = isinstance(mod, nn.PixelUnshuffle)
        r = mod.downscale_factor if inverse else mod.upscale_factor
        return "pixel_shuffle", [], {"factor": int(r), "inverse": inverse, "order": "crd"}
    if isinstance(mod, _PAD_MODULES):
        mode = next(m for cls, m in _PAD_MODULES_MODE if isinstance(mod, cls))
        return "pad", [], {"pads": _pad_pairs(tuple(mod.padding), _ndim(x)), "mode": mode}
    if isinstance(mod, nn.Upsample):
        return "resize", [], {"spatial": max(_ndim(x) - 2, 1)}
    if isinstance(mod, (nn.Flatten, nn.Unflatten)):
        return "reshape", [], {}
    if isinstance(mod, nn.Unfold):
        return "im2col", [], {}
    if isinstance(mod, nn.Fold):
        return "col2im", [], {}
    if isinstance(mod, nn.LocalResponseNorm):
        return "local_response_norm", [], {"dim": 1}
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        if mod.dim is None:
            return "opaque", [], {"reason": "Softmax without an explicit dim"}
        return "softmax", [], {"dim": mod.dim}
    return "opaque", [], {"reason": f"no channel rule for module type {type(mod).__name__}"}


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")


def _mha_operands(n: torch.fx.Node) -> tuple[list[Any], bool]:
    """query, key, value, key_padding_mask, attn_mask of an ``nn.MultiheadAttention`` call, and
    whether the attention weights (its second output) are read."""
    b = dict(zip(_MHA_ARGS, n.args))
    b.update(n.kwargs)
    used = any(u.target is operator.getitem and len(u.args) > 1 and u.args[1] == 1
               and len(u.users) > 0 for u in n.users) or \
        any(u.target is not operator.getitem for u in n.users)
    return [b.get(a) for a in ("query", "key", "value", "key_padding_mask", "attn_mask")], used


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


# ---------------------------------------------------------------- the lowering


# Calls that draw random numbers (``verify`` refuses a forward with them; ``fx_fold`` never
# folds them).
RANDOM_CALLS = {"rand", "randn", "rand_like", "randn_like", "randint", "randint_like",
                "randperm", "bernoulli", "multinomial", "normal", "uniform", "exponential",
                "geometric", "cauchy", "log_normal", "poisson", "native_dropout"}


# Consumers that read a run-time size as a size (the pruned size is the right one there).
_SIZE_CONSUMERS = {
    "view", "reshape", "_unsafe_view", "expand", "broadcast_to", "repeat", "unflatten",
    "flatten", "new_zeros", "new_ones", "new_empty", "zeros", "ones", "empty", "arange",
    "rand", "randn", "randint", "split", "chunk", "split_with_sizes", "tensor_split", "narrow",
    "slice", "select", "getitem", "index", "layer_norm", "permute", "transpose", "movedim",
    "interpolate", "pad", "constant_pad_nd", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
    "upsample_bicubic2d", "upsample_nearest1d", "upsample_linear1d", "upsample_nearest3d",
    "upsample_trilinear3d",
    "_assert", "_assert_async", "_assert_scalar", "sym_constrain_range_for_size", "roll",
    "unfold", "zeros_like", "ones_like", "empty_like", "reshape_as", "view_as", "expand_as"}
_SIZE_READS = {"size", "sym_size", "numel", "sym_numel"}


def size_values(gm: torch.fx.GraphModule
                ) -> list[tuple[torch.fx.Node, torch.fx.Node, list[int], torch.fx.Node]]:
    """Run-time sizes the graph uses as *values*: ``(read, tensor, dims, reader)`` for each size
    read (``x.size(d)``, ``x.shape[d]``, ``aten.sym_size``, ``x.numel()``) that reaches, through
    Python scalar arithmetic, a consumer other than a shape argument — an attention scale
    ``q.size(-1) ** -0.5`` multiplied into the scores or passed as sdpa's ``scale``, a mean
    spelled ``x.sum() / x.numel()``. Removing positions of such a dim changes the value in the
    pruned model only, so the rule pins the dim (``size_value``). ``torch.export`` bakes a
    static size into the graph as a literal (the original's value), so this matters for FX
    graphs and symbolic dims."""
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        key = call_key(node)
        x, dims = None, None
        if key in _SIZE_READS and node.args and isinstance(node.args[0], torch.fx.Node):
            x = node.args[0]
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            rank = len(_node_shape(x) or ())
            dims = list(range(rank)) if d is None or key in ("numel", "sym_numel") \
                else [int(d) % max(rank, 1)]
        elif key == "getattr" and len(node.args) > 1 and node.args[1] == "shape" and \
                isinstance(node.args[0], torch.fx.Node):
            x = node.args[0]
            dims = list(range(len(_node_shape(x) or ())))
        shape = _node_shape(x) if x is not None else None
        if not isinstance(shape, tuple) or not dims:
            continue
        reader = _value_reader(node)
        if reader is not None:
            out.append((node, x, _read_dims(node, dims, len(shape)), reader))
    return out


def _read_dims(node: torch.fx.Node, dims: list[int], rank: int) -> list[int]:
    """The dims a whole-shape read (``x.shape``, ``x.size()``) hands on through one integer
    subscript (``x.shape[-1]``); all of them otherwise."""
    users = list(node.users)
    if len(dims) > 1 and users and all(call_key(u) == "getitem" and len(u.args) > 1 and
                                       isinstance(u.args[1], int) for u in users):
        return sorted({int(u.args[1]) % rank for u in users})
    return dims


def first_user(node: torch.fx.Node,
               classify: Callable[[torch.fx.Node], str]) -> torch.fx.Node | None:
    """Depth first over the users of ``node``: ``classify(user)`` says ``"hit"`` (return it),
    ``"follow"`` (walk on through its users) or ``"skip"``; the first hit, or None."""
    stack, seen = [node], {node}
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            verdict = classify(user)
            if verdict == "hit":
                return user
            if verdict == "follow":
                stack.append(user)
    return None


def _as_value(user: torch.fx.Node) -> str:
    if user.op == "output":
        return "hit"
    if user.op not in ("call_function", "call_method"):
        return "skip"
    key = call_key(user)
    if not isinstance(_node_shape(user), tuple | list) or key == "getattr":
        return "follow"  # a Python scalar (or a size tuple) computed from it
    return "skip" if key in _SIZE_CONSUMERS or key in _SIZE_READS else "hit"


def _value_reader(node: torch.fx.Node) -> torch.fx.Node | None:
    """The first consumer, through Python scalar nodes (no tensor output), that takes the size
    as a value rather than as a shape argument; None if every use is a shape argument."""
    return first_user(node, _as_value)


class _Lowering:
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        # ``xs[::-1]``, ``xs[1:]`` of a multi-output node: the outputs it holds, in order
        self.tuples: dict[str, list[str]] = {}
        self.names = {id(t): n for n, t in gm.named_parameters(remove_duplicate=False)}
        self.kinds = {id(t): "parameter" for t in gm.parameters()}
        for n, t in gm.named_buffers(remove_duplicate=False):
            self.names.setdefault(id(t), n)
            self.kinds.setdefault(id(t), "buffer")
        # canonical (first) name of each tensor: tied weights are one value
        self.canonical: dict[int, str] = {}
        for n, t in list(gm.named_parameters()) + list(gm.named_buffers()):
            self.canonical.setdefault(id(t), n)

    def param_value(self, tensor: torch.Tensor, fallback: str) -> str:
        name = self.canonical.get(id(tensor))
        if name is None:
            if fallback not in self.values:
                self.values[fallback] = Value(fallback, tuple(tensor.shape), str(tensor.dtype),
                                              kind="constant")
            return fallback
        if name not in self.values:
            self.values[name] = Value(name, tuple(int(s) for s in tensor.shape), str(tensor.dtype),
                                      param=name, kind=self.kinds[id(tensor)])
        return name

    def ref(self, arg: Any) -> str | None:
        if isinstance(arg, _ParamRef):
            return arg.name
        if not isinstance(arg, torch.fx.Node):
            return None
        name = self.alias.get(arg.name, arg.name)
        return name if name in self.values else None

    def add_value(self, name: str, shape: Any) -> None:
        self.values[name] = Value(name, shape if isinstance(shape, tuple) else None)

    def emit(self, fx_node: torch.fx.Node, op: str, operands: list[Any],
             attrs: dict[str, Any], source: str) -> None:
        shape = _node_shape(fx_node)
        if isinstance(shape, list):
            outs = [f"{fx_node.name}.{i}" for i in range(len(shape))]
            for o, s in zip(outs, shape):
                self.add_value(o, s)
        else:
            outs = [fx_node.name]
            self.add_value(fx_node.name, shape)
        self.nodes.append(Node(fx_node.name, op, [self.ref(a) for a in operands], outs,
                               attrs, source))

    def lower(self) -> ChannelGraph:
        inputs, outputs = [], []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.add_value(n.name, _node_shape(n))
                inputs.append(n.name)
            elif n.op == "get_attr":
                obj = _fetch_attr(self.gm, str(n.target))
                if isinstance(obj, torch.Tensor):
                    self.alias[n.name] = self.param_value(obj, str(n.target))
            elif n.op == "call_module" and str(n.target) in _SKIP:
                continue  # torch.export's ``_guards_fn`` submodule: input checks, no tensor
            elif n.op == "call_module":
                self.lower_module(n)
            elif n.op in ("call_function", "call_method"):
                self.lower_call(n)
            elif n.op == "output":
                flat: list[Any] = []
                _flatten_args(self.expand_tuples(n.args), flat)
                outputs = [r for r in (self.ref(a) for a in flat) if r is not None]
        for read, x, dims, reader in size_values(self.gm):
            if self.ref(x) is not None:
                self.nodes.append(Node(read.name, "size_value", [self.ref(x)], [],
                                       {"dims": dims, "reader": f"{call_key(reader)} "
                                                                f"'{reader.name}'"},
                                       call_key(read)))
        return ChannelGraph(self.values, self.nodes, inputs, outputs, frontend="fx")

    def lower_module(self, n: torch.fx.Node) -> None:
        mod = self.gm.get_submodule(str(n.target))
        x = n.args[0] if n.args else None
        op, params, attrs = _module_lowering(mod, x)
        source = f"{n.target}: {type(mod).__name__}"
        tensor_args = [a for a in list(n.args) + list(n.kwargs.values())
                       if isinstance(a, torch.fx.Node)]
        if op == "mha":
            tensor_args, weights_used = _mha_operands(n)
            attrs = {**attrs, "weights_used": weights_used}
        elif op != "opaque":
            tensor_args = tensor_args[:1]
        operands: list[Any] = list(tensor_args)
        for pname in params:
            t = _fetch_attr(mod, pname, missing_ok=True)
            operands.append(_ParamRef(self.param_value(t, f"{n.target}.{pname}"))
                            if isinstance(t, torch.Tensor) else None)
        self.emit(n, op, operands, attrs, source)

    def lower_call(self, n: torch.fx.Node) -> None:
        key = call_key(n)
        if key == "getattr" and n.args[1] in _NAMED_OUTPUTS \
                and isinstance(n.args[0], torch.fx.Node) \
                and isinstance(_node_shape(n.args[0]), list):
            # topk(...).indices, max(x, dim).values: a named field of a multi-output node
            self.alias[n.name] = f"{self.alias.get(n.args[0].name, n.args[0].name)}." \
                                 f"{_NAMED_OUTPUTS[n.args[1]]}"
            return
        if key in _SKIP:
            return
        shape = _node_shape(n)
        if key == "getitem" and isinstance(n.args[0], torch.fx.Node):
            src = n.args[0]
            if f"{src.name}.0" in self.values or isinstance(_node_shape(src), list):
                self.alias_item(n, src)
                return
            if shape is None:
                return
            items = _index_items(n.args[1])
            gathers = [it for it in _as_list(n.args[1]) if _is_int_tensor(it)]
            self.emit(n, "index", [src, *gathers], {"items": items}, "getitem")
            return
        if shape is None:
            return
        b = self.expand_tuples(bind(n, key))
        if key in ("narrow", "select", "slice"):
            self.emit(n, "index", [b["input"]], {"items": _slice_items(key, b, _ndim(b["input"]))},
                      key)
            return
        if key == "index" and len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) \
                and isinstance(n.args[0], torch.fx.Node):
            self.lower_aten_index(n)
            return
        lower = _CALLS.get(key)
        if lower is None:
            operands = [a for a in _flat(self.expand_tuples([n.args, n.kwargs]))
                        if isinstance(a, torch.fx.Node | _ParamRef)]
            self.emit(n, "opaque", operands, {"reason": f"no channel rule for '{key}'"}, key)
            return
        if key in ("addmm", "baddbmm"):
            return self.emit_addmm(n, b, key)
        try:
            op, operands, attrs = lower(n, b)
        except (TypeError, ValueError):
            # a literal the rule reads (conv ``groups``, GroupNorm's ``num_groups``, split
            # sizes, a normalized shape) is computed at run time (CondConv's ``groups * B``,
            # ``num_groups=C // 4``): the op is opaque, its channels stay
            runtime = [a for a in _flat(n.args) + _flat(n.kwargs)
                       if isinstance(a, torch.fx.Node) and not isinstance(_node_shape(a), tuple)]
            if not runtime:
                raise
            operands = [a for a in _flat(self.expand_tuples([n.args, n.kwargs]))
                        if isinstance(a, _ParamRef) or
                        isinstance(a, torch.fx.Node) and isinstance(_node_shape(a), tuple)]
            op, attrs = "opaque", {"reason": f"an argument of '{key}' is computed at run time "
                                             f"('{runtime[0].name}')"}
        self.emit(n, op, operands, attrs, key)

    def lower_aten_index(self, n: torch.fx.Node) -> None:
        """``aten.index.Tensor(x, [None, ..., idx])``, torch.export's spelling of ``x[..., idx]``:
        a constant 1-D index (a literal list, lifted into a constant) takes those positions;
        an index tensor computed at run time gathers; a bool mask pins everything."""
        items: list[Any] = []
        gathers: list[torch.fx.Node] = []
        for it in n.args[1]:
            taken = None if it is None else constant_index(self.gm, it, self.canonical)
            if it is None:
                items.append(slice(None))
            elif taken is not None:
                items.append(take(taken))
            elif _is_int_tensor(it):
                items.append("gather")
                gathers.append(it)
            else:
                items.append("tensor")
        self.emit(n, "index", [n.args[0], *gathers], {"items": items}, "index")

    def alias_item(self, n: torch.fx.Node, src: torch.fx.Node) -> None:
        """``xs[i]`` of a multi-output node (split, chunk, unbind, topk) names output ``i``;
        a negative ``i`` (``xs[-1]``: Res2Net, EdgeNeXt) counts from the end."""
        base = self.alias.get(src.name, src.name)
        idx = n.args[1]
        if isinstance(idx, int) and idx >= 0 and src.name not in self.tuples:
            self.alias[n.name] = f"{base}.{idx}"
            return
        shapes = _node_shape(src)
        count = len(shapes) if isinstance(shapes, list) else \
            next(i for i in range(1 << 20) if f"{base}.{i}" not in self.values)
        names = self.tuples.get(src.name) or [f"{base}.{i}" for i in range(count)]
        if isinstance(idx, slice):  # Res2Net-style ``xs[1:]``, ``xs[::-1]``
            self.tuples[n.name] = names[idx]
        elif isinstance(idx, int):
            self.alias[n.name] = names[idx]

    def expand_tuples(self, args: Any) -> Any:
        """``args`` with every sliced multi-output (``self.tuples``) replaced by the list of
        the outputs it holds (as names ``ref`` resolves)."""
        if isinstance(args, torch.fx.Node) and args.name in self.tuples:
            return [_ParamRef(name) for name in self.tuples[args.name]]
        if isinstance(args, (list, tuple)):
            return type(args)(self.expand_tuples(a) for a in args)
        if isinstance(args, dict):
            return {k: self.expand_tuples(v) for k, v in args.items()}
        return args

    def emit_addmm(self, n: torch.fx.Node, b: dict[str, Any], key: str) -> None:
        mid = f"{n.name}__mm"
        self.add_value(mid, _node_shape(n))
        m1, m2 = (b["mat1"], b["mat2"]) if key == "addmm" else (b["batch1"], b["batch2"])
        self.nodes.append(Node(mid, "matmul", [self.ref(m1), self.ref(m2)], [mid], {}, key))
        self.add_value(n.name, _node_shape(n))
        self.nodes.append(Node(n.name, "add", [mid, self.ref(b["input"])], [n.name], {}, key))


class _ParamRef:
    def __init__(self, name: str) -> None:
        self.name = name


def _flat(obj: Any) -> list[Any]:
    out: list[Any] = []
    _flatten_args(obj, out)
    return out


def _flatten_args(obj: Any, out: list[Any]) -> None:
    if isinstance(obj, (list, tuple)):
        for o in obj:
            _flatten_args(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _flatten_args(o, out)
    else:
        out.append(obj)



def _static_int(value: Any, memo: dict[torch.fx.Node, Any] | None = None) -> int | None:
    """Evaluate a size expression (``x.shape[-1] // 2``) from propagated shapes.

    Only the size expression itself is walked: a tensor-valued node ends the walk (its shape is
    read, its producers never are), and each node is evaluated once (``memo``). Without both,
    a crop like ``x[:, :H]`` with ``H`` taken from a residual stream re-evaluated every path
    back to the input: exponential in the depth (Swin-style window attention)."""
    if isinstance(value, int) or value is None:
        return value
    if not isinstance(value, torch.fx.Node):
        return None
    meta = value.meta.get("val")
    if isinstance(meta, int):
        return meta
    if isinstance(value.meta.get(_SHAPE_KEY, meta), torch.Tensor):
        return None  # a tensor, not a size
    memo = {} if memo is None else memo
    if value in memo:
        return memo[value]
    memo[value] = None  # a cycle cannot occur in FX, but never recurse twice
    memo[value] = out = _eval_size(value, memo)
    return out


_SIZE_OPS = {"floordiv": operator.floordiv, "floor_divide": operator.floordiv,
             "add": operator.add, "sub": operator.sub, "mul": operator.mul,
             "mod": operator.mod, "remainder": operator.mod, "neg": operator.neg}


def _eval_size(value: torch.fx.Node, memo: dict[torch.fx.Node, Any]) -> Any:
    key = call_key(value) if value.op in ("call_function", "call_method") else ""
    if key in ("getattr", "size"):
        shape = _node_shape(value.args[0]) if isinstance(value.args[0], torch.fx.Node) else None
        if not isinstance(shape, tuple):
            return None
        if key == "getattr":
            return shape if value.args[1] == "shape" else None
        dim = value.args[1] if len(value.args) > 1 else value.kwargs.get("dim")
        return shape if dim is None else shape[int(dim)]
    if key not in _SIZE_OPS and key != "getitem":
        return None
    args = [_static_int(a, memo) if isinstance(a, torch.fx.Node) else a for a in value.args]
    if key == "getitem":
        if isinstance(args[0], tuple) and isinstance(args[1], int):
            return args[0][args[1]]
        return None
    if key == "neg":
        return -args[0] if isinstance(args[0], int) else None
    if len(args) >= 2 and all(isinstance(a, int) for a in args[:2]):
        return _SIZE_OPS[key](args[0], args[1])
    return None


def _index_items(idx: Any) -> list[Any]:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    out: list[Any] = []
    for it in items:
        if isinstance(it, slice):
            bounds = [_static_int(v) for v in (it.start, it.stop, it.step)]
            dynamic = [v is not None and b is None for v, b in
                       zip((it.start, it.stop, it.step), bounds)]
            if any(dynamic) or any(isinstance(b, tuple) for b in bounds):
                out.append("tensor")  # bounds known only at run time: pin the dim
            else:
                out.append(slice(*bounds))
        elif it is None or it is Ellipsis or isinstance(it, int):
            out.append(it)
        elif isinstance(it, list) and it and all(type(v) is int for v in it):
            out.append(take(it))  # x[..., [-2], :]: constant positions
        elif _is_int_tensor(it):
            out.append("gather")  # an integer index tensor: the node's next tensor operand
        else:
            out.append("tensor")
    return out


def constant_index(gm: torch.fx.GraphModule, arg: Any,
                   state: Container[int] | None = None) -> tuple[int, ...] | None:
    """The values of a constant 1-D integer index tensor: a literal torch.export lifted into
    the graph (``get_attr``, through ``lift_fresh_copy``), not a registered buffer (state the
    model may change) and not a tensor computed at run time. ``state``: the ids of the
    model's parameters and buffers, where the caller has them."""
    if isinstance(arg, torch.fx.Node) and arg.op == "call_function" and \
            call_key(arg) == "lift_fresh_copy" and arg.args:
        arg = arg.args[0]
    if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
        return None
    obj = _fetch_attr(gm, str(arg.target), missing_ok=True)
    if state is None:
        state = {id(t) for t in gm.parameters()} | {id(t) for t in gm.buffers()}
    if id(obj) in state and not is_trace_constant(str(arg.target)):  # fx_fold's are buffers
        return None
    if not isinstance(obj, torch.Tensor) or obj.ndim != 1 or not len(obj) or \
            obj.dtype not in (torch.int64, torch.int32):
        return None
    return tuple(int(v) for v in obj.tolist())


def _is_int_tensor(arg: Any) -> bool:
    """An integer tensor operand (``table[index]``, ``biases[:, idx]``), not a bool mask."""
    if not isinstance(arg, torch.fx.Node):
        return False
    val = arg.meta.get(_SHAPE_KEY, arg.meta.get("val"))
    return isinstance(val, torch.Tensor) and not val.dtype.is_floating_point \
        and val.dtype != torch.bool and not val.dtype.is_complex


def _slice_items(key: str, b: dict[str, Any], nd: int) -> list[Any]:
    dim = int(b.get("dim", 0)) % max(nd, 1)
    lead: list[Any] = [slice(None)] * dim
    if key == "select":
        idx = b["index"]
        return lead + [idx if isinstance(idx, int) else "tensor"]
    if key == "narrow":
        start, length = b["start"], b["length"]
        if isinstance(start, torch.fx.Node) or isinstance(length, torch.fx.Node):
            return lead + ["tensor"]
        return lead + [slice(start, start + length)]
    start, end, step = b.get("start"), b.get("end"), b.get("step", 1)
    if any(isinstance(v, torch.fx.Node) for v in (start, end, step)):
        return lead + ["tensor"]
    if isinstance(end, int) and end >= 2**62:
        end = None
    return lead + [slice(start, end, step if step != 1 else None)]


def lower_graph_module(gm: torch.fx.GraphModule) -> ChannelGraph:
    return _Lowering(gm).lower()

