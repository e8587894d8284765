"""Fixtures for the CLI suite: run the *installed* ``secateurs`` entry point as a subprocess."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SPEC = '''\
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def example_inputs():
    return (torch.randn(1, 8),)


def broken():
    raise RuntimeError("factory exploded")


def slow():
    import sys
    import time
    print("building", file=sys.stderr, flush=True)
    time.sleep(60)
    return make()
'''


def entry_point() -> str:
    here = Path(sys.executable).parent / "secateurs"
    found = str(here) if here.exists() else shutil.which("secateurs")
    if not found:
        pytest.fail("the 'secateurs' entry point is not installed: pip install -e '.[test]'")
    return found


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("SECATEURS_DEBUG", None)
    return subprocess.run([entry_point(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) with its content hash."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_error(res: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr, 'secateurs CMD: error: ...' naming the fragments."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith(f"secateurs {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])


def mlp_onnx(path: Path, batch: int | str = "batch") -> Path:
    """A tiny MatMul/Relu/MatMul ONNX model, made by hand (no exporter): x[batch, 8] -> [batch, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [w1, b1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path))
    return path
