"""Pruning that turns into speed: ORT CPU latency of dense vs ``prune_onnx(ratio=0.5)``, as
speedup divided by MAC reduction (efficiency; 1.0: every removed MAC became time, i.e. the
pruned model runs at the dense model's MAC rate).

Models at full size from the zoo (``resnet50_full``, ``mobilenetv2_full``, ``vit_s_full``;
ViT-S with ``allow_lossy=True``: hidden size too), exported with the TorchScript exporter
(opset 17), batch 1, ORT_ENABLE_ALL, 1 and 2 intra-op threads. Variants, all timed interleaved
(one run of each per round), medians:

* ``dense``;
* ``r16``: before this bench's fixes — ``round_to=16`` on every plain group and the plan applied
  by ``apply_plan_onnx`` alone (run-time shapes patched with ``Where``);
* ``r16_fold``: ``round_to=16`` through ``prune_onnx`` (shape patches folded,
  ``passes/onnx_fold_patches.py``);
* ``auto``: ``prune_onnx``'s default — the ORT CPU kernel-width policy
  (``passes/kernel_widths.py``) and the fold.

Per-op analysis (``per_op``, at each thread count): each variant runs under ORT's profiler in
the same interleaved loop; per node the median kernel time over the runs (robust to the
machine's noise bursts), summed per op kind, next to the kind's MAC ratio (``efficiency`` per
kind: MAC ratio / time ratio). ``at_dense_mac_rate`` is the model's efficiency if every MAC op
kind ran at exactly its dense MAC rate and the other ops took what they took: a profiled
efficiency below it is lost in the kernels; the gap between it and 1.0 is the mix — ops whose
time follows activations (linear in width), not MACs (quadratic): depthwise convs, elementwise,
norms, softmax. ``identical`` lists variants whose ONNX files are byte-identical: the spread of
their timings is the machine's noise. ``summary`` per model and thread count: ``efficiency``
(medians), ``efficiency_p10`` (10th percentiles: on a shared 2-vCPU machine the closer
estimate of uncontended time at 2 threads), ``profiled_efficiency``, ``at_dense_mac_rate`` (the
mix's ceiling) and ``kernel_efficiency`` (profiled / ceiling: how much of the speedup the op
mix allows the pruned kernels reach — the part the compiler's widths and lowering decide).

Attention under ``ratio=0.5`` keeps half its width as whole heads at their full head dim
(``select_units``' factored spaces), where earlier runs kept half the heads at half the head
dim (a quarter of the width).

``micro``: single-op models at the widths the policy chooses between (interleaved, medians).

    python tools/bench/latency_efficiency.py [--rounds 40] [--models ...] [--threads 1,2]
        [--profile-runs 30] [--no-micro]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
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
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_info  # noqa: E402
from onnx_prune import SHAPE, export, interleaved_stats, macs  # noqa: E402

from secateurs.graph.from_onnx import from_onnx  # noqa: E402
from secateurs.graph.onnx_apply import apply_plan_onnx  # noqa: E402
from secateurs.passes.prune_onnx import prune_onnx  # noqa: E402
from secateurs.runtime.io import atomic_write_bytes  # noqa: E402

LOSSY = {"vit_s_full"}
VARIANTS = ("r16", "r16_fold", "auto")
MAC_KINDS = ("conv_1x1", "conv_kxk", "conv_dw", "matmul_weight", "matmul_attention")


def load() -> dict[str, float | str]:
    la = os.getloadavg()
    return {"uptime": os.popen("uptime").read().strip(), "load1": la[0], "load5": la[1],
            "cpus": os.cpu_count() or 0}


def variants(name: str, dense: onnx.ModelProto, ratio: float) -> tuple[dict, dict]:
    lossy = name in LOSSY
    models: dict[str, onnx.ModelProto] = {"dense": dense}
    info: dict[str, Any] = {}
    for key in VARIANTS:
        t0 = time.perf_counter()
        result = prune_onnx(dense, ratio=ratio, input_shapes=SHAPE, allow_lossy=lossy,
                            round_to="auto" if key == "auto" else 16)
        seconds = time.perf_counter() - t0
        model = apply_plan_onnx(dense, result.plan) if key == "r16" else result.model
        models[key] = model
        info[key] = {"macs_kept": result.report.macs_kept,
                     "mac_reduction": 1 / result.report.macs_kept,
                     "params_kept": result.report.params_kept, "prune_seconds": seconds,
                     "onnx_nodes": len(model.graph.node)}
    return models, info


def time_interleaved(models: dict[str, onnx.ModelProto], threads: int,
                     rounds: int) -> dict[str, dict[str, float]]:
    """One run of each model per round; per model the median and the 10th percentile (ms).
    On a shared machine the low percentile is the closer estimate of uncontended time."""
    stats = interleaved_stats(models, 1, threads, rounds)
    return {"median": {k: st.p50 for k, st in stats.items()},
            "p10": {k: st.p10 for k, st in stats.items()}}


# ---------------------------------------------------------------- per-op profile


def node_kinds(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, int]]:
    """Every MAC op's kind, keyed by node name and by output name, and MACs per kind (shapes
    from ``from_onnx``'s shape propagation at the bench's input shape)."""
    graph = from_onnx(model, SHAPE)
    inits = {t.name for t in model.graph.initializer}
    kinds: dict[str, str] = {}
    total: dict[str, int] = collections.Counter()
    for n in graph.nodes:
        if n.op not in ("conv", "linear", "matmul"):
            continue
        out = graph.values[n.outputs[0]].shape
        ins = [graph.values[i].shape if i else None for i in n.inputs]
        if out is None or ins[0] is None or ins[1] is None:
            continue
        if n.op == "conv":
            w = ins[1]
            kind = ("conv_dw" if n.attrs.get("groups", 1) > 1
                    else "conv_1x1" if int(np.prod(w[2:])) == 1 else "conv_kxk")
            mac = int(np.prod(out)) * int(np.prod(w[1:]))
        else:
            kind = "matmul_weight" if n.op == "linear" or n.inputs[1] in inits \
                else "matmul_attention"
            mac = int(np.prod(out)) * int(ins[0][-1])
        kinds[n.name] = kind
        for o in n.outputs:
            kinds[o] = kind
        total[kind] += mac
    # fused activations and residual adds carry the conv's kind forward (NCHWc names)
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("Relu", "Clip", "Add") and n.output[0] not in kinds:
            for i in n.input:
                src = producer.get(i)
                if src is not None and src.output[0] in kinds:
                    kinds[n.output[0]] = kinds[src.output[0]]
                    break
    return kinds, dict(total)


def _kind(event: dict, kinds: dict[str, str]) -> str:
    op = event["args"]["op_name"]
    name = event["name"][: -len("_kernel_time")]
    if op not in ("Conv", "MatMul", "FusedMatMul", "Gemm", "FusedConv", "FusedGemm"):
        return op
    for cand in (name.removesuffix("_nchwc"), name.split("/MatMulScaleFusion")[0],
                 name.rsplit("/", 2)[0]):
        if cand in kinds:
            return kinds[cand]
    return op


def profile(models: dict[str, onnx.ModelProto], runs: int, tmp: Path,
            threads: int = 1) -> dict[str, Any]:
    """Per variant: per op kind, the sum over nodes of each node's median kernel time.

    At 1 thread the sessions stay open and run interleaved. At more, one session lives at a
    time (``runtime.ort.compare``'s rule: an idle session's spinning workers would take the
    running one's cores), each model's runs back to back."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)

    def make(key: str) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp / f"prof_{key}_{threads}")
        return ort.InferenceSession(models[key].SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])

    files: dict[str, str] = {}
    if threads <= 1:
        sessions = {key: make(key) for key in models}
        for s in sessions.values():
            s.run(None, {"x": x})
        for _ in range(runs):
            for s in sessions.values():
                s.run(None, {"x": x})
        files = {key: s.end_profiling() for key, s in sessions.items()}
        del sessions
    else:
        for key in models:
            s = make(key)
            for _ in range(runs + 1):
                s.run(None, {"x": x})
            files[key] = s.end_profiling()
            del s
    out: dict[str, Any] = {}
    for key, path in files.items():
        kinds, kind_macs = node_kinds(models[key])
        per_node: dict[str, list[float]] = collections.defaultdict(list)
        node_kind: dict[str, str] = {}
        with open(path) as f:
            events = json.load(f)
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            per_node[e["name"]].append(e["dur"])
            node_kind[e["name"]] = _kind(e, kinds)
        us: dict[str, float] = collections.Counter()
        for name, durs in per_node.items():
            us[node_kind[name]] += statistics.median(durs[1:] or durs)  # first: warm-up
        out[key] = {"us": dict(us), "macs": kind_macs}
    return out


def per_op(prof: dict[str, Any], macs_dense: int, info: dict[str, Any]) -> dict[str, Any]:
    dense = prof["dense"]
    t_dense = sum(dense["us"].values())
    result: dict[str, Any] = {"dense_us": t_dense, "variants": {}}
    for key in (k for k in prof if k != "dense"):
        mine = prof[key]
        t = sum(mine["us"].values())
        kinds = sorted(set(dense["us"]) | set(mine["us"]), key=lambda k: -dense["us"].get(k, 0))
        rows = {}
        ideal = 0.0
        for k in kinds:
            td, tp = dense["us"].get(k, 0.0), mine["us"].get(k, 0.0)
            row: dict[str, Any] = {"dense_us": round(td, 1), "pruned_us": round(tp, 1),
                                   "time_ratio": round(tp / td, 3) if td else None,
                                   "share_of_pruned": round(tp / t, 3) if t else None}
            if k in MAC_KINDS and dense["macs"].get(k):
                mr = mine["macs"].get(k, 0) / dense["macs"][k]
                row["mac_ratio"] = round(mr, 3)
                row["efficiency"] = round(mr / (tp / td), 3) if tp and td else None
                ideal += td * mr
            else:
                ideal += tp
            rows[k] = row
        reduction = info[key]["mac_reduction"]
        losers = sorted((k for k, r in rows.items() if r.get("efficiency") is not None),
                        key=lambda k: rows[k]["efficiency"])
        extra = sorted((k for k, r in rows.items() if "mac_ratio" not in r),
                       key=lambda k: -(rows[k]["pruned_us"]))
        result["variants"][key] = {
            "pruned_us": t, "speedup": t_dense / t if t else None,
            "efficiency": (t_dense / t) / reduction if t else None,
            "at_dense_mac_rate": (t_dense / ideal) / reduction if ideal else None,
            "mac_ops_worst_first": losers, "other_ops_by_time": extra[:6], "kinds": rows}
    return result


# ---------------------------------------------------------------- micro-benchmarks


def _model(nodes: list, inputs: dict[str, list[int]], inits: dict[str, np.ndarray]):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v)
                     for k, v in inputs.items()],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    return model, {k: rng.standard_normal(v).astype(np.float32) for k, v in inputs.items()}


def conv(cin: int, cout: int, hw: int, k: int = 1, group: int = 1):
    w = np.random.default_rng(1).standard_normal((cout, cin // group, k, k)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[k // 2] * 4, group=group),
             helper.make_node("Relu", ["c"], ["y"])]
    model, feed = _model(nodes, {"x": [1, cin, hw, hw]}, {"w": w})
    return model, feed, cout * (cin // group) * k * k * hw * hw


def linear(tokens: int, cin: int, cout: int):
    w = np.random.default_rng(1).standard_normal((cin, cout)).astype(np.float32)
    model, feed = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         {"x": [1, tokens, cin]}, {"w": w})
    return model, feed, tokens * cin * cout


def attention(heads: int, tokens: int, dim: int):
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    model, feed = _model(nodes, {"q": [1, heads, tokens, dim], "k": [1, heads, dim, tokens],
                                 "v": [1, heads, tokens, dim]}, {})
    return model, feed, 2 * heads * tokens * tokens * dim


def micro_cases() -> dict[str, list[tuple[onnx.ModelProto, dict[str, np.ndarray], int]]]:
    return {
    "conv1x1": [conv(a, b, hw) for hw in (56, 28, 14) for a, b in
                [(16, 96), (24, 96), (32, 96), (96, 16), (96, 24), (96, 32)]],
    "depthwise3x3": [conv(c, c, hw, 3, c) for hw in (56, 28) for c in (16, 24, 32, 40, 48, 56,
                                                                      64)],
    "linear": [linear(197, a, b) for a, b in [(192, 768), (176, 768), (184, 768), (200, 768),
                                              (768, 192), (760, 192)]],
    "attention": [attention(h, 197, d) for h, d in [(6, 64), (3, 64), (3, 32), (3, 40), (3, 48),
                                                    (6, 45), (6, 48)]],
    }


def _label(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> str:
    n = model.graph.node[0]
    if n.op_type == "Conv":
        w = model.graph.initializer[0].dims
        g = next((a.i for a in n.attribute if a.name == "group"), 1)
        x = feed["x"].shape
        return f"{'dw' if g > 1 else ''}{w[2]}x{w[3]} {x[1]}->{w[0]} @{x[2]}"
    if len(model.graph.node) == 1:
        x, w = feed["x"].shape, model.graph.initializer[0].dims
        return f"matmul [{x[1]},{w[0]}]x[{w[0]},{w[1]}]"
    q = feed["q"].shape
    return f"attention heads={q[1]} head_dim={q[3]} tokens={q[2]}"


def micro(rounds: int = 15, reps: int = 20) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for family, cases in micro_cases().items():
        sessions = []
        for model, feed, mac in cases:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            s = ort.InferenceSession(model.SerializeToString(), opts,
                                     providers=["CPUExecutionProvider"])
            s.run(None, feed)
            sessions.append((_label(model, feed), s, feed, mac))
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(rounds):
            for i, (_, s, feed, _) in enumerate(sessions):
                t0 = time.perf_counter()
                for _ in range(reps):
                    s.run(None, feed)
                times[i].append((time.perf_counter() - t0) / reps)
        out[family] = [{"op": label, "us": round(statistics.median(t) * 1e6, 2),
                        "gmacs_per_s": round(mac / statistics.median(t) / 1e9, 1)}
                       for (label, _, _, mac), t in zip(sessions, times)]
        for row in out[family]:
            print(f"  micro {row['op']:42s} {row['us']:9.1f} us {row['gmacs_per_s']:6.1f} GMAC/s",
                  flush=True)
    return out


# ---------------------------------------------------------------- main


def findings(per_op_1t: dict[str, Any], key: str = "auto") -> dict[str, Any]:
    """Which op kinds lose, from one thread count's profile of one variant: MAC op kinds below
    0.9 efficiency with their share of the pruned time, and the time share of the ops that have
    no MACs (their time follows activations, which shrink linearly in width)."""
    v = per_op_1t["variants"][key]
    kinds = v["kinds"]
    losing = {k: {"efficiency": kinds[k]["efficiency"], "share": kinds[k]["share_of_pruned"]}
              for k in v["mac_ops_worst_first"]
              if kinds[k]["efficiency"] is not None and kinds[k]["efficiency"] < 0.9}
    no_macs = {k: r["share_of_pruned"] for k, r in kinds.items() if "mac_ratio" not in r}
    return {"variant": key, "profiled_efficiency": v["efficiency"],
            "at_dense_mac_rate": v["at_dense_mac_rate"], "mac_kinds_below_0.9": losing,
            "time_share_without_macs": round(sum(x or 0 for x in no_macs.values()), 3),
            "largest_without_macs": sorted(no_macs, key=lambda k: -(no_macs[k] or 0))[:5]}


def _r(d: dict[str, float]) -> dict[str, float]:
    return {k: round(x, 3) for k, x in d.items()}


def _identical(models: dict[str, onnx.ModelProto]) -> list[list[str]]:
    """Variants whose ONNX files are byte-identical: their timings differ by noise alone."""
    seen: dict[str, list[str]] = {}
    for key, model in models.items():
        digest = hashlib.sha256(model.SerializeToString()).hexdigest()
        seen.setdefault(digest, []).append(key)
    return [keys for keys in seen.values() if len(keys) > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--profile-runs", type=int, default=30)
    parser.add_argument("--models", default="resnet50_full,mobilenetv2_full,vit_s_full")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--no-micro", action="store_true")
    parser.add_argument("--out", default="tools/bench/results/latency_efficiency.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ort.set_default_logger_severity(3)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                    "niceness": os.nice(0), "cpu": cpu_info()},
        "load_start": load(), "ratio": args.ratio, "batch": 1, "rounds": args.rounds,
        "profile_runs": args.profile_runs, "variants": {
            "r16": "round_to=16, plan applied by apply_plan_onnx alone (before)",
            "r16_fold": "round_to=16 through prune_onnx (shape patches folded)",
            "auto": "prune_onnx default: ORT CPU kernel-width policy + fold"},
        "models": {}}
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            dense = export(name, Path(tmp))
            models, info = variants(name, dense, args.ratio)
            entry: dict[str, Any] = {"macs_dense": macs(dense), "variants": info, "timings": []}
            for key, v in info.items():
                print(name, key, json.dumps({k: round(x, 3) if isinstance(x, float) else x
                                             for k, x in v.items()}), flush=True)
            entry["identical"] = _identical(models)
            entry["per_op"] = {}
            for threads in (int(t) for t in args.threads.split(",")):
                t = time_interleaved(models, threads, args.rounds)
                ms = t["median"]
                row: dict[str, Any] = {"threads": threads, "ms": ms, "ms_p10": t["p10"]}
                for key, v in info.items():
                    row[f"{key}_speedup"] = ms["dense"] / ms[key]
                    row[f"{key}_efficiency"] = ms["dense"] / ms[key] / v["mac_reduction"]
                    row[f"{key}_efficiency_p10"] = (t["p10"]["dense"] / t["p10"][key]
                                                    / v["mac_reduction"])
                entry["timings"].append(row)
                prof = profile(models, args.profile_runs, Path(tmp), threads)
                ops = per_op(prof, entry["macs_dense"], info)
                entry["per_op"][f"{threads}_threads"] = ops
                summary.append((name, threads, {k: row[f"{k}_efficiency"] for k in info},
                                {k: row[f"{k}_speedup"] for k in info},
                                {k: ops["variants"][k]["efficiency"] for k in info},
                                {k: ops["variants"][k]["at_dense_mac_rate"] for k in info},
                                {k: row[f"{k}_efficiency_p10"] for k in info}))
                print(name, f"{threads} thread(s)", "ms", {k: round(x, 2) for k, x in ms.items()},
                      "efficiency", {k: round(row[f"{k}_efficiency"], 3) for k in info},
                      flush=True)
                for key, v in ops["variants"].items():
                    print(f"  per-op {name} {threads}t {key}: profiled efficiency "
                          f"{v['efficiency']:.3f}, at dense MAC rate "
                          f"{v['at_dense_mac_rate']:.3f}, MAC ops worst first "
                          + ", ".join(f"{k} {v['kinds'][k]['efficiency']}"
                                      for k in v["mac_ops_worst_first"])
                          + "; other ops " + ", ".join(
                              f"{k} {v['kinds'][k]['pruned_us']:.0f}us"
                              for k in v["other_ops_by_time"][:4]), flush=True)
            first = next(iter(entry["per_op"].values()))
            entry["findings"] = {key: findings(first, key) for key in VARIANTS}
            results["models"][name] = entry
    if not args.no_micro:
        results["micro"] = micro()
    results["load_end"] = load()
    results["seconds"] = time.perf_counter() - t_start
    results["summary"] = [
        {"model": n, "threads": t, "efficiency": _r(e), "speedup": _r(sp),
         "efficiency_p10": _r(e10), "profiled_efficiency": _r(pe), "at_dense_mac_rate": _r(b),
         "kernel_efficiency": _r({k: pe[k] / b[k] for k in pe})}
        for n, t, e, sp, pe, b, e10 in summary]
    print("\nefficiency (speedup / MAC reduction): end to end, median of interleaved runs "
          "(p10) | from the per-node medians of ORT's profiler [at dense MAC rate]")
    print(f"{'model':18s} {'thr':>3s}  " + "  ".join(f"{k:>32s}" for k in VARIANTS))
    for n, t, e, sp, pe, b, e10 in summary:
        print(f"{n:18s} {t:3d}  " + "  ".join(
            f"{e[k]:5.3f} ({e10[k]:5.3f}, {sp[k]:4.2f}x) | {pe[k]:5.3f} [{b[k]:4.2f}]"
            for k in VARIANTS))
    print(f"load: start {results['load_start']['uptime']}\n      end   "
          f"{results['load_end']['uptime']}")
    atomic_write_bytes(args.out, json.dumps(results, indent=2, sort_keys=True).encode())
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
