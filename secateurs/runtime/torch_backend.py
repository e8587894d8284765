"""``torch.compile(model, backend="secateurs")``: prune inside the compiler.

Under dynamo the module's parameters and buffers arrive as *graph inputs* (placeholders whose
source is ``L['self']._modules[...]._parameters['weight']``). For an inference graph the backend

1. **freezes** them: each weight placeholder becomes a constant attribute of the graph (the
   contract: weights are read once at compile time; change them and you must recompile, as with
   Inductor's ``freezing``);
2. **removes dead channel groups**: units of exact groups whose parameter slices are all zero
   (exact by construction — the model already *is* its masked self), or, with the explicit
   opt-in ``prune=ratio``, the least important ``ratio`` of every exact group (lossy in general);
3. swaps 2:4-sparse ``linear`` weights for semi-structured sparse tensors on CUDA
   (``torch.sparse.to_sparse_semi_structured``; fp16/bf16 only);
4. hands the graph to the downstream backend (``inductor`` by default) and returns a function
   with dynamo's calling convention (the frozen weight arguments are dropped).

Training graphs (grad enabled and an input that requires grad) are passed through untouched.
Options: ``torch.compile(m, backend="secateurs", options={"prune": 0.3, "backend": "eager",
"sparse": True, "verify": True})``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from secateurs.errors import InputError
from secateurs.graph.from_fx import lower_graph_module, propagate_shapes
from secateurs.graph.fx_apply import apply_plan_fx
from secateurs.passes.group_channels import Analysis, group_channels
from secateurs.passes.plan import build_plan

__all__ = ["secateurs_backend", "BackendOptions", "LAST_COMPILE", "dead_units", "freeze_weights"]

log = logging.getLogger(__name__)


@dataclass
class BackendOptions:
    prune: float | None = None
    backend: str | Callable[..., Any] = "inductor"
    sparse: bool = True
    verify: bool = True
    min_numel_sparse: int = 4096

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown secateurs backend options {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        out = cls(**options)
        if out.prune is not None and not 0.0 <= out.prune < 1.0:
            raise InputError(f"options['prune'] must be in [0, 1), got {out.prune}")
        return out


@dataclass
class CompileRecord:
    """What the last compile did (for tests and debugging)."""

    graph: torch.fx.GraphModule | None = None
    removed_units: int = 0
    removed: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    sparse_linears: list[str] = field(default_factory=list)
    training: bool = False
    exact: bool | None = None


LAST_COMPILE = CompileRecord()


def _is_weight(node: torch.fx.Node, value: Any) -> bool:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", "") if source is not None else ""
    name = name() if callable(name) else str(name)
    if "_parameters[" in name or "_buffers[" in name:
        return True
    return isinstance(value, nn.Parameter)


def freeze_weights(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
                   ) -> tuple[torch.fx.GraphModule, list[int]]:
    """Turn weight placeholders into attributes; returns the new module and the positions of
    the inputs it still takes."""
    root = nn.Module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    graph = copy_graph(gm)
    new_placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    keep: list[int] = []
    for i, (old, new, value) in enumerate(zip(placeholders, new_placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or not _is_weight(old, value):
            keep.append(i)
            continue
        attr = f"w{i}_{old.name}"[:120]
        if isinstance(value, nn.Parameter):
            root.register_parameter(attr, nn.Parameter(value.detach(), requires_grad=False))
        else:
            root.register_buffer(attr, value.detach())
        with graph.inserting_before(new):
            got = graph.get_attr(attr)
        new.replace_all_uses_with(got)
        graph.erase_node(new)
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    frozen = torch.fx.GraphModule(root, graph)
    return frozen, keep


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph


def dead_units(analysis: Analysis, tensors: dict[str, torch.Tensor],
               parameters: set[str]) -> dict[int, np.ndarray]:
    """Units of exact, unpinned groups whose producing slices are all zero: every parameter
    member along dim 0 (conv/linear output rows, biases, norm scales and shifts). Consumer
    input columns (dim 1) may be anything: they multiply a channel that is zero."""
    out: dict[int, np.ndarray] = {}
    for g in analysis.groups:
        if g.is_lossy or g.is_pinned or g.size < 2:
            continue
        alive = np.zeros(g.size, dtype=bool)
        seen = False
        for m in g.members:
            if m.param not in parameters or m.dim != 0:
                continue
            t = tensors[m.param].detach()
            dims = [d for d in range(t.dim()) if d != m.dim]
            nonzero = (t != 0).any(dim=dims) if dims else (t != 0)
            alive |= np.bincount(m.units, weights=nonzero.cpu().numpy()[m.positions],
                                 minlength=g.size) > 0
            seen = True
        dead = np.nonzero(~alive & ~g.pinned)[0]
        if seen and len(dead) and len(dead) < g.size:
            out[g.id] = dead
    return out


def _swap_semi_structured(gm: torch.fx.GraphModule, opts: BackendOptions) -> list[str]:
    from secateurs.passes.sparsify import is_nm_sparse

    swapped = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "") != "linear":
            continue
        w = node.args[1] if len(node.args) > 1 else None
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
            continue
        t = getattr(gm, str(w.target))
        if not (t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)
                and t.numel() >= opts.min_numel_sparse and is_nm_sparse(t, 2, 4, axis=1)):
            continue
        from torch.sparse import to_sparse_semi_structured

        setattr(gm, str(w.target), nn.Parameter(to_sparse_semi_structured(t),
                                                requires_grad=False))
        swapped.append(str(w.target))
    return swapped


def _downstream(opts: BackendOptions) -> Callable[..., Any]:
    if callable(opts.backend):
        return opts.backend
    if opts.backend == "eager":
        return lambda gm, inputs: gm.forward
    from torch._dynamo import lookup_backend

    return lookup_backend(opts.backend)


def secateurs_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                      options: dict[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """The dynamo backend (registered as ``secateurs`` via the torch_dynamo_backends entry
    point)."""
    global LAST_COMPILE
    opts = BackendOptions.parse({**(options or {}), **kwargs})
    record = CompileRecord()
    LAST_COMPILE = record
    downstream = _downstream(opts)
    training = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    if training:
        record.training = True
        log.warning("secateurs backend: training graph left unpruned (compile under "
                    "torch.no_grad() / inference_mode for pruning)")
        return downstream(gm, example_inputs)
    frozen, keep = freeze_weights(gm, example_inputs)
    inputs = [example_inputs[i] for i in keep]
    try:
        propagate_shapes(frozen, tuple(inputs))
        analysis = group_channels(lower_graph_module(frozen))
    except Exception as exc:  # noqa: BLE001 - never break compilation over an analysis failure
        log.warning("secateurs backend: analysis failed (%s); compiling unpruned", exc)
        return _call_with(downstream(frozen, inputs), keep)
    tensors = dict(frozen.named_parameters())
    tensors.update(frozen.named_buffers())
    params = {n for n, _ in frozen.named_parameters()}
    if opts.prune:
        from secateurs.passes.importance import ScoreContext, get_criterion, normalize
        from secateurs.passes.prune import select_units

        crit = get_criterion("l2")
        ctx = ScoreContext(tensors)
        scores = {g.id: normalize(np.asarray(crit(g, ctx))) for g in analysis.groups
                  if g.prunable and g.size > 1}
        removed = select_units(analysis, scores, opts.prune)
    else:
        removed = dead_units(analysis, tensors, params)
    if removed:
        plan = build_plan(analysis, removed)
        reference = frozen
        pruned = apply_plan_fx(copy_module(frozen), plan)
        if opts.verify and not opts.prune:
            record.exact = _same_outputs(reference, pruned, inputs)
            if not record.exact:
                log.warning("secateurs backend: dead-channel removal changed outputs; "
                            "compiling unpruned")
                pruned = reference
        if pruned is not reference:
            frozen = pruned
            record.removed = plan.removed
            record.removed_units = sum(len(v) for v in removed.values())
    if opts.sparse:
        record.sparse_linears = _swap_semi_structured(frozen, opts)
    record.graph = frozen
    return _call_with(downstream(frozen, inputs), keep)


def copy_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    root = nn.Module()
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, nn.Parameter(p.detach().clone(), requires_grad=False))
    for name, b in gm.named_buffers(recurse=False):
        root.register_buffer(name, b.clone())
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    return torch.fx.GraphModule(root, copy_graph(gm))


def _same_outputs(a: torch.fx.GraphModule, b: torch.fx.GraphModule, inputs: list[Any]) -> bool:
    with torch.no_grad():
        ra, rb = a(*inputs), b(*inputs)
    ra = ra if isinstance(ra, (list, tuple)) else (ra,)
    rb = rb if isinstance(rb, (list, tuple)) else (rb,)
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(ra, rb)
               if isinstance(x, torch.Tensor))


def _call_with(compiled: Callable[..., Any], keep: list[int]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in keep])

    return run
