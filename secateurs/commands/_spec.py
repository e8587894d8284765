"""Model specs shared by commands: ``zoo:NAME``, ``path/to/file.py:factory`` or ``*.onnx``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
import torch.fx

from secateurs.errors import InputError
from secateurs.runtime.io import atomic_path, atomic_save_torch, atomic_write_bytes

__all__ = ["load_torch_spec", "parse_shapes", "is_onnx", "save_model", "atomic_write_text"]


def is_onnx(spec: str) -> bool:
    return spec.lower().endswith(".onnx")


def parse_shapes(items: list[str] | None) -> list[tuple[int, ...]]:
    """``["1,3,224,224", "1,16"]`` -> shapes; a ``name=`` prefix is accepted and ignored."""
    shapes = []
    for item in items or []:
        text = item.split("=", 1)[-1]
        try:
            shapes.append(tuple(int(v) for v in text.replace("x", ",").split(",") if v))
        except ValueError as exc:
            raise InputError(f"--input-shape '{item}' is not a comma-separated list of "
                             "integers, e.g. 1,3,224,224") from exc
    return shapes


def load_torch_spec(spec: str, shapes: list[tuple[int, ...]] | None = None,
                    require_inputs: bool = True) -> tuple[torch.nn.Module, tuple | None]:
    """Build the model a spec names and example inputs for it.

    ``zoo:NAME`` brings its own inputs; ``path/to/file.py:factory`` may return a module or a
    ``(module, example_inputs)`` pair, or the file may define ``example_inputs()``;
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
    mod_spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise InputError(f"'{path}' has no callable '{factory}'")
    built = fn()
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
        inputs = example()
    if inputs is not None:
        return built, inputs if isinstance(inputs, tuple) else (inputs,)
    if require_inputs:
        raise InputError(f"'{spec}' needs example input shapes: pass --input-shape "
                         "1,3,224,224 (once per input) or define example_inputs() next to the "
                         "factory")
    return built, None


def save_model(model: torch.nn.Module, inputs: tuple, path: str) -> None:
    """Save a pruned module atomically: ``.pt2`` as a torch.export program (load with
    ``torch.export.load(path).module()``), anything else with ``torch.save`` (load with
    ``torch.load(path, weights_only=False)``)."""
    if path.endswith(".pt2"):
        program = torch.export.export(model, tuple(inputs))
        with atomic_path(path) as tmp:
            torch.export.save(program, str(tmp))
        return
    if isinstance(model, torch.fx.GraphModule):
        # torch 2.13 cannot pickle a GraphModule whose placeholders carry a Tensor type
        # annotation (the generated code imports it by a name it cannot resolve); the
        # annotations are cosmetic, so drop them.
        for node in model.graph.nodes:
            node.type = None
        model.recompile()
    try:
        atomic_save_torch(model, path)
    except (AttributeError, TypeError) as exc:  # GraphModule pickling breaks on some torch
        raise InputError(f"this torch ({torch.__version__}) cannot pickle the pruned "
                         f"GraphModule ({exc}); write a .pt2 file instead (-o model.pt2, "
                         "loaded with torch.export.load(path).module())") from exc


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(path, text.encode())
