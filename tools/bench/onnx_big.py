"""A > 2 GB ONNX model with external data: prune and sparsify by path, peak memory.

Builds an MLP of ``--layers`` Linear(8192, 8192) + ReLU layers (8 layers: 537 M float32
weights, 2.15 GB) directly as ONNX (Gemm nodes, weights in one external data file; no torch
export, which would hold the weights twice). Each operation then runs in a fresh process (so
peak RSS is its own): ``prune_onnx(path, ratio=0.5, output_path=...)`` and
``sparsify_onnx(path, "2:4", output_path=...)``. Reported: wall time, peak RSS (ru_maxrss),
peak RSS / weight bytes, and that each output keeps external data and loads. Peak RSS is the
child's VmHWM (``ru_maxrss`` would report the parent's peak when that is higher: Linux keeps
it across exec). ``io``: load
(and load + save) time and peak RSS with raw protobuf, secateurs' lazy load and onnx-ir, on
the big model and on ResNet-50 (one file), the measurement behind the choice of IR in
docs/architecture.md.

    python tools/bench/onnx_big.py [--layers 8] [--dir /tmp/secateurs_big]
        [--out tools/bench/results/onnx_big.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 8192


def build(path: Path, layers: int) -> int:
    """Write the MLP with external data, one layer's weights in memory at a time."""
    data = path.with_suffix(".onnx.data")
    nodes, inits = [], []
    rng = np.random.default_rng(0)
    offset = 0
    with open(data, "wb") as fh:
        for i in range(layers):
            for name, shape in ((f"w{i}", (WIDTH, WIDTH)), (f"b{i}", (WIDTH,))):
                arr = (rng.standard_normal(shape, dtype=np.float32) * 0.01)
                fh.write(arr.tobytes())
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
                tensor.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data.name), ("offset", str(offset)),
                             ("length", str(arr.nbytes))):
                    e = tensor.external_data.add()
                    e.key, e.value = k, v
                offset += arr.nbytes
                inits.append(tensor)
                del arr
            x = "x" if i == 0 else f"r{i - 1}"
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"],
                                          name=f"fc{i}", transB=1))
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "big_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(f"h{layers - 1}", TensorProto.FLOAT,
                                                             [1, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path))
    return offset


# Each child reports its own peak: VmHWM, its high-water mark (ru_maxrss keeps the parent's
# across exec). Spliced into both child scripts below.
PEAK_RSS = r"""
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
{peak_rss}from secateurs.passes.prune_onnx import prune_onnx
from secateurs.passes.onnx_sparsify import sparsify_onnx
start = time.perf_counter()
if {op!r} == "prune":
    r = prune_onnx({src!r}, ratio=0.5, round_to=16, output_path={dst!r})
    extra = {{"params_kept": r.report.params_kept, "repairs": len(r.report.repairs)}}
else:
    sparsify_onnx({src!r}, "2:4", output_path={dst!r})
    extra = {{}}
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak_rss_bytes": peak_rss(),
                  **extra}}))
"""


# Reading and writing the model: raw protobuf (``onnx.load`` with its external data),
# secateurs' lazy protobuf load (``load_onnx(lazy=True)``: large external tensors stay on
# disk), and onnx-ir (``onnx_ir.load``: lazy memory-mapped external tensors). Each in a fresh
# process; "roundtrip" also writes the model with external data.
IO_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
{peak_rss}start = time.perf_counter()
how, src, dst = {how!r}, {src!r}, {dst!r}
if how == "protobuf":
    import onnx
    m = onnx.load(src)
    n = len(m.graph.initializer)
elif how == "secateurs_lazy":
    from secateurs.graph.onnx_apply import load_onnx
    m, _ = load_onnx(src, lazy=True)
    n = len(m.graph.initializer)
elif how == "secateurs_lazy_roundtrip":
    from secateurs.graph.onnx_apply import load_onnx, save_external
    m, _ = load_onnx(src, lazy=True)
    save_external(m, dst)
    n = len(m.graph.initializer)
elif how == "onnx_ir":
    import onnx_ir as ir
    m = ir.load(src)
    n = sum(1 for v in m.graph.initializers.values() if v.const_value is not None)
elif how == "onnx_ir_roundtrip":
    import onnx_ir as ir
    m = ir.load(src)
    ir.save(m, dst, external_data=__import__("os").path.basename(dst) + ".data")
    n = len(m.graph.initializers)
elif how == "protobuf_to_onnx_ir":  # what a port on top of today's loader would add
    import onnx, onnx_ir as ir
    m = ir.serde.deserialize_model(onnx.load(src))
    n = len(m.graph.initializers)
print(json.dumps({{"seconds": round(time.perf_counter() - start, 3), "initializers": n,
                  "peak_rss_bytes": peak_rss()}}))
"""


def io_rows(src: Path, work: Path, weights: int, hows: tuple[str, ...]) -> dict:
    rows = {}
    for how in hows:
        dst = work / f"io_{how}.onnx"
        code = IO_CHILD.format(root=str(ROOT), peak_rss=PEAK_RSS, how=how, src=str(src),
                               dst=str(dst))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=False)
        if out.returncode:
            rows[how] = {"error": out.stderr[-1500:]}
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["peak_rss_over_weights"] = round(row["peak_rss_bytes"] / weights, 3)
            rows[how] = row
        print(how, rows[how], flush=True)
        for f in work.glob(f"io_{how}.onnx*"):
            f.unlink()
    return rows


BIG_IO = ("protobuf", "secateurs_lazy", "onnx_ir", "secateurs_lazy_roundtrip",
          "onnx_ir_roundtrip")
TYPICAL_IO = ("protobuf", "secateurs_lazy", "onnx_ir", "protobuf_to_onnx_ir")


def typical_model(work: Path) -> tuple[Path, int] | None:
    """ResNet-50 (``zoo:resnet50_full``, TorchScript export, one file): a typical model."""
    import warnings

    import torch

    from secateurs import zoo

    entry = zoo.get("resnet50_full")
    path = work / "resnet50.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(entry.build().eval(), entry.example_inputs(), str(path),
                          dynamo=False, opset_version=17, input_names=["x"])
    model = onnx.load(str(path))
    weights = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
    return path, weights


def run(op: str, src: Path, dst: Path) -> dict:
    code = CHILD.format(root=str(ROOT), peak_rss=PEAK_RSS, op=op, src=str(src), dst=str(dst))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    head = onnx.load(str(dst), load_external_data=False)
    row["output_external_data"] = any(t.data_location == TensorProto.EXTERNAL
                                      for t in head.graph.initializer)
    row["output_model_file_bytes"] = dst.stat().st_size
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/secateurs_big")
    ap.add_argument("--skip-io", action="store_true",
                    help="skip the load/save comparison (protobuf, lazy protobuf, onnx-ir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx_big.json"))
    args = ap.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        src = work / "big.onnx"
        t0 = time.perf_counter()
        weights = build(src, args.layers)
        rows = {"weights_bytes": weights, "build_s": round(time.perf_counter() - t0, 1)}
        for op in ("prune", "sparsify"):
            row = run(op, src, work / f"{op}.onnx")
            if "peak_rss_bytes" in row:
                row["peak_rss_over_weights"] = round(row["peak_rss_bytes"] / weights, 3)
            rows[op] = row
            print(op, row, flush=True)
            for f in work.glob(f"{op}.onnx*"):
                f.unlink()
        if not args.skip_io:
            rows["io"] = {"big": io_rows(src, work, weights, BIG_IO)}
            for f in work.glob("big.onnx*"):
                f.unlink()
            path, typical = typical_model(work)
            rows["io"]["resnet50"] = {"weights_bytes": typical,
                                      **io_rows(path, work, typical, TYPICAL_IO)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"bench": "onnx_big", "platform": platform.platform(), "onnx": onnx.__version__,
           "layers": args.layers, "width": WIDTH, **rows,
           "parent_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
