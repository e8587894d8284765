"""Which channel widths keep ONNX Runtime's CPU convolution on its fast path?

ONNX Runtime's CPU provider rewrites Conv to its blocked ``com.microsoft.nchwc`` layout (MLAS
NCHWc kernels) at graph optimisation level ``all`` when channel counts suit the machine's block
size (8 floats for AVX2, 16 for AVX-512); other widths run the generic im2col + GEMM path. A
pruner that rounds widths to a multiple of that block keeps the fast path.

This script measures a 3x3, stride 1, pad 1 convolution with C_in = C_out = w at 28x28 for
w = 48..80, reports GFLOP-equivalent throughput (MAC/s) per width, whether ORT's optimised
graph used the NCHWc Conv, and for each candidate multiple (1, 2, 4, 8, 16, 32) the median
throughput of widths that are / are not multiples of it. All widths of one configuration are
timed interleaved (one run of each width per round) so machine noise hits them equally.

    python tools/bench/ort_rounding.py [--repeats 40] [--out tools/bench/results/ort_rounding.json]
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

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from secateurs.runtime.io import atomic_write_bytes  # noqa: E402

MULTIPLES = (1, 2, 4, 8, 16, 32)


def conv_model(width: int, hw: int = 28, seed: int = 0) -> onnx.ModelProto:
    """A single 3x3 Conv(w -> w) + bias with a symbolic batch dim."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((width, width, 3, 3)).astype(np.float32) * 0.05,
                                "conv.weight")
    b = numpy_helper.from_array(np.zeros(width, np.float32), "conv.bias")
    node = helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["y"],
                            kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], f"conv{width}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width, hw, hw])],
        [w, b])
    # onnx 1.23 defaults to IR version 14, which onnxruntime 1.31 rejects (max 13).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def session(model: onnx.ModelProto, threads: int) -> tuple[ort.InferenceSession, bool]:
    """A CPU session at optimisation level ALL, and whether ORT chose the NCHWc Conv."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # ORT warns that NCHWc graphs are machine-specific: we know
    # interleaved sessions: idle workers must not spin on the running one's cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as tmp:
        opt_path = os.path.join(tmp, "optimized.onnx")
        opts.optimized_model_filepath = opt_path
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        optimized = onnx.load(opt_path)
    nchwc = any(n.op_type == "Conv" and n.domain == "com.microsoft.nchwc"
                for n in optimized.graph.node)
    return sess, nchwc


def measure(widths: list[int], batch: int, threads: int, repeats: int, warmup: int,
            hw: int = 28) -> list[dict]:
    sessions = []
    for w in widths:
        sess, nchwc = session(conv_model(w, hw), threads)
        x = np.random.default_rng(1).standard_normal((batch, w, hw, hw)).astype(np.float32)
        sessions.append((w, sess, {"x": x}, nchwc))
    for _ in range(warmup):
        for _, sess, feed, _ in sessions:
            sess.run(None, feed)
    times: dict[int, list[float]] = {w: [] for w in widths}
    n = len(sessions)
    for r in range(repeats):
        for k in range(n):
            w, sess, feed, _ = sessions[(k + r) % n]
            start = time.perf_counter()
            sess.run(None, feed)
            times[w].append(time.perf_counter() - start)
    rows = []
    for w, _, _, nchwc in sessions:
        macs = batch * w * w * 9 * hw * hw
        p50 = statistics.median(times[w])
        rows.append({"width": w, "batch": batch, "threads": threads, "macs": macs,
                     "p50_ms": p50 * 1e3, "ns_per_kmac": p50 * 1e9 / (macs / 1e3),
                     "gmac_per_s": macs / p50 / 1e9, "nchwc": nchwc})
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per multiple: median MAC/s of widths divisible by it vs not; fast widths."""
    best = max(r["gmac_per_s"] for r in rows)
    fast = [r["width"] for r in rows if r["gmac_per_s"] >= 0.8 * best]
    per_multiple = {}
    for m in MULTIPLES:
        on = [r["gmac_per_s"] for r in rows if r["width"] % m == 0]
        off = [r["gmac_per_s"] for r in rows if r["width"] % m != 0]
        per_multiple[str(m)] = {
            "median_gmac_s_multiple": statistics.median(on) if on else None,
            "median_gmac_s_other": statistics.median(off) if off else None,
            "ratio": (statistics.median(on) / statistics.median(off)) if on and off else None,
            "all_multiples_fast": all(r["width"] in fast for r in rows if r["width"] % m == 0),
        }
    return {"best_gmac_s": best, "fast_widths (>=80% of best)": fast,
            "nchwc_widths": [r["width"] for r in rows if r["nchwc"]],
            "per_multiple": per_multiple}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-width", type=int, default=48)
    parser.add_argument("--max-width", type=int, default=80)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="tools/bench/results/ort_rounding.json")
    args = parser.parse_args(argv)
    widths = list(range(args.min_width, args.max_width + 1))
    configs = []
    for t in args.threads:
        for b in args.batch:
            print(f"threads={t} batch={b}: {len(widths)} widths x {args.repeats} rounds",
                  file=sys.stderr)
            rows = measure(widths, b, t, args.repeats, args.warmup)
            summary = summarise(rows)
            configs.append({"threads": t, "batch": b, "rows": rows, "summary": summary})
            print(f"  NCHWc Conv at widths {summary['nchwc_widths']}", file=sys.stderr)
            for m, s in summary["per_multiple"].items():
                if s["ratio"] is not None:
                    print(f"  multiple of {m:>2}: {s['median_gmac_s_multiple']:.1f} vs "
                          f"{s['median_gmac_s_other']:.1f} GMAC/s (x{s['ratio']:.2f})",
                          file=sys.stderr)
    result = {
        "benchmark": "ort_rounding",
        "conv": "3x3 stride 1 pad 1, C_in = C_out = width, 28x28, fp32",
        "onnxruntime": ort.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "configs": configs,
    }
    atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
