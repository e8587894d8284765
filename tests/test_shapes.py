"""Shape propagation: the shape formulas (``from_fx._SHAPE_FNS``) and the meta interpreter give
every node the shape torch's own ``ShapeProp`` gives it, on every zoo model; modules whose
forward is not torch's own are run, not guessed; a bad input is still reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.stateless import _reparametrize_module

from secateurs import zoo
from secateurs.errors import InputError
from secateurs.graph import from_fx


def _reference_shapes(gm: torch.fx.GraphModule, inputs: tuple) -> dict:
    for n in gm.graph.nodes:
        n.meta.pop(from_fx._SHAPE_KEY, None)
        n.meta.pop("tensor_meta", None)
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    by_id: dict[int, torch.Tensor] = {}  # tied tensors (GPT-2's lm_head/wte) stay one tensor
    meta = {k: by_id.setdefault(id(v), torch.empty_like(v, device="meta"))
            for k, v in tensors.items()}
    with _reparametrize_module(gm, meta, tie_weights=True):
        ShapeProp(gm).propagate(*[a.to("meta") for a in inputs])
    return {n.name: from_fx._node_shape(n) for n in gm.graph.nodes}


def _our_shapes(gm: torch.fx.GraphModule, inputs: tuple) -> dict:
    from_fx.propagate_shapes(gm, inputs)
    return {n.name: from_fx._node_shape(n) for n in gm.graph.nodes}


@pytest.mark.parametrize("name", [n for n in zoo.names() if "fx-untraceable" not in
                                  zoo.get(n).tags and not n.endswith("_full")])
def test_shapes_match_shapeprop_on_the_zoo(name):
    entry = zoo.get(name)
    model, x = entry.build(), entry.example_inputs()
    gm, how = from_fx.trace(model, x)
    assert how == "fx"
    ours = _our_shapes(gm, x)
    assert ours == _reference_shapes(gm, x)
    assert sum(isinstance(s, tuple) for s in ours.values()) > 3


class _Doubling(nn.Linear):
    """A Linear subclass whose own forward changes the output shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().forward(x), super().forward(x)], dim=-1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _Doubling(6, 4)
        self.norm = nn.LayerNorm(8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.norm(self.a(x))))


class _KeepDoubling(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _Doubling) or super().is_leaf_module(m, qualname)


def test_module_subclass_with_its_own_forward_is_run_not_guessed():
    """A GraphModule from a custom tracer may keep a subclass of a torch module as a leaf
    (``trace`` takes a GraphModule as it is): its forward runs, the Linear formula is not
    applied to it."""
    model, x = _Net().eval(), (torch.randn(2, 5, 6),)
    gm = torch.fx.GraphModule(model, _KeepDoubling().trace(model))
    assert any(n.op == "call_module" and n.target == "a" for n in gm.graph.nodes)
    shapes = _our_shapes(gm, x)
    assert shapes["a"] == (2, 5, 8)
    # the meta interpreter did it (no fallback to FakeTensorMode, which clears its records)
    assert all(from_fx._SHAPE_KEY in n.meta for n in gm.graph.nodes if n.op != "output")
    assert shapes == _reference_shapes(gm, x)


def test_mismatched_input_is_reported_not_guessed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    gm, _ = from_fx.trace(model, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(InputError, match="does not run on example inputs"):
        from_fx.propagate_shapes(gm, (torch.randn(1, 4, 8, 8),))
