"""Export a torch model (plain ``nn.Module`` or ``fx.GraphModule``) to a checked ONNX model.

``export_onnx`` = ``torch.onnx.export`` + ``onnx.checker.check_model(full_check=True)`` + a
numeric comparison against torch through ONNX Runtime, then an atomic write.

Which exporter (measured with torch 2.13, onnx 1.23, onnxscript 0.7, on a Conv-BN-ReLU-Linear CNN
and a pre-norm attention + MLP block, both as plain modules and as ``fx.GraphModule``):

* both exporters produce numerically identical graphs (max abs diff ~1e-7) for all four;
* the legacy TorchScript exporter (``dynamo=False``) honours the requested opset exactly, takes
  0.02-0.15 s, and with ``do_constant_folding=False`` names *every* initializer by its torch
  parameter / buffer FQN (``conv.weight``, ``bn.running_var``, ``mlp.0.weight``) with values
  equal to the parameters. With constant folding on it folds BatchNorm into the conv and
  renames the result ``onnx::Conv_16``. It raises a ``DeprecationWarning`` in 2.13;
* the ``torch.export`` exporter (``dynamo=True``) takes 1-6 s, always emits opset >= 18 (asking
  for 17 logs a failed down-conversion traceback and returns opset 18), and its default
  optimiser folds BatchNorm into the conv **but keeps the name ``conv.weight`` for the folded
  values** and replaces transposed Linear weights by anonymous ``val_N`` constants. With
  ``optimize=False`` it keeps every parameter under its FQN, unchanged.

So ``exporter="auto"`` uses TorchScript for opset <= 17 (exact opset, fast, traceable names)
and ``torch.export`` for opset >= 18 or when TorchScript is unavailable or fails; the other is
tried if the first raises. ``keep_names=True`` (default) turns off the folding that renames or
silently rewrites parameters, so an initializer called ``layer1.0.conv1.weight`` holds exactly
that parameter; ONNX Runtime and TensorRT fold BatchNorm themselves at load time. The exporter
used is recorded in the model's ``metadata_props`` (``secateurs.exporter``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secateurs.errors import InputError, SecateursError

__all__ = ["export_onnx", "ExportError", "VerificationError", "OutputMismatch", "verify_onnx"]

_log = logging.getLogger(__name__)

_EXPORTERS = ("auto", "torchscript", "dynamo")


class ExportError(SecateursError):
    """``torch.onnx.export`` could not export the model, or the result failed the checker."""


@dataclass(frozen=True)
class OutputMismatch:
    """One output whose ONNX Runtime value differs from torch beyond tolerance."""

    name: str
    max_abs_diff: float
    shape_torch: tuple[int, ...]
    shape_onnx: tuple[int, ...]


class VerificationError(SecateursError):
    """The exported model's ONNX Runtime outputs differ from torch's."""

    def __init__(self, mismatches: Sequence[OutputMismatch], rtol: float, atol: float):
        self.mismatches = tuple(mismatches)
        lines = [
            f"output '{m.name}': max abs diff {m.max_abs_diff:.3g} "
            f"(torch shape {list(m.shape_torch)}, onnx shape {list(m.shape_onnx)})"
            for m in self.mismatches
        ]
        super().__init__(
            f"ONNX export does not match torch (rtol={rtol:g}, atol={atol:g}): "
            + "; ".join(lines)
            + ". Check for ops the exporter lowers differently (in-place ops, data-dependent "
            "control flow, training-mode BatchNorm/Dropout: call model.eval() first)."
        )


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Outputs in the order the exporters emit them (depth-first over tuples/lists/dicts)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten_outputs(v)]
    return []  # non-tensor outputs (None, ints) are not graph outputs


def _input_names(model: torch.nn.Module, n: int) -> list[str]:
    """Forward's positional parameter names, so the ONNX inputs read like the Python ones."""
    try:
        params = [
            p.name for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= n and len(set(params[:n])) == n:
        return params[:n]
    return [f"input_{i}" for i in range(n)]


def _output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _export_torchscript(model: torch.nn.Module, args: tuple[Any, ...], opset: int,
                        input_names: list[str], output_names: list[str],
                        dynamic_axes: dict[str, dict[int, str]] | None,
                        keep_names: bool) -> Any:
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model, args, buf, dynamo=False, opset_version=opset,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            do_constant_folding=not keep_names,
        )
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(model: torch.nn.Module, args: tuple[Any, ...], opset: int,
                   input_names: list[str], output_names: list[str],
                   dynamic_axes: dict[str, dict[int, str]] | None,
                   keep_names: bool) -> Any:
    # The torch.export exporter cannot go below opset 18 (see module docstring).
    opset = max(opset, 18)
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript"), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args, dynamo=True, opset_version=opset, verbose=False,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            optimize=not keep_names,
        )
    return program.model_proto


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Any:
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _exporter_order(exporter: str, opset: int) -> list[str]:
    if exporter not in _EXPORTERS:
        raise InputError(f"exporter must be one of {_EXPORTERS}, got {exporter!r}")
    if exporter != "auto":
        return [exporter]
    return ["torchscript", "dynamo"] if opset <= 17 else ["dynamo", "torchscript"]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def verify_onnx(
    model_proto: Any,
    example_inputs: Any,
    expected: Sequence[torch.Tensor],
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> float:
    """Run ``model_proto`` in ONNX Runtime (CPU) and compare with ``expected``.

    Returns the largest absolute difference over all outputs; raises ``VerificationError``
    naming every output that is not ``allclose``.
    """
    import onnxruntime as ort

    args = _as_tuple(example_inputs)
    sess = ort.InferenceSession(model_proto.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    feeds = {i.name: _to_numpy(t) for i, t in zip(sess.get_inputs(), args)}
    names = [o.name for o in sess.get_outputs()]
    got = sess.run(names, feeds)
    if len(got) != len(expected):
        raise VerificationError(
            [OutputMismatch(f"<{len(got)} onnx outputs vs {len(expected)} torch outputs>",
                            float("inf"), (), ())], rtol, atol)
    worst = 0.0
    bad: list[OutputMismatch] = []
    for name, ref_t, out in zip(names, expected, got):
        ref = _to_numpy(ref_t)
        if ref.shape != out.shape:
            bad.append(OutputMismatch(name, float("inf"), ref.shape, out.shape))
            continue
        diff = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)))) \
            if ref.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(out, ref, rtol=rtol, atol=atol, equal_nan=True):
            bad.append(OutputMismatch(name, diff, ref.shape, out.shape))
    if bad:
        raise VerificationError(bad, rtol, atol)
    return worst


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str] | None = None,
    opset: int = 17,
    dynamic_batch: bool = False,
    check: bool = True,
    verify: bool = True,
    exporter: str = "auto",
    keep_names: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Any:
    """Export ``model`` to ONNX and return the ``onnx.ModelProto``.

    ``example_inputs`` is a tensor or a tuple of tensors (positional forward arguments).
    ``dynamic_batch`` makes dim 0 of every input and output symbolic (``batch``).
    ``check`` runs ``onnx.checker.check_model(full_check=True)``; ``verify`` runs the model in
    ONNX Runtime on ``example_inputs`` and raises ``VerificationError`` (max abs diff and output
    name) if it is not ``allclose(rtol, atol)`` to torch. ``path``: written atomically (a
    failure leaves no partial file and an existing file untouched), with external data when
    the model exceeds protobuf's 2 GiB limit. See the module docstring for ``exporter`` and
    ``keep_names``.
    """
    import onnx

    args = _as_tuple(example_inputs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise InputError("export_onnx: every example input must be a torch.Tensor")
    was_training = model.training
    if was_training:
        try:
            model.eval()
        except NotImplementedError:
            # torch.export's module refuses mode switches, which the exporters make; its mode
            # is part of its graph, and a GraphModule copy (sharing the weights) takes them
            model, was_training = copy.copy(model).eval(), False
        else:
            _log.warning("export_onnx: model is in training mode; exporting in eval mode")
    try:
        with torch.no_grad():
            expected = _flatten_outputs(model(*args))
        in_names = list(input_names) if input_names else _input_names(model, len(args))
        out_names = list(output_names) if output_names else _output_names(len(expected))
        dyn = None
        if dynamic_batch:
            dyn = {n: {0: "batch"} for n in in_names + out_names}
        proto, used = _run_exporters(model, args, opset, in_names, out_names, dyn, keep_names,
                                     _exporter_order(exporter, opset))
    finally:
        if was_training:
            model.train()

    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        "secateurs.exporter": used})
    if check:
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported ONNX ({used} exporter) fails onnx.checker: {exc}") from exc
    if verify:
        worst = verify_onnx(proto, args, expected, rtol=rtol, atol=atol)
        _log.info("export_onnx: ONNX Runtime matches torch, max abs diff %.3g", worst)
    if path is not None:
        from secateurs.runtime.io import atomic_save_onnx

        atomic_save_onnx(proto, path)
    return proto


def _run_exporters(model: torch.nn.Module, args: tuple[Any, ...], opset: int,
                   in_names: list[str], out_names: list[str],
                   dyn: dict[str, dict[int, str]] | None, keep_names: bool,
                   order: list[str]) -> tuple[Any, str]:
    funcs = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}
    failures: list[str] = []
    for name in order:
        start = time.perf_counter()
        try:
            proto = funcs[name](model, args, opset, in_names, out_names, dyn, keep_names)
        except Exception as exc:  # noqa: BLE001 - exporters raise anything; we try the next
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            _log.warning("export_onnx: %s exporter failed (%s); %s", name, exc,
                         "trying the next" if name != order[-1] else "no exporter left")
            continue
        _log.info("export_onnx: %s exporter took %.2f s", name, time.perf_counter() - start)
        return proto, name
    raise ExportError("torch.onnx.export failed with every exporter tried:\n  "
                      + "\n  ".join(failures))
