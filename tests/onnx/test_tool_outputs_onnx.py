"""ONNX files that other tools wrote (ONNX Runtime's optimizers and quantizer, fp16
converters, old exporters): each prunes exactly, or is refused with a message that names what
the model is and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _onnx_testlib import export_zoo, init, rand
from onnx import TensorProto, helper

from secateurs.errors import InputError
from secateurs.passes.prune_onnx import prune_onnx


def _ort_optimized(src: Path, out: Path, level: ort.GraphOptimizationLevel) -> Path:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return out


@pytest.mark.parametrize("level", ["extended", "all"])
def test_a_model_ort_optimized_is_refused_with_what_to_do(level, export_dir, tmp_path) -> None:
    """A session's saved graph holds ORT-internal ops (FusedConv, NCHWc convs) that carry no
    readable shapes: the message used to ask for static input shapes the model already had."""
    src = export_zoo("resnet", export_dir)
    optimized = _ort_optimized(src, tmp_path / "opt.onnx", {
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level])
    with pytest.raises(InputError, match="optimized by ONNX Runtime") as err:
        prune_onnx(str(optimized), ratio=0.5)
    assert "prune the exported model before" in str(err.value)
    assert "com.microsoft" in str(err.value)  # the op is named with its domain


def _fp16_with_casts_last() -> onnx.ModelProto:
    """What ``convert_float_to_float16(keep_io_types=True)`` writes: the input Cast appended
    after the nodes that read it (not topologically sorted; ONNX Runtime runs it)."""
    nodes = [
        helper.make_node("Conv", ["x16", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "w2"], ["y16"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["y16"], ["y"], name="out_cast", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["x"], ["x16"], name="in_cast", to=TensorProto.FLOAT16),
    ]
    graph = helper.make_graph(
        nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [init("w1", rand(16, 3, 3, 3).astype(np.float16)),
         init("w2", rand(4, 16, 3, 3).astype(np.float16))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_unsorted_graph_is_sorted_not_refused(tmp_path) -> None:
    model = _fp16_with_casts_last()
    x = {"x": rand(1, 3, 8, 8)}
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    before = model.SerializeToString()
    path = tmp_path / "fp16.onnx"
    onnx.save(model, path)
    for source in (model, str(path)):
        result = prune_onnx(source, ratio=0.5, round_to=1, verify=True)
        assert result.report.exact is True
        onnx.checker.check_model(result.model, full_check=True)
        assert next(t for t in result.model.graph.initializer if t.name == "w1").dims[0] == 8
    assert model.SerializeToString() == before  # the caller's proto is not reordered


def _shared_bias_model(style: str) -> onnx.ModelProto:
    """Two layers whose zero biases an exporter deduplicated into one vector, the second
    feeding the graph output: written as an initializer also listed as a graph input (old
    exporters) or as a Constant node."""
    bias = np.zeros(16, np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b"], ["y"], name="fc2", transB=1),
    ]
    inits = [init("w1", rand(16, 8)), init("w2", rand(16, 16, seed=1))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    if style == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["b"], name="bias",
                                         value=onnx.numpy_helper.from_array(bias, "b")))
    else:
        inits.append(init("b", bias))
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [16]))
    graph = helper.make_graph(nodes, "shared", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("style", ["initializer-input", "constant"])
def test_a_shared_vector_is_untied_however_it_is_written(style) -> None:
    """Untying skipped initializers that are also graph inputs and Constant nodes: the shared
    bias tied fc1's hidden channels to the pinned output, so nothing pruned (a BERT written
    this way kept 0.76 of its MACs against 0.50)."""
    result = prune_onnx(_shared_bias_model(style), ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    assert next(t for t in result.model.graph.initializer if t.name == "w1").dims[0] == 8
    assert result.report.params_before == 16 * 8 + 16 * 16 + 16


def test_params_count_the_weights_of_constant_nodes() -> None:
    model = _shared_bias_model("constant")
    result = prune_onnx(model, ratio=0.5, round_to=1)
    assert result.report.params_before == 16 * 8 + 16 * 16 + 16
    assert result.report.params_after < result.report.params_before


def test_quantized_models_say_so(export_dir, tmp_path) -> None:
    """QOperator graphs were refused with "pass static input_shapes"; dynamically quantized
    ones pruned nothing without a word."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    src = export_zoo("resnet", export_dir)
    name = onnx.load(str(src)).graph.input[0].name

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: rand(1, 3, 32, 32, seed=i)} for i in range(2)])

        def get_next(self):
            return next(self.batches, None)

    qop = tmp_path / "qop.onnx"
    quantize_static(str(src), str(qop), _Reader(), quant_format=QuantFormat.QOperator)
    with pytest.raises(InputError, match="the model is quantized: prune the float model"):
        prune_onnx(str(qop), ratio=0.5)
    dyn = tmp_path / "dyn.onnx"
    quantize_dynamic(str(src), str(dyn))
    result = prune_onnx(str(dyn), ratio=0.5)
    assert any("already quantized" in n and "ConvInteger" in n for n in result.report.notes)


@pytest.mark.parametrize(("domain", "op", "words"), [
    ("com.microsoft.nchwc", "Conv", "optimized by ONNX Runtime"),
    ("com.microsoft", "FusedMatMul", "optimized by ONNX Runtime"),
    ("", "QLinearConv", "quantized"),
    ("", "Loop", "control flow"),
    ("custom.domain", "MyOp", "value_info"),
])
def test_an_unknown_shape_is_explained_by_the_op_that_made_it(domain, op, words) -> None:
    from secateurs.graph.from_onnx import _unknown_shape_advice

    assert words in _unknown_shape_advice(domain, op)


def test_a_symbolic_value_info_of_a_contrib_op_output_does_not_block_static_shapes(
        tmp_path) -> None:
    """ORT's transformer optimizer, then the fp16 converter with ``keep_io_types``: the
    converter declares the last SkipLayerNormalization's output with the symbolic dims
    ``['batch', 'seq', 64]``; at static input shapes that declaration was kept and refused
    as "dynamic" (pass input_shapes, which were passed)."""
    import torch
    import transformers
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.optimizer import optimize_model

    class _Bert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.m = transformers.BertModel(transformers.BertConfig(
                vocab_size=100, max_position_embeddings=64, hidden_size=64,
                num_attention_heads=4, num_hidden_layers=1, intermediate_size=128,
                attn_implementation="eager"))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(ids, return_dict=False)[0]

    path = tmp_path / "bert.onnx"
    torch.onnx.export(_Bert().eval(), (torch.randint(0, 100, (1, 16)),), str(path),
                      input_names=["ids"], output_names=["out"], opset_version=17,
                      dynamic_axes={"ids": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}},
                      dynamo=False)
    optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=64, opt_level=1,
                   use_gpu=False).save_model_to_file(str(path))
    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    assert any(n.op_type == "SkipLayerNormalization" for n in model.graph.node)
    result = prune_onnx(model, ratio=0.5, verify=True, input_shapes={"ids": [1, 16]})
    assert result.report.exact is True and result.report.macs_kept < 0.7


def test_a_deduplicated_vector_that_is_also_a_graph_input_keeps_its_default() -> None:
    """TorchScript's Identity deduplication with initializers kept as inputs: every reader of
    the bias is an Identity, so untying dropped the initializer and left a graph input the
    caller would have had to feed."""
    nodes = [
        helper.make_node("Identity", ["b"], ["b1"], name="id1"),
        helper.make_node("Identity", ["b"], ["b2"], name="id2"),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "identity_inputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [init("w1", rand(16, 8)), init("w2", rand(16, 16, seed=1)),
         init("b", np.zeros(16, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    inits = {t.name for t in result.model.graph.initializer}
    assert all(i.name in inits for i in result.model.graph.input if i.name != "x")
    ort.InferenceSession(result.model.SerializeToString(),
                         providers=["CPUExecutionProvider"]).run(None, {"x": rand(2, 8)})
