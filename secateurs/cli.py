"""The ``secateurs`` command line.

Each sub-command lives in its own module under ``secateurs.commands`` and exposes
``register(subparsers)``; this file only discovers them, so a command is one file.
Exit codes: 0 success, 1 the work failed (a check did not pass), 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from secateurs import commands
from secateurs.errors import SecateursError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateurs",
        description="Make trained networks smaller and faster: exact structured pruning, "
        "N:M / block sparsity, and lowering to ONNX, ONNX Runtime, TensorRT and torch.compile.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv dumps the graph after each pass)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"secateurs.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SecateursError as exc:
        print(f"secateurs {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
