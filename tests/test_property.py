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
