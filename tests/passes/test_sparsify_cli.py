"""`secateurs sparsify` on ONNX files and file.py:factory specs."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from secateurs.cli import main
from secateurs.passes.sparsify import is_nm_sparse

torch.set_num_threads(1)


def test_cli_onnx(tmp_path, capsys) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w],
    )
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    out = tmp_path / "out" / "m.onnx"
    assert main(["sparsify", str(src), "-o", str(out), "--pattern", "2:4"]) == 0
    weight = torch.from_numpy(numpy_helper.to_array(onnx.load(out).graph.initializer[0]).copy())
    assert is_nm_sparse(weight, 2, 4, axis=0)
    assert "w  " in capsys.readouterr().out


def test_cli_torch_factory(tmp_path, capsys) -> None:
    factory = tmp_path / "net.py"
    factory.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
            return model, (torch.randn(2, 3, 8, 8),)
    """))
    out = tmp_path / "sparse.pt"
    code = main(["sparsify", f"{factory}:build", "-o", str(out), "--method", "sparsegpt", "--ignore", "0"])
    assert code == 0
    saved = torch.load(out, weights_only=True)
    assert set(saved["masks"]) == {"2.weight"}
    assert is_nm_sparse(saved["state_dict"]["2.weight"], 2, 4, axis=1)
    assert saved["report"]["skipped"][0]["reason"] == "ignored by request"
    assert "2.weight" in capsys.readouterr().out


def test_cli_bad_input_exit_code(tmp_path, capsys) -> None:
    assert main(["sparsify", "nothing-here", "-o", str(tmp_path / "x.pt")]) == 2
    assert "zoo:NAME" in capsys.readouterr().err
    assert main(["sparsify", str(tmp_path / "a.onnx"), "-o", str(tmp_path / "b.onnx"), "--pattern", "5:4"]) == 2
