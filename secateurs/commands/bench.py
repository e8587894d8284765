"""``secateurs bench``: ONNX Runtime latency of a dense model and its pruned variants.

All models of one (threads, batch) configuration are timed interleaved (see
``secateurs.runtime.ort.compare``). Prints a table (p50/p90/p99 ms, items/s, speedup vs the
dense model) to stdout, progress to stderr, and writes JSON / PNG atomically when asked.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from secateurs.errors import InputError
from secateurs.runtime.io import atomic_write_bytes
from secateurs.runtime.ort import CompareTable, compare

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
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per model and config")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="size of a symbolic input dim other than the batch, e.g. seq=128")
    p.add_argument("--provider", action="append", dest="providers", metavar="EP",
                   help="ONNX Runtime execution provider (repeatable; default CPU)")
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


def run(args: argparse.Namespace) -> int:
    for path in [args.dense, *args.pruned]:
        if not Path(path).is_file():
            raise InputError(f"ONNX model file not found: '{path}'")
    if args.repeats < 1 or args.warmup < 0:
        raise InputError("--repeats must be >= 1 and --warmup >= 0")
    table = compare(
        args.dense, list(args.pruned), threads=args.threads, batch=args.batch,
        warmup=args.warmup, repeats=args.repeats, dims=_parse_dims(args.dim),
        providers=args.providers or ("CPUExecutionProvider",),
        progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True),
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
