"""Meta-device analysis of Llama-3-8B / 70B configs: time, peak memory, groups, units, MACs;
Torch-Pruning 1.6.1 (if installed) on the largest Llama config it handles, side by side.

Each measurement runs in a fresh subprocess so peak RSS (ru_maxrss) is its own.
    python tools/bench/hf_meta_scale.py [--only 8b] [--tp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
}


def _config(name: str):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      use_cache=False, tie_word_embeddings=False, **CONFIGS[name])
    cfg._attn_implementation = "sdpa"
    return cfg


def run_secateurs(name: str) -> dict:
    import resource
    import tracemalloc

    import torch

    torch.set_num_threads(1)
    from secateurs.hf import analyze_hf, unit_counts
    from secateurs.hf.prune_hf import _macs
    from secateurs.hf.shards import meta_model

    t0 = time.perf_counter()
    model = meta_model(_config(name))
    t_build = time.perf_counter() - t0
    tracemalloc.start()
    t0 = time.perf_counter()
    hfa = analyze_hf(model, (torch.zeros(1, 128, dtype=torch.long),))
    t_an = time.perf_counter() - t0
    macs, _ = _macs(hfa.analysis, {})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"tool": "secateurs", "config": name, "build_meta_s": t_build,
            "analyze_s": t_an, "tracer": hfa.tracer,
            "groups": len(hfa.analysis.groups), "units": unit_counts(hfa),
            "macs_seq128": macs, "tracemalloc_peak_mb": peak / 2**20,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_torch_pruning(name: str) -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    import torch_pruning as tp

    from secateurs.hf.shards import meta_model

    model = meta_model(_config(name))
    x = torch.zeros(1, 128, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = list(dg.get_all_groups())
    return {"tool": "torch-pruning " + tp.__version__, "config": name,
            "analyze_s": time.perf_counter() - t0, "groups": len(groups),
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--tp", action="store_true")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        tool, name = args.child
        try:
            res = run_secateurs(name) if tool == "secateurs" else run_torch_pruning(name)
        except Exception as exc:  # noqa: BLE001 - report the failure as data
            res = {"tool": tool, "config": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print("RESULT " + json.dumps(res))
        return
    names = [n for n in CONFIGS if args.only in n]
    results = []
    for tool in ["secateurs"] + (["torch_pruning"] if args.tp else []):
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--child", tool, name],
                                 capture_output=True, text=True, timeout=1800)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"tool": tool, "config": name,
                                                          "error": out.stderr[-800:]}
            print(json.dumps(res))
            results.append(res)
    path = os.path.join(os.path.dirname(__file__), "results", "hf_meta_scale.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
