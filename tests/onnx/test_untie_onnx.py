"""Per-channel vectors the torch exporters deduplicated (every zero bias and every LayerNorm
weight of ones of one width stored once: the TorchScript exporter through ``Identity`` nodes,
the dynamo exporter by sharing the initializer) are read as the separate parameters they were
(``graph/onnx_untie.py``): unrelated layers prune independently and a layer no longer inherits a
pin from a graph output it merely shares a zero bias with. Copies the pruning left equal to
their source are shared again in the output."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _onnx_testlib import init, rand
from onnx import TensorProto, helper

from secateurs.graph.onnx_untie import retie, untie_shared_vectors
from secateurs.passes.prune_onnx import analyze_onnx, prune_onnx, verify_onnx


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _shared_graph() -> onnx.ModelProto:
    """x[1,8] -> MatMul W1 + b -> Relu -> MatMul W2 + c -> y; b is read directly by the first
    Add and, through an Identity named like the exporter's, by the second (both zeros of 8);
    W is a shared matrix (a real tie) read by two MatMuls."""
    zeros = np.zeros(8, np.float32)
    w1, w2 = rand(8, 8, seed=1), rand(8, 8, seed=2)
    nodes = [
        helper.make_node("Identity", ["b"], ["layer2.bias"]),
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "layer2.bias"], ["h4"]),
        helper.make_node("MatMul", ["h4", "T"], ["h5"]),
        helper.make_node("MatMul", ["h5", "T"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [init("b", zeros), init("W1", w1), init("W2", w2), init("T", rand(8, 8, seed=3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_untie_gives_each_reader_its_own_vector_and_keeps_matrices_shared() -> None:
    model = _shared_graph()
    before = model.SerializeToString()
    untied, copies = untie_shared_vectors(model)
    assert model.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(untied, full_check=True)
    # the Identity became the parameter it named; the shared matrix is still read twice
    assert copies == {"layer2.bias": "b"}
    assert not [n for n in untied.graph.node if n.op_type == "Identity"]
    readers = [i for n in untied.graph.node for i in n.input]
    assert readers.count("T") == 2 and readers.count("b") == 1
    x = rand(1, 8, seed=4)
    np.testing.assert_array_equal(_run(model, x)[0], _run(untied, x)[0])


def test_untie_returns_the_model_itself_when_nothing_is_shared() -> None:
    model = _shared_graph()
    model.graph.node[0].input[0] = "W1"  # an Identity of a matrix: not a vector, left alone
    del model.graph.initializer[0]  # b gone: the first Add reads a fresh vector instead
    model.graph.initializer.append(init("b", np.ones(8, np.float32)))
    model.graph.node[2].input[1] = "b"
    untied, copies = untie_shared_vectors(model)
    assert untied is model and copies == {}


def test_direct_sharing_is_untied_under_numbered_names() -> None:
    model = _shared_graph()
    model.graph.node[5].input[1] = "b"  # the dynamo exporter's form: both Adds read b
    model.graph.node.remove(model.graph.node[0])
    untied, copies = untie_shared_vectors(model)
    assert copies == {"b.1": "b"}
    x = rand(1, 8, seed=5)
    np.testing.assert_array_equal(_run(model, x)[0], _run(untied, x)[0])


def test_retie_shares_copies_that_stayed_equal_and_keeps_those_that_differ() -> None:
    untied, copies = untie_shared_vectors(_shared_graph())
    same = onnx.ModelProto()
    same.CopyFrom(untied)
    retie(same, copies)
    assert {t.name for t in same.graph.initializer} == {"b", "W1", "W2", "T"}
    assert [n.input[1] for n in same.graph.node if n.op_type == "Add"] == ["b", "b"]
    differ = onnx.ModelProto()
    differ.CopyFrom(untied)
    for t in differ.graph.initializer:
        if t.name == "layer2.bias":
            t.CopyFrom(init("layer2.bias", np.ones(8, np.float32)))
    retie(differ, copies)
    assert "layer2.bias" in {t.name for t in differ.graph.initializer}


class _Stage(torch.nn.Module):
    """A block whose MLP hidden width (64) equals the next stage's width, as in Swin: fresh
    zero biases of 64 are one tensor in the export, shared by the MLP's fc1 and the final
    LayerNorm that feeds the graph output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.down = torch.nn.Linear(32, 64)
        self.norm = torch.nn.LayerNorm(64)
        for lin in (self.fc1, self.fc2, self.down):
            torch.nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.norm(self.down(x))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_deduplicated_zero_bias_no_longer_pins_the_mlp(dynamo: bool, tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "stage.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Stage().eval(), (torch.randn(2, 5, 32),), str(path), dynamo=dynamo,
                          input_names=["x"], **({} if dynamo else {"opset_version": 17}))
    source = onnx.load(str(path))
    shared = untie_shared_vectors(source)[1]
    assert shared, "the exporter no longer deduplicates: this test lost its subject"
    # the MLP hidden group is free: it is no longer one with the output's LayerNorm
    analysis = analyze_onnx(source)
    hidden = [g for g in analysis.groups if any(m.param.endswith("fc1.bias") for m in g.members)]
    assert len(hidden) == 1 and hidden[0].prunable == 64
    result = prune_onnx(str(path), ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    assert any("deduplicated" in n for n in result.report.notes)
    fc1 = [n for n in result.plan.removed if n.endswith("fc1.bias")]
    assert fc1 and len(result.plan.removed[fc1[0]][0]) == 32
    onnx.checker.check_model(result.model, full_check=True)
    ok, diff = verify_onnx(untie_shared_vectors(source)[0], result.model, result.plan,
                           {"x": rand(2, 5, 32, seed=7)})
    assert ok, diff
    # no copy the pruning left equal to its source is kept: those are shared again
    from onnx import numpy_helper
    out = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for copy, src in shared.items():
        if copy in out and src in out and out[copy].shape == out[src].shape:
            assert not np.array_equal(out[copy], out[src]), f"{copy} still equals {src}"


def test_nothing_pruned_means_no_copies_in_the_output(tmp_path) -> None:
    model = _shared_graph()
    result = prune_onnx(model, ratio=0.0, round_to=1, verify=True)
    assert result.report.exact is True
    assert len(result.model.graph.initializer) <= len(model.graph.initializer)
    assert result.report.params_before == sum(int(np.prod(t.dims))
                                              for t in model.graph.initializer)
