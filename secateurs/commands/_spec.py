"""Model specs shared by commands: ``zoo:NAME``, ``path/to/file.py:factory`` or ``*.onnx``."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from secateurs.errors import InputError

__all__ = ["load_torch_spec", "parse_shapes", "atomic_torch_save", "is_onnx", "save_model",
           "atomic_write_text"]


def _publish(tmp: str, path: str) -> None:
    """Rename into place with the permissions a plain open() would have given."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


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


def load_torch_spec(spec: str, shapes: list[tuple[int, ...]]) -> tuple[torch.nn.Module, tuple]:
    """Build the model a spec names and example inputs for it."""
    if spec.startswith("zoo:"):
        from secateurs import zoo

        entry = zoo.get(spec[4:])
        model = entry.build()
        inputs = entry.example_inputs()
        if shapes:
            inputs = tuple(torch.randn(s) if i >= len(inputs) or inputs[i].is_floating_point()
                           else torch.randint(0, 2, s) for i, s in enumerate(shapes))
        return model, inputs
    if ":" not in spec:
        raise InputError(f"model spec '{spec}' is neither zoo:NAME, path/to/file.py:factory "
                         "nor an .onnx file")
    path, factory = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise InputError(f"model file '{path}' does not exist")
    mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if mod_spec is None or mod_spec.loader is None:
        raise InputError(f"cannot import '{path}' as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules.setdefault(mod_spec.name, module)
    mod_spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise InputError(f"'{path}' has no callable '{factory}'")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    if shapes:
        return model, tuple(torch.randn(s) for s in shapes)
    example = getattr(module, "example_inputs", None)
    if callable(example):
        inputs: Any = example()
        return model, inputs if isinstance(inputs, tuple) else (inputs,)
    raise InputError(f"'{spec}' needs example input shapes: pass --input-shape 1,3,224,224 "
                     "(once per input) or define example_inputs() next to the factory")


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".secateurs-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: torch.nn.Module, inputs: tuple, path: str) -> None:
    """Save a pruned module atomically: ``.pt2`` as a torch.export program (load with
    ``torch.export.load(path).module()``), anything else with ``torch.save`` (load with
    ``torch.load(path, weights_only=False)``)."""
    if path.endswith(".pt2"):
        program = torch.export.export(model, tuple(inputs))
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".secateurs-", suffix=".pt2", dir=folder)
        os.close(fd)
        try:
            torch.export.save(program, tmp)
            _publish(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    if isinstance(model, torch.fx.GraphModule):
        # torch 2.13 cannot pickle a GraphModule whose placeholders carry a Tensor type
        # annotation (the generated code imports it by a name it cannot resolve); the
        # annotations are cosmetic, so drop them.
        for node in model.graph.nodes:
            node.type = None
        model.recompile()
    try:
        atomic_torch_save(model, path)
    except (AttributeError, TypeError) as exc:  # GraphModule pickling breaks on some torch
        raise InputError(f"this torch ({torch.__version__}) cannot pickle the pruned "
                         f"GraphModule ({exc}); write a .pt2 file instead (-o model.pt2, "
                         "loaded with torch.export.load(path).module())") from exc


def atomic_write_text(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".secateurs-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
