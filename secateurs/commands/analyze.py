"""``secateurs analyze``: print the channel groups of a torch model spec."""

from __future__ import annotations

import argparse
import json
import sys

from secateurs.commands._spec import is_onnx, load_torch_spec, parse_shapes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="print channel groups, units, lossy and pinned reasons",
        description="Dependency analysis only: which channels are coupled and why some are "
        "pinned. MODEL is zoo:NAME or path/to/file.py:factory (use 'inspect' for .onnx).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (once per input)")
    p.add_argument("--all", action="store_true", help="also list fully pinned groups")
    p.add_argument("--json", action="store_true", help="print groups as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from secateurs import analyze

    if is_onnx(args.model):
        from secateurs.errors import InputError

        raise InputError("use 'secateurs inspect MODEL.onnx' for ONNX files")
    from secateurs.runtime.paths import check_input_file, spec_files

    for f in spec_files(args.model):
        check_input_file(f, "model")
    model, inputs = load_torch_spec(args.model, parse_shapes(args.input_shape))
    analysis = analyze(model, inputs)
    rows = []
    for g in analysis.groups:
        if g.is_pinned and not args.all:
            continue
        rows.append({
            "id": g.id, "units": g.size, "prunable": g.prunable, "lossy": g.is_lossy,
            "members": [f"{m.param}[{m.dim}]" for m in g.members],
            "pinned": list(g.pin_reasons), "lossy_reasons": list(g.lossy_reasons),
        })
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    pinned = sum(1 for g in analysis.groups if g.is_pinned)
    print(f"{len(analysis.groups)} channel groups ({pinned} fully pinned"
          f"{'' if args.all else ', hidden; --all shows them'})")
    for r in rows:
        kind = "lossy" if r["lossy"] else "exact"
        print(f"group {r['id']:>4}: {r['prunable']:>5}/{r['units']:<5} prunable units, {kind}")
        for m in r["members"][:8]:
            print(f"    {m}")
        if len(r["members"]) > 8:
            print(f"    ... {len(r['members']) - 8} more")
        for reason in (r["pinned"][:2] + r["lossy_reasons"][:1]):
            print(f"    note: {reason}")
    return 0
