"""Graphs in the shapes other exporters and the ONNX model zoo write (built with onnx.helper,
no downloads): tf2onnx's channels-last models, old-opset zoo idioms (opset 9-12: Upsample,
Pad/Clip/Split/Squeeze attributes, Dropout, Identity, n-ary Sum, IR-3 initializers declared as
graph inputs), MatMul+Add instead of Gemm, branches joined by Concat, and graphs ONNX Runtime
itself optimised. Each prunes exactly (mask-equivalence under ONNX Runtime at batch 1 and 2,
checker clean) or pins with a reason; never a crash or a wrong model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _onnx_testlib import init, rand
from onnx import TensorProto, helper

from secateurs.errors import InputError
from secateurs.passes.prune_onnx import prune_onnx, verify_onnx


def _model(nodes: list[onnx.NodeProto], x_shape: Sequence[int | str], out: str,
           inits: list[TensorProto], opset: int, ir: int | None = None,
           inits_as_inputs: bool = False) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    if inits_as_inputs:  # IR 3 (the oldest zoo files): every initializer is a graph input too
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in inits]
    graph = helper.make_graph(nodes, "thirdparty", inputs, [], inits)
    ir = ir if ir is not None else (4 if opset < 11 else 7 if opset < 14 else 8)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output.extend(vi for vi in inferred.graph.value_info if vi.name == out)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(shape: Sequence[int], batch: int) -> dict[str, np.ndarray]:
    return {"x": rand(batch, *shape[1:], seed=batch)}


def _exact(model: onnx.ModelProto, shape: Sequence[int], ratio: float = 0.5):
    """Prune at batch 1 (verified), then check the pruned model at batch 2 as well."""
    result = prune_onnx(model, ratio=ratio, round_to=1, verify=True,
                        input_shapes={"x": [1, *shape[1:]]})
    assert result.report.exact is True
    onnx.checker.check_model(result.model, full_check=True)
    ok, diff = verify_onnx(model, result.model, result.plan, _feeds(shape, 2))
    assert ok, f"batch 2 differs by {diff}"
    return result


def _removed(result, *names: str) -> None:
    for name in names:
        assert result.plan.removed.get(name), f"nothing removed from '{name}'"


# ---------------------------------------------------------------- tf2onnx, channels last


def _tf2onnx_cnn(opset: int = 13) -> onnx.ModelProto:
    """NHWC input; tf2onnx wraps every Conv in Transpose pairs and writes a channels-last
    BatchNorm as Mul/Add with [C]-shaped constants that broadcast along the last dim."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], name="tr_in", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "k1", "c1b"], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["c1"], ["c1_nhwc"], name="tr1", perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["c1_nhwc", "bn_scale"], ["bn_m"], name="bn/mul"),
        helper.make_node("Add", ["bn_m", "bn_shift"], ["bn"], name="bn/add"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("Transpose", ["r1"], ["r1_nchw"], name="tr2", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["r1_nchw", "k2", "c2b"], ["c2"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["c2"], ["c2_nhwc"], name="tr3", perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["c2_nhwc"], ["r2"], name="relu2"),
        helper.make_node("ReduceMean", ["r2"], ["gap"], name="gap", axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["gap", "fc_w"], ["mm"], name="fc/matmul"),
        helper.make_node("Add", ["mm", "fc_b"], ["y"], name="fc/add"),
    ]
    inits = [init("k1", rand(16, 3, 3, 3)), init("c1b", rand(16)),
             init("bn_scale", rand(16) + 2), init("bn_shift", rand(16)),
             init("k2", rand(24, 16, 3, 3)), init("c2b", rand(24)),
             init("fc_w", rand(24, 10)), init("fc_b", rand(10))]
    return _model(nodes, ["N", 8, 8, 3], "y", inits, opset)


def test_tf2onnx_channels_last_cnn_is_exact() -> None:
    result = _exact(_tf2onnx_cnn(), [1, 8, 8, 3])
    _removed(result, "k1", "bn_scale", "bn_shift", "k2", "fc_w")


# ---------------------------------------------------------------- old-opset zoo idioms


def _zoo_opset9_cnn(ir3: bool = False) -> onnx.ModelProto:
    """Opset 9 (IR 4, or IR 3 with initializers as graph inputs): BatchNormalization, Clip
    with min/max attributes, Dropout with its mask output, Identity, Upsample with a scales
    input, Pad with a pads attribute, Sum of three inputs, Reshape with a constant shape
    tensor, Flatten -> Gemm(transB=1)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"],
                         name="bn1", epsilon=1e-5),
        helper.make_node("Clip", ["n1"], ["r1"], name="relu6", min=0.0, max=6.0),
        helper.make_node("Dropout", ["r1"], ["d1", "d1_mask"], name="drop", ratio=0.1),
        helper.make_node("Identity", ["d1"], ["i1"], name="ident"),
        helper.make_node("Upsample", ["i1", "up_scales"], ["u1"], name="up", mode="nearest"),
        helper.make_node("Pad", ["u1"], ["p1"], name="pad", pads=[0, 0, 1, 1, 0, 0, 1, 1],
                         mode="constant", value=0.0),
        helper.make_node("Conv", ["p1", "w2a"], ["c2a"], name="conv2a", kernel_shape=[3, 3]),
        helper.make_node("Conv", ["p1", "w2b"], ["c2b"], name="conv2b", kernel_shape=[3, 3]),
        helper.make_node("Conv", ["p1", "w2c"], ["c2c"], name="conv2c", kernel_shape=[3, 3]),
        helper.make_node("Sum", ["c2a", "c2b", "c2c"], ["s2"], name="sum3"),
        helper.make_node("Relu", ["s2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["mp"], name="pool", kernel_shape=[4, 4],
                         strides=[4, 4]),
        helper.make_node("Reshape", ["mp", "shape"], ["flat0"], name="reshape"),
        helper.make_node("Gemm", ["flat0", "fc1_w", "fc1_b"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["fr1"], name="relu3"),
        helper.make_node("Flatten", ["fr1"], ["flat1"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat1", "fc2_w", "fc2_b"], ["y"], name="fc2", transB=1),
    ]
    inits = [init("w1", rand(16, 3, 3, 3)), init("b1", rand(16)), init("g1", rand(16) + 2),
             init("be1", rand(16)), init("m1", rand(16)),
             init("v1", np.abs(rand(16)) + 0.5),
             init("up_scales", np.array([1, 1, 2, 2], np.float32)),
             init("w2a", rand(12, 16, 3, 3)), init("w2b", rand(12, 16, 3, 3, seed=1)),
             init("w2c", rand(12, 16, 3, 3, seed=2)),
             init("shape", np.array([1, -1], np.int64)),
             init("fc1_w", rand(20, 12 * 4 * 4)), init("fc1_b", rand(20)),
             init("fc2_w", rand(5, 20)), init("fc2_b", rand(5))]
    return _model(nodes, [1, 3, 8, 8], "y", inits, 9, ir=3 if ir3 else 4,
                  inits_as_inputs=ir3)


@pytest.mark.parametrize("ir3", [False, True], ids=["ir4", "ir3_inits_as_inputs"])
def test_opset9_zoo_cnn_is_exact(ir3: bool) -> None:
    result = prune_onnx(_zoo_opset9_cnn(ir3), ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    onnx.checker.check_model(result.model, full_check=True)
    _removed(result, "w1", "g1", "w2a", "w2b", "w2c", "fc1_w")
    if ir3:  # the declared inputs follow the sliced initializers
        inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                  for i in result.model.graph.input}
        for t in result.model.graph.initializer:
            assert inputs[t.name] == list(t.dims), t.name


def _zoo_opset11_block(opset: int) -> onnx.ModelProto:
    """Resize with scales (opset 11: roi input), Clip with min/max inputs, Split with a
    ``split`` attribute (opset < 13) or input, Squeeze/Unsqueeze with ``axes`` attribute
    (opset < 13) or input, Concat of branches."""
    split_attr = opset < 13
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="clip"),
        helper.make_node("Resize", ["r1", "roi", "scales"], ["u1"], name="resize",
                         mode="nearest"),
        helper.make_node("Split", ["u1"] if split_attr else ["u1", "split"], ["sa", "sb"],
                         name="split", axis=1, **({"split": [10, 6]} if split_attr else {})),
        helper.make_node("Conv", ["sa", "wa"], ["ca"], name="conva", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["sb", "wb"], ["cb"], name="convb", kernel_shape=[1, 1]),
        helper.make_node("Concat", ["ca", "cb"], ["cat"], name="concat", axis=1),
        helper.make_node("Relu", ["cat"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Squeeze", ["gap"] if split_attr else ["gap", "sq_axes"], ["sq"],
                         name="squeeze", **({"axes": [2, 3]} if split_attr else {})),
        helper.make_node("Gemm", ["sq", "fc_w", "fc_b"], ["f"], name="fc", transB=1),
        helper.make_node("Unsqueeze", ["f"] if split_attr else ["f", "unsq_axes"], ["y"],
                         name="unsqueeze", **({"axes": [1]} if split_attr else {})),
    ]
    inits = [init("w1", rand(16, 3, 1, 1)), init("b1", rand(16)),
             init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32)),
             init("roi", np.array([], np.float32)),
             init("scales", np.array([1, 1, 2, 2], np.float32)),
             init("wa", rand(8, 10, 3, 3)), init("wb", rand(8, 6, 1, 1)),
             init("fc_w", rand(4, 16)), init("fc_b", rand(4))]
    if not split_attr:
        inits += [init("split", np.array([10, 6], np.int64)),
                  init("sq_axes", np.array([2, 3], np.int64)),
                  init("unsq_axes", np.array([1], np.int64))]
    return _model(nodes, ["N", 3, 6, 6], "y", inits, opset)


@pytest.mark.parametrize("opset", [11, 12, 13])
def test_split_squeeze_attribute_and_input_forms_are_exact(opset: int) -> None:
    result = _exact(_zoo_opset11_block(opset), [1, 3, 6, 6])
    _removed(result, "w1", "wa", "wb", "fc_w")
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    if opset < 13:
        sizes = list(next(a for a in split.attribute if a.name == "split").ints)
    else:
        sizes = onnx.numpy_helper.to_array(next(
            t for t in result.model.graph.initializer if t.name == split.input[1])).tolist()
    w1 = next(t for t in result.model.graph.initializer if t.name == "w1")
    assert sum(sizes) == w1.dims[0] and sizes != [10, 6]


# ---------------------------------------------------------------- MatMul + Add


def test_matmul_add_mlp_is_exact() -> None:
    """PyTorch-less exporters (keras2onnx, tf2onnx) write Linear as MatMul [K, N] + Add."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="dense1/matmul"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="dense1/add"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="dense2/matmul"),
        helper.make_node("Add", ["b2", "m2"], ["a2"], name="dense2/add"),  # bias first
        helper.make_node("Sigmoid", ["a2"], ["s2"], name="sigmoid"),
        helper.make_node("MatMul", ["s2", "w3"], ["y"], name="dense3/matmul"),
    ]
    model = _model(nodes, ["N", 16], "y", [
        init("w1", rand(16, 32)), init("b1", rand(32)), init("w2", rand(32, 24)),
        init("b2", rand(24)), init("w3", rand(24, 3))], 13)
    result = _exact(model, [1, 16])
    _removed(result, "w1", "b1", "w2", "b2", "w3")


# ---------------------------------------------------------------- ONNX Runtime optimised


def _ort_optimised(model: onnx.ModelProto, level: ort.GraphOptimizationLevel,
                   tmp_path) -> onnx.ModelProto:
    path = tmp_path / f"opt_{int(level)}.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(path)
    opts.intra_op_num_threads = 1
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def test_ort_basic_optimised_graph_is_exact(tmp_path) -> None:
    """ORT's basic level (constant folding, Conv+BatchNorm fusion, Identity and Dropout
    removal) writes standard ops only."""
    opt = _ort_optimised(_zoo_opset9_cnn(), ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                         tmp_path)
    assert all(n.domain in ("", "ai.onnx") for n in opt.graph.node)
    assert not any(n.op_type in ("BatchNormalization", "Dropout", "Identity")
                   for n in opt.graph.node)
    result = prune_onnx(opt, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    onnx.checker.check_model(result.model, full_check=True)
    assert result.plan.n_removed > 0


def test_ort_extended_optimised_graph_pins_fused_ops_and_runs(tmp_path) -> None:
    """The extended level fuses into com.microsoft ops (FusedConv, FusedGemm...). ONNX cannot
    infer their shapes: without value_info the prune refuses with an error naming the op and
    the remedy; with it, what they touch is pinned and the model still runs exactly."""
    opt = _ort_optimised(_tf2onnx_cnn(), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                         tmp_path)
    custom = [n for n in opt.graph.node if n.domain not in ("", "ai.onnx")]
    if not custom:
        pytest.skip("this ONNX Runtime fused nothing at the extended level")
    with pytest.raises(InputError, match=f"{custom[0].op_type}.*value_info"):
        prune_onnx(opt, ratio=0.5, round_to=1, input_shapes={"x": [1, 8, 8, 3]})
    # the user's remedy: declare the fused ops' output shapes (a FusedConv's is its Conv's)
    assert {n.op_type for n in custom} == {"FusedConv"}, [n.op_type for n in custom]
    opt.graph.value_info.extend(helper.make_tensor_value_info(
        n.output[0], TensorProto.FLOAT, [1, 16, 8, 8]) for n in custom)
    result = prune_onnx(opt, ratio=0.5, round_to=1, verify=True,
                        input_shapes={"x": [1, 8, 8, 3]})
    assert result.report.exact is True
    assert any("FusedConv" in r or "com.microsoft" in r
               for g in result.analysis.groups for r in g.pin_reasons)
    ok, diff = verify_onnx(opt, result.model, result.plan, _feeds([1, 8, 8, 3], 2))
    assert ok, diff


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_with_pads_input_passes_channels(mode: str) -> None:
    """Opset 13+ Pad (pads as an input, tf2onnx's SAME padding and reflect padding): the
    channel dim is not padded, so the channels pass through; a dim it pads keeps its size."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Pad", ["r1", "pads"], ["p1"], name="pad", mode=mode),
        helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2", kernel_shape=[3, 3]),
    ]
    model = _model(nodes, ["N", 3, 6, 6], "y", [
        init("w1", rand(16, 3, 1, 1)), init("b1", rand(16)),
        init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
        init("w2", rand(8, 16, 3, 3))], 13)
    result = _exact(model, [1, 3, 6, 6])
    _removed(result, "w1", "b1", "w2")


def test_pad_of_the_channel_dim_keeps_the_padded_positions() -> None:
    """A constant pad of the channel dim (the zero-padded shortcut of CIFAR ResNets, written
    with the opset-9 attribute): the input's channels prune, the padded ones stay."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Pad", ["r1"], ["p1"], name="pad", pads=[0, 4, 0, 0, 0, 4, 0, 0]),
        helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2", kernel_shape=[1, 1]),
    ]
    model = _model(nodes, [1, 3, 4, 4], "y", [init("w1", rand(16, 3, 1, 1)),
                                              init("w2", rand(8, 24, 1, 1))], 9)
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    onnx.checker.check_model(result.model, full_check=True)
    w2 = result.plan.removed["w2"][1]
    assert w2 and all(4 <= i < 20 for i in w2), w2


def test_opset8_upsample_scales_attribute_and_reshape_tokens_are_exact() -> None:
    """Opset 7-8 idioms: Upsample with a ``scales`` attribute, BatchNormalization with
    ``spatial=1``, Reshape to ``[0, -1]`` (copy the batch, infer the rest)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"],
                         name="bn1", spatial=1),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Upsample", ["r1"], ["u1"], name="up", scales=[1.0, 1.0, 2.0, 2.0]),
        helper.make_node("Conv", ["u1", "w2"], ["c2"], name="conv2", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Reshape", ["r2", "shape"], ["flat"], name="reshape"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    model = _model(nodes, [1, 3, 4, 4], "y", [
        init("w1", rand(16, 3, 3, 3)), init("b1", rand(16)), init("g1", rand(16) + 2),
        init("be1", rand(16)), init("m1", rand(16)), init("v1", np.abs(rand(16)) + 0.5),
        init("w2", rand(8, 16, 2, 2)), init("shape", np.array([0, -1], np.int64)),
        init("fc_w", rand(5, 8 * 4 * 4)), init("fc_b", rand(5))], 8, ir=3,
        inits_as_inputs=True)
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    onnx.checker.check_model(result.model, full_check=True)
    _removed(result, "w1", "g1", "w2", "fc_w")


# ---------------------------------------------------------------- depth/space rearrangement


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_and_space_to_depth_prune_whole_blocks(mode: str) -> None:
    """Super-resolution tails (ESPCN, EDSR) as TensorFlow and PyTorch exporters write them:
    SpaceToDepth stem, conv to ``C * r * r``, DepthToSpace (DCR: TensorFlow's order, CRD:
    torch's pixel_shuffle). An output channel of DepthToSpace is ``r * r`` conv channels."""
    nodes = [
        helper.make_node("SpaceToDepth", ["x"], ["s"], name="stem/s2d", blocksize=2),
        helper.make_node("Conv", ["s", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="up/conv", pads=[1, 1, 1, 1]),
        helper.make_node("DepthToSpace", ["c2"], ["d"], name="up/d2s", blocksize=2, mode=mode),
        helper.make_node("Relu", ["d"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="tail", pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, ["N", 3, 8, 8], "y", [
        init("w1", rand(8, 12, 3, 3)), init("b1", rand(8)), init("w2", rand(24, 8, 3, 3)),
        init("b2", rand(24)), init("w3", rand(3, 6, 3, 3)), init("b3", rand(3))], 13)
    result = _exact(model, [1, 3, 8, 8])
    _removed(result, "w1", "w2", "w3")
    removed = result.plan.removed["w2"][0]
    assert len(removed) % 4 == 0  # whole r * r blocks
    # the blocks follow the mode: CRD keeps c's 4 channels consecutive, DCR strides them by C
    c = sorted({i // 4 for i in removed}) if mode == "CRD" else sorted({i % 6 for i in removed})
    assert len(removed) == 4 * len(c)
    assert "w1" not in result.plan.removed or 1 not in result.plan.removed["w1"]  # image stays
