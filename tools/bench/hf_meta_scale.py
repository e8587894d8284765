"""Meta-device analysis of Llama-3.2-1B / Llama-3-8B / Llama-3-70B / Gemma-2-27B configs: time, peak memory,
groups, units, MACs; layer replication (the default on meta) and the full trace side by side;
a whole plan made on meta (``prune_hf``); Torch-Pruning 1.6's DependencyGraph on the largest
Llama config it handles here.

Every measurement runs in a fresh subprocess (1 thread), so import and first-export costs are
counted and peak RSS (ru_maxrss) is its own; secateurs timings keep the fastest of ``--repeat``
runs (the machine is shared), the others are in ``*_runs``. Time is measured without tracemalloc (it slows
Python several-fold); the tracemalloc peak comes from a second run of the same analysis
(``tracemalloc_peak_mb`` covers the analysis and counting MACs, ``..._analyze_mb`` the analysis).
Torch-Pruning needs real weights (its trace calls ``.item()``, which meta tensors refuse), so
its model is built on the CPU, and its time is ``build_dependency`` + ``get_all_groups``
(model construction excluded). ``get_all_groups`` runs under a timeout: with transformers 5.23
it never returns on some attention layouts (a toy Llama with 4 q heads and 2 kv heads: the
index propagation through attention does not reach a fixpoint), while on Llama-3.2-1B/3B
widths it returns, with one channel-wise group per attention block (the k/v output channels
tied index-wise to q and o, not heads) and one per MLP.

    python tools/bench/hf_meta_scale.py [--only 8b] [--no-tp] [--no-full]

Rows of configs not run (``--only``) are kept from the previous results file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter

CONFIGS = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    # Torch-Pruning fallbacks: 2 layers of the 1B's width, and a 1-layer toy
    "llama3.2-1b-2layers": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                                num_attention_heads=32, num_key_value_heads=8,
                                tie_word_embeddings=True),
    "llama-toy-1layer": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}
# Gemma-2-27B: alternating sliding/global attention (config.layer_types), replicated by its
# period of 2 layers (6 traced -> 46)
GEMMA2 = {
    "gemma2-27b": dict(vocab_size=256000, hidden_size=4608, intermediate_size=36864,
                       num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16,
                       head_dim=128, query_pre_attn_scalar=144, sliding_window=4096,
                       max_position_embeddings=8192, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0, use_cache=False),
}
SEQ = 128
TP_TIMEOUT = {"llama3.2-1b": 300, "llama3.2-3b": 600, "llama3.2-1b-2layers": 120,
              "llama-toy-1layer": 60}
# Torch-Pruning's models hold real weights: the 3B in bf16 (6.4 GB) to leave this 23 GB machine
# room; Llama-3-8B does not fit in fp32 (32 GB) and its bf16 init alone takes minutes.
TP_DTYPE = {"llama3.2-3b": "bfloat16"}


def _config(name: str):
    from transformers import Gemma2Config, LlamaConfig

    if name in GEMMA2:
        cfg = Gemma2Config(**GEMMA2[name])
        cfg._attn_implementation = "eager"  # Gemma-2 has no sdpa path (logit soft-capping)
        return cfg

    kw = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
              use_cache=False, tie_word_embeddings=False)
    kw.update(CONFIGS[name])
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_secateurs(name: str, how: str, measure: str) -> dict:
    import tracemalloc

    import torch

    torch.set_num_threads(1)
    from secateurs.hf import analyze_hf, unit_counts
    from secateurs.hf.select import macs as _macs
    from secateurs.hf.shards import meta_model

    t0 = time.perf_counter()
    model = meta_model(_config(name))
    t_build = time.perf_counter() - t0
    x = (torch.zeros(1, SEQ, dtype=torch.long),)
    if measure == "memory":
        tracemalloc.start()
    t0 = time.perf_counter()
    hfa = analyze_hf(model, x, replicate=how == "replicate")
    t_an = time.perf_counter() - t0
    peak_analyze = tracemalloc.get_traced_memory()[1] if measure == "memory" else 0
    macs, _ = _macs(hfa.analysis, {})
    t_macs = time.perf_counter() - t0 - t_an
    out = {"tool": "secateurs", "config": name, "analysis": how, "measure": measure,
           "build_meta_s": t_build, "analyze_s": t_an, "macs_s": t_macs, "tracer": hfa.tracer,
           "groups": len(hfa.analysis.groups), "units": unit_counts(hfa),
           f"macs_seq{SEQ}": macs, "maxrss_mb": _maxrss_mb()}
    if measure == "memory":
        out["tracemalloc_peak_analyze_mb"] = peak_analyze / 2**20
        out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out


def run_plan(name: str) -> dict:
    """A whole plan on meta: analysis, (random) scores, selection, plan, meta apply."""
    import torch

    torch.set_num_threads(1)
    from secateurs.hf import prune_hf
    from secateurs.hf.shards import meta_model

    model = meta_model(_config(name))
    t0 = time.perf_counter()
    r = prune_hf(model, (torch.zeros(1, SEQ, dtype=torch.long),), heads=0.25, mlp=0.25,
                 importance="random")
    return {"tool": "secateurs", "config": name, "analysis": "prune_hf(heads=.25, mlp=.25)",
            "measure": "time", "total_s": time.perf_counter() - t0, "seconds": r.seconds,
            "macs_kept": r.macs_kept, "params_kept": r.params_kept,
            "tensors_sliced": len(r.plan.removed), "config_changes": r.config_changes,
            "maxrss_mb": _maxrss_mb()}


def run_torch_pruning(name: str) -> dict:
    import torch

    torch.set_num_threads(1)
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = TP_DTYPE.get(name, "float32")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(_config(name), dtype=getattr(torch, dtype)).eval()
    out = {"tool": "torch-pruning " + tp.__version__, "config": name, "analysis": "full",
           "measure": "time", "dtype": dtype, "build_model_s": time.perf_counter() - t0,
           "params": sum(p.numel() for p in model.parameters()),
           "maxrss_after_model_mb": _maxrss_mb()}
    x = torch.zeros(1, SEQ, dtype=torch.long)
    t0 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    out.update(build_dependency_s=time.perf_counter() - t0, maxrss_mb=_maxrss_mb())
    print("PARTIAL " + json.dumps(out), flush=True)
    t0 = time.perf_counter()
    groups = list(dg.get_all_groups())
    widths = Counter(len(g[0].idxs) for g in groups)
    out.update(get_all_groups_s=time.perf_counter() - t0, groups=len(groups),
               group_widths={str(k): v for k, v in sorted(widths.items())},
               maxrss_mb=_maxrss_mb())
    return out


def _child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, err, timed_out = out.stdout, out.stderr, False
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, timed_out = "", True
    lines = [ln for ln in stdout.splitlines() if ln.startswith(("RESULT ", "PARTIAL "))]
    if not lines:
        return {"tool": args[0], "config": args[1], "error": err[-800:] or "no output",
                "timed_out": timed_out}
    res = json.loads(lines[-1].split(" ", 1)[1])
    if timed_out:
        res["timed_out_after_s"] = timeout
        res["note"] = "get_all_groups did not return" if lines[-1].startswith("PARTIAL") \
            else "timed out"
    return res


def _best(args: list[str], timeout: float, repeat: int) -> dict:
    """The fastest of ``repeat`` fresh runs (this machine is shared); memory runs once."""
    if args[-1] == "memory" or repeat <= 1:
        return _child(args, timeout)
    runs = [_child(args, timeout) for _ in range(repeat)]
    key = "analyze_s" if "analyze_s" in runs[0] else "total_s"
    best = dict(min(runs, key=lambda r: r.get(key, float("inf"))))
    best[f"{key}_runs"] = [r.get(key) for r in runs]
    return best


def _table(results: list[dict]) -> str:
    head = f"{'tool':<20}{'config':<22}{'analysis':<30}{'time s':>9}{'tracemalloc MB':>16}" \
           f"{'maxrss MB':>11}{'groups':>8}  units / MACs / note"
    rows = [head, "-" * len(head)]
    for r in results:
        t = r.get("analyze_s", r.get("total_s")) or None
        if t is None and "build_dependency_s" in r:
            t = r["build_dependency_s"] + r.get("get_all_groups_s", 0.0)
        units = r.get("units", {})
        note = r.get("note") or r.get("error", "")[:60]
        if units:
            note = (f"heads {units.get('heads_units')}, mlp {units.get('mlp_units')}, "
                    f"MACs {r.get(f'macs_seq{SEQ}', 0):.3g}")
        elif "macs_kept" in r:
            note = f"MACs kept {r['macs_kept']:.3f}, {r['tensors_sliced']} tensors sliced"
        elif "build_dependency_s" in r and not r.get("timed_out_after_s"):
            note = f"{r.get('dtype')}; weights included in RSS; widths {r.get('group_widths')}"
        rows.append(f"{r['tool']:<20}{r['config']:<22}{str(r.get('analysis', '')):<30}"
                    f"{t if t is not None else float('nan'):>9.2f}"
                    f"{r.get('tracemalloc_peak_mb') or float('nan'):>16.0f}"
                    f"{r.get('maxrss_mb') or float('nan'):>11.0f}{r.get('groups', ''):>8}  {note}")
    return "\n".join(rows)


def _merge(pair: list[dict]) -> dict:
    """One row from a time run and a memory run of the same analysis."""
    timed, mem = pair
    out = dict(timed)
    out.pop("measure", None)
    out["tracemalloc_peak_mb"] = mem.get("tracemalloc_peak_mb")
    out["tracemalloc_peak_analyze_mb"] = mem.get("tracemalloc_peak_analyze_mb")
    out["analyze_s_under_tracemalloc"] = mem.get("analyze_s")
    out["maxrss_mb_memory_run"] = mem.get("maxrss_mb")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--no-full", action="store_true")
    ap.add_argument("--repeat", type=int, default=3,
                    help="fresh processes per secateurs timing; the fastest is kept")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        tool, name, *rest = args.child
        try:
            if tool == "secateurs":
                res = run_secateurs(name, *rest)
            elif tool == "plan":
                res = run_plan(name)
            else:
                res = run_torch_pruning(name)
        except Exception as exc:  # noqa: BLE001 - report the failure as data
            res = {"tool": tool, "config": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = []
    jobs: list[tuple[list[list[str]], float]] = []
    for name in ("llama3.2-1b", "llama3.2-3b", "llama3-8b", "llama3-70b", *GEMMA2):
        if args.only not in name:
            continue
        jobs.append(([["secateurs", name, "replicate", m] for m in ("time", "memory")], 900))
        if not args.no_full and name in ("llama3.2-1b", "llama3-8b", *GEMMA2):
            jobs.append(([["secateurs", name, "full", m] for m in ("time", "memory")], 900))
        if name in ("llama3-8b", "llama3-70b"):
            jobs.append(([["plan", name]], 900))
    if not args.no_tp:
        for name, limit in TP_TIMEOUT.items():
            if args.only in name:
                jobs.append(([["tp", name]], limit))
    for runs, limit in jobs:
        got = [_best(r, limit, args.repeat if r[0] != "tp" else 1) for r in runs]
        res = _merge(got) if len(got) == 2 else got[0]
        print(json.dumps(res), flush=True)
        results.append(res)
    path = os.path.join(os.path.dirname(__file__), "results", "hf_meta_scale.json")
    # rows of configs not run this time (--only, --no-tp) are kept from the previous file
    key = lambda r: (r.get("tool"), r.get("config"), str(r.get("analysis")))  # noqa: E731
    fresh = {key(r) for r in results}
    old: list[dict] = []
    if os.path.exists(path):
        with open(path) as f:
            old = [r for r in json.load(f).get("results", []) if key(r) not in fresh]
    with open(path, "w") as f:
        json.dump({"machine": "2-core CPU, 1 thread, no GPU", "seq": SEQ,
                   "results": old + results}, f, indent=2)
    print(_table(old + results))


if __name__ == "__main__":
    main()
