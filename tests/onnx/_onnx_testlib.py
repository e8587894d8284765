"""Shared helpers for the ONNX tests: zoo exports (cached per session) and small graphs.

(This directory has no ``__init__.py`` on purpose: a package ``tests/onnx`` would shadow the
``onnx`` library wherever ``tests/`` is on ``sys.path``.)"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from secateurs import zoo

_CACHE: dict[tuple[str, bool, bool], Path] = {}


def export_zoo(name: str, directory: Path, dynamo: bool = False,
               dynamic_batch: bool = False) -> Path:
    """Export zoo model ``name`` to ONNX (TorchScript exporter, opset 17, unless ``dynamo``)."""
    key = (name, dynamo, dynamic_batch)
    if key in _CACHE:
        return _CACHE[key]
    entry = zoo.get(name)
    model, inputs = entry.build(), entry.example_inputs()
    path = directory / f"{name}{'_dynamo' if dynamo else ''}{'_dyn' if dynamic_batch else ''}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, inputs, str(path), dynamo=True, opset_version=18)
        else:
            kwargs = {}
            if dynamic_batch:
                kwargs = {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch"}}}
            torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17, **kwargs)
    _CACHE[key] = path
    return path


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def init(name: str, arr: np.ndarray | Sequence[int]) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def make_model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]],
               outputs: dict[str, list[int] | None], initializers: list[TensorProto],
               value_info: dict[str, list[int]] | None = None,
               extra_opsets: Sequence[tuple[str, int]] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        initializers,
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                    for n, s in (value_info or {}).items()])
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    # onnxruntime 1.31 reads IR versions up to 11; onnx 1.23 would default to a newer one.
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)
