"""Fold tensors a traced graph computes from constants alone into constant tensors.

``torch.fx.symbolic_trace`` runs a factory call without a proxy argument (``torch.arange(8)``)
eagerly and records its result as a tensor constant; ``torch.export`` records the call. A
tensor the forward builds from factories and literals only (BLOOM's and MPT's ALiBi slopes
``pow(base, arange(1, 1 + heads))``, a sinusoidal frequency table ``exp(-log(1e4) *
arange(d) / d)``) is then a *source* whose positions the channel rules cannot slice: a
source's values depend on its size (``arange(n)`` is not ``arange(n + 1)[:n]`` for every
function of it), so its dims are pinned, and with them the heads the slopes are added to.

Folded into a constant (one non-persistent buffer per maximal constant subgraph, named
``_secateurs_const_<k>``, so it moves with ``.to(device)``), it is a tensor like any other: its
dims follow the channels they meet and the apply slices it, keeping each surviving head's own
slope. That is exactly the mask-equivalence contract — the original's values at the positions
that stay.

Folded: tensors that depend on no graph input, parameter or registered buffer (state a user
may load), reached from at least one factory call, with at most ``MAX_NUMEL`` elements, that
nothing writes into, and whose computation draws no random numbers. Deterministic in graph
order, so ``apply_plan`` on a fresh trace folds the same constants under the same names.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from secateurs.graph.fx_lower import RANDOM_CALLS, call_key, first_user
from secateurs.graph.fx_trace import _fetch_attr

__all__ = ["fold_constant_sources", "written_through", "FOLD_PREFIX", "MAX_NUMEL"]

FOLD_PREFIX = "_secateurs_const_"
MAX_NUMEL = 1 << 16

# a lifted literal (``lift_fresh_copy`` of a ``get_attr``) is a constant input, not a source:
# it is a tensor constant already, and folding it alone would only rename it
_FACTORIES = {"arange", "linspace", "logspace", "tensor", "scalar_tensor", "zeros", "ones",
              "full", "eye"}
# random draws, and uninitialised memory, are never constants
_NOT_CONSTANT = RANDOM_CALLS | {"dropout", "empty", "empty_like", "empty_strided"}
_HARMLESS_INPLACE = {"detach"}  # torch.export's ``detach_`` after ``lift_fresh_copy``


def _writes(node: torch.fx.Node) -> bool:
    """The node writes into one of its inputs (ATen mutable schema, a ``x.add_()`` method
    call, an item assignment)."""
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable and call_key(node) not in _HARMLESS_INPLACE
    return node.op == "call_method" and str(node.target).endswith("_") and \
        str(node.target)[:-1] not in _HARMLESS_INPLACE


def _aliases(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None:  # FX methods and functions: views by name
        return call_key(node) in ("view", "reshape", "expand", "transpose", "permute",
                                  "getitem", "unsqueeze", "squeeze", "flatten", "t",
                                  "narrow", "select", "slice", "detach", "contiguous")
    return bool(schema.returns) and schema.returns[0].alias_info is not None


def written_through(node: torch.fx.Node) -> bool:
    """Something downstream of ``node``, through ops whose output aliases their input, writes
    into it."""
    return first_user(node, lambda u: "hit" if _writes(u) else
                      "follow" if _aliases(u) else "skip") is not None


def fold_constant_sources(gm: torch.fx.GraphModule) -> int:
    """Fold, in place, every maximal constant subgraph reached from a factory call; returns
    how many tensors were folded (``gm`` is recompiled if any)."""
    state = {id(t) for t in gm.parameters()} | {id(t) for t in gm.buffers()}
    values: dict[torch.fx.Node, Any] = {}
    sourced: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = _fetch_attr(gm, str(node.target), missing_ok=True)
            if isinstance(obj, torch.Tensor) and id(obj) not in state:
                values[node] = obj
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        key = call_key(node)
        inputs = node.all_input_nodes
        if key in _NOT_CONSTANT or any(i not in values for i in inputs):
            continue
        if not inputs and key not in _FACTORIES:
            continue
        traced = node.meta.get("val")  # torch.export's record: never build a large constant
        if isinstance(traced, torch.Tensor) and isinstance(traced.numel(), int) and \
                traced.numel() > MAX_NUMEL:
            continue
        args = torch.fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                else:
                    out = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not foldable: the node stays as traced
            continue
        values[node] = out
        if key in _FACTORIES or any(i in sourced for i in inputs):
            sourced.add(node)
    folded = 0
    for node in list(gm.graph.nodes):
        value = values.get(node)
        if node not in sourced or not isinstance(value, torch.Tensor) or \
                value.numel() > MAX_NUMEL or value.is_meta:
            continue
        outside = [u for u in node.users if u not in values]
        if not outside or written_through(node):
            continue
        name = f"{FOLD_PREFIX}{folded}"
        while hasattr(gm, name):
            folded += 1
            name = f"{FOLD_PREFIX}{folded}"
        gm.register_buffer(name, value.detach().clone(), persistent=False)
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        for user in outside:
            user.replace_input_with(node, const)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded
