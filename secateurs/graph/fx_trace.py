"""torch frontend, tracing: ``torch.fx.symbolic_trace`` first, ``torch.export`` for models FX
cannot trace (data-dependent control flow, Hugging Face models). The exported program's unlifted
module is again a ``GraphModule`` whose parameters keep the original qualified names; regions
that only switch grad/autocast mode are inlined so the analysis sees through them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.export._unlift import _StatefulGraphModule

from secateurs.errors import InputError, TraceError

log = logging.getLogger(__name__)

__all__ = ["trace"]

def _fetch_attr(root: nn.Module, target: str, missing_ok: bool = False) -> Any:
    obj: Any = root
    for part in target.split("."):
        if not hasattr(obj, part):
            if missing_ok:
                return None
            raise TraceError(f"graph refers to attribute '{target}' that the model lacks")
        obj = getattr(obj, part)
    return obj



# ---------------------------------------------------------------- tracing


def _encoder_layer(m: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None,
                   src_key_padding_mask: Any = None, is_causal: bool = False) -> Any:
    """``nn.TransformerEncoderLayer.forward`` without its fast path (which branches on tensor
    properties FX cannot see), through the same submodules: the layer's own slow path."""
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _encoder(m: nn.TransformerEncoder, src: Any, mask: Any = None,
             src_key_padding_mask: Any = None, is_causal: bool | None = None) -> Any:
    """``nn.TransformerEncoder.forward`` without the fast path and nested tensors."""
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                    is_causal=bool(is_causal))
    return out if m.norm is None else m.norm(out)


class _Tracer(torch.fx.Tracer):
    """FX's tracer, looking inside ``nn.TransformerEncoder``/``nn.TransformerEncoderLayer``
    (leaves by default, so their projections, heads and FFN were opaque): their slow path is
    traced over the same submodules, whose names the plan keeps; ``nn.MultiheadAttention``
    stays a leaf (lowered to ``mha``)."""

    _INSIDE = (nn.TransformerEncoder, nn.TransformerEncoderLayer)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._INSIDE):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(m, nn.TransformerEncoderLayer):
            forward = functools.partial(_encoder_layer, m)
        elif isinstance(m, nn.TransformerEncoder):
            forward = functools.partial(_encoder, m)
        return super().call_module(m, forward, args, kwargs)


def _symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):
        raise InputError(
            "example_inputs is a mapping of keyword inputs (e.g. a tokenizer's output: "
            f"{', '.join(map(str, list(example_inputs)[:3]))}); pass the tensors positionally "
            "in forward's order, prune(model, (input_ids,)), or use secateurs.prune_hf for a "
            "Hugging Face model, which places keyword inputs by the forward signature")
    raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got "
                     f"{type(example_inputs).__name__}")


def trace(model: nn.Module, example_inputs: Any,
          dynamic_batch: bool = True) -> tuple[torch.fx.GraphModule, str]:
    """Trace ``model`` (not modified) into a GraphModule: FX first, then torch.export.

    ``dynamic_batch``: export with a symbolic batch dim where the model allows it, so the
    pruned GraphModule runs at every batch size; callers that only analyse the graph (the HF
    path applies the plan to the original module) pass False and save the second export.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = _as_tuple(example_inputs)
    if isinstance(model, torch.fx.GraphModule):
        return model, "fx"
    try:
        return _symbolic_trace(model), "fx"
    except Exception as fx_exc:  # noqa: BLE001 - any FX failure means: try export
        fx_error = fx_exc
    log.info("symbolic_trace failed (%s); falling back to torch.export", fx_error)
    try:
        ep, symbolic = _export(model, args, dynamic_batch)
        gm = ep.module()
        _inline_wrapped_regions(gm)
        _fixed_mode(gm, model.training)
        gm.meta[_SYMBOLIC_BATCH] = bool(dynamic_batch and symbolic)  # how to re-export it
    except Exception as exc:  # noqa: BLE001 - report both failures together
        raise TraceError(
            f"cannot trace {type(model).__name__}: torch.fx.symbolic_trace failed with "
            f"{type(fx_error).__name__}: {_first_line(fx_error)}; torch.export failed with "
            f"{type(exc).__name__}: {_first_line(exc)}. Make the forward free of "
            f"data-dependent Python control flow, or pass a model that torch.export accepts."
            f"{_binding_hint(model, args)}"
        ) from exc
    if symbolic and dynamic_batch:
        refused = _refuses_batch_one(gm, args)
        if refused:
            log.warning("the program torch.export traced from %s refuses batch 1 (%s): the "
                        "pruned program will too; a batch-1 example keeps batch 1 (torch.export "
                        "may then fix the batch)",
                        type(model).__name__, refused)
            return gm, "export (batch >= 2)"
    if symbolic:
        return gm, "export"
    sizes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    log.warning("torch.export could not keep the batch of %s symbolic: the traced (and "
                "pruned) program runs at the example's input shapes %s only; pass example "
                "inputs at the batch you deploy, or make the forward traceable by torch.fx",
                type(model).__name__, sizes)
    return gm, "export (static shapes)"


def _fixed_mode(gm: torch.fx.GraphModule, training: bool) -> None:
    """Let an exported program's module take ``eval()``/``train()`` to the mode it was traced
    in (torch refuses both: ``Calling eval() is not supported yet``, so a pruned model's
    ``.eval()`` crashed, as did exporting it to ONNX); the other mode is refused with the
    reason, since dropout and BatchNorm behaviour are fixed in the graph. The module becomes an
    :class:`ExportedModule` (its class, not its instance dict, carries the rule, so a
    ``copy.deepcopy`` keeps it)."""
    gm.meta[_TRACED_TRAINING] = bool(training)
    for refusal in ("train", "eval"):  # ExportedProgram.module() sets both on the instance
        vars(gm).pop(refusal, None)
    # every GraphModule has a class of its own (``GraphModuleImpl``); deriving it from
    # ExportedModule instead, the generated forward is installed on the new class again
    gm.__class__ = type("GraphModuleImpl", (ExportedModule,), {})
    gm.recompile()
    nn.Module.train(gm, training)


_TRACED_TRAINING = "secateurs_traced_training"
_EXAMPLE_INPUTS = "secateurs_example_inputs"
_SYMBOLIC_BATCH = "secateurs_symbolic_batch"


class ExportedModule(_StatefulGraphModule):
    """The module of a program ``torch.export`` traced (``ExportedProgram.module()``), as
    secateurs returns it: it takes the mode it was traced in and refuses the other with the
    reason, and it pickles (see :func:`picklable`)."""

    def train(self, mode: bool = True) -> ExportedModule:
        traced = self.meta.get(_TRACED_TRAINING)
        if traced is not None and bool(mode) != traced:
            raise NotImplementedError(
                f"this program was traced by torch.export in "
                f"{'training' if traced else 'eval'} mode and runs in it (dropout and "
                f"BatchNorm behaviour are part of the graph): it cannot switch to "
                f"{'training' if mode else 'eval'} mode; put the model in that mode before "
                f"pruning")
        return nn.Module.train(self, mode)

    def eval(self) -> ExportedModule:
        return self.train(False)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _reduce_exported(self)


def _refuses_batch_one(gm: torch.fx.GraphModule, args: tuple[Any, ...]) -> str | None:
    """The guard message where the exported program refuses batch 1 although its batch is
    symbolic (torch.export assumes a size-2+ example's batch is never 1 where the model's
    size arithmetic depends on it: ``Guard failed: x.size()[0] > 1``); ``None`` where batch 1
    runs, the example is batch 1 already, or the inputs hold no values (meta)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or int(tensors[0].shape[0]) == 1 or any(t.is_meta for t in tensors):
        return None
    one = tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in args)
    try:
        with torch.no_grad():
            gm(*one)
    except AssertionError as exc:  # the guard function's own failure
        if "Guard failed" in str(exc):
            return _first_line(exc)
    except Exception:  # noqa: BLE001 - anything else is not this check's business
        return None
    return None


def _binding_hint(model: nn.Module, args: tuple[Any, ...]) -> str:
    """Which ``forward`` parameters the positional example inputs bind to, when more than one:
    a Hugging Face causal LM's second parameter is its cache (``past_key_values``), not the
    attention mask a caller usually means."""
    if len(args) < 2:
        return ""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return ""
    bound = ", ".join(f"{name}={type(a).__name__}" for name, a in zip(params, args))
    hint = f" The example inputs bind to {type(model).__name__}.forward({bound})"
    if type(model).__module__.startswith("transformers.") \
            or {"past_key_values", "cache"} & set(params[:len(args)]):
        hint += ("; for a Hugging Face model pass only input_ids positionally, or use "
                 "secateurs.hf.prune_hf, which takes keyword inputs")
    return hint + "."


def _batch_dims(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``dynamic_shapes`` marking dim 0 of every tensor input dynamic, when they share it."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.ndim == 0 for t in tensors) \
            or len({int(t.shape[0]) for t in tensors}) != 1 or int(tensors[0].shape[0]) < 1:
        return None
    return tuple({0: torch.export.Dim.DYNAMIC} if isinstance(a, torch.Tensor) else None
                 for a in args)


def _export(model: nn.Module, args: tuple[Any, ...], dynamic_batch: bool) -> tuple[Any, bool]:
    """``torch.export`` with a dynamic batch dim where the model allows it, else static; and
    whether the export is what was asked for (a symbolic batch where ``dynamic_batch``;
    always true without it).

    An exported graph is what the pruned model runs, so a batch baked in at export would make
    the pruned model accept the example batch only (torch.export specialises sizes 0 and 1;
    ``backed_size_oblivious`` keeps a batch-1 example symbolic). A model whose batch cannot be
    symbolic (a guard on it; CoaT's split/pad attention bounds a batch-1 example to
    ``VR[0, 2]``) is exported static: :func:`trace` warns and names the tracer
    ``export (static shapes)``, since its pruned program runs at the example's shapes only.
    (Retrying on the example repeated to batch 2 gives a symbolic batch, but with a guard
    ``batch > 1``: the user's own batch would be refused.)
    """
    dims = _batch_dims(args) if dynamic_batch else None
    if dims is None:
        return torch.export.export(model, args, strict=False), not dynamic_batch
    ep = _export_dynamic(model, args, dims)
    if ep is not None:
        return ep, True
    return torch.export.export(model, args, strict=False), False


def _export_dynamic(model: nn.Module, args: tuple[Any, ...], dims: tuple[Any, ...]) -> Any:
    """The export with a symbolic batch, or ``None`` where it fails or bounds the batch."""
    import torch.fx.experimental._config as fx_config

    # copies: a failed attempt leaves its tensors marked dynamic (``_dynamo_dynamic_indices``),
    # and the static retry on the same tensors would then fail on the mark (RT-DETR)
    fresh = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        with fx_config.patch(backed_size_oblivious=True):
            ep = torch.export.export(model, fresh, dynamic_shapes=dims, strict=False)
    except Exception as exc:  # noqa: BLE001 - any failure: the caller tries otherwise
        log.info("torch.export with a dynamic batch failed (%s)", _first_line(exc))
        return None
    if _unbounded(ep):
        return ep
    log.info("torch.export bounds the batch (%s)", ep.range_constraints)
    return None


def _unbounded(ep: Any) -> bool:
    """Whether every symbolic size has no upper bound (a graph valid for any batch)."""
    from torch.utils._sympy.numbers import int_oo

    return all(vr.upper == int_oo for vr in ep.range_constraints.values())


# Higher-order ops that only wrap a region in a grad/autocast mode: (op name, index of the
# submodule argument). Their body is inlined so the analysis sees through it (HF rotary
# embeddings are computed under ``torch.no_grad``/autocast-off).
_WRAPPING_HOPS = {"wrap_with_set_grad_enabled": 1, "wrap_with_autocast": 4}


def _inline_wrapped_regions(gm: torch.fx.GraphModule) -> None:
    """Inline the bodies of ``wrap_with_set_grad_enabled``/``wrap_with_autocast`` in place."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        at = _WRAPPING_HOPS.get(getattr(node.target, "__name__", ""))
        if at is None or len(node.args) <= at or not isinstance(node.args[at], torch.fx.Node):
            continue
        sub = _fetch_attr(gm, str(node.args[at].target), missing_ok=True)
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        operands = list(node.args[at + 1:])
        env: dict[torch.fx.Node, Any] = {}
        result: Any = None
        with gm.graph.inserting_before(node):
            for sn in sub.graph.nodes:
                if sn.op == "placeholder":
                    env[sn] = operands.pop(0)
                elif sn.op == "output":
                    result = torch.fx.node.map_arg(sn.args[0], env.__getitem__)
                elif sn.op == "get_attr":
                    name = f"_inlined_{node.name}_{sn.target}".replace(".", "_")
                    setattr(gm, name, _fetch_attr(sub, str(sn.target)))
                    env[sn] = gm.graph.get_attr(name)
                else:
                    env[sn] = gm.graph.node_copy(sn, env.__getitem__)
        if isinstance(result, (list, tuple)):
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(result[user.args[1]])
                    gm.graph.erase_node(user)
        else:
            node.replace_all_uses_with(result)
        if not node.users:
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _on_meta(gm: nn.Module) -> bool:
    return any(t.is_meta for t in list(gm.parameters()) + list(gm.buffers()))



# ---------------------------------------------------------------- pickling


def picklable(gm: torch.fx.GraphModule, example_inputs: Any) -> torch.fx.GraphModule:
    """Let ``torch.save(gm)`` work on a traced (pruned) module; returns ``gm``, changed in
    place.

    A ``symbolic_trace`` graph records the forward's type annotations on its placeholders, and
    a string annotation (``from __future__ import annotations``) breaks the pickled code
    (``'str' object has no attribute '__name__'``): annotations are cosmetic, so they go. An
    exported program's module is not picklable at all (torch's input-guard module and its
    forward hooks are local functions): pickling it re-exports the module and stores the
    ``torch.export.save`` archive, which loads back as the same program, its guards, symbolic
    batch and fixed train/eval mode included. The example inputs are kept in the module's
    ``meta`` for that re-export."""
    for node in gm.graph.nodes:
        node.type = None
    gm.recompile()
    if isinstance(gm, ExportedModule):
        gm.meta[_EXAMPLE_INPUTS] = tuple(a.detach().clone() if isinstance(a, torch.Tensor)
                                         else a for a in _as_tuple(example_inputs))
    return gm


def _reduce_exported(gm: torch.fx.GraphModule) -> tuple[Any, tuple[Any, ...]]:
    import io
    import pickle

    args = gm.meta.get(_EXAMPLE_INPUTS)
    if args is None:
        raise pickle.PicklingError(
            "this torch.export-traced module has no example inputs to re-export it with; "
            "save its state_dict, or torch.export it and torch.export.save the program")
    # the trace's batch rule: a program traced at static shapes is re-exported static (its
    # graph has the example's batch baked in), a symbolic one symbolic
    dynamic = bool(gm.meta.get(_SYMBOLIC_BATCH, False))
    try:
        ep, _ = _export(gm, args, dynamic_batch=dynamic)
        buffer = io.BytesIO()
        torch.export.save(ep, buffer)
    except Exception as exc:  # noqa: BLE001 - pickling wants a PicklingError
        raise pickle.PicklingError(
            f"cannot pickle this torch.export-traced module: re-exporting it failed "
            f"({_first_line(exc)}); save its state_dict, or torch.export it yourself and "
            f"torch.export.save the program") from exc
    return _load_exported, (buffer.getvalue(), gm.training, args, dynamic)


def _load_exported(archive: bytes, training: bool, example_inputs: tuple[Any, ...],
                   symbolic_batch: bool) -> torch.fx.GraphModule:
    """The module a pickled export-traced module was (see :func:`picklable`)."""
    import io

    gm = torch.export.load(io.BytesIO(archive)).module()
    _fixed_mode(gm, training)
    gm.meta[_SYMBOLIC_BATCH] = symbolic_batch
    return picklable(gm, example_inputs)
