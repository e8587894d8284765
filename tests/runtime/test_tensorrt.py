"""TensorRT lowering: 2:4 eligibility (pure), log / inspector parsing, trtexec line, errors.

Tests marked ``tensorrt`` need the real TensorRT wheel and an NVIDIA GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from secateurs.cli import main
from secateurs.errors import SecateursError
from secateurs.runtime import tensorrt as rt


def _has_trt_and_gpu() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


needs_trt = pytest.mark.skipif(
    not _has_trt_and_gpu(), reason="TensorRT not installed (cannot be installed on this machine)")


def _two_four(shape: tuple[int, ...], axis: int, seed: int = 0) -> np.ndarray:
    """Random weights with exactly 2 of every 4 consecutive values along ``axis`` zeroed."""
    rng = np.random.default_rng(seed)
    w = np.moveaxis(rng.standard_normal(shape).astype(np.float32) + 3.0, axis, -1).copy()
    groups = w.reshape(*w.shape[:-1], -1, 4)
    groups[..., 1] = 0.0
    groups[..., 3] = 0.0
    return np.moveaxis(groups.reshape(w.shape), -1, axis)


def _dense(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 3.0


def _model(nodes, inits, inputs, output):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture(scope="module")
def handmade():
    """One ONNX with every case: Conv / Gemm (transB 0 and 1) / MatMul (direct, transposed,
    dynamic), with 2:4 and dense weights, small and grouped convs."""
    conv24 = _two_four((64, 64, 3, 3), axis=1)
    conv24_wrong_axis = _two_four((64, 64, 3, 3), axis=0)  # 2:4 along K, not C
    inits = {
        "conv_a.w": conv24, "conv_b.w": _dense((64, 64, 3, 3)),
        "conv_c.w": conv24_wrong_axis, "conv_small.w": _two_four((16, 16, 3, 3), axis=1),
        "conv_grp.w": _two_four((64, 16, 3, 3), axis=1),
        "gemm0.w": _two_four((64, 128), axis=0),  # [K, N], transB=0: along K = axis 0
        "gemm1.w": _two_four((64, 128), axis=0),  # same array as [N, K] with transB=1: wrong
        "gemm1b.w": _two_four((128, 64), axis=1),  # [N, K], transB=1: along K = axis 1
        "mm.w": _two_four((64, 96), axis=0),  # MatMul B [K, N]: along rows
        "mm_bad.w": _two_four((64, 96), axis=1),
        "mm_t.w": _two_four((96, 64), axis=1),  # Linear weight [N, K], used via Transpose
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_a.w"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Conv", ["a", "conv_b.w"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Conv", ["b", "conv_c.w"], ["c"], pads=[1, 1, 1, 1], name="conv_c"),
        helper.make_node("Conv", ["c", "conv_grp.w"], ["d"], pads=[1, 1, 1, 1], group=4,
                         name="conv_grp"),
        helper.make_node("Conv", ["x16", "conv_small.w"], ["e"], pads=[1, 1, 1, 1],
                         name="conv_small"),
        helper.make_node("Gemm", ["v", "gemm0.w"], ["g0"], name="gemm0"),
        helper.make_node("Gemm", ["g0t", "gemm1.w"], ["g1"], transB=1, name="gemm1"),
        helper.make_node("Gemm", ["v", "gemm1b.w"], ["g1b"], transB=1, name="gemm1b"),
        helper.make_node("MatMul", ["t", "mm.w"], ["m0"], name="mm"),
        helper.make_node("MatMul", ["t", "mm_bad.w"], ["m1"], name="mm_bad"),
        helper.make_node("Transpose", ["mm_t.w"], ["mm_t.wT"], perm=[1, 0]),
        helper.make_node("MatMul", ["t", "mm_t.wT"], ["m2"], name="mm_t"),
        helper.make_node("MatMul", ["t", "dyn"], ["m3"], name="mm_dyn"),
    ]
    inputs = [("x", [1, 64, 8, 8]), ("x16", [1, 16, 8, 8]), ("v", [2, 64]), ("g0t", [2, 64]),
              ("t", [2, 5, 64]), ("dyn", [2, 64, 32])]
    return _model(nodes, inits, inputs, "m0")


def test_eligibility_per_layer(handmade):
    report = rt.check_sparse_eligibility(handmade)
    assert set(report.eligible_names) == {"conv_a", "gemm0", "gemm1b", "mm", "mm_t"}
    conv_a = report.layer("conv_a")
    assert (conv_a.reduction_axis, conv_a.reduction_size, conv_a.output_size) == (1, 64, 64)
    assert conv_a.density == pytest.approx(0.5)
    assert "not 2:4 along axis 1" in report.layer("conv_b").reasons[0]
    assert not report.layer("conv_c").is_2_4  # 2:4 along K does not count
    assert any("too small" in r for r in report.layer("conv_small").reasons)
    assert report.layer("conv_small").is_2_4
    assert any("grouped conv (group=4)" in r for r in report.layer("conv_grp").reasons)
    assert report.layer("gemm0").reduction_axis == 0
    assert report.layer("gemm1").reduction_axis == 1 and not report.layer("gemm1").is_2_4
    assert report.layer("gemm1b").reduction_axis == 1
    assert report.layer("mm").reduction_axis == 0
    assert not report.layer("mm_bad").eligible
    assert report.layer("mm_t").weight == "mm_t.w" and report.layer("mm_t").reduction_axis == 1
    assert "not a constant" in report.layer("mm_dyn").reasons[0]
    text = report.to_text()
    assert "5/12" in text and "conv_grp" in text


def test_eligibility_reduction_not_multiple_of_four():
    w = _dense((64, 66))
    m = _model([helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")], {"w": w},
               [("t", [1, 64])], "y")
    (layer,) = rt.check_sparse_eligibility(m).layers
    assert not layer.eligible and "not 2:4" in layer.reasons[0]
    w = _dense((66, 64))
    m = _model([helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")], {"w": w},
               [("t", [1, 66])], "y")
    assert "not a multiple of 4" in rt.check_sparse_eligibility(m).layers[0].reasons[0]


def test_eligibility_on_exported_transformer(tmp_path, transformer):
    """Legacy export puts Linear weights behind Transpose: still traced to the initializer."""
    from secateurs.runtime.onnx_export import export_onnx

    with torch.no_grad():
        w = transformer.mlp[0].weight  # [64, 32]: K = 32 along dim 1
        w.copy_(torch.from_numpy(_two_four(tuple(w.shape), axis=1)))
    proto = export_onnx(transformer, torch.randn(1, 4, 32))
    report = rt.check_sparse_eligibility(proto, min_reduction=16, min_output=16)
    by_weight = {layer.weight: layer for layer in report.layers}
    assert by_weight["mlp.0.weight"].is_2_4 and by_weight["mlp.0.weight"].eligible
    assert not by_weight["mlp.2.weight"].is_2_4


def test_nm_helper():
    w = _two_four((8, 16), axis=1)
    assert rt._nm_ok(w, 2, 4, axis=1) and not rt._nm_ok(w, 2, 4, axis=0)
    assert not rt._nm_ok(np.ones((4, 6)), 2, 4, axis=1)  # 6 is not a multiple of 4


# Captured-format samples. Log lines follow trtexec / TensorRT builder INFO output as quoted in
# NVIDIA/TensorRT issues #1403, #2169 and #4054 ("[I] [TRT] (Sparsity) Layers eligible for sparse
# math: ..."); the inspector JSON follows the --exportLayerInfo / get_engine_information(JSON)
# layout with --profilingVerbosity=detailed quoted in NVIDIA/TensorRT issues #2418 and #4020.
SAMPLE_LOG = """\
[08/05/2024-12:06:50] [I] [TRT] Local timing cache in use. Profiling results in this builder pass will not be stored.
[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, Conv_619 + Relu_620, Conv_622 + Relu_623, Conv_234 + Add_240 + Relu_241
[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: Conv_622 + Relu_623, Conv_234 + Add_240 + Relu_241
[08/05/2024-12:06:54] [I] [TRT] Total Activation Memory: 7864832
"""

SAMPLE_LOG_NONE_PICKED = """\
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:
"""

SAMPLE_INSPECTOR = r"""{"Layers": [{
  "Name": "resnetv15_stage3_conv0_fwd + resnetv15_stage3_relu0_fwd",
  "LayerType": "CaskConvolution",
  "Inputs": [{"Name": "x", "Location": "Device", "Dimensions": [1,128,28,28],
              "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
  "Outputs": [{"Name": "y", "Location": "Device", "Dimensions": [1,256,14,14],
               "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
  "ParameterType": "Convolution", "Kernel": [3,3], "OutMaps": 256, "Groups": 1,
  "Weights": {"Type": "Half", "Count": 294912}, "HasSparseWeights": 1,
  "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_f16f16_f32_f16_nhwckrsc_nhwc",
  "TacticValue": "0x4749124f62d8bd23", "StreamId": 0,
  "Metadata": "[ONNX Layer: resnetv15_stage3_conv0_fwd]\u001e[ONNX Layer: resnetv15_stage3_relu0_fwd]"
},{
  "Name": "resnetv15_dense0_fwd", "LayerType": "CaskGemmConvolution",
  "HasSparseWeights": 0,
  "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize64x64x64_stage4",
  "Metadata": "[ONNX Layer: resnetv15_dense0_fwd]"
},{
  "Name": "Reformatting CopyNode for Input Tensor 0 to conv1", "LayerType": "Reformat",
  "TacticName": "0x0000000000000000"
}],
"Bindings": ["x", "y"]}"""


def test_parse_sparsity_log():
    parsed = rt.parse_sparsity_log(SAMPLE_LOG)
    assert parsed.found
    assert parsed.eligible == ("MatMul_401", "Conv_619 + Relu_620", "Conv_622 + Relu_623",
                               "Conv_234 + Add_240 + Relu_241")
    assert parsed.picked == ("Conv_622 + Relu_623", "Conv_234 + Add_240 + Relu_241")
    none_picked = rt.parse_sparsity_log(SAMPLE_LOG_NONE_PICKED)
    assert none_picked.eligible == ("Conv_22", "MatMul_51") and none_picked.picked == ()
    assert not rt.parse_sparsity_log("[I] [TRT] nothing about sparsity").found


def test_parse_engine_layers():
    layers = rt.parse_engine_layers(SAMPLE_INSPECTOR)
    assert [x.sparse for x in layers] == [True, False, False]
    assert layers[0].onnx_layers == ("resnetv15_stage3_conv0_fwd", "resnetv15_stage3_relu0_fwd")
    assert layers[1].layer_type == "CaskGemmConvolution"
    names_only = rt.parse_engine_layers('{"Layers": ["conv1", "fc"], "Bindings": ["x"]}')
    assert [(x.name, x.sparse) for x in names_only] == [("conv1", None), ("fc", None)]


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("generation", ["trt10", "trt11"])
def test_inspector_fixtures_both_layouts(generation):
    """TensorRT 10 ("Bindings", "Format/Datatype") and 11 ("I/O Tensors", "Format" +
    "DataType") describe the same engine: the parsed layers and I/O names agree."""
    info = rt.parse_engine_info((FIXTURES / f"{generation}_inspector.json").read_text())
    assert info.layout == {"trt10": "bindings", "trt11": "io_tensors"}[generation]
    assert [t.name for t in info.io_tensors] == ["x", "y"]
    assert info.sparse_layers == ("/conv1/Conv + /relu1/Relu",)
    conv1, conv2, reformat = info.layers
    assert conv1.onnx_layers == ("/conv1/Conv", "/relu1/Relu")
    assert conv1.input_types == ("fp16",) and conv1.output_types == ("fp16",)
    assert conv2.output_types == ("fp32",) and conv2.sparse is False
    assert reformat.input_types == ("fp32",) and reformat.output_types == ("fp16",)
    assert reformat.sparse is False


def test_inspector_io_tensors_fields():
    info = rt.parse_engine_info((FIXTURES / "trt11_inspector.json").read_text())
    x, y = info.io_tensors
    assert (x.mode, x.dtype, x.shape) == ("input", "fp32", (1, 64, 56, 56))
    assert (y.mode, y.dtype, y.shape) == ("output", "fp32", (1, 128, 56, 56))
    old = rt.parse_engine_info((FIXTURES / "trt10_inspector.json").read_text())
    assert [(t.mode, t.dtype, t.shape) for t in old.io_tensors] == [("", "", ())] * 2
    assert rt.parse_engine_info('{"Layers": []}').layout == "none"
    with pytest.raises(SecateursError, match="not JSON"):
        rt.parse_engine_info("Layers: none")
    with pytest.raises(SecateursError, match="no 'Layers' list"):
        rt.parse_engine_info('{"Layers": 3}')


@pytest.mark.parametrize("generation", ["trt10", "trt11"])
def test_build_log_fixtures(generation):
    parsed = rt.parse_sparsity_log((FIXTURES / f"{generation}_build.log").read_text())
    assert parsed.found
    assert parsed.eligible == ("/conv1/Conv + /relu1/Relu", "/conv2/Conv")
    assert parsed.picked == ("/conv1/Conv + /relu1/Relu",)


# ---- API generations: fake `tensorrt` namespaces with and without the attributes -----------


def _flags(**values):
    return SimpleNamespace(**values)


def _fake_trt(generation: str) -> SimpleNamespace:
    """The attribute surface ``detect_api`` and ``build_engine`` touch, per API generation
    (enum values as the TensorRT 10 / 11 headers number them; 11 renumbers BuilderFlag)."""
    if generation == "trt11":
        builder_flag = _flags(TF32=6, SPARSE_WEIGHTS=7, REFIT=4)
        creation = _flags(STRONGLY_TYPED=0)
    elif generation == "trt10":
        builder_flag = _flags(FP16=0, INT8=1, REFIT=4, TF32=6, SPARSE_WEIGHTS=7, FP8=15, BF16=17,
                              INT4=22)
        creation = _flags(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    else:  # trt8: implicit batch still exists, no strong typing
        builder_flag = _flags(FP16=0, INT8=1, TF32=6, SPARSE_WEIGHTS=7)
        creation = _flags(EXPLICIT_BATCH=0)
    version = {"trt11": "11.4.0", "trt10": "10.13.3", "trt8": "8.6.1"}[generation]
    return SimpleNamespace(__version__=version, BuilderFlag=builder_flag,
                           NetworkDefinitionCreationFlag=creation,
                           Builder=type("Builder", (), {"max_batch_size": 1}
                                        if generation == "trt8" else {}))


def test_detect_api_generations():
    t11, t10, t8 = (rt.detect_api(_fake_trt(g)) for g in ("trt11", "trt10", "trt8"))
    assert t11.always_strongly_typed and not t11.weak_typing and t11.weak_flags == frozenset()
    assert t11.strongly_typed_flag and not t11.implicit_batch
    assert t10.weak_typing and t10.strongly_typed_flag and not t10.implicit_batch
    assert {"FP16", "INT8", "BF16"} <= t10.weak_flags
    assert t8.weak_typing and not t8.strongly_typed_flag and t8.implicit_batch
    # detection reads attributes, never the version string
    lying = _fake_trt("trt11")
    lying.__version__ = "10.0.0"
    assert rt.detect_api(lying).always_strongly_typed
    assert "11" in t11.generation and "10" in t10.generation


def _settings(generation, precision, onnx_type, strongly_typed=None, sparse=True):
    api = None if generation is None else rt.detect_api(_fake_trt(generation))
    return rt.plan_build(api, precision, onnx_type, sparse, strongly_typed)


@pytest.mark.parametrize("generation", ["trt10", "trt11", None])
@pytest.mark.parametrize("onnx_type", ["fp32", "fp16", "int8"])
def test_plan_build_strongly_typed_when_the_onnx_carries_the_types(generation, onnx_type):
    for precision in (None, onnx_type):
        s = _settings(generation, precision, onnx_type)
        assert s.strongly_typed and s.precision == onnx_type and not s.notes
        assert s.network_flags == ("STRONGLY_TYPED",)
        assert s.builder_flags == ("SPARSE_WEIGHTS",)  # no precision flags when typed
        assert s.trtexec_flags == ("--stronglyTyped",)


def test_plan_build_weak_flags_only_where_they_exist():
    s = _settings("trt10", "fp16", "fp32")  # fp32 ONNX, fp16 wanted: TensorRT 10's weak typing
    assert not s.strongly_typed and s.precision == "fp16"
    assert s.builder_flags == ("SPARSE_WEIGHTS", "FP16") and s.trtexec_flags == ("--fp16",)
    assert s.network_flags == () and any("deprecated" in n for n in s.notes)
    s = _settings("trt10", "int8", "fp32")
    assert set(s.builder_flags) == {"SPARSE_WEIGHTS", "INT8", "FP16"}
    assert any("fall back to fp16" in n for n in s.notes)
    with pytest.raises(SecateursError, match="builds only strongly typed.*ONNX is fp32.*"
                                             "optimize --quantize"):
        _settings("trt11", "fp16", "fp32")
    with pytest.raises(SecateursError, match="drop --weakly-typed"):
        _settings("trt11", None, "fp16", strongly_typed=False)
    # TensorRT 8: no strong typing; weak flags plus explicit batch
    s = _settings("trt8", "fp16", "fp32")
    assert not s.strongly_typed and s.network_flags == ("EXPLICIT_BATCH",)
    assert "FP16" in s.builder_flags and not any("deprecated" in n for n in s.notes)
    with pytest.raises(SecateursError, match="STRONGLY_TYPED"):
        _settings("trt8", None, "fp16", strongly_typed=True)
    with pytest.raises(SecateursError, match="no BuilderFlag.BF16"):
        _settings("trt8", "bf16", "fp32")


def test_plan_build_explicit_choices_and_no_tensorrt():
    s = _settings("trt10", None, "fp16", strongly_typed=False)  # explicit weak on 10
    assert s.builder_flags == ("SPARSE_WEIGHTS", "FP16") and s.trtexec_flags == ("--fp16",)
    s = _settings("trt10", "fp16", "fp32", strongly_typed=True)  # explicit strong: ONNX types win
    assert s.strongly_typed and s.precision == "fp32" and "optimize --quantize" in s.notes[0]
    s = _settings(None, "fp16", "fp32")  # no TensorRT at hand: a line valid on 10 and 11
    assert s.trtexec_flags == ("--stronglyTyped",) and "--weakly-typed" in s.notes[0]
    assert _settings("trt10", None, "fp32", sparse=False).builder_flags == ()
    with pytest.raises(SecateursError, match="precision"):
        _settings("trt10", "fp8", "fp32")


def _typed_models():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    w = numpy_helper.from_array(_dense((8, 8)), "w")
    fp32 = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]))
    w16 = numpy_helper.from_array(_dense((8, 8)).astype(np.float16), "w")
    fp16 = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["x16", "w"], ["y16"]),
         helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)], "g", [x], [y], [w16]))
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    int8 = helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
         helper.make_node("MatMul", ["dq", "w"], ["y"])], "g", [x], [y], [w, scale, zero]))
    return {"fp32": fp32, "fp16": fp16, "int8": int8}


def test_onnx_precision():
    for want, model in _typed_models().items():
        assert rt.onnx_precision(model) == want


def test_trtexec_command_flags(tmp_path):
    cmd = rt.trtexec_command("m.onnx", "m.plan", workspace_gb=2)  # no file: fp32, strongly typed
    assert cmd[:5] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.plan", "--stronglyTyped",
                       "--sparsity=enable"]
    assert "--memPoolSize=workspace:2048M" in cmd and "--profilingVerbosity=detailed" in cmd
    assert not {"--fp16", "--bf16", "--int8", "--best"} & set(cmd)
    t10, t11 = (rt.detect_api(_fake_trt(g)) for g in ("trt10", "trt11"))
    weak = rt.trtexec_command("m.onnx", "m.plan", "fp16", api=t10, onnx_type="fp32")
    assert "--fp16" in weak and "--stronglyTyped" not in weak
    dense = rt.trtexec_command("m.onnx", "m.plan", "bf16", sparse=False, api=t10)
    assert "--sparsity=disable" in dense and "--bf16" in dense and "--fp16" not in dense
    assert {"--int8", "--fp16"} <= set(rt.trtexec_command("m.onnx", "e", "int8", api=t10))
    with pytest.raises(SecateursError, match="strongly typed"):
        rt.trtexec_command("m.onnx", "e", "fp16", api=t11, onnx_type="fp32")
    for name, model in _typed_models().items():  # the ONNX's own types, read from the file
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(model.SerializeToString())
        for api in (None, t10, t11):
            typed = rt.trtexec_command(path, "e", api=api)
            assert "--stronglyTyped" in typed and "--sparsity=enable" in typed
            assert not {"--fp16", "--bf16", "--int8"} & set(typed)
    shaped = rt.trtexec_command("m.onnx", "e", shapes={"x": ((1, 3, 8, 8), (8, 3, 8, 8),
                                                             (16, 3, 8, 8))})
    assert "--minShapes=x:1x3x8x8" in shaped and "--maxShapes=x:16x3x8x8" in shaped
    with pytest.raises(SecateursError, match="precision"):
        rt.trtexec_command("m.onnx", "e", "fp8")


class _Recorder:
    """Records what build_engine asks of the fake TensorRT."""

    def __init__(self, generation: str):
        self.network_flags: int | None = None
        self.config_flags: list[int] = []
        self.log = (FIXTURES / f"{generation}_build.log").read_text()
        self.inspector = (FIXTURES / f"{generation}_inspector.json").read_text()


def _buildable_fake(generation: str, rec: _Recorder) -> SimpleNamespace:
    trt = _fake_trt(generation)
    severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    class ILogger:
        Severity = severity

        def __init__(self):
            pass

    class Network:
        pass

    class Config:
        profiling_verbosity = None

        def set_memory_pool_limit(self, pool, size):
            self.pool = (pool, size)

        def set_flag(self, flag):
            rec.config_flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profile = profile

    class Profile:
        def set_shape(self, *args):
            self.shape = args

    class Builder(trt.Builder):
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            rec.network_flags = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            for line in rec.log.splitlines():
                self.logger.log(severity.INFO, line.split("[TRT] ", 1)[-1])
            return b"engine-bytes"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    class Inspector:
        def get_engine_information(self, fmt):
            return rec.inspector

    class Engine:
        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"engine-bytes"
            return Engine()

    trt.ILogger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Builder, OnnxParser, Runtime
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE=0)
    trt.ProfilingVerbosity = SimpleNamespace(DETAILED=2)
    trt.LayerInformationFormat = SimpleNamespace(JSON=1)
    return trt


@pytest.mark.parametrize("generation", ["trt10", "trt11"])
@pytest.mark.parametrize("onnx_type", ["fp16", "int8"])
def test_build_engine_wiring_on_fake_api(tmp_path, monkeypatch, generation, onnx_type):
    """build_engine sets exactly the flags plan_build chose, by the installed enum values."""
    rec = _Recorder(generation)
    trt = _buildable_fake(generation, rec)
    monkeypatch.setattr(rt, "_import_tensorrt", lambda: trt)
    path = tmp_path / "m.onnx"
    path.write_bytes(_typed_models()[onnx_type].SerializeToString())
    report = rt.build_engine(path, tmp_path / "m.plan")
    assert (tmp_path / "m.plan").read_bytes() == b"engine-bytes"
    assert report.strongly_typed and report.precision == onnx_type
    strong_bit = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert rec.network_flags == 1 << strong_bit  # 1 << 1 on 10, 1 << 0 on 11
    assert rec.config_flags == [trt.BuilderFlag.SPARSE_WEIGHTS]  # no FP16/INT8 flags
    assert "--stronglyTyped" in report.trtexec_cmd and "--fp16" not in report.trtexec_cmd
    assert report.sparse_layers == ("/conv1/Conv + /relu1/Relu",)
    assert report.eligible_layers == ("/conv1/Conv + /relu1/Relu", "/conv2/Conv")
    assert report.inspector_layout == {"trt10": "bindings", "trt11": "io_tensors"}[generation]
    assert [t.name for t in report.io_tensors] == ["x", "y"]
    assert report.tensorrt_version == trt.__version__


def test_build_engine_weak_flags_on_fake_trt10_error_on_trt11(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(_typed_models()["fp32"].SerializeToString())
    rec = _Recorder("trt10")
    trt10 = _buildable_fake("trt10", rec)
    monkeypatch.setattr(rt, "_import_tensorrt", lambda: trt10)
    report = rt.build_engine(path, tmp_path / "m.plan", precision="fp16")
    assert not report.strongly_typed and report.precision == "fp16"
    assert rec.network_flags == 0
    assert rec.config_flags == [trt10.BuilderFlag.SPARSE_WEIGHTS, trt10.BuilderFlag.FP16]
    assert "--fp16" in report.trtexec_cmd and any("deprecated" in n for n in report.notes)
    rec11 = _Recorder("trt11")
    monkeypatch.setattr(rt, "_import_tensorrt", lambda: _buildable_fake("trt11", rec11))
    with pytest.raises(SecateursError, match="builds only strongly typed"):
        rt.build_engine(path, tmp_path / "m11.plan", precision="fp16")
    assert rec11.network_flags is None and not (tmp_path / "m11.plan").exists()


@pytest.mark.skipif(_has_trt_and_gpu(), reason="TensorRT is installed: the error path is moot")
def test_build_engine_without_tensorrt_is_clear(tmp_path, handmade):
    path = tmp_path / "m.onnx"
    path.write_bytes(handmade.SerializeToString())
    with pytest.raises(SecateursError, match="TensorRT is not installed: pip install tensorrt "
                                             "on a machine with an NVIDIA GPU"):
        rt.build_engine(path, tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()
    with pytest.raises(SecateursError):
        rt.TrtRunner(tmp_path / "m.plan")


@pytest.mark.skipif(_has_trt_and_gpu(), reason="TensorRT is installed: the error path is moot")
def test_build_command_prints_report_then_exits_2(tmp_path, handmade, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(handmade.SerializeToString())
    report = tmp_path / "report.json"
    code = main(["build", str(path), "--engine", str(tmp_path / "m.plan"),
                 "--report", str(report)])
    out = capsys.readouterr()
    assert code == 2
    assert "5/12" in out.out and "trtexec --onnx=" in out.out and "--sparsity=enable" in out.out
    assert "TensorRT is not installed" in out.err
    assert report.exists() and not (tmp_path / "m.plan").exists()


def test_build_command_print_trtexec_only(tmp_path, handmade, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(handmade.SerializeToString())
    code = main(["build", str(path), "--print-trtexec", "--no-sparse"])
    out = capsys.readouterr().out
    assert code == 0 and "--sparsity=disable" in out and "--stronglyTyped" in out
    assert not {"--fp16", "--bf16", "--int8"} & set(out.split())
    assert f"--saveEngine={tmp_path / 'm.plan'}" in out


@pytest.mark.skipif(_has_trt_and_gpu(), reason="TensorRT is installed: the line follows it")
def test_build_command_precision_the_onnx_lacks_gives_a_note(tmp_path, handmade, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(handmade.SerializeToString())
    code = main(["build", str(path), "--print-trtexec", "--precision", "fp16"])
    out = capsys.readouterr().out
    assert code == 0 and "--stronglyTyped" in out and "--fp16" not in out.split()
    assert "note: strongly typed" in out and "optimize --quantize" in out


@pytest.mark.tensorrt
@needs_trt
def test_build_and_run_sparse_engine(tmp_path):  # pragma: no cover - needs TensorRT + GPU
    from secateurs.runtime.onnx_export import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(128, 128, 3, padding=1)).eval()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.copy_(torch.from_numpy(_two_four(tuple(conv.weight.shape), axis=1)))
    onnx_path, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    export_onnx(model, torch.randn(1, 64, 32, 32), onnx_path, dynamic_batch=True)
    report = rt.build_engine(onnx_path, plan, precision="fp16", sparse=True, max_batch=4)
    assert plan.exists() and report.engine_layers
    assert len(report.eligibility.eligible) == 2
    diffs = rt.check_against_ort(onnx_path, plan, batch=2)
    assert all(d < 5e-2 for d in diffs.values())
