"""Dependency analysis: channel groups from label propagation.

Walks the channel graph once in topological order, applying each node's channel rule to its
inputs' label vectors (``channel_rules``), then resolves the recorded unifications with
union-find (``labels.resolve``). The result is pure, frozen data:

* a **unit** is an atom of the resolution — one output channel of a conv (and everything
  coupled to it), one attention head, one head dim across all heads;
* a **channel group** is the set of units born together on one dim (plus everything unified
  with them); each group lists its **members**: for every parameter dim it touches, which
  positions belong to which unit;
* units are **pinned** (with the reason: graph input/output, an op without a rule, a constant
  index) or **lossy** (normalisation over the dim), per unit.

Graph inputs and outputs are pinned. Parameters are born with fresh, unpinned labels on every
dim; a parameter dim no rule unifies with anything stays a group of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from secateurs.errors import TraceError
from secateurs.graph.ir import ChannelGraph, Node, is_trace_constant
from secateurs.passes.channel_rules import RuleContext, rule_for
from secateurs.passes.labels import LabelSpace, Resolution

__all__ = ["Member", "ChannelGroup", "Analysis", "group_channels"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """Positions of one parameter dim that belong to a group: ``positions[i]`` is removed when
    unit ``units[i]`` of the group is removed."""

    param: str
    dim: int
    positions: np.ndarray
    units: np.ndarray

    @cached_property
    def plain(self) -> bool:
        """Every unit has one position in this parameter dim (no unit repeats)."""
        return len(self.units) == len(np.unique(self.units))


@dataclass(frozen=True)
class ChannelGroup:
    id: int
    size: int
    members: tuple[Member, ...]
    pinned: np.ndarray  # bool per unit
    lossy: np.ndarray  # bool per unit
    pin_reasons: tuple[str, ...]
    lossy_reasons: tuple[str, ...]
    atoms: np.ndarray  # atom id per unit

    @property
    def prunable(self) -> int:
        return int((~self.pinned).sum())

    @property
    def is_lossy(self) -> bool:
        return bool(self.lossy.any())

    @property
    def removal_is_lossy(self) -> bool:
        """Some unit that may be removed is lossy (a lossy unit that is pinned never goes:
        ``h[:, [5, 9]].sum(-1)`` sums over the two pinned channels only)."""
        return bool((self.lossy & ~self.pinned).any())

    @property
    def is_pinned(self) -> bool:
        return bool(self.pinned.all())

    def params(self) -> list[str]:
        return sorted({m.param for m in self.members})

    def describe(self) -> str:
        mem = ", ".join(f"{m.param}[{m.dim}]" for m in self.members[:6])
        more = f" +{len(self.members) - 6}" if len(self.members) > 6 else ""
        return f"group {self.id}: {self.size} units over {mem}{more}"


@dataclass(frozen=True)
class ParamDims:
    """Every parameter dim's labels end to end: dim ``dims[k]`` of ``names[owner[k]]`` has
    labels ``labels[starts[k]:starts[k + 1]]``. ``values`` maps source name -> value name."""

    names: tuple[str, ...]
    values: dict[str, str]
    owner: np.ndarray
    dims: np.ndarray
    starts: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Analysis:
    """The frozen result of dependency analysis over one channel graph."""

    graph: ChannelGraph
    groups: tuple[ChannelGroup, ...]
    resolution: Resolution
    labels: dict[str, list[np.ndarray]]
    keep: dict[str, dict[str, Any]]
    param_values: dict[str, str] = field(default_factory=dict)  # source name -> value name
    param_dims: ParamDims | None = None

    @cached_property
    def memo(self) -> dict[Any, Any]:
        """Results derived from this (frozen) analysis alone, kept by the passes that compute
        them: a selection repeated per ratio (``target_latency``) derives them once."""
        return {}

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    def removed_atoms(self, removed_units: dict[int, np.ndarray]) -> np.ndarray:
        """Read-only mask over atoms (read-only lets ``Resolution.alive`` cache by it)."""
        removed = np.zeros(len(self.resolution.is_atom), dtype=bool)
        for gid, units in removed_units.items():
            removed[self.groups[gid].atoms[np.asarray(units, dtype=np.int64)]] = True
        removed.flags.writeable = False
        return removed

    def alive(self, value: str, dim: int, removed: np.ndarray) -> np.ndarray:
        return self.resolution.alive(self.labels[value][dim], removed)

    def new_shape(self, value: str, removed: np.ndarray) -> tuple[int, ...]:
        return tuple(int(self.resolution.alive(v, removed).sum()) for v in self.labels[value])


def group_channels(graph: ChannelGraph) -> Analysis:
    """Propagate labels through ``graph`` and resolve them into channel groups."""
    space = LabelSpace()
    labels: dict[str, list[np.ndarray]] = {}
    for name in graph.inputs:
        shape = graph.values[name].shape
        if shape is not None:
            labels[name] = [space.fresh(s, pin=f"graph input '{name}'") for s in shape]
    for value in graph.values.values():
        if value.name in labels or value.shape is None:
            continue
        if value.param is not None:
            labels[value.name] = [space.fresh(s, root=False) for s in value.shape]
        elif value.kind == "constant":
            labels[value.name] = [space.fresh(s, pin=f"constant '{value.name}' (a tensor the "
                                                    f"traced program holds as data, not a "
                                                    f"parameter: its positions stay)")
                                  for s in value.shape]
    keep: dict[str, dict[str, Any]] = {}
    for node in graph.nodes:
        ins = []
        for name in node.inputs:
            if name is None or graph.values[name].shape is None:
                ins.append(None)
                continue
            if name not in labels:  # produced by something no rule saw: keep it whole
                shape = graph.values[name].shape or ()
                labels[name] = [space.fresh(s, pin=f"value '{name}' of unknown origin")
                                for s in shape]
            ins.append(labels[name])
        space.origin(node.describe())
        ctx = RuleContext(
            node=node,
            ins=ins,
            in_shapes=[None if i is None else graph.values[i].shape for i in node.inputs],
            out_shapes=[graph.values[o].shape for o in node.outputs],
            space=space,
        )
        mark = space.mark()
        try:
            outs = rule_for(node.op).propagate(ctx)
        except (ValueError, IndexError, KeyError, AssertionError) as exc:
            raise TraceError(f"channel rule for {node.describe()} failed: {exc!r}") from exc
        for out_name, lab in zip(node.outputs, outs):
            if lab is None:
                continue
            shape = graph.values[out_name].shape
            if shape is None or tuple(len(v) for v in lab) != tuple(shape):
                got = tuple(len(v) for v in lab)
                raise TraceError(f"channel rule for {node.describe()} produced labels of shape "
                                 f"{got} for '{out_name}' of shape {shape}")
            labels[out_name] = lab
        _pin_unmapped(node, ins, outs, space, mark)
        keep[node.name] = ctx.keep
    for name in graph.outputs:
        for vec in labels.get(name, []):
            space.pin(vec, f"graph output '{name}'")
    res = space.resolve()
    pd = _param_dims(graph, labels)
    groups = _collect_groups(pd, res)
    log.debug("analysis: %d labels, %d groups", space.count, len(groups))
    return Analysis(graph, groups, res, labels, keep, pd.values, pd)


def _pin_unmapped(node: Node, ins: list[list[np.ndarray] | None],
                  outs: list[list[np.ndarray] | None], space: LabelSpace,
                  mark: tuple[int, ...]) -> None:
    """Every input dim must be accounted for by its rule: passed to an output, unified,
    factored, pinned, marked lossy, or noted (``LabelSpace.note``). A dim the rule said nothing about
    would be a free group that this op consumes in a way no rule describes (a conv's input
    spatial dims were one: a row of a map reshaped from a Linear could be removed, and the
    conv then ran on a smaller map); it is pinned, naming the op. A node whose outputs are all
    empty reads nothing."""
    out_vecs = [v for lab in outs if lab for v in lab]
    if not any(ins) or outs and all(lab is not None and any(len(v) == 0 for v in lab)
                                    for lab in outs):
        return
    # by identity first (a dim passed on, or a view of it used): most rules, at no cost
    seen: set[int] = set()
    for arr in space.arrays_since(mark) + out_vecs:
        while arr is not None and id(arr) not in seen:
            seen.add(id(arr))
            arr = arr.base
    touched: np.ndarray | None = None
    for i, lab in enumerate(ins):
        for d, vec in enumerate(lab or ()):
            if len(vec) <= 1 or id(vec) in seen:
                continue
            if touched is None:  # copies (fancy-indexed, repeated): by label
                touched = space.touched_since(mark)
                if out_vecs:
                    touched = np.union1d(touched, np.concatenate(out_vecs))
            if not np.isin(vec, touched).any():
                space.pin(vec, f"{node.describe()} reads dim {d} of operand {i} in a way "
                          f"its channel rule does not map (kept whole; please report the "
                          f"model)")


def _param_dims(graph: ChannelGraph, labels: dict[str, list[np.ndarray]]) -> ParamDims:
    names: list[str] = []
    values: dict[str, str] = {}
    owner, dims, vecs = [], [], []
    for value in graph.params():
        if value.name not in labels:
            continue
        assert value.param is not None
        values[value.param] = value.name
        for d, vec in enumerate(labels[value.name]):
            owner.append(len(names))
            dims.append(d)
            vecs.append(vec)
        names.append(value.param)
    lens = np.array([len(v) for v in vecs], dtype=np.int64)
    return ParamDims(tuple(names), values, np.array(owner, dtype=np.int64),
                     np.array(dims, dtype=np.int64), np.r_[0, np.cumsum(lens)],
                     np.concatenate(vecs) if vecs else np.zeros(0, dtype=np.int64))


def _collect_groups(pd: ParamDims, res: Resolution) -> tuple[ChannelGroup, ...]:
    """The members of every group, one parameter dim at a time: a dim whose positions all
    fall in one group (a conv's filters, a BN's scales) is one member without sorting; only
    dims split across groups or carrying composite labels (a concat's consumer, a reshape)
    are split position by position."""
    atom_ids = np.nonzero(res.is_atom)[0]
    by_group = atom_ids[np.argsort(res.group[atom_ids], kind="stable")]
    gstart = np.searchsorted(res.group[by_group], np.arange(res.n_groups + 1))
    unit_index = np.full(len(res.is_atom), -1, dtype=np.int64)
    unit_index[by_group] = np.arange(len(by_group)) - gstart[res.group[by_group]]
    members: dict[int, list[Member]] = {}
    if len(pd.labels):
        comp = res.comp[pd.labels]
        simple = res.is_atom[comp]
        gid = np.where(simple, res.group[np.where(simple, comp, 0)], -1)
        sizes = np.diff(pd.starts)
        full = np.nonzero(sizes > 0)[0]
        lo = np.minimum.reduceat(gid, pd.starts[full])
        hi = np.maximum.reduceat(gid, pd.starts[full])
        for k, g_lo, g_hi in zip(full.tolist(), lo.tolist(), hi.tolist()):
            a, b = int(pd.starts[k]), int(pd.starts[k + 1])
            name, dim = pd.names[pd.owner[k]], int(pd.dims[k])
            if g_lo == g_hi >= 0:
                members.setdefault(g_lo, []).append(
                    Member(name, dim, np.arange(b - a), unit_index[comp[a:b]]))
                continue
            if g_lo >= 0:  # atoms of several groups (a concat's consumer)
                row, atom, g = np.arange(b - a), comp[a:b], gid[a:b]
            else:  # composite labels: expand each position into its atoms
                mat = res.atoms_of(pd.labels[a:b])
                row, col = np.nonzero(mat >= 0)
                atom = mat[row, col]
                g = res.group[atom]
                if not len(g):  # composites of no atom (a reshape cycle): kept, pinned
                    continue
            order = np.argsort(g, kind="stable")
            row, atom, g = row[order], atom[order], g[order]
            cuts = np.r_[0, np.nonzero(np.diff(g))[0] + 1, len(g)].tolist()
            for c0, c1 in zip(cuts[:-1], cuts[1:]):
                members.setdefault(int(g[c0]), []).append(
                    Member(name, dim, row[c0:c1], unit_index[atom[c0:c1]]))
    pin_mask = np.zeros(len(res.is_atom), dtype=bool)
    pin_mask[np.fromiter(res.pin_reason, dtype=np.int64, count=len(res.pin_reason))] = True
    lossy_mask = np.zeros(len(res.is_atom), dtype=bool)
    lossy_mask[np.fromiter(res.lossy_reason, dtype=np.int64, count=len(res.lossy_reason))] = True
    groups = []
    for new_id, g in enumerate(sorted(members)):  # touched groups, in group order
        atoms = by_group[gstart[g]:gstart[g + 1]]
        pinned, lossy = pin_mask[atoms], lossy_mask[atoms]
        pin_reasons = tuple(dict.fromkeys(res.pin_reason[a] for a in atoms[pinned].tolist()))
        if not pinned.all() and all(is_trace_constant(m.param) for m in members[g]):
            # positions of tensors the program computes from constants alone (a folded mask,
            # a position table) that meet no channel: removing them saves nothing, and where
            # an op without a channel rule consumed them, nothing coupled them to the rest
            pinned = np.ones(len(atoms), dtype=bool)
            pin_reasons = (*pin_reasons, "positions of constants the traced program computes, "
                           "coupled to no parameter: nothing to remove")
        lossy_reasons = tuple(dict.fromkeys(res.lossy_reason[a] for a in atoms[lossy].tolist()))
        groups.append(ChannelGroup(new_id, len(atoms), tuple(members[g]), pinned, lossy,
                                   pin_reasons, lossy_reasons, atoms))
    return tuple(groups)
