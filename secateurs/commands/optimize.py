"""``secateurs optimize MODEL -o OUT.onnx``: prune -> sparsify -> quantize in one command.

MODEL is an ``.onnx`` file, ``zoo:NAME`` or ``path/to/file.py:factory``. Every stage is
optional; the report table gives, per stage, size on disk, MACs, ONNX Runtime CPU latency
(median, all stages interleaved), the largest output difference from the input model, and for
2:4 the layers TensorRT could run sparse. Nothing is written unless every stage passed.

    secateurs optimize zoo:resnet50_full -o r50.int8.onnx --prune 0.5 --quantize int8 \\
        --calibration inputs.npz --report report.json --plot report.png

``--quantize int8`` writes QDQ: ``--int8-profile ort`` (default: uint8 activations, ONNX
Runtime CPU's fast path) or ``tensorrt`` (symmetric int8, what TensorRT builds).
``--int8-weights auto`` (default) quantizes weights to 7 bits for the ort profile on an x86
CPU without VNNI, where ONNX Runtime's uint8 x int8 kernels saturate; ``8`` for a VNNI/AMX
or ARM target built elsewhere. An int8 model further than 20% from its float input is
refused with its noisiest activations and the nodes that keep them float: ``--keep-float``
them (``--keep-float auto`` does it, up to four rounds), or ``--quantize-op-types MatMul`` for
a transformer.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "optimize", help="prune, sparsify and quantize into one ONNX, with a per-stage report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="*.onnx, zoo:NAME or path/to/file.py:factory")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="write the final model here")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prune", type=float, metavar="RATIO",
                       help="remove this fraction of the units of every exact channel group")
    group.add_argument("--target-macs", type=float, metavar="F",
                       help="prune to this fraction of the dense MACs")
    group.add_argument("--target-latency", type=float, metavar="F",
                       help="prune to this fraction of the estimated ORT CPU latency (the "
                       "smallest ratio that meets it)")
    p.add_argument("--sparsify", metavar="N:M", help="magnitude N:M sparsity, e.g. 2:4")
    p.add_argument("--quantize", choices=("int8", "fp16"), help="INT8 QDQ or fp16")
    p.add_argument("--int8-profile", choices=("ort", "tensorrt"), default="ort",
                   help="int8 activations: ort = uint8 (fast on ORT CPU), tensorrt = "
                   "symmetric int8 (default ort)")
    p.add_argument("--int8-weights", choices=("auto", "8", "7"), default="auto",
                   help="int8 weight bits: auto = 7 for the ort profile on an x86 CPU without "
                   "VNNI (its kernels saturate), else 8 (default auto)")
    p.add_argument("--keep-float", metavar="NODE,...|auto", type=_names, default=[],
                   help="node names the quantize stage leaves float (names of the pruned "
                   "graph, as the int8 check's refusal lists its noisiest nodes); auto: "
                   "keep the nodes that refusal names float and requantize until it passes")
    p.add_argument("--quantize-op-types", metavar="OP,...", type=_names, default=None,
                   help="int8 only these ONNX op types, e.g. MatMul for a transformer whose "
                   "residual Add/LayerNorm carry outliers (default: every type ORT quantizes)")
    p.add_argument("--calibration", metavar="FILE.npz",
                   help="int8 calibration inputs: one array per model input, samples on dim 0")
    p.add_argument("--importance", default="l2", help="pruning criterion (default l2)")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep pruned widths multiples of this (default: widths per op kind "
                   "for ONNX Runtime's CPU kernels, narrow groups whole, as 'secateurs prune' "
                   "on an ONNX model; 1 removes units one at a time)")
    p.add_argument("--input-shape", action="append", metavar="[NAME=]SHAPE",
                   help="input shape, e.g. 1,3,224,224 (torch specs) or x=1,3,224,224 (ONNX "
                   "with symbolic dims)")
    p.add_argument("--report", metavar="REPORT.json", help="write the report as JSON")
    p.add_argument("--plot", metavar="REPORT.png", help="plot size and latency per stage")
    p.add_argument("--threads", type=int, default=1, help="ORT threads for latency (default 1)")
    p.add_argument("--repeats", type=int, default=30,
                   help="interleaved latency runs per model (default 30)")
    p.add_argument("--no-measure", action="store_true", help="skip the latency stage")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give one or more comma-separated names")
    return names


def run(args: argparse.Namespace) -> int:
    from secateurs.commands._spec import is_onnx, load_torch_spec, parse_shapes
    from secateurs.errors import InputError
    from secateurs.passes.optimize import optimize
    from secateurs.runtime.paths import Output, check_outputs

    if not (args.output or args.report or args.plot or args.json):
        raise InputError("optimize writes nothing: give -o OUT.onnx, --report, --plot or --json")
    inputs = [args.model] if is_onnx(args.model) else []
    inputs += [args.model.rsplit(":", 1)[0]] if ".py:" in args.model else []
    if args.calibration:
        inputs.append(args.calibration)
    # before the model is built: a bad output path costs nothing
    check_outputs([Output("-o", args.output, (".onnx",), "model"),
                   Output("--report", args.report, (".json",), "report"),
                   Output("--plot", args.plot, (".png",), "plot")],
                  {f"the input '{p}'": p for p in inputs})
    shapes = parse_shapes(args.input_shape)
    if is_onnx(args.model):
        model: Any = args.model
        example = None
        input_shapes = {item.split("=", 1)[0]: list(s) for item, s in
                        zip(args.input_shape or [], shapes) if "=" in item} or None
    else:
        model, example = load_torch_spec(args.model, shapes)
        input_shapes = None

    def say(line: str) -> None:
        print(f"[optimize] {line}", file=sys.stderr, flush=True)

    result = optimize(model, example, prune=args.prune, target_macs=args.target_macs,
                      target_latency=args.target_latency,
                      sparsify=args.sparsify, quantize=args.quantize,
                      calibration=args.calibration, profile=args.int8_profile,
                      reduce_range={"auto": None, "8": False, "7": True}[args.int8_weights],
                      keep_float="auto" if args.keep_float == ["auto"] else args.keep_float,
                      quantize_op_types=args.quantize_op_types,
                      importance=args.importance, round_to=args.round_to,
                      input_shapes=input_shapes, output=args.output, report=args.report,
                      plot=args.plot, measure=not args.no_measure, threads=args.threads,
                      repeats=args.repeats, progress=say)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2, default=str)
        print()
    else:
        print(result.table())
        for label, path in (("model", args.output), ("report", args.report),
                            ("plot", args.plot)):
            if path:
                print(f"wrote {label} {path}")
    return 0
