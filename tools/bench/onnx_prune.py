"""ONNX in, ONNX out: does structured pruning turn MAC reduction into ORT CPU speed?

(1) ResNet-50 (``zoo:resnet50_full``) and ViT-S/16 (``zoo:vit_s_full``) are exported to ONNX
(TorchScript exporter, opset 17, dynamic batch) and pruned with ``prune_onnx`` to about 2x and
4x fewer MACs (the ratio is searched), with the default ``round_to`` (16, ORT's NCHWc block on
AVX-512) and, at 2x, with ``round_to=1`` for contrast. Dense and pruned models run in ONNX
Runtime (CPU, ORT_ENABLE_ALL) at batch 1 and 16 with 1 and 2 intra-op threads; all models of
one configuration are timed interleaved (one run of each per round) so machine noise hits them
alike. Reported: median latency, speedup, MAC reduction and their ratio (efficiency; 1.0 means
the runtime turns every removed MAC into time).

(2) Side by side with onnxsim's ``apply_structured_pruning`` (if installed) at the same
ratio: MACs removed, whether the result runs, its max |diff| from the dense model next to
ours, and wall time. Ours is also checked for mask-equivalence (``verify=True``).

    python tools/bench/onnx_prune.py [--rounds 7] [--models resnet50_full,vit_s_full]
        [--out tools/bench/results/onnx_prune.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from machine import cpu_info  # noqa: E402  (tools/bench/machine.py)

from secateurs import zoo  # noqa: E402
from secateurs.graph.from_onnx import from_onnx  # noqa: E402
from secateurs.passes.cost import count_macs  # noqa: E402
from secateurs.passes.prune_onnx import ORT_ROUND_TO, prune_onnx  # noqa: E402
from secateurs.runtime.io import atomic_write_bytes  # noqa: E402

SHAPE = {"x": [1, 3, 224, 224]}


def export(name: str, directory: Path) -> onnx.ModelProto:
    entry = zoo.get(name)
    model, inputs = entry.build(), entry.example_inputs()
    path = directory / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load(str(path))


def macs(model: onnx.ModelProto) -> int:
    graph = from_onnx(model, SHAPE)
    return count_macs(graph, lambda v: graph.values[v].shape)


def prune_to(model: onnx.ModelProto, reduction: float, round_to: int) -> tuple[Any, float]:
    """Search the ratio that gives about ``reduction``x fewer MACs (secant steps on log MACs)."""
    target = 1.0 / reduction
    lo, hi = 0.0, 0.9
    best = None
    for _ in range(7):
        ratio = (lo + hi) / 2
        result = prune_onnx(model, ratio=ratio, round_to=round_to, input_shapes=SHAPE)
        kept = result.report.macs_kept
        if best is None or abs(kept - target) < abs(best[0].report.macs_kept - target):
            best = (result, ratio)
        if abs(kept - target) < 0.02:
            break
        lo, hi = (ratio, hi) if kept > target else (lo, ratio)
    assert best is not None
    return best


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def interleaved_stats(models: dict[str, onnx.ModelProto], batch: int, threads: int,
                      rounds: int) -> dict[str, Any]:
    """Per model the ``LatencyStats`` (ms) of ``rounds`` interleaved runs on one random input
    (``secateurs.runtime.ort.compare``: one warm-up, the order rotated every round)."""
    from secateurs.runtime.ort import compare

    keys = list(models)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    table = compare(models[keys[0]], [models[k] for k in keys[1:]], inputs={"x": x},
                    threads=[threads], batch=[batch], warmup=1, repeats=rounds, names=keys)
    return {row.model: row.stats for row in table.rows}


def time_interleaved(models: dict[str, onnx.ModelProto], batch: int, threads: int,
                     rounds: int) -> dict[str, float]:
    """Median ms per model, interleaved (:func:`interleaved_stats`)."""
    return {k: st.p50 for k, st in interleaved_stats(models, batch, threads, rounds).items()}


def compare_onnxsim(name: str, dense: onnx.ModelProto, ratio: float) -> dict[str, Any]:
    try:
        import onnxsim
        from onnxsim import apply_structured_pruning
    except ImportError as exc:
        return {"skipped": f"onnxsim not installed ({exc}); pip install 'onnxsim>=0.8.1'"}
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = session(dense, 2).run(None, {"x": x})[0]
    out: dict[str, Any] = {"onnxsim": onnxsim.__version__, "ratio": ratio}
    t0 = time.perf_counter()
    try:
        theirs = apply_structured_pruning(dense, sparsity=ratio)
        out["onnxsim_seconds"] = time.perf_counter() - t0
        out["onnxsim_macs_kept"] = macs(theirs) / macs(dense)
        got = session(theirs, 2).run(None, {"x": x})[0]
        out["onnxsim_runs"] = True
        out["onnxsim_max_abs_diff_vs_dense"] = float(np.abs(got - ref).max())
    except Exception as exc:  # noqa: BLE001 - report whatever the other tool does
        out["onnxsim_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    t0 = time.perf_counter()
    ours = prune_onnx(dense, ratio=ratio, round_to=1, input_shapes=SHAPE, verify=True)
    out["secateurs_seconds"] = time.perf_counter() - t0
    out["secateurs_macs_kept"] = ours.report.macs_kept
    out["secateurs_mask_equivalent"] = ours.report.exact
    got = session(ours.model, 2).run(None, {"x": x})[0]
    out["secateurs_max_abs_diff_vs_dense"] = float(np.abs(got - ref).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="resnet50_full,vit_s_full")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", default="tools/bench/results/onnx_prune.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "cpu": cpu_info(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                    "default_round_to": ORT_ROUND_TO},
        "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            dense = export(name, Path(tmp))
            entry: dict[str, Any] = {"macs_dense": macs(dense), "variants": {}, "timings": []}
            variants = {"dense": dense}
            for reduction, round_to in ((2.0, ORT_ROUND_TO), (4.0, ORT_ROUND_TO), (2.0, 1)):
                key = f"{reduction:g}x_round{round_to}"
                t0 = time.perf_counter()
                result, ratio = prune_to(dense, reduction, round_to)
                entry["variants"][key] = {
                    "ratio": ratio, "round_to": round_to, "macs_kept": result.report.macs_kept,
                    "mac_reduction": 1 / result.report.macs_kept,
                    "params_kept": result.report.params_kept,
                    "search_seconds": time.perf_counter() - t0}
                variants[key] = result.model
                print(name, key, entry["variants"][key], flush=True)
            for batch in (int(b) for b in args.batches.split(",")):
                for threads in (int(t) for t in args.threads.split(",")):
                    rounds = max(3, args.rounds // (4 if batch > 4 else 1))
                    ms = time_interleaved(variants, batch, threads, rounds)
                    row: dict[str, Any] = {"batch": batch, "threads": threads,
                                           "rounds": rounds, "ms": ms}
                    for key, v in entry["variants"].items():
                        speedup = ms["dense"] / ms[key]
                        row[f"{key}_speedup"] = speedup
                        row[f"{key}_efficiency"] = speedup / v["mac_reduction"]
                    entry["timings"].append(row)
                    print(name, json.dumps(row), flush=True)
            entry["onnxsim"] = compare_onnxsim(name, dense, entry["variants"]["2x_round16"]
                                               ["ratio"])
            print(name, entry["onnxsim"], flush=True)
            results["models"][name] = entry
    text = json.dumps(results, indent=2, sort_keys=True)
    atomic_write_bytes(args.out, text.encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
