"""``secateurs sparsify MODEL -o OUT``: N:M / unstructured / block sparsity for ONNX and torch models.

MODEL is an ONNX file (``*.onnx``, magnitude only), ``zoo:NAME`` (``secateurs.zoo``), or
``path/to/file.py:factory`` where ``factory()`` returns an ``nn.Module`` or a pair
``(module, example_inputs)``. Torch results are saved with ``torch.save`` as
``{"state_dict", "masks", "report"}``; the example inputs serve as calibration for
``--method wanda|sparsegpt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.errors import InputError

__all__ = ["register", "run", "load_torch_spec"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sparsify",
        help="rewrite weights to 2:4 / N:M / unstructured / block sparsity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="*.onnx file, zoo:NAME, or path/to/file.py:factory")
    parser.add_argument("-o", "--output", required=True, help="output file (.onnx for ONNX input, .pt for torch)")
    parser.add_argument("--pattern", default="2:4", help="'2:4', any 'N:M', 'unstructured' or 'bsr' (default 2:4)")
    parser.add_argument("--method", default="magnitude", choices=("magnitude", "wanda", "sparsegpt"))
    parser.add_argument("--sparsity", type=float, default=0.5, help="target for unstructured/bsr (default 0.5)")
    parser.add_argument("--block-size", type=int, default=16, help="BSR block size (default 16)")
    parser.add_argument("--min-numel", type=int, default=0, help="skip weights with fewer elements")
    parser.add_argument("--ignore", action="append", default=[], metavar="NAME",
                        help="module/parameter (torch) or node/initializer (ONNX) to leave dense; repeatable, "
                        "comma-separated lists allowed")
    parser.add_argument("--report-json", default=None, help="also write the report as JSON here")
    parser.set_defaults(func=run)


def _load_file_factory(spec: str) -> tuple[nn.Module, Any]:
    file, _, factory_name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_secateurs_user_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InputError(f"{path} has no callable {factory_name!r}")
    built = factory()
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        return built[0], built[1]
    if not isinstance(built, nn.Module):
        raise InputError(f"{spec} returned {type(built).__name__}; return an nn.Module or (module, example_inputs)")
    return built, None


def load_torch_spec(spec: str) -> tuple[nn.Module, Any]:
    """``zoo:NAME`` or ``file.py:factory`` -> ``(model, example_inputs or None)``."""
    if spec.startswith("zoo:"):
        from secateurs import zoo

        entry = zoo.get(spec[len("zoo:"):])
        return entry.build(), entry.example_inputs()
    if ".py:" in spec:
        return _load_file_factory(spec)
    raise InputError(f"model {spec!r} is not understood; give a *.onnx file, zoo:NAME or file.py:factory")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _ignore_list(values: list[str]) -> tuple[str, ...]:
    return tuple(x.strip() for value in values for x in value.split(",") if x.strip())


def run(args: argparse.Namespace) -> int:
    ignore = _ignore_list(args.ignore)
    output = Path(args.output)
    if args.model.endswith(".onnx"):
        from secateurs.passes.onnx_sparsify import sparsify_onnx_with_report

        if args.method != "magnitude":
            raise InputError(f"--method {args.method} needs a torch model; ONNX input supports magnitude only")
        _, report = sparsify_onnx_with_report(
            args.model, args.pattern, args.sparsity, ignore, args.min_numel, output_path=output
        )
    else:
        from secateurs.passes.sparsify import sparsify

        model, example = load_torch_spec(args.model)
        calibration = [example] if example is not None else None
        result = sparsify(
            model, pattern=args.pattern, sparsity=args.sparsity, method=args.method, calibration=calibration,
            ignore=ignore, block_size=args.block_size, min_numel=args.min_numel, inplace=True,
        )
        report = result.report
        _atomic_torch_save(
            {"state_dict": result.model.state_dict(), "masks": result.masks, "report": report.to_dict()}, output
        )
    print(report.table())
    print(f"wrote {output}")
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report.to_dict(), indent=1))
    return 0 if report.all_valid else 1
