"""Fold the shape patches ``apply_plan_onnx`` writes back into the shapes' own constants.

Where a Reshape's shape is computed at run time (``Shape -> Gather -> Unsqueeze -> Concat``
with the pruned widths as ``Constant`` pieces of the ``Concat``), the ONNX apply keeps the
computation live and patches the pruned positions with ``Where(mask, value, shape)``. That is
correct, but it hides the shape from ONNX Runtime's graph optimizer: its shape inference cannot
see through the ``Where``, so the fusions that need the reshaped tensor's static dims stop
firing on the pruned graph — on ViT-S the 12 ``Gather -> Split`` fusions of the q/k/v split and
the ``Reshape`` fusions of the shape chains (``tools/bench/latency_efficiency.py``: ~5% of the
pruned ViT's time went to the extra ``Where``/``Gather``/``Unsqueeze``/``Concat`` nodes).

The rewrite, per ``Where``:

    Where(mask, value, Concat(p_0, ..., p_n))   with mask, value initializers and every
                                                masked position inside a constant piece p_k
    ->  Concat(p_0, ..., where(mask_k, value_k, p_k), ..., p_n)

It is exact by construction: at every position the new ``Concat`` yields what the ``Where``
yielded (the patched value where the mask is set, the live piece elsewhere). A ``Concat`` read
by other nodes too is cloned rather than edited. A ``Where`` that does not match (a masked
position inside a live piece, pieces of unknown length) is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["fold_shape_patches", "FoldResult"]


@dataclass(frozen=True)
class FoldResult:
    model: onnx.ModelProto
    folded: int


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: t for t in graph.initializer}
    values: dict[str, np.ndarray] = {}
    for name, t in out.items():
        if len(t.dims) <= 1 and t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            values[name] = numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type != "Constant" or len(n.output) != 1:
            continue
        for a in n.attribute:
            if a.name == "value" and len(a.t.dims) <= 1:
                values[n.output[0]] = numpy_helper.to_array(a.t)
    return values


def _lengths(graph: onnx.GraphProto, consts: dict[str, np.ndarray]) -> dict[str, int]:
    out: dict[str, int] = {}
    for vi in graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 1 and dims[0].HasField("dim_value"):
            out[vi.name] = int(dims[0].dim_value)
    for name, arr in consts.items():
        out[name] = int(arr.size)
    return out


def fold_shape_patches(model: onnx.ModelProto) -> FoldResult:
    """Fold ``Where(mask, value, Concat(...))`` shape patches into the ``Concat``'s constant
    pieces, in place; returns the model and how many patches were folded."""
    graph = model.graph
    consts = _constants(graph)
    lengths = _lengths(graph, consts)
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for o in graph.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    inits = {t.name for t in graph.initializer}
    taken = set(inits) | {o for n in graph.node for o in n.output}
    replaced: set[str] = set()
    rename: dict[str, str] = {}
    drop: set[int] = set()
    added: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (new concat, before this node)
    folded = 0
    for n in graph.node:
        if n.op_type != "Where" or len(n.input) != 3:
            continue
        cond, value, src = n.input
        concat = producer.get(src)
        if cond not in inits or value not in inits or concat is None \
                or concat.op_type != "Concat":
            continue
        mask = numpy_helper.to_array(next(t for t in graph.initializer if t.name == cond))
        target = consts.get(value)
        if target is None or mask.ndim != 1 or target.shape != mask.shape:
            continue
        pieces = list(concat.input)
        if any(p not in lengths for p in pieces) or sum(lengths[p] for p in pieces) != mask.size:
            continue
        new_pieces, off, ok = [], 0, True
        for p in pieces:
            k = lengths[p]
            seg = mask[off:off + k].astype(bool)
            if seg.all():  # the Where overrides the whole piece: its value is the patch's
                const = consts.get(p)
                arr = target[off:off + k].astype(const.dtype if const is not None
                                                  else target.dtype)
                if const is not None:
                    arr = arr.reshape(const.shape)
            elif seg.any() and p in consts and consts[p].size == k:
                arr = np.where(seg, target[off:off + k], consts[p].reshape(-1))
                arr = arr.astype(consts[p].dtype).reshape(consts[p].shape)
            elif seg.any():  # a live piece only partly patched: leave this Where alone
                ok = False
                break
            else:
                new_pieces.append(p)
                off += k
                continue
            name = _fresh(taken, f"{n.name or 'Where'}__folded")
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            new_pieces.append(name)
            replaced.add(p)
            off += k
        if not ok:
            continue
        if readers.get(src, 0) == 1:
            del concat.input[:]
            concat.input.extend(new_pieces)
            rename[n.output[0]] = src
        else:
            out = _fresh(taken, f"{concat.name or 'Concat'}__folded")
            clone = onnx.helper.make_node("Concat", new_pieces, [out], name=out,
                                          axis=_axis(concat))
            added.append((clone, n))
            rename[n.output[0]] = out
        drop.add(id(n))
        folded += 1
    if not folded:
        return FoldResult(model, 0)
    nodes = list(graph.node)
    before = {id(w): c for c, w in added}
    del graph.node[:]
    for node in nodes:
        if id(node) in before:
            graph.node.append(before[id(node)])
        if id(node) in drop:
            continue
        for j, i in enumerate(node.input):
            if i in rename:
                node.input[j] = rename[i]
        graph.node.append(node)
    for o in graph.output:
        if o.name in rename:  # a patched shape that is a graph output: keep its name
            graph.node.append(onnx.helper.make_node("Identity", [rename[o.name]], [o.name]))
    _sweep(graph, replaced | _patch_names(nodes, drop))
    stale = set(rename)
    kept_vi = [vi for vi in graph.value_info if vi.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept_vi)
    return FoldResult(model, folded)


def _patch_names(nodes: list[onnx.NodeProto], drop: set[int]) -> set[str]:
    return {i for n in nodes if id(n) in drop for i in n.input[:2]}


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _fresh(taken: set[str], base: str) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _sweep(graph: onnx.GraphProto, start: set[str]) -> None:
    """Remove what the fold left unread: the replaced pieces, the patches' mask and value,
    and the nodes that computed only those (walking up from ``start``)."""
    outputs = {o.name for o in graph.output}
    frontier = set(start)
    while frontier:
        used = {i for node in graph.node for i in node.input} | outputs
        dead = frontier - used
        if not dead:
            return
        frontier = set()
        keep = []
        for node in graph.node:
            if node.output and all(o in dead or (o not in used and not o) for o in node.output):
                frontier.update(i for i in node.input if i)
                continue
            keep.append(node)
        del graph.node[:]
        graph.node.extend(keep)
        inits = [t for t in graph.initializer if t.name not in dead]
        del graph.initializer[:]
        graph.initializer.extend(inits)
