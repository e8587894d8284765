"""``secateurs build``: ONNX -> TensorRT engine with 2:4 sparse tensor cores.

Always prints the 2:4 eligibility report (pure onnx + numpy) and the equivalent ``trtexec``
command; then builds the engine when TensorRT and a GPU are present. Without them it exits 2
with a message saying so, after printing both, so the report is useful on any machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from secateurs.errors import InputError
from secateurs.runtime.io import atomic_write_bytes
from secateurs.runtime.paths import Output, check_input_file, check_outputs, read_onnx
from secateurs.runtime.tensorrt import (
    PRECISIONS,
    build_engine,
    check_sparse_eligibility,
    installed_api,
    onnx_precision,
    plan_build,
    trtexec_command,
)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build", help="build a TensorRT engine (sparse tensor cores) from an ONNX model",
        description=__doc__.splitlines()[0])
    p.add_argument("model", help="ONNX model")
    p.add_argument("--engine", help="engine output path (default: MODEL with suffix .plan)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: the ONNX's own types (fp16 tensors, Q/DQ int8), strongly typed")
    p.add_argument("--no-sparse", dest="sparse", action="store_false",
                   help="do not set BuilderFlag.SPARSE_WEIGHTS (--sparsity=disable)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="workspace pool limit, GiB")
    typed = p.add_mutually_exclusive_group()
    typed.add_argument("--strongly-typed", dest="strongly_typed", action="store_true",
                       default=None, help="precisions from the ONNX types (TensorRT 10+)")
    typed.add_argument("--weakly-typed", dest="strongly_typed", action="store_false")
    p.add_argument("--print-trtexec", action="store_true",
                   help="print the eligibility report and the trtexec command, do not build")
    p.add_argument("--report", help="write the eligibility (and build) report as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_input_file(args.model, "ONNX model")
    if not args.model.lower().endswith(".onnx"):
        raise InputError(f"'{args.model}' is not an .onnx file; build reads ONNX models")
    model = Path(args.model)
    engine = Path(args.engine) if args.engine else model.with_suffix(".plan")
    check_outputs([Output("--engine", None if args.print_trtexec else str(engine),
                          (".plan", ".engine", ".trt"), "TensorRT engine"),
                   Output("--report", args.report, (".json",), "report")],
                  {f"the input model '{model}'": str(model)})
    if args.workspace_gb <= 0:
        raise InputError(f"--workspace-gb must be > 0, got {args.workspace_gb}")
    read_onnx(args.model)  # InputError: corrupt, truncated or an empty graph
    eligibility = check_sparse_eligibility(model)
    print(eligibility.to_text())
    settings = plan_build(installed_api(), args.precision, onnx_precision(model), args.sparse,
                          args.strongly_typed)
    cmd = trtexec_command(model, engine, sparse=args.sparse, workspace_gb=args.workspace_gb,
                          settings=settings)
    print("\nequivalent trtexec command:\n  " + shlex.join(cmd))
    for note in settings.notes:
        print(f"note: {note}")
    report: dict = {"model": str(model), "eligibility": eligibility.to_dict(),
                    "trtexec": cmd}
    if args.print_trtexec:
        _write_report(args.report, report)
        return 0
    _write_report(args.report, report)  # the part that does not need TensorRT, first
    print(f"\nbuilding {engine} ({settings.precision}, sparse={'on' if args.sparse else 'off'})...",
          file=sys.stderr)
    built = build_engine(model, engine, precision=args.precision, sparse=args.sparse,
                         workspace_gb=args.workspace_gb, strongly_typed=args.strongly_typed)
    print(f"\nengine written: {built.engine_path} (TensorRT {built.tensorrt_version}, "
          f"{built.build_seconds:.1f} s, strongly typed={built.strongly_typed})")
    print(f"TensorRT: {len(built.eligible_layers)} layer(s) eligible for sparse math, "
          f"{len(built.sparse_layers)} picked sparse")
    for name in built.sparse_layers:
        print(f"  sparse: {name}")
    for note in built.notes:
        print(f"note: {note}")
    report["build"] = {k: v for k, v in asdict(built).items()
                       if k not in ("eligibility", "log")}
    _write_report(args.report, report)
    return 0


def _write_report(path: str | None, report: dict) -> None:
    if path:
        atomic_write_bytes(path, (json.dumps(report, indent=1, default=str) + "\n").encode())
