"""``secateurs bench``: ONNX Runtime latency of a dense model and its pruned variants.

All models of one (threads, batch) configuration are timed interleaved, above one thread in
blocks of runs with one live session at a time, because idle sessions' spinning worker
threads would take the running one's cores (see ``secateurs.runtime.ort.compare``). Prints a table (p50/p90/p99 ms, items/s, speedup vs the
dense model) to stdout, progress to stderr, and writes JSON / PNG atomically when asked.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import TYPE_CHECKING

from secateurs.errors import InputError
from secateurs.runtime.io import atomic_write_bytes
from secateurs.runtime.paths import Output, check_input_file, check_outputs, read_onnx

if TYPE_CHECKING:
    from secateurs.runtime.ort import CompareTable

__all__ = ["register", "run", "plot_table"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="ONNX Runtime latency: dense vs pruned models, side by side",
        description=__doc__.splitlines()[0])
    p.add_argument("dense", help="the dense (reference) ONNX model")
    p.add_argument("pruned", nargs="*", help="pruned ONNX models to compare with it")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="intra-op thread counts (default: 1 2)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16],
                   help="batch sizes (default: 1 16); needs a symbolic batch dim for > 1")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per model and config")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed runs per model and config (above one thread: per session "
                        "block)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="size of a symbolic input dim other than the batch, e.g. seq=128")
    p.add_argument("--provider", action="append", dest="providers", metavar="EP",
                   help="ONNX Runtime execution provider (repeatable; default CPU)")
    p.add_argument("--disable-optimizer", action="append", default=[], metavar="NAME",
                   dest="disabled_optimizers",
                   help="an ONNX Runtime graph transformer every session skips (repeatable), "
                   "e.g. SkipLayerNormFusion: on ORT 1.32's CPU provider a fused "
                   "SkipLayerNormalization runs ~7x slower than the Add + LayerNormalization "
                   "it replaces (post-norm BERT-style models)")
    p.add_argument("--json", dest="json_path", help="write results as JSON here")
    p.add_argument("--png", dest="png_path", help="write a latency / speedup chart here")
    p.set_defaults(func=run)


def _parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise InputError(f"--dim expects NAME=N (e.g. seq=128), got {item!r}")
        dims[name.strip()] = int(value)
    return dims


def _fixed_batch(path: str) -> int | None:
    """The model's batch size when dim 0 of its first input is a fixed number, else None."""
    model = read_onnx(path)  # InputError on missing, empty, truncated or empty-graph files
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise InputError(f"'{path}' has no graph inputs to feed")
    dims = inputs[0].type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and not dims[0].HasField("dim_param"):
        return int(dims[0].dim_value)
    return None


def _runnable_batches(paths: list[str], wanted: list[int]) -> tuple[list[int], list[str]]:
    """The requested batch sizes every model can run, and notes on what was left out."""
    fixed = {p: _fixed_batch(p) for p in paths}
    sizes = {b for b in fixed.values() if b is not None}
    if len(sizes) > 1:
        raise InputError("the models have different fixed batch sizes "
                         f"({', '.join(f'{p}: {b}' for p, b in fixed.items() if b)}); "
                         "export them with the same batch or a symbolic one")
    if not sizes:
        return wanted, []
    size = sizes.pop()
    pinned = [p for p, b in fixed.items() if b is not None]
    notes = [f"{', '.join(pinned)} has a fixed batch of {size}"]
    keep = [b for b in wanted if b == size] or [size]
    dropped = [b for b in wanted if b != size]
    if dropped:
        notes.append(f"batch {', '.join(map(str, dropped))} skipped; timing batch {size} only "
                     "(export with a symbolic batch dim to time other sizes)")
    return keep, notes


def run(args: argparse.Namespace) -> int:
    paths = [args.dense, *args.pruned]
    for path in paths:
        check_input_file(path, "ONNX model")
    check_outputs([Output("--json", args.json_path, (".json",), "results"),
                   Output("--png", args.png_path, (".png",), "chart")],
                  {f"the model '{p}'": p for p in paths})
    if args.repeats < 1 or args.warmup < 0:
        raise InputError("--repeats must be >= 1 and --warmup >= 0")
    if any(b < 1 for b in args.batch):
        raise InputError(f"--batch sizes must be >= 1, got {args.batch}")
    if any(t < 1 for t in args.threads):
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    dims = _parse_dims(args.dim)
    batches, notes = _runnable_batches(paths, list(args.batch))
    for note in notes:
        print(f"bench: note: {note}", file=sys.stderr, flush=True)
    from secateurs.runtime.ort import compare

    table = compare(
        args.dense, list(args.pruned), threads=args.threads, batch=batches,
        warmup=args.warmup, repeats=args.repeats, dims=dims,
        providers=args.providers or ("CPUExecutionProvider",),
        progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True),
        disabled_optimizers=args.disabled_optimizers,
    )
    print(table.to_text())
    if args.json_path:
        atomic_write_bytes(args.json_path, (json.dumps(table.to_dict(), indent=1) + "\n").encode())
        print(f"bench: wrote {args.json_path}", file=sys.stderr)
    if args.png_path:
        atomic_write_bytes(args.png_path, plot_table(table))
        print(f"bench: wrote {args.png_path}", file=sys.stderr)
    return 0


def plot_table(table: CompareTable) -> bytes:
    """PNG bytes: p50 latency per configuration (left) and speedup vs dense (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r.threads, r.batch) for r in table.rows})
    labels = [f"t{t} b{b}" for t, b in configs]
    width = 0.8 / len(table.models)
    fig, (ax_lat, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    for k, model in enumerate(table.models):
        rows = {(r.threads, r.batch): r for r in table.rows if r.model == model}
        xs = [i + k * width for i in range(len(configs))]
        ax_lat.bar(xs, [rows[c].stats.p50 for c in configs], width, label=model)
        ax_speed.bar(xs, [rows[c].speedup_p50 for c in configs], width, label=model)
    for ax, title in ((ax_lat, "p50 latency (ms)"), (ax_speed, "speedup vs dense (p50)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], labels)
        ax.set_title(title)
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_lat.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
