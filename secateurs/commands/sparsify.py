"""``secateurs sparsify MODEL -o OUT``: N:M / unstructured / block sparsity for ONNX and torch models.

MODEL is an ONNX file (``*.onnx``, magnitude only), ``zoo:NAME`` (``secateurs.zoo``), or
``path/to/file.py:factory`` where ``factory()`` returns an ``nn.Module`` or a pair
``(module, example_inputs)``. Torch results are saved with ``torch.save`` as
``{"state_dict", "masks", "report"}``; the example inputs serve as calibration for
``--method wanda|sparsegpt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from secateurs.commands._spec import load_torch_spec
from secateurs.errors import InputError
from secateurs.runtime.io import atomic_save_torch, atomic_write_text
from secateurs.runtime.paths import (
    Output,
    check_input_file,
    check_outputs,
    read_onnx,
    spec_files,
)

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sparsify",
        help="rewrite weights to 2:4 / N:M / unstructured / block sparsity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="*.onnx file, zoo:NAME, or path/to/file.py:factory")
    parser.add_argument("-o", "--output", required=True, help="output file (.onnx for ONNX input, .pt for torch)", metavar="OUT")
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


def _ignore_list(values: list[str]) -> tuple[str, ...]:
    return tuple(x.strip() for value in values for x in value.split(",") if x.strip())


def run(args: argparse.Namespace) -> int:
    ignore = _ignore_list(args.ignore)
    onnx_in = args.model.lower().endswith(".onnx")
    for f in spec_files(args.model):
        check_input_file(f, "model")
    inputs = {f"the input model '{f}'" if onnx_in else f"the model spec file '{f}'": f
              for f in spec_files(args.model)}
    suffixes = (".onnx",) if onnx_in else (".pt", ".pth")
    check_outputs([Output("-o", args.output, suffixes,
                          "sparse ONNX model" if onnx_in else "sparse torch state (torch.save)"),
                   Output("--report-json", args.report_json, (".json",), "report")], inputs)
    if not 0.0 <= args.sparsity < 1.0:
        raise InputError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.block_size < 1 or args.min_numel < 0:
        raise InputError("--block-size must be >= 1 and --min-numel >= 0")
    output = Path(args.output)
    if onnx_in:
        from secateurs.passes.onnx_sparsify import sparsify_onnx_with_report

        if args.method != "magnitude":
            raise InputError(f"--method {args.method} needs a torch model; ONNX input supports magnitude only")
        read_onnx(args.model)  # InputError: corrupt, empty (the graph only, not the weights)
        # by path: large external tensors are read and written one at a time, external data
        # in gives external data out, and nothing is written when no layer was sparsified
        _, report = sparsify_onnx_with_report(
            args.model, args.pattern, args.sparsity, ignore, args.min_numel, output_path=output,
            before_save=lambda rep: _check_something_sparsified(rep, args))
    else:
        from secateurs.passes.sparsify import sparsify

        model, example = load_torch_spec(args.model, require_inputs=False)
        calibration = [example] if example is not None else None
        result = sparsify(
            model, pattern=args.pattern, sparsity=args.sparsity, method=args.method, calibration=calibration,
            ignore=ignore, block_size=args.block_size, min_numel=args.min_numel, inplace=True,
        )
        report = result.report
        _check_something_sparsified(report, args)
        atomic_save_torch(
            {"state_dict": result.model.state_dict(), "masks": result.masks, "report": report.to_dict()}, output
        )
    print(report.table())
    print(f"wrote {output}")
    if args.report_json:
        atomic_write_text(args.report_json, json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"wrote {args.report_json}")
    return 0 if report.all_valid else 1


def _check_something_sparsified(report: Any, args: argparse.Namespace) -> None:
    if report.layers:
        return
    reasons = sorted({getattr(s, "reason", str(s)) for s in report.skipped})
    raise InputError(f"nothing to sparsify in '{args.model}': every layer was skipped "
                     f"({'; '.join(reasons[:3]) or 'no eligible weights'}); lower --min-numel or "
                     "check --ignore/--pattern. Nothing was written")
