"""Pruning that turns into speed: ORT CPU latency of dense vs ``prune_onnx(ratio=0.5)``, as
speedup divided by MAC reduction (1.0: every removed MAC became time).

Models at full size from the zoo (``resnet50_full``, ``mobilenetv2_full``, ``vit_s_full``;
ViT-S with ``allow_lossy=True``: hidden size too), exported with the TorchScript exporter
(opset 17), batch 1, ORT_ENABLE_ALL, 1 and 2 intra-op threads. All variants of one model and
thread count are timed interleaved (one run of each per round), medians. Variants: ``dense``;
``r16`` = the default selection (``round_to=16``); ``r1`` = no rounding; ``r64`` = coarser
rounding (for contrast).

    python tools/bench/latency_efficiency.py [--rounds 30] [--models ...] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_prune import SHAPE, export, macs, time_interleaved  # noqa: E402

from secateurs.passes.prune_onnx import prune_onnx  # noqa: E402
from secateurs.runtime.io import atomic_write_bytes  # noqa: E402

LOSSY = {"vit_s_full"}
VARIANTS: dict[str, dict[str, Any]] = {
    "r16": {"round_to": 16},
    "r1": {"round_to": 1},
    "r64": {"round_to": 64},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--models", default="resnet50_full,mobilenetv2_full,vit_s_full")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--variants", default="r16,r1,r64")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default="tools/bench/results/latency_efficiency.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "ratio": args.ratio, "batch": 1, "rounds": args.rounds, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            dense = export(name, Path(tmp))
            entry: dict[str, Any] = {"macs_dense": macs(dense), "variants": {}, "timings": []}
            models = {"dense": dense}
            for key in args.variants.split(","):
                kwargs = dict(VARIANTS[key])
                t0 = time.perf_counter()
                result = prune_onnx(dense, ratio=args.ratio, input_shapes=SHAPE,
                                    allow_lossy=name in LOSSY, **kwargs)
                entry["variants"][key] = {
                    **{k: str(v) for k, v in kwargs.items()},
                    "macs_kept": result.report.macs_kept,
                    "mac_reduction": 1 / result.report.macs_kept,
                    "params_kept": result.report.params_kept,
                    "prune_seconds": time.perf_counter() - t0}
                models[key] = result.model
                print(name, key, entry["variants"][key], flush=True)
            for threads in (int(t) for t in args.threads.split(",")):
                ms = time_interleaved(models, 1, threads, args.rounds)
                row: dict[str, Any] = {"threads": threads, "ms": ms}
                for key, v in entry["variants"].items():
                    speedup = ms["dense"] / ms[key]
                    row[f"{key}_speedup"] = speedup
                    row[f"{key}_efficiency"] = speedup / v["mac_reduction"]
                entry["timings"].append(row)
                print(name, json.dumps(row), flush=True)
            results["models"][name] = entry
    atomic_write_bytes(args.out, json.dumps(results, indent=2, sort_keys=True).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
