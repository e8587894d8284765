"""ONNX Runtime sessions, latency benchmarks and dense-vs-pruned comparisons.

Measurement rules, because a speedup is a ratio of two noisy numbers:

* latencies are wall-clock per ``run`` call (``time.perf_counter``), after warm-up runs;
  p50/p90/p99 are nearest-rank percentiles of the per-run times;
* ``compare`` runs every model of a configuration *interleaved* in one loop (dense, pruned,
  dense, pruned, ... with the order rotated each round), so frequency scaling, other processes
  and thermal drift hit all models equally instead of whichever happened to run second;
* at more than one thread ``compare`` keeps one session alive at a time: after a run, ONNX
  Runtime's intra-op workers busy-wait for the next parallel section
  (``session.intra_op.allow_spinning``, on by default), so interleaved live sessions' idle
  workers take the running one's cores. Measured on a 2-core machine: ResNet-50 at 2 threads
  ran 28 ms alone and 55 ms among four live interleaved sessions (slower than 1 thread's 52
  ms). Turning spinning off cures that but charges every parallel op a thread wake-up, which
  costs a small model most (MobileNetV2 at 2 threads: 3.1 ms spinning, 4.3 ms not; a pruned
  one 1.6 / 2.5 ms) and so understates pruning's speedup. Instead each model runs in blocks of
  consecutive runs, each block in a fresh session (spinning, as deployed) that is closed
  before the next model's block; the blocks rotate like single runs do;
* ``peak_rss_mb`` is the process's peak resident set (``getrusage``); it is a high-water mark
  for the whole process, so only its growth between benchmarks is attributable to one model.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secateurs.errors import InputError

__all__ = [
    "OrtSession",
    "LatencyStats",
    "CompareRow",
    "CompareTable",
    "compare",
    "default_providers",
    "random_inputs",
]

_log = logging.getLogger(__name__)

ModelLike = Any  # str | os.PathLike | bytes | onnx.ModelProto
Inputs = Any  # Mapping[str, array] | Sequence[array] | array; arrays numpy or torch

# ONNX Runtime's type strings -> numpy dtypes, for input checks and random inputs.
_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}

_OPT_LEVELS = ("disable", "basic", "extended", "all")

_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def default_providers() -> list[str]:
    """TensorRT and CUDA execution providers when this onnxruntime build has them, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in _PREFERRED_PROVIDERS if p in available] + ["CPUExecutionProvider"]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model at one configuration; times in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    throughput: float  # samples (batch items) per second: batch / mean latency
    peak_rss_mb: float
    batch: int = 1
    repeats: int = 0
    min: float = 0.0
    p10: float = 0.0  # on a shared machine, closer to the uncontended time than p50

    @classmethod
    def from_times(cls, times_s: Sequence[float], batch: int) -> LatencyStats:
        """Summarise per-run wall-clock times (seconds)."""
        if not times_s:
            raise InputError("LatencyStats.from_times: no timings (repeats must be >= 1)")
        ms = np.sort(np.asarray(times_s, dtype=np.float64) * 1e3)
        mean = float(ms.mean())
        return cls(
            p50=_percentile(ms, 50), p90=_percentile(ms, 90), p99=_percentile(ms, 99),
            mean=mean, throughput=batch / (mean / 1e3), peak_rss_mb=peak_rss_mb(),
            batch=batch, repeats=len(ms), min=float(ms[0]), p10=_percentile(ms, 10),
        )


def _percentile(sorted_ms: np.ndarray, q: float) -> float:
    """Nearest-rank percentile: a value that was actually measured, monotone in q."""
    rank = max(int(np.ceil(q / 100.0 * len(sorted_ms))), 1)
    return float(sorted_ms[rank - 1])


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (0.0 where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_torch_cuda(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and getattr(value, "is_cuda", False)


class OrtSession:
    """An ``onnxruntime.InferenceSession`` with checked inputs, IO binding and benchmarking.

    ``model``: path, serialized bytes or ``onnx.ModelProto``. ``providers``: ``None`` picks
    TensorRT/CUDA when present, else CPU (see ``default_providers``). ``intra_op_threads`` /
    ``inter_op_threads``: ``None`` lets ONNX Runtime choose. ``graph_optimization``: one of
    ``disable``, ``basic``, ``extended``, ``all``. ``spin``: whether idle worker threads
    busy-wait for the next run (ONNX Runtime's default, fastest for one session alone); turn
    it off where several sessions take turns on the same cores (``compare`` does).
    ``disabled_optimizers``: ONNX Runtime graph transformers not to run, by name (e.g.
    ``["SkipLayerNormFusion"]``: on ORT 1.32's x86 CPU provider a fused
    SkipLayerNormalization takes ~7x the time of the Add + LayerNormalization it replaces;
    ``tools/bench/latency_estimate.py``'s MiniLM row).
    """

    def __init__(
        self,
        model: ModelLike,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str = "all",
        sequential: bool = True,
        spin: bool = True,
        disabled_optimizers: Sequence[str] = (),
    ):
        import onnxruntime as ort

        if graph_optimization not in _OPT_LEVELS:
            raise InputError(f"graph_optimization must be one of {_OPT_LEVELS}, "
                             f"got {graph_optimization!r}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        if intra_op_threads is not None:
            opts.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            opts.inter_op_num_threads = int(inter_op_threads)
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if sequential
                               else ort.ExecutionMode.ORT_PARALLEL)
        self.providers = list(providers) if providers else default_providers()
        unknown = [p for p in self.providers if p not in ort.get_available_providers()]
        if unknown:
            raise InputError(f"execution provider(s) {unknown} are not available in this "
                             f"onnxruntime build; available: {ort.get_available_providers()}")
        self.source = _describe(model)
        blob = _model_bytes_or_path(model)
        try:
            extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers \
                else {}
            self._session = ort.InferenceSession(blob, sess_options=opts, providers=self.providers,
                                                 **extra)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise InputError(f"ONNX Runtime cannot load {self.source}: {exc}") from exc
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self._inputs = self._session.get_inputs()
        self._outputs = self._session.get_outputs()

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession``."""
        return self._session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._outputs]

    def describe_inputs(self) -> str:
        """``x: float32[batch, 3, 224, 224]`` for every input, for error messages."""
        return ", ".join(
            f"{i.name}: {np.dtype(_ORT_DTYPES.get(i.type, np.float32)).name}"
            f"{[d if d is not None else '?' for d in i.shape]}"
            for i in self._inputs
        )

    def feeds(self, inputs: Inputs) -> dict[str, Any]:
        """Map ``inputs`` (dict by name, tuple by position, or one array) to checked feeds.

        Values stay what they are (numpy or torch); see ``run`` for conversion.
        """
        expected = self.input_names
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in expected]
            missing = [k for k in expected if k not in inputs]
            if unknown or missing:
                raise InputError(
                    f"{self.source}: "
                    + (f"unknown input name(s) {unknown}; " if unknown else "")
                    + (f"missing input(s) {missing}; " if missing else "")
                    + f"the model expects {self.describe_inputs()}")
            feeds = dict(inputs)
        else:
            seq = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
            if len(seq) != len(expected):
                raise InputError(f"{self.source}: got {len(seq)} positional input(s), the model "
                                 f"expects {len(expected)}: {self.describe_inputs()}")
            feeds = dict(zip(expected, seq))
        for meta in self._inputs:
            self._check_value(meta, feeds[meta.name])
        return feeds

    def _check_value(self, meta: Any, value: Any) -> None:
        shape = tuple(value.shape)
        if len(shape) != len(meta.shape):
            raise InputError(f"{self.source}: input '{meta.name}' has rank {len(shape)} "
                             f"{list(shape)}; the model expects {self.describe_inputs()}")
        for got, want in zip(shape, meta.shape):
            if isinstance(want, int) and want != got:
                raise InputError(f"{self.source}: input '{meta.name}' has shape {list(shape)}; "
                                 f"the model expects {self.describe_inputs()}")

    def run(self, inputs: Inputs, output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run the model; inputs as numpy arrays or torch tensors; returns numpy arrays.

        Torch CUDA tensors on a CUDA session go through IO binding (no host round trip for the
        inputs); everything else is converted to numpy and cast to the declared input dtype.
        """
        feeds = self.feeds(inputs)
        names = list(output_names) if output_names else self.output_names
        if self._uses_cuda() and any(_is_torch_cuda(v) for v in feeds.values()):
            return self._run_io_binding(feeds, names)
        arrays = {}
        for meta in self._inputs:
            arr = _to_numpy(feeds[meta.name])
            want = _ORT_DTYPES.get(meta.type)
            if want is not None and arr.dtype != want:
                if not np.can_cast(arr.dtype, want, casting="same_kind"):
                    raise InputError(f"{self.source}: input '{meta.name}' has dtype {arr.dtype}; "
                                     f"the model expects {self.describe_inputs()}")
                arr = arr.astype(want)
            arrays[meta.name] = arr
        return self._session.run(names, arrays)

    def _uses_cuda(self) -> bool:
        return "CUDAExecutionProvider" in self._session.get_providers()

    def _run_io_binding(self, feeds: Mapping[str, Any], names: Sequence[str]) -> list[np.ndarray]:
        """Bind torch CUDA tensors' device memory directly (CUDA execution provider only)."""
        binding = self._session.io_binding()
        keep_alive = []
        for meta in self._inputs:
            value = feeds[meta.name]
            if not _is_torch_cuda(value):
                binding.bind_cpu_input(meta.name, _to_numpy(value))
                continue
            value = value.contiguous()
            keep_alive.append(value)
            binding.bind_input(
                name=meta.name, device_type="cuda", device_id=value.device.index or 0,
                element_type=_ORT_DTYPES.get(meta.type, np.float32),
                shape=tuple(value.shape), buffer_ptr=value.data_ptr(),
            )
        for name in names:
            binding.bind_output(name, "cuda")
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return list(binding.copy_outputs_to_cpu())

    def benchmark(self, inputs: Inputs, warmup: int = 10, repeats: int = 100) -> LatencyStats:
        """Time ``repeats`` runs after ``warmup`` runs; batch size is dim 0 of the first input."""
        if repeats < 1:
            raise InputError(f"benchmark: repeats must be >= 1, got {repeats}")
        feeds = self._prepared(inputs)
        for _ in range(max(warmup, 0)):
            self._session.run(None, feeds)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self._session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return LatencyStats.from_times(times, _batch_of(feeds))

    def _prepared(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """Checked numpy feeds, converted once so timing measures only the model."""
        feeds = self.feeds(inputs)
        out = {}
        for meta in self._inputs:
            arr = _to_numpy(feeds[meta.name])
            want = _ORT_DTYPES.get(meta.type)
            out[meta.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
        return out

    def random_inputs(self, batch: int = 1, dims: Mapping[str, int] | None = None,
                      seed: int = 0) -> dict[str, np.ndarray]:
        """Random feeds matching the model's inputs; see ``random_inputs``."""
        return random_inputs(self._inputs, batch=batch, dims=dims, seed=seed, source=self.source)


def _describe(model: ModelLike) -> str:
    if isinstance(model, (str, os.PathLike)):
        return f"model '{model}'"
    return "model"


def _model_bytes_or_path(model: ModelLike) -> str | bytes:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"ONNX model file not found: '{path}'")
        try:
            import onnx

            onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
            raise InputError(f"'{path}' is not a readable ONNX model: {exc}") from exc
        return str(path)
    if isinstance(model, bytes):
        return model
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    raise InputError(f"expected an ONNX path, bytes or onnx.ModelProto, got {type(model).__name__}")


def _batch_of(feeds: Mapping[str, np.ndarray]) -> int:
    for arr in feeds.values():
        if arr.ndim:
            return int(arr.shape[0])
    return 1


def random_inputs(input_metas: Sequence[Any], batch: int = 1,
                  dims: Mapping[str, int] | None = None, seed: int = 0,
                  source: str = "model") -> dict[str, np.ndarray]:
    """Random arrays for ONNX Runtime input metadata (``session.get_inputs()``).

    Dim 0 is the batch: a symbolic dim 0 becomes ``batch``; a fixed dim 0 that differs from
    ``batch`` is an error (the model was exported without ``dynamic_batch``). Other symbolic
    dims are looked up by name in ``dims``. Floats are standard normal, integers in [0, 2).
    """
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    out: dict[str, np.ndarray] = {}
    for meta in input_metas:
        shape = []
        for axis, d in enumerate(meta.shape):
            if axis == 0 and not isinstance(d, int):
                shape.append(batch)
            elif axis == 0 and d != batch:
                raise InputError(f"{source}: input '{meta.name}' has a fixed batch dim of {d}; "
                                 f"cannot run batch {batch}. Export with dynamic_batch=True or "
                                 f"use batch {d}.")
            elif isinstance(d, int):
                shape.append(d)
            elif d in dims:
                shape.append(int(dims[d]))
            else:
                raise InputError(f"{source}: input '{meta.name}' has symbolic dim {d!r} at axis "
                                 f"{axis}; give its size (dims={{{d!r}: N}}, CLI: --dim {d}=N)")
        dtype = _ORT_DTYPES.get(meta.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            out[meta.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[meta.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return out


@dataclass(frozen=True)
class CompareRow:
    """One model at one (threads, batch) configuration, with its ratios to the dense model."""

    model: str
    threads: int
    batch: int
    stats: LatencyStats
    speedup_p50: float  # dense p50 / this p50 (1.0 for the dense row)
    speedup_mean: float
    throughput_ratio: float  # this throughput / dense throughput


@dataclass(frozen=True)
class CompareTable:
    """Every model at every configuration; rows ordered by (threads, batch, model)."""

    rows: tuple[CompareRow, ...]
    models: tuple[str, ...]
    dense: str
    warmup: int
    repeats: int
    meta: dict[str, Any] = field(default_factory=dict)

    def ratio(self, model: str, threads: int, batch: int) -> float:
        """p50 speedup of ``model`` over dense at one configuration."""
        for r in self.rows:
            if (r.model, r.threads, r.batch) == (model, threads, batch):
                return r.speedup_p50
        raise KeyError((model, threads, batch))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense, "models": list(self.models), "warmup": self.warmup,
            "repeats": self.repeats, "meta": self.meta,
            "rows": [{**{k: v for k, v in asdict(r).items() if k != "stats"},
                      **{f"{k}": v for k, v in asdict(r.stats).items()}} for r in self.rows],
        }

    def to_text(self) -> str:
        """A fixed-width table: one line per model and configuration."""
        width = max([len(m) for m in self.models] + [5])
        head = (f"{'model':<{width}}  thr  batch   p50 ms   p90 ms   p99 ms   "
                f"items/s  speedup")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            s = r.stats
            lines.append(f"{r.model:<{width}}  {r.threads:>3}  {r.batch:>5}  {s.p50:>7.3f}  "
                         f"{s.p90:>7.3f}  {s.p99:>7.3f}  {s.throughput:>8.1f}  "
                         f"{r.speedup_p50:>6.2f}x")
        return "\n".join(lines)


def _names_for(models: Sequence[ModelLike]) -> list[str]:
    names = []
    for i, m in enumerate(models):
        base = Path(m).name if isinstance(m, (str, os.PathLike)) else f"model{i}"
        name = base if base not in names else f"{base}#{i}"
        names.append(name)
    return names


def compare(
    dense: ModelLike,
    pruned: ModelLike | Sequence[ModelLike],
    inputs: Inputs | Callable[[int], Inputs] | None = None,
    threads: Sequence[int] = (1, 2),
    batch: Sequence[int] = (1, 16),
    warmup: int = 5,
    repeats: int = 50,
    providers: Sequence[str] | None = ("CPUExecutionProvider",),
    dims: Mapping[str, int] | None = None,
    names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    disabled_optimizers: Sequence[str] = (),
    model_disabled_optimizers: Sequence[Sequence[str]] | None = None,
) -> CompareTable:
    """Latency of ``dense`` and each ``pruned`` model side by side, measured interleaved.

    ``inputs``: a callable ``batch -> inputs``; or inputs at any batch, which are repeated
    along dim 0 to each requested batch; or ``None`` for random inputs from the dense model's
    input metadata (symbolic dims other than batch from ``dims``). Every model gets the same
    inputs, so a pruned model must keep the dense model's input signature (channel pruning
    does: graph inputs are pinned). For each (threads, batch) every model gets a fresh
    session with that many intra-op threads, ``warmup`` runs each, then ``repeats`` rounds in
    which each model runs once, in an order rotated every round. At more than one thread,
    where idle sessions' spinning workers would take the running one's cores (see the module
    doc), only one session lives at a time: each model runs ``BLOCK_RUNS`` timed runs per
    block in a fresh session (``warmup`` runs first, at least one), blocks rotated the same way,
    until it has ``repeats`` timed runs. ``disabled_optimizers``: ONNX Runtime graph
    transformers every session skips (``OrtSession``; unknown names are ignored by ORT);
    ``model_disabled_optimizers``: one more list per model (dense first), so one model can be
    timed with and without a fusion side by side (pass it twice).
    """
    pruned_list = list(pruned) if isinstance(pruned, (list, tuple)) else [pruned]
    models = [dense, *pruned_list]
    labels = list(names) if names else _names_for(models)
    if len(labels) != len(models):
        raise InputError(f"compare: {len(labels)} names for {len(models)} models")
    if repeats < 1:
        raise InputError(f"compare: repeats must be >= 1, got {repeats}")
    per_model = [list(disabled_optimizers) + list(extra) for extra in
                 (model_disabled_optimizers or [()] * len(models))]
    if len(per_model) != len(models):
        raise InputError(f"compare: {len(per_model)} model_disabled_optimizers lists for "
                         f"{len(models)} models")
    blobs = [_model_bytes_or_path(m) for m in models]  # fail early on a bad path
    rows: list[CompareRow] = []
    for t in threads:
        for b in batch:
            if progress:
                progress(f"threads={t} batch={b}: {len(models)} models x {repeats} runs")
            def make(i: int, t: int = t) -> OrtSession:
                sess = OrtSession(blobs[i], providers=providers, intra_op_threads=t,
                                  inter_op_threads=1, disabled_optimizers=per_model[i])
                sess.source = f"model '{labels[i]}'"
                return sess

            first = make(0)
            feeds = _batch_inputs(first, inputs, b, dims)
            if t <= 1:
                sessions = [first, *(make(i) for i in range(1, len(blobs)))]
                prepared = [s._prepared(feeds) for s in sessions]
                stats = _interleaved(sessions, prepared, warmup, repeats, b)
                del sessions, prepared
            else:
                del first
                stats = _one_session_at_a_time(make, len(blobs), feeds, warmup, repeats, b)
            base = stats[0]
            for label, st in zip(labels, stats):
                rows.append(CompareRow(
                    model=label, threads=t, batch=b, stats=st,
                    speedup_p50=base.p50 / st.p50, speedup_mean=base.mean / st.mean,
                    throughput_ratio=st.throughput / base.throughput))
    return CompareTable(rows=tuple(rows), models=tuple(labels), dense=labels[0],
                        warmup=warmup, repeats=repeats,
                        meta={"cpu_count": os.cpu_count(), "providers": list(providers or [])})


def _batch_inputs(session: OrtSession, inputs: Any, batch: int,
                  dims: Mapping[str, int] | None) -> Any:
    if inputs is None:
        return session.random_inputs(batch=batch, dims=dims)
    if callable(inputs):
        return inputs(batch)
    feeds = session.feeds(inputs)
    return {k: _repeat_to_batch(_to_numpy(v), batch) for k, v in feeds.items()}


def _repeat_to_batch(arr: np.ndarray, batch: int) -> np.ndarray:
    if arr.ndim == 0 or arr.shape[0] == batch:
        return arr
    reps = -(-batch // arr.shape[0])
    return np.concatenate([arr] * reps, axis=0)[:batch]


BLOCK_RUNS = 10  # timed runs per session block at more than one thread (see ``compare``)


def _one_session_at_a_time(make: Callable[[int], OrtSession], n: int, feeds: Any, warmup: int,
                           repeats: int, batch: int) -> list[LatencyStats]:
    """``repeats`` timed runs per model in blocks of ``BLOCK_RUNS``, each block in a fresh
    session closed before the next block starts (no idle session spins on the cores)."""
    times: list[list[float]] = [[] for _ in range(n)]
    rounds = -(-repeats // BLOCK_RUNS)
    for r in range(rounds):
        for k in range(n):
            i = (k + r) % n
            sess = make(i)
            run, fed = sess.session.run, sess._prepared(feeds)
            for _ in range(max(warmup, 1)):  # the first run of a session allocates
                run(None, fed)
            for _ in range(min(BLOCK_RUNS, repeats - len(times[i]))):
                start = time.perf_counter()
                run(None, fed)
                times[i].append(time.perf_counter() - start)
            del sess, run  # joins the session's worker threads before the next block
    return [LatencyStats.from_times(ts, batch) for ts in times]


def _interleaved(sessions: Sequence[OrtSession], feeds: Sequence[dict[str, np.ndarray]],
                 warmup: int, repeats: int, batch: int) -> list[LatencyStats]:
    n = len(sessions)
    for _ in range(max(warmup, 0)):
        for s, f in zip(sessions, feeds):
            s.session.run(None, f)
    times: list[list[float]] = [[] for _ in range(n)]
    for r in range(repeats):
        for k in range(n):
            i = (k + r) % n  # rotate who goes first so no model always follows the same one
            start = time.perf_counter()
            sessions[i].session.run(None, feeds[i])
            times[i].append(time.perf_counter() - start)
    return [LatencyStats.from_times(ts, batch) for ts in times]

