"""export_onnx: numerics vs torch, checker, traceable names, atomic output, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from secateurs.runtime.onnx_export import VerificationError, export_onnx, verify_onnx


def _ort_run(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_cnn_round_trip_checker_clean_and_names_traceable(cnn):
    x = torch.randn(2, 3, 16, 16)
    proto = export_onnx(cnn, x)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    np.testing.assert_allclose(_ort_run(proto, x), cnn(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    state = cnn.state_dict()
    names = {t.name for t in proto.graph.initializer}
    for name in ("conv1.weight", "bn1.running_var", "conv2.weight", "fc.weight"):
        assert name in names
    for t in proto.graph.initializer:
        if t.name in state:  # a traceable name must hold exactly that parameter
            np.testing.assert_array_equal(numpy_helper.to_array(t), state[t.name].numpy())
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["secateurs.exporter"] == "torchscript"


def test_transformer_round_trip_dynamic_batch(transformer):
    proto = export_onnx(transformer, torch.randn(2, 7, 32), dynamic_batch=True)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    x = torch.randn(5, 7, 32)  # a batch the export never saw
    np.testing.assert_allclose(_ort_run(proto, x), transformer(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    names = {t.name for t in proto.graph.initializer}
    assert {"mlp.0.weight", "mlp.2.weight", "attn.in_proj_weight"} <= names


def test_fx_graph_module_exports(cnn):
    gm = torch.fx.symbolic_trace(cnn)
    x = torch.randn(1, 3, 16, 16)
    proto = export_onnx(gm, x)
    np.testing.assert_allclose(_ort_run(proto, x), cnn(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert [i.name for i in proto.graph.input] == ["x"]


def test_dynamo_exporter_used_for_opset_18(cnn):
    x = torch.randn(1, 3, 16, 16)
    proto = export_onnx(cnn, x, opset=18)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["secateurs.exporter"] == "dynamo"
    assert proto.opset_import[0].version >= 18
    assert "conv1.weight" in {t.name for t in proto.graph.initializer}
    np.testing.assert_allclose(_ort_run(proto, x), cnn(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_verification_error_names_output_and_diff(cnn):
    x = torch.randn(1, 3, 16, 16)
    proto = export_onnx(cnn, x, verify=False)
    wrong = [cnn(x).detach() + 0.5]
    with pytest.raises(VerificationError) as info:
        verify_onnx(proto, x, wrong)
    msg = str(info.value)
    assert "output 'output'" in msg and "max abs diff 0.5" in msg
    assert info.value.mismatches[0].max_abs_diff == pytest.approx(0.5, abs=1e-5)


def test_export_writes_file_and_restores_training_mode(tmp_path, transformer):
    transformer.train()
    try:
        path = tmp_path / "sub" / "t.onnx"
        export_onnx(transformer, torch.randn(1, 4, 32), path)
        assert transformer.training
        loaded = onnx.load(str(path))
        onnx.checker.check_model(loaded, full_check=True)
        assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["t.onnx"]
    finally:
        transformer.eval()


def test_bad_example_inputs_rejected(cnn):
    from secateurs.errors import InputError

    with pytest.raises(InputError, match="tensor"):
        export_onnx(cnn, {"x": torch.randn(1, 3, 8, 8)})
