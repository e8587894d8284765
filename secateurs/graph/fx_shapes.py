"""torch frontend, shapes: propagation on the ``meta`` device (no compute, no activations).

Common ops (convs, linear, norms, elementwise, cat, matmul) get their output shapes from the
formulas in ``_SHAPE_FNS``, keyed by the same canonical name the lowering uses (``call_key``,
``module_lowering``); the rest run their meta kernels; ``ShapeProp`` under ``FakeTensorMode``
is the fallback. Shapes are recorded under ``node.meta[SHAPE_KEY]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from secateurs.errors import InputError, TraceError
from secateurs.graph.fx_lower import _SHAPE_KEY, _module_lowering, call_key
from secateurs.graph.fx_trace import _as_tuple, _first_line

log = logging.getLogger(__name__)

__all__ = ["propagate_shapes"]


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Any) -> None:
    """Record output shapes on every node without real compute.

    The fast path interprets the graph on the ``meta`` device (``_MetaShapes``): the shape
    shortcuts (``_SHAPE_FNS``) compute the outputs of the common ops, everything else runs with
    the module's tensors swapped for meta stand-ins (no copy of the weights). A graph that
    mixes in real tensors it creates itself falls back to ``ShapeProp`` under
    ``FakeTensorMode``, which is slower but accepts them; so does any shortcut that cannot
    decide (a mismatched input is then reported by the op itself).
    """
    args = _as_tuple(example_inputs)
    if all("val" in n.meta or "example_value" in n.meta
           for n in gm.graph.nodes if n.op not in ("output", "get_attr")):
        return  # torch.export / dynamo graphs carry shapes already
    try:
        _meta_shape_prop(gm, args)
        return
    except Exception as exc:  # noqa: BLE001 - any failure: retry under FakeTensorMode
        log.debug("meta shape propagation failed (%s); using FakeTensorMode", exc)
        for n in gm.graph.nodes:
            n.meta.pop(_SHAPE_KEY, None)
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        ShapeProp(gm, mode).propagate(*fake)
    except Exception as exc:  # noqa: BLE001 - ShapeProp wraps the failing node's error
        if _data_dependent(exc):
            raise TraceError(
                f"the traced graph has a size or value that depends on the data "
                f"({_first_line(exc)}): channel groups need static sizes; make the forward "
                f"free of .item() and of indexing by boolean masks (an HF MoE: a "
                f"grouped_mm/batched_mm experts implementation where the model has one)"
            ) from exc
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise InputError(f"the model does not run on example inputs of shapes {shapes}: "
                         f"{_first_line(exc)}. Pass inputs the model accepts "
                         f"(--input-shape on the CLI).") from exc


def _data_dependent(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) is FakeTensor's refusal of a data-dependent
    result (``.item()``, ``nonzero``) rather than the model failing on its inputs."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException,
                            GuardOnDataDependentSymNode)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# Shape shortcuts: output shapes computed instead of run. On ``meta`` most ops run Python
# meta functions or decompositions (BatchNorm about 1 ms, a 3-D linear about 1 ms, ReLU, add
# and cat a few hundred us, conv ~100 us), which made them most of the propagation time; the
# shortcuts cost a few us. Anything not in the table just runs. Each entry maps
# (float tensor args, kwargs, module or None) to the output shape, or None to run the op.
# Same-shape ops return a fresh alias of their input (``detach``: a distinct tensor, so an
# in-place reshape of one node's output cannot change another's).
_SAME_SHAPE_OPS = frozenset(
    "relu relu6 leaky_relu elu selu celu gelu silu mish sigmoid tanh hardswish hardsigmoid "
    "hardtanh softplus softsign neg abs sqrt square exp sin cos erf sign logsigmoid "
    "tanhshrink rsqrt reciprocal dropout dropout1d dropout2d dropout3d alpha_dropout "
    "feature_alpha_dropout identity".split())
# Copies whose strides differ from their input's: ``contiguous`` makes row-major strides (a
# ``detach``ed alias of a permuted input would keep the permuted ones, and the ``view`` of
# window partition that follows fails on meta: the whole graph then fell back to
# ``FakeTensorMode``, 13 s on a Swin); ``clone`` keeps the input's layout (preserve_format).
_COPY_OPS = frozenset({"contiguous", "clone"})

ShapeFn = Callable[[tuple[Any, ...], dict[str, Any], Any], "Sequence[int] | None"]


def _broadcast(*shapes: Sequence[int]) -> list[int] | None:
    """numpy broadcasting of static shapes (``torch.broadcast_shapes`` costs ~60 us)."""
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        for i, v in enumerate(s, len(out) - len(s)):
            if v != 1:
                if out[i] != 1 and out[i] != v:
                    return None
                out[i] = int(v)
    return out


def _broadcast_shape(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any):
    if len(args) != 2 or kwargs.keys() - {"alpha"} or any(isinstance(a, bool) for a in args):
        return None
    if not all(isinstance(a, (torch.Tensor, int, float)) for a in args):
        return None
    return _broadcast(*(a.shape for a in args if isinstance(a, torch.Tensor)))


def _cat_shape(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any):
    tensors = args[0] if args else None
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) \
            or kwargs.keys() - {"dim"}:
        return None
    first = tensors[0]
    if not all(isinstance(t, torch.Tensor) and t.dim() == first.dim() > 0 for t in tensors):
        return None
    d = dim % first.dim()
    rest = [first.shape[:d], first.shape[d + 1:]]
    if any([t.shape[:d], t.shape[d + 1:]] != rest for t in tensors):
        return None
    return (*first.shape[:d], sum(int(t.shape[d]) for t in tensors), *first.shape[d + 1:])


def _linear_shape(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any):
    weight = getattr(mod, "weight", None) if mod is not None else \
        (args[1] if len(args) > 1 else kwargs.get("weight"))
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return None
    return (*x.shape[:-1], weight.shape[0])


def _matmul_shape(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any):
    if len(args) != 2 or kwargs or not all(isinstance(a, torch.Tensor) and a.dim() >= 2
                                           for a in args):
        return None
    a, b = args
    if a.shape[-1] != b.shape[-2]:
        return None
    batch = _broadcast(a.shape[:-2], b.shape[:-2])
    return None if batch is None else (*batch, a.shape[-2], b.shape[-1])


def _transpose_shape(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any):
    if len(args) != 3 or kwargs or not isinstance(args[0], torch.Tensor) \
            or not all(isinstance(d, int) for d in args[1:]):
        return None
    shape = list(args[0].shape)
    i, j = args[1] % len(shape), args[2] % len(shape)
    shape[i], shape[j] = shape[j], shape[i]
    return shape


def _conv_shape(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any):
    """Output shape of a (non-transposed) convolution module or ``F.convNd`` call."""
    if mod is not None:
        if mod.transposed or len(args) != 1 or kwargs:
            return None
        weight, stride, padding, dilation = mod.weight, mod.stride, mod.padding, mod.dilation
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, args), **kwargs)
        if bound.keys() - set(names) or not isinstance(bound.get("weight"), torch.Tensor):
            return None
        weight = bound["weight"]
        nd = weight.dim() - 2
        stride, padding, dilation = (bound.get(k, v) for k, v in
                                     (("stride", 1), ("padding", 0), ("dilation", 1)))
        stride, padding, dilation = ((v,) * nd if isinstance(v, int) else v
                                     for v in (stride, padding, dilation))
    x = args[0]
    nd = weight.dim() - 2
    groups = mod.groups if mod is not None else bound.get("groups", 1)
    if not isinstance(x, torch.Tensor) or x.dim() not in (nd + 1, nd + 2) \
            or x.shape[-nd - 1] != weight.shape[1] * groups:
        return None  # let the op run and report the mismatch
    if padding == "same":
        return (*x.shape[:-nd - 1], weight.shape[0], *x.shape[-nd:])
    if padding == "valid":
        padding = (0,) * nd
    if not all(isinstance(v, (list, tuple)) and len(v) == nd for v in (stride, padding, dilation)):
        return None
    spatial = [(int(size) + 2 * p - d * (k - 1) - 1) // st + 1 for size, k, st, p, d in
               zip(x.shape[-nd:], weight.shape[2:], stride, padding, dilation)]
    if min(spatial) < 1:
        return None
    return (*x.shape[:-nd - 1], weight.shape[0], *spatial)


def _norm_shape(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any):
    """A normalisation module's output is its input, once the input fits the module."""
    x = args[0] if len(args) == 1 and not kwargs else None
    if mod is None or not isinstance(x, torch.Tensor):
        return None
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        fits = x.dim() >= 2 and x.shape[1] == mod.num_features
    elif isinstance(mod, nn.GroupNorm):
        fits = x.dim() >= 2 and x.shape[1] == mod.num_channels
    else:  # LayerNorm, RMSNorm
        n = len(mod.normalized_shape)
        fits = tuple(x.shape[x.dim() - n:]) == tuple(mod.normalized_shape)
    return x.shape if fits else None


_SHAPE_FNS: dict[str, ShapeFn] = {
    **{op: _broadcast_shape for op in ("add", "sub", "mul", "div", "true_divide")},
    **{op: _cat_shape for op in ("cat", "concat", "concatenate")},
    "linear": _linear_shape, "matmul": _matmul_shape, "bmm": _matmul_shape,
    "transpose": _transpose_shape, "conv": _conv_shape, "conv1d": _conv_shape,
    "conv2d": _conv_shape, "conv3d": _conv_shape,
    **{op: _norm_shape for op in ("batch_norm", "instance_norm", "group_norm", "layer_norm",
                                  "rms_norm")},
}
# Modules whose output the shortcuts make without reading their tensors: no meta stand-ins.
_SHORTCUT_MODULE_OPS = _SAME_SHAPE_OPS | _COPY_OPS | {
    "linear", "conv", "batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"}


def _torch_forward(mod: nn.Module) -> bool:
    """The module runs a ``torch.nn`` forward (not a subclass's own)."""
    return getattr(type(mod).forward, "__module__", "").startswith("torch.nn.")


def _shortcut_module(mod: nn.Module) -> bool:
    return _module_lowering(mod, None)[0] in _SHORTCUT_MODULE_OPS \
        and not getattr(mod, "transposed", False) and _torch_forward(mod)


def _fast_shape(key: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                mod: Any = None) -> torch.Tensor | None:
    """The output of a shortcut op on meta tensors without running it; None where the op
    must run (non-float or mixed-dtype tensors, arguments the shortcut does not read)."""
    if key in _SAME_SHAPE_OPS:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and "out" not in kwargs:
            return x.detach()
        return None
    if key in _COPY_OPS:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or len(args) > 1 or kwargs:
            return None  # memory_format=...: let the op lay it out
        if key == "clone":
            return torch.empty_like(x)
        return x.detach() if x.is_contiguous() else torch.empty(x.shape, dtype=x.dtype,
                                                                device="meta")
    fn = _SHAPE_FNS.get(key)
    if fn is None:
        return None
    operands = args[0] if fn is _cat_shape and args and isinstance(args[0], (list, tuple)) \
        else args
    flat = [a for a in operands if isinstance(a, torch.Tensor)]
    if not flat or any(t.dtype != flat[0].dtype or not t.is_floating_point() for t in flat):
        return None
    shape = fn(args, kwargs, mod)
    return None if shape is None else torch.empty(tuple(shape), dtype=flat[0].dtype,
                                                  device="meta")



def _has_tensor(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (list, tuple)) and any(_has_tensor(o) for o in out)


class _MetaShapes(torch.fx.Interpreter):
    """Runs the graph on ``meta`` tensors and records each node's output under
    ``_SHAPE_KEY``; ``_fast_shape`` stands in for the ops whose output it knows."""

    def run_node(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        fast = None
        if n.op in ("call_function", "call_method"):
            fast = _fast_shape(call_key(n), args, kwargs)
        elif n.op == "call_module" and args:
            mod = self.fetch_attr(str(n.target))
            if _torch_forward(mod):  # a subclass with its own forward may change shapes
                fast = _fast_shape(_module_lowering(mod, args[0])[0], args, kwargs, mod)
        out = fast if fast is not None else getattr(self, n.op)(n.target, args, kwargs)
        if _has_tensor(out):  # like ShapeProp: sizes, ints and None record nothing
            n.meta[_SHAPE_KEY] = out
        return out


def _meta_shape_prop(gm: torch.fx.GraphModule, args: tuple[Any, ...]) -> None:
    from torch.nn.utils.stateless import _reparametrize_module

    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    # Stand-ins only where a tensor is read: not for meta tensors, nor for modules whose
    # output ``_fast_shape`` makes (BatchNorm's four tensors are most of a CNN's).
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    shortcut = {name for name in called if _shortcut_module(gm.get_submodule(name))}
    runs = called - shortcut
    # only modules the graph calls itself: ``nn.MultiheadAttention`` reads its ``out_proj``
    # (a Linear) directly, so a Linear inside a module that runs keeps its stand-ins
    skip = {name for name in shortcut
            if not any(".".join(name.split(".")[:i]) in runs
                       for i in range(1, name.count(".") + 1))}
    meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()
            if not v.is_meta and (k in read or k.rpartition(".")[0] not in skip)}
    meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    with _reparametrize_module(gm, meta, tie_weights=True):
        _MetaShapes(gm).run(*meta_args)


