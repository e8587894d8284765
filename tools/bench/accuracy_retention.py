"""Accuracy retention of the digits CNN under structured pruning, per importance criterion,
side by side with Torch-Pruning 1.6.1.

For every secateurs criterion and every MAC budget (75/50/30% of the dense MACs kept): prune
one-shot with ``prune(target_macs=...)`` (per-group ratios, mask-equivalence verified), measure
test accuracy, fine-tune with the demo's recipe (same steps, same seed) and measure again.
Torch-Pruning's ``MetaPruner`` with ``MagnitudeImportance`` (L2) and ``TaylorImportance`` gets
the same model, the same calibration batches (Taylor), the same non-global setting
(``global_pruning=False``, the final classifier ignored, as secateurs pins graph outputs) and
its ``pruning_ratio`` bisected to the same MAC budget, measured with the same cost model
(secateurs' ``count_macs``), then the same fine-tune.

    python tools/bench/accuracy_retention.py [--steps 150] [--quick]

Writes ``tools/bench/results/accuracy_retention.json`` and ``accuracy_retention.png``
(after fine-tuning) and ``accuracy_retention_oneshot.png``. Torch-Pruning is a benchmark-only
dependency (``pip install torch-pruning==1.6.1``); without it those rows are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.demo.digits import evaluate, example_input, fine_tune, load_digits_split
from secateurs.demo.report import format_table, plot_accuracy_vs_macs, write_bytes_atomically
from secateurs.demo.run import DEFAULT_CRITERIA, _loss, calibration_batches, demo_model
from secateurs.passes.importance import calibration_context
from secateurs.passes.prune import prune

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.75, 0.5, 0.3)


def macs_of(model: nn.Module) -> int:
    return prune(model, example_input(), 0.0).report.macs_before


def _tp_prune(model: nn.Module, ratio: float, kind: str, batches: list) -> nn.Module:
    import torch_pruning as tp

    work = copy.deepcopy(model)
    if kind == "taylor":
        imp = tp.importance.TaylorImportance()
        work.eval()
        work.zero_grad()
        for batch in batches:
            _loss(work, batch).backward()
    else:
        imp = tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(work, example_input(), importance=imp, pruning_ratio=ratio,
                                  global_pruning=False, ignored_layers=[work.fc])
    pruner.step()
    work.zero_grad(set_to_none=True)
    return work.eval()


def tp_to_macs(model: nn.Module, target: float, kind: str, batches: list,
               dense_macs: int) -> tuple[nn.Module, float, float]:
    """Bisect Torch-Pruning's pruning_ratio to the MAC budget; (model, ratio, macs kept)."""
    lo, hi = 0.0, 0.95
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(14):
        mid = (lo + hi) / 2
        pruned = _tp_prune(model, mid, kind, batches)
        kept = macs_of(pruned) / dense_macs
        if best is None or abs(kept - target) < abs(best[2] - target):
            best = (mid, pruned, kept)
        lo, hi = (mid, hi) if kept > target else (lo, mid)
    assert best is not None
    return best[1], best[0], best[2]


def run(steps: int, criteria: tuple[str, ...], budgets: tuple[float, ...]) -> dict[str, Any]:
    torch.manual_seed(0)
    train, val, test = load_digits_split(seed=0)
    model = demo_model()
    dense_macs = macs_of(model)
    base = evaluate(model, test)
    batches = calibration_batches(train)
    ctx = calibration_context(model, batches, _loss, criteria, seed=0)
    rows: list[dict[str, Any]] = []

    def record(method: str, budget: float, pruned: nn.Module, kept: float, extra: dict) -> None:
        t = time.perf_counter()
        one_shot = evaluate(pruned, test)
        fine_tune(pruned, train, steps=steps, seed=0)
        row = {"method": method, "target_macs": budget, "macs_kept": kept,
               "params": sum(p.numel() for p in pruned.parameters()),
               "one_shot": one_shot, "fine_tuned": evaluate(pruned, test),
               "fine_tune_seconds": time.perf_counter() - t, **extra}
        rows.append(row)
        print(f"{method:>16} @ {budget:.0%}: MACs kept {kept:.3f}  one-shot {one_shot:.4f}  "
              f"fine-tuned {row['fine_tuned']:.4f}", file=sys.stderr, flush=True)

    for name in criteria:
        for budget in budgets:
            res = prune(model, example_input(), importance=name, target_macs=budget,
                        score_context=ctx, verify=True)
            record(f"secateurs:{name}", budget, res.model, res.report.macs_kept,
                   {"ratio": res.plan.meta["ratio"], "exact": res.report.exact})
    try:
        import torch_pruning as tp
        tp_version = getattr(tp, "__version__", "?")
    except ImportError:
        tp_version = None
        print("torch-pruning not installed: skipping its rows", file=sys.stderr)
    if tp_version is not None:
        for kind in ("magnitude", "taylor"):
            for budget in budgets:
                pruned, ratio, kept = tp_to_macs(model, budget, kind, batches, dense_macs)
                record(f"torch-pruning:{kind}", budget, pruned, kept, {"ratio": ratio})
    from importlib.metadata import version

    return {
        "benchmark": "accuracy_retention",
        "model": "DigitsCNN (shipped weights), scikit-learn digits, split seed 0, 360 test",
        "baseline_accuracy": base, "dense_macs": dense_macs, "fine_tune_steps": steps,
        "budgets": list(budgets), "global_pruning": False,
        "torch_pruning": version("torch-pruning") if tp_version is not None else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    budgets = result["budgets"]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    by = {(r["method"], r["target_macs"]): r for r in result["rows"]}
    rows = []
    for m in methods:
        cells: list[object] = [m]
        for b in budgets:
            r = by.get((m, b))
            cells += [None, None] if r is None else [100 * r["one_shot"], 100 * r["fine_tuned"]]
        rows.append(cells)
    headers = ["method"] + [f"{h} {b:.0%}" for b in budgets for h in ("1-shot", "tuned")]
    return (f"baseline {100 * result['baseline_accuracy']:.2f}% test accuracy; "
            f"fine-tune {result['fine_tune_steps']} steps\n"
            + format_table(rows, headers, floatfmt=".2f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="two criteria, 50%% only")
    parser.add_argument("--out", default=str(RESULTS / "accuracy_retention"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    criteria = ("l2", "taylor") if args.quick else DEFAULT_CRITERIA
    budgets = (0.5,) if args.quick else BUDGETS
    result = run(args.steps, criteria, budgets)
    out = Path(args.out)
    write_bytes_atomically((json.dumps(result, indent=2) + "\n").encode(),
                           out.with_suffix(".json"))
    for key, suffix, label in (("fine_tuned", "", "after fine-tune"),
                               ("one_shot", "_oneshot", "one-shot")):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in result["rows"]:
            series.setdefault(r["method"], [(1.0, result["baseline_accuracy"])]).append(
                (r["macs_kept"], r[key]))
        plot_accuracy_vs_macs(series, out.parent / f"{out.name}{suffix}.png",
                              baseline=result["baseline_accuracy"],
                              title=f"DigitsCNN: test accuracy vs MACs kept ({label})")
    print(table(result))


if __name__ == "__main__":
    main()
