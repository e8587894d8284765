"""``secateurs prune``: structured pruning of a torch model spec or an ONNX file."""

from __future__ import annotations

import argparse
import json
import sys

from secateurs.commands._spec import (
    atomic_write_text,
    is_onnx,
    load_torch_spec,
    parse_shapes,
    save_model,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune", help="remove whole channel groups (exact by default)",
        description="Remove the least important channels of every exact channel group. MODEL is "
        "zoo:NAME (built-in zoo), path/to/file.py:factory, or an .onnx file.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", help="write the pruned model here: .pt2 (torch.export program) or .pt for torch, .onnx for ONNX")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of units removed in each group (default 0.5)")
    p.add_argument("--importance", default="l2", help="importance criterion (default l2)")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep widths multiples of this (8/16 for tensor cores and SIMD; ONNX "
                   "output defaults to 16, the ONNX Runtime CPU conv block measured here)")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank units across groups instead of within each group")
    p.add_argument("--allow-lossy", action="store_true",
                   help="also prune groups normalised over the pruned dim (LayerNorm, softmax)")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="module or parameter name whose channels are kept (repeatable)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (once per input)")
    p.add_argument("--plan", metavar="PLAN.json", help="write the pruning plan here")
    p.add_argument("--verify", action="store_true",
                   help="check mask-equivalence against the original (exit 1 if it fails)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    shapes = parse_shapes(args.input_shape)
    options = dict(ratio=args.ratio, importance=args.importance,
                   ignore=tuple(args.ignore), global_pruning=args.global_pruning,
                   allow_lossy=args.allow_lossy, verify=args.verify)
    if is_onnx(args.model):
        from secateurs.passes.prune_onnx import prune_onnx

        input_shapes = {item.split("=", 1)[0]: list(s) for item, s in
                        zip(args.input_shape or [], shapes) if "=" in item} or None
        if args.round_to is not None:
            options["round_to"] = args.round_to  # else the ONNX Runtime default (16)
        result = prune_onnx(args.model, input_shapes=input_shapes, **options)
        if args.output:
            result.save(args.output)  # atomic; keeps external data if the input had it
    else:
        from secateurs import prune

        model, inputs = load_torch_spec(args.model, shapes)
        result = prune(model, inputs, round_to=args.round_to, **options)
        if args.output:
            save_model(result.model, inputs, args.output)
    if args.plan:
        atomic_write_text(result.plan.to_json(), args.plan)
    if args.json:
        json.dump(result.report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(result.report.table())
        if args.output:
            print(f"wrote {args.output}")
        if args.plan:
            print(f"wrote {args.plan}")
    return 0 if result.report.exact in (None, True) else 1
