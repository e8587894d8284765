"""Model specs shared by commands: ``zoo:NAME``, ``path/to/file.py:factory`` or ``*.onnx``."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx

from secateurs.errors import InputError
from secateurs.runtime.io import atomic_save_export, atomic_save_torch, atomic_write_bytes

__all__ = ["load_torch_spec", "parse_shapes", "is_onnx", "save_model", "atomic_write_text",
           "export_program"]


def is_onnx(spec: str) -> bool:
    return spec.lower().endswith(".onnx")


def parse_shapes(items: list[str] | None) -> list[tuple[int, ...]]:
    """``["1,3,224,224", "1,16"]`` -> shapes; a ``name=`` prefix is accepted and ignored.

    Every dim must be a positive integer: a batch of 0 would export a model that only runs on
    empty inputs."""
    shapes = []
    for item in items or []:
        text = item.split("=", 1)[-1]
        try:
            shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
        except ValueError as exc:
            raise InputError(f"--input-shape '{item}' is not a comma-separated list of "
                             "integers, e.g. 1,3,224,224") from exc
        if not shape:
            raise InputError(f"--input-shape '{item}' is empty; give the dims, e.g. 1,3,224,224")
        if any(d < 1 for d in shape):
            raise InputError(f"--input-shape '{item}': every dim must be >= 1 (batch 0 or a "
                             "negative size cannot run); e.g. 1,3,224,224")
        shapes.append(shape)
    return shapes


def load_torch_spec(spec: str, shapes: list[tuple[int, ...]] | None = None,
                    require_inputs: bool = True) -> tuple[torch.nn.Module, tuple | None]:
    """Build the model a spec names and example inputs for it.

    ``zoo:NAME`` brings its own inputs; ``path/to/file.py:factory`` may return a module or a
    ``(module, example_inputs)`` pair, or the file may define ``example_inputs()``; inputs
    given as a dict of keyword arguments are placed by ``forward``'s signature;
    ``shapes`` (from ``--input-shape``) override them with random tensors.
    """
    shapes = shapes or []
    if spec.startswith("zoo:"):
        from secateurs import zoo

        entry = zoo.get(spec[4:])
        model = entry.build()
        inputs = entry.example_inputs()
        if shapes:
            inputs = tuple(torch.randn(s) if i >= len(inputs) or inputs[i].is_floating_point()
                           else torch.randint(0, 2, s) for i, s in enumerate(shapes))
        return model, inputs
    if ".py:" not in spec:
        raise InputError(f"model spec '{spec}' is neither zoo:NAME, path/to/file.py:factory "
                         "nor an .onnx file")
    path, factory = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise InputError(f"model file '{path}' does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_secateurs_user_{Path(path).stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise InputError(f"cannot import '{path}' as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code: one clear line, not a traceback
        raise InputError(f"model file '{path}' failed to import: {_one_line(exc)} (run it "
                         "with python to see where)") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise InputError(f"'{path}' has no callable '{factory}'")
    try:
        built = fn()
    except Exception as exc:  # noqa: BLE001 - user code
        raise InputError(f"'{spec}': {factory}() raised {_one_line(exc)}") from exc
    inputs: Any = None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
        built, inputs = built
    if not isinstance(built, torch.nn.Module):
        raise InputError(f"'{spec}' returned {type(built).__name__}; return an nn.Module or "
                         "(module, example_inputs)")
    built.eval()
    if shapes:
        return built, tuple(torch.randn(s) for s in shapes)
    example = getattr(module, "example_inputs", None)
    if inputs is None and callable(example):
        try:
            inputs = example()
        except Exception as exc:  # noqa: BLE001 - user code
            raise InputError(f"'{path}': example_inputs() raised {_one_line(exc)}") from exc
    if isinstance(inputs, Mapping) or (inputs is not None and hasattr(inputs, "keys")):
        # keyword inputs (a tokenizer's output): placed by forward's signature, as prune_hf
        # does; passed as one positional dict they were forward(x={...})
        from secateurs.hf.layout import positional_inputs

        inputs = positional_inputs(built, inputs)
    if inputs is not None:
        return built, inputs if isinstance(inputs, tuple) else (inputs,)
    if require_inputs:
        raise InputError(f"'{spec}' needs example input shapes: pass --input-shape "
                         "1,3,224,224 (once per input) or define example_inputs() next to the "
                         "factory")
    return built, None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def export_program(model: torch.nn.Module, inputs: tuple, dynamic_batch: bool = True
                   ) -> tuple[Any, str | None]:
    """``torch.export`` the model; with ``dynamic_batch`` dim 0 of every tensor input is one
    symbolic ``batch`` (>= 1), so the program runs on any batch size. Returns the program and
    a note when the model forced a fixed batch (the program then takes the example's only).

    An example batch of 1 is duplicated to 2 for the trace: torch.export specialises size-1
    dims to constants."""
    inputs = tuple(inputs)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not dynamic_batch or not tensors or any(t.dim() == 0 for t in tensors) \
            or len({t.shape[0] for t in tensors}) != 1:
        return torch.export.export(model, inputs), None
    traced = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.shape[0] == 1 else x
                   for x in inputs)
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in inputs)
    try:
        return torch.export.export(model, traced, dynamic_shapes=dynamic), None
    except Exception as exc:  # noqa: BLE001 - the model pins its batch: say so, keep it fixed
        note = (f"the model does not export with a dynamic batch ({_one_line(exc)[:200]}); "
                f"wrote a program for batch {tensors[0].shape[0]} only")
        return torch.export.export(model, inputs), note


def save_model(model: torch.nn.Module, inputs: tuple, path: str,
               dynamic_batch: bool = True) -> str | None:
    """Save a pruned module atomically: ``.pt2`` as a torch.export program with a dynamic batch
    dim (load with ``torch.export.load(path).module()``), ``.pt``/``.pth`` with ``torch.save``
    (load with ``torch.load(path, weights_only=False)``). Returns a note for the user, if any."""
    if path.endswith(".pt2"):
        program, note = export_program(model, inputs, dynamic_batch)
        atomic_save_export(program, path)
        return note
    if isinstance(model, torch.fx.GraphModule):
        from secateurs.graph.fx_trace import picklable

        picklable(model, inputs)  # prune's models are already; a GraphModule given as is too
    try:
        atomic_save_torch(model, path)
    except (AttributeError, TypeError, pickle.PicklingError) as exc:
        raise InputError(f"this torch ({torch.__version__}) cannot pickle the pruned "
                         f"GraphModule ({exc}); write a .pt2 file instead (-o model.pt2, "
                         "loaded with torch.export.load(path).module())") from exc
    return None


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(path, text.encode())
