"""The neutral channel graph: one IR for every frontend.

A ``ChannelGraph`` is a list of nodes in topological order over named values. Parameters,
buffers and ONNX initializers are values too (``Value.param`` is set), so a rule never has to
ask whether an operand is an activation or a weight: a bias added to an activation is just a
broadcasting ``add``.

Nodes carry a *canonical* op name (the key of the channel rule table in
``secateurs.passes.channel_rules``) and canonical attributes; frontends translate their own op
vocabulary (``torch.nn.Conv2d``, ``aten.convolution``, ONNX ``Conv``) into it. Values carry real
shapes from shape propagation; ``shape is None`` marks a non-tensor value (an int from
``x.size(0)``, a tuple), which rules never see.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Value", "Node", "ChannelGraph", "take", "is_take", "is_trace_constant"]


@dataclass
class Value:
    """A tensor (or non-tensor) value flowing along graph edges.

    ``param`` is the source name of a parameter/buffer/initializer (its name in the original
    model's ``named_parameters()``/``named_buffers()`` or the ONNX initializer name), else None.
    """

    name: str
    shape: tuple[int, ...] | None
    dtype: str | None = None
    param: str | None = None
    kind: str = "activation"  # activation | parameter | buffer | constant | input


@dataclass
class Node:
    """One operation: canonical ``op``, tensor ``inputs`` (value names, None for an absent
    optional operand), ``outputs``, canonical ``attrs`` and ``source``, the frontend's own
    description (module path and type, or ONNX node name and op type) for messages."""

    name: str
    op: str
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def describe(self) -> str:
        return f"{self.op} '{self.name}'" + (f" ({self.source})" if self.source else "")


@dataclass
class ChannelGraph:
    """Values, nodes in topological order, and the graph's inputs and outputs."""

    values: dict[str, Value]
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    frontend: str = "fx"

    def params(self) -> Iterator[Value]:
        return (v for v in self.values.values() if v.param is not None)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i is not None:
                    out.setdefault(i, []).append(n)
        return out

    def summary(self) -> str:
        """A readable dump, one node a line (the graph at debug log level)."""
        lines = []
        for n in self.nodes:
            ins = ", ".join(
                f"{i}{list(self.values[i].shape) if i and self.values[i].shape is not None else ''}"
                for i in n.inputs
            )
            outs = ", ".join(
                f"{o}{list(self.values[o].shape) if self.values[o].shape is not None else ''}"
                for o in n.outputs
            )
            lines.append(f"{outs} = {n.op}({ins}) {n.attrs if n.attrs else ''}")
        return "\n".join(lines)


def take(positions: Any) -> tuple[str, tuple[int, ...]]:
    """An ``index`` node's item for constant positions of one dim (``x[..., [-2], :]``, a 1-D
    constant ``Gather``): ``("take", positions)``, the one spelling every frontend, the rule
    and both applies share."""
    return ("take", tuple(int(p) for p in positions))


def is_take(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and item[0] == "take"


# torch.fx's frozen tensor, torch.export's lifted literal, ``fx_fold``'s folded constant
_TRACE_CONSTANT = re.compile(r"_tensor_constant\d+|lifted_tensor_\d+|_secateurs_const_\d+")


def is_trace_constant(name: str) -> bool:
    """A tensor that exists only in the traced program (computed from constants alone), not
    one of the model's parameters or buffers."""
    return bool(_TRACE_CONSTANT.fullmatch(name))
