"""torch frontend: trace a model and lower it to the channel graph.

Tracing tries ``torch.fx.symbolic_trace`` first (the pruned model is then the traced
``GraphModule``, readable Python), and falls back to ``torch.export`` for models FX cannot
trace (data-dependent control flow, Hugging Face models); the exported program's unlifted
module is again a ``GraphModule`` whose parameters keep the original qualified names.

Shapes come from propagation on the ``meta`` device (no compute, no memory for activations):
common ops (convs, linear, norms, elementwise, cat, matmul) by shape formulas, the rest by
running their meta kernels; ``ShapeProp`` under ``FakeTensorMode`` is the fallback.

Lowering: every FX node becomes zero or more canonical nodes. Functions, methods and ATen ops
are keyed by one name (``conv2d``, ``view``, ``add``...) in ``_CALLS``; ``nn`` leaf modules by
type in ``_MODULES``. Parameters and buffers become values named by their qualified name, so
plans are keyed by ``named_parameters()``/``named_buffers()`` names. Anything unknown lowers to
``opaque``, which pins what touches it.

This module is the frontend's entry point; the stages live in their own files:
``fx_trace`` (tracing), ``fx_shapes`` (shape propagation and formulas), ``fx_lower`` (the
lowering table).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secateurs.graph.fx_fold import fold_constant_sources
from secateurs.graph.fx_lower import (  # noqa: F401 - re-exported
    _SHAPE_KEY,
    _SIGS,
    _node_shape,
    _shape_of,
    call_key,
    lower_graph_module,
)
from secateurs.graph.fx_shapes import _SHAPE_FNS, propagate_shapes  # noqa: F401 - re-exported
from secateurs.graph.fx_trace import _as_tuple, trace  # noqa: F401 - re-exported
from secateurs.graph.ir import ChannelGraph

__all__ = ["trace", "from_fx", "lower_graph_module", "call_key", "propagate_shapes",
           "example_signature"]

log = logging.getLogger(__name__)


def from_fx(model: nn.Module, example_inputs: Any,
            copy_model: bool = True) -> tuple[ChannelGraph, torch.fx.GraphModule, str]:
    """Trace (a copy of) ``model``, propagate shapes and lower to the channel graph."""
    if copy_model:
        model = copy.deepcopy(model)
    gm, how = trace_folded(model, example_inputs)
    propagate_shapes(gm, example_inputs)
    graph = lower_graph_module(gm)
    log.debug("channel graph (%s):\n%s", how, graph.summary())
    return graph, gm, how


def trace_folded(model: nn.Module, example_inputs: Any) -> tuple[torch.fx.GraphModule, str]:
    """``trace``, then the tensors the graph computes from constants alone folded into
    constants (``fx_fold``: ALiBi slopes, frequency tables), so their dims can follow the
    channels they meet. Every trace a plan is made on or applied to goes through here (the HF
    path, which applies plans to the HF module itself, traces without it)."""
    gm, how = trace(model, example_inputs)
    n = fold_constant_sources(gm)
    if n:
        log.info("folded %d tensor(s) computed from constants alone into constants", n)
    return gm, how


def example_signature(example_inputs: Any) -> Sequence[Any]:
    return [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in _as_tuple(example_inputs)]
