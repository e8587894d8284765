"""ONNX side of ``tests/passes/test_rules_unmapped.py``: the exporter idioms that reshape a
Dense output into a map or a sequence (tf2onnx/Keras channels-last generators), and
BatchNormalization-7's per-position statistics (``spatial=0``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _onnx_testlib import init, make_model, rand
from onnx import helper

import secateurs
from secateurs.graph.onnx_apply import zero_plan_slices_onnx


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _keras_generator(layer: str) -> onnx.ModelProto:
    """tf2onnx's channels-last idiom: MatMul + Add (Dense) -> Reshape [-1, 4, 4, C] ->
    Transpose to NCHW -> Conv / ConvTranspose / LSTM over the rows."""
    nodes = [helper.make_node("MatMul", ["z", "dense_w"], ["d0"]),
             helper.make_node("Add", ["d0", "dense_b"], ["d1"])]
    inits = [init("dense_w", rand(16, 4 * 4 * 32)), init("dense_b", rand(4 * 4 * 32))]
    if layer == "lstm":  # the 16 cells of the map as 16 time steps of 32 features
        nodes += [helper.make_node("Reshape", ["d1", "seq_shape"], ["s"]),
                  helper.make_node("LSTM", ["s", "W", "R"], ["", "h"], hidden_size=8),
                  helper.make_node("Squeeze", ["h", "axes0"], ["h2"]),
                  helper.make_node("Gemm", ["h2", "fc_w", "fc_b"], ["out"], transB=1)]
        inits += [init("seq_shape", np.array([16, 1, 32], np.int64)),
                  init("W", rand(1, 32, 32)), init("R", rand(1, 32, 8)),
                  init("axes0", np.array([0], np.int64)),
                  init("fc_w", rand(5, 8)), init("fc_b", rand(5))]
        return make_model(nodes, {"z": [1, 16]}, {"out": [1, 5]}, inits)
    op = "Conv" if layer == "conv" else "ConvTranspose"
    nodes += [helper.make_node("Reshape", ["d1", "shape"], ["r0"]),
              helper.make_node("Transpose", ["r0"], ["r"], perm=[0, 3, 1, 2]),
              helper.make_node(op, ["r", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3],
                               pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["a"]),
              helper.make_node("GlobalAveragePool", ["a"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["out"], transB=1)]
    inits += [init("shape", np.array([-1, 4, 4, 32], np.int64)),
              init("conv_w", rand(32, 32, 3, 3) * 0.2), init("conv_b", rand(32)),
              init("fc_w", rand(5, 32)), init("fc_b", rand(5))]
    return make_model(nodes, {"z": [1, 16]}, {"out": [1, 5]}, inits)


@pytest.mark.parametrize("layer", ["conv", "conv_transpose", "lstm"])
def test_onnx_keras_dense_reshape_prunes_channels_only(layer):
    model = _keras_generator(layer)
    feeds = {"z": np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)}
    for round_to in (1, "auto"):
        result = secateurs.prune_onnx(model, ratio=0.5, round_to=round_to)
        onnx.checker.check_model(result.model, full_check=True)
        expected, got = _run(zero_plan_slices_onnx(model, result.plan), feeds), \
            _run(result.model, feeds)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert not result.report.repairs
    if layer != "lstm":  # the map stays 4 x 4: the reshape keeps its rows and columns
        shape = {t.name: onnx.numpy_helper.to_array(t).tolist()
                 for t in result.model.graph.initializer}["shape"]
        assert shape[1:3] == [4, 4] and shape[3] < 32


def test_onnx_batch_norm_spatial_0_follows_every_position():
    """BatchNormalization-7 with ``spatial=0`` (MXNet, old exporters): statistics per
    (channel, row, column), each position of its input."""
    scale = [init(n, np.abs(rand(8, 4, 4, seed=i)) + 0.5) for i, n in
             enumerate(("s", "b", "m", "v"))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"],
                              spatial=0),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["out"], kernel_shape=[1, 1])]
    model = make_model(nodes, {"x": [1, 3, 4, 4]}, {"out": [1, 6, 4, 4]},
                       [init("w", rand(8, 3, 3, 3)), init("w2", rand(6, 8, 1, 1))] + scale)
    model.opset_import[0].version = 7
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    result = secateurs.prune_onnx(model, ratio=0.5, round_to=1)
    assert not result.report.repairs
    assert {t.name: list(t.dims) for t in result.model.graph.initializer}["s"] == [4, 4, 4]
    np.testing.assert_allclose(_run(result.model, feeds),
                               _run(zero_plan_slices_onnx(model, result.plan), feeds),
                               rtol=1e-4, atol=1e-5)


def test_onnx_slice_1_bounds_as_attributes():
    """Slice before opset 10 (the classic Model Zoo and Caffe2 files) carries starts/ends/axes
    as attributes: a channel slice prunes like the input form, and its bounds are rewritten
    (it was opaque: "bounds computed at run time", every channel through it pinned)."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["a"]),
             # the first 24 of 32 channels, rows and columns 1..14
             helper.make_node("Slice", ["a"], ["s"], axes=[1, 2, 3], starts=[0, 1, 1],
                              ends=[24, 15, 15]),
             helper.make_node("Conv", ["s", "w1"], ["out"], kernel_shape=[1, 1])]
    model = make_model(nodes, {"x": [1, 3, 16, 16]}, {"out": [1, 6, 14, 14]},
                       [init("w0", rand(32, 3, 3, 3)), init("w1", rand(6, 24, 1, 1))])
    model.opset_import[0].version = 9
    onnx.checker.check_model(model, full_check=True)
    result = secateurs.prune_onnx(model, ratio=0.5, round_to=1)
    assert not result.report.repairs
    dims = {t.name: list(t.dims) for t in result.model.graph.initializer}
    (crop,) = [n for n in result.model.graph.node if n.op_type == "Slice"]
    bounds = {a.name: list(a.ints) for a in crop.attribute}
    assert len(crop.input) == 1 and dims["w1"][1] < 24 and dims["w0"][0] < 32
    assert bounds["ends"][0] - bounds["starts"][0] == dims["w1"][1]
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(_run(result.model, feeds),
                               _run(zero_plan_slices_onnx(model, result.plan), feeds),
                               rtol=1e-4, atol=1e-5)
