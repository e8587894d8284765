"""The safety net on the Hugging Face path (``secateurs.passes.repair`` with an HF probe).

``prune_hf`` applies its plan to the original ``PreTrainedModel``, not to a traced graph, so
the probe here is: apply the plan of a selection to a ``meta`` copy of the model
(``apply_hf_plan``: slicing and attribute refresh cost nothing on meta), run the copy's own
forward shape-only at the example shapes and at a second batch size (``repair.second_batch``),
and report where it fails (the innermost module whose forward raised). ``repair.repair``
bisects a failing selection down to the groups that cause it, pins them with that reason and
re-selects; ``prune_hf`` then applies a plan known to run.

Shapes the *original* cannot run on meta (data-dependent control flow) are skipped with a
note; when plain meta inputs are not enough, the tensors the forward creates itself go on
meta too (``torch.device("meta")``), then the inputs become FakeTensors (transformers skips
its value checks under tracing). MoE experts run their ``batched_mm`` implementation in
the copy (same shapes; the eager loop over routed experts reads values)."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.hf.apply import apply_hf_plan
from secateurs.hf.classify import HFAnalysis
from secateurs.passes.plan import Plan
from secateurs.passes.repair import Failure, batch_of, second_batch, with_batch

__all__ = ["HFNet", "meta_copy", "describe_group"]

Selection = Mapping[int, np.ndarray]
_MODES = ("fake", "meta", "device")  # the first that the original runs in; see HFNet._run


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are ``meta`` stand-ins (no values)."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        stand_in = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(stand_in, requires_grad=t.requires_grad) \
            if isinstance(t, nn.Parameter) else stand_in
    for mod in model.modules():  # tensors held as plain attributes (rotary caches)
        for v in vars(mod).values():
            if isinstance(v, torch.Tensor) and id(v) not in memo:
                memo[id(v)] = torch.empty_like(v, device="meta")
    out = copy.deepcopy(model, memo)
    cfg = getattr(out, "config", None)
    if getattr(cfg, "_experts_implementation", None) not in (None, "batched_mm"):
        cfg._experts_implementation = "batched_mm"
    return out


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules whose forward is running (innermost last); a module whose
    forward raised stays on the stack."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []

    def pre(mod: nn.Module, _args: Any) -> None:
        if id(mod) in names:
            stack.append(names[id(mod)])

    def post(mod: nn.Module, _args: Any, _out: Any) -> None:
        if id(mod) in names and stack and stack[-1] == names[id(mod)]:
            stack.pop()

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        yield stack
    finally:
        h1.remove()
        h2.remove()


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """FakeTensorMode logs every failing op with a traceback; the failure is our finding."""
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(level)


def describe_group(hfa: HFAnalysis) -> Callable[[int], str]:
    def describe(gid: int) -> str:
        g = hfa.analysis.groups[gid]
        u = hfa.units.get(gid)
        kind = f"{u.kind} " if u is not None else ""
        mem = ", ".join(f"{m.param}[{m.dim}]" for m in g.members[:2])
        more = f" +{len(g.members) - 2}" if len(g.members) > 2 else ""
        return f"{kind}group {gid} ({mem}{more})"
    return describe


class HFNet:
    """Probes for ``repair.repair`` on an HF model: ``runs(selection)``; ``candidates`` (the
    groups with a tensor in the failing module) are tried first by the bisection."""

    def __init__(self, model: nn.Module, hfa: HFAnalysis, args: tuple[Any, ...],
                 plan_of: Callable[[Selection], Plan]) -> None:
        self.base = meta_copy(model)
        self.hfa = hfa
        self.args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        self.plan_of = plan_of
        self.notes: list[str] = []
        self.trials = 0
        self._modes: dict[int, str | None] = {}  # shape -> mode the original runs in

    def shapes(self) -> list[tuple[Any, ...]]:
        b = batch_of(self.args)
        out = [self.args]
        if b is not None:
            out.append(with_batch(self.args, b, second_batch(b)))
        return [tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in s)
                for s in out]

    def _run(self, model: nn.Module, args: tuple[Any, ...], mode: str) -> Failure | None:
        """One forward, shape-only: ``meta`` (meta inputs), ``device`` (and the tensors the
        forward creates on meta), ``fake`` (inputs as FakeTensors: transformers then skips
        its value checks — packed-sequence and mask shortcuts — as it does when tracing)."""
        with _module_stack(model) as stack:
            try:
                with torch.no_grad():
                    if mode == "fake":
                        from torch._subclasses.fake_tensor import FakeTensorMode

                        with _quiet("torch._subclasses.fake_tensor"), \
                                FakeTensorMode(allow_non_fake_inputs=True) as fm:
                            model(*(fm.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                    for a in args))
                    else:
                        with torch.device("meta") if mode == "device" else \
                                contextlib.nullcontext():
                            model(*args)
            except Exception as exc:  # noqa: BLE001 - the failure is the finding
                where = stack[-1] if stack else ""
                mod = model.get_submodule(where) if where else model
                return Failure(f"`{where or type(model).__name__}` ({type(mod).__name__})",
                               _first_line(exc), node_name=where)
        return None

    def _mode(self, i: int, args: tuple[Any, ...]) -> str | None:
        if i not in self._modes:
            f0 = None
            for mode in _MODES:
                f0 = self._run(self.base, args, mode)
                if f0 is None:
                    self._modes[i] = mode
                    break
            else:
                self._modes[i] = None
                what = "the example shapes" if i == 0 else "the second batch size"
                self.notes.append(f"not checked on meta at {what}: the original model does "
                                  f"not run there either ({f0.text() if f0 else ''})")
        return self._modes[i]

    def runs(self, removed: Selection) -> Failure | None:
        """Probe: the plan of ``removed`` applies to a meta copy, which then runs at the
        example shapes and a second batch size."""
        self.trials += 1
        work = copy.deepcopy(self.base)
        try:
            apply_hf_plan(work, self.plan_of(removed))
        except Exception as exc:  # noqa: BLE001 - the apply itself failed on this plan
            return Failure("apply", _first_line(exc))
        work.eval()
        for i, args in enumerate(self.shapes()):
            # the pruned copy first, in the mode known to work (or the first); the original
            # is run only when the pruned copy fails, to tell a mode it cannot run in from
            # a finding
            f = self._run(work, args, self._modes.get(i) or _MODES[0])
            if f is None:
                continue
            if i not in self._modes:
                mode = self._mode(i, args)
                if mode is None:
                    continue
                if mode != _MODES[0]:
                    f = self._run(work, args, mode)
            elif self._modes[i] is None:
                continue
            if f is not None:
                return f
        return None

    def candidates(self, failure: Failure, removed: Selection) -> Sequence[int]:
        """Pruned groups with a tensor in the failing module."""
        where = failure.node_name
        if not where:
            return []
        prefix = where + "."
        return sorted(g for g in removed
                      if any(m.param.startswith(prefix)
                             for m in self.hfa.analysis.groups[g].members))
