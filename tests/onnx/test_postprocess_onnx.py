"""Post-processing whose sizes are set at run time, at the end of a graph: a detector's
``NonMaxSuppression`` and a scikit-learn classifier's ``ai.onnx.ml`` ops (``ArgMax ->
ArrayFeatureExtractor`` labels, ``ZipMap`` probabilities, a sequence of maps). The network
before them prunes, the values they read stay whole, and they run unchanged. A run-time size
that a weight reads is still refused, naming the value."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _onnx_testlib import init, rand
from onnx import TensorProto, helper

import secateurs
from secateurs.graph.onnx_apply import zero_plan_slices_onnx


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _classifier() -> onnx.ModelProto:
    """skl2onnx's MLPClassifier: MatMul/Add/Relu layers, Softmax, then the ML post-processing."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["l0"]),
             helper.make_node("Add", ["l0", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["probabilities"], ["argmax"], axis=1),
             helper.make_node("ArrayFeatureExtractor", ["classes", "argmax"], ["labels"],
                              domain="ai.onnx.ml"),
             helper.make_node("Reshape", ["labels", "flat"], ["label"]),
             helper.make_node("ZipMap", ["probabilities"], ["output_probability"],
                              domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])]
    inits = [init("w1", rand(4, 32)), init("b1", rand(1, 32)), init("w2", rand(32, 3)),
             init("b2", rand(1, 3)), init("classes", np.array([0, 1, 2], np.int64)),
             init("flat", np.array([-1], np.int64))]
    maps = helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_value_info("output_probability", maps)], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])


def _detector(weighted_tail: bool = False) -> onnx.ModelProto:
    """A conv backbone with box and score heads, then ``NonMaxSuppression`` and a gather of
    the kept boxes (SSD / YOLO exports with NMS in the graph); ``weighted_tail``: the kept
    boxes go through a Linear, a weight reading a run-time size."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c0"], ["c"]),
             helper.make_node("Conv", ["c", "wb"], ["b0"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["c", "ws"], ["s0"], kernel_shape=[1, 1]),
             helper.make_node("Reshape", ["b0", "bshape"], ["b1"]),
             helper.make_node("Transpose", ["b1"], ["boxes"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["s0", "sshape"], ["s1"]),
             helper.make_node("Sigmoid", ["s1"], ["scores"]),
             helper.make_node("NonMaxSuppression", ["boxes", "scores", "top", "iou", "thr"],
                              ["keep"]),
             helper.make_node("Gather", ["keep", "col2"], ["idx"], axis=1),
             helper.make_node("Squeeze", ["boxes", "ax0"], ["boxes2"]),
             helper.make_node("Gather", ["boxes2", "idx"], ["kept"], axis=0)]
    inits = [init("w", rand(16, 3, 3, 3)), init("wb", rand(4, 16, 1, 1)),
             init("ws", rand(2, 16, 1, 1)), init("bshape", np.array([1, 4, 64], np.int64)),
             init("sshape", np.array([1, 2, 64], np.int64)),
             init("top", np.array([5], np.int64)), init("iou", np.array([0.5], np.float32)),
             init("thr", np.array([0.2], np.float32)), init("col2", np.array(2, np.int64)),
             init("ax0", np.array([0], np.int64))]
    out = "kept"
    if weighted_tail:
        nodes.append(helper.make_node("MatMul", ["kept", "wt"], ["refined"]))
        inits.append(init("wt", rand(4, 4)))
        out = "refined"
    graph = helper.make_graph(
        nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["kept", 4])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])


def test_classifier_prunes_its_hidden_layer_and_keeps_its_ml_outputs():
    model = _classifier()
    onnx.checker.check_model(model, full_check=True)
    result = secateurs.prune_onnx(model, ratio=0.5, round_to=1, verify=True,
                                  input_shapes={"x": [5, 4]})
    assert result.report.exact and not result.report.repairs
    assert {t.name: list(t.dims) for t in result.model.graph.initializer}["w1"] == [4, 16]
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": np.random.default_rng(3).standard_normal((7, 4)).astype(np.float32)}
    (label, probs), (ref_label, ref_probs) = _run(result.model, feeds), \
        _run(zero_plan_slices_onnx(model, result.plan), feeds)
    np.testing.assert_array_equal(label, ref_label)
    assert [sorted(p) for p in probs] == [[0, 1, 2]] * 7
    np.testing.assert_allclose([[p[k] for k in range(3)] for p in probs],
                               [[p[k] for k in range(3)] for p in ref_probs], rtol=1e-5)
    # the class logits feed the post-processing: they stay, pinned with its reason
    (logits,) = [g for g in result.analysis.groups if any(m.param == "w2" and m.dim == 1
                                                          for m in g.members)]
    assert logits.is_pinned and "post-processing" in "; ".join(logits.pin_reasons)


def test_detector_backbone_prunes_before_nms():
    model = _detector()
    onnx.checker.check_model(model, full_check=True)
    result = secateurs.prune_onnx(model, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact and not result.report.repairs
    assert {t.name: list(t.dims) for t in result.model.graph.initializer}["w"][0] == 8
    feeds = {"x": np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    got, want = _run(result.model, feeds)[0], \
        _run(zero_plan_slices_onnx(model, result.plan), feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_weight_after_a_run_time_size_is_still_refused():
    with pytest.raises(secateurs.InputError, match="NonMaxSuppression"):
        secateurs.prune_onnx(_detector(weighted_tail=True), ratio=0.5)
