"""Where things are in a Hugging Face model: the layer list, hidden size, head dim, which 2-D
weights are projections (and which of their dims is the output), attention modules.

Shared by the analysis (``classify``), the apply (``apply``), the loader and layer replication
(``scale``); it imports none of them."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from secateurs.errors import InputError

__all__ = ["block_list", "hidden_size", "head_dim", "linear_dims", "unit_dims", "out_features",
           "is_attention", "positional_inputs", "no_cache"]


def linear_dims(model: nn.Module) -> dict[str, tuple[int, int]]:
    """weight FQN -> (out dim, in dim) for nn.Linear and HF Conv1D (weight [in, out])."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Linear):
            out[prefix + "weight"] = (0, 1)
        elif type(mod).__name__ == "Conv1D":
            out[prefix + "weight"] = (1, 0)
    return out



def unit_dims(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``linear_dims`` plus convolutions (weight [out, in/groups, ...]): the tensors whose
    output dim names a unit kind (convnets have channels where transformers have MLPs)."""
    out = linear_dims(model)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Conv1d) and isinstance(mod.weight, torch.Tensor):
            out[f"{name}.weight" if name else "weight"] = (0, 1)
    return out


def hidden_size(config: Any) -> int:
    return int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)



def head_dim(config: Any) -> int:
    """The config's head size (0 for models without a single head count, e.g. convnets or
    per-stage head lists)."""
    hd = getattr(config, "head_dim", None)
    if isinstance(hd, int) and hd:
        return hd
    heads = None
    for attr in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        val = getattr(config, attr, None)
        if isinstance(val, int) and val > 0:
            heads = val
            break
    hidden = hidden_size(config)
    return hidden // heads if heads and hidden else 0


def out_features(mod: nn.Module) -> int:
    w = mod.weight
    return int(w.shape[1] if type(mod).__name__ == "Conv1D" else w.shape[0])


def is_attention(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "scaling", None), float) and \
        any(hasattr(mod, q) for q in ("q_proj", "query", "c_attn"))


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0))
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            if best is None or len(name) < len(best[0]):
                best = (name, mod)
    if best is None:
        raise InputError(f"cannot find the list of {n} layers in {type(model).__name__}")
    return best



def positional_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    """``example_inputs`` as the positional arguments the tracer takes: a tensor, a tuple, or
    a dict of keyword arguments as a tokenizer returns it (``BatchEncoding`` too), placed by
    the model's ``forward`` signature (``None`` for the arguments in between)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    if not isinstance(example_inputs, Mapping) and not hasattr(example_inputs, "keys"):
        raise InputError(f"example_inputs must be a tensor, a tuple of positional arguments "
                         f"or a dict of keyword arguments, got {type(example_inputs).__name__}")
    kwargs = {k: example_inputs[k] for k in example_inputs.keys()}
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)]
    names = [p.name for p in params]
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise InputError(f"{type(model).__name__}.forward takes no positional argument "
                         f"{unknown[0]!r} (it takes {names[:8]}); drop it from the inputs")
    last = max(names.index(k) for k in kwargs) if kwargs else -1
    return tuple(kwargs.get(n, params[i].default if params[i].default is not
                            inspect.Parameter.empty else None)
                 for i, n in enumerate(names[:last + 1]))


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """``use_cache=False`` on the model's config and every config a submodule holds (T5's
    stacks copy theirs) while tracing: a KV cache object is not a tensor the tracer follows.
    Restored on exit."""
    saved = []
    seen: set[int] = set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "use_cache"):
            continue
        seen.add(id(cfg))
        saved.append((cfg, cfg.use_cache))
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg, val in saved:
            cfg.use_cache = val
