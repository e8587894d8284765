"""Random architectures through the whole pipeline: every one prunes exactly or pins with a
reason; no crash, no shape error."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs


class RandomNet(nn.Module):
    def __init__(self, ops, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ops = ops
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layers = nn.ModuleList()
        c = width
        self.widths = []
        for op in ops:
            if op == "conv":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c + 4, 3, padding=1),
                                                 nn.BatchNorm2d(c + 4), nn.ReLU()))
                c = c + 4
            elif op == "residual":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)))
            elif op == "concat":
                self.layers.append(nn.Conv2d(c, 4, 1))
                c = c + 4
            elif op == "depthwise":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c),
                                                 nn.BatchNorm2d(c), nn.SiLU()))
            elif op == "split":
                self.layers.append(nn.Conv2d(c - c // 2, c - c // 2, 1))
            self.widths.append(c)
        self.fc = nn.Linear(c * 4, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.data.uniform_(0.5, 1.5, generator=g)
                m.bias.data.uniform_(-0.5, 0.5, generator=g)

    def forward(self, x):
        x = self.stem(x)
        for op, layer in zip(self.ops, self.layers):
            if op == "residual":
                x = torch.relu(x + layer(x))
            elif op == "concat":
                x = torch.cat([x, layer(x)], dim=1)
            elif op == "split":
                a, b = torch.split(x, [x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
                x = torch.cat([a, layer(b)], dim=1)
            else:
                x = layer(x)
        x = nn.functional.adaptive_avg_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


OPS = st.lists(st.sampled_from(["conv", "residual", "concat", "depthwise", "split"]),
               min_size=1, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, width=st.sampled_from([4, 6, 8]), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       seed=st.integers(0, 100))
def test_random_architectures_prune_exactly(ops, width, ratio, seed):
    torch.manual_seed(seed)
    model = RandomNet(ops, width, seed).eval()
    x = torch.randn(1, 3, 8, 8)
    result = secateurs.prune(model, x, ratio=ratio, verify=True)
    assert result.report.exact
    for g in result.analysis.groups:
        if g.is_pinned:
            assert g.pin_reasons  # pinned always says why
    # idempotent: pruning the result at ratio 0 changes nothing
    assert not secateurs.prune(result.model, x, ratio=0.0).plan.removed


# ---- the patterns public transformers are written in (issue 11): fused qkv + unbind,
# relative-position bias tables gathered through an index buffer, window attention (also
# shifted by roll), attention in einsum, zero-padded channel shortcuts (F.pad) and
# weight-standardised convs. With the safety net, every draw is exact or pinned with a
# reason, never a model that crashes or differs.


def _rel_index(ws: int) -> torch.Tensor:
    """Swin-style relative position index of a ws x ws window: (ws², ws²) into a table of
    (2ws - 1)² rows."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class FusedAttention(nn.Module):
    """timm-style attention over tokens (B, N, C): one qkv Linear, reshape to
    (B, N, 3, H, D), permute(2, 0, 3, 1, 4), unbind(0); optional relative-position bias
    ``table[index]`` (ws x ws tokens)."""

    def __init__(self, c: int, heads: int, head_dim: int, ws: int | None,
                 einsum: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.einsum = heads, head_dim, einsum
        self.qkv = nn.Linear(c, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, c)
        self.ws = ws
        if ws is not None:
            self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.5)
            self.register_buffer("index", _rel_index(ws).flatten(), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = torch.einsum("bhqd,bhkd->bhqk", q * self.head_dim ** -0.5, k) if self.einsum \
            else (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        if self.ws is not None:
            bias = self.table[self.index].reshape(n, n, self.heads).permute(2, 0, 1)
            att = att + bias.unsqueeze(0)
        out = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class GlobalAttention(nn.Module):
    """Feature map -> tokens -> attention (``@`` or ``torch.einsum``) -> feature map, residual."""

    def __init__(self, c: int, heads: int, head_dim: int, rel: bool, side: int,
                 einsum: bool = False) -> None:
        super().__init__()
        self.attn = FusedAttention(c, heads, head_dim, side if rel else None, einsum)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        return x + self.attn(t).transpose(1, 2).reshape(b, c, h, w)


class WindowAttention(nn.Module):
    """Swin-style: partition the map into ws x ws windows (reshape + permute), attend in
    each window with a relative-position table, reverse the partition, residual; ``shift``
    rolls the map by half a window before and back after (the cyclic shift, without mask)."""

    def __init__(self, c: int, heads: int, head_dim: int, ws: int, shift: bool = False) -> None:
        super().__init__()
        self.ws, self.shift = ws, ws // 2 if shift else 0
        self.attn = FusedAttention(c, heads, head_dim, ws)

    def forward(self, x):
        b, c, h, w = x.shape
        ws, s = self.ws, self.shift
        t = torch.roll(x, (-s, -s), dims=(2, 3)) if s else x
        t = t.permute(0, 2, 3, 1).reshape(b, h // ws, ws, w // ws, ws, c)
        t = t.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        t = self.attn(t).reshape(b, h // ws, w // ws, ws, ws, c)
        t = t.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + (torch.roll(t, (s, s), dims=(2, 3)) if s else t)


class StdConv(nn.Conv2d):
    """NF-Net / BiT weight standardisation: batch statistics over the conv's own weight."""

    def forward(self, x):
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                     training=True, momentum=0.0, eps=1e-5)
        return nn.functional.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride,
                                    self.padding)


class WildNet(nn.Module):
    """RandomNet's CNN ops plus the transformer patterns above, on an 8x8 map."""

    def __init__(self, ops, width, heads, head_dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ops = ops
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layers = nn.ModuleList()
        c = width
        for op in ops:
            if op == "conv":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c + 4, 3, padding=1),
                                                 nn.BatchNorm2d(c + 4), nn.ReLU()))
                c += 4
            elif op == "residual":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)))
            elif op == "std_conv":
                self.layers.append(nn.Sequential(StdConv(c, c + 2, 3, padding=1), nn.GELU()))
                c += 2
            elif op == "pad_channels":  # CIFAR ResNet option A: zero-padded channel shortcut
                self.layers.append(nn.Sequential(nn.Conv2d(c, c + 4, 3, padding=1),
                                                 nn.BatchNorm2d(c + 4)))
                c += 4
            elif op in ("attention", "attention_rel", "einsum_attention"):
                self.layers.append(GlobalAttention(c, heads, head_dim, op == "attention_rel", 8,
                                                   op == "einsum_attention"))
            elif op in ("window_attention", "shifted_window"):
                self.layers.append(WindowAttention(c, heads, head_dim, 4,
                                                   op == "shifted_window"))
        self.fc = nn.Linear(c * 4, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.data.uniform_(0.5, 1.5, generator=g)
                m.bias.data.uniform_(-0.5, 0.5, generator=g)

    def forward(self, x):
        x = self.stem(x)
        for op, layer in zip(self.ops, self.layers):
            if op == "pad_channels":
                x = torch.relu(layer(x) + nn.functional.pad(x, (0, 0, 0, 0, 2, 2)))
            else:
                x = torch.relu(x + layer(x)) if op == "residual" else layer(x)
        x = nn.functional.adaptive_avg_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


WILD_OPS = st.lists(st.sampled_from(["conv", "residual", "std_conv", "attention",
                                     "attention_rel", "window_attention", "shifted_window",
                                     "einsum_attention", "pad_channels"]),
                    min_size=1, max_size=4)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=WILD_OPS, width=st.sampled_from([4, 8]), heads=st.sampled_from([2, 4]),
       head_dim=st.sampled_from([2, 4]), ratio=st.sampled_from([0.25, 0.5]),
       seed=st.integers(0, 100))
def test_random_transformer_patterns_prune_exactly_or_pin(ops, width, heads, head_dim, ratio,
                                                          seed):
    torch.manual_seed(seed)
    model = WildNet(ops, width, heads, head_dim, seed).eval()
    x = torch.randn(2, 3, 8, 8)
    result = secateurs.prune(model, x, ratio=ratio, verify=True)
    assert result.report.exact
    with torch.no_grad():  # runs at another batch size too
        assert result.model(torch.randn(3, 3, 8, 8)).shape == (3, 5)
    for g in result.analysis.groups:
        if g.is_pinned:
            assert g.pin_reasons
    for r in result.report.repairs:  # the net's repairs name the group and what failed
        assert r.reason.startswith(f"group {r.group} (")
        assert "fails at `" in r.reason or "not mask-equivalent" in r.reason
        row = next(row for row in result.report.groups if row.id == r.group)
        assert row.pinned == r.reason
