"""Prune -> (sparsify) -> quantize -> ONNX Runtime CPU: size and latency per stage, side by side.

For ResNet-50 (``zoo:resnet50_full``) and ViT-S/16 (``zoo:vit_s_full``), ``secateurs.optimize``
builds each variant (torch in, ONNX out; pruned with ``round_to=16``, INT8 QDQ with
per-channel weights, calibrated on 16 random-normal batches — the zoo has no data set, so the
accuracy question is answered by the digits demo, not here):

* ``dense``            the exported float32 model;
* ``dense+int8``       dense, INT8 QDQ (profile ``ort``: uint8 activations);
* ``p50``              ``prune=0.5`` (half the units of every exact group: ~26% of the MACs on
                       ResNet-50, since both ends of most convs shrink);
* ``p50+int8``         ``prune=0.5`` + INT8 QDQ, profile ``ort``      (the deployment artifact);
* ``p50+int8-trt``     ``prune=0.5`` + INT8 QDQ, profile ``tensorrt`` (symmetric int8);
* ``p50+int8-qop``     ``prune=0.5`` + INT8 QOperator (``QLinearConv`` written out; a control
                       for whether ORT's QDQ fusion loses anything);
* ``m50``, ``m50+int8`` ``target_macs=0.5`` and the same + INT8 QDQ.

Then every variant of one model runs in ONE interleaved loop (``runtime.ort.compare``: fresh
sessions, 1 intra-op thread, batch 1, ORT_ENABLE_ALL, the order rotated each round), ``--rounds``
times; the reported latency is the median of the per-round medians, ratios against ``dense``
from the same rounds. Size is the serialized model (= the file on disk).

    python tools/bench/optimize_pipeline.py [--models resnet50_full,vit_s_full] [--repeats 20]
        [--rounds 3] [--threads 1] [--out tools/bench/results/optimize_pipeline.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_info  # noqa: E402

from secateurs import zoo  # noqa: E402
from secateurs.passes.optimize import optimize  # noqa: E402
from secateurs.runtime.io import atomic_write_bytes  # noqa: E402
from secateurs.runtime.ort import compare  # noqa: E402


def calibration(shape: tuple[int, ...], n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, *shape[1:])).astype(np.float32)}


def qoperator(model: onnx.ModelProto, samples: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The same quantization written as QOperator (QLinearConv ...), for comparison only."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from secateurs.passes.quantize import BatchReader, calibration_batches

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # quant_pre_process moves a ModelProto's tensors to external data
    with tempfile.TemporaryDirectory() as tmp:
        quant_pre_process(copy, f"{tmp}/pre.onnx", skip_symbolic_shape=True)
        quantize_static(f"{tmp}/pre.onnx", f"{tmp}/q.onnx",
                        BatchReader(calibration_batches(model, samples)),
                        quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(f"{tmp}/q.onnx")


def fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its optimisations)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = f"{tmp}/opt.onnx"
        opts.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(f"{tmp}/opt.onnx").graph.node)
    keep = ("Conv", "QLinearConv", "FusedConv", "QLinearMatMul", "MatMul", "MatMulInteger",
            "FusedMatMul", "QuantizeLinear", "DequantizeLinear", "Gemm", "QGemm")
    return {k: v for k, v in sorted(ops.items()) if k in keep}


def build_variants(name: str, say: Any) -> tuple[dict[str, onnx.ModelProto], dict[str, Any]]:
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    cal = calibration(tuple(x[0].shape) if isinstance(x, tuple) else tuple(x.shape))
    common = dict(measure=False, calibration=cal)
    variants: dict[str, onnx.ModelProto] = {}
    info: dict[str, Any] = {}

    def run(label: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        res = optimize(model, x, **{**common, **kw})
        say(f"  {label}: built in {time.perf_counter() - t0:.1f} s")
        info[label] = {"seconds": res.seconds,
                       "stages": [r.to_dict() for r in res.stages]}
        return res

    res = run("dense+int8", quantize="int8")
    variants["dense"], variants["dense+int8"] = res.models["input"], res.models["quantize"]
    res = run("p50+int8", prune=0.5, quantize="int8")
    variants["p50"], variants["p50+int8"] = res.models["prune"], res.models["quantize"]
    res = run("p50+int8-trt", prune=0.5, quantize="int8", profile="tensorrt")
    variants["p50+int8-trt"] = res.models["quantize"]
    variants["p50+int8-qop"] = qoperator(variants["p50"], cal)
    res = run("m50+int8", target_macs=0.5, quantize="int8")
    variants["m50"], variants["m50+int8"] = res.models["prune"], res.models["quantize"]
    return variants, info


def measure(variants: dict[str, onnx.ModelProto], x: np.ndarray, threads: int, repeats: int,
            rounds: int) -> dict[str, Any]:
    names = list(variants)
    blobs = [variants[n].SerializeToString() for n in names]
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        table = compare(blobs[0], blobs[1:], inputs={"x": x}, threads=(threads,), batch=(1,),
                        warmup=3, repeats=repeats, names=names)
        for row in table.rows:
            per_round[row.model].append(row.stats.p50)
    med = {n: statistics.median(v) for n, v in per_round.items()}
    return {"latency_ms": med, "per_round_ms": per_round}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50_full,vit_s_full")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "optimize_pipeline.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "machine": {"cpu": cpu_info(),
                    "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                    "torch": torch.__version__, "threads": args.threads, "batch": 1},
        "method": __doc__, "models": {}}
    for name in args.models.split(","):
        say(f"{name}: building variants")
        variants, info = build_variants(name, say)
        x = zoo.get(name).example_inputs()
        x = (x[0] if isinstance(x, tuple) else x).numpy()
        say(f"{name}: measuring {len(variants)} variants interleaved")
        timing = measure(variants, x, args.threads, args.repeats, args.rounds)
        dense_ms = timing["latency_ms"]["dense"]
        dense_b = variants["dense"].ByteSize()
        rows = {}
        for label, m in variants.items():
            ms = timing["latency_ms"][label]
            rows[label] = {"bytes": m.ByteSize(), "size_ratio": dense_b / m.ByteSize(),
                           "latency_ms": ms, "speedup": dense_ms / ms,
                           "ort_ops": fused_ops(m)}
            say(f"  {label:<14} {m.ByteSize() / 1e6:8.2f} MB {dense_b / m.ByteSize():6.2f}x "
                f"smaller {ms:8.2f} ms {dense_ms / ms:6.2f}x faster")
        results["models"][name] = {"variants": rows, "per_round_ms": timing["per_round_ms"],
                                   "pipeline": info}
    atomic_write_bytes(args.out, (json.dumps(results, indent=2, default=str) + "\n").encode())
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
