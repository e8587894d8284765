"""``secateurs inspect MODEL.onnx``: channel groups, per-layer cost and weight sparsity.

Prints the channel groups of an ONNX model (units, members, lossy, pinned reasons), the
parameters and MACs of every Conv/Gemm/MatMul layer, and for each of their weights the current
fraction of zeros and whether it is 2:4 sparse along its reduction axis (Conv ``[K, C, R, S]``:
C; Gemm: K, i.e. axis 1 with ``transB=1``, 0 without; MatMul initializer ``[K, N]``: K).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from secateurs.errors import InputError

__all__ = ["register", "run", "inspect_onnx", "parse_named_shapes"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="ONNX model: channel groups, per-layer params/MACs, 2:4 sparsity",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--input-shape", action="append", metavar="NAME=SHAPE",
                   help="fix a graph input's shape, e.g. x=1,3,224,224 (repeatable; the name "
                   "may be left out when the model has one input)")
    p.add_argument("--all", action="store_true", help="also list fully pinned groups")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=run)


def parse_named_shapes(items: list[str] | None, inputs: list[str]) -> dict[str, list[int]]:
    """``["x=1,3,224,224"]`` -> ``{"x": [1, 3, 224, 224]}``; a bare shape names the only input."""
    out: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, text = item.rpartition("=")
        if not sep:
            if len(inputs) != 1:
                raise InputError(f"--input-shape '{item}' needs a name (NAME=SHAPE): the model "
                                 f"has inputs {inputs}")
            name = inputs[0]
        try:
            out[name] = [int(v) for v in text.replace("x", ",").split(",") if v]
        except ValueError as exc:
            raise InputError(f"--input-shape '{item}' is not NAME=comma-separated integers, "
                             f"e.g. x=1,3,224,224") from exc
    return out


def _is_nm(weight: np.ndarray, n: int, m: int, axis: int) -> bool:
    try:
        import torch

        from secateurs.passes.sparsify import is_nm_sparse
    except ImportError:  # the sparsify pass is optional here
        moved = np.moveaxis(weight, axis, -1)
        if moved.shape[-1] % m:
            return False
        groups = (moved != 0).reshape(-1, moved.shape[-1] // m, m)
        return bool((groups.sum(-1) <= n).all())
    return is_nm_sparse(torch.from_numpy(np.array(weight, copy=True)), n, m, axis)


def _layers(model: Any, analysis: Any) -> list[dict[str, Any]]:
    from onnx import numpy_helper

    from secateurs.graph.ir import ChannelGraph
    from secateurs.passes.cost import count_macs
    from secateurs.passes.onnx_sparsify import onnx_weight_axes

    graph = analysis.graph
    axes, _ = onnx_weight_axes(model.graph)
    inits = {t.name: t for t in model.graph.initializer}

    def shape(v: str) -> tuple[int, ...] | None:
        return graph.values[v].shape

    rows = []
    for node in graph.nodes:
        if node.op not in ("conv", "linear", "matmul"):
            continue
        one = ChannelGraph(graph.values, [node], [], [], frontend="onnx")
        weight = next((i for i in node.inputs[1:2] if i and i in inits), None)
        params = sum(int(np.prod(inits[i].dims)) for i in node.inputs if i and i in inits)
        row: dict[str, Any] = {"node": node.name, "op": node.source.replace("ONNX ", ""),
                               "weight": weight, "params": params,
                               "macs": count_macs(one, shape)}
        if weight is not None:
            arr = numpy_helper.to_array(inits[weight])
            row["shape"] = list(arr.shape)
            row["sparsity"] = float((arr == 0).mean()) if arr.size else 0.0
            if weight in axes:
                row["axis"] = axes[weight][1]
                row["2:4"] = _is_nm(arr, 2, 4, axes[weight][1])
        rows.append(row)
    return rows


def inspect_onnx(path: str, input_shapes: dict[str, list[int]] | None = None,
                 include_pinned: bool = False) -> dict[str, Any]:
    """Everything ``inspect`` prints, as data."""
    from secateurs.graph.from_onnx import from_onnx
    from secateurs.graph.onnx_untie import untie_shared_vectors
    from secateurs.passes.group_channels import group_channels
    from secateurs.passes.prune_onnx import load_model

    model, _ = load_model(path)
    # the groups prune_onnx sees: the exporter's deduplicated vectors one per reader
    analysis = group_channels(from_onnx(untie_shared_vectors(model)[0], input_shapes))
    groups = []
    for g in analysis.groups:
        if g.is_pinned and not include_pinned:
            continue
        groups.append({
            "id": g.id, "units": g.size, "prunable": g.prunable, "lossy": g.is_lossy,
            "members": [f"{m.param}[{m.dim}]" for m in g.members],
            "pinned": list(g.pin_reasons), "lossy_reasons": list(g.lossy_reasons),
        })
    layers = _layers(model, analysis)
    return {"model": str(path), "n_groups": len(analysis.groups),
            "n_pinned": sum(1 for g in analysis.groups if g.is_pinned),
            "groups": groups, "layers": layers,
            "params": sum(int(np.prod(t.dims)) for t in model.graph.initializer),
            "macs": sum(r["macs"] for r in layers)}


def run(args: argparse.Namespace) -> int:
    from secateurs.commands._spec import is_onnx
    from secateurs.graph.from_onnx import graph_input_names
    from secateurs.passes.prune_onnx import load_model

    if not is_onnx(args.model):
        raise InputError("inspect reads .onnx files; use 'secateurs analyze' for torch models")
    from secateurs.runtime.paths import check_input_file

    check_input_file(args.model, "ONNX model")
    model, _ = load_model(args.model)
    shapes = parse_named_shapes(args.input_shape, graph_input_names(model.graph))
    info = inspect_onnx(args.model, shapes or None, args.all)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0
    print(f"{info['model']}: {info['params']:,} parameters, {info['macs']:,} MACs")
    print(f"{info['n_groups']} channel groups ({info['n_pinned']} fully pinned"
          f"{'' if args.all else ', hidden; --all shows them'})")
    for r in info["groups"]:
        kind = "lossy" if r["lossy"] else "exact"
        print(f"group {r['id']:>4}: {r['prunable']:>5}/{r['units']:<5} prunable units, {kind}")
        for m in r["members"][:8]:
            print(f"    {m}")
        if len(r["members"]) > 8:
            print(f"    ... {len(r['members']) - 8} more")
        for reason in r["pinned"][:2] + r["lossy_reasons"][:1]:
            print(f"    note: {reason}")
    print()
    print(f"{'layer':<48} {'op':<14} {'params':>12} {'MACs':>14} {'zeros':>7} {'2:4':>4}")
    for r in info["layers"]:
        nm = "-" if "2:4" not in r else ("yes" if r["2:4"] else "no")
        sparsity = f"{r['sparsity']:.1%}" if "sparsity" in r else "-"
        print(f"{r['node'][-48:]:<48} {r['op']:<14} {r['params']:>12,} {r['macs']:>14,} "
              f"{sparsity:>7} {nm:>4}")
    return 0
