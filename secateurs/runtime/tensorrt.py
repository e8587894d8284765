"""TensorRT engines with 2:4 sparse tensor cores: eligibility, build, inspection, running.

TensorRT (8.0+) uses sparse tensor-core kernels for Convolution and fully-connected / MatMul
layers when ``BuilderFlag.SPARSE_WEIGHTS`` is set, the constant weights are 2:4 sparse along the
reduction axis, and its timing finds the sparse kernel faster. The reduction axis is the one
the weights are multiplied along:

* ``Conv`` weight ``[K, C/groups, R, S]``: groups of 4 along ``C`` (axis 1) for every (k, r, s);
* ``Gemm`` ``Y = A @ B``: ``B`` is ``[K, N]`` (axis 0) when ``transB=0`` and ``[N, K]`` (axis 1)
  when ``transB=1``;
* ``MatMul`` with a constant ``B`` ``[..., K, N]``: axis -2 (the rows of B). A ``B`` produced
  by ``Transpose`` / ``DequantizeLinear`` / ``Identity`` of an initializer is followed back.

``check_sparse_eligibility`` applies these rules without TensorRT or a GPU,
with size thresholds chosen as follows (they are parameters):

* reduction size ``>= 64`` and output size ``>= 64``: TensorRT's sparse kernels tile both
  dimensions in blocks of 64 or more (fp16 sparse MMA has k = 32 per instruction), so a
  smaller layer pads a whole tile and the 2x saving on weight bytes cannot pay for the
  metadata and reformatting; TensorRT's timing then picks the dense kernel (NVIDIA/TensorRT
  issues #1403, #2169: "eligible" layers that were not picked were small or memory bound);
* output size ``% 8 == 0`` and reduction size ``% 16 == 0``: the tensor-core alignment NVIDIA's
  own pruning tool (apex ASP, ``asp.py``) requires before it prunes a layer;
* grouped and depthwise convolutions are not eligible (no sparse implementation).

``build_engine`` works with TensorRT 10 and 11, told apart by what the installed Python API
has, never by its version string (``detect_api``):

* TensorRT 10 has ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` *and* the weak-typing
  precision flags ``BuilderFlag.FP16`` / ``BF16`` / ``INT8`` (deprecated since 10.12);
* TensorRT 11 removed the weak-typing flags (and trtexec's ``--fp16`` / ``--int8`` / ``--bf16``
  / ``--best``): every network is strongly typed, precision comes from the ONNX's own types
  (fp16/bf16 tensors, Q/DQ nodes for int8); ``STRONGLY_TYPED`` is kept but ignored;
* TensorRT 8 still had implicit batch (``Builder.max_batch_size``) and needs
  ``EXPLICIT_BATCH`` for ONNX.

``plan_build`` (pure) turns the API, the requested precision and the ONNX's own precision
(``onnx_precision``) into network flags, builder flags and trtexec flags: strongly typed
whenever the API has it and the ONNX carries the precision; the weakly typed flags only where
the installed TensorRT still has them, with a note that they are deprecated; a clear error on
TensorRT 11 when the ONNX does not carry the requested precision (convert it first:
``secateurs optimize --quantize fp16|int8``). ``trtexec_command`` prints the matching line
(``--stronglyTyped --sparsity=enable``; accepted and a no-op on 11, required on 10).

TensorRT's verdict on sparsity is read two ways, both by pure functions: the builder's INFO
log lines ``(Sparsity) Layers eligible for sparse math: ...`` and ``(Sparsity) TRT inference
plan picked sparse implementation for layers: ...``, and the engine inspector's JSON
(``HasSparseWeights``, sparse tactic names), in both layouts: TensorRT 10's ``"Bindings"``
(a list of names) and per-tensor ``"Format/Datatype"`` strings, TensorRT 11's
``"I/O Tensors"`` (objects with ``IOMode`` / ``DataType`` / ``Dimensions``) and separate
``"Format"`` / ``"DataType"`` fields (``parse_engine_info``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secateurs.errors import InputError, SecateursError

__all__ = [
    "LayerEligibility",
    "EligibilityReport",
    "check_sparse_eligibility",
    "SparsityLog",
    "parse_sparsity_log",
    "EngineLayer",
    "parse_engine_layers",
    "EngineTensor",
    "EngineInfo",
    "parse_engine_info",
    "TrtApi",
    "detect_api",
    "installed_api",
    "onnx_precision",
    "BuildSettings",
    "plan_build",
    "trtexec_command",
    "BuildReport",
    "build_engine",
    "TrtRunner",
    "check_against_ort",
    "tensorrt_available",
    "PRECISIONS",
]

_log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")

MIN_REDUCTION = 64
MIN_OUTPUT = 64
REDUCTION_ALIGN = 16  # apex ASP: in_features / C % 16
OUTPUT_ALIGN = 8  # apex ASP: out_features / K % 8

_NOT_INSTALLED = (
    "TensorRT is not installed: pip install tensorrt on a machine with an NVIDIA GPU "
    "(TensorRT 10+, CUDA 12) and run again; the eligibility report and the trtexec command "
    "above do not need it"
)
_NO_GPU = (
    "no CUDA GPU is visible: TensorRT builds and runs engines only on an NVIDIA GPU "
    "(check nvidia-smi and CUDA_VISIBLE_DEVICES)"
)


# --------------------------------------------------------------------------------------------
# N:M check. Private until secateurs.passes.sparsify.is_nm_sparse lands; then use that instead.
# --------------------------------------------------------------------------------------------


def _nm_ok(weight: np.ndarray, n: int, m: int, axis: int) -> bool:
    """True when every run of ``m`` consecutive values along ``axis`` has at most ``n`` non-zeros
    (``passes.sparsify.is_nm_sparse`` on the initializer's array; an axis length that is not a
    multiple of ``m`` is not N:M)."""
    import torch

    from secateurs.passes.sparsify import is_nm_sparse

    array = np.ascontiguousarray(weight)
    if not array.flags.writeable:  # a view of an initializer's bytes
        array = array.copy()
    return is_nm_sparse(torch.from_numpy(array), n, m, axis)


# --------------------------------------------------------------------------------------------
# Eligibility (no TensorRT, no GPU)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerEligibility:
    """Whether one Conv / Gemm / MatMul can use 2:4 sparse tensor cores, and why not."""

    node: str
    op_type: str
    weight: str | None  # initializer name, None when the weight is not constant
    weight_shape: tuple[int, ...]
    reduction_axis: int | None  # axis of the *initializer* along which 2:4 must hold
    reduction_size: int
    output_size: int
    is_2_4: bool
    density: float  # fraction of non-zero weights
    reasons: tuple[str, ...]  # empty when eligible

    @property
    def eligible(self) -> bool:
        return not self.reasons


@dataclass(frozen=True)
class EligibilityReport:
    """Every Conv / Gemm / MatMul of a model, in graph order."""

    layers: tuple[LayerEligibility, ...]
    min_reduction: int = MIN_REDUCTION
    min_output: int = MIN_OUTPUT

    @property
    def eligible(self) -> tuple[LayerEligibility, ...]:
        return tuple(layer for layer in self.layers if layer.eligible)

    @property
    def eligible_names(self) -> tuple[str, ...]:
        return tuple(layer.node for layer in self.eligible)

    def layer(self, node: str) -> LayerEligibility:
        for layer in self.layers:
            if layer.node == node:
                return layer
        raise KeyError(node)

    def to_dict(self) -> dict[str, Any]:
        return {"min_reduction": self.min_reduction, "min_output": self.min_output,
                "eligible": len(self.eligible), "total": len(self.layers),
                "layers": [{**asdict(x), "eligible": x.eligible} for x in self.layers]}

    def to_text(self) -> str:
        lines = [f"2:4 sparse eligibility: {len(self.eligible)}/{len(self.layers)} "
                 f"Conv/Gemm/MatMul layers eligible (TensorRT SPARSE_WEIGHTS)"]
        for x in self.layers:
            verdict = "eligible" if x.eligible else "no: " + "; ".join(x.reasons)
            shape = "x".join(map(str, x.weight_shape)) or "-"
            lines.append(f"  {x.node:<40} {x.op_type:<7} {shape:<16} "
                         f"2:4={'yes' if x.is_2_4 else 'no ':<3}  {verdict}")
        return "\n".join(lines)


def _load_model(onnx_model: Any) -> Any:
    import onnx

    if isinstance(onnx_model, (str, os.PathLike)):
        path = Path(onnx_model)
        if not path.is_file():
            raise InputError(f"ONNX model file not found: '{path}'")
        try:
            return onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
            raise InputError(f"'{path}' is not a readable ONNX model: {exc}") from exc
    if isinstance(onnx_model, bytes):
        return onnx.load_from_string(onnx_model)
    return onnx_model


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class _Const:
    """A constant weight as seen by the consumer: initializer + how it was permuted."""

    name: str
    array: np.ndarray  # the initializer as stored
    perm: tuple[int, ...]  # consumer axis i is initializer axis perm[i]


def _constant_source(value: str, inits: Mapping[str, Any], producers: Mapping[str, Any]
                     ) -> _Const | None:
    """Follow ``value`` back through Identity / Transpose / DequantizeLinear to an initializer."""
    from onnx import numpy_helper

    perm: tuple[int, ...] | None = None
    for _ in range(8):  # a short chain; anything longer is not a plain weight
        if value in inits:
            arr = numpy_helper.to_array(inits[value])
            final = perm if perm is not None else tuple(range(arr.ndim))
            return _Const(value, arr, final)
        node = producers.get(value)
        if node is None:
            return None
        if node.op_type == "Constant":
            t = _attr(node, "value", None)
            if t is None:
                return None
            arr = numpy_helper.to_array(t)
            final = perm if perm is not None else tuple(range(arr.ndim))
            return _Const(value, arr, final)
        if node.op_type in ("Identity", "DequantizeLinear"):
            value = node.input[0]
            continue
        if node.op_type == "Transpose":
            rank_perm = _attr(node, "perm", None)
            if rank_perm is None:
                return None
            inner = tuple(int(p) for p in rank_perm)
            # consumer axis i = transpose output axis (perm[i] after earlier transposes)
            perm = tuple(inner[i] for i in (perm if perm is not None else range(len(inner))))
            value = node.input[0]
            continue
        return None
    return None


def _check_layer(node: Any, name: str, const: _Const | None, reduction: int, output: int,
                 min_reduction: int, min_output: int, extra: Sequence[str] = ()
                 ) -> LayerEligibility:
    """``reduction``/``output`` are axes in the *consumer's* view of the weight."""
    if const is None:
        return LayerEligibility(name, node.op_type, None, (), None, 0, 0, False, 1.0,
                                ("weight is not a constant initializer (dynamic weights "
                                 "cannot use sparse kernels)",))
    arr = const.array
    ndim = arr.ndim
    red_axis = const.perm[reduction % ndim]
    out_axis = const.perm[output % ndim]
    red, out = int(arr.shape[red_axis]), int(arr.shape[out_axis])
    is24 = _nm_ok(arr, 2, 4, red_axis)
    density = float(np.count_nonzero(arr) / arr.size) if arr.size else 1.0
    reasons = list(extra)
    if not is24:
        why = (f"reduction dim {red} is not a multiple of 4" if red % 4
               else f"not 2:4 along axis {red_axis} (size {red}; density {density:.2f})")
        reasons.append(why)
    if red < min_reduction or out < min_output:
        reasons.append(f"too small to benefit: reduction {red} (min {min_reduction}), "
                       f"output {out} (min {min_output})")
    if red % REDUCTION_ALIGN or out % OUTPUT_ALIGN:
        reasons.append(f"misaligned for sparse tensor cores: reduction {red} % "
                       f"{REDUCTION_ALIGN}, output {out} % {OUTPUT_ALIGN} must be 0")
    return LayerEligibility(name, node.op_type, const.name, tuple(int(s) for s in arr.shape),
                            red_axis, red, out, is24, density, tuple(reasons))


def check_sparse_eligibility(
    onnx_model: Any,
    min_reduction: int = MIN_REDUCTION,
    min_output: int = MIN_OUTPUT,
) -> EligibilityReport:
    """Which Conv / Gemm / MatMul weights TensorRT can run on 2:4 sparse tensor cores.

    ``onnx_model``: path, bytes or ``onnx.ModelProto``. Pure: needs neither TensorRT nor a
    GPU. Rules and thresholds: see the module docstring. Nodes without a name are reported as
    ``<op_type>_<index>``.
    """
    model = _load_model(onnx_model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    layers: list[LayerEligibility] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"{node.op_type}_{index}"
        if node.op_type == "Conv":
            const = _constant_source(node.input[1], inits, producers)
            group = int(_attr(node, "group", 1))
            extra = []
            if group != 1:
                extra.append(f"grouped conv (group={group}): no sparse implementation")
            layers.append(_check_layer(node, name, const, 1, 0, min_reduction, min_output,
                                       extra))
        elif node.op_type == "Gemm":
            const = _constant_source(node.input[1], inits, producers)
            trans_b = int(_attr(node, "transB", 0))
            red, out = (1, 0) if trans_b else (0, 1)
            layers.append(_check_layer(node, name, const, red, out, min_reduction, min_output))
        else:
            const = _constant_source(node.input[1], inits, producers)
            if const is not None and const.array.ndim < 2:
                const = None  # a vector B is a dot product, not a weight matrix
            layers.append(_check_layer(node, name, const, -2, -1, min_reduction, min_output))
    return EligibilityReport(tuple(layers), min_reduction, min_output)


# --------------------------------------------------------------------------------------------
# Parsing TensorRT's own report (pure functions, tested on captured text)
# --------------------------------------------------------------------------------------------

_ELIGIBLE_RE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:[ \t]*(.*)$", re.M)
_PICKED_RE = re.compile(
    r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:[ \t]*(.*)$", re.M)


@dataclass(frozen=True)
class SparsityLog:
    """TensorRT's ``(Sparsity)`` builder log lines: layers eligible and layers picked."""

    eligible: tuple[str, ...]
    picked: tuple[str, ...]
    found: bool  # whether the log had the lines at all (SPARSE_WEIGHTS set, INFO level)


def _split_layers(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.strip().split(", ") if s.strip())


def parse_sparsity_log(text: str) -> SparsityLog:
    """Extract the eligible / picked layer lists from TensorRT or trtexec log text.

    Fused layers keep TensorRT's names (``Conv_3 + Relu_4``). If the log holds several builds,
    the last one wins.
    """
    eligible = _ELIGIBLE_RE.findall(text)
    picked = _PICKED_RE.findall(text)
    return SparsityLog(
        eligible=_split_layers(eligible[-1]) if eligible else (),
        picked=_split_layers(picked[-1]) if picked else (),
        found=bool(eligible or picked),
    )


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine as the engine inspector describes it."""

    name: str
    layer_type: str
    tactic: str
    sparse: bool | None  # None when the inspector was not DETAILED
    onnx_layers: tuple[str, ...]  # the ONNX nodes fused into this layer (from Metadata)
    input_types: tuple[str, ...] = ()  # normalised: fp32 / fp16 / bf16 / int8 / fp8 / ...
    output_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineTensor:
    """One engine input or output. ``mode``/``dtype``/``shape`` are empty in TensorRT 10's
    ``"Bindings"`` layout, which lists names only."""

    name: str
    mode: str = ""  # "input" / "output"
    dtype: str = ""
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class EngineInfo:
    """``IEngineInspector`` JSON, either layout."""

    layers: tuple[EngineLayer, ...]
    io_tensors: tuple[EngineTensor, ...]
    layout: str  # "bindings" (TensorRT <= 10), "io_tensors" (11+), "none"

    @property
    def sparse_layers(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.sparse)


_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
# TensorRT's DataType names (11's "DataType", enum names) and the words 10's "Format/Datatype"
# strings use ("Channel major FP16 format where channel % 8 == 0", "Row major Int8 format").
_DTYPES = {"float": "fp32", "fp32": "fp32", "half": "fp16", "fp16": "fp16", "bf16": "bf16",
           "int8": "int8", "fp8": "fp8", "int4": "int4", "fp4": "fp4", "int32": "int32",
           "int64": "int64", "bool": "bool", "uint8": "uint8"}
_DTYPE_WORD_RE = re.compile(r"\b(FP32|FP16|BF16|Int8|INT8|FP8|Int4|INT4|FP4|Int32|INT32|Int64|"
                            r"INT64|Bool|BOOL|UInt8|UINT8)\b")


def _normalise_dtype(value: Any) -> str:
    text = str(value).strip()
    if text.lower() in _DTYPES:
        return _DTYPES[text.lower()]
    match = _DTYPE_WORD_RE.search(text)
    return _DTYPES.get(match.group(1).lower(), "") if match else ""


def _tensor_dtype(item: Any) -> str:
    """A layer input/output's type: 11's ``"DataType"``, else 10's ``"Format/Datatype"``."""
    if not isinstance(item, Mapping):
        return ""
    for key in ("DataType", "Format/Datatype", "Format/DataType", "Format"):
        if key in item:
            dtype = _normalise_dtype(item[key])
            if dtype:
                return dtype
    return ""


def _load_inspector(inspector_json: str | Mapping[str, Any]) -> Any:
    if isinstance(inspector_json, Mapping):
        return inspector_json
    try:
        return json.loads(inspector_json)
    except json.JSONDecodeError as exc:
        raise InputError(f"engine inspector output is not JSON: {exc}") from exc


def _parse_layer(item: Any) -> EngineLayer:
    if isinstance(item, str):  # ProfilingVerbosity.LAYER_NAMES_ONLY
        return EngineLayer(item, "", "", None, ())
    tactic = str(item.get("TacticName", ""))
    has = item.get("HasSparseWeights")
    sparse = bool(has) or "sparse" in tactic.lower() if (has is not None or tactic) else None
    meta = str(item.get("Metadata", ""))
    return EngineLayer(
        name=str(item.get("Name", "")), layer_type=str(item.get("LayerType", "")),
        tactic=tactic, sparse=sparse, onnx_layers=tuple(_ONNX_LAYER_RE.findall(meta)),
        input_types=tuple(_tensor_dtype(x) for x in item.get("Inputs", ()) or ()),
        output_types=tuple(_tensor_dtype(x) for x in item.get("Outputs", ()) or ()))


def _parse_io(doc: Any) -> tuple[tuple[EngineTensor, ...], str]:
    if not isinstance(doc, Mapping):
        return (), "none"
    if "I/O Tensors" in doc:
        tensors = []
        for t in doc["I/O Tensors"] or ():
            if isinstance(t, str):
                tensors.append(EngineTensor(t))
                continue
            tensors.append(EngineTensor(
                name=str(t.get("Name", "")), mode=str(t.get("IOMode", "")).lower(),
                dtype=_normalise_dtype(t.get("DataType", "")),
                shape=tuple(int(d) for d in t.get("Dimensions", ()) or ())))
        return tuple(tensors), "io_tensors"
    if "Bindings" in doc:
        return tuple(EngineTensor(str(n)) for n in doc["Bindings"] or ()), "bindings"
    return (), "none"


def parse_engine_info(inspector_json: str | Mapping[str, Any]) -> EngineInfo:
    """Parse ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` (or
    trtexec ``--exportLayerInfo``) output of TensorRT 10 (``"Bindings"``) or 11
    (``"I/O Tensors"``); a bare list of layers is accepted too."""
    doc = _load_inspector(inspector_json)
    raw = doc.get("Layers", []) if isinstance(doc, Mapping) else doc
    if not isinstance(raw, list):
        raise InputError("engine inspector JSON has no 'Layers' list")
    io_tensors, layout = _parse_io(doc)
    return EngineInfo(tuple(_parse_layer(item) for item in raw), io_tensors, layout)


def parse_engine_layers(inspector_json: str | Mapping[str, Any]) -> tuple[EngineLayer, ...]:
    """The layers of ``parse_engine_info``.

    A layer counts as sparse when it reports ``"HasSparseWeights": 1`` or its tactic name
    contains ``sparse``. With ``ProfilingVerbosity.LAYER_NAMES_ONLY`` the layers are bare
    strings and ``sparse`` is ``None``.
    """
    return parse_engine_info(inspector_json).layers


# --------------------------------------------------------------------------------------------
# TensorRT API generations and the build settings (pure: tested with fake API namespaces)
# --------------------------------------------------------------------------------------------

# Weak-typing precision -> the BuilderFlags (TensorRT <= 10) and trtexec flags that enable it.
_WEAK_BUILDER_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}
_WEAK_TRTEXEC_FLAGS = {"fp32": (), "fp16": ("--fp16",), "bf16": ("--bf16",),
                       "int8": ("--int8", "--fp16")}
_PRECISION_FLAG_NAMES = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")
_CONVERT_HINT = ("give the ONNX the types first (secateurs optimize --quantize fp16|int8: fp16 "
                 "tensors or Q/DQ nodes)")


@dataclass(frozen=True)
class TrtApi:
    """What the installed TensorRT Python API offers, detected by attribute presence."""

    version: str
    strongly_typed_flag: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (10; ignored in 11)
    weak_flags: frozenset[str]  # precision BuilderFlags present: FP16/BF16/INT8/... (gone in 11)
    implicit_batch: bool  # Builder.max_batch_size exists (8.x): ONNX needs EXPLICIT_BATCH
    sparse_weights: bool = True  # BuilderFlag.SPARSE_WEIGHTS

    @property
    def weak_typing(self) -> bool:
        """The weakly typed precision flags still exist (TensorRT <= 10)."""
        return "FP16" in self.weak_flags

    @property
    def always_strongly_typed(self) -> bool:
        """No weak typing left: every network is strongly typed (TensorRT 11+)."""
        return not self.weak_typing

    @property
    def generation(self) -> str:
        if self.always_strongly_typed:
            return "strongly typed only (TensorRT 11+ API)"
        if self.strongly_typed_flag:
            return "strong and weak typing (TensorRT 10 API)"
        return "weak typing only (TensorRT 8 API)"


def detect_api(trt: Any) -> TrtApi:
    """Read a ``tensorrt`` module's API generation from the attributes it has."""
    builder_flag = getattr(trt, "BuilderFlag", None)
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return TrtApi(
        version=str(getattr(trt, "__version__", "?")),
        strongly_typed_flag=hasattr(creation, "STRONGLY_TYPED"),
        weak_flags=frozenset(f for f in _PRECISION_FLAG_NAMES if hasattr(builder_flag, f)),
        implicit_batch=(hasattr(getattr(trt, "Builder", None), "max_batch_size")
                        and hasattr(creation, "EXPLICIT_BATCH")),
        sparse_weights=hasattr(builder_flag, "SPARSE_WEIGHTS"))


def installed_api() -> TrtApi | None:
    """The installed TensorRT's API (no GPU needed), or None when there is no real TensorRT."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - the pip stub and missing libraries raise anything
        return None
    return detect_api(trt) if hasattr(trt, "Builder") else None


def onnx_precision(onnx_model: Any) -> str:
    """The precision an ONNX carries in its own types: ``int8`` (Q/DQ nodes), ``fp16`` /
    ``bf16`` (half-precision initializers or graph inputs), else ``fp32``. A strongly typed
    TensorRT network builds exactly this."""
    import onnx

    model = _load_model(onnx_model)
    graph = model.graph
    qdq = ("QuantizeLinear", "DequantizeLinear")
    if any(n.op_type in qdq for n in graph.node):
        return "int8"
    types = {t.data_type for t in graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in graph.input}
    if onnx.TensorProto.FLOAT16 in types:
        return "fp16"
    if onnx.TensorProto.BFLOAT16 in types:
        return "bf16"
    return "fp32"


@dataclass(frozen=True)
class BuildSettings:
    """How to build: the flags by name (for the Python API and trtexec) and why."""

    strongly_typed: bool
    precision: str  # what the engine will run: the ONNX's types when strongly typed
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names
    builder_flags: tuple[str, ...]  # BuilderFlag names
    trtexec_flags: tuple[str, ...]
    notes: tuple[str, ...] = ()


def plan_build(
    api: TrtApi | None,
    precision: str | None,
    onnx_type: str = "fp32",
    sparse: bool = True,
    strongly_typed: bool | None = None,
) -> BuildSettings:
    """Build settings for this TensorRT API (``None``: not installed, the trtexec line only).

    ``precision=None`` means the ONNX's own (``onnx_type``). ``strongly_typed=None`` chooses:
    strongly typed whenever the API has it and the ONNX carries the precision; otherwise the
    weakly typed flags where they exist (TensorRT 10, deprecated), an error where they do not
    (TensorRT 11). Without a TensorRT at hand the line is strongly typed (valid on 10 and 11).
    """
    if precision is not None:
        _check_precision(precision)
    _check_precision(onnx_type)
    want = precision or onnx_type
    version = api.version if api is not None else ""
    notes: list[str] = []
    if api is not None and sparse and not api.sparse_weights:
        raise InputError(f"this TensorRT ({version}) has no BuilderFlag.SPARSE_WEIGHTS; "
                         "build without sparsity (--no-sparse)")
    can_strong = api is None or api.strongly_typed_flag or api.always_strongly_typed
    if strongly_typed is None:
        if api is not None and not can_strong:
            strongly_typed = False
        else:  # weak flags only to reach a precision the ONNX does not carry, where they exist
            strongly_typed = not (api is not None and api.weak_typing and want != onnx_type)
    if strongly_typed and not can_strong:
        raise InputError(f"this TensorRT ({version}) has no NetworkDefinitionCreationFlag."
                         "STRONGLY_TYPED: strongly typed networks need TensorRT 10+")
    if strongly_typed:
        if want != onnx_type:
            if api is not None and api.always_strongly_typed:
                raise InputError(
                    f"TensorRT {version} builds only strongly typed networks (the weak-typing "
                    f"flags BuilderFlag.FP16/INT8/BF16 were removed in TensorRT 11) and this "
                    f"ONNX is {onnx_type}: for a {want} engine, {_CONVERT_HINT}")
            hint = "; on TensorRT 10 only, --weakly-typed also works (deprecated since 10.12)"
            notes.append(f"strongly typed: the engine runs the ONNX's own types ({onnx_type}), "
                         f"not {want}; for {want}, {_CONVERT_HINT}"
                         + (hint if api is None and want != "fp32" else ""))
        network = ("STRONGLY_TYPED",) if api is None or api.strongly_typed_flag else ()
        builder = ("SPARSE_WEIGHTS",) if sparse else ()
        return BuildSettings(True, onnx_type, network + _explicit_batch(api), builder,
                             ("--stronglyTyped",), tuple(notes))
    if api is not None and api.always_strongly_typed:
        raise InputError(f"TensorRT {version} builds only strongly typed networks (weak "
                         "typing was removed in TensorRT 11): drop --weakly-typed; for a "
                         f"{want} engine, {_CONVERT_HINT}")
    missing = [f for f in _WEAK_BUILDER_FLAGS[want] if api is not None and f not in api.weak_flags]
    if missing:
        raise InputError(f"this TensorRT ({version}) has no BuilderFlag.{missing[0]}: use "
                         f"another precision, or {_CONVERT_HINT} and build strongly typed")
    if api is None or api.strongly_typed_flag:
        notes.append("weakly typed precision flags are deprecated since TensorRT 10.12 and "
                     f"removed in 11; for a strongly typed {want} build, {_CONVERT_HINT}")
    if want == "int8" and onnx_type != "int8":
        notes.append("int8 without Q/DQ nodes or a calibrator: layers fall back to fp16")
    builder = (("SPARSE_WEIGHTS",) if sparse else ()) + _WEAK_BUILDER_FLAGS[want]
    return BuildSettings(False, want, _explicit_batch(api), builder,
                         _WEAK_TRTEXEC_FLAGS[want], tuple(notes))


def _explicit_batch(api: TrtApi | None) -> tuple[str, ...]:
    return ("EXPLICIT_BATCH",) if api is not None and api.implicit_batch else ()


# --------------------------------------------------------------------------------------------
# trtexec
# --------------------------------------------------------------------------------------------


def _shape_arg(shapes: Mapping[str, Sequence[int]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in dims)}"
                    for name, dims in shapes.items())


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _onnx_type_of(onnx_path: str | os.PathLike[str]) -> str:
    path = Path(onnx_path)
    return onnx_precision(path) if path.is_file() else "fp32"


def trtexec_command(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    precision: str | None = None,
    sparse: bool = True,
    workspace_gb: float | None = 4.0,
    strongly_typed: bool | None = None,
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
    layer_info_path: str | os.PathLike[str] | None = None,
    verbose: bool = True,
    skip_inference: bool = True,
    *,
    api: TrtApi | None = None,
    onnx_type: str | None = None,
    settings: BuildSettings | None = None,
) -> list[str]:
    """The ``trtexec`` command (argv list) equivalent to ``build_engine`` with these settings.

    The precision flags come from ``plan_build`` (``settings``, or computed from ``api`` —
    ``None`` when no TensorRT is at hand — and the ONNX's own precision, read from the file
    when ``onnx_type`` is not given): ``--stronglyTyped`` (required on TensorRT 10, a no-op on
    11), or the weakly typed ``--fp16`` / ``--bf16`` / ``--int8`` only where they exist.
    Other flags as documented for trtexec 10 and 11: ``--sparsity=enable|disable``,
    ``--memPoolSize=workspace:<N>M``, ``--profilingVerbosity=detailed``,
    ``--minShapes/--optShapes/--maxShapes`` (``name:1x3x224x224``), ``--exportLayerInfo``.
    """
    if settings is None:
        onnx_type = onnx_type or _onnx_type_of(onnx_path)
        settings = plan_build(api, precision, onnx_type, sparse, strongly_typed)
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           *settings.trtexec_flags, f"--sparsity={'enable' if sparse else 'disable'}"]
    if workspace_gb is not None:
        cmd.append(f"--memPoolSize=workspace:{int(round(workspace_gb * 1024))}M")
    if shapes:
        cmd += [f"--minShapes={_shape_arg({k: v[0] for k, v in shapes.items()})}",
                f"--optShapes={_shape_arg({k: v[1] for k, v in shapes.items()})}",
                f"--maxShapes={_shape_arg({k: v[2] for k, v in shapes.items()})}"]
    cmd.append("--profilingVerbosity=detailed")
    if layer_info_path is not None:
        cmd += [f"--exportLayerInfo={layer_info_path}", "--dumpLayerInfo"]
    if skip_inference:
        cmd.append("--skipInference")
    if verbose:
        cmd.append("--verbose")
    return cmd


# --------------------------------------------------------------------------------------------
# Building (needs TensorRT and a GPU)
# --------------------------------------------------------------------------------------------


def tensorrt_available() -> bool:
    """``import tensorrt`` would work and a CUDA GPU is visible."""
    return importlib.util.find_spec("tensorrt") is not None and _cuda_device_count() > 0


def _cuda_device_count() -> int:
    """CUDA devices visible, via torch when it has CUDA, else the driver API directly."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def _import_tensorrt() -> Any:
    """``import tensorrt``, or a ``SecateursError`` saying how to get it."""
    if importlib.util.find_spec("tensorrt") is None:
        raise SecateursError(_NOT_INSTALLED)
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - the stub package and missing libs raise anything
        raise SecateursError(f"{_NOT_INSTALLED} (import tensorrt failed: {exc})") from exc
    if not hasattr(trt, "Builder"):
        raise SecateursError(f"{_NOT_INSTALLED} (the installed 'tensorrt' has no Builder: "
                             "it is the pip stub, not the real wheel)")
    if _cuda_device_count() == 0:
        raise SecateursError(_NO_GPU)
    return trt


def _make_logger(trt: Any, lines: list[str], echo: bool) -> Any:
    """A ``trt.ILogger`` that keeps every message (the sparsity report is INFO level)."""
    names = {
        trt.ILogger.Severity.INTERNAL_ERROR: "F", trt.ILogger.Severity.ERROR: "E",
        trt.ILogger.Severity.WARNING: "W", trt.ILogger.Severity.INFO: "I",
        trt.ILogger.Severity.VERBOSE: "V",
    }

    class _CaptureLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            line = f"[{names.get(severity, '?')}] [TRT] {msg}"
            lines.append(line)
            if echo and severity != trt.ILogger.Severity.VERBOSE:
                _log.info("%s", line)

    return _CaptureLogger()


def _default_shapes(model: Any, max_batch: int
                    ) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """Optimisation-profile shapes when only dim 0 (the batch) is symbolic."""
    inits = {t.name for t in model.graph.initializer}
    shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        fixed = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
        if -1 not in fixed:
            continue
        if -1 in fixed[1:]:
            raise InputError(
                f"input '{inp.name}' has symbolic dims other than the batch ({fixed}); pass "
                "shapes={name: (min, opt, max)} for it")
        rest = fixed[1:]
        shapes[inp.name] = ([1, *rest], [max_batch, *rest], [max_batch, *rest])
    return shapes


@dataclass(frozen=True)
class BuildReport:
    """What TensorRT built and which layers run sparse."""

    eligible_layers: tuple[str, ...]  # TensorRT's "(Sparsity) Layers eligible" list
    sparse_layers: tuple[str, ...]  # picked sparse (log) or sparse per the engine inspector
    log: str
    engine_path: str
    trtexec_cmd: list[str]
    precision: str = "fp16"
    strongly_typed: bool = False
    build_seconds: float = 0.0
    engine_layers: tuple[EngineLayer, ...] = ()
    eligibility: EligibilityReport | None = None
    tensorrt_version: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    io_tensors: tuple[EngineTensor, ...] = ()
    inspector_layout: str = ""  # "bindings" (TensorRT 10) / "io_tensors" (11)
    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    precision: str | None = None,
    sparse: bool = True,
    workspace_gb: float = 4.0,
    strongly_typed: bool | None = None,
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
    max_batch: int = 16,
    echo_log: bool = False,
) -> BuildReport:
    """Build a TensorRT engine from an ONNX file and write it atomically to ``engine_path``.

    ``precision``: ``None`` = the ONNX's own types (fp16 tensors, Q/DQ int8); fp32 / fp16 /
    bf16 / int8 otherwise. ``strongly_typed``: ``None`` = strongly typed wherever the ONNX
    carries the precision (the only mode on TensorRT 11); the weakly typed builder flags only
    where the installed TensorRT still has them (see ``plan_build``). ``shapes``: optimisation
    profile per dynamic input; by default a symbolic batch gets ``(1, max_batch, max_batch)``.
    Raises ``SecateursError`` when TensorRT or a GPU is missing, ``InputError`` when the
    settings cannot be built by this TensorRT.
    """
    if precision is not None:
        _check_precision(precision)
    onnx_path = Path(onnx_path)
    model = _load_model(onnx_path)  # InputError for a missing / unreadable file
    trt = _import_tensorrt()
    api = detect_api(trt)
    settings = plan_build(api, precision, onnx_precision(model), sparse, strongly_typed)
    eligibility = check_sparse_eligibility(model)
    profile_shapes = dict(shapes) if shapes else _default_shapes(model, max_batch)
    cmd = trtexec_command(onnx_path, engine_path, sparse=sparse, workspace_gb=workspace_gb,
                          shapes=profile_shapes or None, settings=settings)

    lines: list[str] = []
    logger = _make_logger(trt, lines, echo_log)
    builder = trt.Builder(logger)
    flags = 0
    for name in settings.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SecateursError(f"TensorRT's ONNX parser rejected '{onnx_path}': "
                             + "; ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes.items():
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        errors = [line for line in lines if line.startswith(("[E]", "[F]"))]
        raise SecateursError(f"TensorRT failed to build an engine from '{onnx_path}': "
                             + ("; ".join(errors[-5:]) or "no error logged"))
    from secateurs.runtime.io import atomic_path

    with atomic_path(engine_path) as tmp, open(tmp, "wb") as fh:
        fh.write(serialized)

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    inspector = engine.create_engine_inspector()
    info = parse_engine_info(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    log_text = "\n".join(lines)
    sparsity = parse_sparsity_log(log_text)
    sparse_layers = tuple(dict.fromkeys([*sparsity.picked, *info.sparse_layers]))
    notes = list(settings.notes)
    if sparse and not sparsity.found:
        notes.append("TensorRT logged no (Sparsity) lines; sparse layers come from the "
                     "engine inspector only")
    return BuildReport(
        eligible_layers=sparsity.eligible, sparse_layers=sparse_layers, log=log_text,
        engine_path=str(engine_path), trtexec_cmd=cmd, precision=settings.precision,
        strongly_typed=settings.strongly_typed, build_seconds=seconds,
        engine_layers=info.layers, eligibility=eligibility, tensorrt_version=api.version,
        notes=tuple(notes), io_tensors=info.io_tensors, inspector_layout=info.layout,
        network_flags=settings.network_flags, builder_flags=settings.builder_flags)


# --------------------------------------------------------------------------------------------
# Running (needs TensorRT, a GPU and torch with CUDA)
# --------------------------------------------------------------------------------------------


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
        trt.DataType.INT8: torch.int8, trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    if dtype not in table:
        raise SecateursError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TrtRunner:
    """Run a serialized engine on torch CUDA tensors (``set_tensor_address`` +
    ``execute_async_v3`` on torch's current stream)."""

    def __init__(self, engine: str | os.PathLike[str] | bytes, device: int = 0):
        self._trt = trt = _import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise SecateursError("TrtRunner needs torch with CUDA to hold input/output tensors; "
                                 "install a CUDA build of torch")
        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        self.device = torch.device("cuda", device)
        self._lines: list[str] = []
        self._logger = _make_logger(trt, self._lines, echo=False)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise SecateursError("TensorRT could not deserialize the engine (built by another "
                                 "TensorRT version or GPU?): " + "; ".join(self._lines[-3:]))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names
                            if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]

    def __call__(self, inputs: Any) -> dict[str, Any]:
        """Run on a dict (by name) or tuple (by position) of tensors; returns name -> tensor."""
        import torch

        trt = self._trt
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            seq = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
            feeds = dict(zip(self.input_names, seq))
        missing = [n for n in self.input_names if n not in feeds]
        if missing or len(feeds) != len(self.input_names):
            raise InputError(f"engine inputs are {self.input_names}; got {list(feeds)}")
        keep = []
        for name in self.input_names:
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            t = torch.as_tensor(feeds[name]).to(self.device, dtype).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"input '{name}' shape {list(t.shape)} is outside the engine's "
                                 f"optimisation profile")
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise SecateursError(f"output '{name}' has a data-dependent shape {shape}; "
                                     "TrtRunner does not support output allocators")
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            out = torch.empty(shape, dtype=dtype, device=self.device)
            outputs[name] = out
            self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SecateursError("TensorRT execute_async_v3 failed: "
                                 + "; ".join(self._lines[-3:]))
        stream.synchronize()
        return outputs


def check_against_ort(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    inputs: Any = None,
    batch: int = 1,
    rtol: float = 1e-2,
    atol: float = 1e-2,
) -> dict[str, float]:
    """Run the engine and the ONNX model (ONNX Runtime, CPU) on the same inputs and compare.

    Returns the max abs difference per output; raises ``SecateursError`` naming the outputs
    that are not ``allclose(rtol, atol)`` (defaults suit fp16 engines).
    """
    import torch

    from secateurs.runtime.ort import OrtSession

    runner = TrtRunner(engine_path)
    ort_session = OrtSession(onnx_path, providers=["CPUExecutionProvider"])
    feeds = ort_session.feeds(inputs) if inputs is not None else ort_session.random_inputs(batch)
    ref = dict(zip(ort_session.output_names, ort_session.run(feeds)))
    got = runner({k: torch.as_tensor(np.asarray(v) if not hasattr(v, "detach") else v)
                  for k, v in feeds.items()})
    diffs: dict[str, float] = {}
    bad = []
    for name, want in ref.items():
        if name not in got:
            bad.append(f"output '{name}' missing from the engine")
            continue
        have = got[name].float().cpu().numpy()
        diffs[name] = float(np.max(np.abs(have - want))) if want.size else 0.0
        if have.shape != want.shape or not np.allclose(have, want, rtol=rtol, atol=atol):
            bad.append(f"output '{name}': max abs diff {diffs[name]:.3g}")
    if bad:
        raise SecateursError(f"TensorRT engine differs from ONNX Runtime (rtol={rtol}, "
                             f"atol={atol}): " + "; ".join(bad))
    return diffs
