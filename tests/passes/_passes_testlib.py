"""Helpers shared by the tests in this directory."""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import nn


def export_onnx(model: nn.Module, x: torch.Tensor, dynamic_batch: bool = True) -> onnx.ModelProto:
    """``model`` at input ``x`` through the TorchScript exporter (opset 17), input ``x`` and
    output ``y``; ``dynamic_batch``: dim 0 of both symbolic (``batch``)."""
    buf = io.BytesIO()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())
