"""``secateurs demo --quick`` end to end: pruned to half the MACs, exact, accuracy recovered."""

from __future__ import annotations

import json

import torch

from secateurs.cli import main

torch.set_num_threads(1)


def test_demo_quick_end_to_end(tmp_path, capsys) -> None:
    out_json, out_png = tmp_path / "demo.json", tmp_path / "plot.png"
    code = main(["demo", "--quick", "--no-progress", "--json", str(out_json),
                 "--png", str(out_png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "Accuracy retention" in text and "mask-equivalence before fine-tune: exact" in text

    result = json.loads(out_json.read_text())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    assert result["verification"]["mask_equivalence"] is True
    assert abs(result["macs_kept"] - 0.5) <= 0.05 * 0.5
    assert result["baseline"]["accuracy"] >= 0.98
    assert result["final"]["accuracy"] >= 0.95
    assert result["final"]["accuracy"] > result["pruned_one_shot"]["accuracy"]
    assert result["compression_ratio"] > 1.8
    assert result["best_criterion"] in result["criteria"]
    for points in result["sweep"].values():
        assert all(p["exact"] for p in points)

    # deployment: dense fp32 -> pruned fp32 -> pruned + INT8, measured in ONNX Runtime
    dep = result["deployment"]
    dense, pruned, int8 = dep["models"]
    assert [m["name"] for m in dep["models"]] == ["dense fp32", "pruned fp32", "pruned + INT8"]
    assert dense["accuracy"] == result["baseline"]["accuracy"]  # same model, same test set
    assert abs(pruned["accuracy"] - result["final"]["accuracy"]) <= 1 / 360  # fp32 in ORT
    assert int8["accuracy"] >= pruned["accuracy"] - 0.01  # INT8 costs at most 1 point
    assert int8["bytes"] < pruned["bytes"] < dense["bytes"]
    assert int8["bytes"] < 0.25 * dense["bytes"]
    assert all(m["latency_ms"] > 0 for m in dep["models"])
    assert dep["quantization"]["mode"] == "int8"
    assert dep["quantization"]["calibration_source"] == "data"
    assert "Deployed as ONNX in ONNX Runtime" in text and "pruned + INT8" in text
