"""Issue 11, non-attention classes 3-7, 10, 11 and the §3 complexity property: each class has a
zoo look-alike (``secateurs/zoo/conv_wild.py``) that prunes exactly, prunes what it should, and
names its reason where something stays pinned or lossy."""

from __future__ import annotations

import io

import onnx
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import secateurs
from secateurs import zoo
from secateurs.graph import fx_lower
from secateurs.graph.fx_shapes import propagate_shapes


def _prune(name: str, ratio: float, **kw):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=ratio, **kw)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, f"{name} at {ratio}: max |diff| {diff}"
    with torch.no_grad():
        assert torch.isfinite(result.model(*x)).all()
    return model, result


def _width(model: nn.Module, path: str, attr: str) -> int:
    return int(getattr(model.get_submodule(path), attr))


def _reasons(analysis, param: str, kind: str = "pin") -> list[str]:
    out = []
    for g in analysis.groups:
        if any(m.param == param for m in g.members):
            out += list(g.pin_reasons if kind == "pin" else g.lossy_reasons)
    return out


# ------------------------------------------------------------------ class 4: size expressions


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_window_attention_prunes_heads_and_mlp_exactly(ratio):
    model, result = _prune("swin_window", ratio)
    pruned = result.model
    # MLP hidden units and attention heads / head dims are removed, the crop still runs
    assert _width(pruned, "layers.0.fc1", "out_features") < _width(model, "layers.0.fc1",
                                                                     "out_features")
    assert _width(pruned, "layers.1.attn.qkv", "out_features") < _width(
        model, "layers.1.attn.qkv", "out_features")
    with torch.no_grad():  # the pruned model runs at another batch size too
        assert pruned(torch.randn(2, 3, 40, 40)).shape == (2, 10)


class _CropChain(nn.Module):
    """A residual chain whose every block crops by a size read off the residual stream: every
    size expression reaches back through all earlier blocks."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            h = x.shape[2]
            y = conv(x)
            x = x + y[:, :, : h - 0, : x.shape[3] // 1]
        return x


def test_size_expressions_are_evaluated_once_per_node(monkeypatch):
    """``_static_int`` walks only the size expression and memoises: lowering calls ``call_key``
    a bounded number of times per node (exponential in the depth before)."""
    gm = torch.fx.symbolic_trace(_CropChain(14))
    propagate_shapes(gm, (torch.randn(1, 4, 8, 8),))
    calls = 0
    real = fx_lower.call_key

    def counting(node):
        nonlocal calls
        calls += 1
        return real(node)

    monkeypatch.setattr(fx_lower, "call_key", counting)
    graph = fx_lower.lower_graph_module(gm)
    n = len(gm.graph.nodes)
    assert calls <= 4 * n, f"{calls} call_key calls for {n} nodes"
    assert any(node.op == "index" for node in graph.nodes)


# ------------------------------------------------------------------ class 3: torch.permute(x, dims)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_function_form_permute_prunes_convnext_mlp(ratio):
    model, result = _prune("convnext_tv", ratio)
    assert _width(result.model, "features.1.block.3", "out_features") < 32
    assert _width(result.model, "features.3.block.3", "out_features") < 64
    # the residual stream is normalised by LayerNorm: lossy, and says so
    reasons = _reasons(secateurs.analyze(model, zoo.get("convnext_tv").example_inputs()),
                       "features.1.layer_scale", kind="lossy")
    assert any("normalises over this dim" in r for r in reasons)


class _Transposes(nn.Module):
    """``torch.permute`` with a dims tuple, ``x.permute(dims=...)``, ``.T`` and ``.mT``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(5, 8))
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 6]
        h = torch.relu(self.a(x))                        # [B, T, 8]
        h = torch.permute(h, (0, 2, 1)).mT               # [B, T, 8]
        h = h.permute(dims=(2, 1, 0)).permute(2, 1, 0)   # [B, T, 8]
        return self.b(h) + (h @ self.w.T).sum(-1, keepdim=True)


def test_transpose_spellings_lower_to_permute():
    model, x = _Transposes().eval(), (torch.randn(2, 3, 6),)
    graph = secateurs.analyze(model, x).graph
    assert not [n for n in graph.nodes if n.op == "opaque"]
    result = secateurs.prune(model, x, ratio=0.5)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, diff
    assert result.model.get_submodule("a").out_features == 4  # a's 8 channels are one group
    assert tuple(result.model.get_parameter("w").shape) == (5, 4)


# ------------------------------------------------------------------ class 11: stochastic_depth


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_stochastic_depth_is_elementwise(ratio):
    model, result = _prune("efficientnet_tv", ratio)
    assert not any("stochastic_depth" in g.pinned for g in result.report.groups)
    if ratio == 0.5:  # the residual channels prune too (0.60 of the MACs kept when pinned)
        assert result.report.macs_kept < 0.4
    assert _width(result.model, "features.0.0", "out_channels") < 8
    pruned = result.model.train()  # training mode: per-sample drop, still runs
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------ class 5: weight standardisation


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_weight_standardisation_is_lossy_and_the_rest_exact(ratio):
    model, result = _prune("stdconv_net", ratio)
    # squeeze-excite (plain convs) prunes; standardised convs keep their input channels
    assert _width(result.model, "nf.0.se_fc1", "out_channels") < 8
    for path, width in (("stem", 16), ("nf.0.conv1", 8), ("trans", 32), ("bit.0.conv1", 16)):
        assert result.model.get_parameter(f"{path}.weight").shape[0] == width
    analysis = secateurs.analyze(model, zoo.get("stdconv_net").example_inputs())
    for param in ("nf.0.conv2.weight", "bit.0.conv2.weight", "stem.gain"):
        assert any("normalises with statistics over this dim" in r
                   for r in _reasons(analysis, param, kind="lossy")), param


def test_weight_standardisation_lossy_mark_is_needed():
    """What the mark protects against: pruning the standardised channels anyway is not
    mask-equivalent (the filter statistics change)."""
    entry = zoo.get("stdconv_net")
    model, x = entry.build(), entry.example_inputs()
    result = secateurs.prune(model, x, ratio=0.5, allow_lossy=True)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert not ok and diff > 1e-3


def test_batch_norm_statistics_follow_the_mode():
    """BatchNorm with running statistics is a per-channel affine map (exact); without running
    statistics (and InstanceNorm) it normalises over the batch and spatial dims."""
    def bn_lossy(bn: nn.Module) -> list[str]:
        # statistics over L = the 4 trailing features of a Linear: [B, 2, 4]
        model = nn.Sequential(nn.Linear(6, 8), nn.Unflatten(1, (2, 4)), bn, nn.Flatten(1),
                              nn.Linear(8, 3)).eval()
        analysis = secateurs.analyze(model, (torch.randn(5, 6),))
        return [r for g in analysis.groups for r in g.lossy_reasons]

    assert bn_lossy(nn.BatchNorm1d(2)) == []
    assert any("statistics" in r for r in bn_lossy(nn.BatchNorm1d(2, track_running_stats=False)))
    assert any("statistics" in r for r in bn_lossy(nn.InstanceNorm1d(2)))


# ------------------------------------------------------------------ class 6: xs[-1]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_negative_split_index_names_the_last_piece(ratio):
    model, result = _prune("split_net", ratio)
    assert result.model.get_parameter("res2.0.conv1.weight").shape[0] < 16
    assert result.model.get_parameter("edge.0.pw1.weight").shape[0] < 32
    analysis = secateurs.analyze(model, zoo.get("split_net").example_inputs())
    assert not [r for g in analysis.groups for r in g.pin_reasons if "unknown origin" in r]
    # conv3 reads the pass-through piece spx[-1] (its last 4 input channels) from conv1
    conv3_in = next(g for g in analysis.groups for m in g.members
                    if m.param == "res2.0.conv3.weight" and m.dim == 1 and 15 in m.positions)
    assert "res2.0.conv1.weight" in conv3_in.params()


# ------------------------------------------------------------------ class 7: size-1 broadcasts


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_one_channel_broadcast_stays(ratio):
    model, result = _prune("broadcast_net", ratio)
    assert not result.report.repairs  # the rule, not the safety net, keeps them
    f_rows = set(range(35)) - set(result.plan.removed["modulation.f.weight"][0])
    assert {32, 33, 34} <= f_rows  # FocalNet's three gates
    assert 0 not in result.plan.removed["attn.qkv.weight"][0]  # MobileViTv2's query
    assert len(f_rows) < 35 and result.model.get_parameter("attn.qkv.weight").shape[0] < 33
    analysis = secateurs.analyze(model, zoo.get("broadcast_net").example_inputs())
    reasons = _reasons(analysis, "modulation.f.weight") + _reasons(analysis, "attn.qkv.weight")
    assert any(r.startswith("size-1 dim broadcast against 16") for r in reasons)


# ------------------------------------------------------------------ class 10: binary min / max


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_t5_buckets_binary_min_and_heads(ratio):
    model, result = _prune("t5_buckets", ratio)
    # heads go, and with them the head columns of the bucket bias table
    bias = result.model.get_parameter("attn.0.relative_attention_bias.weight")
    assert bias.shape[0] == 8 and (bias.shape[1] < 4 or ratio < 0.5)
    assert result.model.get_parameter("wi.0.weight").shape[0] < 32


class _MinMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.min(x, torch.full_like(x, 0.5)) + torch.max(x, x * 2)
        return a + x.max(dim=1, keepdim=True)[0]


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_binary_min_max_are_elementwise(tracer):
    x = (torch.randn(2, 3),)
    gm = torch.fx.symbolic_trace(_MinMax()) if tracer == "fx" else \
        torch.export.export(_MinMax(), x).module()
    propagate_shapes(gm, x)
    ops = [n.op for n in fx_lower.lower_graph_module(gm).nodes
           if "GuardsFn" not in n.source]  # export's guard module, not part of the model
    assert ops.count("minimum") == 1 and ops.count("maximum") == 1
    assert ops.count("reduce") == 1 and "opaque" not in ops and "source" not in ops


# ------------------------------------------------------------------ class 11: ops with no rule


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_grn_addcmul_and_stack(ratio):
    model, result = _prune("convnextv2_grn", ratio)
    assert result.model.get_parameter("sk.b3.0.weight").shape[0] < 16  # stacked branches
    analysis = secateurs.analyze(model, zoo.get("convnextv2_grn").example_inputs())
    pins = [r for g in analysis.groups for r in g.pin_reasons]
    assert not [r for r in pins if "addcmul" in r or "stack" in r and "stacked" not in r]
    # GRN divides by the mean response over its channels: the MLP hidden dim is lossy, not
    # pinned, and says why
    lossy = _reasons(analysis, "blocks.0.grn.weight", kind="lossy")
    assert any("takes the mean over this dim" in r for r in lossy)
    assert not _reasons(analysis, "blocks.0.grn.weight")


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_fused_moe_experts_topk_gather_repeat_interleave(ratio):
    model, result = _prune("fused_moe", ratio)
    w1, w2 = result.model.get_parameter("w1"), result.model.get_parameter("w2")
    assert w1.shape[0] == 4 and w1.shape[2] < 16 and w2.shape[1] == w1.shape[2]
    assert result.model.get_parameter("q.weight").shape[0] < 16  # head dims (GQA)
    analysis = secateurs.analyze(model, zoo.get("fused_moe").example_inputs())
    pins = [r for g in analysis.groups for r in g.pin_reasons]
    assert not [r for r in pins if "no channel rule" in r]


def test_gather_topk_pin_only_the_chosen_dim():
    class Select(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 4]
            h = self.a(x)
            order = torch.sort(h, dim=1).indices                  # along T
            h = torch.gather(h, 1, order) + h.topk(2, dim=1).values.sum(1, keepdim=True)
            return self.b(h)

    model, x = Select().eval(), (torch.randn(2, 5, 4),)
    analysis = secateurs.analyze(model, x)
    chosen = [r for g in analysis.groups for r in g.pin_reasons]
    assert not [r for r in chosen if "no channel rule" in r]
    result = secateurs.prune(model, x, ratio=0.5)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, diff
    assert result.model.get_submodule("a").out_features == 4


def test_grouped_mm_pins_with_reason():
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.w = nn.Parameter(torch.randn(2, 16, 16) * 0.1)
            self.register_buffer("offs", torch.tensor([3, 8], dtype=torch.int32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [8 tokens, 8]
            return torch._grouped_mm(self.inp(x), self.w, self.offs)

    # the meta kernel takes bf16 only (the CPU one also fp32)
    model, x = Grouped().eval().to(torch.bfloat16), (torch.randn(8, 8, dtype=torch.bfloat16),)
    analysis = secateurs.analyze(model, x)
    reasons = _reasons(analysis, "w")
    assert any("expert dim" in r for r in reasons)
    assert any("16-byte aligned rows" in r for r in reasons)
    result = secateurs.prune(model, x, ratio=0.5)
    assert not result.plan.removed.get("w")


def test_new_tensor_template_is_not_pinned():
    class New(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c1(x)
            return self.c2(torch.relu(y) + torch.zeros_like(y)) + y.new_zeros(1)

    model, x = New().eval(), (torch.randn(1, 3, 8, 8),)
    result = secateurs.prune(model, x, ratio=0.5)
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, diff
    assert result.model.get_submodule("c1").out_channels == 4


# ------------------------------------------------------------------ roll and pad


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_swin_roll_and_pad_pass_the_channels(ratio):
    model, result = _prune("swin_window", ratio)
    analysis = result.analysis if hasattr(result, "analysis") else \
        secateurs.analyze(model, zoo.get("swin_window").example_inputs())
    ops = {n.op for n in analysis.graph.nodes}
    assert {"roll", "pad"} <= ops and "opaque" not in ops
    # the residual stream (patch conv's channels) is LayerNorm-lossy, no longer pinned by pad/roll
    (stream,) = [g for g in analysis.groups
                 if any(m.param == "patch.weight" and m.dim == 0 for m in g.members)]
    assert not stream.is_pinned and stream.is_lossy


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pad_net_prunes_through_every_padding(ratio):
    model, result = _prune("pad_net", ratio)
    assert not result.report.repairs
    pruned = result.model
    before, after = dict(model.named_parameters()), dict(pruned.named_parameters())
    for path in ("stem.0", "reflect.body.1", "same.0", "down.1"):  # same.0 is traced through
        key = f"{path}.weight"
        assert after[key].shape[0] < before[key].shape[0], path
    # option A: the zero-padded shortcut keeps its 2 x 8 added channels, the rest shrink with
    # the stem's stream
    stream = after["stem.0.weight"].shape[0]
    assert after["stage.1.conv2.weight"].shape[0] == stream + 16
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_padded_positions_and_padded_channel_dims_say_why():
    analysis = secateurs.analyze(zoo.get("pad_net").build(), zoo.get("pad_net").example_inputs())
    assert any("positions added by pad 'pad'" in r for r in _reasons(analysis,
                                                                      "stage.1.conv2.weight"))

    class ChannelPads(nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            self.how = how
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d({"runtime": 12, "crop": 6}.get(how, 10), 4, 1)

        def forward(self, x):
            y = self.a(x)
            if self.how == "reflect":
                y = nn.functional.pad(y.unsqueeze(0), (0, 0, 0, 0, 1, 1), mode="reflect")[0]
            elif self.how == "runtime":
                p = y.shape[1] % 3  # 2 at trace time
                y = nn.functional.pad(y, (0, 0, 0, 0, p, p))
            elif self.how == "crop":
                y = nn.functional.pad(y, (0, 0, 0, 0, -1, -1))
            else:
                y = torch.roll(y, 1, 1)
                y = nn.functional.pad(y, (0, 0, 0, 0, 1, 1))
            return self.b(y)

    want = {"reflect": "pads this dim in reflect mode: the new positions copy positions "
                       "counted from its edges",
            "runtime": "pads this dim by an amount computed at run time",
            "crop": "crops this dim (negative padding (-1, -1))",
            "roll": "rolls this dim: positions move by a shift taken modulo its size"}
    for how, text in want.items():
        model = ChannelPads(how).eval()
        analysis = secateurs.analyze(model, (torch.randn(1, 3, 4, 4),))
        reasons = _reasons(analysis, "a.weight")
        assert any(text in r for r in reasons), (how, reasons)
        result = secateurs.prune(model, (torch.randn(1, 3, 4, 4),), ratio=0.5)
        assert _width(result.model, "a", "out_channels") == 8, how  # a's channels stay


def test_roll_over_the_flattened_tensor_pins_every_dim():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.roll(self.a(x), 2))

    analysis = secateurs.analyze(Flat().eval(), (torch.randn(3, 4),))
    assert any("rolls the flattened tensor" in r for r in _reasons(analysis, "a.weight"))


class _ExportedOps(nn.Module):
    """``list(x.chunk(...))`` defeats FX, so this traces by ``torch.export``: ``aten.pad``,
    ``aten.roll``, ``aten.einsum``, ``aten.repeat_interleave``, and ``aten.constant_pad_nd``
    called directly."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(12, 8, 3)
        self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.cat(list(self.a(x).chunk(2, 1)), 1)
        y = torch.ops.aten.constant_pad_nd.default(y, [0, 0, 0, 0, 2, 2])
        y = self.b(nn.functional.pad(y, (1, 1, 1, 1), mode="reflect"))
        y = torch.roll(y, (1, 1), (2, 3)) + y.roll(1, 3)
        t = y.flatten(2).transpose(1, 2)
        q = self.c(t).view(t.shape[0], t.shape[1], 2, 4).transpose(1, 2)
        k = q[:, :1].repeat_interleave(2, dim=1)
        att = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
        o = torch.einsum("bhqk,bhkd->bhqd", att, q).transpose(1, 2).flatten(2)
        return self.d(o).mean(1)


def test_aten_pad_roll_einsum_repeat_interleave_lower_to_their_rules():
    model, x = _ExportedOps().eval(), (torch.randn(2, 3, 6, 6),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    ops = [n.op for n in result.analysis.graph.nodes]
    assert {"pad", "roll", "einsum", "repeat_interleave"} <= set(ops) and "opaque" not in ops
    assert ops.count("pad") == 2
    assert result.report.exact and not result.report.repairs
    pruned = dict(result.model.named_parameters())
    assert pruned["a.weight"].shape[0] < 8 and pruned["c.weight"].shape[1] < 8
    # k = q[:, :1].repeat_interleave(2, dim=1): the size-1 head is broadcast and stays, its
    # copies (q head 1) may go
    (head,) = [g for g in result.analysis.groups
               if any(m.param == "c.weight" and m.dim == 0 for m in g.members) and g.size == 2]
    assert head.prunable == 1 and any("size-1 dim broadcast against 2" in r
                                      for r in head.pin_reasons), head.pin_reasons


def test_a_size_1_slice_squeezed_by_reshape_stays():
    class Squeeze(nn.Module):  # the first of 3 groups, taken by a slice and squeezed away
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(2, 3)

        def forward(self, x):
            g = self.a(x).view(x.shape[0], 3, 2)
            return self.b(g[:, :1].reshape(x.shape[0], 2))

    model, x = Squeeze().eval(), (torch.randn(2, 4),)
    analysis = secateurs.analyze(model, x)
    assert any("size-1 dim squeezed by reshape" in r for r in _reasons(analysis, "a.weight"))
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact and not result.report.repairs


class _StepWrites(nn.Module):
    """RWKV's CPU recurrence writes each step into a buffer: ``out = zeros_like(k);
    out[:, t] = ...`` (torch.export: ``copy_`` into a ``select`` view of ``out``)."""

    def __init__(self) -> None:
        super().__init__()
        self.k, self.o = nn.Linear(8, 16), nn.Linear(16, 4)
        self.decay = nn.Parameter(torch.rand(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k(x)
        out = torch.zeros_like(k)
        state = torch.zeros_like(k[:, 0])
        for t in range(k.shape[1]):
            state = state * self.decay + k[:, t]
            out[:, t] = torch.tanh(state)
        return self.o(out)


def test_copy_into_a_view_couples_the_written_channels() -> None:
    """``copy_`` had no rule: opaque, it pinned the recurrence's channels. Its channels couple
    as an elementwise op's: the step width prunes, exactly."""
    model = _StepWrites().eval()
    x = torch.randn(2, 5, 8)
    result = secateurs.prune(model, (x,), ratio=0.5, verify=True)
    assert result.report.tracer.startswith("export")
    assert result.report.exact is True
    row = next(r for r in result.report.groups if "decay[0]" in r.members)
    assert row.units_after == 8 and not row.pinned


class _ProbeHead(nn.Module):
    """SigLIP's MAP head: a learned probe cross-attends over the tokens with
    ``nn.MultiheadAttention``; a loop over a size makes ``symbolic_trace`` fail, so
    torch.export decomposes the attention (``kv.unflatten(-1, (2, E))``)."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc, self.out = nn.Linear(d, d), nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.shape[1] // 7):
            x = x * 1.0
        h = self.attn(self.probe.repeat(x.shape[0], 1, 1), x, x)[0]
        return self.out(torch.relu(self.fc(h[:, 0])))


def test_unflatten_with_a_negative_dim_is_rewritten_in_the_input_dims() -> None:
    """``unflatten(-1, (2, E))`` counts ``dim`` in its input: the apply read it in the output
    (one dim more) and wrote ``(E', E)``; the safety net caught the crash and pinned the
    attention (SigLIP's head through the generic prune)."""
    model = _ProbeHead().eval()
    result = secateurs.prune(model, (torch.randn(2, 7, 64),), ratio=0.5, verify=True)
    assert result.report.tracer.startswith("export")
    assert result.report.exact is True and not result.report.repairs
    assert result.report.macs_kept < 0.6


class _DLRM(nn.Module):
    """DLRM: a bottom MLP, an ``EmbeddingBag`` per sparse feature, the pairwise dot
    interaction (``bmm`` of the stacked vectors, upper triangle) and a top MLP."""

    def __init__(self, d: int = 16, tables: int = 3) -> None:
        super().__init__()
        self.bot = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, d), nn.ReLU())
        self.emb = nn.ModuleList([nn.EmbeddingBag(20, d, mode="sum") for _ in range(tables)])
        n = tables + 1
        self.top = nn.Sequential(nn.Linear(d + n * (n - 1) // 2, 32), nn.ReLU(),
                                 nn.Linear(32, 1))
        self.register_buffer("iu", torch.triu_indices(n, n, 1))

    def forward(self, dense, idx, offsets):
        x = self.bot(dense)
        vectors = torch.stack([x] + [e(idx[i], offsets) for i, e in enumerate(self.emb)], 1)
        z = torch.bmm(vectors, vectors.transpose(1, 2))
        return self.top(torch.cat([x, z[:, self.iu[0], self.iu[1]]], dim=1))


def test_embedding_bag_dim_prunes_with_everything_it_is_dotted_with() -> None:
    """``EmbeddingBag`` had no rule (opaque, its dim pinned): the embedding dim now passes to
    the output, so the tables, the bottom MLP's output and the dot interaction prune as one."""
    model = _DLRM().eval()
    x = (torch.randn(4, 13), torch.randint(0, 20, (3, 8)), torch.tensor([0, 2, 4, 6]))
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact is True and not result.report.repairs
    assert all(result.model.get_submodule(f"emb.{i}").embedding_dim == 8 for i in range(3))
    assert result.model.get_submodule("bot.2").out_features == 8


class _MessagePassing(nn.Module):
    """GCN-style layers: messages gathered by edge source, ``index_add`` into the targets."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def prop(self, h, src, dst, deg):
        return torch.zeros_like(h).index_add(0, dst, h[src]) / deg[:, None]

    def forward(self, x, src, dst, deg):
        h = F.relu(self.l1(self.prop(x, src, dst, deg)))
        h = F.relu(self.l2(self.prop(h, src, dst, deg)))
        return self.out(h.mean(0, keepdim=True))


def test_index_add_scatters_rows_and_keeps_channels_position_for_position() -> None:
    model = _MessagePassing().eval()
    x = (torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 5, 0, 2]),
         torch.tensor([1, 2, 3, 4, 5, 0, 3, 5]), torch.tensor([1.0, 1, 1, 2, 1, 2]))
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact is True and not result.report.repairs
    assert result.model.l1.out_features == 16 and result.model.l2.out_features == 16


class _VectorNormGRN(nn.Module):
    """transformers' ConvNeXtV2 GRN: ``torch.linalg.vector_norm`` over the spatial dims of a
    channels-last tensor, divided by its mean over the channels (``mean`` mode) or not."""

    def __init__(self, mean: bool) -> None:
        super().__init__()
        self.mean = mean
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.gamma = nn.Parameter(torch.rand(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))  # [N, H, W, C]
        g = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
        if self.mean:
            g = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.fc2(self.gamma * (h * g) + h)


@pytest.mark.parametrize("mean", [False, True])
def test_linalg_vector_norm_reduces_over_its_dims(mean):
    """``linalg_vector_norm`` had no rule: opaque, it pinned the GRN's channels, so
    transformers' ConvNeXtV2 pruned nothing even with ``allow_lossy``. Over the spatial dims it
    passes the channels; the channel mean of the norms makes them lossy (not pinned)."""
    model = _VectorNormGRN(mean).eval()
    x = (torch.randn(2, 4, 4, 16),)
    group = next(g for g in secateurs.analyze(model, x).groups
                 if any(m.param == "fc1.weight" and m.dim == 0 for m in g.members))
    assert not group.pinned.any()
    assert group.is_lossy == mean
    result = secateurs.prune(model, x, ratio=0.5, verify=True, allow_lossy=mean)
    assert result.model.get_parameter("fc1.weight").shape[0] == 32
    if not mean:
        assert result.report.exact is True and not result.report.repairs


class _FrozenBN(nn.Module):
    """transformers' DetrFrozenBatchNorm2d: statistics and affine as buffers, the scale
    ``weight * (running_var + eps).rsqrt()`` computed in the forward."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * \
            (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) -
                            self.running_mean.reshape(1, -1, 1, 1) * scale)


class _FrozenBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 32, 3, padding=1), _FrozenBN(32), \
            nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.shape[-1] // 16):  # not FX-traceable: torch.export, as DETR
            x = x * 1.0
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_rsqrt_of_a_non_negative_buffer_plus_eps_is_not_lossy():
    """``rsqrt(running_var + eps)`` over buffers was "singular at zero" under torch.export
    (a reshaped buffer was not known to be >= 0), so every backbone channel of DETR-style
    models was lossy: DETR kept 0.98 of its MACs at ratio 0.7."""
    model = _FrozenBNNet().eval()
    x = (torch.randn(2, 3, 16, 16),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer.startswith("export")
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("c1.weight").shape[0] == 16
    with torch.no_grad():
        model.bn.running_var[3] = -1.0  # a negative statistic: rsqrt may see a zero
    group = next(g for g in secateurs.analyze(model, x).groups
                 if any(m.param == "c1.weight" and m.dim == 0 for m in g.members))
    assert group.is_lossy


class _Deformable(nn.Module):
    """Deformable attention's sampling (RT-DETR, Deformable DETR): values projected, then read
    at predicted coordinates by ``F.grid_sample``."""

    def __init__(self, untraceable: bool = False) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.value, self.offsets = nn.Conv2d(8, 32, 1), nn.Conv2d(8, 2, 1)
        self.out = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.untraceable:
            for _ in range(x.shape[-1] // 8):
                x = x * 1.0
        grid = torch.tanh(self.offsets(x)).permute(0, 2, 3, 1)  # [N, H, W, 2]
        v = torch.relu(self.value(x))
        return self.out(F.grid_sample(v, grid, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("path", ["fx", "export", "onnx"])
def test_grid_sample_passes_its_channels(path):
    """``grid_sample`` had no rule (FX, torch.export's ``grid_sampler``, ONNX ``GridSample``):
    the value channels of deformable attention were pinned."""
    model = _Deformable(untraceable=path == "export").eval()
    x = torch.randn(2, 8, 8, 8)
    if path == "onnx":
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
        result = secateurs.prune_onnx(onnx.load_from_string(buf.getvalue()), ratio=0.5,
                                      verify=True, round_to=1)
        assert result.report.exact is True
        assert result.report.macs_kept < 0.7
        return
    result = secateurs.prune(model, (x,), ratio=0.5, verify=True)
    assert result.report.tracer.startswith(path)
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("value.weight").shape[0] == 16


class _WeightNormedConv(nn.Module):
    """wav2vec2/HuBERT/WavLM's positional conv: ``parametrizations.weight_norm`` (torch.export:
    ``aten._weight_norm``), with a bool mask combined by ``&`` (DETR's query masks)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.conv = nn.utils.parametrizations.weight_norm(
            nn.Conv1d(32, 32, 3, padding=1, groups=4), dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.shape[-1] // 8):  # not FX-traceable: torch.export
            x = x * 1.0
        h = torch.relu(self.fc1(x))
        keep = (h > 0.1) & (h < 3.0)
        c = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(h + c * keep)


@pytest.mark.parametrize("dim", [0, 2])
def test_weight_norm_and_bool_masks_have_rules(dim):
    """``_weight_norm`` and ``__and__`` had no rule: opaque, they pinned the channels with
    "no channel rule". The norm makes its channels lossy (normalised over, or 0/0 for a removed
    slice), the mask passes them; ``allow_lossy`` prunes."""
    model = _WeightNormedConv(dim).eval()
    x = (torch.randn(2, 6, 8),)
    analysis = secateurs.analyze(model, x)
    reasons = [r for g in analysis.groups for r in g.pin_reasons + g.lossy_reasons]
    assert not [r for r in reasons if "no channel rule" in r], reasons
    assert any("weight_norm" in r for r in reasons)
    result = secateurs.prune(model, x, ratio=0.5, verify=True, allow_lossy=True)
    assert result.report.tracer.startswith("export") and not result.report.repairs
    assert result.model.get_parameter("fc1.weight").shape[0] == 16


class _RuntimeArgs(torch.nn.Module):
    """Op arguments computed from a run-time size: ``group_norm(y, C // 4)`` (its groups
    follow C), ``layer_norm(y, y.shape[-1:])``, CondConv's ``conv2d(groups=G * B)``, a split
    by ``C // 2`` whose pieces are then reversed (``xs[::-1]``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1)
        self.w = torch.nn.Parameter(torch.randn(16, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        b, c = y.shape[0], y.shape[1]
        if self.mode == "group_norm":
            y = torch.nn.functional.group_norm(y, c // 4)
        elif self.mode == "layer_norm":
            t = y.permute(0, 2, 3, 1)
            y = torch.nn.functional.layer_norm(t, t.shape[-1:]).permute(0, 3, 1, 2)
        elif self.mode == "condconv":
            w = self.w.repeat(b, 1, 1, 1)
            y = torch.nn.functional.conv2d(y.reshape(1, b * c, *y.shape[2:]), w, padding=1,
                                           groups=c * b).reshape(b, c, *y.shape[2:])
        else:
            y = torch.cat(torch.split(y, c // 2, dim=1)[::-1], 1)
        return self.c2(y)


@pytest.mark.parametrize("mode", ["group_norm", "layer_norm", "condconv", "split_reversed"])
def test_arguments_computed_at_run_time_pin_or_prune_never_crash(mode):
    """These raised TypeError inside the lowering ("int() argument must be ... not 'Node'",
    "'Node' object is not iterable"): an op whose literal argument is computed at run time
    is opaque now, a size read as GroupNorm's group count pins its dim, and a sliced tuple
    of split outputs is the list of outputs it holds (the reversed split had lost its inputs,
    and only the net kept the plan from crashing)."""
    model = _RuntimeArgs(mode).eval()
    x = (torch.randn(2, 3, 8, 8),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact is True and not result.report.repairs
    for batch in (1, 3):
        xb = (torch.randn(batch, 3, 8, 8),)
        ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, xb)
        assert ok, (batch, diff)
    if mode == "split_reversed":
        assert result.report.macs_after < 0.75 * result.report.macs_before


class _OnesOfRuntimeWidth(torch.nn.Module):
    def __init__(self, method: bool) -> None:
        super().__init__()
        self.method = method
        self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        ones = y.new_ones(y.shape[1]) if self.method else torch.ones(y.shape[1])
        return self.c2(y * ones.view(1, -1, 1, 1))


@pytest.mark.parametrize("method", [False, True])
def test_a_factory_sized_by_a_run_time_width_gets_a_size_not_minus_one(method):
    """``torch.ones(y.shape[1])`` had its shrunk run-time size rewritten to -1 (right for a
    view, which infers it; no size for a factory): the pruned model failed, and the net kept
    the channels."""
    model = _OnesOfRuntimeWidth(method).eval()
    x = (torch.randn(2, 3, 8, 8),)
    result = secateurs.prune(model, x, ratio=0.5)
    assert not result.report.repairs
    assert result.model.get_parameter("c1.weight").shape[0] == 8
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, diff


class _FlipCumsum(torch.nn.Module):
    """``y + y.flip(1)`` over channels, a cumulative sum over tokens (channels pass), a bicubic
    resize behind a Python loop (torch.export: ``upsample_bicubic2d``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "cumsum":  # x: [B, T, 8]
            return self.fc2(torch.relu(self.fc1(x)).cumsum(1))
        y = self.c1(x)
        if self.mode == "flip":
            y = y + y.flip(1)
        else:
            for _ in range(x.shape[-1] // 8):
                y = y * 1.0
            y = F.interpolate(y, scale_factor=2, mode="bicubic")
        return self.c2(y)


@pytest.mark.parametrize("mode", ["flip", "cumsum", "bicubic"])
def test_flip_cumsum_and_bicubic_resize_have_rules(mode):
    """These were opaque (``no channel rule for 'flip'``/``'cumsum'``/``'upsample_bicubic2d'``):
    every channel they touched was pinned. ``flip`` reverses the labels (channel ``i`` and
    ``C - 1 - i`` go together under ``y + y.flip(1)``), a cumulative op marks only its own
    dim lossy, a bicubic resize is a resize."""
    model = _FlipCumsum(mode).eval()
    x = (torch.randn(2, 5, 8),) if mode == "cumsum" else (torch.randn(2, 3, 8, 8),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.exact is True and not result.report.repairs
    first = "fc1.weight" if mode == "cumsum" else "c1.weight"
    assert result.model.get_parameter(first).shape[0] == 8
    if mode == "flip":  # the kept channels are closed under i -> 15 - i
        gone = set(result.plan.removed["c1.weight"][0])
        assert all((15 - i) in gone for i in gone)
    reasons = [r for g in result.analysis.groups for r in g.pin_reasons]
    assert not any("no channel rule" in r for r in reasons), reasons


class _Windows(torch.nn.Module):
    """Sliding windows: HaloNet's ``x.unfold(2, s, s).unfold(3, s, s)`` blocks, ``F.unfold`` /
    ``F.fold`` and ``nn.Unfold`` / ``nn.Fold`` (im2col / col2im), and VOLO's outlook-style
    per-window linear over unfolded values; ``untraceable`` sends it through torch.export."""

    def __init__(self, mode: str, untraceable: bool) -> None:
        super().__init__()
        self.mode, self.untraceable = mode, untraceable
        self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1)
        self.unfold, self.fold = torch.nn.Unfold(3, padding=1), torch.nn.Fold((8, 8), 3, padding=1)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        for _ in range(x.shape[-1] // 8 if self.untraceable else 0):
            y = y * 1.0
        if self.mode == "blocks":
            w = y.unfold(2, 2, 2).unfold(3, 2, 2)  # [B, C, 4, 4, 2, 2]
            y = w.mean((-1, -2)).repeat_interleave(2, -1).repeat_interleave(2, -2)
        elif self.mode == "functional":
            y = F.fold(F.unfold(y, 3, padding=1), (8, 8), 3, padding=1)
        else:
            b = y.shape[0]
            v = self.unfold(y).reshape(b, 16, 9, 64).permute(0, 3, 2, 1)  # [B, L, K, C]
            y = self.fold(self.lin(v).permute(0, 3, 2, 1).reshape(b, 16 * 9, 64))
        return self.c2(y)


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize("mode", ["blocks", "functional", "outlook"])
def test_unfold_and_fold_pass_channels(mode, untraceable):
    """``unfold``/``fold``/``nn.Unfold``/``nn.Fold`` were opaque: HaloNet's and VOLO's heads
    and value channels were pinned. Windows and kernel positions are pinned; channels pass
    (im2col's columns are (channel, kernel position))."""
    model = _Windows(mode, untraceable).eval()
    x = (torch.randn(2, 3, 8, 8),)
    result = secateurs.prune(model, x, ratio=0.5, verify=True)
    assert result.report.tracer.startswith("export" if untraceable else "fx")
    assert result.report.exact is True and not result.report.repairs
    assert result.model.get_parameter("c1.weight").shape[0] == 8
    for batch in (1, 3):
        xb = (torch.randn(batch, 3, 8, 8),)
        ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, xb)
        assert ok, (batch, diff)


def test_local_response_norm_is_lossy_over_channels_only():
    """AlexNet/GoogLeNet's LRN normalises each channel by its neighbours: its channels are
    lossy (kept under exact pruning, with that reason), its spatial dims pass; it was opaque,
    "no channel rule"."""
    class _Lrn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.lrn = nn.Conv2d(3, 16, 3, padding=1), nn.LocalResponseNorm(5)
            self.c2, self.c3 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

        def forward(self, x):
            y = torch.relu(self.c2(self.lrn(torch.relu(self.c1(x)))))
            return F.local_response_norm(self.c3(y), 3)

    model, x = _Lrn().eval(), torch.randn(2, 3, 8, 8)
    analysis = secateurs.analyze(model, x)
    assert any("local_response_norm" in r for r in _reasons(analysis, "c1.weight", "lossy"))
    result = secateurs.prune(model, x, ratio=0.5)
    assert result.model.c2.out_channels == 8  # between the two LRNs: free
    assert result.model.c1.out_channels == 16
    ok, diff = secateurs.verify_mask_equivalence(model, result.model, result.plan, x)
    assert ok, diff
    lossy = secateurs.prune(model, x, ratio=0.5, allow_lossy=True)
    assert lossy.model.c1.out_channels == 8


def test_cat_onto_an_empty_cache_prunes_its_heads():
    """HF T5 with ``use_cache=True`` joins its keys onto an empty cache: ``torch.cat`` skips a
    1-D empty operand, and the rule failed "cannot unify label vectors of lengths 0 and 2"."""

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k, self.o = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x):
            keys = torch.cat([x.new_zeros(0), self.k(x)], dim=-1)  # the empty cache first
            return self.o(torch.relu(keys))

    model, x = Cached().eval(), torch.randn(2, 16)
    result = secateurs.prune(model, (x,), ratio=0.5, verify=True)
    assert result.report.exact and result.model.k.out_features == 16
