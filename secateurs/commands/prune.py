"""``secateurs prune``: structured pruning of a torch model spec or an ONNX file."""

from __future__ import annotations

import argparse
import json
import sys

from secateurs.commands._spec import is_onnx, load_torch_spec, parse_shapes
from secateurs.errors import InputError
from secateurs.runtime.paths import Output, check_input_file, check_outputs, spec_files

__all__ = ["register", "run"]

_CALIBRATED = ("taylor", "fisher", "hessian", "activation")

_EPILOG = """\
importance criteria:
  l1, l2 (default), bn_scale, lamp, random   from the weights alone
  activation                                 mean |activation|: needs --calibration
  taylor, fisher (hessian)                   loss gradients: need --calibration with a
                                             'labels' array, or --loss file.py:fn

calibration data (--calibration inputs.npz): one array per model input, samples on dim 0,
in the model's argument order (numpy.savez('inputs.npz', x) or savez(..., x=x, labels=y));
an array named 'labels' is the targets. Example:
  secateurs prune zoo:resnet --importance activation --calibration inputs.npz -o r.pt2
  secateurs prune zoo:resnet --importance taylor --calibration inputs_and_labels.npz -o r.pt2

outputs: torch models are written as .pt2 (torch.export, dynamic batch dim;
torch.export.load(path).module()) or .pt (torch.load(path, weights_only=False)); ONNX input
gives .onnx output. Every output is checked before the work starts (not the input, a
directory that exists, writable, right extension) and written atomically.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune", help="remove whole channel groups (exact by default)",
        description="Remove the least important channels of every exact channel group. MODEL is "
        "zoo:NAME (built-in zoo), path/to/file.py:factory, or an .onnx file.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output",
                   help="write the pruned model here: .pt2 (torch.export program) or .pt for "
                   "torch, .onnx for ONNX")
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of each channel group's width removed; attention loses whole heads "
                        "first (default 0.5)")
    p.add_argument("--target-latency", type=float, default=None, metavar="F",
                   help="instead of --ratio: prune to this fraction of the estimated ONNX Runtime "
                        "CPU latency (the smallest ratio that meets it)")
    p.add_argument("--importance", default="l2",
                   help="importance criterion (default l2; see below)")
    p.add_argument("--calibration", metavar="FILE.npz",
                   help="calibration inputs for activation/taylor/fisher (see below)")
    p.add_argument("--calibration-batch", type=int, default=32, metavar="N",
                   help="samples per calibration batch (default 32)")
    p.add_argument("--labels-key", metavar="NAME",
                   help="array of the --calibration file holding the labels (default: "
                   "labels, label, targets or y)")
    p.add_argument("--loss", metavar="LOSS",
                   help="loss for taylor/fisher: cross_entropy (default with labels), mse, "
                   "or path/to/file.py:fn with fn(output, labels) -> scalar")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep widths multiples of this (8/16 for tensor cores and SIMD); an "
                   "ONNX model defaults to widths per op kind for ONNX Runtime's CPU kernels "
                   "(narrow groups stay whole); 1 removes units one at a time")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank units across groups instead of within each group")
    p.add_argument("--allow-lossy", action="store_true",
                   help="also prune groups normalised over the pruned dim (LayerNorm, softmax)")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="module or parameter name whose channels are kept (repeatable)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (once per input)")
    p.add_argument("--static-batch", action="store_true",
                   help=".pt2 output: keep the example's batch size fixed (default: dynamic)")
    p.add_argument("--plan", metavar="PLAN.json", help="write the pruning plan here")
    p.add_argument("--verify", action="store_true",
                   help="check mask-equivalence against the original (exit 1 if it fails)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _check_options(args: argparse.Namespace) -> None:
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise InputError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.target_latency is not None and not 0.0 < args.target_latency < 1.0:
        raise InputError(f"--target-latency must be in (0, 1) (the fraction of the estimated "
                         f"latency to keep), got {args.target_latency}")
    if args.round_to is not None and args.round_to < 1:
        raise InputError(f"--round-to must be >= 1, got {args.round_to}")
    from secateurs.passes.importance import criterion_needs

    needs = criterion_needs(args.importance)  # InputError naming the criteria if unknown
    if needs and not args.calibration:
        raise InputError(f"--importance {args.importance} scores units from data: pass "
                         "--calibration inputs.npz (one array per model input, samples on dim "
                         "0; see 'secateurs prune --help')")
    if args.calibration and not needs:
        raise InputError(f"--calibration is only read by {', '.join(_CALIBRATED)}; "
                         f"--importance {args.importance} does not use it")


def run(args: argparse.Namespace) -> int:
    onnx_in = is_onnx(args.model)
    suffixes = (".onnx",) if onnx_in else (".pt2", ".pt", ".pth")
    what = "pruned ONNX model" if onnx_in else "pruned torch model"
    if onnx_in and args.output and not args.output.lower().endswith(".onnx"):
        raise InputError(f"-o '{args.output}': an ONNX input is pruned to an ONNX file; name "
                         "it .onnx")
    inputs = {f"the input model '{f}'" if f.lower().endswith(".onnx") else
              f"the model spec file '{f}'": f for f in spec_files(args.model)}
    if args.calibration:
        inputs[f"the calibration file '{args.calibration}'"] = args.calibration
    if args.loss and ".py:" in args.loss:
        inputs[f"the loss file '{args.loss.rsplit(':', 1)[0]}'"] = args.loss.rsplit(":", 1)[0]
    for f in spec_files(args.model):
        check_input_file(f, "model")
    if args.calibration:
        check_input_file(args.calibration, "calibration", "--calibration")
    check_outputs([Output("-o", args.output, suffixes, what),
                   Output("--plan", args.plan, (".json",), "plan")], inputs)
    _check_options(args)
    shapes = parse_shapes(args.input_shape)
    if args.ratio is not None and args.target_latency is not None:
        raise InputError("give --ratio or --target-latency, not both")
    ratio = args.ratio if args.target_latency is not None or args.ratio is not None else 0.5
    options = dict(ratio=ratio, target_latency=args.target_latency, importance=args.importance,
                   ignore=tuple(args.ignore), global_pruning=args.global_pruning,
                   allow_lossy=args.allow_lossy, verify=args.verify)
    note = None
    if onnx_in:
        from secateurs.passes.prune_onnx import prune_onnx

        if args.calibration:
            raise InputError(f"--importance {args.importance} needs a torch model (it runs the "
                             "model for activations/gradients); for .onnx use l1, l2 or lamp")
        input_shapes = {item.split("=", 1)[0]: list(s) for item, s in
                        zip(args.input_shape or [], shapes) if "=" in item} or None
        if args.round_to is not None:
            options["round_to"] = args.round_to  # else the ONNX Runtime default (16)
        result = prune_onnx(args.model, input_shapes=input_shapes, **options)
        _check_something_removed(result, args)
        if args.output:
            result.save(args.output)  # atomic; keeps external data if the input had it
    else:
        from secateurs import prune

        model, inputs_ = load_torch_spec(args.model, shapes)
        if args.calibration:
            options["score_context"] = _score_context(args, model, inputs_)
        if options["ratio"] is None:  # torch's prune takes a ratio it ignores
            options["ratio"] = 0.0
        result = prune(model, inputs_, round_to=args.round_to, **options)
        _check_something_removed(result, args)
        if args.output:
            note = _save_torch(result.model, inputs_, args)
    if args.plan:
        from secateurs.runtime.io import atomic_write_text

        atomic_write_text(args.plan, result.plan.to_json())
    if args.json:
        json.dump(result.report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(result.report.table())
        if args.output:
            print(f"wrote {args.output}")
        if args.plan:
            print(f"wrote {args.plan}")
    if note:
        print(f"secateurs prune: note: {note}", file=sys.stderr)
    return 0 if result.report.exact in (None, True) else 1


def _save_torch(model: object, inputs: tuple, args: argparse.Namespace) -> str | None:
    from secateurs.commands._spec import save_model

    return save_model(model, inputs, args.output, dynamic_batch=not args.static_batch)


def _check_something_removed(result: object, args: argparse.Namespace) -> None:
    removed = getattr(getattr(result, "plan", None), "removed", None)
    if removed is not None and not removed:
        at = (f"--target-latency {args.target_latency}" if args.target_latency is not None
              else f"--ratio {0.5 if args.ratio is None else args.ratio}")
        widths = "" if args.round_to is not None or not str(args.model).endswith(".onnx") \
            else ("; on an ONNX model groups narrower than ONNX Runtime's kernel widths stay "
                  "whole by default: --round-to 1 removes units one at a time")
        see = "inspect" if str(args.model).endswith(".onnx") else "analyze"
        raise InputError(f"nothing to prune in '{args.model}' at {at}: every "
                         "channel group is pinned, ignored or too small to lose a unit "
                         f"(see 'secateurs {see}'){widths}; nothing was written")


def _score_context(args: argparse.Namespace, model: object, example: tuple) -> object:
    from secateurs.commands._calibration import load_calibration_batches, make_loss
    from secateurs.passes.importance import calibration_context, criterion_needs

    batches, labels = load_calibration_batches(args.calibration, args.calibration_batch,
                                               args.labels_key, example)
    needs = criterion_needs(args.importance)
    loss_fn = make_loss(args.loss, batches, labels) if needs & {"grads", "fisher"} else None
    print(f"secateurs prune: calibrating {args.importance} on {len(batches)} batch(es) from "
          f"{args.calibration}", file=sys.stderr)
    return calibration_context(model, batches, loss_fn, args.importance)
