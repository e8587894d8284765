"""Running a model over calibration batches: one calling convention and hooked prefix runs.

A batch is a dict of keyword arguments (tokenizer output), a tuple or list of positional
arguments, a ``BoundArgs`` (both: a module's captured call), or a single input. ``run_hooked`` runs every batch with forward-pre hooks; a hook
that raises ``StopForward`` ends that batch's forward early, so only the model prefix up to the
layer being calibrated runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["BoundArgs", "call_batch", "StopForward", "run_hooked"]


@dataclass(frozen=True)
class BoundArgs:
    """A captured call: positional and keyword arguments, replayed as ``module(*args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def call_batch(model: nn.Module, batch: Any, **extra: Any) -> Any:
    """``model`` on one calibration batch (dict: keywords; tuple/list: positional)."""
    if isinstance(batch, BoundArgs):
        return model(*batch.args, **batch.kwargs, **extra)
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    return model(batch, **extra)


class StopForward(Exception):
    """Raised by a hook once what it wanted is captured: ends that batch's forward."""


PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]


def run_hooked(model: nn.Module, batches: Iterable[Any],
               hooks: Iterable[tuple[nn.Module, PreHook]]) -> None:
    """Run ``model`` (no grad) on every batch with ``hook(module, args, kwargs)`` called before
    each hooked module's forward; the hooks are removed afterwards, also on error."""
    handles = [mod.register_forward_pre_hook(
        lambda m, args, kwargs, fn=fn: fn(m, args, kwargs), with_kwargs=True)
        for mod, fn in hooks]
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    call_batch(model, batch)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
