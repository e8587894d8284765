"""By path, an external-data model is pruned and sparsified one tensor at a time: the peak
memory added to the interpreter's stays well under one copy of the weights
(``tools/bench/onnx_big.py`` measures the 2.15 GB case)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]
LAYERS, WIDTH = 16, 2048  # 16 weights of 16 MB: 268 MB

CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
import secateurs.passes.prune_onnx as po
from secateurs.passes.onnx_sparsify import sparsify_onnx

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

import secateurs.graph.onnx_apply as oa
po.ORT_TRIAL_MACS = 0  # as for a model past the ORT trial size: shape checks only
oa.LAZY_MIN_BYTES = 0  # lazy at this size too
base = hwm()
if {op!r} == "prune":
    po.prune_onnx({src!r}, ratio=0.5, round_to=16, output_path={dst!r})
else:
    sparsify_onnx({src!r}, "2:4", output_path={dst!r})
print(json.dumps({{"base": base, "peak": hwm()}}))
"""


def _build(path: Path) -> int:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(LAYERS):
        inits += [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [WIDTH, WIDTH],
                                     rng.standard_normal((WIDTH, WIDTH), np.float32).tobytes(),
                                     raw=True),
                  helper.make_tensor(f"b{i}", TensorProto.FLOAT, [WIDTH],
                                     rng.standard_normal(WIDTH, np.float32).tobytes(), raw=True)]
        x = "x" if i == 0 else f"r{i - 1}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], transB=1))
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info(f"h{LAYERS - 1}", TensorProto.FLOAT, [1, WIDTH])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path), save_as_external_data=True, location="mlp.data")
    return LAYERS * (WIDTH * WIDTH + WIDTH) * 4


@pytest.mark.slow
@pytest.mark.parametrize("op", ["prune", "sparsify"])
def test_by_path_peak_memory_is_a_few_tensors(tmp_path: Path, op: str) -> None:
    src = tmp_path / "mlp.onnx"
    weights = _build(src)
    dst = tmp_path / "out" / f"{op}.onnx"
    code = CHILD.format(root=str(ROOT), op=op, src=str(src), dst=str(dst))
    # a fixed mmap threshold: glibc's dynamic one would serve these 16 MB tensors from the
    # heap after the first is freed, and heap fragments count as resident
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600, env=env)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    added = row["peak"] - row["base"]
    assert added < 0.5 * weights, f"{op} added {added / 1e6:.0f} MB for {weights / 1e6:.0f} MB"
    head = onnx.load(str(dst), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in head.graph.initializer)
    onnx.checker.check_model(str(dst), full_check=True)
