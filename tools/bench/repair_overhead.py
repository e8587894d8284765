"""What the safety net costs: the ``check`` stage of ``secateurs.prune`` (plan built and tried
on meta at the example batch and a second one) against the whole prune, on the large zoo
configs; and the time to repair a plan when a rule is wrong on purpose (the residual ``add``
rule swapped for one that does not unify its operands: every residual stream breaks).

One thread, median of N runs. Writes tools/bench/results/repair_overhead.json.

    python tools/bench/repair_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import secateurs
from secateurs import zoo
from secateurs.passes import channel_rules
from secateurs.passes.channel_rules import Rule

MODELS = ["resnet50_full", "densenet121_full", "vit_s_full", "vit_b_full"]


def _prune(model, x):
    t0 = time.perf_counter()
    r = secateurs.prune(model, x, ratio=0.5)
    return time.perf_counter() - t0, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    rows = []
    for name in MODELS:
        entry = zoo.get(name)
        model, x = entry.build(), entry.example_inputs()
        _prune(model, x)  # warm-up
        runs = [_prune(model, x) for _ in range(args.repeats)]
        total = statistics.median(t for t, _ in runs)
        check = statistics.median(r.report.seconds["check"] for _, r in runs)
        rows.append({"model": name, "prune_s": round(total, 4), "check_s": round(check, 4),
                     "check_fraction": round(check / total, 3),
                     "repairs": len(runs[-1][1].report.repairs)})
        print(f"{name:18s} prune {total * 1e3:7.0f} ms  check {check * 1e3:6.1f} ms "
              f"({100 * check / total:.0f}%)", flush=True)
    broken = []
    saved = channel_rules.RULES["add"]
    channel_rules.RULES["add"] = Rule(lambda ctx: [ctx.ins[0]])  # wrong on purpose
    try:
        for name in ("vit_s_full",):
            entry = zoo.get(name)
            model, x = entry.build(), entry.example_inputs()
            t, r = _prune(model, x)
            broken.append({"model": name, "rule": "add without unification",
                           "prune_s": round(t, 3), "check_s": round(r.report.seconds["check"], 3),
                           "repairs": len(r.report.repairs), "macs_kept": r.report.macs_kept})
            print(f"{name:18s} wrong add rule: prune {t:.2f} s, check "
                  f"{r.report.seconds['check']:.2f} s, {len(r.report.repairs)} groups repaired",
                  flush=True)
    finally:
        channel_rules.RULES["add"] = saved
    out = {"threads": 1, "repeats": args.repeats, "python": sys.version.split()[0],
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "load_average_1m": round(os.getloadavg()[0], 2), "overhead": rows,
           "repair": broken}
    path = Path(__file__).parent / "results" / "repair_overhead.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
