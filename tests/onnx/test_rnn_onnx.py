"""ONNX ``LSTM`` / ``GRU`` / ``RNN`` lower onto the ``rnn`` rule of the torch frontend: the conv
channels that feed a recurrent node's input features prune, ``W`` loses the matching columns of
its dim 2 (``[directions, gates·hidden, input]``), and ``R``, ``B``, ``sequence_lens``, the
initial states and the outputs stay, pinned as recurrent hidden state. A ``W`` computed at run
time is not followed: ``X``'s features are pinned. Every pruned model is checked against the
original with the removed slices zeroed, under ONNX Runtime (the correctness contract)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _onnx_testlib import export_zoo, init, make_model, rand
from onnx import helper
from torch import nn

from secateurs.graph.onnx_apply import zero_plan_slices_onnx
from secateurs.passes.prune_onnx import prune_onnx, verify_onnx

HIDDEN_REASON = "(recurrent: not pruned)"


def _export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=17,
                          input_names=["x"])
    return onnx.load_from_string(buf.getvalue())


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: [int(d) for d in t.dims] for t in model.graph.initializer}


def _recurrent_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]


def _producer_conv(model: onnx.ModelProto) -> str:
    """The weight of the last Conv before the first recurrent node (the one feeding it)."""
    first = next(i for i, n in enumerate(model.graph.node)
                 if n.op_type in ("LSTM", "GRU", "RNN"))
    conv = [n for n in model.graph.node[:first] if n.op_type == "Conv"][-1]
    return conv.input[1]


def _pin_reasons(result, param: str, dim: int) -> list[str]:
    return [r for g in result.analysis.groups for m in g.members
            if m.param == param and m.dim == dim for r in g.pin_reasons]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _batchwise(model: onnx.ModelProto) -> bool:
    """A recurrent node with ``layout=1``, which ONNX Runtime's CPU kernels refuse ("Batchwise
    recurrent operations (layout == 1) are not supported")."""
    return any(a.name == "layout" and a.i == 1 for n in _recurrent_nodes(model)
               for a in n.attribute)


def _reference_contract(model: onnx.ModelProto, result, feeds: dict[str, np.ndarray]) -> None:
    """The contract under ONNX's reference evaluator (for what ONNX Runtime cannot run)."""
    from onnx.reference import ReferenceEvaluator

    expected = ReferenceEvaluator(zero_plan_slices_onnx(model, result.plan)).run(None, feeds)
    got = ReferenceEvaluator(result.model).run(None, feeds)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def _check_pruned(model: onnx.ModelProto, x_shape: list[int], ratio: float = 0.5):
    """Prune, then the invariants every test shares: checker clean, the pruned model runs and
    matches the zeroed original (ONNX Runtime, ``verify=True``, and on other random inputs
    too; ``layout=1``, which ONNX Runtime does not run: the reference evaluator)."""
    ort_runs = not _batchwise(model)
    result = prune_onnx(model, ratio=ratio, round_to=1, verify=ort_runs,
                        input_shapes={"x": x_shape})
    assert result.report.exact is (True if ort_runs else None)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": rand(*x_shape, seed=7)}
    if not ort_runs:
        _reference_contract(model, result, feeds)
        return result
    outs = _run(result.model, feeds)
    assert all(np.isfinite(o).all() for o in outs)
    ok, diff = verify_onnx(model, result.model, result.plan, feeds)
    assert ok, f"pruned model differs from the zeroed original by {diff}"
    return result


def _assert_input_features_pruned(model: onnx.ModelProto, result) -> None:
    """The conv feeding the first recurrent node lost channels; that node's ``W`` lost
    columns of dim 2 and nothing else; ``R`` and ``B`` of every recurrent node are unchanged."""
    before, after = _shapes(model), _shapes(result.model)
    conv_w = _producer_conv(model)
    assert after[conv_w][0] < before[conv_w][0], f"conv {conv_w} kept all its channels"
    assert result.report.macs_kept < 1 and result.report.params_kept < 1
    first, *later = _recurrent_nodes(model)
    w = first.input[1]
    assert list(result.plan.removed[w]) == [2]
    assert after[w][:2] == before[w][:2] and after[w][2] < before[w][2]
    for node in [first, *later]:
        for name in node.input[2:4]:  # R, B
            if name in before:
                assert after[name] == before[name] and name not in result.plan.removed
    for node in later:  # fed by the hidden state of the node before: pinned
        assert node.input[1] not in result.plan.removed
    hidden = _pin_reasons(result, first.input[2], 2)
    assert hidden and all(HIDDEN_REASON in r and "hidden state of rnn" in r for r in hidden)
    pruned_node = next(n for n in _recurrent_nodes(result.model) if n.name == first.name)
    attrs = {a.name for a in pruned_node.attribute}
    assert "input_size" not in attrs  # the torch rewrite's constant is not an ONNX attribute


# ---------------------------------------------------------------- torch.onnx.export


class _ConvRNN(nn.Module):
    """Conv features (B, C, H, W) read column by column: (B, W, C·H) into a recurrent net."""

    def __init__(self, cell: type[nn.RNNBase], bidirectional: bool, batch_first: bool,
                 layers: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.pool = nn.MaxPool2d((2, 1))
        self.batch_first = batch_first
        self.rnn = cell(12 * 2, 10, num_layers=layers, batch_first=batch_first,
                        bidirectional=bidirectional)
        self.fc = nn.Linear(10 * (2 if bidirectional else 1), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        b, c, h, w = f.shape
        f = f.permute(0, 3, 1, 2).reshape(b, w, c * h)
        if not self.batch_first:
            f = f.transpose(0, 1)
        y, _ = self.rnn(f)
        return self.fc(y)


@pytest.mark.parametrize("cell,bidirectional,batch_first,layers", [
    (nn.LSTM, True, True, 1),
    (nn.LSTM, False, False, 2),
    (nn.LSTM, True, False, 2),
    (nn.GRU, True, True, 1),
    (nn.GRU, False, False, 2),
    (nn.RNN, False, True, 1),
    (nn.RNN, True, False, 2),
])
def test_exported_recurrent_input_features_prune(cell, bidirectional, batch_first,
                                                 layers) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4, 7)
    model = _export(_ConvRNN(cell, bidirectional, batch_first, layers), x)
    assert len(_recurrent_nodes(model)) == layers
    result = _check_pruned(model, [1, 1, 4, 7])
    _assert_input_features_pruned(model, result)


def test_zoo_crnn_lstm_prunes_the_conv_channels_into_the_lstm(export_dir) -> None:
    model = onnx.load(str(export_zoo("crnn_lstm", export_dir)))
    x = model.graph.input[0]
    shape = [int(d.dim_value) for d in x.type.tensor_type.shape.dim]
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    onnx.checker.check_model(result.model, full_check=True)
    ok, diff = verify_onnx(model, result.model, result.plan, {x.name: rand(*shape, seed=3)})
    assert ok, diff
    _assert_input_features_pruned(model, result)


def test_zoo_crnn_lstm_onnx_groups_match_torch(export_dir) -> None:
    """One rule for both frontends: the same exactly prunable groups as the torch analysis."""
    from secateurs import zoo
    from secateurs.passes.prune import analyze
    from secateurs.passes.prune_onnx import analyze_onnx

    def exact_sizes(analysis) -> list[int]:
        return sorted(g.size for g in analysis.groups
                      if g.size > 1 and not g.pinned.any() and not g.is_lossy)

    entry = zoo.get("crnn_lstm")
    torch_groups = exact_sizes(analyze(entry.build(), entry.example_inputs()))
    assert torch_groups == exact_sizes(analyze_onnx(export_zoo("crnn_lstm", export_dir)))
    assert torch_groups  # the conv channels into the LSTM among them


# ---------------------------------------------------------------- hand-built graphs

H, C, SEQ = 6, 8, 5  # hidden size, conv channels, sequence length (the conv's width)
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _conv_rnn_graph(op: str = "LSTM", layout: int = 0, direction: str = "forward",
                    seq_lens: bool = False, bias: bool = True, initial_h: str = "",
                    w_computed: bool = False, y_out: bool = True,
                    peepholes: bool = False) -> onnx.ModelProto:
    """x [1, 3, 2, SEQ] → Conv (4 channels) → Conv (C channels) → Transpose/Reshape to [SEQ, 1, 2C] (layout 0) or
    [1, SEQ, 2C] (layout 1) → ``op`` → its last hidden state (and ``Y``) → MatMul. ``initial_h``:
    "" (none), "const" (an initializer) or "computed" (a MatMul of the pooled conv features,
    so its hidden dim is a parameter dim the rule must pin). ``w_computed``: ``W`` is a Mul of
    an initializer by a graph-computed scale instead of an initializer. ``peepholes``: an LSTM
    with ``P`` (and an empty ``initial_c``)."""
    dirs = 2 if direction == "bidirectional" else 1
    g, feat = GATES[op], 2 * C
    nodes = [
        helper.make_node("Conv", ["x", "k0", "k0b"], ["c0"], name="conv0", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "k", "kb"], ["c"], name="conv", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Transpose", ["r"], ["t"], name="tr",
                         perm=[3, 0, 1, 2] if layout == 0 else [0, 3, 1, 2]),
        helper.make_node("Reshape", ["t", "seq_shape"], ["seq"], name="flat"),
    ]
    inits = [init("k0", rand(4, 3, 1, 1)), init("k0b", rand(4)), init("k", rand(C, 4, 1, 1)), init("kb", rand(C)), init("R", rand(dirs, g * H, H)),
             init("seq_shape", np.array([SEQ, 1, feat] if layout == 0 else [1, SEQ, feat]))]
    w = "W"
    if w_computed:
        nodes += [helper.make_node("ReduceMean", ["x"], ["xm"], name="xm", keepdims=0),
                  helper.make_node("Mul", ["W0", "xm"], ["W"], name="w_scale")]
        inits.append(init("W0", rand(dirs, g * H, feat)))
    else:
        inits.append(init("W", rand(dirs, g * H, feat)))
    if bias:
        inits.append(init("B", rand(dirs, 2 * g * H)))
    if seq_lens:
        inits.append(init("seq_lens", np.array([SEQ - 1], dtype=np.int32)))
    if initial_h == "const":
        inits.append(init("h0", rand(*([dirs, 1, H] if layout == 0 else [1, dirs, H]))))
    elif initial_h == "computed":
        nodes += [helper.make_node("ReduceMean", ["r"], ["pooled"], name="gap", axes=[2, 3],
                                   keepdims=0),
                  helper.make_node("MatMul", ["pooled", "Wh"], ["hh"], name="h_proj"),
                  helper.make_node("Reshape", ["hh", "h_shape"], ["h0"], name="h_shape")]
        inits += [init("Wh", rand(C, dirs * H)),
                  init("h_shape", np.array([dirs, 1, H] if layout == 0 else [1, dirs, H]))]
    ins = ["seq", w, "R", "B" if bias else "", "seq_lens" if seq_lens else "",
           "h0" if initial_h else ""]
    if peepholes:
        ins += ["", "P"]
        inits.append(init("P", rand(dirs, 3 * H)))
    outs = ["Y" if y_out else "", "Y_h"]
    attrs: dict = {"hidden_size": H, "direction": direction, "layout": layout}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    nodes.append(helper.make_node(op, ins, outs, name="rnn", **attrs))
    # Y_h: [dirs, 1, H] (layout 0) / [1, dirs, H] (layout 1) → [1, dirs·H] → MatMul
    nodes += [helper.make_node("Reshape", ["Y_h", "h_flat"], ["hf"], name="h_flat"),
              helper.make_node("MatMul", ["hf", "fc"], ["out"], name="fc")]
    inits += [init("h_flat", np.array([1, dirs * H])), init("fc", rand(dirs * H, 3))]
    outputs = {"out": [1, 3]}
    if y_out:
        outputs["Y"] = [SEQ, dirs, 1, H] if layout == 0 else [1, SEQ, dirs, H]
    model = make_model(nodes, {"x": [1, 3, 2, SEQ]}, outputs, inits)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op,layout,direction,seq_lens,bias,initial_h,y_out", [
    ("LSTM", 0, "forward", False, True, "", True),
    ("LSTM", 1, "bidirectional", True, True, "const", True),
    ("LSTM", 0, "reverse", True, False, "computed", False),
    ("LSTM", 1, "forward", False, False, "computed", True),
    ("GRU", 1, "bidirectional", True, True, "", True),
    ("GRU", 0, "reverse", False, True, "computed", True),
    ("RNN", 1, "reverse", True, False, "const", False),
    ("RNN", 0, "bidirectional", False, True, "computed", True),
])
def test_hand_built_recurrent_node_prunes_its_input_features(op, layout, direction, seq_lens,
                                                             bias, initial_h, y_out) -> None:
    model = _conv_rnn_graph(op, layout, direction, seq_lens, bias, initial_h, y_out=y_out)
    result = _check_pruned(model, [1, 3, 2, SEQ])
    _assert_input_features_pruned(model, result)
    assert result.plan.removed["k"][0] == result.plan.removed["kb"][0]
    # each removed conv channel takes its two features (c·2 + h) out of W's dim 2
    gone = sorted(result.plan.removed["k"][0])
    assert sorted(result.plan.removed["W"][2]) == [2 * c + h for c in gone for h in (0, 1)]
    if initial_h == "computed":  # h0's hidden dim is recurrent state: Wh keeps its columns
        assert 1 not in result.plan.removed.get("Wh", {})
        assert any(HIDDEN_REASON in r for r in _pin_reasons(result, "Wh", 1))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_w_computed_at_run_time_pins_the_input_features(op) -> None:
    model = _conv_rnn_graph(op, layout=0, direction="bidirectional", seq_lens=True,
                            w_computed=True)
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True,
                        input_shapes={"x": [1, 3, 2, SEQ]})
    assert result.report.exact is True
    onnx.checker.check_model(result.model, full_check=True)
    ok, diff = verify_onnx(model, result.model, result.plan, {"x": rand(1, 3, 2, SEQ, seed=5)})
    assert ok, diff
    # conv0 → conv prunes (upstream of the pinned features); conv's outputs, which feed the
    # recurrent node's features, and W0 stay
    assert "W0" not in result.plan.removed and 0 not in result.plan.removed["k"]
    assert result.plan.removed["k0"] == {0: result.plan.removed["k"][1]}
    for dim in (0, 1, 2):
        reasons = _pin_reasons(result, "W0", dim)
        assert reasons
    reasons = _pin_reasons(result, "k", 0)
    assert any("computed at run time" in r and "'rnn'" in r for r in reasons), reasons


def test_lstm_peepholes_stay() -> None:
    model = _conv_rnn_graph("LSTM", direction="bidirectional", initial_h="computed",
                            peepholes=True)
    result = _check_pruned(model, [1, 3, 2, SEQ])
    _assert_input_features_pruned(model, result)
    assert "P" not in result.plan.removed
    assert all(HIDDEN_REASON in r for r in _pin_reasons(result, "P", 1))


def test_second_run_prunes_nothing_more_than_asked() -> None:
    """Pruning the pruned model again at ratio 0 changes nothing (the lowering reads its own
    output: ``W`` with fewer columns, no stray attribute)."""
    model = _conv_rnn_graph("LSTM", layout=0, direction="bidirectional", seq_lens=True)
    pruned = _check_pruned(model, [1, 3, 2, SEQ]).model
    again = prune_onnx(pruned, ratio=0.0, round_to=1, verify=True,
                       input_shapes={"x": [1, 3, 2, SEQ]})
    assert not again.plan.removed and again.report.exact is True
    assert _shapes(again.model) == _shapes(pruned)


def test_onnx_recurrent_node_lowers_to_the_torch_rule() -> None:
    from secateurs.graph.from_onnx import from_onnx

    graph = from_onnx(_conv_rnn_graph("GRU", layout=1, seq_lens=True, initial_h="const"))
    node = next(n for n in graph.nodes if n.name == "rnn")
    assert node.op == "rnn"
    assert node.attrs["input_dim"] == 2 and node.attrs["weights"] == 1
    assert node.attrs["layout"] == 1 and "unfollowed" not in node.attrs
    assert node.inputs == ["seq", "W", "R", "B", "seq_lens", "h0"]
