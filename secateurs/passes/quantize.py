"""Quantize an ONNX model through the ecosystem's libraries: INT8 QDQ (ONNX Runtime) and fp16.

INT8 (``onnxruntime.quantization``)
    Static quantization in QDQ format: ``QuantizeLinear``/``DequantizeLinear`` pairs around
    Conv / Gemm / MatMul / Add / pooling, with per-channel symmetric INT8 weights
    (``s_k = max|W_k| / 127``, zero point 0, so zeros of a 2:4 or pruned weight stay zeros) and
    activation ranges from MinMax calibration over the batches a :class:`BatchReader` yields.
    Before calibration ``quant_pre_process`` runs ONNX shape inference and ONNX Runtime's
    *basic* graph optimisations (BatchNorm folded into Conv, constants folded); basic level
    emits only standard ``ai.onnx`` ops (no ``com.microsoft`` fused kernels), so the prepared
    graph is still plain ONNX. Quantize *after* pruning: the plan names initializers of the
    float graph, and folding renames them (``ConvBnFusion_W_...``).

    Two activation profiles, because one QDQ graph cannot be fast on both runtimes (measured,
    ``tools/bench/results/optimize_pipeline.json``):

    * ``"ort"`` (default): activations ``uint8`` with a zero point, weights ``int8``. ONNX
      Runtime's x86 CPU provider fuses every ``DQ -> Conv -> Q`` into ``QLinearConv`` (its
      U8S8 VNNI/AMX kernels); on ResNet-50 all 53 convs fuse.
    * ``"tensorrt"``: activations and weights ``int8``, symmetric (zero point 0), which is
      the only INT8 TensorRT's strongly typed builder accepts. ONNX Runtime CPU runs this
      graph too, but fuses only the convs whose input quantizer has a single consumer (33 of
      53 on ResNet-50; the rest run as DQ -> fp32 Conv -> Q) and it is not faster than fp32.

fp16 (``onnxruntime.transformers.float16``, the converter onnxconverter-common maintains,
vendored by ONNX Runtime)
    Every float32 initializer and tensor becomes float16; ``keep_io_types=True`` keeps the
    graph's inputs and outputs float32 (a Cast at each end) so callers feed the same arrays.
    Values beyond fp16's range are clamped to +-65504 by the converter.

Both return a new ``ModelProto`` (the input is never modified) that passes
``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from secateurs.errors import InputError, SecateursError

__all__ = ["quantize_onnx", "QuantizeResult", "BatchReader", "load_calibration",
           "calibration_batches", "vnni_missing", "check_disabled_optimizers", "MODES",
           "PROFILES", "activation_noise", "ActivationNoise"]

log = logging.getLogger(__name__)

MODES = ("int8", "fp16")
PROFILES = ("ort", "tensorrt")
_QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model and what was done to it."""

    model: onnx.ModelProto = field(repr=False)
    mode: str
    profile: str | None
    per_channel: bool
    calibration_batches: int
    calibration_source: str
    quantized_nodes: tuple[str, ...]
    op_counts: Mapping[str, int]
    reduce_range: bool = False
    op_types: tuple[str, ...] | None = None  # None: every type the quantizer handles
    excluded: tuple[str, ...] = ()  # nodes the caller kept float

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "profile": self.profile, "per_channel": self.per_channel,
                "reduce_range": self.reduce_range,
                "op_types": None if self.op_types is None else list(self.op_types),
                "excluded": list(self.excluded),
                "calibration_batches": self.calibration_batches,
                "calibration_source": self.calibration_source,
                "quantized_nodes": len(self.quantized_nodes), "op_counts": dict(self.op_counts)}


class BatchReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a list of feed dicts.

    ORT's calibrator calls ``get_next()`` until it returns ``None``; ``rewind()`` starts over,
    so one reader can serve several calibrations.
    """

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        if not batches:
            raise InputError("calibration needs at least one batch of inputs")
        self.batches = [dict(b) for b in batches]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _input_infos(model: onnx.ModelProto) -> list[tuple[str, np.dtype, list[int | None]]]:
    inits = {t.name for t in model.graph.initializer}
    out = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out.append((inp.name, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), dims))
    return out


def load_calibration(path: str | os.PathLike[str], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Calibration inputs from an ``.npz``: one array per graph input, samples along dim 0.

    Keys are the model's input names; ``arr_0, arr_1, ...`` (``np.savez(f, x)``) are taken
    in input order.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration file '{path}' does not exist; pass an .npz with one "
                         "array per model input (np.savez('calib.npz', x=inputs))")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises zipfile/OSError/ValueError alike
        raise InputError(f"calibration file '{path}' is not a readable .npz: {exc}") from exc
    names = [name for name, _, _ in _input_infos(model)]
    if set(names) <= set(arrays):
        return {n: arrays[n] for n in names}
    positional = [f"arr_{i}" for i in range(len(names))]
    if set(positional) <= set(arrays):
        return dict(zip(names, (arrays[k] for k in positional)))
    raise InputError(f"calibration file '{path}' has arrays {sorted(arrays)}; the model's "
                     f"inputs are {names} (name the arrays after them)")


def calibration_batches(model: onnx.ModelProto, samples: Mapping[str, np.ndarray],
                        batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Split ``samples`` (arrays with samples along dim 0) into feeds the model accepts.

    A static batch dim fixes the batch size; a symbolic one takes ``batch_size``. Arrays are
    cast to the input's dtype.
    """
    infos = _input_infos(model)
    missing = [n for n, _, _ in infos if n not in samples]
    if missing:
        raise InputError(f"calibration data has no arrays for model inputs {missing}")
    counts = {n: int(np.asarray(samples[n]).shape[0]) if np.ndim(samples[n]) else 0
              for n, _, _ in infos}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise InputError(f"calibration arrays must share a non-zero first (sample) dim, got "
                         f"{counts}")
    total = next(iter(counts.values()))
    fixed = {dims[0] for _, _, dims in infos if dims and dims[0]}
    step = fixed.pop() if len(fixed) == 1 else batch_size
    if total < step:
        raise InputError(f"calibration data has {total} samples; the model's static batch "
                         f"is {step}")
    batches = []
    for start in range(0, total - step + 1, step):
        batches.append({n: np.ascontiguousarray(np.asarray(samples[n])[start:start + step])
                        .astype(dtype, copy=False) for n, dtype, _ in infos})
    return batches


def _random_batches(model: onnx.ModelProto, n: int, seed: int = 0,
                    input_shapes: Mapping[str, Sequence[int]] | None = None
                    ) -> list[dict[str, np.ndarray]]:
    """``n`` random feeds at each input's static shape (``input_shapes`` where given; a
    symbolic batch dim is 1). A symbolic dim past the batch is an error: 1 there calibrated
    a text model on one token and crashed an audio model's convolutions."""
    unknown = sorted(set(input_shapes or ()) - {name for name, _, _ in _input_infos(model)})
    if unknown:
        raise InputError(f"input_shapes names {unknown}, which the model does not take as "
                         f"inputs; its inputs: {[name for name, _, _ in _input_infos(model)]}")
    infos = []
    for name, dtype, dims in _input_infos(model):
        if input_shapes and name in input_shapes:
            dims = [int(d) for d in input_shapes[name]]
        elif any(d is None for d in dims[1:]):
            raise InputError(f"int8 calibration without data: input '{name}' has symbolic "
                             f"dims {dims}; pass calibration=... (real inputs, best) or "
                             f"input_shapes={{'{name}': [...]}} for random ones")
        infos.append((name, dtype, [d or 1 for d in dims]))
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        feed = {}
        for name, dtype, shape in infos:
            if np.issubdtype(dtype, np.floating):
                feed[name] = rng.standard_normal(shape).astype(dtype)
            else:
                feed[name] = random_integers(model, name, shape, dtype, rng)
        batches.append(feed)
    return batches


def random_integers(model: onnx.ModelProto, name: str, shape: Sequence[int], dtype: Any,
                    rng: np.random.Generator, low: int = 0) -> np.ndarray:
    """Random values for integer input ``name``: token ids in ``[low, rows)`` below the
    smallest table a ``Gather`` reads with them (an embedding's rows), else ``low`` or
    ``low + 1`` (a mask, an index). Zeros, as these once were, make an embedding model's
    output a constant: calibrated on them, an INT8 text classifier came out answering the same
    for every input, and the check, on zeros too, saw no difference. ``low`` moves off id 0
    (a padding id some exports turn into NaN)."""
    inits = {t.name: t for t in model.graph.initializer}
    rows = [int(inits[n.input[0]].dims[int(next((a.i for a in n.attribute if a.name == "axis"),
                                                0))])
            for n in model.graph.node if n.op_type == "Gather" and len(n.input) > 1
            and n.input[1] == name and n.input[0] in inits]
    if not rows:
        return rng.integers(low, low + 2, size=list(shape)).astype(dtype)
    high = max(min(rows), 1)
    return rng.integers(low if low < high else 0, high, size=list(shape)).astype(dtype)


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def _quantized_nodes(model: onnx.ModelProto) -> tuple[str, ...]:
    """Compute nodes that read a dequantized initializer (a quantized weight)."""
    inits = {t.name for t in model.graph.initializer}
    dq_of_init = {n.output[0] for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return tuple(n.name for n in model.graph.node
                 if n.op_type not in _QUANTIZED_OPS and any(i in dq_of_init for i in n.input))


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise SecateursError(f"{what} fails onnx.checker (full_check): {exc}") from exc


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its float ``Constant`` nodes of more than one element (weights some
    exporters write as nodes) as initializers, on a copy: the same graph, and the quantizers
    see them as weights (``onnxruntime.quantization`` quantizes initializers only: a weight
    held in a node would be calibrated as an activation, per tensor)."""
    def weight(node: onnx.NodeProto) -> bool:
        return (node.op_type == "Constant" and node.domain in ("", "ai.onnx")
                and len(node.attribute) == 1 and node.attribute[0].name == "value"
                and node.attribute[0].t.data_type in _FLOATS
                and int(np.prod(node.attribute[0].t.dims)) > 1)

    if not any(weight(n) for n in model.graph.node):
        return model
    out = _copy(model)
    keep = []
    for node in out.graph.node:
        if weight(node):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            out.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.ir_version = max(out.ir_version, 4)  # initializers need not be graph inputs
    return out


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
           onnx.TensorProto.DOUBLE)


def _check_float(model: onnx.ModelProto) -> None:
    if not any(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer):
        raise InputError("the model has no float32 weights to quantize (already quantized or "
                         "converted?); quantize a float32 model")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence onnxruntime.quantization's root-logger warnings (one per norm weight it does
    not quantize per channel) and ORT's C++ warnings from the preparation session."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)  # ONNX Runtime's default (warning)


def _int8(model: onnx.ModelProto, reader: BatchReader, profile: str, per_channel: bool,
          exclude: Iterable[str], reduce_range: bool = False,
          float_nodes: Sequence[str] = ()) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    symmetric = profile == "tensorrt"
    with tempfile.TemporaryDirectory(prefix="secateurs-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        out = Path(tmp) / "quantized.onnx"
        with warnings.catch_warnings(), _quiet_libraries():
            warnings.simplefilter("ignore")
            # symbolic shape inference is for transformer graphs with dynamic dims; ONNX's own
            # inference covers static graphs and the prepared graph is checked below. The
            # model goes by path: given a ModelProto, quant_pre_process moves its initializers'
            # data out for the session (``extract_raw_data_from_model``), and a graph whose
            # shape inputs are initializers (onnxsim's or ORT's optimizer's output: Unsqueeze
            # axes, Reshape targets) then fails "Cannot parse data from external tensors"
            source = Path(tmp) / "float.onnx"
            source.write_bytes(model.SerializeToString())  # a scratch file in our temp dir
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            prepared_model = onnx.load(str(prepared))
            # ops of the input's own domains (ORT contrib ops an optimizer wrote) may stay
            had = {n.domain for n in model.graph.node}
            foreign = sorted({n.domain for n in prepared_model.graph.node}
                             - {"", "ai.onnx"} - had)
            if foreign:
                raise SecateursError(f"quantization's preparation emitted ops of domain(s) "
                                     f"{foreign}; expected plain ONNX")
            prepared_model, kept_float = _around_quantizer_bugs(prepared_model, per_channel,
                                                                symmetric)
            excluded = _prepared_names(exclude, prepared_model)
            excluded += [n for n in _prepared_names(float_nodes, prepared_model, quiet=True)
                         if n not in excluded]
            quantize_static(
                prepared_model, str(out), reader, quant_format=QuantFormat.QDQ,
                per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded + kept_float or None,
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
        if kept_float:  # after _quiet_libraries, which raises the root logger's level
            log.warning("int8: %d node(s) kept in float, which ONNX Runtime's quantizer would "
                        "get wrong (masked attention, multi-axis LayerNorm, "
                        "grouped ConvTranspose with a bias, Gemm alpha/beta on a shared "
                        "tensor; see passes/quantize.py): %s",
                        len(kept_float), ", ".join(kept_float[:5]))
        return onnx.load(str(out))


def _prepared_names(exclude: Iterable[str], prepared: onnx.ModelProto,
                    quiet: bool = False) -> list[str]:
    """The prepared graph's names for the nodes ``exclude`` names in the float graph. The
    preparation's fusions rename what they fuse (``MatMul -> Add`` becomes the Gemm
    ``<matmul>/MatMulAddFusion``, ORT >= 1.2x): matched by name, else by that prefix. Excluding
    a fused node's old name once excluded nothing, silently."""
    names = [n.name for n in prepared.graph.node]
    present = set(names)
    out = []
    for name in exclude:
        if name in present:
            out.append(name)
            continue
        fused = [n for n in names if n.startswith(name + "/")]
        if not fused and not quiet:
            log.warning("int8: excluded node '%s' was folded away by the preparation (a "
                        "BatchNorm into its Conv, a constant); nothing of it is left to "
                        "keep float", name)
        out.extend(fused)
    return out


@dataclass(frozen=True)
class ActivationNoise:
    """One quantized activation of an int8 QDQ model and the noise its int8 range adds:
    ``sqnr_db``, signal-to-quantization-noise ratio of the tensor before vs after its
    ``QuantizeLinear -> DequantizeLinear`` pair (higher is better; 8 bits over a range its
    values fill give about 40 dB, a range a few outliers stretch gives a few dB).
    ``nodes``: the float model's nodes to exclude to keep the tensor float (its producer
    and the nodes that read it quantized)."""

    tensor: str
    sqnr_db: float
    nodes: tuple[str, ...]
    producer: str | None = None  # the float model's node that computes the tensor


def activation_noise(qdq_model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                     float_model: onnx.ModelProto | None = None,
                     top: int = 3) -> list[ActivationNoise]:
    """The ``top`` noisiest quantized activations of ``qdq_model`` on ``feeds``, worst first,
    measured with ONNX Runtime's QDQ debugging tools (``qdq_loss_debug``: every tensor and its
    dequantized copy become outputs; graph optimisations off, so the pairs stay). Node names
    are mapped back to ``float_model``'s (the preparation renames what it fuses) where given.
    This is where an int8 model's error usually comes from: a per-tensor range that a few
    outlier channels set (transformer FFN and attention outputs), which rounds the rest to a
    handful of levels."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory(prefix="secateurs-qdq-") as tmp, _quiet_libraries():
        src, augmented = Path(tmp) / "qdq.onnx", Path(tmp) / "augmented.onnx"
        onnx.save(qdq_model, src)
        modify_model_output_intermediate_tensors(src, augmented)
        acts = collect_activations(str(augmented), BatchReader([feeds]))
    # (compute_activation_error needs the float model's activations too, ORT 1.32)
    pairs = create_activation_matching(acts)
    noisy = sorted((float(compute_signal_to_quantization_noice_ratio(p["pre_qdq"],
                                                                     p["post_qdq"])), name)
                   for name, p in pairs.items() if p.get("pre_qdq") and p.get("post_qdq"))
    noisy = [(sqnr, name) for sqnr, name in noisy if np.isfinite(sqnr)]
    producers = {o: n.name for n in qdq_model.graph.node for o in n.output}
    readers: dict[str, list[str]] = collections.defaultdict(list)
    for node in qdq_model.graph.node:
        for name in node.input:
            readers[name].append(node.name)
    float_names = None if float_model is None else {n.name for n in float_model.graph.node}
    out = []
    for sqnr, tensor in noisy[:top]:
        # a quantized graph output: 'out' is the DequantizeLinear's, the op wrote
        # 'out_QuantizeLinear_Input'
        made = producers.get(tensor + "_QuantizeLinear_Input") or producers.get(tensor)
        producer = _float_name(made, float_names) if made else None
        names = [_float_name(n, float_names)
                 for n in readers.get(tensor + "_DequantizeLinear_Output", [])]
        nodes = tuple(dict.fromkeys(n for n in [producer, *names] if n))
        out.append(ActivationNoise(tensor, sqnr, nodes, producer))
    return out


def _float_name(name: str, float_names: set[str] | None) -> str | None:
    """``name`` of a prepared-graph node as the float graph names it: itself, or the longest
    ``/``-prefix that is a float node (``<matmul>/MatMulAddFusion``); None if neither."""
    if float_names is None or name in float_names:
        return name
    parts = name.split("/")
    for end in range(len(parts) - 1, 0, -1):
        if "/".join(parts[:end]) in float_names:
            return "/".join(parts[:end])
    return None


def vnni_missing() -> bool:
    """Whether this is an x86-64 CPU without VNNI (AVX-512 VNNI, AVX-VNNI or AMX-INT8), where
    ONNX Runtime's U8S8 kernels multiply with ``vpmaddubsw``, whose 16-bit pair sums saturate
    (255 * 127 * 2 > 32767). Read from ``/proc/cpuinfo``; ``False`` where that is absent."""
    from secateurs.runtime.cpu import cpu_info

    cpu = cpu_info()
    if cpu.machine.lower() not in ("x86_64", "amd64") or not cpu.flags:
        return False
    return not cpu.flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def check_disabled_optimizers(result: QuantizeResult) -> tuple[str, ...]:
    """ONNX Runtime graph transformers to turn off when checking ``result``'s outputs on this
    machine: its QDQ fusion (``QDQSelectorActionTransformer``: the int8 CPU kernels) where
    those kernels are not the target — the ``"tensorrt"`` profile, or full 8-bit weights on a
    CPU without VNNI, whose kernels saturate where the target's do not. The graph then runs as
    its Q/DQ semantics say (float ops on dequantized values), what TensorRT computes."""
    if result.mode != "int8":
        return ()
    if result.profile == "tensorrt" or (vnni_missing() and not result.reduce_range):
        return ("QDQSelectorActionTransformer",)
    return ()


def _around_quantizer_bugs(model: onnx.ModelProto, per_channel: bool, symmetric: bool = False
                           ) -> tuple[onnx.ModelProto, list[str]]:
    """The prepared graph, rewritten (exactly) where ``onnxruntime.quantization`` 1.2x-1.3x
    fails or writes a wrong model, and the nodes it must leave in float. Found by sweeps of
    converter idioms (sessions 11-12; every case has a test in ``tests/passes/test_quantize.py``):

    * **Gemm alpha/beta** other than 1 (onnxmltools, Keras converters): the quantizer's output
      was silently wrong (an MLP with alpha 0.5, beta 2: 38% relative error; 0.4% folded). The
      factors are folded into the constant ``B`` / ``C`` they scale; a factor on a tensor that
      is not the node's own constant keeps the node float.
    * **Gemm bias C not of shape [N]**: ``[1, N]`` (scikit-learn MLPs, ``MatMul -> Add`` the
      preparation fused) and ``[]``/``[1]``/``[M, N]``/``[M, 1]`` crash the int32-bias check
      ("truth value of an array is ambiguous", IndexError). ``[1, N]`` is written ``[N]``, a
      scalar is broadcast to ``[N]``; any other ``C`` moves to an ``Add`` after the Gemm.
    * **Masked attention** (BERT's ``+ (1 - m) * -1e4``, a causal ``-1e9`` matrix,
      ``Where(mask, s, finfo.min / -inf)`` before ``Softmax``): one per-tensor scale spans
      the mask value and the scores, so every score rounds to one level and attention becomes
      uniform (54-84% error; NaN with -inf). The mask node and its Softmax stay float.
    * **Clip with a lower bound above 0** (or an upper bound below 0) under uint8
      activations: the quantizer drops it as a "removable activation", but the calibrated
      range always includes 0, so values in ``[0, min)`` survive (41% error at min 1). It is
      written ``Min(Max(x, min), max)`` (1.3%; excluding the Clip kept the conv before it
      float too).
    * **LayerNormalization over several axes** (scale ``[T, D]``) and a **grouped
      ConvTranspose with a bias**, per channel: the bias quantization fails to broadcast.
      They stay float.
    * **A ConvTranspose weight tied with a Conv** (a tied autoencoder: ``conv_transpose2d(x,
      enc.weight)``): one per-channel scale vector follows the Conv's axis 0 and the
      ConvTranspose's bias quantization fails to broadcast (session 14, zoo
      ``tied_autoencoder``). The ConvTranspose gets its own copy of the weight.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = collections.Counter(i for n in graph.node for i in n.input)
    outputs = {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output}

    def own_constant(name: str) -> bool:
        return name in inits and readers[name] == 1 and name not in outputs

    def constant(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute \
                and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
        found = next((a for a in node.attribute if a.name == name), None)
        return default if found is None else onnx.helper.get_attribute_value(found)

    kept_float: list[str] = []
    after: dict[int, onnx.NodeProto] = {}  # id(node) -> a node to insert after it
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> the nodes instead
    for node in graph.node:
        if node.op_type == "Gemm":
            if not _fold_gemm_factors(node, inits, own_constant):
                kept_float.append(node.name)
                continue
            if len(node.input) > 2 and node.input[2] in inits:
                added = _gemm_bias_as_vector(node, inits, own_constant, attr)
                if added is not None:
                    after[id(node)] = added
        elif node.op_type == "ConvTranspose" and per_channel and len(node.input) > 2 \
                and node.input[2] and attr(node, "group", 1) > 1:
            kept_float.append(node.name)
        elif node.op_type == "ConvTranspose" and per_channel and len(node.input) > 1 \
                and node.input[1] in inits and readers[node.input[1]] > 1:
            # a weight tied with a Conv (autoencoders): its own copy, scaled on its own axis
            tied = numpy_helper.to_array(inits[node.input[1]])
            name = f"{node.input[1]}__secateurs_{node.name or node.output[0]}"
            graph.initializer.append(numpy_helper.from_array(tied, name))
            readers[node.input[1]] -= 1
            node.input[1] = name
        elif node.op_type == "LayerNormalization" and per_channel and len(node.input) > 1 \
                and node.input[1] in inits and len(inits[node.input[1]].dims) > 1:
            kept_float.append(node.name)
        elif node.op_type == "Clip" and not symmetric:
            low = constant(node.input[1]) if len(node.input) > 1 and node.input[1] else \
                np.float32(attr(node, "min", -np.inf))
            high = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else \
                np.float32(attr(node, "max", np.inf))
            if low is not None and high is not None and (
                    float(np.max(low)) > 0 or float(np.min(high)) < 0):
                replaced[id(node)] = _clip_as_max_min(node, low, high, graph)
        elif node.op_type == "Softmax" and node.input[0] in producers:
            masker = producers[node.input[0]]
            if masker.op_type in ("Add", "Sub", "Where") and _large_constant_above(
                    masker, producers, constant):
                kept_float += [masker.name, node.name]
    if after or replaced:
        nodes = []
        for node in graph.node:
            nodes += replaced.get(id(node), [node])
            if id(node) in after:
                nodes.append(after[id(node)])
        del graph.node[:]
        graph.node.extend(nodes)
    return model, list(dict.fromkeys(kept_float))


def _clip_as_max_min(node: onnx.NodeProto, low: np.ndarray, high: np.ndarray,
                     graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``Clip(x, low, high)`` as ``Min(Max(x, low), high)`` (the bounds as initializers): the
    quantizer removes a Clip as a "removable activation" (the output quantizer's saturation
    is meant to clip), which is wrong for a bound the calibrated range (which includes 0)
    does not end at; Max/Min are kept, and the op before them stays int8."""
    from onnx import numpy_helper

    nodes, x = [], node.input[0]
    for op, bound, unbounded in (("Max", low, -np.inf), ("Min", high, np.inf)):
        if np.all(bound == unbounded):
            continue
        name = f"{node.name or node.output[0]}__secateurs_{op.lower()}"
        graph.initializer.append(numpy_helper.from_array(
            np.asarray(bound, dtype=np.float32), f"{name}_bound"))
        nodes.append(onnx.helper.make_node(op, [x, f"{name}_bound"], [f"{name}_out"],
                                           name=name))
        x = f"{name}_out"
    nodes[-1].output[0] = node.output[0]
    return nodes


def _fold_gemm_factors(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
                       own_constant: Any) -> bool:
    """Fold ``alpha`` into ``B`` and ``beta`` into ``C``; False where a factor scales a tensor
    that is not the node's own constant (the node then stays float)."""
    from onnx import numpy_helper

    attrs = {a.name: a for a in node.attribute}
    for key, index in (("alpha", 1), ("beta", 2)):
        if key not in attrs or attrs[key].f == 1.0 or len(node.input) <= index \
                or not node.input[index]:
            continue
        if not own_constant(node.input[index]):
            return False
        tensor = inits[node.input[index]]
        scaled = numpy_helper.to_array(tensor) * np.float32(attrs[key].f)
        tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), tensor.name))
        attrs[key].f = 1.0
    return True


def _gemm_bias_as_vector(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
                         own_constant: Any, attr: Any) -> onnx.NodeProto | None:
    """Make a constant Gemm bias ``[N]``; returns an ``Add`` to insert after the node where
    ``C`` is per row (``[M, N]``, ``[M, 1]``) and so moves out of the Gemm."""
    from onnx import numpy_helper

    bias = inits[node.input[2]]
    dims = list(bias.dims)
    weight = inits.get(node.input[1])
    n = None if weight is None or len(weight.dims) != 2 else \
        int(weight.dims[0] if attr(node, "transB", 0) else weight.dims[1])
    if n is not None and dims == [n]:
        return None
    if own_constant(bias.name) and len(dims) == 2 and dims[0] == 1 and (n is None or
                                                                        dims[1] == n):
        bias.dims[:] = [dims[1]]  # the same values, row-major: only the dims
        return None
    if own_constant(bias.name) and n is not None and int(np.prod(dims)) == 1:
        value = numpy_helper.to_array(bias).reshape(())
        bias.CopyFrom(numpy_helper.from_array(np.full([n], value, dtype=value.dtype),
                                              bias.name))
        return None
    if attr(node, "beta", 1.0) != 1.0:
        return None  # beta on a shared C: _fold_gemm_factors kept the node float
    out = node.output[0]
    node.output[0] = f"{out}__secateurs_without_bias"
    del node.input[2]
    return onnx.helper.make_node("Add", [node.output[0], bias.name], [out],
                                 name=f"{node.name}__secateurs_bias")


def _large_constant_above(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                          constant: Any, depth: int = 3, threshold: float = 1e3) -> bool:
    """A constant of magnitude >= ``threshold`` (or not finite) among ``node``'s inputs and
    their producers up to ``depth`` levels: an attention mask's ``-1e4``, ``-1e9``,
    ``finfo.min`` or ``-inf``."""
    frontier, seen = list(node.input), set()
    for _ in range(depth):
        nxt = []
        for name in frontier:
            if not name or name in seen:
                continue
            seen.add(name)
            value = constant(name)
            if value is not None:
                if value.dtype.kind == "f" and value.size and (
                        not np.isfinite(value).all() or float(np.abs(value).max()) >= threshold):
                    return True
                continue
            if name in producers:
                nxt += list(producers[name].input)
        frontier = nxt
    return False


def _opset_for_qdq(model: onnx.ModelProto, per_channel: bool) -> onnx.ModelProto:
    """``model`` at a default-domain opset its QDQ form is valid in: Q/DQ exist from opset 10
    and take a per-channel ``axis`` from 13. ORT's quantizer writes them at the input's
    opset, so an opset-11 model came out with ``DequantizeLinear(axis=...)`` that fails the
    checker; older models are converted to 13 first (``onnx.version_converter``)."""
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")),
                 0)
    need = 13 if per_channel else 10
    if opset >= need and model.ir_version >= 4:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, max(opset, 13))
        # IR < 4 lists every initializer as a graph input too; the quantizer's new scales and
        # zero points are not, which the checker refuses ("in initializer but not in graph
        # input"): opset 13 is IR 7 anyway
        converted.ir_version = max(converted.ir_version, 7)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter's own message says which op
        from secateurs.graph.fx_trace import _first_line

        why = "per-channel weights: DequantizeLinear's axis" if per_channel else \
            "QuantizeLinear"
        raise InputError(
            f"INT8 QDQ needs ONNX opset >= {need} ({why}); the model is at opset {opset} and "
            f"onnx's version converter cannot convert it ({_first_line(exc)}): re-export it "
            f"at opset 13 or newer") from None
    return converted


def unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with no two nodes of one name (ONNX allows it, ONNX Runtime refuses to load
    it: "two nodes with same node name", inside the quantizer's calibration): a repeated
    name gets a suffix, on a copy."""
    names = [n.name for n in model.graph.node]
    if len(set(filter(None, names))) == len([n for n in names if n]):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    seen: set[str] = set(names)
    first: set[str] = set()
    for node in out.graph.node:
        if not node.name or node.name not in first:
            first.add(node.name)
            continue
        k = 1
        while f"{node.name}_{k}" in seen:
            k += 1
        node.name = f"{node.name}_{k}"
        seen.add(node.name)
    return out


def _fp16(model: onnx.ModelProto, exclude: Iterable[str]) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model contains values beyond fp16 range"
        out = convert_float_to_float16(_copy(model), keep_io_types=True,
                                       node_block_list=list(exclude) or None)
    _topological_sort(out.graph)  # the converter appends the input Casts at the end
    # the converter keeps its shape-inference value_info (typed fp16); runtimes infer it again
    # and on small models it is a third of the file
    del out.graph.value_info[:]
    return out


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows its producers (stable: ties keep order)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise SecateursError(f"the fp16 graph has a cycle or a dangling input at node "
                                 f"'{rest[0].name}'")
        pending = rest
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def quantize_onnx(model: onnx.ModelProto, mode: str = "int8", *,
                  calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
                  profile: str = "ort", per_channel: bool = True,
                  exclude: Iterable[str] = (), random_batches: int = 8,
                  seed: int = 0, input_shapes: Mapping[str, Sequence[int]] | None = None,
                  reduce_range: bool | None = None,
                  op_types: Iterable[str] | None = None) -> QuantizeResult:
    """INT8 QDQ (``mode="int8"``) or fp16 (``"fp16"``) version of a float32 ONNX ``model``.

    ``calibration``: feed dicts (see :func:`calibration_batches`); ``None`` calibrates on
    ``random_batches`` standard-normal batches, with a warning: activation ranges from random
    data rarely match real data, so pass real samples for accuracy; an input with symbolic
    dims past the batch then needs its shape in ``input_shapes``. ``profile``: ``"ort"``
    (uint8 activations, fast on ONNX Runtime CPU) or ``"tensorrt"`` (symmetric int8, what
    TensorRT builds); see the module docstring. ``exclude``: node names left in float.
    ``reduce_range``: 7-bit weights (``[-64, 64]``), which ONNX Runtime's U8S8 kernels need on
    x86 CPUs without VNNI (their 16-bit pair sums saturate: on a zoo ViT 17% output error
    where the QDQ graph itself makes 4%); ``None`` (default) turns it on for the ``"ort"``
    profile on such a CPU (:func:`vnni_missing`), with a warning, and off elsewhere.
    ``op_types``: int8 only, the op types of ``model`` to quantize (default: all ONNX
    Runtime's quantizer can; the others are kept float like ``exclude``, by the float graph's
    types, so a ``MatMul`` the preparation fuses with its bias ``Add`` is still one), e.g. ``("MatMul",)`` for a transformer
    whose residual stream (``Add``, ``LayerNormalization``) carries outlier channels that one
    int8 range per tensor cannot hold; :func:`activation_noise` finds such tensors.
    """
    if mode not in MODES:
        raise InputError(f"quantize mode must be one of {MODES}, got {mode!r}")
    if profile not in PROFILES:
        raise InputError(f"int8 profile must be one of {PROFILES}, got {profile!r}")
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"quantize_onnx takes an onnx.ModelProto, got {type(model).__name__}")
    model = constants_as_initializers(model)
    _check_float(model)
    names = {n.name for n in model.graph.node}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise InputError(f"exclude names {unknown[:5]} are not nodes of the model")
    op_types = None if op_types is None else list(dict.fromkeys(op_types))
    if op_types is not None:
        present = {n.op_type for n in model.graph.node}
        if mode != "int8" or not op_types:
            raise InputError("op_types picks the op types int8 quantizes: give one or more "
                             "with mode='int8' (fp16 converts every op; exclude keeps nodes)")
        missing = [t for t in op_types if t not in present]
        if missing:
            raise InputError(f"op_types {missing} are not op types of the model; it has "
                             f"{sorted(present)}")
    if mode == "fp16":
        out = _fp16(model, exclude)
        _check(out, "the fp16 model")
        return QuantizeResult(out, "fp16", None, False, 0, "none", (), _op_counts(out),
                              excluded=tuple(exclude))
    if calibration is None:
        log.warning("int8 calibration on %d random batches: pass real inputs "
                    "(calibration=..., --calibration inputs.npz) for accurate ranges",
                    random_batches)
        batches = _random_batches(model, random_batches, seed, input_shapes)
        source = "random"
    else:
        batches, source = list(calibration), "data"
    if reduce_range is None:
        reduce_range = profile == "ort" and vnni_missing()
        if reduce_range:
            log.warning("int8: this CPU has no VNNI, where ONNX Runtime's uint8 x int8 "
                        "kernels saturate; weights are quantized to 7 bits (reduce_range). "
                        "For a VNNI/AMX target, pass reduce_range=False")
    reader = BatchReader(batches)
    named = unique_node_names(_opset_for_qdq(model, per_channel))
    by_type = [] if op_types is None else [n.name for n in named.graph.node
                                           if n.op_type not in op_types]
    out = _int8(named, reader, profile, per_channel, exclude, bool(reduce_range), by_type)
    _check(out, "the int8 QDQ model")
    return QuantizeResult(out, "int8", profile, per_channel, len(reader), source,
                          _quantized_nodes(out), _op_counts(out), bool(reduce_range),
                          None if op_types is None else tuple(op_types), tuple(exclude))
