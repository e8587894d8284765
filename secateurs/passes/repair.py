"""The safety net under the rule table: a prune never returns a model that fails to run, and
``verify=True`` never one that is not mask-equivalent.

After selection, before the real apply, the plan is tried on the model:

* **runs** (always): the plan is applied inside a :class:`Trial` — every tensor swapped for a
  ``meta`` stand-in, the graph's constants rewritten, then everything restored — and the graph
  is interpreted on ``meta`` at the example input shapes and at a second batch size (shape
  formulas where known, meta kernels otherwise: milliseconds, no weights read). A shape where
  the *original* model does not run either (a batch size fixed in the code, a data-dependent
  op) is tried under ``FakeTensorMode``, and skipped (with a note) if the original fails there
  too.
* **exact** (``verify=True``): the same trial with real tensors, the outputs compared with the
  original whose removed slices are zeroed (the correctness contract).

A failing plan is *repaired*: the groups that cause the failure are found by bisection
(:func:`find_culprits`: the groups touching the failing node first, then halving the set of
pruned groups), pinned with a reason that names the node and the error, and selection runs
again with them skipped (so a global ratio is redistributed as selection would), until the
plan passes. Each repair is a missing or wrong channel rule: the report lists them and a
warning names them. The core (:func:`repair`, :func:`find_culprits`) knows nothing about the
frontend; a frontend passes a *probe*: a function from a selection (group id -> removed units)
to ``None`` (passes) or a :class:`Failure`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from secateurs.errors import SecateursError
from secateurs.graph import from_fx
from secateurs.graph.fx_apply import apply_plan_fx, tensor_slots
from secateurs.passes.group_channels import Analysis
from secateurs.passes.plan import Plan, build_plan

__all__ = ["Repair", "Failure", "Probe", "find_culprits", "repair", "FxNet", "OnnxNet", "Trial",
           "TrialBroken", "second_batch", "batch_of", "with_batch", "compare_outputs"]

log = logging.getLogger(__name__)

Selection = Mapping[int, np.ndarray]
_MODES = ("meta", "device", "fake")  # how the graph is run, cheapest first
_META_MODES = ("meta", "device")


@dataclass(frozen=True)
class Failure:
    """Why a trial failed: where (a node, '' for a numeric mismatch) and the error."""

    node: str
    message: str
    check: str = "runs"  # runs | exact
    node_name: str = ""  # the frontend's node name (FX node / ONNX node), for bisection

    def text(self) -> str:
        return f"pruned model fails at {self.node}: {self.message}" if self.node \
            else self.message


@dataclass(frozen=True)
class Repair:
    """One group pinned by the net: ``check`` is ``runs`` or ``exact``; ``reason`` the text
    the report shows ("group 12: pruned model fails at `blocks.0.attn` unbind: ...")."""

    group: int
    check: str
    node: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "check": self.check, "node": self.node,
                "reason": self.reason}


Probe = Callable[[Selection], "Failure | None"]


def _sub(removed: Selection, gids: Iterable[int]) -> dict[int, np.ndarray]:
    return {g: removed[g] for g in gids}


def find_culprits(removed: Selection, probe: Probe, failure: Failure,
                  candidates: Sequence[int] = ()) -> list[tuple[int, Failure, bool]]:
    """Groups of ``removed`` (whose whole selection fails with ``failure``) to pin, each with
    the failure it causes and whether it fails alone.

    ``candidates`` (the groups at the failing node) are tried alone first; if none fails
    alone, the selection is halved recursively (a half that passes holds no culprit); a set
    that fails while both halves pass holds an interaction, and the smallest failing prefix
    names its last group (pinned "in combination with other pruned groups")."""
    found = []
    for g in candidates:
        if g in removed:
            f = probe(_sub(removed, [g]))
            if f is not None:
                found.append((g, f, True))
    if found:
        return found
    return _split(sorted(removed), removed, probe, failure)


def _split(gids: list[int], removed: Selection, probe: Probe,
           failure: Failure) -> list[tuple[int, Failure, bool]]:
    if not gids:
        return []
    if len(gids) == 1:
        return [(gids[0], failure, True)]
    half = len(gids) // 2
    out: list[tuple[int, Failure, bool]] = []
    for part in (gids[:half], gids[half:]):
        f = probe(_sub(removed, part))
        if f is not None:
            out += _split(part, removed, probe, f)
    if out:
        return out
    lo, hi = 0, len(gids)  # gids[:lo] passes, gids[:hi] fails
    fail_hi = failure
    while hi - lo > 1:
        mid = (lo + hi) // 2
        f = probe(_sub(removed, gids[:mid]))
        if f is None:
            lo = mid
        else:
            hi, fail_hi = mid, f
    return [(gids[hi - 1], fail_hi, False)]


def repair(removed: Selection, reselect: Callable[[set[int]], dict[int, np.ndarray]],
           probe: Probe, pinned: dict[int, Repair],
           candidates: Callable[[Failure, Selection], Sequence[int]] | None = None,
           describe: Callable[[int], str] | None = None,
           max_rounds: int = 200) -> dict[int, np.ndarray]:
    """Probe ``removed``; while it fails, pin the culprits (adding them to ``pinned``,
    group id -> :class:`Repair`) and re-select with every pinned group skipped. Returns the
    selection that passes."""
    current = dict(removed)
    for _ in range(max_rounds):
        failure = probe(current)
        if failure is None:
            return current
        cands = candidates(failure, current) if candidates else ()
        culprits = find_culprits(current, probe, failure, cands)
        if not culprits:  # nothing pruned, or no subset fails: not the plan's doing
            raise SecateursError(f"the safety net's check fails without any pruned group to "
                                 f"blame ({failure.text()}); please report this model")
        for gid, f, alone in culprits:
            what = f"group {gid}" if describe is None else describe(gid)
            how = "" if alone else ", in combination with other pruned groups"
            if f.check == "exact":
                text = f"{what}{how}: {f.message} — not mask-equivalent"
            else:
                text = f"{what}{how}: {f.text()}"
            pinned[gid] = Repair(gid, f.check, f.node, text)
        current = reselect(set(pinned))
    raise SecateursError(f"the safety net could not repair the plan in {max_rounds} rounds "
                         f"(last failure: {failure.text()}); please report this model")


# --------------------------------------------------------------------------------------------
# batch sizes
# --------------------------------------------------------------------------------------------


def batch_of(args: Sequence[Any]) -> int | None:
    """The batch size of the example inputs: dim 0 of the first tensor input (None if the
    first tensor input is a scalar or there is none)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return int(a.shape[0]) if a.dim() else None
    return None


def second_batch(batch: int) -> int:
    """The other batch size the net tries: 2 for batch 1 (size-1 dims broadcast, so batch 1
    hides batch sizes baked into constants), else ``batch + 1``."""
    return batch + 1


def with_batch(args: Sequence[Any], old: int, new: int) -> tuple[Any, ...]:
    """Empty stand-ins of ``args`` with dim 0 ``old`` replaced by ``new`` (same dtype)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == old:
            out.append(torch.zeros((new, *a.shape[1:]), dtype=a.dtype, device=a.device))
        else:
            out.append(a)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# FX: trials on the traced GraphModule
# --------------------------------------------------------------------------------------------


class TrialBroken(SecateursError):
    """A trial could not restore the model it ran on (an internal error, never a result)."""


class Trial:
    """Apply a plan to ``gm`` for the duration of a ``with`` block, then restore ``gm``
    exactly: module attributes and tensor slots, node targets and arguments. With
    ``meta=True`` every tensor is first swapped for a ``meta`` stand-in (slicing then costs
    nothing). ``gm.recompile`` is suppressed: trials run the graph with an interpreter,
    which reads the nodes, not the generated code. ``zero=`` instead of a plan zeroes the
    plan's removed slices (on copies) and changes nothing else."""

    def __init__(self, gm: torch.fx.GraphModule, plan: Plan | None = None, *,
                 meta: bool = False, zero: Plan | None = None,
                 modules: list[nn.Module] | None = None,
                 stand_ins: dict[int, torch.Tensor] | None = None) -> None:
        self.gm, self.plan, self.meta, self.zero = gm, plan, meta, zero
        self.modules = modules if modules is not None else list(gm.modules())
        # meta stand-ins by id of the real tensor: reusable across trials of one module,
        # since every trial restores the real tensors
        self.stand_ins = stand_ins if stand_ins is not None else {}

    def __enter__(self) -> torch.fx.GraphModule:
        gm = self.gm
        self._mods = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers))
                      for m in self.modules]
        self._nodes = [(n, n.target, n.args, n.kwargs) for n in gm.graph.nodes]
        try:
            gm.__dict__["recompile"] = lambda: None
            for m in self.modules:
                m.__dict__["training"] = False
            if self.meta:
                _swap_to_meta(gm, self.modules, self.stand_ins)
            if self.zero is not None:
                _zero_slices(gm, self.zero)
            if self.plan is not None:
                apply_plan_fx(gm, self.plan)
        except BaseException:
            self._restore()
            raise
        return gm

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for n, target, args, kwargs in self._nodes:
            if n.target is not target:
                n.target = target
            if n.args is not args:
                n.args = args
            if n.kwargs is not kwargs:
                n.kwargs = kwargs
        for m, state, params, buffers in self._mods:
            m.__dict__.clear()
            m.__dict__.update(state)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        # nodes the apply added (a rewritten shape sum, a rewritten index constant) have no
        # readers left once the arguments are restored
        known = {n for n, *_ in self._nodes}
        for n in reversed(list(self.gm.graph.nodes)):
            if n not in known and not n.users:
                self.gm.graph.erase_node(n)
        if [n for n, *_ in self._nodes] != list(self.gm.graph.nodes):
            raise TrialBroken("internal error: applying a plan changed the graph's nodes, "
                                 "which a trial cannot undo; please report this model")


def _swap_to_meta(gm: torch.fx.GraphModule, modules: list[nn.Module],
                  stand_in: dict[int, torch.Tensor]) -> None:
    def meta_of(t: torch.Tensor) -> torch.Tensor:
        new = stand_in.get(id(t))
        if new is None:
            new = t if t.is_meta else torch.empty_like(t, device="meta")
            if isinstance(t, nn.Parameter) and not isinstance(new, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            stand_in[id(t)] = new
        return new

    for mod in modules:
        for slots in (mod._parameters, mod._buffers):
            for attr, t in slots.items():
                if t is not None:
                    slots[attr] = meta_of(t)
    for n in gm.graph.nodes:  # tensor constants kept as plain attributes (FX constants)
        if n.op != "get_attr":
            continue
        owner_name, _, attr = str(n.target).rpartition(".")
        try:
            owner = gm.get_submodule(owner_name)
        except AttributeError:
            continue
        value = owner.__dict__.get(attr)
        if isinstance(value, torch.Tensor):
            owner.__dict__[attr] = meta_of(value)


def _zero_slices(gm: torch.fx.GraphModule, plan: Plan) -> None:
    named = dict(gm.named_parameters(remove_duplicate=False))
    named.update(gm.named_buffers(remove_duplicate=False))
    refs: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for slots, attr, t in tensor_slots(gm):
        refs.setdefault(id(t), []).append((slots, attr))
    with torch.no_grad():
        for name, dims in plan.removed.items():
            t = named[name]
            new = t.detach().clone()
            for d, idx in dims.items():
                new.index_fill_(d, torch.as_tensor(idx, dtype=torch.long, device=t.device), 0)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            for slots, attr in refs.get(id(t), []):
                slots[attr] = new


class _NodeError(Exception):
    def __init__(self, node: torch.fx.Node, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.node, self.exc = node, exc


def _module_fits(mod: nn.Module) -> bool:
    """The module's own tensors agree with its attributes (the shape formulas read the
    attributes; a mismatch must run the op, which reports it)."""
    w = getattr(mod, "weight", None)
    if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
        b = mod.bias
        return b is None or (w is not None and tuple(b.shape) == (w.shape[0],))
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        return all(t is None or t.numel() == mod.num_features
                   for t in (w, mod.bias, mod.running_mean, mod.running_var))
    if isinstance(mod, nn.GroupNorm):
        return mod.num_channels % mod.num_groups == 0 and all(
            t is None or t.numel() == mod.num_channels for t in (w, mod.bias))
    if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
        shape = tuple(mod.normalized_shape)
        return all(t is None or tuple(t.shape) == shape
                   for t in (w, getattr(mod, "bias", None)))
    return True


_KEEP_STRIDES = frozenset({"contiguous", "clone"})


class _Runner(torch.fx.Interpreter):
    """Interprets the graph, naming the node that fails; on ``meta`` the shape formulas of
    the frontend stand in for the ops they know (``fast``)."""

    def __init__(self, gm: torch.fx.GraphModule, fast: bool,
                 expect: Mapping[str, tuple[int, ...]] | None = None) -> None:
        super().__init__(gm)
        self.fast = fast
        self.expect = expect or {}

    def run_node(self, n: torch.fx.Node) -> Any:
        from secateurs.graph.fx_lower import _module_lowering
        from secateurs.graph.fx_shapes import _fast_shape, _torch_forward

        try:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = None
            if self.fast and n.op in ("call_function", "call_method"):
                key = from_fx.call_key(n)
                # an alias keeps its input's strides: contiguous/clone must really run, or a
                # later view of a permuted tensor fails on meta where the model does not
                if key not in _KEEP_STRIDES:
                    out = _fast_shape(key, args, kwargs)
            elif self.fast and n.op == "call_module" and args:
                mod = self.fetch_attr(str(n.target))
                if _torch_forward(mod) and _module_fits(mod):
                    out = _fast_shape(_module_lowering(mod, args[0])[0], args, kwargs, mod)
            if out is None:
                out = getattr(self, n.op)(n.target, args, kwargs)
            want = self.expect.get(n.name)
            if want is not None and isinstance(out, torch.Tensor) and tuple(out.shape) != want:
                # a size the pruned program computes at run time (kept, rewritten or
                # inferred) that is not the plan's: a wrong view, even where it still runs
                raise RuntimeError(f"the pruned program makes shape {tuple(out.shape)} where "
                                   f"the plan has {want}")
            return out
        except _NodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - any op failure is the trial's result
            raise _NodeError(n, exc) from exc


def _where(n: torch.fx.Node) -> str:
    """"`blocks.0.attn` unbind": the module the node runs in and its op."""
    op = from_fx.call_key(n) if n.op in ("call_function", "call_method") else n.op
    if n.op == "call_module":
        return f"`{n.target}` ({n.name})"
    stack = n.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    if not isinstance(path, str):
        path = ""
    return f"`{path}` {op} ({n.name})" if path else f"`{n.name}` ({op})"


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 240 else text[:237] + "..."


def _cannot_run(exc: BaseException) -> Failure:
    return Failure("", f"removing it makes the model fail: {_first_line(exc)}", "exact")


def _numeric(net: Any, ok: bool, diff: float) -> Failure | None:
    """The numeric check's verdict for a net (``FxNet`` / ``OnnxNet``): record the last
    passing diff, or the failure with it."""
    if ok:
        net.last_diff = diff
        return None
    return Failure("", f"removing it changes outputs (max abs diff {diff:.3g})", "exact")


def conclude(report: Any, verify: bool, ok: bool, diff: float, logger: logging.Logger,
             who: str, check: str = "mask-equivalence check") -> None:
    """Shared end of ``prune`` / ``prune_onnx``: warn about every group the safety net
    pinned, and refuse (``verify=True``) a result that is still not mask-equivalent."""
    if report.repairs:
        logger.warning("%s: the safety net pinned %d group(s) (a missing or wrong channel rule "
                    "each; please report this model): %s", who, len(report.repairs),
                    "; ".join(r.reason for r in report.repairs))
    if verify and not ok:
        raise SecateursError(f"{check} failed (max |diff| {diff:.3g}) even after the safety "
                             "net's repairs: the pruned model differs from the original with "
                             "the removed slices zeroed. Please report this model.")


def _flat_nodes(arg: Any) -> list[Any]:
    out: list[Any] = []
    torch.fx.node.map_aggregate(arg, out.append)
    return out


@dataclass
class FxNet:
    """The net for a traced GraphModule: probes for ``repair`` (``runs``, ``exact``) and the
    notes on what could not be checked.

    ``gm`` is the traced, unpruned module (every trial restores it); ``original`` the
    caller's model (the reference for ``exact``); ``args`` the example inputs."""

    gm: torch.fx.GraphModule
    analysis: Analysis | None
    args: tuple[Any, ...]
    plan_meta: dict[str, Any] = field(default_factory=dict)
    rtol: float = 1e-4
    atol: float = 1e-5
    exclude_exact: frozenset[int] = frozenset()  # groups the numeric check leaves out (lossy)
    notes: list[str] = field(default_factory=list)
    _modes: dict[int, str | None] = field(default_factory=dict)  # batch -> meta | fake | None
    _expected: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    trials: int = 0
    _last_plan: tuple[Any, Plan] | None = None
    _module_list: list[nn.Module] = field(default_factory=list)
    _stand_ins: dict[int, torch.Tensor] = field(default_factory=dict)

    def _modules(self) -> list[nn.Module]:
        if not self._module_list:
            self._module_list = list(self.gm.modules())
        return self._module_list
    last_diff: float = 0.0  # max abs diff of the last passing ``exact`` trial

    def plan(self, removed: Selection) -> Plan:
        """The plan of a selection (the last one is cached: the net's final probe and the
        prune's own plan stage build the same plan)."""
        assert self.analysis is not None
        key = tuple((g, np.asarray(u).tobytes()) for g, u in sorted(removed.items()))
        if self._last_plan is None or self._last_plan[0] != key:
            self._last_plan = (key, build_plan(self.analysis, dict(removed), self.plan_meta))
        return self._last_plan[1]

    # ---- runs

    def batches(self) -> list[tuple[int | None, tuple[Any, ...]]]:
        b = batch_of(self.args)
        out: list[tuple[int | None, tuple[Any, ...]]] = [(b, self.args)]
        if b is not None:
            b2 = second_batch(b)
            out.append((b2, with_batch(self.args, b, b2)))
        return out

    def _run_shapes(self, plan: Plan | None, shapes: Sequence[tuple[Any, ...]],
                    mode: str) -> list[Failure | None]:
        """Apply ``plan`` once (a trial) and run the graph at each of ``shapes``."""
        self.trials += 1
        out: list[Failure | None] = []
        try:
            with Trial(self.gm, plan, meta=mode in _META_MODES, modules=self._modules(),
                       stand_ins=self._stand_ins) as gm, torch.no_grad():
                expect = {name: tuple(int(v) for v in consts["shape"])
                          for name, consts in (plan.constants if plan else {}).items()
                          if "shape" in consts}
                for args in shapes:
                    out.append(self._run_once(gm, args, mode, expect))
                    if out[-1] is not None:  # a failing trial need not try more shapes
                        break
            out += [None] * (len(shapes) - len(out))
        except TrialBroken:
            raise
        except Exception as exc:  # noqa: BLE001 - the apply itself failed on this plan
            return [Failure("apply", _first_line(exc))] * len(shapes)
        return out

    def _run_once(self, gm: torch.fx.GraphModule, args: tuple[Any, ...], mode: str,
                  expect: Mapping[str, tuple[int, ...]] | None = None) -> Failure | None:
        # the plan's shapes hold at the example inputs only
        expect = expect if args is self.args else None
        try:
            if mode in _META_MODES:
                meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a
                                  for a in args)
                # "device": tensors the forward creates itself (torch.arange(n)) on meta too;
                # not the default, since the device mode intercepts every torch call
                with torch.device("meta") if mode == "device" else contextlib.nullcontext():
                    result = _Runner(gm, fast=True, expect=expect).run(*meta_args)
            else:
                from torch._subclasses.fake_tensor import FakeTensorMode

                with FakeTensorMode(allow_non_fake_inputs=True) as fm:
                    fake = tuple(fm.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                 for a in args)
                    result = _Runner(gm, fast=False, expect=expect).run(*fake)
        except _NodeError as err:
            return Failure(_where(err.node), _first_line(err.exc), node_name=err.node.name)
        return self._check_outputs(result) if args is self.args else None

    def _check_outputs(self, out: Any) -> Failure | None:
        """At the example shapes the outputs keep the original's shapes (graph outputs are
        pinned; a change means a rule let a removal reach them)."""
        outputs = [n for n in self.gm.graph.nodes if n.op == "output"]
        if not outputs:
            return None
        want = [from_fx._node_shape(n) if isinstance(n, torch.fx.Node) else None
                for n in _flat_nodes(outputs[0].args[0])]
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else None
               for t in _flat_nodes(out)]
        if len(want) != len(got):
            return None
        for i, (w, g) in enumerate(zip(want, got)):
            if isinstance(w, tuple) and g is not None and w != g:
                return Failure("the graph output", f"output {i} has shape {list(g)}, the "
                               f"original's is {list(w)}")
        return None

    def runs(self, removed: Selection) -> Failure | None:
        """Probe: the plan of ``removed`` runs at the example shapes and a second batch
        (one trial per mode; meta for both, normally)."""
        return self.plan_runs(self.plan(removed))

    def plan_runs(self, plan: Plan) -> Failure | None:
        """``runs`` for a given plan (a saved one: ``apply_plan`` checks it this way)."""
        shapes = [(-1 if b is None else b, b, args) for b, args in self.batches()]
        modes = {key: self._modes.get(key, "meta") for key, _, _ in shapes}
        results: dict[int, Failure | None] = {}
        for mode in _MODES:
            todo = [(key, args) for key, _, args in shapes if modes[key] == mode]
            if todo:
                found = self._run_shapes(plan, [a for _, a in todo], mode)
                results.update(zip([k for k, _ in todo], found))
        for key, b, args in shapes:
            f = results.get(key)
            if f is None:
                continue
            if key in self._modes:
                return f
            mode = self._settle_mode(key, b, args)
            if mode is None:
                continue
            if mode != modes[key]:
                f = self._run_shapes(plan, [args], mode)[0]
            if f is not None:
                return f
        return None

    def _settle_mode(self, key: int, b: int | None, args: tuple[Any, ...]) -> str | None:
        """After the pruned model failed at this shape: the mode in which the original runs
        there (meta, meta with the forward's own tensors on meta, else fake tensors), or None
        (the shape is not checkable; noted)."""
        f0 = None
        for m in _MODES:
            f0 = self._run_shapes(None, [args], m)[0]
            if f0 is None:
                self._modes[key] = m
                return m
        self._modes[key] = None
        what = "the example shapes" if args is self.args else f"batch size {b}"
        self.notes.append(f"not checked at {what}: the original model does not run there "
                          f"either ({f0.text() if f0 else ''})")
        return None

    def candidates(self, failure: Failure, removed: Selection) -> list[int]:
        """Pruned groups with a removed unit in the values around the failing node."""
        name = failure.node_name
        if not name or self.analysis is None:
            return []
        values = _node_values(self.analysis, name)
        fx_node = next((n for n in self.gm.graph.nodes if n.name == name), None)
        if fx_node is not None:
            values |= {a.name for a in fx_node.all_input_nodes}
            if fx_node.op == "call_module":
                prefix = str(fx_node.target) + "."
                values |= {v for p, v in self.analysis.param_values.items()
                           if p.startswith(prefix)}
        groups = self._groups_of(values)
        return sorted(g for g in groups if g in removed)

    def _groups_of(self, values: Iterable[str]) -> set[int]:
        assert self.analysis is not None
        return _groups_of(self.analysis, values)

    # ---- exact

    def exact(self, removed: Selection) -> Failure | None:
        """Probe: the plan of ``removed`` (less ``exclude_exact``) is mask-equivalent at the
        example inputs."""
        sel = {g: u for g, u in removed.items() if g not in self.exclude_exact}
        if not sel:
            return None
        plan = self.plan(sel)
        self.trials += 1
        try:
            with Trial(self.gm, zero=plan) as gm, torch.no_grad():
                expected = _flat_tensors(torch.fx.Interpreter(gm).run(*self.args))
            with Trial(self.gm, plan) as gm, torch.no_grad():
                got = _flat_tensors(torch.fx.Interpreter(gm).run(*self.args))
        except TrialBroken:
            raise
        except Exception as exc:  # noqa: BLE001 - a trial that cannot run is a failure
            return _cannot_run(exc)
        ok, diff = compare_outputs(expected, got, self.rtol, self.atol)
        return _numeric(self, ok, diff)

    def both(self, removed: Selection) -> Failure | None:
        return self.runs(removed) or self.exact(removed)


def _groups_of(analysis: Analysis, values: Iterable[str]) -> set[int]:
    """Ids of the groups with an atom in the labels of ``values``."""
    res = analysis.resolution
    atom_group = np.full(len(res.is_atom), -1, dtype=np.int64)
    for g in analysis.groups:
        atom_group[g.atoms] = g.id
    out: set[int] = set()
    for v in values:
        for vec in analysis.labels.get(v, ()):
            atoms = res.atoms_of(np.asarray(vec, dtype=np.int64))
            ids = atom_group[atoms[atoms >= 0]]
            out.update(int(i) for i in np.unique(ids) if i >= 0)
    return out


def _node_values(analysis: Analysis, name: str) -> set[str]:
    nodes = [n for n in analysis.graph.nodes if n.name == name or n.name.startswith(name + "__")]
    return {v for n in nodes for v in [*n.inputs, *n.outputs] if v is not None}


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in _flat_nodes(out) if isinstance(t, torch.Tensor)]


def compare_outputs(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor],
                    rtol: float, atol: float) -> tuple[bool, float]:
    """``allclose`` over paired outputs (equal for non-float ones; NaN equal to NaN at the same
    positions, and a NaN on one side only a difference of inf); the max abs diff. ``atol``
    is per unit of the output's scale (its largest finite magnitude, at least 1): float32
    round-off grows with the values summed, so an image model's 0-255 output differs from
    itself by ~1e-3 between kernel paths, where a wrong plan differs by far more."""
    if len(expected) != len(got):
        return False, float("inf")
    worst, ok = 0.0, True
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            return False, float("inf")
        if e.is_floating_point():  # NaN where both are NaN counts as equal
            nan = torch.isnan(e)
            if not torch.equal(nan, torch.isnan(g)):
                return False, float("inf")
            diff = (e - g).abs()[~nan]
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
            finite = e[torch.isfinite(e)]
            scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
            ok &= bool(torch.allclose(e, g, rtol=rtol, atol=atol * scale, equal_nan=True))
        else:
            ok &= bool(torch.equal(e, g))
    return ok, worst


# --------------------------------------------------------------------------------------------
# ONNX: trials by apply (strict shape inference, checker) and ONNX Runtime
# --------------------------------------------------------------------------------------------

_ORT_NODE = re.compile(r"node\. Name:'([^']*)'")
_INFER_NODE = re.compile(r"node name: ([^)]*)\)")


def _onnx_node(message: str) -> str:
    m = _ORT_NODE.search(message) or _INFER_NODE.search(message)
    return m.group(1).strip() if m else ""


@dataclass
class OnnxNet:
    """The net for an ONNX model. ``apply(model, plan)`` is the frontend's apply (it runs
    strict shape inference and the checker), ``run(model, feeds)`` an ONNX Runtime session,
    ``verify(original, pruned, plan, feeds)`` the contract; ``dynamic_batch`` says whether
    the original declares a free batch dim (only then is a second batch tried).

    Each trial: the apply (strict shape inference at the example shapes), strict shape
    inference at the second batch, and, with ``use_ort``, ONNX Runtime at both batches
    (shape inference does not check a Reshape's element count; the runtime does, at the
    cost of a real forward, so the caller enables it for small models and under verify)."""

    model: Any
    analysis: Analysis
    feeds: dict[str, np.ndarray]
    apply: Callable[[Any, Plan], Any]
    run: Callable[[Any, Mapping[str, np.ndarray]], Any]
    verify: Callable[..., tuple[bool, float]]
    plan_meta: dict[str, Any] = field(default_factory=dict)
    dynamic_batch: bool = False
    use_ort: bool = True
    exclude_exact: frozenset[int] = frozenset()
    notes: list[str] = field(default_factory=list)
    trials: int = 0
    last_diff: float = 0.0
    _last: tuple[Any, Plan, Any] | None = None
    _original: dict[int, bool] = field(default_factory=dict)  # batch -> original runs

    def plan(self, removed: Selection) -> Plan:
        key = tuple((g, np.asarray(u).tobytes()) for g, u in sorted(removed.items()))
        if self._last is None or self._last[0] != key:
            plan = build_plan(self.analysis, dict(removed), self.plan_meta)
            self._last = (key, plan, None)
        return self._last[1]

    def applied(self, removed: Selection) -> tuple[Plan, Any]:
        """The plan of ``removed`` and the pruned model (the last one is cached)."""
        plan = self.plan(removed)
        assert self._last is not None
        if self._last[2] is None:
            self._last = (self._last[0], plan, self.apply(self.model, plan))
        return plan, self._last[2]

    def _second_feeds(self) -> tuple[int, dict[str, np.ndarray]] | None:
        b = batch_of([torch.from_numpy(np.asarray(v)) for v in self.feeds.values()])
        if not self.dynamic_batch or b is None:
            return None
        b2 = second_batch(b)
        return b2, {k: np.concatenate([v] * b2)[:b2] if v.ndim and v.shape[0] == b else v
                    for k, v in self.feeds.items()}

    def runs(self, removed: Selection) -> Failure | None:
        self.trials += 1
        try:
            _, pruned = self.applied(removed)
        except Exception as exc:  # noqa: BLE001 - the pruned model does not check
            return Failure(f"`{_onnx_node(str(exc))}`" if _onnx_node(str(exc)) else "apply",
                           _first_line(exc), node_name=_onnx_node(str(exc)))
        shapes: list[tuple[int, Mapping[str, np.ndarray]]] = [(-1, self.feeds)]
        second = self._second_feeds()
        if second is not None:
            shapes.append(second)
        if second is not None:
            f = self._infer_at(pruned, second[0])
            if f is not None and self._original_checks_at(second[0]):
                return f
        for b, feeds in shapes if self.use_ort else ():
            try:
                self.run(pruned, feeds)
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime refused the pruned model
                if not self._original_runs_at(b, feeds):
                    continue
                node = _onnx_node(str(exc))
                return Failure(f"`{node}`" if node else "run", _first_line(exc),
                               node_name=node)
        return None

    def _infer_at(self, model: Any, b: int) -> Failure | None:
        """Strict shape inference with the batch dim of every input set to ``b``."""
        import onnx

        from secateurs.graph.from_onnx import skeleton

        sk = skeleton(model)
        del sk.graph.value_info[:]
        for o in sk.graph.output:
            o.type.tensor_type.ClearField("shape")
        for i in sk.graph.input:
            if i.name in self.feeds and len(i.type.tensor_type.shape.dim):
                i.type.tensor_type.shape.dim[0].dim_value = b
        try:
            onnx.shape_inference.infer_shapes(sk, check_type=True, strict_mode=True,
                                              data_prop=True)
        except Exception as exc:  # noqa: BLE001 - inference raises several types
            node = _onnx_node(str(exc))
            return Failure(f"`{node}`" if node else f"batch size {b}", _first_line(exc),
                           node_name=node)
        return None

    def _original_checks_at(self, b: int) -> bool:
        key = -1000 - b
        if key not in self._original:
            f = self._infer_at(self.model, b)
            self._original[key] = f is None
            if f is not None:
                self.notes.append(f"not checked at batch size {b}: the original model's "
                                  f"shapes do not infer there either ({f.message})")
        return self._original[key]

    def _original_runs_at(self, b: int, feeds: Mapping[str, np.ndarray]) -> bool:
        """Whether ONNX Runtime runs the original there (once per batch; noted if not: a
        custom-domain op, a batch size fixed in the graph)."""
        if b not in self._original:
            try:
                self.run(self.model, feeds)
                self._original[b] = True
            except Exception as exc:  # noqa: BLE001 - the original cannot run there
                self._original[b] = False
                what = "the example shapes" if b < 0 else f"batch size {b}"
                self.notes.append(f"not run under ONNX Runtime at {what}: the original model "
                                  f"does not run there either ({_first_line(exc)})")
        return self._original[b]

    def candidates(self, failure: Failure, removed: Selection) -> list[int]:
        if not failure.node_name:
            return []
        groups = _groups_of(self.analysis, _node_values(self.analysis, failure.node_name))
        return sorted(g for g in groups if g in removed)

    def exact(self, removed: Selection) -> Failure | None:
        sel = {g: u for g, u in removed.items() if g not in self.exclude_exact}
        if not sel:
            return None
        self.trials += 1
        plan = build_plan(self.analysis, sel, self.plan_meta)
        try:
            ok, diff = self.verify(self.model, self.apply(self.model, plan), plan, self.feeds)
        except Exception as exc:  # noqa: BLE001 - a trial that cannot run is a failure
            return _cannot_run(exc)
        return _numeric(self, ok, diff)

    def both(self, removed: Selection) -> Failure | None:
        return self.runs(removed) or self.exact(removed)
