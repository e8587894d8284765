"""Analysis + 50% prune time, secateurs vs Torch-Pruning 1.6, side by side in one run.

One thread. For each model: median of N runs of (trace + analysis + importance + select +
apply) for both tools, MACs kept by each, and where secateurs' time goes by stage.
Writes tools/bench/results/prune_speed.json.

    python tools/bench/prune_speed.py [--repeats 3] [--models resnet50_full,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import cpu_info  # noqa: E402  (tools/bench/machine.py)

import secateurs
from secateurs import zoo

MODELS = ["resnet50_full", "densenet121_full", "vit_s_full", "vit_b_full", "llama_block_full"]


def _macs(report_macs_before, model, x):
    return report_macs_before


def run_secateurs(model, x):
    t0 = time.perf_counter()
    r = secateurs.prune(model, x, ratio=0.5)
    return time.perf_counter() - t0, r.report.macs_kept, r.report.seconds


def run_tp(model, x):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    t0 = time.perf_counter()
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.out_features in (1000, 10)]
    base, _ = tp.utils.count_ops_and_params(model, x)
    t1 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=ignored)
    pruner.step()
    elapsed = time.perf_counter() - t1
    after, _ = tp.utils.count_ops_and_params(model, x)
    del t0
    return elapsed, after / base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        entry = zoo.get(name)
        model, x = entry.build(), entry.example_inputs()
        if isinstance(x, torch.Tensor):
            x = (x,)
        s_times, t_times, stages = [], [], {}
        s_kept = t_kept = None
        tp_error = None
        for _ in range(args.repeats):
            t, s_kept, stages = run_secateurs(model, x)
            s_times.append(t)
            if tp_error is None:
                try:
                    t2, t_kept = run_tp(model, x[0] if len(x) == 1 else x)
                    t_times.append(t2)
                except Exception as exc:  # noqa: BLE001 - report the peer's failure, go on
                    tp_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        s_med = statistics.median(s_times)
        t_med = statistics.median(t_times) if t_times else None
        row = {"model": name, "secateurs_s": s_med, "torch_pruning_s": t_med,
               "speedup": (t_med / s_med) if t_med else None,
               "secateurs_macs_kept": s_kept, "torch_pruning_macs_kept": t_kept,
               "secateurs_stages_s": stages, "torch_pruning_error": tp_error}
        rows.append(row)
        sp = f"{row['speedup']:.1f}x" if row["speedup"] else "n/a"
        print(f"{name:18s} secateurs {s_med:6.2f}s  torch-pruning "
              f"{(t_med or float('nan')):6.2f}s  speedup {sp:>6}  MACs kept "
              f"{s_kept:.3f} vs {t_kept if t_kept is None else round(t_kept, 3)}", flush=True)
        print("   stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()), flush=True)
    out = Path(__file__).parent / "results" / "prune_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": platform.processor() or platform.machine(), "cpu": cpu_info(), "threads": 1,
           "torch": torch.__version__, "repeats": args.repeats, "rows": rows}
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
