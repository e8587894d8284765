"""``secateurs demo``: prune the shipped digits CNN to half its MACs and keep its accuracy.

Loads the small residual CNN shipped with secateurs (trained on scikit-learn's 8x8 digits),
compares importance criteria one-shot at 75/50/30% of the MACs, prunes to the target with the
best one (checking mask-equivalence), fine-tunes briefly, and reports accuracy, size, MACs and
latency before and after. Takes about a minute on two CPU cores (``--quick``: a few seconds).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="prune a digits CNN to 50%% of its MACs and report accuracy retention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", metavar="OUT.json", default=None,
                        help="also write the full results as JSON")
    parser.add_argument("--png", metavar="PLOT.png", default=None,
                        help="write a plot of accuracy against MACs kept per criterion")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for fine-tuning and the random criterion (default 0)")
    parser.add_argument("--target-macs", type=float, default=0.5,
                        help="fraction of the dense MACs to keep (default 0.5)")
    parser.add_argument("--quick", action="store_true",
                        help="three criteria, one budget, a short fine-tune (seconds)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from secateurs.demo.run import QUICK, format_report, run_demo
    from secateurs.errors import InputError

    if not 0.0 < args.target_macs < 1.0:
        raise InputError(f"--target-macs must be in (0, 1), got {args.target_macs}")
    from secateurs.runtime.paths import Output, check_outputs

    check_outputs([Output("--json", args.json, (".json",), "results"),
                   Output("--png", args.png, (".png",), "plot")])
    options: dict[str, Any] = dict(QUICK) if args.quick else {}
    progress = not args.no_progress

    def say(line: str) -> None:
        if progress:
            print(f"[demo] {line}", file=sys.stderr, flush=True)

    result = run_demo(seed=args.seed, target_macs=args.target_macs, json_out=args.json,
                      png_out=args.png, progress=progress, say=say, **options)
    print(format_report(result))
    return 0 if result["verification"]["mask_equivalence"] else 1
