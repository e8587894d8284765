"""The ``secateurs`` command line.

Each sub-command lives in its own module under ``secateurs.commands`` and exposes
``register(subparsers)``; ``COMMANDS`` lists them (adding a command is one file and one entry).
Command modules import heavy or optional packages (onnx, onnxruntime, transformers) inside
their ``run``, so ``secateurs --help`` and ``secateurs demo`` work with only the base install
plus the ``demo`` extra; a missing optional package is one line naming the extra to install.

Exit codes: 0 success, 1 the work ran but a check did not pass (``--verify``, 2:4 validity)
or an internal error, 2 bad input (a clear one-line message naming the option or path and
what to do), 130 interrupted (Ctrl-C; SIGTERM is treated the same). Nothing half-written is
ever left under an output's name, and the process's temporary files are removed on every one
of these exits. ``--debug`` (or ``SECATEURS_DEBUG=1``) also prints the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS: list[str] = [
    "prune",
    "analyze",
    "inspect",
    "sparsify",
    "optimize",
    "bench",
    "build",
    "demo",
]

# optional packages -> the extra that installs them
_EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "onnx_ir": "onnx",
           "transformers": "hf", "safetensors": "hf", "sklearn": "demo", "matplotlib": "demo",
           "tensorrt": "trt"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateurs",
        description="Make trained networks smaller and faster: exact structured pruning, "
        "N:M / block sparsity, and lowering to ONNX, ONNX Runtime, TensorRT and torch.compile.",
        epilog="Exit status: 0 ok, 1 a check failed, 2 bad input, 130 interrupted. "
        "'secateurs COMMAND --help' for each command.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv dumps the graph after each pass)")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error (also SECATEURS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"secateurs.commands.{name}")
        module.register(sub)
    for child in sub.choices.values():  # --debug after the command name, too
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``with`` block (temp files) unwinds."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _missing_module_message(exc: ImportError) -> str:
    name = (exc.name or "").split(".")[0]
    extra = _EXTRAS.get(name)
    if extra:
        return f"this needs the '{name}' package: pip install 'secateurs[{extra}]'"
    return f"a module is missing: {exc}"


def _error(command: str | None, message: str) -> None:
    prefix = f"secateurs {command}" if command else "secateurs"
    text = " ".join(str(message).split()) or "(no message)"
    print(f"{prefix}: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    debug = bool(os.environ.get("SECATEURS_DEBUG"))
    command: str | None = None
    previous = None
    if threading_is_main():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = debug or bool(getattr(args, "debug", False))
        command = args.command
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"secateurs{' ' + command if command else ''}: {what}; no partial output was "
              "left", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that turns errors into lines
        if debug:
            traceback.print_exc()
        return _report(command, exc, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _report(command: str | None, exc: Exception, debug: bool) -> int:
    from secateurs.errors import SecateursError

    if isinstance(exc, SecateursError):
        _error(command, str(exc))
        return 2
    if isinstance(exc, ImportError):
        _error(command, _missing_module_message(exc))
        return 2
    if isinstance(exc, OSError):
        where = f"'{exc.filename}': " if getattr(exc, "filename", None) else ""
        _error(command, f"{where}{exc.strerror or exc}")
        return 2
    if isinstance(exc, MemoryError):
        _error(command, "out of memory; try a smaller model, batch or --input-shape")
        return 2
    hint = "" if debug else " (run with --debug for the traceback)"
    _error(command, f"internal error: {type(exc).__name__}: {exc}{hint}")
    return 1


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
