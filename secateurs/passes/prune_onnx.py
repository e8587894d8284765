"""Structured pruning of ONNX models: the torch pipeline with an ONNX frontend and apply.

    load -> from_onnx -> group_channels -> importance -> select -> plan -> apply -> verify

Everything between the frontend and the apply stage is the core's: ``group_channels``,
``select_units``, ``build_plan``, the importance criteria and ``count_macs``. Plans are keyed
by initializer names (``Plan.frontend == "onnx"``) and are applied by
``secateurs.graph.onnx_apply.apply_plan_onnx``.

Default ``round_to``: ONNX Runtime's CPU provider runs Conv in its blocked NCHWc layout (MLAS
``nchwc`` kernels) when channel counts are multiples of the machine's vector block — 16 floats
with AVX-512, 8 with AVX2 — and falls back to im2col + GEMM otherwise, which is markedly slower
(``tools/bench/ort_rounding.py`` measures it; ``tools/bench/onnx_prune.py`` shows the end to end
effect). ``ORT_ROUND_TO`` is 16: a multiple of both blocks, so a model pruned on one x86
machine keeps the fast path on the other, and a multiple of 8 for GPU tensor cores too.
Measured on this project's AVX-512 test machine (ORT 1.31): a 3x3 conv at widths that are
multiples of 16 runs 1.25-1.5x the MAC/s of other widths, and 16 is the smallest multiple at
which every width is fast (``results/ort_rounding.json``); ResNet-50 pruned to 2x fewer MACs
runs 2.0x faster with ``round_to=16`` but only 1.39x with ``round_to=1`` (1 thread, batch 1,
``results/onnx_prune.json``).

``round_to="auto"`` (the default) refines this per op kind (``passes/kernel_widths.py``): conv
groups keep multiples of 16 and at least 32 channels, attention head dims multiples of 16, heads
unrounded; an integer ``round_to`` is applied as given. After the apply, the shape patches of
run-time shapes are folded into their constants (``passes/onnx_fold_patches.py``) so ONNX
Runtime's fusions still fire on the pruned graph.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from secateurs.errors import InputError
from secateurs.graph.from_onnx import (
    QUANTIZED_OPS,
    _constant_value,
    from_onnx,
    onnx_node_names,
    tensor_array,
)
from secateurs.graph.onnx_apply import (
    apply_plan_onnx,
    has_lazy_tensors,
    load_onnx,
    save_external,
    save_onnx,
    sorted_topologically,
    zero_plan_slices_onnx,
)
from secateurs.graph.onnx_untie import retie, untie_shared_vectors
from secateurs.passes.cost import count_macs
from secateurs.passes.group_channels import Analysis, group_channels
from secateurs.passes.importance import Criterion, ScoreContext, get_criterion, normalize
from secateurs.passes.kernel_widths import ort_cpu_widths
from secateurs.passes.latency import latency_note
from secateurs.passes.onnx_fold_patches import fold_shape_patches
from secateurs.passes.plan import Plan
from secateurs.passes.prune import (
    PruneReport,
    StageTimer,
    _describe,
    check_target_latency,
    group_rows,
    select_units,
)
from secateurs.passes.repair import OnnxNet, Repair, compare_outputs, conclude, repair

__all__ = ["analyze_onnx", "prune_onnx", "OnnxPruneResult", "verify_onnx", "ORT_ROUND_TO",
           "load_model"]

log = logging.getLogger(__name__)

ORT_ROUND_TO = 16
# The safety net runs trials under ONNX Runtime by default only up to this many MACs (a
# forward of ~0.1 s on one core); larger models get strict shape inference (and ORT with
# verify=True).
ORT_TRIAL_MACS = 300_000_000




@dataclass
class OnnxPruneResult:
    model: onnx.ModelProto
    plan: Plan
    report: PruneReport
    analysis: Analysis = field(repr=False)
    external_data: bool = False

    def save(self, path: str | os.PathLike[str], external_data: bool | None = None) -> None:
        """Write the pruned model atomically (external data if the input used it)."""
        save_onnx(self.model, path, self.external_data if external_data is None
                  else external_data)


def load_model(model_or_path: Any, lazy: bool = False) -> tuple[onnx.ModelProto, bool]:
    """A ModelProto (used as is) or a path (loaded with its external data; ``lazy=True``
    leaves large external tensors on disk, see ``onnx_apply.load_onnx``)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return sorted_topologically(model_or_path), False
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_onnx(model_or_path, lazy=lazy)
    raise InputError(f"expected an onnx.ModelProto or a path to an .onnx file, got "
                     f"{type(model_or_path).__name__}")


def analyze_onnx(model_or_path: Any,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> Analysis:
    """Dependency analysis of an ONNX model (not modified; per-channel vectors the exporter
    deduplicated are read as the separate parameters they were, ``graph/onnx_untie.py``)."""
    model, _ = load_model(model_or_path, lazy=True)
    return group_channels(from_onnx(untie_shared_vectors(model)[0], input_shapes))


class _ParamTensors(Mapping[str, torch.Tensor]):
    """The analysed parameters as float32 tensors, read when a criterion asks for one and
    not kept: scoring a model holds one tensor at a time, not a second copy of the weights
    (a parameter in two groups is read twice)."""

    def __init__(self, model: onnx.ModelProto, analysis: Analysis) -> None:
        wanted = set(analysis.param_values)
        self._tensors: dict[str, onnx.TensorProto] = {
            t.name: t for t in model.graph.initializer if t.name in wanted}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.output and n.output[0] in wanted:
                self._tensors[n.output[0]] = next(a for a in n.attribute
                                                  if a.name == "value").t

    def __getitem__(self, name: str) -> torch.Tensor:
        arr = np.ascontiguousarray(tensor_array(self._tensors[name]), dtype=np.float32)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _ignored_groups(analysis: Analysis, model: onnx.ModelProto, ignore: Iterable[str]) -> set[int]:
    """Groups touching any named initializer, or any initializer read by a named node."""
    names = [str(n) for n in ignore]
    if not names:
        return set()
    params = set(analysis.param_values)
    nodes = dict(zip(onnx_node_names(model.graph), model.graph.node))
    targets: set[str] = set()
    unknown = []
    for n in names:
        if n in params:
            targets.add(n)
        elif n in nodes:
            targets.update(i for i in nodes[n].input if i in params)
        else:
            unknown.append(n)
    if unknown:
        raise InputError(f"ignore names {unknown} match no initializer or node of the model; "
                         f"initializers look like {sorted(params)[:5]}")
    return {g.id for g in analysis.groups if targets & set(g.params())}


def _n_params(model: onnx.ModelProto) -> int:
    """Elements of the float initializers and of the float ``Constant`` nodes (some exporters
    write every weight as one); integer tensors are shape arithmetic, not parameters."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
              onnx.TensorProto.DOUBLE}
    tensors = list(model.graph.initializer) + [  # a scalar constant is no parameter
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
        if a.name == "value" and int(np.prod(a.t.dims, dtype=np.int64)) > 1]
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if t.data_type in floats)


def _report(analysis: Analysis, removed: Mapping[int, np.ndarray], before: onnx.ModelProto,
            after: onnx.ModelProto, seconds: dict[str, float],
            repairs: Mapping[int, Repair] | None = None) -> PruneReport:
    graph = analysis.graph
    gone = analysis.removed_atoms(dict(removed))

    def shape_before(v: str) -> tuple[int, ...] | None:
        return graph.values[v].shape

    def shape_after(v: str) -> tuple[int, ...] | None:
        return analysis.new_shape(v, gone) if v in analysis.labels else graph.values[v].shape

    repairs = dict(repairs or {})
    return PruneReport(_n_params(before), _n_params(after), count_macs(graph, shape_before),
                       count_macs(graph, shape_after), group_rows(analysis, removed, repairs),
                       dict(seconds), "onnx", repairs=tuple(repairs[g] for g in sorted(repairs)))


_RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
               "Multinomial", "Bernoulli"}


def random_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes that make ``model``'s outputs random: sampling ops, and ``Dropout`` whose
    ``training_mode`` input is given and not a constant False (how an export made in training
    mode looks: ``model.eval()`` was missed)."""
    consts = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
    found = []
    for name, node in zip(onnx_node_names(model.graph), model.graph.node):
        if node.op_type in _RANDOM_OPS:
            found.append(f"{node.op_type} '{name}'")
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            mode = consts.get(node.input[2])
            const = constants.get(node.input[2])
            value = tensor_array(mode) if mode is not None else \
                _constant_value(const) if const is not None else None
            if value is None or bool(np.asarray(value).any()):
                found.append(f"Dropout '{name}' (training_mode)")
    return found


def _check_deterministic(model: onnx.ModelProto) -> None:
    found = random_nodes(model)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise InputError(
            f"the model's outputs are random: {', '.join(found[:3])}{more}. It was probably "
            "exported in training mode: call model.eval() before torch.onnx.export (the "
            "TorchScript exporter: training=torch.onnx.TrainingMode.EVAL). A pruned model "
            "cannot be checked against a random one")


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    """Every graph input with a rank declares a free (symbolic or unknown) first dim."""
    inits = {t.name for t in model.graph.initializer}
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input if i.name not in inits]
    return bool(dims) and all(len(d) and not d[0].HasField("dim_value") for d in dims)


def _feeds(model: onnx.ModelProto, analysis: Analysis, seed: int = 0,
           low: int = 0) -> dict[str, np.ndarray]:
    """Random inputs at the analysed shapes: floats standard normal, bools half true,
    integers from ``low``: token ids over the embedding table a ``Gather`` reads them from,
    other integers (masks, indices) ``low`` or ``low + 1`` (``quantize.random_integers``: one
    rule for every check and calibration input)."""
    from secateurs.passes.quantize import random_integers

    rng = np.random.default_rng(seed)
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    feeds = {}
    for name in analysis.graph.inputs:
        shape = analysis.graph.values[name].shape or ()
        dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name])
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.random(shape) < 0.5
        else:
            feeds[name] = random_integers(model, name, shape, dtype, rng, low)
    return feeds


def _finite_feeds(model: onnx.ModelProto, analysis: Analysis
                  ) -> tuple[dict[str, np.ndarray], str | None]:
    """Check inputs at which the original's float outputs are finite: the contract compares
    numbers, and NaN equals nothing. Token id 0 is often a padding id some exported graphs
    turn into NaN (a dynamo export of HF Helium: every output NaN wherever an id is 0, where
    eager PyTorch gives numbers), so integers move to ``[1, 3)``, then other seeds. Returns the
    feeds and, if none were finite, a note saying the check is blind there. Only models with
    integer inputs are probed (one extra forward of the original): float inputs are drawn
    from a normal distribution, with nothing to move off."""
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    if all(np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(types[n]), np.floating)
           for n in analysis.graph.inputs):
        return _feeds(model, analysis), None
    first = None
    for seed, low in ((0, 0), (0, 1), (1, 1), (2, 2)):
        feeds = _feeds(model, analysis, seed, low)
        first = first or feeds
        try:
            outs = _run(model, feeds)
        except Exception:  # noqa: BLE001 - the checks themselves report a model ORT refuses
            return first, None
        if all(np.isfinite(o).all() for o in map(np.asarray, outs)
               if np.issubdtype(o.dtype, np.floating)):
            return feeds, None
    return first, ("the original model's outputs are not finite (NaN or inf) at every check "
                   "input tried (random floats, integers from 0, 1 and 2): where both models "
                   "give NaN at the same positions the check counts them equal, and says "
                   "nothing about those positions")


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not has_lazy_tensors(model):
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, dict(feeds))
    # a big model loaded by path: streamed to a scratch file a tensor at a time (its proto
    # may be past protobuf's limit), which ORT reads with its external data
    import tempfile

    with tempfile.TemporaryDirectory(prefix="secateurs-ort-") as scratch:
        path = save_external(model, os.path.join(scratch, "model.onnx"))
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out = sess.run(None, dict(feeds))
        del sess
    return out


def _as_array(output: Any) -> np.ndarray:
    """An ORT output as an array: a sequence of maps (scikit-learn's ``ZipMap``
    probabilities) as its values, one row per map in key order."""
    if isinstance(output, list) and output and all(isinstance(m, dict) for m in output):
        return np.array([[m[k] for k in sorted(m)] for m in output])
    return np.asarray(output)


def verify_onnx(original: onnx.ModelProto, pruned: onnx.ModelProto, plan: Plan,
                feeds: Mapping[str, np.ndarray], rtol: float = 1e-4,
                atol: float = 1e-5) -> tuple[bool, float]:
    """The correctness contract under ONNX Runtime: the original with the plan's slices
    zeroed gives the same outputs as the pruned model."""
    expected = [_as_array(e) for e in _run(zero_plan_slices_onnx(original, plan), feeds)]
    got = [_as_array(g) for g in _run(pruned, feeds)]
    if len(expected) != len(got):
        return False, float("inf")
    numeric = []
    for e, g in zip(expected, got):
        if e.dtype.kind in "biuf":
            numeric.append((torch.from_numpy(np.ascontiguousarray(e)),
                            torch.from_numpy(np.ascontiguousarray(g))))
        elif e.shape != g.shape or not np.array_equal(e, g):  # strings: equal or not
            return False, float("inf")
    return compare_outputs([e for e, _ in numeric], [g for _, g in numeric], rtol, atol)


def _apply_folded(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """``apply_plan_onnx``, then the shape patches folded into their ``Concat`` constants
    (``passes/onnx_fold_patches.py``: ORT's fusions see the shapes again); every trial, check
    and verify of the safety net runs on this final form."""
    return fold_shape_patches(apply_plan_onnx(model, plan)).model


def prune_onnx(model_or_path: Any, ratio: float | None = None,
               importance: str | Criterion = "l2",
               round_to: int | str | None = "auto", allow_lossy: bool = False,
               ignore: Iterable[str] = (), global_pruning: bool = False,
               input_shapes: Mapping[str, Sequence[int]] | None = None, verify: bool = False,
               output_path: str | os.PathLike[str] | None = None, reduction: str = "sum",
               normalization: str = "mean", min_units: int = 1,
               target_latency: float | None = None) -> OnnxPruneResult:
    """Remove the least important ``ratio`` (default 0.5) of units in every exact channel
    group of an ONNX model. The input is not modified; ``output_path`` also writes the pruned
    model atomically (with external data when the input had it). ``ignore`` names initializers
    or nodes whose groups stay whole.

    ``target_latency`` instead of ``ratio``: the estimated ONNX Runtime CPU latency to reach,
    as a fraction of the input model's; the ratio is the smallest whose selection meets it
    (``passes/latency.py``)."""
    check_target_latency(target_latency, ratio=ratio is not None)
    if ratio is None:
        ratio = 0.0 if target_latency is not None else 0.5
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise InputError(f"ratio must be in [0, 1), got {ratio!r}")
    if round_to is not None and round_to != "auto" and (
            not isinstance(round_to, int) or round_to < 1):
        raise InputError(f"round_to must be a positive integer or 'auto', got {round_to!r}")
    criterion = get_criterion(importance)
    timer = StageTimer()
    # by path: large external tensors stay on disk until the apply and the save read them
    given, external = timer.run("load", load_model, model_or_path, True)
    _check_deterministic(given)
    # the exporter's deduplicated zero biases / unit norm weights, one per layer again
    model, untied = timer.run("untie", untie_shared_vectors, given)
    graph = timer.run("lower", from_onnx, model, input_shapes)
    analysis = timer.run("group_channels", group_channels, graph)
    skip = _ignored_groups(analysis, model, ignore)
    ctx = ScoreContext(_ParamTensors(model, analysis), reduction=reduction)
    scores = timer.run("importance", lambda: {
        g.id: normalize(np.asarray(criterion(g, ctx), dtype=np.float64), normalization)
        for g in analysis.groups if g.prunable and g.size > 1})
    # "auto": a round_to per group for ONNX Runtime's CPU kernels (passes/kernel_widths.py)
    widths = ort_cpu_widths(analysis) if round_to == "auto" else round_to

    def reselect(pinned: set[int]) -> dict[int, np.ndarray]:
        return select_units(analysis, scores, ratio, widths, global_pruning, allow_lossy,
                            skip | pinned, None, min_units, target_latency)

    removed = timer.run("select", reselect, set())
    meta = {"ratio": None if target_latency is not None else ratio,
            "target_latency": target_latency, "importance": getattr(criterion, "__name__", str(importance)),
            "round_to": ORT_ROUND_TO if round_to == "auto" else round_to,
            "widths": "ort-cpu" if round_to == "auto" else "uniform",
            "global_pruning": global_pruning, "allow_lossy": allow_lossy,
            "tracer": "onnx", "onnx": onnx.__version__,
            "input_shapes": {n: list(graph.values[n].shape or ()) for n in graph.inputs}}
    # the safety net (passes/repair.py): the plan must check and run under ONNX Runtime
    lossy = frozenset(g.id for g in analysis.groups if g.is_lossy) if allow_lossy \
        else frozenset()
    macs = count_macs(graph, lambda v: graph.values[v].shape)
    feeds, blind = _finite_feeds(model, analysis) if verify or macs <= ORT_TRIAL_MACS \
        else (_feeds(model, analysis), None)
    # the net applies to and verifies against the untied form (the plan's tensor names are
    # its own, so neither the apply nor the reference unties again: no copy of the weights per
    # trial); copies the plan left equal to their source are shared again after each apply.
    # ``apply_plan_onnx(given, plan)`` unties the same way and gives the same model

    def apply(m: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
        return retie(_apply_folded(m, plan), untied)

    net = OnnxNet(model, analysis, feeds, apply, _run, verify_onnx, meta,
                  dynamic_batch=_dynamic_batch(model), exclude_exact=lossy,
                  use_ort=verify or macs <= ORT_TRIAL_MACS)
    if blind:
        net.notes.append(blind)
    if untied:
        net.notes.append(f"{len(untied)} per-channel vector(s) the exporter had deduplicated "
                         "across layers were given one copy per reader (e.g. "
                         f"'{next(iter(untied))}'), so layers that only shared such a vector "
                         "prune independently (readers that share weights stay coupled "
                         "through them, and copies left equal are shared again)")
    quantized = [n.op_type for n in model.graph.node
                 if n.op_type in ("QuantizeLinear", "DequantizeLinear") or
                 n.op_type in QUANTIZED_OPS]
    if quantized:
        kinds = ", ".join(sorted(set(quantized)))
        net.notes.append(f"the model is already quantized ({len(quantized)} {kinds} nodes): "
                         "the channels they touch stay whole; prune the float model, then "
                         "quantize (secateurs optimize --prune R --quantize int8)")
    if not net.use_ort:
        net.notes.append(f"checked by strict shape inference only ({macs / 1e9:.2f} GMACs; "
                         "verify=True also runs the pruned model under ONNX Runtime)")
    repairs: dict[int, Repair] = {}

    removed = timer.run("check", repair, removed, reselect,
                        net.both if verify and lossy else net.runs, repairs, net.candidates,
                        _describe(analysis))
    plan, pruned = timer.run("apply", net.applied, removed)
    ok, diff = None, None
    if verify and lossy & set(removed):
        ok, diff = True, net.last_diff
    elif verify:
        ok, diff = timer.run("verify", verify_onnx, model, pruned, plan, feeds)
        if not ok:  # the net, numerically
            removed = timer.run("repair", repair, removed, reselect, net.both, repairs,
                                net.candidates, _describe(analysis))
            plan, pruned = timer.run("apply", net.applied, removed)
            ok, diff = timer.run("verify", verify_onnx, model, pruned, plan, feeds)
    if target_latency is not None:
        net.notes.append(latency_note(analysis, removed, target_latency))
    report = _report(analysis, removed, given, pruned, timer.seconds, repairs)
    report = dataclasses.replace(report, exact=ok, max_abs_diff=diff, notes=tuple(net.notes))
    conclude(report, verify, ok, diff, log, "prune_onnx",
             "mask-equivalence check under ONNX Runtime")
    result = OnnxPruneResult(pruned, plan, report, analysis, external)
    if output_path is not None:
        timer.run("save", result.save, output_path)
    log.info("pruned ONNX: MACs kept %.1f%%, params kept %.1f%%", 100 * report.macs_kept,
             100 * report.params_kept)
    return result
