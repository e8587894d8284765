"""One pipeline from a model to a deployable ONNX: prune -> sparsify -> quantize -> measure.

    load | export -> prune -> sparsify -> quantize -> check -> measure -> save

Every stage is optional except the first; each is a named function of the pipeline state
(:data:`STAGE_ORDER`), run by ``StageTimer``, so a failure names the stage and the ones done
before it. Stages are built from the existing passes and nothing else:

* ``load`` (an ONNX path or ``ModelProto``) / ``export`` (a torch module: ``export_onnx``,
  TorchScript exporter, parameter names kept, checked against torch in ONNX Runtime);
* ``prune``: torch input — ``secateurs.prune`` (ratio or ``target_macs``, every criterion,
  mask-equivalence checked) then ``export_onnx`` of the pruned module; ONNX input —
  ``prune_onnx`` (``target_macs`` by bisection on the ratio, ``verify=True``);
* ``sparsify``: ``sparsify_onnx`` (magnitude N:M on Conv/Gemm/MatMul weights along their
  reduction axis); for 2:4 the report lists the layers TensorRT could run sparse
  (``runtime.tensorrt.check_sparse_eligibility``);
* ``quantize``: ``passes.quantize.quantize_onnx`` (INT8 QDQ through ``onnxruntime.quantization``
  or fp16 through ONNX Runtime's float16 converter);
* ``check``: every stage's model passes ``onnx.checker.check_model(full_check=True)`` and runs
  in ONNX Runtime; outputs are compared with the input model and with the previous stage;
* ``measure``: ORT CPU latency of every stage's model, interleaved in one loop
  (``runtime.ort.compare``), median per model;
* ``save``: output model, report JSON and plot committed together through ``runtime.io``
  temp files; nothing is written before every stage has passed, and a failure leaves no file.

Output checks (:func:`check_output_paths`) run before any work: outputs must differ from the
input and from each other, must not be directories, and need the right extension.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secateurs.errors import InputError, SecateursError
from secateurs.passes.prune import StageTimer

__all__ = ["optimize", "OptimizeResult", "StageRecord", "STAGE_ORDER", "check_output_paths",
           "TOLERANCES"]

log = logging.getLogger(__name__)

STAGE_ORDER = ("load", "export", "prune", "sparsify", "quantize", "check", "measure", "save")

TOLERANCES = {"int8": 0.2, "fp16": 0.02}
"""Largest relative L2 error ``||y - y'|| / ||y||`` of a quantize stage's outputs against its
float input (on the check inputs) that ``check`` accepts: int8 20%, fp16 2%. A broken graph or
a calibration far off the data gives errors near 100%; a few percent is the usual cost of
INT8 on random-weight models (ViT-S/16, 12 blocks: 7.7%; ResNet-50: ~1%), and whether that
costs accuracy is measured on data (the digits demo), not by this check. Exact stages (export,
prune's mask-equivalence, sparsify) are checked by their own passes."""

_OUTPUT_SUFFIXES = {"output": ".onnx", "report": ".json", "plot": ".png"}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRecord:
    """One row of the report: a stage's model and what it bought."""

    stage: str
    bytes: int
    macs: int | None
    latency_ms: float | None
    max_abs_diff: float  # vs the input model, on the check inputs
    stage_diff: float  # vs the previous stage's model: relative L2 error of the outputs
    seconds: float
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "bytes": self.bytes, "macs": self.macs,
                "latency_ms": self.latency_ms, "max_abs_diff": self.max_abs_diff,
                "stage_diff": self.stage_diff, "seconds": self.seconds,
                "details": dict(self.details)}


@dataclass
class OptimizeResult:
    """The final model, every stage's model and the report rows (first row: the input)."""

    model: Any  # onnx.ModelProto
    stages: tuple[StageRecord, ...]
    models: dict[str, Any] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str) -> StageRecord:
        for record in self.stages:
            if record.stage == name:
                return record
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        base = self.stages[0]
        rows = []
        for r in self.stages:
            row = r.to_dict()
            row["size_ratio"] = base.bytes / r.bytes if r.bytes else None
            row["speedup"] = (base.latency_ms / r.latency_ms
                              if base.latency_ms and r.latency_ms else None)
            rows.append(row)
        return {"options": self.options, "stages": rows, "seconds": dict(self.seconds)}

    def _int8_not_faster(self) -> str | None:
        """The table's line where the int8 model is not faster than its float input (a small
        model's Q/DQ pairs cost more than its int8 kernels save; a CPU without VNNI)."""
        names = [r.stage for r in self.stages]
        if "quantize" not in names:
            return None
        q = self.stages[names.index("quantize")]
        before = self.stages[names.index("quantize") - 1]
        if (q.details.get("mode") != "int8" or q.details.get("profile") != "ort"
                or not q.latency_ms or not before.latency_ms
                or q.latency_ms < before.latency_ms * (1 - INT8_FASTER_MARGIN)):
            return None
        from secateurs.passes.quantize import vnni_missing

        why = ("this CPU has no VNNI/AMX int8 instructions" if vnni_missing() else
               "the Q/DQ work around each quantized op costs what its int8 kernel saves on "
               "a model this small")
        return (f"int8: not faster than its float input here ({q.latency_ms:.3f} ms vs "
                f"{before.latency_ms:.3f} ms): {why}; what it buys here is the size (where "
                f"latency matters, ship the float model)")

    def table(self) -> str:
        base = self.stages[0]
        lines = [f"{'stage':<10}{'size':>11}{'x smaller':>10}{'MACs':>15}{'latency':>12}"
                 f"{'x faster':>9}{'max |diff|':>12}"]
        for r in self.stages:
            size = f"{r.bytes / 1e6:.2f} MB"
            smaller = f"{base.bytes / r.bytes:.2f}" if r.bytes else "-"
            macs = f"{r.macs:,}" if r.macs is not None else "-"
            lat = f"{r.latency_ms:.3f} ms" if r.latency_ms is not None else "-"
            faster = (f"{base.latency_ms / r.latency_ms:.2f}"
                      if base.latency_ms and r.latency_ms else "-")
            lines.append(f"{r.stage:<10}{size:>11}{smaller:>10}{macs:>15}{lat:>12}{faster:>9}"
                         f"{r.max_abs_diff:>12.3g}")
        skip = self.stages[-1].details.get("skip_layer_norm")
        if skip and skip["disable"]:
            lines.append(
                f"ORT: the final model runs {skip['fused_ms']:.3f} ms with ORT's "
                f"SkipLayerNormFusion and {skip['unfused_ms']:.3f} ms without it here; create "
                "sessions with it disabled (onnxruntime.InferenceSession(..., "
                "disabled_optimizers=['SkipLayerNormFusion']); secateurs bench "
                "--disable-optimizer SkipLayerNormFusion measures it)")
        slow = self._int8_not_faster()
        if slow:
            lines.append(slow)
        quantized = next((r.details for r in self.stages if r.stage == "quantize"), {})
        if quantized.get("excluded") or quantized.get("op_types"):
            rounds = quantized.get("keep_float_rounds")
            lines.append(
                f"{quantized['mode']}: {len(quantized.get('excluded') or ())} node(s) kept float"
                + (f" (keep_float auto, {len(rounds) - 1} round(s))" if rounds else "")
                + (f", only {', '.join(quantized['op_types'])} quantized"
                   if quantized.get("op_types") else ""))
        sparse = next((r.details.get("tensorrt_sparse") for r in self.stages
                       if r.details.get("tensorrt_sparse")), None)
        if sparse:
            lines.append(f"2:4: TensorRT could run {sparse['eligible']}/{sparse['total']} "
                         f"Conv/Gemm/MatMul layers sparse: "
                         + (", ".join(sparse["layers"][:8])
                            + (" ..." if len(sparse["layers"]) > 8 else "")))
        return "\n".join(lines)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the final model atomically."""
        from secateurs.runtime.io import atomic_save_onnx

        return atomic_save_onnx(self.model, path)


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------


def check_output_paths(outputs: Mapping[str, str | os.PathLike[str] | None],
                       inputs: Sequence[str | os.PathLike[str]] = ()) -> dict[str, Path]:
    """Check output paths before any work, with the same checks as every command
    (:func:`secateurs.runtime.paths.check_outputs`): distinct from the inputs and from each
    other, the right extension, not a directory, writable. A missing parent directory is
    created when the file is written, not here."""
    from secateurs.runtime.paths import Output, check_outputs

    what = {"output": "model", "report": "report", "plot": "plot"}
    chosen = {k: v for k, v in outputs.items() if v is not None}
    checked = check_outputs([Output(k, str(v), (_OUTPUT_SUFFIXES[k],), what[k])
                             for k, v in chosen.items()],
                            {f"the input '{p}'": str(p) for p in inputs})
    return dict(zip(chosen, checked))


# --------------------------------------------------------------------------------------------
# Pipeline state and helpers
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    source: Any
    example_inputs: Any
    options: dict[str, Any]
    progress: Callable[[str], None]
    torch_model: Any = None
    model: Any = None  # current onnx.ModelProto
    models: dict[str, Any] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    macs: dict[str, int | None] = field(default_factory=dict)
    feeds: dict[str, np.ndarray] | None = None
    calibration: list[dict[str, np.ndarray]] | None = None
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    rows: list[StageRecord] = field(default_factory=list)
    check_disabled: tuple[str, ...] = ()  # ORT transformers off when checking the int8 model


def _session(model: Any, threads: int = 1, disabled: Sequence[str] = ()) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def _run(model: Any, feeds: Mapping[str, np.ndarray],
         disabled: Sequence[str] = ()) -> list[np.ndarray]:
    from secateurs.passes.prune_onnx import _as_array

    # a sequence of maps (scikit-learn's ZipMap) as one row of values per map
    return [_as_array(o) for o in _session(model, disabled=disabled).run(None, dict(feeds))]


def _numeric_pairs(a: Sequence[np.ndarray], b: Sequence[np.ndarray]
                   ) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The numeric outputs paired as float64; ``None`` where the outputs do not match in
    number or shape, or a non-numeric one (labels as strings) differs."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    pairs = []
    for x, y in zip(a, b):
        if x.dtype.kind in "biuf" and y.dtype.kind in "biuf":
            pairs.append((x.astype(np.float64), y.astype(np.float64)))
        elif not np.array_equal(x, y):
            return None
    return pairs


def _max_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    pairs = _numeric_pairs(a, b)
    if pairs is None:
        return float("inf")
    return max((float(np.abs(x - y).max()) for x, y in pairs if x.size), default=0.0)


def _relative_l2(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """``||ref - got|| / ||ref||`` over all numeric outputs together."""
    pairs = _numeric_pairs(ref, got)
    if pairs is None:
        return float("inf")
    num = sum(float(np.sum((x - y) ** 2)) for x, y in pairs)
    den = sum(float(np.sum(x ** 2)) for x, _ in pairs)
    return float(np.sqrt(num / den)) if den else float(np.sqrt(num))


def _graph_inputs(model: Any) -> list[Any]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _count_macs(model: Any, feeds: Mapping[str, np.ndarray]) -> int | None:
    from secateurs.graph.from_onnx import from_onnx
    from secateurs.passes.cost import count_macs

    try:
        graph = from_onnx(model, {k: list(v.shape) for k, v in feeds.items()})
        return int(count_macs(graph, lambda v: graph.values[v].shape))
    except SecateursError as exc:
        log.info("MACs not counted: %s", exc)
        return None


def _torch_feeds(model: Any, example_inputs: Any) -> dict[str, np.ndarray]:
    import torch

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    names = [i.name for i in _graph_inputs(model)]
    return {n: (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
            for n, a in zip(names, args)}


def _default_feeds(model: Any, input_shapes: Mapping[str, Sequence[int]] | None
                   ) -> dict[str, np.ndarray]:
    import onnx

    from secateurs.passes.quantize import random_integers

    rng = np.random.default_rng(0)
    feeds = {}
    unknown = sorted(set(input_shapes or ()) - {i.name for i in _graph_inputs(model)})
    if unknown:
        raise InputError(f"input_shapes names {unknown}, which the model does not take as "
                         f"inputs; its inputs: {[i.name for i in _graph_inputs(model)]}")
    for inp in _graph_inputs(model):
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if input_shapes and inp.name in input_shapes:
            dims = list(input_shapes[inp.name])
        elif any(d is None for d in dims[1:]):
            raise InputError(f"ONNX input '{inp.name}' has symbolic dims {dims}; pass "
                             f"input_shapes={{'{inp.name}': [...]}} (--input-shape "
                             f"{inp.name}=1,3,224,224) or calibration data")
        shape = [d or 1 for d in dims]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = (rng.standard_normal(shape).astype(dtype)
                           if np.issubdtype(dtype, np.floating)
                           else random_integers(model, inp.name, shape, dtype, rng))
    return feeds


def _record(state: _State, stage: str, model: Any, details: dict[str, Any] | None = None,
            macs: int | None = None) -> None:
    state.model = model
    state.models[stage] = model
    state.details[stage] = dict(details or {})
    state.macs[stage] = macs


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def _load(state: _State) -> None:
    from secateurs.passes.prune_onnx import load_model
    from secateurs.passes.quantize import unique_node_names

    model, _ = load_model(state.source)
    # the same graph; ONNX Runtime refuses one where two nodes share a name
    model = unique_node_names(model)
    src = str(state.source) if isinstance(state.source, (str, os.PathLike)) else "ModelProto"
    if state.options["calibration"] is not None:
        # real inputs: checks and latency run on data, not on noise outside its range
        state.calibration = _calibration(model, state.options["calibration"])
        state.feeds = dict(state.calibration[0])
    else:
        state.feeds = _default_feeds(model, state.options.get("input_shapes"))
    _record(state, "input", model, {"source": src}, _count_macs(model, state.feeds))


def _export_model(module: Any, example_inputs: Any) -> Any:
    from secateurs.runtime.onnx_export import export_onnx

    return export_onnx(module, example_inputs, opset=17, keep_names=True,
                       exporter="torchscript")


def _export(state: _State) -> None:
    model = _export_model(state.torch_model, state.example_inputs)
    state.feeds = _torch_feeds(model, state.example_inputs)
    if state.options["calibration"] is not None:
        state.calibration = _calibration(model, state.options["calibration"])
    _record(state, "input", model, {"source": type(state.torch_model).__name__},
            _count_macs(model, state.feeds))


def _prune_torch(state: _State) -> None:
    from secateurs.passes.prune import prune

    opts = state.options
    result = prune(state.torch_model, state.example_inputs, ratio=opts["prune"] or 0.0,
                   target_macs=opts["target_macs"], target_latency=opts["target_latency"],
                   importance=opts["importance"], round_to=opts["round_to"], verify=True)
    if result.report.exact is False:
        raise SecateursError(f"pruned model is not mask-equivalent to the input (max |diff| "
                             f"{result.report.max_abs_diff:.3g}); please report this model")
    _check_something_removed(result.plan, opts, "secateurs analyze")
    model = _export_model(result.model, state.example_inputs)
    _record(state, "prune", model, _prune_details(result.report),
            _count_macs(model, state.feeds))


def _check_something_removed(plan: Any, opts: Mapping[str, Any], analyze: str) -> None:
    """A prune stage that removes nothing is an error, as in ``secateurs prune``: the user
    asked for a smaller model, and a copy of the input is not one."""
    if plan.removed:
        return
    at = next(f"{k}={opts[k]}" for k in ("prune", "target_macs", "target_latency")
              if opts[k] is not None)
    widths = ("; groups narrower than ONNX Runtime's kernel widths stay whole with "
              "round_to='auto' (the default): round_to=1 (--round-to 1) removes units one at "
              "a time") if opts["round_to"] == "auto" else ""
    raise InputError(f"prune at {at} removes nothing: every channel group is pinned or too "
                     f"small to lose a unit (see '{analyze}'){widths}; nothing was written")


def _prune_details(report: Any) -> dict[str, Any]:
    return {"macs_kept": report.macs_kept, "params_kept": report.params_kept,
            "mask_equivalent": report.exact, "mask_equivalence_diff": report.max_abs_diff}


def _prune_onnx_at(state: _State, ratio: float | None,
                   target_latency: float | None = None) -> Any:
    from secateurs.passes.prune_onnx import prune_onnx

    opts = state.options
    return prune_onnx(state.model, ratio=ratio, target_latency=target_latency,
                      importance=opts["importance"], round_to=opts["round_to"],
                      input_shapes={k: list(v.shape) for k, v in state.feeds.items()})


def _prune_onnx(state: _State) -> None:
    target = state.options["target_macs"]
    if state.options["target_latency"] is not None:
        result = _prune_onnx_at(state, None, state.options["target_latency"])
    elif target is None:
        result = _prune_onnx_at(state, state.options["prune"])
    else:
        result = _bisect_onnx(state, target)
    _check_something_removed(result.plan, state.options, "secateurs inspect")
    state.progress(f"prune: checking mask-equivalence in ONNX Runtime "
                   f"(MACs kept {result.report.macs_kept:.1%})")
    from secateurs.passes.prune_onnx import _feeds, verify_onnx

    ok, diff = verify_onnx(state.model, result.model, result.plan,
                           _feeds(state.model, result.analysis))
    if not ok:
        raise SecateursError(f"pruned ONNX is not mask-equivalent to the input (max |diff| "
                             f"{diff:.3g}); please report this model")
    details = {**_prune_details(result.report), "mask_equivalent": ok,
               "mask_equivalence_diff": diff}
    details["ratio"] = float(result.plan.meta.get("ratio") or 0.0)
    if result.plan.meta.get("target_latency") is not None:
        details["target_latency"] = result.plan.meta["target_latency"]
    _record(state, "prune", result.model, details, int(result.report.macs_after))


def _bisect_onnx(state: _State, target: float, iterations: int = 8,
                 tolerance: float = 0.02) -> Any:
    """``prune_onnx`` at the ratio whose MACs kept is nearest ``target`` (bisection)."""
    lo, hi, best = 0.0, 0.95, None
    for step in range(iterations):
        ratio = (lo + hi) / 2
        result = _prune_onnx_at(state, ratio)
        kept = result.report.macs_kept
        state.progress(f"prune: ratio {ratio:.3f} keeps {kept:.1%} of the MACs "
                       f"(target {target:.1%}, probe {step + 1}/{iterations})")
        if best is None or abs(kept - target) < abs(best.report.macs_kept - target):
            best = result
        if abs(kept - target) <= tolerance * target:
            break
        lo, hi = (ratio, hi) if kept > target else (lo, ratio)
    assert best is not None
    if abs(best.report.macs_kept - target) > 0.1 * target:
        raise InputError(f"target_macs={target}: the nearest reachable budget is "
                         f"{best.report.macs_kept:.3f} of the MACs; choose a reachable target")
    return best


def _sparsify(state: _State) -> None:
    from secateurs.passes.onnx_sparsify import sparsify_onnx_with_report
    from secateurs.runtime.tensorrt import check_sparse_eligibility

    pattern = state.options["sparsify"]
    model, report = sparsify_onnx_with_report(state.model, pattern)
    if not report.layers:
        raise InputError(f"sparsify {pattern}: no Conv/Gemm/MatMul weight could be sparsified "
                         f"({len(report.skipped)} skipped, e.g. "
                         f"{report.skipped[0].reason if report.skipped else 'none'})")
    details: dict[str, Any] = {"pattern": pattern, "layers": len(report.layers),
                               "skipped": len(report.skipped),
                               "all_valid": bool(report.all_valid)}
    if pattern == "2:4":
        eligibility = check_sparse_eligibility(model)
        details["tensorrt_sparse"] = {"eligible": len(eligibility.eligible),
                                      "total": len(eligibility.layers),
                                      "layers": list(eligibility.eligible_names)}
    _record(state, "sparsify", model, details, state.macs[_last(state)])


def _quantize(state: _State) -> None:
    from secateurs.passes.quantize import check_disabled_optimizers

    opts = state.options
    calibration = state.calibration
    if calibration is None and state.example_inputs is not None:
        calibration = [dict(state.feeds or {})]
        log.warning("int8 calibration on the example inputs only (one batch); pass "
                    "calibration=... for accurate ranges")
    # random calibration at the shapes the checks run at (a symbolic sequence or time dim
    # would otherwise calibrate at length 1)
    shapes = {k: list(np.shape(v)) for k, v in (state.feeds or {}).items()}
    auto = opts["keep_float"] == "auto"
    kept = [] if auto else _kept_float(state.model, opts["keep_float"])
    op_types = opts["quantize_op_types"]
    with _each_warning_once(logging.getLogger("secateurs.passes.quantize")):
        result, rounds = _quantize_rounds(state, calibration, shapes, auto, kept, op_types)
    details = result.to_dict()
    if auto:
        details["keep_float_rounds"] = rounds
    state.check_disabled = check_disabled_optimizers(result)
    if state.check_disabled:
        details["checked_as"] = ("QDQ semantics: this CPU's int8 kernels are not the target's "
                                 "(ORT's QDQ fusion off for the check)")
    if opts["sparsify"] == "2:4":
        from secateurs.runtime.tensorrt import check_sparse_eligibility

        eligibility = check_sparse_eligibility(result.model)
        details["tensorrt_sparse"] = {"eligible": len(eligibility.eligible),
                                      "total": len(eligibility.layers),
                                      "layers": list(eligibility.eligible_names)}
    _record(state, "quantize", result.model, details, state.macs[_last(state)])


def _quantize_rounds(state: _State, calibration: Any, shapes: dict[str, list[int]],
                     auto: bool, kept: list[str], op_types: list[str] | None
                     ) -> tuple[Any, list[dict[str, Any]]]:
    """One int8 quantization, or with ``keep_float='auto'`` the rounds that follow the
    check's own advice (see ``optimize``); the last result and the rounds' record."""
    from secateurs.passes.quantize import check_disabled_optimizers, quantize_onnx

    opts = state.options
    rounds: list[dict[str, Any]] = []
    while True:
        result = quantize_onnx(state.model, opts["quantize"], calibration=calibration,
                               profile=opts["profile"], input_shapes=shapes or None,
                               reduce_range=opts["reduce_range"], exclude=kept,
                               op_types=op_types)
        if not auto:
            break
        # keep_float="auto": the check's own measure, and what its refusal would advise
        feeds = state.feeds or {}
        rel = _relative_l2(_run(state.model, feeds),
                           _run(result.model, feeds, check_disabled_optimizers(result)))
        rounds.append({"kept_float": len(kept), "op_types": op_types, "diff": rel})
        if rel <= TOLERANCES["int8"] or len(rounds) > AUTO_ROUNDS:
            break
        new = [n for n in _noisy_nodes(_noisiest(result.model, feeds, state.model))
               if n not in kept]
        stuck = len(rounds) > 1 and rel > AUTO_PROGRESS * rounds[-2]["diff"]
        if (stuck or not new) and op_types is None and any(
                n.op_type == "MatMul" for n in state.model.graph.node):
            # no single activation is to blame (the error is many moderate ones adding up):
            # the refusal's other advice, only the MatMuls in int8
            op_types = ["MatMul"]
            state.progress(f"  int8 {rel:.1%} off its float input, and keeping the noisiest "
                           f"nodes float does not help: quantizing only its MatMuls")
            continue
        if stuck or not new:
            break
        state.progress(f"  int8 {rel:.1%} off its float input: keeping {len(new)} more "
                       f"node(s) float")
        kept += new
    return result, rounds


@contextlib.contextmanager
def _each_warning_once(logger: logging.Logger):
    """Within the block, a message ``logger`` already gave is not given again: the rounds of
    ``keep_float='auto'`` quantize up to ``AUTO_ROUNDS + 1`` times and would repeat every
    warning of the quantizer (no VNNI, nodes kept float) each round."""
    seen: set[str] = set()

    def once(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in seen:
            return False
        seen.add(message)
        return True

    logger.addFilter(once)
    try:
        yield
    finally:
        logger.removeFilter(once)


def _last(state: _State) -> str:
    return list(state.models)[-1]


def _check(state: _State) -> None:
    import onnx

    feeds = state.feeds or {}
    previous: list[np.ndarray] | None = None
    previous_model = None
    for stage, model in state.models.items():
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise SecateursError(f"the {stage} model fails onnx.checker: {exc}") from exc
        out = _run(model, feeds, state.check_disabled if stage == "quantize" else ())
        state.outputs[stage] = out
        rel = 0.0 if previous is None else _relative_l2(previous, out)
        mode = state.details[stage].get("mode")
        if stage == "quantize" and rel > TOLERANCES[mode]:
            hint = (_int8_hint(state, model, previous_model) if mode == "int8" else
                    "a value past fp16's range (an activation above 65504, a large mask "
                    "constant) or a precision-sensitive op; keep those nodes fp32 "
                    "(--keep-float NODE,..., optimize(..., keep_float=[...])) or use int8")
            raise SecateursError(
                f"the {mode} model's outputs differ from its float input by {rel:.1%} "
                f"(relative L2 error; tolerance {TOLERANCES[mode]:.0%}): {hint}")
        state.details[stage]["stage_diff"] = rel
        if stage == "quantize" and mode == "int8" and state.calibration is None:
            _check_fresh_draw(state, model, previous_model, rel)
        previous, previous_model = out, model


def _check_fresh_draw(state: _State, model: Any, float_model: Any, rel: float) -> None:
    """Without calibration data the int8 model is calibrated on the inputs it is checked on
    (the example inputs, or random ones); a fresh random draw at the same shapes tells how far
    those ranges carry (zoo ``fused_moe``/``looped_block``: 3-5% on the example, 20-26% on new
    draws). Reported and warned about, not refused: random inputs may be off the model's real
    distribution too."""
    from secateurs.passes.quantize import _random_batches

    shapes = {k: list(np.shape(v)) for k, v in (state.feeds or {}).items()}
    try:
        feeds = _random_batches(float_model, 1, FRESH_DRAW_SEED, shapes)[0]
        fresh = _relative_l2(_run(float_model, feeds),
                             _run(model, feeds, state.check_disabled))
    except Exception as exc:  # noqa: BLE001 - an extra diagnosis, never the check itself
        log.debug("int8 fresh-draw check skipped: %s", exc)
        return
    state.details["quantize"]["fresh_draw_diff"] = fresh
    if fresh > TOLERANCES["int8"]:
        source = ("the example inputs" if state.example_inputs is not None
                  else "random inputs")
        log.warning("int8 calibrated on %s only is %.1f%% off its float input on a fresh "
                    "random draw at the same shapes (%.1f%% on the check inputs, tolerance "
                    "%.0f%%): its ranges fit what it was calibrated on; pass calibration=... "
                    "(--calibration inputs.npz) with real samples", source, 100 * fresh,
                    100 * rel, 100 * TOLERANCES["int8"])


FRESH_DRAW_SEED = 20261207  # not the calibration's or the check inputs' seed


NOISY_DB = 25.0  # an int8 activation noisier than this (~6% RMS error) is worth keeping float


def _noisiest(model: Any, feeds: Mapping[str, np.ndarray], float_model: Any) -> list[Any]:
    """The int8 model's activations worth keeping float: the worst three and any other below
    ``NOISY_DB`` (the ones a rerun would name next), worst first; empty where ORT's QDQ
    debugging cannot run on it."""
    from secateurs.passes.quantize import activation_noise

    try:
        noisy = activation_noise(model, feeds, float_model, top=12)
    except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the refusal
        log.debug("int8 activation noise not measured: %s", exc)
        return []
    return [n for i, n in enumerate(noisy) if i < 3 or n.sqnr_db < NOISY_DB]


def _noisy_nodes(noisy: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(name for n in noisy for name in n.nodes))


AUTO_ROUNDS = 4  # keep_float="auto": rounds of keeping the named nodes float
AUTO_PROGRESS = 0.9  # a round that leaves more than 90% of the previous error did not help


def _int8_hint(state: _State, model: Any, float_model: Any) -> str:
    """What to do about an int8 model that failed its check: its noisiest activations (ONNX
    Runtime's QDQ debugging, on the check inputs) and the nodes that keep them float."""
    advice = []
    rounds = state.details.get("quantize", {}).get("keep_float_rounds")
    if rounds:
        advice.append(f"keep_float='auto' kept {rounds[-1]['kept_float']} node(s) float in "
                      f"{len(rounds) - 1} round(s) and it is still off")
    noisy = _noisiest(model, state.feeds or {}, float_model)
    if noisy:
        listed = ", ".join((f"the output of '{n.producer}'" if n.producer else f"'{n.tensor}'")
                           + f" {n.sqnr_db:.0f} dB" for n in noisy[:3])
        more = len(noisy) - 3
        if more > 0:
            listed += f" and {more} more below {NOISY_DB:.0f} dB"
        nodes = _noisy_nodes(noisy)
        why = ("a few outlier values set one range per tensor and round the rest coarsely"
               if noisy[0].sqnr_db < NOISY_DB else
               "none is badly ranged: the error is many moderate ones adding up, which "
               "keeping a few float may not fix")
        advice.append(f"its noisiest int8 activations are {listed} (signal-to-quantization-"
                      f"noise; 8 bits over a range the values fill give ~40 dB): {why}. "
                      f"Keep them float: --keep-float {','.join(nodes)} (optimize(..., "
                      f"keep_float=[...]), or --keep-float auto)")
    else:
        advice.append("keep the sensitive nodes float (--keep-float NODE,..., optimize(..., "
                      "keep_float=[...]))")
    if state.options["quantize_op_types"] is None:
        advice.append("for a transformer, quantize only its MatMuls (--quantize-op-types "
                      "MatMul): its residual Add/LayerNorm carry the outliers")
    if state.calibration is None:
        advice.append("calibrate on real inputs (--calibration inputs.npz): this ran on "
                      + ("the example inputs (one batch)" if state.example_inputs is not None
                         else "random inputs"))
    return "; ".join(advice) + "; or use fp16"


def _kept_float(model: Any, names: Sequence[str] | None) -> list[str]:
    """``keep_float`` checked against the graph the quantize stage gets."""
    if not names:
        return []
    present = {n.name for n in model.graph.node}
    unknown = [n for n in names if n not in present]
    if unknown:
        raise InputError(f"keep_float names {unknown[:5]} are not nodes of the graph the "
                         f"quantize stage gets (the pruned/sparsified model; the int8 check's "
                         f"refusal names nodes as it has them)")
    return list(names)


def _measure(state: _State) -> None:
    from secateurs.runtime.ort import compare

    opts = state.options
    names = list(state.models)
    blobs = [m.SerializeToString() for m in state.models.values()]
    state.progress(f"measure: {len(names)} models ({', '.join(names)}) x {opts['repeats']} "
                   f"interleaved runs, {opts['threads']} thread(s)")
    final = names[-1]
    # ORT fuses a residual Add read only by a LayerNormalization into SkipLayerNormalization,
    # whose CPU kernel is slower than the pair on AVX-512 (docs/architecture.md): where the
    # final model gets it, it is also timed without the fusion, in the same interleaved loop
    skip = _ort_fused_count(state.models[final], "SkipLayerNormalization") > 0
    extra = [state.models[final].SerializeToString()] if skip else []
    labels = names + ([f"{final} without SkipLayerNormFusion"] if skip else [])
    disabled = [[]] * len(names) + ([[SKIP_LAYER_NORM_FUSION]] if skip else [])
    table = compare(blobs[0], blobs[1:] + extra, inputs=dict(state.feeds or {}),
                    threads=(opts["threads"],), batch=(_batch(state.feeds),),
                    warmup=opts["warmup"], repeats=opts["repeats"], names=labels,
                    model_disabled_optimizers=disabled)
    for row in table.rows[:len(names)]:
        state.latency[row.model] = row.stats.p50
    if skip:
        fused, unfused = state.latency[final], table.rows[len(names)].stats.p50
        state.details[final]["skip_layer_norm"] = {
            "fused_ms": fused, "unfused_ms": unfused,
            "disable": unfused < fused * (1 - SKIP_LAYER_NORM_MARGIN)}


INT8_FASTER_MARGIN = 0.03  # int8 less than 3% faster than its float input is "not faster"
SKIP_LAYER_NORM_FUSION = "SkipLayerNormFusion"
SKIP_LAYER_NORM_MARGIN = 0.03  # advise turning the fusion off only past the noise


def _ort_fused_count(model: Any, op_type: str) -> int:
    """How many ``op_type`` nodes ORT's CPU graph optimizer (all levels) makes of ``model``."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    return sum(1 for n in optimized.graph.node if n.op_type == op_type)


def _batch(feeds: Mapping[str, np.ndarray] | None) -> int:
    first = next(iter((feeds or {}).values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def _stages(is_torch: bool, opts: Mapping[str, Any]) -> list[tuple[str, Callable[[_State], None]]]:
    """The flat list of stages these options ask for, in :data:`STAGE_ORDER`."""
    stages: list[tuple[str, Callable[[_State], None]]] = [
        ("export", _export) if is_torch else ("load", _load)]
    if any(opts[k] is not None for k in ("prune", "target_macs", "target_latency")):
        stages.append(("prune", _prune_torch if is_torch else _prune_onnx))
    if opts["sparsify"] is not None:
        stages.append(("sparsify", _sparsify))
    if opts["quantize"] is not None:
        stages.append(("quantize", _quantize))
    stages.append(("check", _check))
    if opts["measure"]:
        stages.append(("measure", _measure))
    return stages


def _validate(opts: dict[str, Any]) -> None:
    from secateurs.passes.masks import parse_pattern
    from secateurs.passes.quantize import MODES, PROFILES

    given = [k for k in ("prune", "target_macs", "target_latency") if opts[k] is not None]
    if len(given) > 1:
        raise InputError(f"give one of prune (a ratio), target_macs or target_latency, not "
                         f"both {' and '.join(given)}")
    from secateurs.passes.prune import check_target_latency

    check_target_latency(opts["target_latency"])
    ratio = opts["prune"]
    if ratio is not None and (not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0):
        raise InputError(f"prune ratio must be in (0, 1), got {ratio!r}")
    target = opts["target_macs"]
    if target is not None and (not isinstance(target, (int, float)) or not 0.0 < target < 1.0):
        raise InputError(f"target_macs must be in (0, 1), got {target!r}")
    if opts["sparsify"] is not None:
        pattern = parse_pattern(opts["sparsify"])
        if pattern.kind != "nm":
            raise InputError(f"sparsify takes an N:M pattern such as '2:4', got "
                             f"{opts['sparsify']!r}")
    if opts["quantize"] is not None and opts["quantize"] not in MODES:
        raise InputError(f"quantize must be one of {MODES}, got {opts['quantize']!r}")
    if opts["profile"] not in PROFILES:
        raise InputError(f"int8 profile must be one of {PROFILES}, got {opts['profile']!r}")
    if opts["calibration"] is not None and opts["quantize"] != "int8":
        raise InputError("calibration data is only used by quantize='int8'")
    if opts["keep_float"] == "auto" and opts["quantize"] != "int8":
        raise InputError("keep_float='auto' keeps the nodes int8 quantizes badly float; it "
                         "needs quantize='int8'")
    for key in ("keep_float", "quantize_op_types"):
        value = opts[key]
        if value is None or (key == "keep_float" and value == "auto"):
            continue
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(
                isinstance(v, str) for v in value):
            raise InputError(f"{key} takes a list of names{' or auto' * (key == 'keep_float')}, "
                         f"got {value!r}")
        if value and opts["quantize"] is None:
            raise InputError(f"{key} is only used by quantize='int8' or 'fp16'")
    if opts["quantize_op_types"] is not None and opts["quantize"] != "int8":
        raise InputError("quantize_op_types picks the op types int8 quantizes; fp16 converts "
                         "every op (keep_float keeps nodes fp32)")
    if opts["reduce_range"] not in (None, True, False):
        raise InputError(f"reduce_range must be None (auto), True or False, got "
                         f"{opts['reduce_range']!r}")
    for key in ("threads", "repeats"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise InputError(f"{key} must be a positive integer, got {opts[key]!r}")


def optimize(model: Any, example_inputs: Any = None, *, prune: float | None = None,
             target_macs: float | None = None, target_latency: float | None = None,
             sparsify: str | None = None,
             quantize: str | None = None, calibration: Any = None, profile: str = "ort",
             reduce_range: bool | None = None, keep_float: Sequence[str] | str = (),
             quantize_op_types: Sequence[str] | None = None,
             importance: str = "l2", round_to: int | str | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None,
             output: str | os.PathLike[str] | None = None,
             report: str | os.PathLike[str] | None = None,
             plot: str | os.PathLike[str] | None = None, measure: bool = True,
             threads: int = 1, repeats: int = 30, warmup: int = 3,
             progress: Callable[[str], None] | None = None) -> OptimizeResult:
    """Prune, sparsify and quantize ``model`` into one ONNX; report each stage.

    ``model``: an ``nn.Module`` (with ``example_inputs``), an ``.onnx`` path or an
    ``onnx.ModelProto`` (never modified). ``prune``: ratio of units removed per group, or
    ``target_macs``: fraction of the MACs to keep, or ``target_latency``: fraction of the
    estimated ORT CPU latency to keep (the ratio that meets it, ``passes/latency.py``). ``sparsify``: an N:M pattern (``"2:4"``).
    ``quantize``: ``"int8"`` (QDQ; ``profile`` ``"ort"`` or ``"tensorrt"``, see
    ``passes.quantize``) or ``"fp16"``. ``calibration``: int8 calibration inputs, a mapping
    input name -> array with samples along dim 0, a list of feed dicts, or an ``.npz`` path;
    default: the example inputs (torch) or random inputs (ONNX), with a warning.
    ``reduce_range``: 7-bit int8 weights; default ``None``: on for the ``"ort"`` profile on an
    x86 CPU without VNNI, whose kernels saturate otherwise (``quantize_onnx``).
    ``keep_float``: node names the quantize stage leaves float (names of the graph it gets,
    the pruned and sparsified one; the int8 check's refusal lists its noisiest nodes), or
    ``"auto"``: int8 keeps the nodes that refusal would name float and requantizes, until
    the check inputs are within the tolerance (at most ``AUTO_ROUNDS`` rounds); where a round
    does not help, it quantizes only the MatMuls (the refusal's other advice). The report's
    ``keep_float_rounds``, ``excluded`` and ``op_types`` say what it did.
    ``quantize_op_types``: int8 only the op types to quantize (e.g. ``["MatMul"]`` for a
    transformer whose residual stream carries outliers); default all.
    ``round_to``: default ``"auto"`` (widths per op kind for ONNX Runtime's CPU kernels,
    ``passes/kernel_widths.py``: what ``prune_onnx`` and ``secateurs prune`` on an ONNX file
    do), for torch and ONNX input alike; an integer is applied as given. ``output`` /
    ``report`` / ``plot``: written only after every stage passed. ``measure``: time every
    stage's model in ORT CPU (``threads``, ``repeats`` interleaved runs, median).
    ``progress``: receives one line per stage. With ONNX input and ``calibration``, the
    checks and latency run on the first calibration batch (else on random inputs).
    """
    import torch

    is_torch = isinstance(model, torch.nn.Module)
    if is_torch and example_inputs is None:
        raise InputError("optimize(torch_model, example_inputs): example inputs are needed "
                         "to export a torch model")
    opts: dict[str, Any] = {"prune": prune, "target_macs": target_macs,
                            "target_latency": target_latency, "sparsify": sparsify,
                            "quantize": quantize, "calibration": calibration,
                            "profile": profile, "reduce_range": reduce_range,
                            "keep_float": keep_float, "quantize_op_types": quantize_op_types,
                            "importance": importance, "round_to": round_to,
                            "input_shapes": dict(input_shapes) if input_shapes else None,
                            "measure": measure, "threads": threads, "repeats": repeats,
                            "warmup": warmup}
    _validate(opts)
    if opts["keep_float"] != "auto":
        opts["keep_float"] = list(opts["keep_float"] or ())
    if quantize_op_types is not None:
        opts["quantize_op_types"] = list(quantize_op_types)
    inputs = [model] if isinstance(model, (str, os.PathLike)) else []
    if isinstance(calibration, (str, os.PathLike)):
        inputs.append(calibration)
    paths = check_output_paths({"output": output, "report": report, "plot": plot}, inputs)
    if all(opts[k] is None for k in ("prune", "target_macs", "target_latency", "sparsify",
                                     "quantize")):
        raise InputError("optimize has no stage to run: give prune (--prune RATIO), "
                         "target_macs, target_latency, sparsify or quantize; 'secateurs bench' "
                         "measures a model as it is")
    if round_to is None:
        opts["round_to"] = "auto"  # the output is ONNX, whatever the input
    say = progress or (lambda _line: None)
    state = _State(model, example_inputs, opts, say)
    if is_torch:
        state.torch_model = model
    stages = _stages(is_torch, opts)
    total = len(stages) + bool(paths)
    timer = StageTimer()
    for index, (name, fn) in enumerate(stages, 1):
        say(f"[{index}/{total}] {name}")
        timer.run(name, fn, state)
    rows = _rows(state, timer.seconds)
    result = OptimizeResult(state.model, tuple(rows), dict(state.models),
                            _public_options(opts, calibration), dict(timer.seconds))
    if paths:
        say(f"[{total}/{total}] save: " + ", ".join(str(p) for p in paths.values()))
        timer.run("save", _save, result, paths)
    return result


def _calibration(model: Any, calibration: Any) -> list[dict[str, np.ndarray]]:
    from secateurs.passes.quantize import calibration_batches, load_calibration

    if isinstance(calibration, (str, os.PathLike)):
        return calibration_batches(model, load_calibration(calibration, model))
    if isinstance(calibration, Mapping):
        return calibration_batches(model, {k: np.asarray(v) for k, v in calibration.items()})
    if isinstance(calibration, Sequence) and all(isinstance(b, Mapping) for b in calibration):
        return [{k: np.asarray(v) for k, v in b.items()} for b in calibration]
    raise InputError("calibration must be an .npz path, a mapping input name -> array, or a "
                     f"list of feed dicts; got {type(calibration).__name__}")


def _public_options(opts: Mapping[str, Any], calibration: Any) -> dict[str, Any]:
    out = {k: v for k, v in opts.items() if k != "calibration"}
    out["calibration"] = (str(calibration) if isinstance(calibration, (str, os.PathLike))
                          else None if calibration is None else type(calibration).__name__)
    return out


def _rows(state: _State, seconds: Mapping[str, float]) -> list[StageRecord]:
    rows = []
    reference = state.outputs.get("input")
    for stage, model in state.models.items():
        details = dict(state.details[stage])
        stage_diff = float(details.pop("stage_diff", 0.0))
        out = state.outputs.get(stage)
        diff = _max_diff(reference, out) if reference is not None and out is not None else 0.0
        timing = seconds.get("export" if stage == "input" and "export" in seconds else
                             "load" if stage == "input" else stage, 0.0)
        rows.append(StageRecord(stage, model.ByteSize(), state.macs.get(stage),
                                state.latency.get(stage), diff, stage_diff, timing, details))
    return rows


def _save(result: OptimizeResult, paths: Mapping[str, Path]) -> None:
    """Render everything in memory, then commit every file; a failure removes the temps."""
    from secateurs.runtime.io import atomic_path

    blobs: dict[str, bytes] = {}
    if "output" in paths:
        if result.model.ByteSize() > 1_800_000_000:
            raise InputError("the optimized model exceeds 1.8 GB; external data output is not "
                             "supported by optimize yet")
        blobs["output"] = result.model.SerializeToString()
    if "report" in paths:
        blobs["report"] = (json.dumps(result.to_dict(), indent=2, default=str) + "\n").encode()
    if "plot" in paths:
        blobs["plot"] = render_plot(result)
    with contextlib.ExitStack() as stack:
        for key, data in blobs.items():
            tmp = stack.enter_context(atomic_path(paths[key]))
            tmp.write_bytes(data)


def render_plot(result: OptimizeResult) -> bytes:
    """Two bar charts (size on disk, ORT CPU latency) per stage, as PNG bytes."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.stages
    names = [r.stage for r in rows]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"][:len(rows)]
    figure = Figure(figsize=(10, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    panels = [("size on disk (MB)", [r.bytes / 1e6 for r in rows], "smaller")]
    if all(r.latency_ms is not None for r in rows):
        panels.append((f"ORT CPU latency (ms, median, {result.options.get('threads', 1)} "
                       "thread)", [r.latency_ms or 0.0 for r in rows], "faster"))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, values, word) in zip(axes, panels):
        bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
        base = values[0]
        for bar, value in zip(bars, values[::-1]):
            note = f"{value:.3g}" + (f"  ({base / value:.1f}x {word})" if value and
                                     value != base else "")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + note,
                    va="center", fontsize=9)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(values) * 1.45 if max(values) else 1)
        ax.grid(True, axis="x", alpha=0.3)
    figure.suptitle("secateurs optimize: what each stage bought")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
