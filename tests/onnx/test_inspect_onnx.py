"""``secateurs inspect``: groups, per-layer cost and 2:4 status along the reduction axis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from _onnx_testlib import export_zoo, init, make_model, rand
from onnx import helper

from secateurs.cli import main


def _two_four(w: np.ndarray, axis: int) -> np.ndarray:
    """Zero the two smallest of every 4 consecutive entries along ``axis``."""
    moved = np.moveaxis(w.copy(), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    order = np.argsort(np.abs(groups), axis=-1)
    np.put_along_axis(groups, order[..., :2], 0.0, axis=-1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def test_inspect_reports_2_4_along_reduction_axis(tmp_path: Path, capsys) -> None:
    w_gemm = _two_four(rand(16, 8), axis=1)  # Gemm transB=1: [N, K], K is axis 1
    w_mm = _two_four(rand(16, 8, seed=1), axis=0)  # MatMul [K, N]: K is axis 0
    w_wrong = _two_four(rand(8, 8, seed=2), axis=0)  # 2:4 along N only: not along K
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm"),
        helper.make_node("Gemm", ["m", "w3"], ["y"], name="fc3", transB=1),
    ]
    model = make_model(nodes, {"x": [2, 8]}, {"y": [2, 8]}, [
        init("w1", w_gemm), init("w2", w_mm), init("w3", w_wrong)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    layers = {r["node"]: r for r in info["layers"]}
    assert layers["fc1"]["2:4"] is True and layers["fc1"]["axis"] == 1
    assert layers["mm"]["2:4"] is True and layers["mm"]["axis"] == 0
    assert layers["fc3"]["2:4"] is False
    assert layers["fc1"]["sparsity"] == pytest.approx(0.5)
    assert layers["fc1"]["macs"] == 2 * 16 * 8 and layers["fc1"]["params"] == 128
    assert any("w1[0]" in m for g in info["groups"] for m in g["members"])


def test_inspect_text_and_input_shape(export_dir: Path, capsys) -> None:
    path = export_zoo("vit", export_dir, dynamic_batch=True)
    assert main(["inspect", str(path)]) == 2  # dynamic batch: a clear error, exit code 2
    assert "input_shapes" in capsys.readouterr().err
    assert main(["inspect", str(path), "--input-shape", "x=1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "channel groups" in out and "prunable units" in out and "MatMul" in out
