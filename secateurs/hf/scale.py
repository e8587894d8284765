"""Analysis of deep transformers by layer replication: trace three layers, expand to all N.

A decoder (or encoder) stack is a ``ModuleList`` of identical layers, and the channel analysis
of a middle layer does not depend on how many layers surround it. So instead of tracing all N
layers through ``torch.export`` (Llama-3-8B on meta: 8.4 s and 360 MB traced memory this
way, 2.0 s and 177 MB replicated; Llama-3-70B 3.0 s and 334 MB), ``channel_analysis`` traces
the model with its first ``TRACED_LAYERS`` = 3 layers, analyses that (``group_channels``), and
expands the result to N layers:

* every resolved component (a unit or a composite of units) of the traced model is **local** to
  one layer (only that layer's values carry it) or **global** (carried by a value outside the
  layers — embeddings, final norm, rotary ``inv_freq`` — or by every layer: hidden size, the
  rotary head-dim units). A component shared by some layers but not all stops replication;
* layer 1 is the *template*: layer 0 keeps its own analysis (its input comes from the
  embeddings), layers 1..N-1 are copies of layer 1 with their components renumbered, their
  parameters renamed (``layers.1.`` -> ``layers.j.``) and their inputs from "the previous
  layer" pointing at copy j-1; nodes after the stack that read the last traced layer read
  copy N-1. Per-layer groups (heads, head dims of v, MLP neurons) get one copy per layer;
  global groups (hidden size, the rotary q/k head dims) get the members of every layer;
* the result is a real ``Analysis``: an expanded ``ChannelGraph`` (so MACs are counted on all
  N layers), an expanded ``Resolution``, label vectors and rule constants remapped on access,
  and ``ChannelGroup``\\ s with renamed members. ``select_units``, ``build_plan``,
  ``prune_hf`` and ``shards.prune_checkpoint`` take it as they take a traced one.

**Soundness check.** Before expanding, the traced analysis must show that layer 2 is the image
of layer 1: the same nodes (op, attributes, shapes; inputs from the layer itself, the previous
layer, the same global values or the same-named parameters), a bijection between their local
components that preserves label order, atoms, pins, lossy marks and groups, and groups whose
members are layer 1's renamed. Layer 2 is the one layer whose analysis would come out of
the expansion, so this is the comparison "3 traced layers == 2 traced layers replicated".
Layers must also be uniform before tracing (same module types, plain attributes other than
``layer_idx``, parameter shapes; one ``config.layer_types``). Any failure falls back to the
full trace, with the reason logged.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.graph import from_fx
from secateurs.graph.ir import ChannelGraph, Node, Value
from secateurs.hf.layout import block_list
from secateurs.passes.group_channels import Analysis, ChannelGroup, Member, group_channels
from secateurs.passes.labels import Resolution

__all__ = ["TRACED_LAYERS", "NotReplicable", "channel_analysis", "replicate_analysis",
           "trace_graph", "uniformity_problem", "wants_replication"]

log = logging.getLogger(__name__)

TRACED_LAYERS = 3
_GLOBAL, _DROPPED = -1, -2


class NotReplicable(Exception):
    """The traced layers do not determine the others; the message says why."""


# ---------------------------------------------------------------- entry points


def trace_graph(model: nn.Module, args: tuple[Any, ...]) -> tuple[torch.fx.GraphModule,
                                                                   ChannelGraph, str]:
    """Trace (FX, else torch.export), propagate shapes and lower ``model`` to a channel graph."""
    gm, how = from_fx.trace(model, args, dynamic_batch=False)  # analysis only
    for n in gm.graph.nodes:  # export's guard check has no value; don't re-propagate for it
        if n.op == "call_module" and n.target == "_guards_fn":
            n.meta.setdefault("val", None)
    from_fx.propagate_shapes(gm, args)
    return gm, from_fx.lower_graph_module(gm), how


def wants_replication(model: nn.Module) -> bool:
    """The default: replicate models on the ``meta`` device with more than TRACED_LAYERS
    layers (real-weight models are traced whole, as before)."""
    cfg = getattr(model, "config", None)
    n = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0)
    on_meta = any(p.is_meta for p in model.parameters())
    return on_meta and n > TRACED_LAYERS


def channel_analysis(model: nn.Module, args: tuple[Any, ...],
                     replicate: bool | None = None) -> tuple[Analysis, str]:
    """The channel analysis of an HF model and how it was obtained: replicated from
    TRACED_LAYERS traced layers (``replicate``; default ``wants_replication``), else traced
    whole. A model that cannot be replicated is traced whole; the reason is logged."""
    if replicate is None:
        replicate = wants_replication(model)
    if replicate:
        try:
            return replicate_analysis(model, args)
        except NotReplicable as exc:
            log.warning("layer replication not used, tracing every layer: %s", exc)
    _, graph, how = trace_graph(model, args)
    return group_channels(graph), how


def replicate_analysis(model: nn.Module, args: tuple[Any, ...]) -> tuple[Analysis, str]:
    """Trace the first TRACED_LAYERS layers of ``model`` and expand the analysis to all of
    them; raises ``NotReplicable`` with the reason when the layers do not allow it."""
    try:
        block, layers = block_list(model)
    except InputError as exc:
        raise NotReplicable(str(exc)) from exc
    n = len(layers)
    if n <= TRACED_LAYERS:
        raise NotReplicable(f"{n} layers: nothing to replicate beyond {TRACED_LAYERS}")
    p, reason = layer_period(model, layers)
    if reason:
        raise NotReplicable(reason)
    if n // p <= TRACED_LAYERS:
        raise NotReplicable(f"{n} layers of period {p}: nothing to replicate beyond "
                            f"{TRACED_LAYERS} periods")
    with _first_layers(model, block, layers, TRACED_LAYERS * p):
        gm, graph, how = trace_graph(model, args)
        analysis = group_channels(graph)
    exp = _Expansion(gm, graph, analysis, block, TRACED_LAYERS, n // p, p)
    per = f", period {p}" if p > 1 else ""
    return exp.analysis(), f"{how}+replicate({TRACED_LAYERS * p}->{n}{per})"


# ---------------------------------------------------------------- before tracing


_PLAIN = (bool, int, float, str, type(None), tuple)


def _signature(layer: nn.Module) -> tuple:
    mods = []
    for name, mod in layer.named_modules():
        attrs = sorted((k, v) for k, v in vars(mod).items()
                       if not k.startswith("_") and k != "layer_idx" and isinstance(v, _PLAIN))
        mods.append((name, type(mod).__qualname__, tuple(attrs)))
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in
               list(layer.named_parameters()) + list(layer.named_buffers())]
    return tuple(mods), tuple(tensors)


def _periodic(items: list[Any], p: int) -> bool:
    return all(items[i] == items[i % p] for i in range(len(items)))


def layer_period(model: nn.Module, layers: nn.ModuleList) -> tuple[int, str | None]:
    """The smallest period ``p`` of the layer stack (layer ``i`` is interchangeable with layer
    ``i mod p``: module types, plain attributes other than ``layer_idx``, tensor shapes, and
    every per-layer list of the config — ``layer_types`` and any other list of one entry per
    layer), with ``p`` dividing the layer count; and why there is none (``p`` = 0)."""
    n = len(layers)
    cfg = model.config
    lists = {k: list(v) for k, v in vars(cfg).items()
             if isinstance(v, (list, tuple)) and len(v) == n and n > 1 and not k.startswith("_")}
    sigs = [_signature(layer) for layer in layers]
    for p in range(1, n // 2 + 1):
        if n % p == 0 and _periodic(sigs, p) and all(_periodic(v, p) for v in lists.values()):
            return p, None
    types = getattr(cfg, "layer_types", None)
    if types and len(set(types)) > 1:
        return 0, f"config.layer_types mixes {sorted(set(types))} with no period dividing {n}"
    bad = next((k for k, v in lists.items() if len(set(map(repr, v))) > 1), None)
    if bad:
        return 0, f"config.{bad} varies by layer with no period dividing {n}"
    i = next(i for i in range(1, n) if sigs[i] != sigs[0])
    return 0, (f"layer {i} ({type(layers[i]).__name__}) differs from layer 0 in its modules, "
               f"attributes or parameter shapes, with no period dividing {n}")


def uniformity_problem(model: nn.Module, layers: nn.ModuleList) -> str | None:
    """Why the layers are not interchangeable (None when they are)."""
    p, why = layer_period(model, layers)
    if p == 1:
        return None
    return why or f"the layers repeat with period {p}, not 1"


@contextlib.contextmanager
def _first_layers(model: nn.Module, block: str, layers: nn.ModuleList, k: int) -> Iterator[None]:
    """Temporarily keep only the first ``k`` layers of ``model`` (restored on exit)."""
    parent_name, _, attr = block.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    cfg = model.config
    saved = cfg.num_hidden_layers
    setattr(parent, attr, nn.ModuleList(list(layers)[:k]))
    cfg.num_hidden_layers = k
    try:
        yield
    finally:
        setattr(parent, attr, layers)
        cfg.num_hidden_layers = saved


# ---------------------------------------------------------------- the expansion


def _attr_key(attrs: dict[str, Any]) -> str:
    return repr(sorted(attrs.items()))


def _remap_struct(obj: Any, fn: Any) -> Any:
    """Apply ``fn`` to every integer array (a label vector) inside a rule's ``keep``."""
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "iu":
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _remap_struct(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_remap_struct(v, fn) for v in obj)
    return obj


def _arrays(obj: Any) -> Iterator[np.ndarray]:
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "iu":
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays(v)


def _first_order(group: np.ndarray, is_atom: np.ndarray) -> tuple[np.ndarray, int]:
    """Group ids of atoms renumbered 0.. in order of first appearance (-1 for non-atoms)."""
    out = np.full(len(group), -1, dtype=np.int64)
    ids = np.nonzero(is_atom)[0]
    _, first, inverse = np.unique(group[ids], return_index=True, return_inverse=True)
    out[ids] = np.argsort(np.argsort(first))[inverse]
    return out, len(first)


class _Expansion:
    """Checks a traced K-layer analysis and builds its N-layer expansion.

    Component ids of the expansion: the traced model's global and layer-0 components first
    (in traced order), then ``n_loc`` ids per copy j = 1..N-1 of the template (layer 1)."""

    def __init__(self, gm: torch.fx.GraphModule, graph: ChannelGraph, analysis: Analysis,
                 block: str, k: int, n: int, period: int = 1) -> None:
        self.graph, self.a, self.block, self.k, self.n = graph, analysis, block, k, n
        self.p = period  # layers per replicated unit ("layer" below: p consecutive layers)
        self.res = analysis.resolution
        self.comp = self.res.comp  # traced label -> traced component, kept after analysis()
        self._layout(gm)
        self._classify_components()
        self._match_layers()
        self._number()

    # ------------------------------------------------------------ where things live

    def _param_layer(self, fqn: str | None) -> tuple[int, str]:
        """(unit, name inside the unit): with a period ``p``, layer ``i`` is position
        ``i % p`` of unit ``i // p`` and its names read ``"<i % p>.<rest>"``."""
        m = self.param_re.match(fqn or "")
        if not m:
            return _GLOBAL, fqn or ""
        i = int(m.group(1))
        return (i, m.group(2)) if self.p == 1 else (i // self.p, f"{i % self.p}.{m.group(2)}")

    def _unit_name(self, rel: str, unit: int) -> str:
        """The FQN of ``rel`` (as ``_param_layer`` names it) in unit ``unit``."""
        if self.p == 1:
            return f"{self.block}.{unit}.{rel}"
        sub, rest = rel.split(".", 1)
        return f"{self.block}.{unit * self.p + int(sub)}.{rest}"

    def _layout(self, gm: torch.fx.GraphModule) -> None:
        path_re = re.compile(rf"^{re.escape(self.block)}\.(\d+)(?:\.|$)")
        self.param_re = re.compile(rf"^{re.escape(self.block)}\.(\d+)\.(.+)$")
        fx_layer: dict[str, int] = {}
        for fx_node in gm.graph.nodes:
            stack = fx_node.meta.get("nn_module_stack") or {}
            hits = [path_re.match(str(v[0])) for v in stack.values()]
            found = [int(h.group(1)) // self.p for h in hits if h]
            fx_layer[fx_node.name] = found[0] if found else _GLOBAL
        k = self.k
        # lowering may split an FX node ('addmm' -> 'addmm__mm', 'addmm'): same layer
        self.node_layer = [fx_layer.get(nd.name, fx_layer.get(nd.name.split("__")[0], _GLOBAL))
                           for nd in self.graph.nodes]
        self.layer_nodes: list[list[Node]] = [[] for _ in range(k)]
        self.prelude: list[Node] = []
        self.tail: list[Node] = []
        at = [i for i, lay in enumerate(self.node_layer) if lay >= 0]
        if not at:
            raise NotReplicable(f"no traced node carries the module path '{self.block}.<i>'")
        starts = {}
        for i, (nd, lay) in enumerate(zip(self.graph.nodes, self.node_layer)):
            if lay >= k:
                raise NotReplicable(f"node {nd.describe()} belongs to layer {lay} of {k}")
            if lay >= 0:
                starts.setdefault(lay, i)
                self.layer_nodes[lay].append(nd)
            elif i < at[0]:
                self.prelude.append(nd)
            elif i > at[-1]:
                self.tail.append(nd)
            else:
                raise NotReplicable(f"node {nd.describe()} outside the layers runs between "
                                    f"layer nodes")
        order = [starts.get(lay, -1) for lay in range(k)]
        sizes = [len(x) for x in self.layer_nodes]
        spans = [(order[lay], order[lay] + sizes[lay]) for lay in range(k)]
        if any(b[0] != a[1] for a, b in zip(spans, spans[1:])) or len(set(sizes)) != 1:
            raise NotReplicable(f"layer nodes are not {k} consecutive runs of equal length "
                                f"(sizes {sizes})")
        # value -> (layer, local node index, output index); parameters -> (layer, rel name)
        self.produced: dict[str, tuple[int, int, int]] = {}
        for lay, nodes in enumerate(self.layer_nodes):
            for i, nd in enumerate(nodes):
                for o, out in enumerate(nd.outputs):
                    self.produced[out] = (lay, i, o)
        self.value_layer: dict[str, int] = {}
        for v in self.graph.values.values():
            if v.name in self.produced:
                self.value_layer[v.name] = self.produced[v.name][0]
            elif v.param is not None:
                self.value_layer[v.name] = self._param_layer(v.param)[0]
            else:
                self.value_layer[v.name] = _GLOBAL
        for nd in self.tail:
            for name in nd.inputs:
                lay = self.value_layer.get(name, _GLOBAL) if name else _GLOBAL
                if lay not in (_GLOBAL, k - 1) or (lay == k - 1 and name not in self.produced):
                    raise NotReplicable(f"{nd.describe()} after the layers reads '{name}' of "
                                        f"layer {lay}, not of the last layer")
        for name in self.graph.outputs:
            lay = self.value_layer.get(name, _GLOBAL)
            if lay not in (_GLOBAL, k - 1) or (lay == k - 1 and name not in self.produced):
                raise NotReplicable(f"graph output '{name}' comes from inner layer {lay}")

    def _describe(self, lay: int) -> list[tuple]:
        """Layer ``lay``'s nodes with their inputs relative to the layer."""
        out = []
        for nd in self.layer_nodes[lay]:
            ins: list[Any] = []
            for name in nd.inputs:
                if name is None:
                    ins.append(None)
                    continue
                v = self.graph.values[name]
                if name in self.produced:
                    src, i, o = self.produced[name]
                    rel = "own" if src == lay else "prev" if src == lay - 1 else None
                    if rel is None:
                        raise NotReplicable(f"{nd.describe()} of layer {lay} reads '{name}' "
                                            f"of layer {src}")
                    ins.append((rel, i, o))
                elif v.param is not None and self._param_layer(v.param)[0] >= 0:
                    p_lay, rel_name = self._param_layer(v.param)
                    if p_lay != lay:
                        raise NotReplicable(f"{nd.describe()} of layer {lay} uses parameter "
                                            f"'{v.param}' of layer {p_lay}")
                    ins.append(("param", rel_name))
                else:
                    ins.append(("global", name))
            shapes = tuple(self.graph.values[o].shape for o in nd.outputs)
            out.append((nd.op, _attr_key(nd.attrs), tuple(ins), shapes))
        return out

    # ------------------------------------------------------------ components

    def _classify_components(self) -> None:
        """``cls[c]``: the one layer whose values carry component c, _GLOBAL, or _DROPPED (a
        composite no label refers to)."""
        res, k = self.res, self.k
        n_comp = len(res.is_atom)
        ref = np.zeros((k + 1, n_comp), dtype=bool)  # row k: outside the layers
        for name, vecs in self.a.labels.items():
            lay = self.value_layer.get(name, _GLOBAL)
            row = k if lay < 0 else lay
            for vec in vecs:
                ref[row, res.comp[vec]] = True
        for nd, lay in zip(self.graph.nodes, self.node_layer):
            row = k if lay < 0 else lay
            for vec in _arrays(self.a.keep.get(nd.name, {})):
                ref[row, res.comp[vec]] = True
        n_ref = ref[:k].sum(axis=0)
        glob = ref[k] | (n_ref == k)
        shared = ~glob & (n_ref >= 2)
        if shared.any():
            c = int(np.nonzero(shared)[0][0])
            lays = np.nonzero(ref[:k, c])[0].tolist()
            raise NotReplicable(f"component {c} is shared by layers {lays} only (neither "
                                f"local to one layer nor common to all)")
        cls = np.full(n_comp, _DROPPED, dtype=np.int64)
        cls[glob] = _GLOBAL
        for lay in range(k):
            cls[ref[lay] & ~glob] = lay
        # atoms no label names directly belong where the composites made of them belong
        rows = res.atoms
        comp_ids = np.nonzero((cls != _DROPPED) & ~res.is_atom)[0]
        inner = rows[comp_ids]
        ok = inner >= 0
        atom = inner[ok]
        owner = np.broadcast_to(cls[comp_ids][:, None], inner.shape)[ok]
        loose = cls[atom] == _DROPPED
        for a, o in set(zip(atom[loose].tolist(), owner[loose].tolist())):
            if cls[a] not in (_DROPPED, o):
                raise NotReplicable(f"unit {a} is part of components of layers {cls[a]} and {o}")
            cls[a] = o
        # atoms still unplaced follow their group (no parameter member names them)
        atoms = np.nonzero(res.is_atom)[0]
        unplaced = atoms[cls[atoms] == _DROPPED]
        if len(unplaced):
            placed = atoms[cls[atoms] != _DROPPED]
            by_group = dict(zip(res.group[placed].tolist(), cls[placed].tolist()))
            cls[unplaced] = [by_group.get(g, _GLOBAL) for g in res.group[unplaced].tolist()]
        # a component's atoms live in its layer or are global; groups do not span layers
        bad = (inner >= 0) & (cls[np.maximum(inner, 0)] != _GLOBAL) & \
            (cls[np.maximum(inner, 0)] != cls[comp_ids][:, None])
        if bad.any():
            r = int(np.nonzero(bad.any(axis=1))[0][0])
            raise NotReplicable(f"component {int(comp_ids[r])} of layer {cls[comp_ids[r]]} is "
                                f"made of units of another layer")
        g_cls = np.zeros(int(res.n_groups), dtype=np.int64)
        g_cls[res.group[atoms]] = cls[atoms]
        mixed = g_cls[res.group[atoms]] != cls[atoms]
        if mixed.any():
            g = int(res.group[atoms[np.nonzero(mixed)[0][0]]])
            raise NotReplicable(f"channel group {g} has units of several layers")
        self.cls = cls

    def _match_layers(self) -> None:
        """Layer 2 (the last traced layer) must be the image of the template, layer 1."""
        t, last = 1, self.k - 1
        d0, d1, d2 = self._describe(0), self._describe(t), self._describe(last)
        if [(x[0], x[3]) for x in d0] != [(x[0], x[3]) for x in d1]:
            raise NotReplicable("layer 0 and layer 1 trace to different op sequences")
        for i, (x1, x2) in enumerate(zip(d1, d2)):
            if x1 != x2:
                raise NotReplicable(f"layer {last} differs from layer {t} at "
                                    f"{self.layer_nodes[last][i].describe()}")
        res, cls = self.res, self.cls
        a_parts, b_parts = [], []
        for n1, n2 in zip(self.layer_nodes[t], self.layer_nodes[last]):
            for o1, o2 in zip(n1.outputs, n2.outputs):
                for v1, v2 in zip(self.a.labels.get(o1, []), self.a.labels.get(o2, [])):
                    a_parts.append(res.comp[v1])
                    b_parts.append(res.comp[v2])
            for x1, x2 in zip(_arrays(self.a.keep.get(n1.name, {})),
                              _arrays(self.a.keep.get(n2.name, {}))):
                a_parts.append(res.comp[x1])
                b_parts.append(res.comp[x2])
        params2 = {self._param_layer(v.param)[1]: v.name for v in self.graph.params()
                   if self._param_layer(v.param)[0] == last}
        for v in self.graph.params():
            p_lay, rel = self._param_layer(v.param)
            if p_lay != t:
                continue
            if rel not in params2:
                raise NotReplicable(f"layer {last} has no parameter '{rel}'")
            for v1, v2 in zip(self.a.labels.get(v.name, []), self.a.labels.get(params2[rel], [])):
                a_parts.append(res.comp[v1])
                b_parts.append(res.comp[v2])
        a, b = np.concatenate(a_parts), np.concatenate(b_parts)
        m12 = np.full(len(cls), -1, dtype=np.int64)
        for _ in range(4):  # extend through the atoms of matched composites
            a, b = self._pairs_ok(a, b, t, last)
            m12[a[cls[a] == t]] = b[cls[a] == t]
            comp = (cls[a] == t) & ~res.is_atom[a]
            ra, rb = res.atoms[a[comp]], res.atoms[b[comp]]
            if ((ra >= 0) != (rb >= 0)).any():
                raise NotReplicable(f"layer {last}'s composites differ from layer {t}'s")
            ok = ra >= 0
            fresh = ok & (m12[np.maximum(ra, 0)] < 0) & (cls[np.maximum(ra, 0)] == t)
            if not fresh.any():
                break
            a, b = np.r_[a, ra[ok]], np.r_[b, rb[ok]]
        loc1 = np.nonzero(cls == t)[0]
        loc2 = np.nonzero(cls == last)[0]
        img = m12[loc1]
        if (img < 0).any() or len(loc1) != len(loc2) or not np.array_equal(img, loc2):
            raise NotReplicable(f"layer {last}'s channels are not layer {t}'s in the same "
                                f"order ({len(loc1)} vs {len(loc2)} components)")
        if not np.array_equal(res.is_atom[loc1], res.is_atom[loc2]):
            raise NotReplicable(f"layer {last}'s units differ from layer {t}'s")
        for marks, what in ((res.pin_reason, "pinned"), (res.lossy_reason, "lossy")):
            m1 = np.array([int(c) in marks for c in loc1[res.is_atom[loc1]]], dtype=bool)
            m2 = np.array([int(c) in marks for c in loc2[res.is_atom[loc2]]], dtype=bool)
            if not np.array_equal(m1, m2):
                raise NotReplicable(f"layer {last}'s {what} units differ from layer {t}'s")
        self.m12 = m12
        self.m21 = np.full(len(cls), -1, dtype=np.int64)
        self.m21[loc2] = loc1
        self._match_groups(t, last)

    def _pairs_ok(self, a: np.ndarray, b: np.ndarray, t: int,
                  last: int) -> tuple[np.ndarray, np.ndarray]:
        """Matched (layer-1, layer-2) components, checked one-to-one; globals match themselves."""
        cls = self.cls
        ca, cb = cls[a], cls[b]
        glob = ca == _GLOBAL
        if (glob & (b != a)).any() or ((ca == t) & (cb != last)).any() or \
                ((ca != t) & ~glob).any():
            raise NotReplicable(f"layer {last}'s labels do not correspond to layer {t}'s")
        fwd = np.full(len(cls), -1, dtype=np.int64)
        bwd = np.full(len(cls), -1, dtype=np.int64)
        fwd[a], bwd[b] = b, a
        if (fwd[a] != b).any() or (bwd[b] != a).any():
            raise NotReplicable(f"layer {last}'s components are not one-to-one with layer "
                                f"{t}'s")
        keys = np.nonzero(fwd >= 0)[0]
        return keys, fwd[keys]

    def _match_groups(self, t: int, last: int) -> None:
        """Group structure: layer 2's groups and members are layer 1's, renamed."""
        self.group_layer: list[int] = []
        by_atoms = {}
        for g in self.a.groups:
            lay = int(self.cls[g.atoms[0]])
            self.group_layer.append(lay)
            by_atoms[int(g.atoms[0])] = g
        for g in self.a.groups:
            lay = self.group_layer[g.id]
            if lay == t:
                g2 = by_atoms.get(int(self.m12[g.atoms[0]]))
                if g2 is None or not np.array_equal(self.m12[g.atoms], g2.atoms) or \
                        not np.array_equal(g.pinned, g2.pinned) or \
                        not np.array_equal(g.lossy, g2.lossy) or \
                        self._members(g, t, last) != self._members(g2, last, last):
                    raise NotReplicable(f"layer {last}'s image of {g.describe()} differs")
            elif lay == _GLOBAL:
                if self._members(g, t, last) != self._members(g, last, last):
                    raise NotReplicable(f"{g.describe()} has different members in layers "
                                        f"{t} and {last}")

    def _members(self, g: ChannelGroup, lay: int, as_lay: int) -> set:
        out = set()
        for m in g.members:
            p_lay, rel = self._param_layer(m.param)
            if p_lay == lay:
                out.add((self._unit_name(rel, as_lay), m.dim, m.positions.tobytes(),
                         m.units.tobytes()))
        return out

    # ------------------------------------------------------------ numbering and building

    def _number(self) -> None:
        cls, n = self.cls, self.n
        base = (cls == _GLOBAL) | (cls == 0)
        self.base_id = np.full(len(cls), -1, dtype=np.int64)
        self.base_id[base] = np.arange(int(base.sum()))
        self.n_base = int(base.sum())
        loc1 = np.nonzero(cls == 1)[0]
        self.n_loc = len(loc1)
        self.rank = np.full(len(cls), -1, dtype=np.int64)
        self.rank[loc1] = np.arange(self.n_loc)
        last = np.nonzero(cls == self.k - 1)[0]
        self.rank[last] = self.rank[self.m21[last]]
        self.n_total = self.n_base + (n - 1) * self.n_loc

    def remap(self, comps: np.ndarray, copy: int | None) -> np.ndarray:
        """Expanded ids of traced components seen from template copy ``copy`` (None: from
        outside the layers or layer 0, where the last traced layer means copy N-1)."""
        cls = self.cls[comps]
        out = self.base_id[comps].copy()
        loc = cls == 1
        if loc.any():
            assert copy is not None, "layer-1 component seen from outside the layers"
            out[loc] = self.n_base + (copy - 1) * self.n_loc + self.rank[comps[loc]]
        last = cls == self.k - 1
        if last.any():
            assert copy is None, "last-layer component seen from a template copy"
            out[last] = self.n_base + (self.n - 2) * self.n_loc + self.rank[comps[last]]
        return out

    def _labels_of(self, vecs: list[np.ndarray], copy: int | None) -> list[np.ndarray]:
        return [self.remap(self.comp[v], copy) for v in vecs]

    def _remap_rows(self, rows: np.ndarray, copy: int | None) -> np.ndarray:
        out = np.full(rows.shape, -1, dtype=np.int64)
        ok = rows >= 0
        out[ok] = self.remap(rows[ok], copy)
        return out

    def _resolution(self) -> Resolution:
        """The expanded Resolution; component ids are the expanded labels (comp = identity)."""
        res, cls, copies = self.res, self.cls, self.n - 1
        base = np.nonzero(self.base_id >= 0)[0]
        loc1 = np.nonzero(cls == 1)[0]
        width = max(1, int((res.atoms >= 0).sum(axis=1).max()))
        rows = res.atoms[:, :width]
        atoms = np.empty((self.n_total, width), dtype=np.int64)
        atoms[:self.n_base] = self._remap_rows(rows[base], None)
        tmpl = self._remap_rows(rows[loc1], 1)
        step = np.where(tmpl >= self.n_base, self.n_loc, 0)  # local atoms move with the copy
        view = atoms[self.n_base:].reshape(copies, self.n_loc, width)
        for j in range(copies):
            np.add(tmpl, j * step, out=view[j])
        is_atom = np.concatenate([res.is_atom[base], np.tile(res.is_atom[loc1], copies)])
        # groups numbered in order of their first atom, as labels.resolve numbers them
        base_g, n_bg = _first_order(res.group[base], res.is_atom[base])
        tmpl_g, n_tg = _first_order(res.group[loc1], res.is_atom[loc1])
        group = np.concatenate([base_g, np.where(
            tmpl_g >= 0, n_bg + np.arange(copies)[:, None] * n_tg + tmpl_g, -1).reshape(-1)])
        pin: dict[int, str] = {}
        lossy: dict[int, str] = {}
        for src, dst in ((res.pin_reason, pin), (res.lossy_reason, lossy)):
            local = []
            for a, why in src.items():
                c = cls[a]
                if c in (_GLOBAL, 0):
                    dst[int(self.base_id[a])] = why
                elif c == 1:
                    local.append((self.n_base + int(self.rank[a]), why))
            for j in range(copies):
                for a, why in local:
                    dst[a + j * self.n_loc] = why
        return Resolution(np.arange(self.n_total, dtype=np.int64), atoms, is_atom, group,
                          n_bg + copies * n_tg, pin, lossy)

    def _copy_name(self, name: str, copy: int) -> str:
        return name if copy == 1 else f"{name}__layer{copy}"

    def _param_name(self, fqn: str, copy: int) -> str:
        lay, rel = self._param_layer(fqn)
        return self._unit_name(rel, copy)

    def _graph(self) -> tuple[ChannelGraph, dict[str, tuple[str, int | None]],
                              dict[str, tuple[str, int | None]]]:
        """The expanded graph, and for every expanded value / node its traced origin and the
        copy it belongs to."""
        t, last, n = 1, self.k - 1, self.n
        g = self.graph
        tmpl_values = [v for v in g.values.values() if self.value_layer[v.name] == t]
        values: dict[str, Value] = {}
        origin: dict[str, tuple[str, int | None]] = {}
        rename: list[dict[str, str]] = [{} for _ in range(n)]  # per copy: traced -> expanded
        for j in range(1, n):
            for v in tmpl_values:
                new = self._param_name(v.param, j) if v.param is not None else \
                    self._copy_name(v.name, j)
                rename[j][v.name] = new
        # the last traced layer's values are copy N-1's
        for v in g.values.values():
            if self.value_layer[v.name] == last:
                if v.name in self.produced:
                    _, i, o = self.produced[v.name]
                    src = self.layer_nodes[t][i].outputs[o]
                else:
                    src = self._param_name(v.param, t)
                rename[n - 1].setdefault(v.name, rename[n - 1][src])
        emitted = False
        for v in g.values.values():
            lay = self.value_layer[v.name]
            if lay in (t, last):
                if emitted:
                    continue
                emitted = True
                for j in range(1, n):
                    for tv in tmpl_values:
                        new = rename[j][tv.name]
                        values[new] = tv if j == 1 else Value(
                            new, tv.shape, tv.dtype, new if tv.param is not None else None,
                            tv.kind)
                        origin[new] = (tv.name, j)
                continue
            values[v.name] = v
            origin[v.name] = (v.name, None)
        nodes: list[Node] = list(self.prelude) + list(self.layer_nodes[0])
        node_origin: dict[str, tuple[str, int | None]] = {
            nd.name: (nd.name, None) for nd in nodes}
        for j in range(1, n):
            for nd in self.layer_nodes[t]:
                ins = []
                for name in nd.inputs:
                    if name is None:
                        ins.append(None)
                    elif name in rename[j]:
                        ins.append(rename[j][name])
                    elif j > 1 and self.value_layer.get(name) == 0:  # previous layer's value
                        _, i, o = self.produced[name]
                        ins.append(rename[j - 1][self.layer_nodes[t][i].outputs[o]])
                    else:
                        ins.append(name)
                new = Node(self._copy_name(nd.name, j), nd.op, ins,
                           [rename[j][o] for o in nd.outputs], dict(nd.attrs), nd.source)
                nodes.append(new)
                node_origin[new.name] = (nd.name, j)
        for nd in self.tail:
            ins = [rename[n - 1].get(name, name) if name else name for name in nd.inputs]
            nodes.append(Node(nd.name, nd.op, ins, list(nd.outputs), nd.attrs, nd.source))
            node_origin[nd.name] = (nd.name, None)
        outputs = [rename[n - 1].get(o, o) for o in g.outputs]
        return ChannelGraph(values, nodes, list(g.inputs), outputs, g.frontend), origin, \
            node_origin

    def _groups(self, graph: ChannelGraph) -> tuple[ChannelGroup, ...]:
        t, last, n = 1, self.k - 1, self.n
        order = {v.param: i for i, v in enumerate(graph.params())}
        out: list[ChannelGroup] = []

        def renamed(g: ChannelGroup, j: int) -> list[Member]:
            return [Member(self._param_name(m.param, j), m.dim, m.positions, m.units)
                    for m in g.members if self._param_layer(m.param)[0] == t]

        for g, lay in zip(self.a.groups, self.group_layer):
            if lay == t:
                for j in range(1, n):
                    out.append(replace(g, members=tuple(renamed(g, j)),
                                       atoms=self.remap(g.atoms, j)))
            elif lay in (_GLOBAL, 0):
                members = [m for m in g.members
                           if self._param_layer(m.param)[0] not in (t, last)]
                for j in range(1, n):
                    members += renamed(g, j)
                members.sort(key=lambda m: (order[m.param], m.dim))
                out.append(replace(g, members=tuple(members), atoms=self.remap(g.atoms, None)))
        out.sort(key=lambda g: int(g.atoms[0]))
        return tuple(replace(g, id=i) for i, g in enumerate(out))

    def analysis(self) -> Analysis:
        """The expanded analysis (call once: the traced resolution is released after it)."""
        graph, origin, node_origin = self._graph()
        labels = _Remapped(self.a.labels, origin, self._labels_of)
        keep = _Remapped(self.a.keep, node_origin,
                         lambda obj, copy: _remap_struct(
                             obj, lambda v: self.remap(self.comp[v], copy)))
        params = {v.param: v.name for v in graph.params() if v.name in labels}
        out = Analysis(graph, self._groups(graph), self._resolution(), labels, keep, params)
        del self.a, self.res, self.graph, self.m12, self.m21  # only labels and keep stay
        return out


class _Remapped(Mapping):
    """A traced mapping (labels by value, rule constants by node) seen through the
    expansion: entries are remapped on access, so N layers cost no more memory than K."""

    def __init__(self, traced: Mapping[str, Any], origin: dict[str, tuple[str, int | None]],
                 fn: Any) -> None:
        self._traced = traced
        self._origin = {k: v for k, v in origin.items() if v[0] in traced}
        self._fn = fn

    def __getitem__(self, key: str) -> Any:
        src, copy = self._origin[key]
        return self._fn(self._traced[src], copy)

    def __contains__(self, key: object) -> bool:
        return key in self._origin

    def __iter__(self) -> Iterator[str]:
        return iter(self._origin)

    def __len__(self) -> int:
        return len(self._origin)
