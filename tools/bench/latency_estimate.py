"""Pruning to a latency: is the latency asked for the latency measured?

``prune_onnx(target_latency=t)`` bisects the ratio until the estimated ONNX Runtime CPU latency
of the pruned model (``passes/latency.py``) is at most ``t`` of the dense model's. This bench
measures, per zoo model at full size (TorchScript export, opset 17, batch 1, ORT_ENABLE_ALL)
and per target, the latency fraction actually kept (pruned / dense medians, every variant timed
interleaved in one run: ``runtime.ort.compare``) at 1 and 2 intra-op threads, next to the
estimate and the MACs kept. ``abs_error`` is |measured - estimated| (fractions of the dense
latency). The estimate's rates are 1-thread rates; at 2 threads small ops scale worse than
large ones, so the measured fraction there is expected to sit above the estimate.

Also the absolute estimate of the dense model against its measured 1-thread median (only the
ratios between op kinds matter for a fraction; the absolute number says how far this machine
is from the one the rates were measured on).

    python tools/bench/latency_estimate.py [--rounds 30] [--targets 0.7,0.5,0.3]
        [--models resnet50_full,mobilenetv2_full,vit_s_full] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_prune import SHAPE, export, interleaved_stats  # noqa: E402

from secateurs.graph.from_onnx import from_onnx  # noqa: E402
from secateurs.passes.group_channels import group_channels  # noqa: E402
from secateurs.passes.latency import LatencyModel  # noqa: E402
from secateurs.passes.prune_onnx import prune_onnx  # noqa: E402
from secateurs.runtime.io import atomic_write_bytes  # noqa: E402

LOSSY = {"vit_s_full"}


def run_model(name: str, targets: list[float], threads: list[int], rounds: int,
              tmp: Path) -> dict[str, Any]:
    dense = export(name, tmp)
    estimate = LatencyModel(group_channels(from_onnx(dense, SHAPE)))
    dense_est = estimate.seconds()
    models: dict[str, onnx.ModelProto] = {"dense": dense}
    rows: dict[str, dict[str, Any]] = {}
    for t in targets:
        t0 = time.perf_counter()
        result = prune_onnx(dense, target_latency=t, input_shapes=SHAPE,
                            allow_lossy=name in LOSSY)
        seconds = time.perf_counter() - t0
        key = f"t{t:g}"
        models[key] = result.model
        pruned_est = LatencyModel(group_channels(from_onnx(result.model, SHAPE))).seconds()
        rows[key] = {"target": t, "estimated": pruned_est / dense_est,
                     "macs_kept": result.report.macs_kept,
                     "params_kept": result.report.params_kept, "prune_seconds": seconds}
        print(f"  {name} target {t:g}: estimated {pruned_est / dense_est:.3f}, MACs kept "
              f"{result.report.macs_kept:.3f} ({seconds:.1f} s)", flush=True)
    out: dict[str, Any] = {"dense_estimated_ms": dense_est * 1e3, "targets": rows}
    for n in threads:
        stats = interleaved_stats(models, 1, n, rounds)
        out[f"dense_ms_{n}t"] = stats["dense"].p50
        for key, row in rows.items():
            measured = stats[key].p50 / stats["dense"].p50
            row[f"measured_{n}t"] = measured
            row[f"abs_error_{n}t"] = abs(measured - row["estimated"])
            row[f"pruned_ms_{n}t"] = stats[key].p50
        print(f"  {name} {n} thread(s): dense {stats['dense'].p50:.2f} ms; " + ", ".join(
            f"{k} measured {r[f'measured_{n}t']:.3f}" for k, r in rows.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--targets", default="0.7,0.5,0.3")
    ap.add_argument("--models", default="resnet50_full,mobilenetv2_full,vit_s_full")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    la = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: run_model(name, targets, threads, args.rounds, Path(tmp))
                  for name in args.models.split(",")}
    summary = {}
    for n in threads:
        errors = [r[f"abs_error_{n}t"] for m in models.values() for r in m["targets"].values()]
        summary[f"{n}_threads"] = {"median_abs_error": statistics.median(errors),
                                   "max_abs_error": max(errors)}
    out = {"models": models, "summary": summary, "rounds": args.rounds, "batch": 1,
           "seconds": time.perf_counter() - t0, "load_start": list(la),
           "load_end": list(os.getloadavg()),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "onnx": onnx.__version__, "onnxruntime": ort.__version__}}
    path = Path(__file__).resolve().parent / "results" / "latency_estimate.json"
    atomic_write_bytes(path, (json.dumps(out, indent=2, sort_keys=True) + "\n").encode())
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
