"""Magnitude sparsification of ONNX initializer weights along their reduction axis.

Which initializer, which axis (the axis a runtime reduces over, where N:M groups must run):

* ``Conv`` input 1, ``W[K, C/g, *k]``: axis 1 (C); grouped convs (``group > 1``) are skipped;
* ``Gemm`` input 1: ``transB=1`` stores ``B[N, K]`` → axis 1; ``transB=0`` stores ``B[K, N]`` → axis 0;
* ``MatMul`` input 1 of rank 2, ``B[K, N]``: axis 0.

An initializer used by several nodes must agree on its axis, and every other reader (a MatMul's
first operand, a Gather table, a Transpose) skips it, with the reason; float matrices an
op other than Gather reads in another role are listed as skipped too. Weights held in ``Constant`` nodes
are made initializers first.
The result is a new ``ModelProto`` (the input is never modified) that passes
``onnx.checker.check_model(full_check=True)``; files are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from secateurs.errors import InputError
from secateurs.passes.masks import Pattern, mask_from_scores, parse_pattern
from secateurs.passes.sparsify import LayerSparsity, SkippedLayer, SparsityReport, is_nm_sparse

__all__ = ["sparsify_onnx", "sparsify_onnx_with_report", "save_onnx_atomic", "onnx_weight_axes"]


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def onnx_weight_axes(graph: onnx.GraphProto) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """Initializer name -> ``(op_type, reduction axis)`` for every eligible weight, and skip reasons."""
    inits = {init.name: init for init in graph.initializer}
    axes: dict[str, tuple[str, int]] = {}
    reasons: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits:
            continue
        rank = len(inits[name].dims)
        if node.op_type == "Conv":
            if _attr(node, "group", 1) != 1:
                reasons[name] = f"Conv '{node.name}' has group={_attr(node, 'group', 1)}: N:M along C does not apply"
                continue
            found = ("Conv", 1)
        elif node.op_type == "Gemm":
            found = ("Gemm", 1 if _attr(node, "transB", 0) else 0)
        else:
            if rank != 2:
                reasons[name] = f"MatMul '{node.name}' weight has rank {rank}, expected 2"
                continue
            found = ("MatMul", 0)
        if name in axes and axes[name][1] != found[1]:
            reasons[name] = f"initializer '{name}' is read along different axes by different nodes"
            continue
        axes.setdefault(name, found)
    # every other use of a weight must see the same zeros as a weight: another role (MatMul's
    # first operand, a Gather table tied to a Gemm, a Transpose) would read them along another
    # axis, or change a use the report does not name
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name not in axes or name in reasons or (
                    node.op_type in ("Conv", "Gemm", "MatMul") and index == 1):
                continue
            reasons[name] = (f"initializer '{name}' is also read by {node.op_type} "
                             f"'{node.name}' (input {index}): its zeros would change that use, "
                             "or not follow its reduction axis")
    for name in reasons:
        axes.pop(name, None)
    # float matrices read in another role (ConvTranspose, MatMul's first operand, through a
    # Transpose): said, not silently left dense; embedding tables (Gather) are not matrices a
    # sparse kernel multiplies, as in the torch pass
    for node in graph.node:
        if node.op_type == "Gather":
            continue
        for index, name in enumerate(node.input):
            init = inits.get(name)
            if init is None or name in axes or name in reasons or len(init.dims) < 2 \
                    or min(init.dims) < 2 or init.data_type not in _FLOAT_TYPES:
                continue
            reasons[name] = (f"{node.op_type} '{node.name}' reads '{name}' as input {index}: "
                             "only the weight operand (input 1) of Conv/Gemm/MatMul is "
                             "sparsified")
    return axes, reasons


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE)


# N:M masks are row-local: computed this many elements at a time (scores are float64)
_MASK_CHUNK = 1 << 22


def _keep_mask(weight: np.ndarray, axis: int, pattern: Pattern, sparsity: float) -> np.ndarray:
    """The keep mask of ``weight`` (its shape): N:M groups run along ``axis``; an N:M mask
    is computed a block of rows at a time (a big weight's float64 scores never exist whole)."""
    moved = np.moveaxis(weight, axis, -1)
    if pattern.kind != "nm":
        keep2 = mask_from_scores(_scores_2d(weight, axis), pattern, sparsity).numpy()
        return np.moveaxis(keep2.reshape(moved.shape), -1, axis)
    keep = np.empty(moved.shape, dtype=bool)
    step = max(1, _MASK_CHUNK // max(1, moved[0].size))
    for r in range(0, moved.shape[0], step):
        block = np.abs(moved[r:r + step].astype(np.float64))
        rows = torch.from_numpy(np.ascontiguousarray(block.reshape(-1, moved.shape[-1])))
        keep[r:r + step] = mask_from_scores(rows, pattern, sparsity).numpy().reshape(block.shape)
    return np.moveaxis(keep, -1, axis)


def _valid_nm(sparse: np.ndarray, axis: int, pattern: Pattern) -> bool:
    """``is_nm_sparse`` a block at a time along the first axis that is not ``axis``."""
    along = 0 if axis != 0 else 1
    size = sparse.shape[along]
    step = max(1, _MASK_CHUNK // max(1, sparse.size // max(1, size)))
    for r in range(0, size, step):
        block = np.ascontiguousarray(np.take(sparse, range(r, min(size, r + step)), axis=along))
        if not is_nm_sparse(torch.from_numpy(block), pattern.n, pattern.m, axis):
            return False
    return True


def _scores_2d(weight: np.ndarray, axis: int) -> torch.Tensor:
    """Move ``axis`` last and flatten the rest, so N:M groups run along the columns."""
    moved = np.moveaxis(np.abs(weight.astype(np.float64)), axis, -1)
    return torch.from_numpy(np.ascontiguousarray(moved.reshape(-1, moved.shape[-1])))


def _skip_reason(name: str, op: str, weight: np.ndarray, axis: int, pattern: Pattern, min_numel: int) -> str | None:
    if weight.size < min_numel:
        return f"{op} weight '{name}' has {weight.size} weights, below min_numel={min_numel}"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"{op} weight '{name}' has dtype {weight.dtype}, not floating point"
    if pattern.kind == "nm" and weight.shape[axis] % pattern.m:
        return f"{op} weight '{name}' has {weight.shape[axis]} along its reduction axis {axis}, not a multiple of {pattern.m}"
    if pattern.kind == "bsr":
        return f"{op} weight '{name}': block sparsity is not supported for ONNX weights"
    return None


def sparsify_onnx_with_report(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    pattern: str = "2:4",
    sparsity: float = 0.5,
    ignore: Sequence[str] = (),
    min_numel: int = 0,
    output_path: str | os.PathLike[str] | None = None,
    before_save: Callable[[SparsityReport], None] | None = None,
) -> tuple[onnx.ModelProto, SparsityReport]:
    """Like :func:`sparsify_onnx`, also returning the per-initializer report.

    ``before_save`` sees the report before ``output_path`` is written; raising there writes
    nothing (the CLI refuses a run that sparsified no layer)."""
    parsed = parse_pattern(pattern)
    if parsed.kind != "nm" and not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity={sparsity} is out of range; use 0 <= sparsity < 1")
    from secateurs.graph.onnx_apply import (
        TensorSpill,
        has_lazy_tensors,
        load_onnx,
        save_onnx,
        uses_external_data,
    )

    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        external = uses_external_data(model_or_path)
        from secateurs.passes.quantize import constants_as_initializers

        model = constants_as_initializers(model)  # weights some exporters write as nodes
    else:
        # By path (checked by path, > 2 GB models included); the loaded copy is ours to edit.
        # Large external tensors stay on disk; written to a file next to the output, each
        # sparse tensor is dropped as soon as it is made (one tensor in memory at a time).
        model, external = load_onnx(model_or_path, lazy=True)
    spill = TensorSpill(Path(output_path).parent) \
        if output_path is not None and has_lazy_tensors(model) else None
    try:
        report = _sparsify_tensors(model, parsed, sparsity, ignore, min_numel, spill)
        if before_save is not None:
            before_save(report)
        if output_path is not None:
            # External data in, external data out; a model over protobuf's limit always.
            # (the spill becomes the output's data file; the model then reads from it)
            save_onnx(model, output_path, external_data=True if external or spill else None,
                      adopt=spill)
    finally:
        if spill is not None:
            spill.close()
    return model, report


def _sparsify_tensors(model: onnx.ModelProto, parsed: Pattern, sparsity: float,
                      ignore: Sequence[str], min_numel: int, spill: object | None
                      ) -> SparsityReport:
    """Sparsify ``model``'s eligible weights in place (into ``spill`` when given)."""
    from secateurs.graph.from_onnx import tensor_array

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    unknown = [x for x in ignore if x not in inits and x not in {n.name for n in graph.node}]
    if unknown:
        raise InputError(f"ignore names {unknown} are neither initializers nor nodes of the model")
    ignored_inits = set(ignore) | {n.input[1] for n in graph.node if n.name in ignore and len(n.input) > 1}

    axes, reasons = onnx_weight_axes(graph)
    layers: list[LayerSparsity] = []
    skipped = [SkippedLayer(name, reason) for name, reason in reasons.items()]
    for name, (op, axis) in axes.items():
        if name in ignored_inits:
            skipped.append(SkippedLayer(name, "ignored by request"))
            continue
        weight = tensor_array(inits[name])
        reason = _skip_reason(name, op, weight, axis, parsed, min_numel)
        if reason:
            skipped.append(SkippedLayer(name, reason))
            continue
        drop = _keep_mask(weight, axis, parsed, sparsity)
        np.logical_not(drop, out=drop)  # in place: one mask in memory
        sparse = weight if weight.flags.writeable else weight.copy()
        np.putmask(sparse, drop, 0)
        dropped = int(drop.sum())
        del drop
        valid = _valid_nm(sparse, axis, parsed) if parsed.kind == "nm" else True
        layers.append(LayerSparsity(name, op, tuple(sparse.shape), int(sparse.size), dropped,
                                    valid))
        if spill is not None:
            spill.put(inits[name], sparse)  # type: ignore[attr-defined]
        else:
            inits[name].CopyFrom(numpy_helper.from_array(sparse, name))
        del weight, sparse

    total = sum(int(np.prod(init.dims)) for init in graph.initializer)
    target = parsed.nm_sparsity if parsed.kind == "nm" else sparsity
    return SparsityReport(str(parsed), "magnitude", target, tuple(layers), tuple(skipped), total)


def sparsify_onnx(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    pattern: str = "2:4",
    sparsity: float = 0.5,
    ignore: Sequence[str] = (),
    min_numel: int = 0,
    output_path: str | os.PathLike[str] | None = None,
) -> onnx.ModelProto:
    """Magnitude N:M / unstructured sparsity on Conv/Gemm/MatMul weights; returns a new model.

    ``pattern``: ``"2:4"`` (any ``"N:M"``) or ``"unstructured"`` (with ``sparsity``); ``ignore``:
    initializer or node names to leave dense; ``output_path``: also write the model atomically.
    """
    return sparsify_onnx_with_report(model_or_path, pattern, sparsity, ignore, min_numel, output_path)[0]


def save_onnx_atomic(model: onnx.ModelProto, path: str | os.PathLike[str],
                     external_data: bool | None = None) -> Path:
    """Check the model (``full_check``, on the skeleton for models over protobuf's limit)
    and write it atomically (external data when asked or when the model is that large)."""
    from secateurs.graph.onnx_apply import save_onnx

    return save_onnx(model, path, external_data=external_data)
