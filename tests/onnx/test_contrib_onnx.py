"""ONNX Runtime's contrib ops (``com.microsoft``), as ORT's transformer optimizer and optimum
write them (``model_O1.onnx``-style files on the Hugging Face Hub): SkipLayerNormalization,
SkipSimplifiedLayerNormalization, BiasGelu, FastGelu, Gelu, QuickGelu and
SimplifiedLayerNormalization, which ORT registers in the *default* domain (such a file
fails ONNX's checker before any prune). ONNX's shape inference knows none of them: their
shapes come from onnxruntime's symbolic shape inference. Before, every such model stopped with
"has an unknown shape after shape inference" even with static input shapes."""

from __future__ import annotations

import collections
import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
from _onnx_testlib import init, make_model, rand
from onnx import helper

from secateurs.graph.from_onnx import from_onnx
from secateurs.graph.onnx_apply import check_full
from secateurs.passes.prune_onnx import prune_onnx, verify_onnx

MS = "com.microsoft"
D, H = 16, 32  # hidden, MLP width


def _block() -> onnx.ModelProto:
    """x -> MatMul -> BiasGelu -> MatMul -> SkipLayerNorm(+x, bias) -> MatMul -> QuickGelu ->
    MatMul -> MatMul -> FastGelu(bias) -> MatMul -> Add(the norm's sum output)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("BiasGelu", ["h1", "b1"], ["g1"], name="bias_gelu", domain=MS),
        helper.make_node("MatMul", ["g1", "w2"], ["h2"], name="fc2"),
        helper.make_node("SkipLayerNormalization", ["h2", "x", "gamma", "beta", "b2"],
                         ["n", "", "", "sum"], name="skip_ln", domain=MS, epsilon=1e-5),
        helper.make_node("MatMul", ["n", "w3"], ["h3"], name="fc3"),
        helper.make_node("QuickGelu", ["h3"], ["q"], name="quick", domain=MS, alpha=1.702),
        helper.make_node("MatMul", ["q", "w4"], ["h4"], name="fc4"),
        helper.make_node("MatMul", ["h4", "w5"], ["h5"], name="fc5"),
        helper.make_node("FastGelu", ["h5", "b5"], ["f5"], name="fast_gelu", domain=MS),
        helper.make_node("MatMul", ["f5", "w6"], ["h6"], name="fc6"),
        helper.make_node("Add", ["h6", "sum"], ["y"], name="residual"),
    ]
    inits = [init("w1", rand(D, H)), init("b1", rand(H, seed=1)), init("w2", rand(H, D)),
             init("gamma", rand(D, seed=2) + 1.5), init("beta", rand(D, seed=3)),
             init("b2", rand(D, seed=4)), init("w3", rand(D, H, seed=5)),
             init("w4", rand(H, D, seed=6)), init("w5", rand(D, H, seed=7)),
             init("b5", rand(H, seed=8)), init("w6", rand(H, D, seed=9))]
    return make_model(nodes, {"x": [2, 5, D]}, {"y": [2, 5, D]}, inits,
                      extra_opsets=[(MS, 1)])


def test_contrib_ops_lower_and_prune_exactly() -> None:
    model = _block()
    graph = from_onnx(model)
    ops = collections.Counter(n.op for n in graph.nodes)
    assert ops["opaque"] == 0, [n.attrs for n in graph.nodes if n.op == "opaque"]
    assert ops["gelu"] == 2 and ops["silu"] == 1 and ops["layer_norm"] == 1
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True, result.report.max_abs_diff
    assert not result.report.repairs, [r.reason for r in result.report.repairs]
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["b1"] == (H // 2,) and shapes["w1"] == (D, H // 2)  # BiasGelu's bias
    assert shapes["w3"] == (D, H // 2)  # QuickGelu's width
    assert shapes["b5"] == (H // 2,)  # FastGelu's bias
    assert shapes["gamma"] == (D,)  # normalised channels stay (exact mode)
    check_full(result.model)
    for batch in (2,):
        feeds = {"x": rand(batch, 5, D, seed=11)}
        ok, diff = verify_onnx(model, result.model, result.plan, feeds)
        assert ok, diff


@pytest.mark.parametrize("op", ["SkipLayerNormalization", "LayerNormalization"])
def test_a_reader_of_the_norm_statistics_pins_them(op: str, tmp_path, monkeypatch) -> None:
    """A norm's mean / inverse-std outputs (SkipLayerNormalization's, and ONNX's own
    LayerNormalization's optional ones) are statistics over the channels: a graph that reads
    them keeps the normalised channels whole even with allow_lossy."""
    norm = (helper.make_node("SkipLayerNormalization", ["h", "h0", "gamma", "beta"],
                             ["n", "mean"], name="skip_ln", domain=MS)
            if op == "SkipLayerNormalization" else
            helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n", "mean"],
                             name="ln", axis=-1))
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("MatMul", ["h0", "w1"], ["h"], name="fc1"),
        norm,
        helper.make_node("ReduceMean", ["mean"], ["m"], name="rm", keepdims=1, axes=[-1]),
        helper.make_node("Add", ["n", "m"], ["z"], name="add"),
        helper.make_node("MatMul", ["z", "w2"], ["y"], name="fc2"),
    ]
    inits = [init("w0", rand(8, D)), init("w1", rand(D, D, seed=1)),
             init("gamma", rand(D, seed=2) + 1.5), init("beta", rand(D, seed=3)),
             init("w2", rand(D, 8, seed=4))]
    model = make_model(nodes, {"x": [2, 5, 8]}, {"y": [2, 5, 8]}, inits,
                       extra_opsets=[(MS, 1)])
    lossy = prune_onnx(_without_stats(model), ratio=0.5, round_to=1, allow_lossy=True)
    assert "gamma" in lossy.plan.removed  # the same graph without the statistics reader
    monkeypatch.chdir(tmp_path)
    result = prune_onnx(model, ratio=0.5, round_to=1, allow_lossy=True)
    # onnxruntime's symbolic shape inference stops at the statistics output and dumps the
    # model into the working directory before it raises: nothing may be left there
    assert not list(tmp_path.iterdir())
    assert "gamma" not in result.plan.removed and "w2" not in result.plan.removed
    assert any("mean / inverse std" in row.pinned for row in result.report.groups)


def _without_stats(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in out.graph.node if n.op_type != "ReduceMean"]
    for n in nodes:
        if n.op_type in ("SkipLayerNormalization", "LayerNormalization"):
            del n.output[1:]
        if n.op_type == "Add":
            n.op_type, n.input[1] = "Identity", ""
            del n.input[1:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _hf_optimized(family: str, exporter: str, model_type: str, tmp_path,
                  opset: int = 17) -> tuple:
    pytest.importorskip("transformers")
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    import torch
    import transformers

    from secateurs.hf.models import example_inputs, tiny_model

    transformers.logging.set_verbosity_error()

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.m(*args, return_dict=False)[0]

    model = tiny_model(family)
    inputs = tuple(a for a in example_inputs(model) if a is not None)
    names = [f"input_{i}" for i in range(len(inputs))]
    path = str(tmp_path / f"{family}.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model), inputs, path, dynamo=exporter == "dynamo",
                          input_names=names, output_names=["out"],
                          **({} if exporter == "dynamo" else {"opset_version": opset}))
        optimized = optimizer.optimize_model(path, model_type=model_type, num_heads=0,
                                             hidden_size=0).model
    feeds = {n: a.numpy() for n, a in zip(names, inputs)}
    return optimized, feeds


@pytest.mark.parametrize("family,exporter,model_type,fused,opset", [
    pytest.param("bert", "torchscript", "bert", {"SkipLayerNormalization", "Gelu"}, 17,
                 id="bert"),
    # below opset 17 the optimizer still writes LayerNormalization (ORT runs it; ONNX's
    # checker does not know it there)
    pytest.param("bert", "torchscript", "bert", {"LayerNormalization", "Gelu"}, 14,
                 id="bert-opset14"),
    pytest.param("llama", "dynamo", "gpt2",
                 {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}, None,
                 id="llama", marks=pytest.mark.slow),
    pytest.param("clip_vision", "dynamo", "clip", {"SkipLayerNormalization", "QuickGelu"},
                 None, id="clip", marks=pytest.mark.slow),
])
def test_transformer_optimizer_output_prunes_exactly(family, exporter, model_type, fused,
                                                     opset, tmp_path) -> None:
    model, feeds = _hf_optimized(family, exporter, model_type, tmp_path, opset)
    assert fused <= {n.op_type for n in model.graph.node}
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True, input_shapes=shapes)
    assert result.report.exact is True, result.report.max_abs_diff
    assert not result.report.repairs, [r.reason for r in result.report.repairs]
    assert result.report.macs_kept < 0.6  # heads and MLP width
    check_full(result.model)
    ok, diff = verify_onnx(model, result.model, result.plan, feeds)
    assert ok, diff
    kept = collections.Counter(n.op_type for n in result.model.graph.node)
    assert all(kept[op] for op in fused)  # the fused ops stay fused
    assert np.isfinite(diff)


def _attention_model(extra_bias: bool = False, **attrs: int) -> onnx.ModelProto:
    """x -> MatMul -> com.microsoft::Attention (packed qkv, 4 heads of 8) -> MatMul -> Relu
    -> MatMul; with ``extra_bias`` an attention bias input ``[1, heads, S, S]``."""
    hidden, heads = 32, 4
    inputs = ["h0", "qkv_w", "qkv_b"] + (["", "", "attn_bias"] if extra_bias else [])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="embed"),
        helper.make_node("Attention", inputs, ["a"], name="fused_attn", domain=MS,
                         num_heads=heads, **attrs),
        helper.make_node("MatMul", ["a", "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    inits = [init("w0", rand(8, hidden)), init("qkv_w", rand(hidden, 3 * hidden, seed=1)),
             init("qkv_b", rand(3 * hidden, seed=2)), init("w1", rand(hidden, H, seed=3)),
             init("w2", rand(H, 8, seed=4))]
    if extra_bias:
        inits.append(init("attn_bias", rand(1, heads, 5, 5, seed=5)))
    return make_model(nodes, {"x": [2, 5, 8]}, {"y": [2, 5, 8]}, inits,
                      extra_opsets=[(MS, 1)])


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_fused_attention_prunes_heads_and_head_dims(ratio) -> None:
    """``com.microsoft::Attention`` (the optimizer's fused attention, as older HF exports
    through optimum carry it): heads go with their q, k and v columns and ``num_heads`` is
    rewritten; a smaller head size keeps the original scale explicit."""
    model = _attention_model()
    result = prune_onnx(model, ratio=ratio, round_to=1, verify=True)
    assert result.report.exact is True, result.report.max_abs_diff
    assert not result.report.repairs, [r.reason for r in result.report.repairs]
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    node = next(n for n in result.model.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    heads = attrs["num_heads"]
    width = shapes["qkv_w"][1] // 3
    head_dim = width // heads
    assert heads < 4 and width == heads * head_dim and shapes["qkv_b"] == (3 * width,)
    assert shapes["qkv_w"][0] == shapes["w0"][1]  # the input width prunes with the embedding
    assert shapes["w1"][0] == width
    if head_dim != 8:
        assert ratio == 0.8 and attrs["scale"] == pytest.approx(1 / np.sqrt(8))
    else:
        assert "scale" not in attrs
    check_full(result.model)
    for seed in (1, 2):  # other inputs than prune_onnx's own check
        feeds = {"x": rand(2, 5, 8, seed=seed)}
        ok, diff = verify_onnx(model, result.model, result.plan, feeds)
        assert ok, (seed, diff)


def test_fused_attention_with_an_attention_bias_keeps_its_heads() -> None:
    """An attention bias ``[1, heads, S, S]`` carries the heads of its own: they stay (named),
    the head size and the MLP after the attention still prune."""
    model = _attention_model(extra_bias=True)
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    node = next(n for n in result.model.graph.node if n.op_type == "Attention")
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["num_heads"] == 4
    assert any("per-head state" in row.pinned for row in result.report.groups)
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["w2"][0] == H // 2


def test_fused_attention_with_rotary_keeps_its_head_dims() -> None:
    """``do_rotary=1`` rotates q and k inside the op (dims i and i + d/2 pair up): the head
    dims are pinned with that reason, the heads stay free. (ORT's CPU kernel does not run
    rotary Attention, so this checks the analysis only.)"""
    from secateurs.passes.prune_onnx import analyze_onnx

    analysis = analyze_onnx(_attention_model(do_rotary=1))
    qkv = [g for g in analysis.groups if any(m.param == "qkv_w" and m.dim == 1
                                             for m in g.members) and g.size in (4, 8)]
    dims = next(g for g in qkv if g.size == 8)
    heads = next(g for g in qkv if g.size == 4)
    assert dims.pinned.all() and any("do_rotary" in r for r in dims.pin_reasons)
    assert not heads.pinned.any()
    plain = analyze_onnx(_attention_model())
    assert not any(g.pinned.any() for g in plain.groups
                   if g.size == 8 and any(m.param == "qkv_w" for m in g.members))


def _mha_model(bias: bool = True, attention_bias: bool = False) -> onnx.ModelProto:
    """x -> q/k/v MatMuls -> com.microsoft::MultiHeadAttention (4 heads of 8, packed bias)
    -> MatMul -> y."""
    d, heads = 32, 4
    inputs = ["q", "k", "v", "qkv_b" if bias else ""]
    if attention_bias:
        inputs += ["", "attn_bias"]
    nodes = [helper.make_node("MatMul", ["x", f"w{c}"], [c], name=f"proj_{c}") for c in "qkv"]
    nodes += [helper.make_node("MultiHeadAttention", inputs, ["a"], name="mha", domain=MS,
                               num_heads=heads),
              helper.make_node("MatMul", ["a", "wo"], ["y"], name="out")]
    inits = [init(f"w{c}", rand(8, d, seed=i)) for i, c in enumerate("qkv")]
    inits.append(init("wo", rand(d, 8, seed=4)))
    if bias:
        inits.append(init("qkv_b", rand(3 * d, seed=5)))
    if attention_bias:
        inits.append(init("attn_bias", rand(1, heads, 5, 5, seed=6)))
    return make_model(nodes, {"x": [2, 5, 8]}, {"y": [2, 5, 8]}, inits,
                      extra_opsets=[(MS, 1)])


@pytest.mark.parametrize("ratio,bias", [(0.5, True), (0.8, True), (0.5, False), (0.8, False)])
def test_multi_head_attention_prunes_heads(ratio, bias) -> None:
    """``com.microsoft::MultiHeadAttention`` over separate q/k/v: heads go with their q, k, v
    columns (and packed bias), ``num_heads`` is rewritten, a smaller head size keeps the
    original scale explicit."""
    model = _mha_model(bias)
    result = prune_onnx(model, ratio=ratio, round_to=1, verify=True)
    assert result.report.exact is True, result.report.max_abs_diff
    assert not result.report.repairs, [r.reason for r in result.report.repairs]
    node = next(n for n in result.model.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    heads = attrs["num_heads"]
    width = shapes["wq"][1]
    assert heads < 4 and width % heads == 0 and shapes["wo"][0] == shapes["wv"][1]
    if bias:
        assert shapes["qkv_b"] == (3 * width,)
    if width // heads != 8:
        assert attrs["scale"] == pytest.approx(1 / np.sqrt(8))
    check_full(result.model)
    ok, diff = verify_onnx(model, result.model, result.plan, {"x": rand(2, 5, 8, seed=9)})
    assert ok, diff


def test_multi_head_attention_with_an_attention_bias_keeps_its_heads() -> None:
    result = prune_onnx(_mha_model(attention_bias=True), ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    node = next(n for n in result.model.graph.node if n.op_type == "MultiHeadAttention")
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["num_heads"] == 4
    assert any("per-head state" in row.pinned for row in result.report.groups)


def test_fused_attention_macs_count_the_projection_and_the_attention() -> None:
    """MACs of the fused ops are what the unfused graph counts: the packed q/k/v projection
    (Attention) and q.k^T + p.v over the tokens; halving the heads halves the attention's."""
    from secateurs.graph.from_onnx import from_onnx
    from secateurs.passes.cost import count_macs

    def macs(model: onnx.ModelProto) -> int:
        graph = from_onnx(model)
        return count_macs(graph, lambda v: graph.values[v].shape)

    b, s, d = 2, 5, 32
    embed, mlp = b * s * 8 * d, b * s * d * H + b * s * H * 8
    attention = b * s * d * 3 * d + b * s * s * (d + d)
    assert macs(_attention_model()) == embed + attention + mlp
    proj = 3 * b * s * 8 * d + b * s * d * 8
    assert macs(_mha_model()) == proj + b * s * s * (d + d)
    pruned = prune_onnx(_mha_model(), ratio=0.5, round_to=1).model
    assert macs(pruned) == (proj + b * s * s * (d + d)) // 2
