"""Issue 11 §3: analysis + 50% prune time on large configs of the coverage zoo, against
Torch-Pruning 1.6, and how the time grows with depth.

One thread, real weights, 224 px. Per model: secateurs ``prune(ratio=0.5)`` (median of
``--repeats``), its stages, MACs kept, and Torch-Pruning's ``MetaPruner`` + L2 magnitude on the
same model (driven as ``prune_speed.py`` drives it; its failure is recorded, not fatal). Then
the scaling check: Swin-style window attention at growing depth, seconds per graph node.
Writes ``tools/bench/results/coverage_speed.json``.

    python tools/bench/coverage_speed.py [--repeats 1] [--models swin_t,convnext_t,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_info  # noqa: E402  (tools/bench/machine.py)
from prune_speed import run_tp

import secateurs
from secateurs import zoo
from secateurs.zoo import attention_wild as aw
from secateurs.zoo import conv_wild as cw
from secateurs.zoo._common import seeded_build


def _zoo(name: str) -> Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    return lambda: (zoo.get(name).build(), zoo.get(name).example_inputs())


def _own(factory: Callable[[], torch.nn.Module], shape: tuple[int, ...] = (1, 3, 224, 224),
         ids: int | None = None):
    def make():
        model = seeded_build(factory)()
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, ids, shape, generator=gen) if ids else torch.randn(shape,
                                                                               generator=gen)
        return model, (x,)

    return make


MODELS = {
    "resnet50": _zoo("resnet50_full"),
    "densenet121": _zoo("densenet121_full"),
    "vit_b16": _zoo("vit_b_full"),
    "swin_t": _own(lambda: cw.WindowSwin(img=224, dim=96, depths=(2, 2, 6, 2),
                                         heads=(3, 6, 12, 24), ws=7, num_classes=1000)),
    "convnext_t": _own(lambda: cw.TvConvNeXt(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3),
                                             num_classes=1000)),
    "efficientnet_b0": _own(lambda: cw.TvEfficientNet(stages=cw.TvEfficientNet.B0,
                                                      num_classes=1000)),
    "nfnet_bit": _own(lambda: cw.StdConvNet(dim=64, nf_blocks=4, bit_blocks=4,
                                            num_classes=1000)),
    "res2net_edgenext": _own(lambda: cw.SplitNet(dim=64, width=16, scale=4, splits=4,
                                                 blocks=6, num_classes=1000)),
    "convnextv2_grn": _own(lambda: cw.ConvNeXtV2(dim=96, blocks=6, num_classes=1000)),
    "pad_net": _own(lambda: cw.PadNet(dim=64, num_classes=1000)),
    "einsum_vit": _own(lambda: aw.EinsumViT(dim=384, heads=6, mlp=1536, classes=1000),
                       (1, 3, 64, 64)),
}


def _time_prune(model, x, repeats: int):
    """Median time of ``repeats`` prunes, and the result of the median run (its stages)."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = secateurs.prune(model, x, ratio=0.5)
        runs.append((time.perf_counter() - t0, result))
    runs.sort(key=lambda r: r[0])
    return statistics.median(t for t, _ in runs), runs[(len(runs) - 1) // 2][1]


def _nodes(model, x) -> int:
    return len(secateurs.analyze(model, x).graph.nodes)


def scaling(repeats: int) -> list[dict]:
    """Swin-style stacks of growing depth: time per lowered node should stay flat."""
    rows = []
    for depth in (2, 6, 18):
        model = seeded_build(lambda d=depth: cw.WindowSwin(
            img=224, dim=96, depths=(2, 2, d, 2), heads=(3, 6, 12, 24), ws=7,
            num_classes=1000))()
        x = (torch.randn(1, 3, 224, 224),)
        secs, _ = _time_prune(model, x, repeats)
        n = _nodes(model, x)
        rows.append({"stage3_depth": depth, "nodes": n, "seconds": secs,
                     "ms_per_node": 1000 * secs / n})
        print(f"swin depth (2,2,{depth:2d},2): {n:5d} nodes  {secs:6.2f} s  "
              f"{1000 * secs / n:.2f} ms/node", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--no-scaling", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    secateurs.prune(*_zoo("resnet")(), ratio=0.5)  # warm the op registries once
    rows = []
    for name in args.models.split(","):
        model, x = MODELS[name]()
        secs, result = _time_prune(model, x, args.repeats)
        tp_s = tp_kept = tp_error = None
        if not args.no_tp:
            try:
                tp_s, tp_kept = run_tp(model, x[0])
            except Exception as exc:  # noqa: BLE001 - the peer's failure is a result
                tp_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        row = {"model": name, "nodes": len(result.analysis.graph.nodes)
               if hasattr(result, "analysis") else None,
               "secateurs_s": secs, "torch_pruning_s": tp_s,
               "ratio_to_torch_pruning": (secs / tp_s) if tp_s else None,
               "secateurs_macs_kept": result.report.macs_kept, "torch_pruning_macs_kept": tp_kept,
               "exact_groups_repaired": len(result.report.repairs),
               "stages_s": result.report.seconds, "torch_pruning_error": tp_error}
        rows.append(row)
        ratio = f"{row['ratio_to_torch_pruning']:.2f}x TP time" if tp_s else f"TP: {tp_error}"
        print(f"{name:18s} {secs:6.2f} s  MACs kept {result.report.macs_kept:.3f} "
              f"(TP {tp_kept if tp_kept is None else round(tp_kept, 3)})  {ratio}", flush=True)
        print("   stages: " + ", ".join(f"{k} {v:.2f}" for k, v in result.report.seconds.items()),
              flush=True)
    doc = {"machine": platform.processor() or platform.machine(), "cpu": cpu_info(), "threads": 1,
           "torch": torch.__version__, "repeats": args.repeats, "rows": rows,
           "scaling": [] if args.no_scaling else scaling(args.repeats)}
    out = Path(__file__).parent / "results" / "coverage_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
