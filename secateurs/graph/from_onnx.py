"""ONNX frontend: lower an ONNX model (opset 13+) to the channel graph.

The same canonical ops as the torch frontend, so the same rule table applies:

=====================================  =====================================================
ONNX                                   canonical
=====================================  =====================================================
Conv / ConvTranspose                   ``conv`` {groups, transposed}
Gemm                                   ``permute`` (transA) + ``linear`` (initializer B with
                                       transB=1, i.e. ``[out, in]``) or ``matmul`` (+ ``add``
                                       for a bias that is not a 1-D ``[N]`` initializer)
MatMul                                 ``matmul`` (an initializer B ``[K, N]`` contracts on K)
BatchNormalization / Instance-         ``batch_norm`` / ``instance_norm`` / ``layer_norm``
Normalization / LayerNormalization /   {ndim = rank - axis} / ``group_norm`` {num_groups}
GroupNormalization
unary and binary elementwise ops       the unary / elementwise family (``Pow`` with a
                                       constant exponent is ``pow_scalar``)
Concat / Split / Slice / Gather        ``cat`` / ``split`` / ``index`` {items} (constant
                                       bounds and indices; a 1-D index pins its dim);
                                       GatherND: ``gather_nd`` (addressed dims pinned,
                                       trailing dims pass)
Reshape / Flatten / Squeeze /          ``reshape``
Unsqueeze
Transpose / Expand / Tile              ``permute`` / ``expand`` / ``repeat``
LSTM / GRU / RNN                       ``rnn`` {input_dim = 2: ``W``'s input features; ``R``,
                                       ``B``, states and outputs pinned}
pools / Resize / Reduce* / Softmax     ``pool`` / ``resize`` / ``reduce`` / ``softmax``
Constant, Shape and shape arithmetic   folded to constants (no node); a float ``Constant``
                                       of more than one element is a parameter
ONNX Runtime contrib ops               BiasGelu / FastGelu: ``add`` (bias) + ``gelu``; Gelu /
(``com.microsoft``, what ORT's         QuickGelu: ``gelu`` / ``silu``;
transformer optimizer and optimum      Skip(Simplified)LayerNormalization: ``add`` (skip,
write)                                 bias) + ``layer_norm`` / ``rms_norm``, the sum output
                                       an ``identity``; SimplifiedLayerNormalization:
                                       ``rms_norm``; Attention / MultiHeadAttention:
                                       ``ort_attention`` / ``ort_mha`` (heads; FusedMatMul
                                       and the other contrib ops are opaque)
anything else, custom domains          ``opaque`` (pins every channel it touches, with a
                                       reason naming the op type and the node)
=====================================  =====================================================

Shapes come from ``onnx.shape_inference.infer_shapes(data_prop=True)`` on a weightless
``skeleton`` of the model (large initializers declared by type and shape, small ones kept for
shape arithmetic) whose graph inputs may be fixed by ``input_shapes``; ONNX cannot infer
ONNX Runtime's contrib ops, so their output shapes come from onnxruntime's own symbolic shape
inference (``onnxruntime.tools.symbolic_shape_infer``) where the file does not declare them.
Every value the analysis needs must end up with a static shape, else an :class:`InputError`
says which input to fix. Float initializers with
more than one element are *parameters* (``Value.param`` is the initializer name, so plans are
keyed by initializer names); integer initializers, ``Constant`` nodes and everything computed
from them (``Shape`` → ``Gather`` → ``Concat`` chains) are folded into constants. A float
``Constant`` node with more than one element is a parameter too, named by its output (the
TorchScript exporter writes GroupNorm as InstanceNormalization whose per-group scale lives in
such a node; pinning it would pin the whole channel group).

Canonical nodes are named after their ONNX node (``onnx_node_names``: the node's name, or
``OpType_i`` when it has none or a duplicate); helper nodes of one ONNX node get a ``/suffix``.
Plans refer to ONNX nodes by these names.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from secateurs.errors import InputError
from secateurs.graph.ir import ChannelGraph, Node, Value, take

__all__ = ["from_onnx", "onnx_node_names", "infer_static_shapes", "fold_constants",
           "graph_input_names", "with_input_shapes", "infer_shapes_folding", "skeleton",
           "group_norm_decompositions", "GroupNormDecomposition",
           "check_supported_version", "tensor_array", "is_lazy", "external_info",
           "LAZY_BASEPATH", "defer_tensor", "is_deferred", "MS_DOMAIN", "opaque_custom"]

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}

# Ops folded when every input is a constant (shape arithmetic, constant factories).
_FOLDABLE = set(
    "Constant ConstantOfShape Shape Size Gather Unsqueeze Squeeze Concat Slice Cast CastLike "
    "Add Sub Mul Div Neg Abs Equal Less Greater LessOrEqual GreaterOrEqual Not And Or Where "
    "Range Reshape ReduceProd ReduceSum ReduceMax ReduceMin Identity Min Max Floor Ceil Sqrt "
    "Mod Expand Tile Transpose Flatten Sign".split())
_MAX_FOLD = 1 << 20  # never materialise a folded constant larger than this many elements

_UNARY = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "Elu": "elu", "Selu": "selu", "Celu": "celu",
    "Gelu": "gelu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish",
    "HardSigmoid": "hardsigmoid", "Softplus": "softplus", "Softsign": "softsign", "Neg": "neg",
    "Abs": "abs", "Sqrt": "sqrt", "Exp": "exp", "Sin": "sin", "Cos": "cos", "Erf": "erf",
    "Sign": "sign", "Round": "round", "Floor": "floor", "Ceil": "ceil", "Mish": "mish",
    "Identity": "identity", "Dropout": "dropout", "Cast": "cast", "CastLike": "cast",
    "Reciprocal": "reciprocal", "Log": "log", "Not": "logical_not",
    # the TorchScript exporter's sdpa guards the softmax with Where(IsNaN(p), 0, p)
    "IsNaN": "isnan", "IsInf": "isinf",
}
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Max": "maximum",
    "Min": "minimum", "Where": "where", "Equal": "eq", "Less": "lt", "LessOrEqual": "le",
    "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or",
    "Mod": "remainder", "Sum": "add", "Mean": "add",
    # PRelu(x, slope): a per-channel slope follows the channel like a scale.
    "PRelu": "mul",
}
_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
          "GlobalLpPool"}
_REDUCES = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min",
            "ReduceProd": "prod", "ReduceL1": "l1", "ReduceL2": "l2",
            "ReduceLogSumExp": "logsumexp", "ReduceSumSquare": "sumsquare",
            "ReduceLogSum": "logsum", "ArgMax": "argmax", "ArgMin": "argmin"}
# Ops whose output has the shape of their first input (a fallback where ONNX shape inference
# has no answer, e.g. function ops such as GroupNormalization-21).
_SAME_SHAPE = set(_UNARY) | {"BatchNormalization", "InstanceNormalization", "LayerNormalization",
                             "GroupNormalization", "Softmax", "LogSoftmax", "Clip", "PRelu",
                             "LpNormalization", "SimplifiedLayerNormalization"}
_SOURCES = {"ConstantOfShape", "Range", "RandomNormal", "RandomUniform", "RandomNormalLike",
            "RandomUniformLike", "EyeLike"}

Shape = tuple[int, ...]


# ---------------------------------------------------------------- naming and shapes


def onnx_node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique name for every node of ``graph``: its own, else ``OpType_<index>``."""
    seen: set[str] = set()
    out = []
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if name in seen:
            name = f"{name}#{i}"
        seen.add(name)
        out.append(name)
    return out


def graph_input_names(graph: onnx.GraphProto) -> list[str]:
    """Graph inputs that are not initializers (IR < 4 lists initializers as inputs too)."""
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def _dims(type_proto: onnx.TypeProto) -> list[int | str | None] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def with_input_shapes(model: onnx.ModelProto,
                      input_shapes: Mapping[str, Sequence[int]] | None) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the given static shapes."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if not input_shapes:
        return work
    inputs = {i.name: i for i in work.graph.input}
    known = graph_input_names(work.graph)
    for name, shape in input_shapes.items():
        if name not in known:
            raise InputError(f"input_shapes names '{name}', which is not an input of the model; "
                             f"its inputs are {known}")
        dims = [int(s) for s in shape]
        if any(s <= 0 for s in dims):
            raise InputError(f"input_shapes['{name}'] = {dims}: every dim must be positive")
        tt = inputs[name].type.tensor_type
        tt.ClearField("shape")
        for s in dims:
            tt.shape.dim.add().dim_value = s
    return work


def _dynamic_inputs(graph: onnx.GraphProto) -> list[tuple[str, list[Any]]]:
    out = []
    inputs = {i.name: i for i in graph.input}
    for name in graph_input_names(graph):
        dims = _dims(inputs[name].type)
        if dims is None or any(not isinstance(d, int) for d in dims):
            out.append((name, dims))
    return out


def infer_static_shapes(model: onnx.ModelProto,
                        input_shapes: Mapping[str, Sequence[int]] | None = None,
                        ) -> tuple[onnx.ModelProto, dict[str, list[int | str | None]]]:
    """Fix input shapes (on a copy), run ONNX shape inference with data propagation, and
    return the copy and every value's dims (ints, symbolic names, or None)."""
    work = with_input_shapes(model, input_shapes)
    dynamic = _dynamic_inputs(work.graph)
    if dynamic:
        name, dims = dynamic[0]
        sym = [d for d in (dims or []) if not isinstance(d, int)]
        what = (f"a dynamic dim '{sym[0]}'" if sym and sym[0] is not None
                else "an unknown dim" if dims is not None else "no shape")
        example = ", ".join(f"'{n}': [{', '.join(str(d) if isinstance(d, int) else '1' for d in (ds or [1]))}]"
                            for n, ds in dynamic)
        raise InputError(f"input '{name}' has {what} (shape {dims}); pass "
                         f"input_shapes={{{example}}} (--input-shape {name}=... on the CLI) "
                         f"or re-export the model with static shapes")
    return work, infer_shapes_folding(work)


def infer_shapes_folding(work: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Shape inference with data propagation; where ONNX's data propagation stops at some
    shape arithmetic (Where, ConstantOfShape...), fold what we can, pin the folded values as
    initializers of a scratch copy, and infer again."""
    shapes = _infer(work)
    outputs = [o for n in work.graph.node for o in n.output if o]
    missing = sum(_static(shapes.get(o)) is None for o in outputs)
    for _ in range(64):  # each round folds one more link of a chain (Swin's rolls: 11 rounds)
        if not missing:
            break
        consts = fold_constants(work, shapes)
        scratch = _materialise(skeleton(work), consts, shapes)
        if scratch is None:
            break
        shapes = {**shapes, **_infer(scratch)}
        still = sum(_static(shapes.get(o)) is None for o in outputs)
        if still >= missing:
            break
        missing = still
    return shapes


# Initializers up to this many elements keep their values in ``skeleton`` (shape arithmetic
# reads them); larger ones are declared by type and shape only.
_SKELETON_KEEP = 4096


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the data of its large initializers (declared as graph inputs of the
    same type and shape instead). Shape inference and the checker's ``full_check`` serialise
    the model they are given; on a skeleton they do not copy the weights (ResNet-50: 100 MB
    per call), and they infer exactly the same shapes."""
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    src, g = model.graph, out.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if not is_lazy(t) and (int(np.prod(t.dims)) <= _SKELETON_KEEP
                               or not _is_param_init(t)):
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def _infer(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    work = skeleton(model)
    # Stale value_info may contradict new input shapes: drop it, except for outputs of
    # custom-domain ops, which ONNX cannot infer, and shape hints of ``_materialise``.
    custom = {o for n in work.graph.node
              if n.domain not in ("", "ai.onnx") or n.op_type in _SAME_SHAPE for o in n.output}
    # a declared shape with symbolic dims (an fp16 converter's cast of a fused op's output)
    # tells nothing at static input shapes: the contrib inference below recomputes it
    keep = [vi for vi in work.graph.value_info
            if vi.name in custom and _static(_dims(vi.type)) is not None]
    declared = {vi.name for vi in keep}
    missing = {o for n in work.graph.node if n.domain == MS_DOMAIN for o in n.output
               if o and o not in declared}
    if missing:
        keep += _contrib_shapes(work, missing)
    del work.graph.value_info[:]
    work.graph.value_info.extend(keep)
    for out in work.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; report them as one
        raise InputError(f"ONNX shape inference failed: {type(exc).__name__}: {exc}") from exc
    shapes: dict[str, list[int | str | None]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(vi.type)
        if dims is not None:
            shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    return shapes


def _contrib_shapes(work: onnx.ModelProto, names: set[str]) -> list[onnx.ValueInfoProto]:
    """Value infos for ``names`` (outputs of ONNX Runtime contrib ops) from onnxruntime's
    symbolic shape inference, which knows those ops; none where it is not installed or fails
    (the caller then reports the unknown shape)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return []
    scratch = onnx.ModelProto()
    scratch.CopyFrom(work)
    # where it cannot infer every value, onnxruntime saves the model with external data into
    # the working directory ("sym_shape_infer_temp.onnx" + uuid.data) before it raises: run
    # it in a scratch directory so nothing is left in the user's
    with tempfile.TemporaryDirectory(prefix="secateurs-ssi-") as tmp, contextlib.chdir(tmp):
        try:
            inferred = SymbolicShapeInference.infer_shapes(scratch, auto_merge=True)
        except Exception as exc:  # noqa: BLE001 - a best-effort hint; ONNX's inference decides
            log.info("onnxruntime symbolic shape inference failed: %s", exc)
            return []
    return [vi for vi in inferred.graph.value_info
            if vi.name in names and _static(_dims(vi.type)) is not None]


def _materialise(model: onnx.ModelProto, consts: Mapping[str, np.ndarray],
                 shapes: Mapping[str, list[int | str | None]]) -> onnx.ModelProto | None:
    """A copy of ``model`` whose folded node outputs are initializers (their nodes dropped) and
    whose shape-preserving ops have their output shape declared where inference had none."""
    inits = {t.name for t in model.graph.initializer}
    folded = [n for n in model.graph.node
              if n.output and all(o in consts for o in n.output if o)
              and any(o not in inits for o in n.output if o)]
    hints = [n for n in model.graph.node
             if n.op_type in _SAME_SHAPE and n.domain in ("", "ai.onnx") and n.output
             and _static(shapes.get(n.output[0])) is None
             and _static(shapes.get(n.input[0])) is not None]
    contrib = {o: shape for n in model.graph.node
               for o, shape in _contrib_output_shapes(n, shapes).items()
               if _static(shapes.get(o)) is None}
    if not folded and not hints and not contrib:
        return None
    scratch = onnx.ModelProto()
    scratch.CopyFrom(model)
    drop = {id(n) for n in folded}
    keep = [n for n in model.graph.node if id(n) not in drop]
    del scratch.graph.node[:]
    scratch.graph.node.extend(keep)
    for n in folded:
        for o in n.output:
            if o:
                scratch.graph.initializer.append(numpy_helper.from_array(consts[o], o))
    for n in hints:
        shape = _static(shapes.get(n.input[0]))
        scratch.graph.value_info.append(onnx.helper.make_tensor_value_info(
            n.output[0], TensorProto.FLOAT, list(shape or ())))
    for name, shape in contrib.items():
        scratch.graph.value_info.append(onnx.helper.make_tensor_value_info(
            name, TensorProto.FLOAT, list(shape)))
    return scratch


def _contrib_output_shapes(node: onnx.NodeProto,
                           shapes: Mapping[str, list[int | str | None]]) -> dict[str, Shape]:
    """Output shapes of the contrib ops this frontend lowers, from their first input's: the
    same shape, and ``[..., 1]`` for a norm's mean / inverse-std outputs (where onnxruntime's
    symbolic inference stops: it does not give those outputs)."""
    if node.domain != MS_DOMAIN or node.op_type not in _LOWER_MS or not node.input:
        return {}
    shape = _static(shapes.get(node.input[0]))
    if shape is None:
        return {}
    stats = (*shape[:-1], 1)
    if node.op_type == "Attention":  # [B, S, v width]: a third of the packed weight's columns
        w = _static(shapes.get(node.input[1])) if len(node.input) > 1 else None
        sizes = list(_attrs(node).get("qkv_hidden_sizes", []) or [])
        if w is None or len(w) != 2:
            return {}
        width = int(sizes[2]) if len(sizes) == 3 else w[1] // 3
        return {node.output[0]: (*shape[:-1], width)}
    if node.op_type == "MultiHeadAttention":  # [B, S, value width]
        v = _static(shapes.get(node.input[2])) if len(node.input) > 2 and node.input[2] \
            else None
        return {node.output[0]: (*shape[:-1], v[-1])} if v is not None and len(v) == 3 else {}
    per_output = {"SkipLayerNormalization": (shape, stats, stats, shape),
                  "SkipSimplifiedLayerNormalization": (shape, stats, stats, shape),
                  "SimplifiedLayerNormalization": (shape, stats)}.get(node.op_type, (shape,))
    return {o: sh for o, sh in zip(node.output, per_output) if o}


def _static(dims: list[int | str | None] | None) -> Shape | None:
    if dims is None or any(not isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)  # type: ignore[arg-type]


# ---------------------------------------------------------------- constant folding


# ---------------------------------------------------------------- lazy external tensors
#
# A model loaded by path with ``load_onnx(..., lazy=True)`` keeps its large external tensors
# on disk: the tensor keeps its ``external_data`` entries and gains ``basepath`` (the model's
# directory, a key ONNX's ``ExternalDataInfo`` knows), so a value is read when it is needed
# and freed after (peak memory: one tensor, not the weights).

LAZY_BASEPATH = "basepath"

# dtypes whose raw little-endian bytes numpy reads directly (others go through numpy_helper)
_PLAIN_DTYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                           TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                           TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32,
                           TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL})


# A *deferred* tensor is a lazy tensor whose value is a function of another tensor's value
# (a sliced weight of a pruned model): its ``location`` names an entry of ``_DEFERRED`` and its
# value is computed when read, so an apply or a safety-net trial on a big model slices
# nothing until the save streams the result to disk. Entries are small (the source's external
# reference and the plan's indices) and live as long as the process.
DEFERRED_SCHEME = "secateurs-deferred:"
_DEFERRED: dict[str, tuple[TensorProto, Callable[[np.ndarray], np.ndarray]]] = {}


def defer_tensor(target: TensorProto, source: TensorProto,
                 fn: Callable[[np.ndarray], np.ndarray], shape: Sequence[int]) -> None:
    """Make ``target`` a deferred tensor of ``shape`` whose value is ``fn(value of source)``
    (``source``, lazy, is copied: its external reference, not its data)."""
    import secrets

    token = f"{DEFERRED_SCHEME}{secrets.token_hex(8)}"
    held = TensorProto()
    held.CopyFrom(source)
    _DEFERRED[token] = (held, fn)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(held.data_type).itemsize
    name = target.name
    target.Clear()  # (``target`` may be ``source`` itself: read from ``held`` from here on)
    target.name, target.data_type = name, held.data_type
    target.dims.extend(int(d) for d in shape)
    target.data_location = TensorProto.EXTERNAL
    length = int(np.prod(shape, dtype=np.int64)) * itemsize
    for key, value in (("location", token), ("offset", "0"), ("length", str(length)),
                       (LAZY_BASEPATH, "")):
        entry = target.external_data.add()
        entry.key, entry.value = key, value


def is_deferred(t: TensorProto) -> bool:
    return is_lazy(t) and any(e.key == "location" and e.value.startswith(DEFERRED_SCHEME)
                              for e in t.external_data)


def is_lazy(t: TensorProto) -> bool:
    """An external tensor whose data is read from ``basepath/location`` when needed."""
    return t.data_location == TensorProto.EXTERNAL and any(
        e.key == LAZY_BASEPATH for e in t.external_data)


def external_info(t: TensorProto) -> tuple[str, int, int]:
    """``(file path, offset, length)`` of a lazy tensor's bytes."""
    import os

    entries = {e.key: e.value for e in t.external_data}
    length = int(entries["length"]) if "length" in entries else \
        int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(
            t.data_type).itemsize
    return (os.path.join(entries.get(LAZY_BASEPATH, ""), entries["location"]),
            int(entries.get("offset", 0)), length)


def tensor_array(t: TensorProto) -> np.ndarray:
    """The value of an initializer (``numpy_helper.to_array``); a lazy tensor is read from
    its file into a fresh array (no memory map: its pages would stay resident)."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    path, offset, length = external_info(t)
    if path.startswith(DEFERRED_SCHEME):
        if path not in _DEFERRED:
            raise InputError(f"tensor '{t.name}' refers to a deferred value of another "
                             f"process ({path}); save the model where it was made")
        source, fn = _DEFERRED[path]
        return fn(tensor_array(source))
    if t.data_type in _PLAIN_DTYPES:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        count = int(np.prod(t.dims, dtype=np.int64))
        arr = np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                          offset=offset)
        if arr.size != count:
            raise InputError(f"external data of '{t.name}' in {path} is truncated")
        return arr.astype(dtype, copy=False).reshape(tuple(t.dims))
    with open(path, "rb") as fh:
        fh.seek(offset)
        raw = fh.read(length)
    inline = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, raw_data=raw)
    return numpy_helper.to_array(inline)


def _is_param_init(init: TensorProto) -> bool:
    return init.data_type in _FLOAT_TYPES and int(np.prod(init.dims, dtype=np.int64)) > 1


def _float_constant(node: onnx.NodeProto) -> bool:
    """A ``Constant`` node holding a float tensor of more than one element: a parameter (an
    exporter's decomposed norm keeps its affine vectors there)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return False
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t.data_type in _FLOAT_TYPES and int(np.prod(a.t.dims, dtype=np.int64)) > 1
        if a.name == "value_floats":
            return len(a.floats) > 1
    return False


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 13


def _fold_directly(node: onnx.NodeProto,
                   shapes: Mapping[str, list[int | str | None]]) -> np.ndarray | None:
    """A ``Constant`` holding a tensor, or the ``Shape`` of a static value; else None."""
    if node.op_type == "Constant" and len(node.attribute) == 1 \
            and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    if node.op_type == "Shape" and node.input:
        shape = _static(shapes.get(node.input[0]))
        if shape is None:
            return None
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return np.asarray(shape[start:end], dtype=np.int64)  # ONNX clamps like Python
    return None


def fold_constants(model: onnx.ModelProto,
                   shapes: Mapping[str, list[int | str | None]]) -> dict[str, np.ndarray]:
    """Values computable without running the network: integer and scalar initializers,
    ``Constant`` nodes, ``Shape`` of statically shaped values and arithmetic on those. Float
    initializers with more than one element are parameters and never folded."""
    from onnx.reference import ReferenceEvaluator

    consts: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        if not _is_param_init(init):
            consts[init.name] = tensor_array(init)
    opsets = {"": _opset(model)}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE \
                or _float_constant(node):
            continue
        ins = [i for i in node.input if i]
        direct = _fold_directly(node, shapes)
        if direct is not None:  # the common cases without building an evaluator (~0.5 ms)
            consts[node.output[0]] = direct
            continue
        if node.op_type in ("Shape", "Size"):
            shape = _static(shapes.get(node.input[0]))
            if shape is None:
                continue
            feeds = {node.input[0]: np.zeros(shape, dtype=np.float32)} \
                if int(np.prod(shape)) <= _MAX_FOLD else None
            if feeds is None:
                continue
        elif all(i in consts for i in ins):
            feeds = {i: consts[i] for i in ins}
        else:
            continue
        try:
            results = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - not foldable: lower it as a node instead
            log.debug("cannot fold %s %s: %s", node.op_type, node.name, exc)
            continue
        if any(np.asarray(r).size > _MAX_FOLD for r in results):
            continue
        for out, r in zip(node.output, results):
            if out:
                consts[out] = np.asarray(r)
    return consts


# ---------------------------------------------------------------- lowering


@dataclass(frozen=True)
class GroupNormDecomposition:
    """``Reshape(x, [N, G, -1]) → InstanceNormalization(ones, zeros) → Reshape(x's shape)``:
    how the exporters write GroupNorm before opset 18 (the affine follows as Mul/Add). Node
    indices, the input ``x`` and the group count ``G``."""

    split: int
    instance_norm: int
    norm: int
    x: str
    groups: int


def group_norm_decompositions(graph: onnx.GraphProto,
                              shapes: Mapping[str, list[int | str | None]],
                              value: Callable[[str], np.ndarray | None]
                              ) -> list[GroupNormDecomposition]:
    """Every exporter GroupNorm decomposition of ``graph`` whose InstanceNormalization scale
    and bias are uniform (each the same number for every group: removing whole groups then
    keeps them). Lowered as one ``group_norm`` the analysis costs nothing per spatial position
    (the reshape to ``[N, G, C/G·H·W]`` would compose a label per position)."""
    index: dict[str, int] = {}
    uses: dict[str, int] = {}
    for k, node in enumerate(graph.node):
        for o in node.output:
            index[o] = k
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 2
    consumer: dict[str, int] = {}
    for k, node in enumerate(graph.node):
        for i in node.input:
            consumer[i] = k
    found = []
    for k, node in enumerate(graph.node):
        if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx") \
                or len(node.input) < 3:
            continue
        r1 = index.get(node.input[0])
        r2 = consumer.get(node.output[0])
        if r1 is None or r2 is None or uses.get(node.input[0]) != 1 \
                or uses.get(node.output[0]) != 1:
            continue
        split, norm = graph.node[r1], graph.node[r2]
        if split.op_type != "Reshape" or norm.op_type != "Reshape" or norm.input[0] != node.output[0]:
            continue
        x = split.input[0]
        sx, s1, s2 = (_static(shapes.get(v)) for v in (x, split.output[0], norm.output[0]))
        if sx is None or s1 is None or len(sx) < 3 or len(s1) != 3 or s2 != sx \
                or s1[0] != sx[0] or sx[1] % s1[1] or s1[1] * s1[2] != int(np.prod(sx[1:])):
            continue
        scale, bias = value(node.input[1]), value(node.input[2])
        if scale is None or bias is None or scale.size != s1[1] or bias.size != s1[1] \
                or np.ptp(scale) != 0 or np.ptp(bias) != 0:
            continue
        found.append(GroupNormDecomposition(r1, k, r2, x, int(s1[1])))
    return found


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _subgraph_names(node: onnx.NodeProto) -> list[str]:
    """Outer-scope values a control-flow node's subgraphs read."""
    names: list[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names += [i for i in n.input if i and i not in local]
                names += _subgraph_names(n)
    return names


# ONNX Runtime's own rewrites (a session's optimized graph, the transformer optimizer at its
# highest levels, layout transforms): ops no exporter writes
_ORT_INTERNAL_OPS = {"FusedConv", "FusedMatMul", "FusedGemm", "NhwcConv", "NhwcMaxPool",
                     "ReorderInput", "ReorderOutput", "FusedMatMulActivation", "QuickGelu"}
_ORT_INTERNAL_DOMAINS = {"com.microsoft.nchwc", "com.ms.internal.nhwc"}
# quantized operators (QOperator format, dynamic quantization)
QUANTIZED_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat",
                  "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid",
                  "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QGemm",
                  "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                  "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention",
                  "MatMulNBits", "MatMulBnb4"}
_CONTROL_FLOW_OPS = {"Loop", "If", "Scan"}
# the most elements an initializer read by post-processing may have (an NMS threshold, the
# class ids of a classifier, a shape); a larger one is a weight
_TAIL_CONSTANT = 1024


def _unknown_shape_advice(domain: str, op: str) -> str:
    """What to do about a value whose shape inference cannot fix, by the op that makes it."""
    if domain in _ORT_INTERNAL_DOMAINS or op in _ORT_INTERNAL_OPS:
        return ("the model was optimized by ONNX Runtime (its internal ops carry no shape "
                "secateurs can read): prune the exported model before ORT optimizes it (ORT "
                "optimizes it again when it loads the pruned one), or declare these ops' "
                "output shapes as value_info")
    if op in QUANTIZED_OPS:
        return ("the model is quantized: prune the float model, then quantize "
                "(secateurs optimize --prune R --quantize int8)")
    if op in _CONTROL_FLOW_OPS:
        return (f"a {op} (control flow) sizes it at run time: export the model without "
                "scripted control flow (torch.export / dynamo=True unrolls static loops), or "
                "prune the torch model with secateurs.prune")
    return ("pass static input_shapes (--input-shape NAME=1,3,224,224) or re-export the model "
            "with static shapes (outputs of custom ops need value_info entries)")


class _Lowering:
    def __init__(self, model: onnx.ModelProto, shapes: Mapping[str, list[int | str | None]],
                 consts: dict[str, np.ndarray]) -> None:
        self.model = model
        self.graph = model.graph
        self.shapes = shapes
        self.consts = consts
        self.inits = {t.name: t for t in self.graph.initializer}
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.opset = _opset(model)
        self.producer: dict[str, str] = {}
        self.producer_op: dict[str, tuple[str, str]] = {}  # value -> (domain, op type)
        self.onnx_name = ""
        self.onnx_op = ""
        self.const_params = {n.output[0]: n for n in self.graph.node if _float_constant(n)}

    # values ---------------------------------------------------------------

    def shape(self, name: str) -> Shape:
        dims = self.shapes.get(name)
        shape = _static(dims)
        if shape is None:
            made_by = self.producer.get(name, "an unknown producer")
            what = "an unknown shape" if dims is None else f"a dynamic shape {dims}"
            raise InputError(f"value '{name}' (output of {made_by}) has {what} after shape "
                             f"inference; {_unknown_shape_advice(*self.producer_op.get(name, ('', '')))}")
        return shape

    def tensor_value(self, name: str) -> np.ndarray | None:
        """The value of a constant, initializer or float Constant node (None otherwise)."""
        if name in self.consts:
            return self.consts[name]
        if name in self.inits:
            return tensor_array(self.inits[name])
        if name in self.const_params:
            return _constant_value(self.const_params[name])
        return None

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def is_param(self, name: str) -> bool:
        return (name in self.inits and _is_param_init(self.inits[name])) \
            or name in self.const_params

    def ref(self, name: str) -> str | None:
        if not name:
            return None
        if name in self.values:
            return name
        if name in self.inits:
            init = self.inits[name]
            dtype = TensorProto.DataType.Name(init.data_type).lower()
            shape = tuple(int(d) for d in init.dims)
            if _is_param_init(init):
                self.values[name] = Value(name, shape, dtype, param=name, kind="parameter")
            else:
                self.values[name] = Value(name, shape, dtype, kind="constant")
        elif name in self.const_params:
            arr = _constant_value(self.const_params[name])
            self.values[name] = Value(name, tuple(arr.shape), str(arr.dtype), param=name,
                                      kind="parameter")
        elif name in self.consts:
            arr = self.consts[name]
            self.values[name] = Value(name, tuple(arr.shape), str(arr.dtype), kind="constant")
        else:
            self.values[name] = Value(name, self.shape(name))
        return name

    def tmp(self, base: str, suffix: str, shape: Shape) -> str:
        name = f"{base}/{suffix}"
        self.values[name] = Value(name, shape)
        return name

    # nodes ----------------------------------------------------------------

    def emit(self, op: str, inputs: Sequence[str | None], outputs: Sequence[str],
             attrs: dict[str, Any] | None = None, suffix: str = "") -> None:
        for out in outputs:
            if out not in self.values:
                self.values[out] = Value(out, self.shape(out))
        name = self.onnx_name + (f"/{suffix}" if suffix else "")
        ins = [self.ref(i) if i else None for i in inputs]
        self.nodes.append(Node(name, op, ins, list(outputs), dict(attrs or {}),
                               f"ONNX {self.onnx_op}"))

    def opaque(self, node: onnx.NodeProto, reason: str) -> None:
        ins = [i for i in list(node.input) + _subgraph_names(node) if i]
        self.emit("opaque", list(dict.fromkeys(ins)), [o for o in node.output if o],
                  {"reason": reason})

    def unlowered_outputs(self, node: onnx.NodeProto, used: set[str]) -> None:
        """Outputs a lowering left without a producer (an op's optional outputs: MaxPool's
        indices, a norm's statistics) that something reads: opaque, so their readers' channels
        are pinned instead of being left unconstrained."""
        left = [o for o in node.output if o and o in used and o not in self.values
                and o not in self.consts and o not in self.const_params and o not in self.inits]
        if left:
            self.emit("opaque", list(dict.fromkeys(i for i in node.input if i)), left,
                      {"reason": f"output(s) {left} of {node.op_type} '{self.onnx_name}' have "
                                 f"no channel rule"}, suffix="rest")

    def weighty(self, name: str) -> bool:
        """An initializer larger than a post-processing constant (thresholds, class ids, a
        shape): a weight, whatever its type (a quantized model's int8 ones)."""
        init = self.inits.get(name)
        return init is not None and int(np.prod(init.dims)) > _TAIL_CONSTANT

    def shapeless_tail(self, names: list[str]) -> tuple[set[int], str]:
        """The nodes downstream of a value whose shape is set at run time (the boxes kept by a
        detector's ``NonMaxSuppression``, ``NonZero``, a scikit-learn pipeline's ``ZipMap``
        maps), when none of them reads a weight: post-processing, kept as is. Every value they
        read from the network is pinned (an opaque node), so the network before them prunes
        and they see the same values. A tail that reads a weight, or a run-time size in the
        middle of the network (a quantized model's ``QLinearConv`` outputs, ORT's own ops,
        control flow), is left to the lowering, which names the value and what to do.
        Returns the node indices and the first such node, for the pins' reason."""
        tail: set[int] = set()
        values: set[str] = set()
        first = ""
        for k, node in enumerate(self.graph.node):
            outs = [o for o in node.output if o]
            reads = set(node.input) | set(_subgraph_names(node))
            if values & reads or any(o not in self.consts and _static(self.shapes.get(o)) is None
                                     for o in outs):
                if node.op_type in QUANTIZED_OPS | _ORT_INTERNAL_OPS | _CONTROL_FLOW_OPS or \
                        node.domain in _ORT_INTERNAL_DOMAINS or \
                        any(self.is_param(i) or self.weighty(i) for i in reads if i):
                    return set(), ""
                tail.add(k)
                values.update(outs)
                first = first or f"{node.op_type} '{names[k]}'"
        return tail, first

    def lower(self) -> ChannelGraph:
        names = onnx_node_names(self.graph)
        used = {i for n in self.graph.node for i in list(n.input) + _subgraph_names(n)} \
            | {o.name for o in self.graph.output}
        for node, name in zip(self.graph.node, names):
            domain = "" if node.domain in ("", "ai.onnx") else f"{node.domain}::"
            for out in node.output:
                if out:
                    self.producer[out] = f"{domain}{node.op_type} '{name}'"
                    self.producer_op[out] = (node.domain or "", node.op_type)
        inputs = graph_input_names(self.graph)
        for name in inputs:
            self.values[name] = Value(name, self.shape(name), kind="input")
        fused = {d.norm: d for d in group_norm_decompositions(self.graph, self.shapes,
                                                                self.tensor_value)}
        inner = {i for d in fused.values() for i in (d.split, d.instance_norm)}
        tail, first = self.shapeless_tail(names)
        for k, (node, name) in enumerate(zip(self.graph.node, names)):
            outs = [o for o in node.output if o]
            if outs and all(o in self.consts for o in outs):
                continue  # folded
            if k in inner:
                continue  # lowered with its group norm
            self.onnx_name, self.onnx_op = name, node.op_type
            if k in tail:
                ins = [i for i in list(node.input) + _subgraph_names(node)
                       if i and _static(self.shapes.get(i)) is not None or i in self.inits]
                for out in outs:
                    self.values.setdefault(out, Value(out, None))
                self.nodes.append(Node(name, "opaque", [self.ref(i) for i in dict.fromkeys(ins)],
                                       outs, {"reason": f"read by post-processing whose sizes "
                                                        f"are set at run time (from {first})"},
                                       f"ONNX {node.op_type}"))
                continue
            if k in fused:
                self.emit("group_norm", [fused[k].x, None, None], [node.output[0]],
                          {"num_groups": fused[k].groups})
                continue
            if node.domain == MS_DOMAIN and node.op_type in _LOWER_MS:
                _LOWER_MS[node.op_type](self, node)
                self.unlowered_outputs(node, used)
                continue
            if node.domain not in ("", "ai.onnx"):
                self.opaque(node, f"custom-domain op '{node.domain}::{node.op_type}' has no "
                                  f"channel rule; it passes through untouched")
                continue
            lower = _LOWER.get(node.op_type)
            if lower is None:
                self.opaque(node, f"ONNX op '{node.op_type}' has no channel rule")
                continue
            lower(self, node)
            self.unlowered_outputs(node, used)
        outputs = [o.name for o in self.graph.output if self.ref(o.name)]
        return ChannelGraph(self.values, self.nodes, inputs, outputs, frontend="onnx")


Lower = Callable[[_Lowering, onnx.NodeProto], None]
_LOWER: dict[str, Lower] = {}
_LOWER_MS: dict[str, Lower] = {}  # ONNX Runtime's contrib ops (``com.microsoft``)


def _reg(*ops: str, table: dict[str, Lower] = _LOWER) -> Callable[[Lower], Lower]:
    def deco(fn: Lower) -> Lower:
        for op in ops:
            table[op] = fn
        return fn
    return deco


def _first_out(node: onnx.NodeProto) -> list[str]:
    return [node.output[0]]


@_reg("Constant")
def _lower_constant(lw: _Lowering, node: onnx.NodeProto) -> None:
    """A float Constant node is a parameter value (see ``ref``); nothing to emit."""


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), dtype=np.float32)
    raise InputError(f"Constant node '{node.name}' has no tensor value")


@_reg(*_UNARY)
def _lower_unary(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit(_UNARY[node.op_type], [node.input[0]], _first_out(node))


@_reg("Clip")
def _lower_clip(lw: _Lowering, node: onnx.NodeProto) -> None:
    bounds = [i for i in node.input[1:] if i]
    if any(lw.ref(b) and (lw.values[b].shape or ()) not in ((), (1,)) for b in bounds):
        lw.opaque(node, "Clip with tensor-valued bounds")
        return
    lw.emit("clamp", [node.input[0]], _first_out(node))


@_reg(*_BINARY)
def _lower_binary(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit(_BINARY[node.op_type], [i for i in node.input if i], _first_out(node))


@_reg("Pow")
def _lower_pow(lw: _Lowering, node: onnx.NodeProto) -> None:
    exponent = lw.const(node.input[1])
    if exponent is not None and exponent.size == 1:
        lw.emit("pow_scalar", [node.input[0]], _first_out(node))
    else:
        lw.emit("pow", list(node.input[:2]), _first_out(node))


@_reg("Conv", "ConvTranspose")
def _lower_conv(lw: _Lowering, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    if lw.rank(node.input[0]) < 3:
        lw.opaque(node, f"{node.op_type} on a rank-{lw.rank(node.input[0])} input")
        return
    lw.emit("conv", [node.input[0], node.input[1], node.input[2] if len(node.input) > 2 else None],
            _first_out(node), {"groups": int(a.get("group", 1)),
                               "transposed": node.op_type == "ConvTranspose"})


@_reg("MatMul")
def _lower_matmul(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("matmul", list(node.input[:2]), _first_out(node))


@_reg("Gemm")
def _lower_gemm(lw: _Lowering, node: onnx.NodeProto) -> None:
    """Y = alpha·A'·B' + beta·C. alpha/beta scale values, not channels."""
    a = _attrs(node)
    x, w = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    out_shape = lw.shape(out)
    if a.get("transA", 0):
        sx = lw.shape(x)
        x_t = lw.tmp(lw.onnx_name, "transA", (sx[1], sx[0]))
        lw.emit("permute", [x], [x_t], {"perm": [1, 0]}, suffix="transA")
        x = x_t
    bias_ok = c is not None and lw.is_param(c) and lw.shape(c) == (out_shape[1],)
    mm_out = out if c is None or (bias_ok and lw.is_param(w) and a.get("transB", 0)) \
        else lw.tmp(lw.onnx_name, "mm", out_shape)
    if lw.is_param(w) and a.get("transB", 0):
        lw.emit("linear", [x, w, c if bias_ok else None], [mm_out])
    else:
        if a.get("transB", 0):
            sw = lw.shape(w)
            w_t = lw.tmp(lw.onnx_name, "transB", (sw[1], sw[0]))
            lw.emit("permute", [w], [w_t], {"perm": [1, 0]}, suffix="transB")
            w = w_t
        lw.emit("matmul", [x, w], [mm_out])
    if mm_out != out:
        lw.emit("add", [mm_out, c], [out], suffix="bias")


# ---------------------------------------------------------------- ONNX Runtime contrib ops

def opaque_custom(node: onnx.NodeProto) -> bool:
    """A custom-domain node with no channel rule: the analysis pins what it touches, so its
    outputs keep their widths (and their declared shapes stay true after a prune)."""
    return node.domain not in ("", "ai.onnx") \
        and not (node.domain == MS_DOMAIN and node.op_type in _LOWER_MS)


def _reg_ms(*ops: str) -> Callable[[Lower], Lower]:
    return _reg(*ops, table=_LOWER_MS)


def _biased(lw: _Lowering, x: str, bias: str | None, shape: Shape, suffix: str = "bias") -> str:
    """``x + bias`` as a helper value (``x`` itself without a bias)."""
    if not bias:
        return x
    out = lw.tmp(lw.onnx_name, suffix, shape)
    lw.emit("add", [x, bias], [out], suffix=suffix)
    return out


@_reg_ms("BiasGelu", "FastGelu", "Gelu", "QuickGelu")
def _lower_ms_gelu(lw: _Lowering, node: onnx.NodeProto) -> None:
    """GELU of ``x (+ bias)``: BiasGelu/FastGelu add a bias vector first; QuickGelu is
    ``x * sigmoid(alpha * x)``. All elementwise per channel."""
    out = node.output[0]
    bias = node.input[1] if len(node.input) > 1 and node.input[1] else None
    x = _biased(lw, node.input[0], bias, lw.shape(out))
    lw.emit("silu" if node.op_type == "QuickGelu" else "gelu", [x], [out])


@_reg_ms("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
def _lower_ms_skip_norm(lw: _Lowering, node: onnx.NodeProto) -> None:
    """``s = input + skip (+ bias)``, output 0 its norm over the last dim (gamma, beta), output
    3 ``s`` itself (the residual the next block adds). Outputs 1 and 2 (mean, inverse std) are
    statistics over the channels: a reader of them is opaque."""
    ins = list(node.input) + [""] * (5 - len(node.input))
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    x, skip, gamma = ins[0], ins[1], ins[2]
    beta = None if simplified else (ins[3] or None)
    bias = ins[3 if simplified else 4] or None
    shape = lw.shape(node.output[0])
    summed = lw.tmp(lw.onnx_name, "skip", shape)
    lw.emit("add", [x, skip], [summed], suffix="skip")
    summed = _biased(lw, summed, bias, shape)
    lw.emit("rms_norm" if simplified else "layer_norm", [summed, gamma, beta],
            [node.output[0]], {"ndim": 1})
    outs = list(node.output) + [""] * (4 - len(node.output))
    _norm_statistics(lw, node, summed, outs[1:3])
    if outs[3]:
        lw.emit("identity", [summed], [outs[3]], suffix="sum")


@_reg_ms("Attention")
def _lower_ms_attention(lw: _Lowering, node: onnx.NodeProto) -> None:
    """The fused multi-head attention (``ort_attention``); its ``num_heads`` (and ``scale``
    where the head size shrinks) are rewritten by the apply."""
    a = _attrs(node)
    attrs = {"num_heads": int(a["num_heads"]), "scale": a.get("scale"),
             "qkv_hidden_sizes": list(a.get("qkv_hidden_sizes", []) or []),
             "do_rotary": int(a.get("do_rotary", 0))}
    lw.emit("ort_attention", list(node.input), [o for o in node.output if o], attrs)


@_reg_ms("MultiHeadAttention")
def _lower_ms_mha(lw: _Lowering, node: onnx.NodeProto) -> None:
    """``ort_mha``: separate query, key and value; ``num_heads`` (and ``scale`` where the head
    size shrinks) rewritten by the apply."""
    a = _attrs(node)
    lw.emit("ort_mha", list(node.input), [o for o in node.output if o],
            {"num_heads": int(a["num_heads"]), "scale": a.get("scale")})


@_reg("SimplifiedLayerNormalization")  # ONNX Runtime registers it in the default domain
@_reg_ms("SimplifiedLayerNormalization")
def _lower_ms_rms_norm(lw: _Lowering, node: onnx.NodeProto) -> None:
    rank = lw.rank(node.input[0])
    axis = int(_attrs(node).get("axis", -1)) % rank
    lw.emit("rms_norm", [node.input[0], node.input[1], None], _first_out(node),
            {"ndim": rank - axis})
    _norm_statistics(lw, node, node.input[0], node.output[1:2])


@_reg("GatherND")
def _lower_gather_nd(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("gather_nd", [node.input[0], node.input[1]], _first_out(node),
            {"batch_dims": int(_attrs(node).get("batch_dims", 0))})


@_reg("BatchNormalization")
def _lower_batch_norm(lw: _Lowering, node: onnx.NodeProto) -> None:
    """Inference BatchNormalization is a per-channel affine map. ``training_mode=1`` (weight
    standardisation: ``F.batch_norm(w.reshape(1, O, -1), training=True)``) normalises with the
    statistics over every other dim: the statistics are a mean over those dims (lossy to
    remove positions from), subtracted from the input before the per-channel affine."""
    if not int(_attrs(node).get("training_mode", 0)):
        lw.emit("batch_norm", list(node.input[:5]), _first_out(node))
        return
    x = node.input[0]
    shape = lw.shape(x)
    dims = [d for d in range(len(shape)) if d != 1]
    stats_shape = tuple(1 if d in dims else s for d, s in enumerate(shape))
    mean = lw.tmp(lw.onnx_name, "batch_stats", stats_shape)
    lw.emit("reduce", [x], [mean], {"dims": dims, "keepdim": True, "kind": "mean"},
            suffix="batch_stats")
    centred = lw.tmp(lw.onnx_name, "centred", shape)
    lw.emit("sub", [x, mean], [centred], suffix="centred")
    lw.emit("batch_norm", [centred] + list(node.input[1:5]), [node.output[0]])


@_reg("InstanceNormalization")
def _lower_instance_norm(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("instance_norm", list(node.input[:3]), _first_out(node))


@_reg("LayerNormalization")
def _lower_layer_norm(lw: _Lowering, node: onnx.NodeProto) -> None:
    rank = lw.rank(node.input[0])
    axis = int(_attrs(node).get("axis", -1)) % rank
    lw.emit("layer_norm", list(node.input[:3]), _first_out(node), {"ndim": rank - axis})
    _norm_statistics(lw, node, node.input[0], node.output[1:3])


def _norm_statistics(lw: _Lowering, node: onnx.NodeProto, x: str,
                     outputs: Sequence[str]) -> None:
    """A norm's optional mean / inverse-std outputs are statistics over the normalised
    channels: whoever reads them is opaque to the channels."""
    used = [o for o in outputs if o]
    if used:
        lw.emit("opaque", [x], used,
                {"reason": f"{node.op_type} '{lw.onnx_name}' mean / inverse std outputs"},
                suffix="stats")


@_reg("GroupNormalization")
def _lower_group_norm(lw: _Lowering, node: onnx.NodeProto) -> None:
    groups = int(_attrs(node)["num_groups"])
    channels = lw.shape(node.input[0])[1]
    scale = lw.shape(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if scale is not None and scale != (channels,):
        lw.opaque(node, f"GroupNormalization with per-group scale {list(scale)} (opset < 21)")
        return
    lw.emit("group_norm", list(node.input[:3]), _first_out(node), {"num_groups": groups})


@_reg("LpNormalization")
def _lower_lp_norm(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("softmax", [node.input[0]], _first_out(node),
            {"dim": int(_attrs(node).get("axis", -1))})


@_reg("Softmax", "LogSoftmax")
def _lower_softmax(lw: _Lowering, node: onnx.NodeProto) -> None:
    rank = lw.rank(node.input[0])
    default = -1 if lw.opset >= 13 else 1
    axis = int(_attrs(node).get("axis", default)) % rank
    if lw.opset < 13 and axis != rank - 1:
        lw.opaque(node, f"{node.op_type}-{lw.opset} flattens the dims after axis {axis}")
        return
    lw.emit("softmax", [node.input[0]], _first_out(node), {"dim": axis})


@_reg("LRN")
def _lower_lrn(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("local_response_norm", [node.input[0]], _first_out(node), {"dim": 1})


@_reg("Concat")
def _lower_concat(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("cat", [i for i in node.input if i], _first_out(node),
            {"dim": int(_attrs(node)["axis"])})


@_reg("Split")
def _lower_split(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("split", [node.input[0]], [o for o in node.output if o],
            {"dim": int(_attrs(node).get("axis", 0))})


def _slice_items(shape: Shape, starts: np.ndarray, ends: np.ndarray, axes: np.ndarray,
                 steps: np.ndarray) -> list[Any]:
    items: list[Any] = [slice(None)] * len(shape)
    for s, e, ax, st in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        ax = int(ax) % len(shape)
        size = shape[ax]
        if st <= 0:
            items[ax] = "tensor"
            continue
        s = min(max(s + size if s < 0 else s, 0), size)
        e = min(max(e + size if e < 0 else e, 0), size)
        if size > 1 and len(range(s, e, st)) == 1:
            # One position of a wider dim (the exporters' unbind/chunk: Slice then Squeeze):
            # removing it would leave an empty slice, so it is a constant index, which pins
            # the dim, followed by the kept size-1 axis.
            items[ax] = (s, None)
            continue
        items[ax] = slice(s or None, e if e < size else None, st if st != 1 else None)
    return [x for it in items for x in (it if isinstance(it, tuple) else (it,))]


@_reg("Slice")
def _lower_slice(lw: _Lowering, node: onnx.NodeProto) -> None:
    shape = lw.shape(node.input[0])
    a = _attrs(node)
    if "starts" in a:  # Slice-1 (opset < 10): constant bounds as attributes, step 1
        starts, ends = np.asarray(a["starts"], np.int64), np.asarray(a["ends"], np.int64)
        axes = np.asarray(a.get("axes", range(len(starts))), np.int64)
        items = _slice_items(shape, starts, ends, axes, np.ones(len(starts), np.int64))
        lw.emit("index", [node.input[0]], _first_out(node), {"items": items})
        return
    ins = list(node.input) + [""] * (5 - len(node.input))
    starts, ends = lw.const(ins[1]), lw.const(ins[2])
    if starts is None or ends is None or (ins[3] and lw.const(ins[3]) is None) or \
            (ins[4] and lw.const(ins[4]) is None):
        lw.opaque(node, "Slice with bounds computed at run time")
        return
    axes = lw.const(ins[3]) if ins[3] else np.arange(len(starts))
    steps = lw.const(ins[4]) if ins[4] else np.ones(len(starts), dtype=np.int64)
    assert axes is not None and steps is not None
    items = _slice_items(shape, starts.reshape(-1), ends.reshape(-1), axes.reshape(-1),
                         steps.reshape(-1))
    lw.emit("index", [node.input[0]], _first_out(node), {"items": items})


@_reg("Gather")
def _lower_gather(lw: _Lowering, node: onnx.NodeProto) -> None:
    data, idx = node.input[0], node.input[1]
    rank = lw.rank(data)
    axis = int(_attrs(node).get("axis", 0)) % rank
    index = lw.const(idx)
    if index is None and lw.is_param(data) and axis == 0 and rank == 2:
        lw.emit("embedding", [idx, data], _first_out(node))
        return
    lead: list[Any] = [slice(None)] * axis
    if index is not None and index.ndim == 0:
        i = int(index) % lw.shape(data)[axis]
        lw.emit("index", [data], _first_out(node), {"items": lead + [i]})
    elif index is not None and index.ndim == 1 and len(index) and index.dtype.kind == "i" \
            and isinstance(lw.shape(data)[axis], int):
        size = lw.shape(data)[axis]
        lw.emit("index", [data], _first_out(node),
                {"items": lead + [take(int(v) % size for v in index)]})
    else:  # a relative-position / attention-bias table read through an index tensor
        lw.emit("index", [data, idx], _first_out(node), {"items": lead + ["gather"]})


@_reg("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _lower_reshape(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("reshape", [node.input[0]], _first_out(node))


@_reg("Einsum")
def _lower_einsum(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("einsum", [i for i in node.input if i], _first_out(node),
            {"equation": str(_attrs(node)["equation"].decode()
                             if isinstance(_attrs(node)["equation"], bytes)
                             else _attrs(node)["equation"])})


@_reg("Transpose")
def _lower_transpose(lw: _Lowering, node: onnx.NodeProto) -> None:
    rank = lw.rank(node.input[0])
    perm = _attrs(node).get("perm") or list(reversed(range(rank)))
    lw.emit("permute", [node.input[0]], _first_out(node), {"perm": [int(p) for p in perm]})


@_reg("Expand")
def _lower_expand(lw: _Lowering, node: onnx.NodeProto) -> None:
    sized = len(node.input) > 1 and lw.const(node.input[1]) is not None
    lw.emit("expand", [node.input[0]], _first_out(node), {"sized": sized})


@_reg("Tile")
def _lower_tile(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("repeat", [node.input[0]], _first_out(node))


@_reg(*_POOLS)
def _lower_pool(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("pool", [node.input[0]], _first_out(node),
            {"spatial": max(lw.rank(node.input[0]) - 2, 1)})


@_reg("LSTM", "GRU", "RNN")
def _lower_rnn(lw: _Lowering, node: onnx.NodeProto) -> None:
    """``X`` is ``[seq, batch, input]`` (``layout=0``) or ``[batch, seq, input]``
    (``layout=1``): the features are last either way, and ``W`` ``[directions, gates·hidden,
    input]`` holds them on dim 2. ``R``, ``B``, ``sequence_lens``, the initial states and the
    peepholes are recurrent state, like the outputs (the ``rnn`` rule pins them). A ``W`` that
    is not an initializer or Constant is not followed: the rule pins ``X``'s features."""
    x, w = node.input[0], node.input[1]
    if lw.rank(x) != 3 or len(lw.shape(w)) != 3:
        lw.opaque(node, f"{node.op_type} with a rank-{lw.rank(x)} input or a "
                        f"rank-{len(lw.shape(w))} W")
        return
    attrs: dict[str, Any] = {"layout": int(_attrs(node).get("layout", 0)), "input_dim": 2,
                             "weights": 1, "sequence_output": False}
    if not lw.is_param(w):
        attrs["unfollowed"] = f"{node.op_type} input weights W '{w}' are computed at run time"
    lw.emit("rnn", list(node.input), [o for o in node.output if o], attrs)


@_reg("DepthToSpace", "SpaceToDepth")
def _lower_depth_to_space(lw: _Lowering, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    if lw.rank(node.input[0]) != 4:
        lw.opaque(node, f"{node.op_type} of a rank-{lw.rank(node.input[0])} tensor")
        return
    inverse = node.op_type == "SpaceToDepth"  # SpaceToDepth orders (sub-pixel, c)
    mode = a.get("mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    order = "dcr" if inverse or mode.upper() == "DCR" else "crd"
    lw.emit("pixel_shuffle", [node.input[0]], _first_out(node),
            {"factor": int(a["blocksize"]), "inverse": inverse, "order": order})


@_reg("Pad")
def _lower_pad(lw: _Lowering, node: onnx.NodeProto) -> None:
    """``pads`` as an attribute (opset < 11) or a constant input ``[x1_begin, ..., x1_end,
    ...]``, optionally over ``axes`` (opset 18); mode ``constant``/``reflect``/``edge``/
    ``wrap``. Pads computed at run time are None per dim (the rule keeps those dims)."""
    a = _attrs(node)
    rank = lw.rank(node.input[0])
    flat: list[int] | None = None
    if "pads" in a:
        flat = [int(p) for p in a["pads"]]
    elif len(node.input) > 1 and node.input[1]:
        c = lw.const(node.input[1])
        flat = None if c is None else [int(p) for p in c.reshape(-1).tolist()]
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        c = lw.const(node.input[3])
        if c is None:
            flat = None
        else:
            axes = [int(d) % rank for d in c.reshape(-1).tolist()]
    pairs: list[tuple[int, int] | None] = [None] * rank
    if flat is not None and len(flat) == 2 * len(axes):
        for k, d in enumerate(axes):
            pairs[d] = (flat[k], flat[k + len(axes)])
        if len(axes) < rank:  # dims not in axes are not padded
            pairs = [(0, 0) if p is None else p for p in pairs]
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
             "wrap": "circular"}
    lw.emit("pad", [node.input[0]], _first_out(node),
            {"pads": pairs, "mode": modes.get(mode, mode)})


@_reg("GridSample")
def _lower_grid_sample(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("grid_sample", [node.input[0], node.input[1]], _first_out(node))


@_reg("Resize", "Upsample")
def _lower_resize(lw: _Lowering, node: onnx.NodeProto) -> None:
    sx, sy = lw.shape(node.input[0]), lw.shape(node.output[0])
    if len(sx) < 3 or sx[:2] != sy[:2]:
        lw.opaque(node, f"{node.op_type} that changes batch or channel dims")
        return
    lw.emit("resize", [node.input[0]], _first_out(node), {"spatial": len(sx) - 2})


@_reg(*_REDUCES)
def _lower_reduce(lw: _Lowering, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    kind = _REDUCES[node.op_type]
    rank = lw.rank(node.input[0])
    if kind in ("argmax", "argmin"):
        dims: list[int] | None = [int(a.get("axis", 0)) % rank]
    elif len(node.input) > 1 and node.input[1]:
        axes = lw.const(node.input[1])
        if axes is None:
            lw.opaque(node, f"{node.op_type} over axes computed at run time")
            return
        dims = [int(d) % rank for d in axes.reshape(-1).tolist()]
    elif "axes" in a:
        dims = [int(d) % rank for d in a["axes"]]
    else:
        dims = None
    if not dims and a.get("noop_with_empty_axes", 0):
        lw.emit("identity", [node.input[0]], _first_out(node))
        return
    lw.emit("reduce", [node.input[0]], _first_out(node),
            {"dims": dims or None, "keepdim": bool(a.get("keepdims", 1)), "kind": kind})


@_reg(*_SOURCES)
def _lower_source(lw: _Lowering, node: onnx.NodeProto) -> None:
    lw.emit("source", [i for i in node.input if i], [o for o in node.output if o])


# ---------------------------------------------------------------- entry point

# Opset 7 made broadcasting numpy-style; before it, Add/Mul/... broadcast through the
# ``broadcast``/``axis`` attributes and PRelu's slope ``[C]`` meant per channel. The rules
# assume numpy broadcasting, so older graphs are refused rather than mis-analysed.
MIN_OPSET = 7
MIN_IR_VERSION = 3


def check_supported_version(model: onnx.ModelProto) -> None:
    """Raise :class:`InputError` for IR versions and default-domain opsets the frontend does
    not read correctly, saying how to convert the model."""
    opset = _opset(model)
    newest = onnx.defs.onnx_opset_version()
    convert = (f"convert it first: onnx.version_converter.convert_version(model, 13) (or "
               f"re-export it at opset 13-{newest})")
    if model.ir_version < MIN_IR_VERSION:
        raise InputError(f"ONNX IR version {model.ir_version} is older than the oldest "
                         f"supported ({MIN_IR_VERSION}); {convert}")
    if opset < MIN_OPSET:
        raise InputError(f"the model imports opset {opset} of the default ONNX domain: before "
                         f"opset {MIN_OPSET}, broadcasting used the 'broadcast'/'axis' "
                         f"attributes (and PRelu's slope was per channel), which secateurs "
                         f"does not analyse; {convert}")
    if opset > newest:
        raise InputError(f"the model imports opset {opset}, newer than this onnx "
                         f"{onnx.__version__} knows ({newest}); upgrade onnx or re-export the "
                         f"model at opset <= {newest}")



def from_onnx(model: onnx.ModelProto,
              input_shapes: Mapping[str, Sequence[int]] | None = None) -> ChannelGraph:
    """Lower ``model`` (not modified) to the channel graph.

    ``input_shapes`` fixes graph input shapes (``{"x": [1, 3, 224, 224]}``) before shape
    inference; it is required when an input has a dynamic dim.
    """
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    check_supported_version(model)
    work, shapes = infer_static_shapes(model, input_shapes)
    consts = fold_constants(work, shapes)
    graph = _Lowering(work, shapes, consts).lower()
    log.debug("channel graph (onnx):\n%s", graph.summary())
    return graph
