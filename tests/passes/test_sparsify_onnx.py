"""ONNX sparsification: checker-clean, N:M along each op's reduction axis, same outputs as torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from secateurs.errors import InputError
from secateurs.passes.onnx_sparsify import sparsify_onnx, sparsify_onnx_with_report
from secateurs.passes.sparsify import is_nm_sparse

ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(1)


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "dw_w"], ["c2"], name="dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc1_w", "fc1_b"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r2"]),
        helper.make_node("Gemm", ["r2", "fc2_w"], ["g2"], name="fc2", transB=0),
        helper.make_node("MatMul", ["g2", "mm_w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [init("conv_w", 16, 8, 3, 3), init("conv_b", 16), init("dw_w", 16, 1, 3, 3),
         init("fc1_w", 12, 16), init("fc1_b", 12), init("fc2_w", 12, 8), init("mm_w", 8, 4)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}


def _torch_forward(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(F.conv2d(x, w["conv_w"], w["conv_b"], padding=1))
    h = F.conv2d(h, w["dw_w"], padding=1, groups=16).mean(dim=(2, 3))
    h = torch.relu(F.linear(h, w["fc1_w"], w["fc1_b"]))
    return h @ w["fc2_w"] @ w["mm_w"]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4)])
def test_onnx_nm_axes_checker_and_outputs(tmp_path, n: int, m: int) -> None:
    original = _model()
    before = original.SerializeToString()
    out_path = tmp_path / "sparse.onnx"
    sparse, report = sparsify_onnx_with_report(original, f"{n}:{m}", output_path=out_path)
    assert original.SerializeToString() == before  # input untouched
    onnx.checker.check_model(sparse, full_check=True)
    onnx.checker.check_model(onnx.load(out_path), full_check=True)

    w = _weights(sparse)
    assert is_nm_sparse(w["conv_w"], n, m, axis=1)  # Conv: along C
    assert is_nm_sparse(w["fc1_w"], n, m, axis=1)  # Gemm transB=1: B[N, K]
    assert is_nm_sparse(w["fc2_w"], n, m, axis=0)  # Gemm transB=0: B[K, N]
    assert is_nm_sparse(w["mm_w"], n, m, axis=0)  # MatMul: B[K, N]
    assert not is_nm_sparse(w["fc2_w"], n, m, axis=1)
    assert torch.equal(w["dw_w"], _weights(original)["dw_w"])
    assert torch.equal(w["conv_b"], _weights(original)["conv_b"])
    reasons = {s.name: s.reason for s in report.skipped}
    assert "group=16" in reasons["dw_w"]
    assert report.all_valid and {x.name for x in report.layers} == {"conv_w", "fc1_w", "fc2_w", "mm_w"}

    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    want = _torch_forward(w, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_onnx_unstructured_from_path_and_ignore(tmp_path) -> None:
    path = tmp_path / "dense.onnx"
    onnx.save(_model(), path)
    sparse = sparsify_onnx(path, "unstructured", sparsity=0.75, ignore=("fc1",))
    w = _weights(sparse)
    assert (w["conv_w"] == 0).float().mean().item() == pytest.approx(0.75, abs=1e-3)
    assert (w["fc1_w"] != 0).all()
    onnx.checker.check_model(sparse, full_check=True)


def test_onnx_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="pattern='2-4'"):
        sparsify_onnx(_model(), "2-4")
    with pytest.raises(InputError, match="nope"):
        sparsify_onnx(_model(), "2:4", ignore=("nope",))
    with pytest.raises(InputError, match="does not exist"):
        sparsify_onnx(tmp_path / "missing.onnx")


def test_initializer_read_in_another_role_is_skipped_and_said():
    """A weight that is also MatMul's first operand (reduces over its axis 1), a Gather table
    tied to a Gemm, or read only through a Transpose: it was sparsified along axis 0 and
    reported valid 2:4 (the other use is not, and an embedding changed unreported), or left
    dense with no word. Weights in Constant nodes were not seen at all."""
    from onnx import TensorProto, helper

    from secateurs.passes.onnx_sparsify import sparsify_onnx_with_report

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)

    def build(nodes, constant=False):
        inits = [] if constant else [numpy_helper.from_array(w, "W")]
        if constant:
            nodes = [helper.make_node("Constant", [], ["W"],
                                      value=numpy_helper.from_array(w, "W"))] + nodes
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    node = helper.make_node
    both = build([node("MatMul", ["x", "W"], ["t"], name="b_use"),
                  node("MatMul", ["W", "t"], ["y"], name="a_use")])
    out, report = sparsify_onnx_with_report(both, "2:4")
    assert not report.layers and "also read by MatMul 'a_use' (input 0)" in report.skipped[0].reason
    assert np.array_equal(numpy_helper.to_array(out.graph.initializer[0]), w)
    transposed = build([node("Transpose", ["W"], ["wt"], name="t"),
                        node("MatMul", ["x", "wt"], ["y"])])
    _, report = sparsify_onnx_with_report(transposed, "2:4")
    assert not report.layers and "Transpose 't' reads 'W'" in report.skipped[0].reason
    constant = build([node("MatMul", ["x", "W"], ["y"])], constant=True)
    out, report = sparsify_onnx_with_report(constant, "2:4")
    assert [layer.name for layer in report.layers] == ["W"] and report.all_valid
    onnx.checker.check_model(out, full_check=True)
