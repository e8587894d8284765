"""Give each consumer of a deduplicated per-channel initializer its own copy.

Both torch exporters store parameters with identical values once: the TorchScript exporter
keeps the first and points the others at it through ``Identity`` nodes, the dynamo exporter
(onnxscript's optimizer) makes every consumer read the same initializer. In a freshly
initialised or partly trained model every zero bias, every LayerNorm weight of ones and every
BatchNorm folded into a conv's zero bias of one width becomes one tensor. Read as written, that
one tensor couples the channels of layers that have nothing to do with each other: their groups
merge (one selection for unrelated layers) and, where one of them reaches a graph output, the
whole merged group is pinned (a Swin exported this way pruned nothing at all).

The original model had one parameter per layer, so giving each consumer its own copy restores
it and changes no output. Only vectors are untied (one dim above 1: biases, norm parameters,
per-channel scales; a few KB each). A shared matrix stays shared: it may be a real tie (tied
embeddings, ALBERT's shared layers) whose copy would double the weights, and the analysis
handles a shared tensor correctly, only conservatively. External and integer tensors, graph
inputs and outputs, and reads from inside subgraphs are left as they are.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from secateurs.graph.from_onnx import _subgraph_names, is_lazy

__all__ = ["untie_shared_vectors", "retie"]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}


def _is_vector(tensor: onnx.TensorProto) -> bool:
    return (tensor.data_type in _FLOAT_TYPES and sum(d > 1 for d in tensor.dims) == 1
            and tensor.data_location != onnx.TensorProto.EXTERNAL and not is_lazy(tensor))


def _constant_vector(node: onnx.NodeProto) -> bool:
    """A ``Constant`` node holding a float vector (``value`` attribute)."""
    return node.op_type == "Constant" and len(node.attribute) == 1 and \
        node.attribute[0].name == "value" and len(node.output) == 1 and \
        _is_vector(node.attribute[0].t)


def untie_shared_vectors(model: onnx.ModelProto, in_place: bool = False
                         ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``model`` itself when no vector initializer is shared, else a copy (``in_place=True``:
    ``model`` itself, edited) in which each ``Identity`` of a vector initializer is an
    initializer of its own (under the Identity's output name, the parameter's name in the
    exporter's output) and each further reader of a shared vector reads its own copy.
    Returns the model and ``{copy: source}``. Deterministic, and a no-op on its own output:
    a plan made on the untied form applies to the original (``apply_plan_onnx`` unties it the
    same way first)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    # an initializer that old exporters also list as a graph input is still a parameter
    pinned = {v.name for v in graph.input if v.name not in inits} | \
        {v.name for v in graph.output}
    vectors = {t.name for t in graph.initializer if _is_vector(t) and t.name not in pinned}
    constants = {n.output[0]: k for k, n in enumerate(graph.node) if _constant_vector(n)
                 and n.output[0] not in pinned}
    readers: dict[str, int] = defaultdict(int)
    identities = 0
    for node in graph.node:
        for name in node.input:
            if name in vectors or name in constants:
                readers[name] += 1
        if node.op_type == "Identity" and node.input and node.input[0] in vectors \
                and node.output[0] not in pinned:
            identities += 1
    shared_constants = {name for name in constants if readers[name] > 1}
    if not identities and not shared_constants and all(n <= 1 for n in readers.values()):
        return model, {}

    out = model
    if not in_place:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    graph = out.graph
    # 0. a shared vector written as a Constant node becomes the initializer it stands for
    if shared_constants:
        moved = [graph.node[constants[name]] for name in sorted(shared_constants)]
        for node in moved:
            tensor = graph.initializer.add()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            vectors.add(tensor.name)
        kept_nodes = [n for n in graph.node if not any(n is m for m in moved)]
        del graph.node[:]
        graph.node.extend(kept_nodes)
    tensors = {t.name: t for t in graph.initializer}
    taken = set(tensors) | {o for n in graph.node for o in n.output} | pinned
    created: dict[str, str] = {}

    def add_copy(source: str, name: str) -> None:
        copy = graph.initializer.add()
        copy.CopyFrom(tensors[source])
        copy.name = name
        tensors[name] = copy
        vectors.add(name)
        taken.add(name)
        created[name] = source

    # 1. an Identity of a vector initializer becomes that initializer under its output's name
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in vectors \
                and node.output[0] not in pinned:
            add_copy(node.input[0], node.output[0])
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    # 2. every reader of a shared vector after the first reads its own copy
    seen: set[str] = set()
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in vectors:
                continue
            if name not in seen:
                seen.add(name)
                continue
            n = 1
            while f"{name}.{n}" in taken:
                n += 1
            add_copy(name, f"{name}.{n}")
            node.input[k] = f"{name}.{n}"
    # a vector no top-level node reads any more (every reader was an Identity) is dropped,
    # unless a subgraph still reads it
    inner = {name for node in graph.node for name in _subgraph_names(node)}
    # (and one an old exporter also lists as a graph input stays: dropped, the input it
    # defaults would become one the caller has to feed)
    read = {name for node in graph.node for name in node.input} | inner | \
        {v.name for v in graph.input}
    unused = [t for t in graph.initializer if t.name in vectors and t.name not in read]
    for t in unused:
        graph.initializer.remove(t)
    return out, {c: s for c, s in created.items() if c in read}


def retie(model: onnx.ModelProto, copies: dict[str, str]) -> onnx.ModelProto:
    """Point the readers of each copy that still equals its source (the pruning kept the same
    channels of both, or pruned neither) back at the source and drop the copy, in place: the
    output carries no duplicate the input did not need. A source the untie dropped is the
    first equal copy's to keep."""
    if not copies:
        return model
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    by_source: dict[str, list[str]] = defaultdict(list)
    for copy, source in copies.items():
        if copy in tensors:
            by_source[source].append(copy)
    target: dict[str, str] = {}
    for source, group in by_source.items():
        kept = [source] if source in tensors else []
        for copy in group:
            same = next((k for k in kept if _equal(tensors[copy], tensors[k])), None)
            if same is None:
                kept.append(copy)
            else:
                target[copy] = same
    if not target:
        return model

    def final(name: str) -> str:  # a copy of a copy: equality is transitive
        while name in target:
            name = target[name]
        return name

    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in target:
                node.input[k] = final(name)
    for name in target:
        graph.initializer.remove(tensors[name])
    stale = [v for v in graph.value_info if v.name in target]
    for v in stale:
        graph.value_info.remove(v)
    return model


def _equal(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    from onnx import numpy_helper

    return (a.data_type == b.data_type and list(a.dims) == list(b.dims)
            and numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes())

