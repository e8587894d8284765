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


# ---------------------------------------------------------------- exporter matrix

# Zoo models an exporter itself cannot export (checked: the exporter raises), with the reason.
EXPORT_FAILS = {
    ("untraceable_cond", "torchscript"): "the TorchScript tracer refuses torch.cond",
    ("beit_relpos", "dynamo"): "torch.export's decomposition of the relative-position gather "
                               "fails (ConversionError, step 2/3)",
    ("t5_buckets", "torchscript"): "TorchScript has no ONNX symbolic for aten::rms_norm at "
                                   "opset 17 (UnsupportedOperatorError)",
    ("hiera_unroll", "dynamo"): "onnxscript's scaled_dot_product_attention takes only 4-D "
                                "q/k/v (GraphConstructionError); Hiera's are 5-D",
    ("sdpa_gqa", "torchscript"): "the TorchScript exporter has no conversion of "
                                 "scaled_dot_product_attention with enable_gqa=True",
    ("meta_llama", "torchscript"): "the TorchScript exporter has no conversion of aten::polar "
                                   "(complex tensors) at opset 17",
}
_MATRIX: dict[tuple[str, str, int, bool], tuple[onnx.ModelProto, tuple[torch.Tensor, ...]]] = {}


def batched_inputs(name: str, batch: int) -> tuple[torch.Tensor, ...]:
    """The zoo example inputs at another batch size (dim 0): rows tiled from the example,
    float rows perturbed so that they differ."""
    out = []
    for k, t in enumerate(zoo.get(name).example_inputs()):
        reps = -(-batch // t.shape[0])
        x = t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].clone()
        if x.dtype.is_floating_point:
            gen = torch.Generator().manual_seed(1000 * batch + k)
            x += 0.1 * torch.randn(x.shape, generator=gen)
        out.append(x)
    return tuple(out)


def export_matrix(name: str, exporter: str, batch: int, dynamic: bool
                  ) -> tuple[onnx.ModelProto, tuple[torch.Tensor, ...]]:
    """Zoo model ``name`` exported as users do (``torch.onnx.export`` defaults: TorchScript
    opset 17 with constant folding, or dynamo opset 18 with its optimiser) at ``batch``;
    ``dynamic`` marks dim 0 of every input as ``batch``. Cached per session."""
    import contextlib
    import io

    key = (name, exporter, batch, dynamic)
    if key in _MATRIX:
        return _MATRIX[key]
    if (name, exporter) in EXPORT_FAILS:
        import pytest
        pytest.skip(f"{exporter} cannot export {name}: {EXPORT_FAILS[(name, exporter)]}")
    model, inputs = zoo.get(name).build(), batched_inputs(name, batch)
    names = [f"in{i}" for i in range(len(inputs))]
    kwargs: dict = {"input_names": names}
    if dynamic:
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            proto = torch.onnx.export(model, inputs, dynamo=True, opset_version=18,
                                      **kwargs).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(model, inputs, buf, dynamo=False, opset_version=17, **kwargs)
            proto = onnx.load_from_string(buf.getvalue())
    _MATRIX[key] = (proto, inputs)
    return proto, inputs


def input_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Declared dims (ints or symbol names) of the graph inputs and outputs."""
    out = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        tt = vi.type.tensor_type
        out[vi.name] = [d.dim_param or d.dim_value for d in tt.shape.dim]
    return out
