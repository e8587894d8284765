"""``torch.compile(model, backend="secateurs")``: prune inside the compiler.

Under dynamo the module's parameters and buffers arrive as *graph inputs* (placeholders whose
source is ``L['self']._modules[...]._parameters['weight']``). For an inference graph the backend

1. **freezes** them: each weight placeholder becomes a constant attribute of the graph; every
   call checks that the tensors dynamo passes are still the frozen ones, unchanged (identity
   and ``_version``), and recompiles the graph on the current weights when one is not (an
   optimizer step, ``load_state_dict``, a reassigned parameter), with a warning;
2. **removes dead channel groups**: units of exact groups whose producing slices (parameters
   and buffers) are all zero, kept only when the pruned graph reproduces the original on the
   call's inputs and on random ones (an op between producer and reader may map 0 to
   something else: ``sigmoid(0) = 0.5``; ``verify=False`` therefore removes none), or, with
   the explicit opt-in ``prune=ratio``, the least important ``ratio`` of every exact group
   (lossy in general);
3. swaps 2:4-sparse ``linear`` weights for semi-structured sparse tensors on CUDA
   (``torch.sparse.to_sparse_semi_structured``; fp16/bf16 only);
4. hands the graph to the downstream backend (``inductor`` by default) and returns a function
   with dynamo's calling convention (the frozen weight arguments are dropped).

**One answer for every input shape.** The plan depends on the weights only. The analysis runs
on the concrete sizes of the current call (dynamo's symbolic sizes are never read as ints, which
would specialise them), so the batch and every other non-pruned dim stay as dynamic as dynamo
traced them: with ``dynamic=True`` one compile serves every batch size; by default the first
call compiles static and dynamo's automatic-dynamic recompile (second batch size) serves all
later ones. **One mask per model:** with ``prune``, the units removed from each of the
model's tensors are recorded (per ratio, weakly keyed on the tensor) and every later graph
that holds the tensor — the other side of a graph break, a recompile for other inputs or
kwargs — removes exactly those (a graph whose analysis cannot is an error naming the tensor),
so the compiled graphs together compute the dense model with one set of slices zeroed. A
graph from which ``prune`` removes nothing warns (``DenseFallbackWarning``).

**Never silently dense.** If the analysis fails with ``prune`` set, compilation raises
(without ``prune`` it compiles unpruned, which is the same function). Past dynamo's
``recompile_limit`` dynamo would run the original (dense) code; with ``prune`` the backend sets
``torch._dynamo.config.fail_on_recompile_limit_hit`` so that call raises instead
(set once a pruned frame reaches its last allowed compile: the flag is process-wide;
``on_recompile_limit="warn"``: a ``DenseFallbackWarning`` at the last allowed compile).

**Gradients and state.** A graph that needs gradients (grad mode on and a weight or input
requiring grad, i.e. called outside ``torch.no_grad()``/``inference_mode``) or that writes the
model's tensors (BatchNorm in train mode updating its running statistics, even under
``no_grad``) is compiled untouched: weights stay graph inputs, train and update. With
``prune`` that is an error (raised at compile), because a frozen, pruned graph cannot train
and a dense one would give another answer.

Options: ``torch.compile(m, backend="secateurs", options={"prune": 0.3, "backend": "eager",
"sparse": True, "verify": True, "on_recompile_limit": "raise"})``; ``torch.compile(...,
mode="max-autotune-no-cudagraphs")`` is passed to the inductor downstream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from secateurs.errors import InputError
from secateurs.graph.fx_apply import apply_plan_fx
from secateurs.graph.fx_lower import lower_graph_module
from secateurs.graph.fx_shapes import propagate_shapes
from secateurs.passes.group_channels import Analysis, group_channels
from secateurs.passes.plan import build_plan

__all__ = ["secateurs_backend", "BackendOptions", "LAST_COMPILE", "dead_units", "freeze_weights",
           "DenseFallbackWarning", "compile_count"]

log = logging.getLogger(__name__)


@dataclass
class BackendOptions:
    prune: float | None = None
    backend: str | Callable[..., Any] = "inductor"
    sparse: bool = True
    verify: bool = True
    min_numel_sparse: int = 4096
    on_recompile_limit: str = "raise"
    mode: str | None = None  # torch.compile(mode=...): handed to the inductor downstream

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown secateurs backend options {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        out = cls(**options)
        if out.prune is not None and (isinstance(out.prune, bool)
                                      or not isinstance(out.prune, (int, float))
                                      or not 0.0 <= out.prune < 1.0):
            raise InputError(f"options['prune'] must be a number in [0, 1), got {out.prune!r}")
        if out.mode not in (None, "default") and out.backend != "inductor":
            raise InputError(f"torch.compile(mode={out.mode!r}) configures the inductor "
                             f"downstream; options['backend'] is {out.backend!r}")
        if out.on_recompile_limit not in ("raise", "warn"):
            raise InputError("options['on_recompile_limit'] must be 'raise' or 'warn', got "
                             f"{out.on_recompile_limit!r}")
        return out


@dataclass
class CompileRecord:
    """What the last compile did (for tests and debugging)."""

    graph: torch.fx.GraphModule | None = None
    removed_units: int = 0
    removed: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    sparse_linears: list[str] = field(default_factory=list)
    training: bool = False
    exact: bool | None = None
    compile_id: str = ""


class DenseFallbackWarning(RuntimeWarning):
    """dynamo is about to run (or would run) the original, unpruned model."""


LAST_COMPILE = CompileRecord()
_COMPILES = 0


def compile_count() -> int:
    """How many graphs this backend has compiled in this process (tests count recompiles)."""
    return _COMPILES


def _is_weight(node: torch.fx.Node, value: Any) -> bool:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", "") if source is not None else ""
    name = name() if callable(name) else str(name)
    if "_parameters[" in name or "_buffers[" in name:
        return True
    return isinstance(value, nn.Parameter)


def freeze_weights(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
                   ) -> tuple[torch.fx.GraphModule, list[int]]:
    """Turn weight placeholders into attributes; returns the new module and the positions of
    the inputs it still takes."""
    root = nn.Module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    graph = copy_graph(gm)
    new_placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    keep: list[int] = []
    originals: dict[str, torch.Tensor] = {}
    for i, (old, new, value) in enumerate(zip(placeholders, new_placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or not _is_weight(old, value):
            keep.append(i)
            continue
        attr = f"w{i}_{old.name}"[:120]
        originals[attr] = value
        if isinstance(value, nn.Parameter):
            root.register_parameter(attr, nn.Parameter(value.detach(), requires_grad=False))
        else:
            root.register_buffer(attr, value.detach())
        with graph.inserting_before(new):
            got = graph.get_attr(attr)
        new.replace_all_uses_with(got)
        graph.erase_node(new)
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    frozen = torch.fx.GraphModule(root, graph)
    frozen.meta["secateurs_originals"] = originals  # attribute -> the model's own tensor
    return frozen, keep


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph


def dead_units(analysis: Analysis, tensors: dict[str, torch.Tensor],
               parameters: set[str] | None = None) -> dict[int, np.ndarray]:
    """Candidate dead units of exact, unpinned groups: every member slice that can put a value
    into the channel is zero — parameters *and* buffers (a FrozenBatchNorm's scale and shift
    are buffers), and a member whose tensor is unknown keeps its units alive. Only the slices
    that *read* the channel are exempt (a linear/conv weight's input columns, a BatchNorm's
    statistics when its weight is there to be checked). Candidates, not a proof: an op between
    the producer and its readers may map 0 to something else (``sigmoid(0) = 0.5``), so the
    backend keeps a removal only when the pruned graph reproduces the original numerically.
    ``parameters`` is unused (kept for callers of the old signature)."""
    readers = _reader_members(analysis)
    out: dict[int, np.ndarray] = {}
    for g in analysis.groups:
        if g.is_lossy or g.is_pinned or g.size < 2:
            continue
        alive = np.zeros(g.size, dtype=bool)
        for m in g.members:
            if (m.param, m.dim) in readers:
                continue
            t = tensors.get(m.param)
            if t is None:
                alive[:] = True
                break
            t = t.detach()
            dims = [d for d in range(t.dim()) if d != m.dim]
            nonzero = (t != 0).any(dim=dims) if dims else (t != 0)
            alive |= np.bincount(m.units, weights=nonzero.cpu().numpy()[m.positions],
                                 minlength=g.size) > 0
        dead = np.nonzero(~alive & ~g.pinned)[0]
        if len(dead) and len(dead) < g.size:
            out[g.id] = dead
    return out


def _reader_members(analysis: Analysis) -> set[tuple[str, int]]:
    """``(param, dim)`` slices that only read a channel: whatever they hold, a zero channel
    contributes zero through them."""
    params = {v: p for p, v in analysis.param_values.items()}
    out: set[tuple[str, int]] = set()
    for node in analysis.graph.nodes:
        ins = [params.get(v) if v is not None else None for v in node.inputs]
        if node.op == "linear" and len(ins) > 1 and ins[1]:
            out.add((ins[1], 1))
        elif node.op == "conv" and len(ins) > 1 and ins[1]:
            out.add((ins[1], 0 if node.attrs.get("transposed") else 1))
        elif node.op == "batch_norm" and len(ins) > 4 and ins[1]:
            # weight present: a zero weight silences the statistics
            out.update((p, 0) for p in ins[3:5] if p)
    return out


def _swap_semi_structured(gm: torch.fx.GraphModule, opts: BackendOptions) -> list[str]:
    from secateurs.passes.sparsify import is_nm_sparse

    swapped = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "") != "linear":
            continue
        w = node.args[1] if len(node.args) > 1 else None
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
            continue
        t = getattr(gm, str(w.target))
        if not (t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)
                and t.numel() >= opts.min_numel_sparse and is_nm_sparse(t, 2, 4, axis=1)):
            continue
        from torch.sparse import to_sparse_semi_structured

        setattr(gm, str(w.target), nn.Parameter(to_sparse_semi_structured(t),
                                                requires_grad=False))
        swapped.append(str(w.target))
    return swapped


def _downstream(opts: BackendOptions) -> Callable[..., Any]:
    if callable(opts.backend):
        return opts.backend
    if opts.backend == "eager":
        return lambda gm, inputs: gm.forward
    if opts.backend == "inductor" and opts.mode not in (None, "default"):
        # what torch.compile(backend="inductor", mode=...) builds
        return torch._TorchCompileInductorWrapper(opts.mode, None, None)
    from torch._dynamo import lookup_backend

    return lookup_backend(opts.backend)


def secateurs_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                      options: dict[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """The dynamo backend (registered as ``secateurs`` via the torch_dynamo_backends entry
    point)."""
    global LAST_COMPILE, _COMPILES
    opts = BackendOptions.parse({**(options or {}), **kwargs})
    record = CompileRecord()
    LAST_COMPILE = record
    _COMPILES += 1
    downstream = _downstream(opts)
    record.compile_id = _guard_recompile_limit(opts)
    training = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    mutated = _mutated_weights(gm, example_inputs)
    if training or mutated:
        record.training = True
        why = ("this graph needs gradients (grad mode on and a weight or input that requires "
               "grad)" if training else f"this graph updates the model's tensors in place "
               f"({', '.join(mutated[:3])}: BatchNorm in train mode updates its running "
               "statistics)")
        if opts.prune:
            raise InputError(
                f"secateurs backend: options['prune'] removes channels from frozen weights; "
                f"{why}. Call model.eval() and run the compiled model under torch.no_grad() or "
                "torch.inference_mode(), or compile without 'prune'")
        log.warning("secateurs backend: %s; compiled unpruned (dead channel removal only runs "
                    "on inference graphs: eval mode, torch.no_grad() / inference_mode)", why)
        return downstream(gm, example_inputs)
    compiled, keep = _compile_frozen(gm, example_inputs, opts, record, downstream)
    return _Refreezing(gm, example_inputs, opts, downstream, compiled, keep)


class _Refreezing:
    """The compiled frozen graph, rebuilt when a weight it froze changed since: dynamo passes
    the model's own tensors at every call, and the frozen copies ignored them — after an
    optimizer step, a ``load_state_dict`` (an in-place copy) or a reassigned parameter, the
    compiled model silently answered with the old weights. Each call compares the tensors it
    gets with those frozen (identity and ``_version``: ~0.3 us a tensor, 90 us a call for ResNet-50's 320) and refreezes, with
    a fresh analysis, on a change."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 opts: BackendOptions, downstream: Callable[..., Any],
                 compiled: Callable[..., Any], keep: list[int]) -> None:
        self.gm, self.opts, self.downstream = gm, opts, downstream
        self._set(example_inputs, compiled, keep)

    def _set(self, inputs: Sequence[Any], compiled: Callable[..., Any], keep: list[int]) -> None:
        kept = set(keep)
        self.compiled, self.keep = compiled, keep
        self.frozen = [(i, inputs[i], inputs[i]._version) for i in range(len(inputs))
                       if i not in kept and isinstance(inputs[i], torch.Tensor)]

    def __call__(self, *args: Any) -> Any:
        for i, tensor, version in self.frozen:
            arg = args[i]
            if arg is not tensor or arg._version != version:
                self._refreeze(args)
                break
        return self.compiled(*[args[i] for i in self.keep])

    def _refreeze(self, args: Sequence[Any]) -> None:
        global LAST_COMPILE, _COMPILES
        log.warning("secateurs backend: a weight changed since this graph was compiled "
                    "(optimizer step, load_state_dict, new parameter); recompiling it on the "
                    "current weights")
        record = CompileRecord()
        LAST_COMPILE = record
        _COMPILES += 1
        with torch.no_grad():
            compiled, keep = _compile_frozen(self.gm, list(args), self.opts, record,
                                             self.downstream)
        self._set(args, compiled, keep)


def _compile_frozen(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                    opts: BackendOptions, record: CompileRecord,
                    downstream: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """Freeze the weights, remove what the options say, compile downstream; the compiled
    function and the positions of the inputs it takes."""
    frozen, keep = freeze_weights(gm, example_inputs)
    inputs = [example_inputs[i] for i in keep]
    concrete = [_concrete(x) for x in inputs]  # verify runs on ints, never on SymInts
    try:
        _shapes_for_analysis(frozen, concrete)
        analysis = group_channels(lower_graph_module(frozen))
    except Exception as exc:  # noqa: BLE001 - never break compilation over an analysis failure
        if opts.prune:  # the user asked for a pruned model: never hand back the dense one
            raise InputError(f"secateurs backend: cannot analyse the graph for "
                             f"options['prune']={opts.prune} ({exc})") from exc
        log.warning("secateurs backend: analysis failed (%s); compiling unpruned", exc)
        return downstream(frozen, inputs), keep
    tensors = dict(frozen.named_parameters())
    tensors.update(frozen.named_buffers())
    originals: dict[str, torch.Tensor] = frozen.meta.get("secateurs_originals", {})
    if opts.prune:
        from secateurs.passes.importance import ScoreContext, get_criterion, normalize
        from secateurs.passes.prune import select_units

        crit = get_criterion("l2")
        ctx = ScoreContext(tensors)
        scores = {g.id: normalize(np.asarray(crit(g, ctx))) for g in analysis.groups
                  if g.prunable and g.size > 1}
        removed = select_units(analysis, scores, opts.prune)
        removed = _as_decided(analysis, removed, originals, _decisions(opts.prune))
    elif opts.verify:
        removed = dead_units(analysis, tensors)
    else:  # dead channels are proven numerically only: without the check, none is removed
        removed = {}
    plan = build_plan(analysis, removed) if removed else None
    if plan is not None:
        reference = frozen
        pruned = apply_plan_fx(copy_module(frozen), plan)
        if not opts.prune:
            record.exact = _same_outputs(reference, pruned, concrete)
            if not record.exact:
                log.info("secateurs backend: removing the all-zero channels would change "
                         "outputs; compiling unpruned")
                pruned = reference
        if pruned is not reference:
            frozen = pruned
            record.removed = plan.removed
            record.removed_units = sum(len(v) for v in removed.values())
    if opts.prune:
        _record_decisions(_decisions(opts.prune), originals, plan)
        if not record.removed_units:
            _warn_nothing_pruned(analysis, opts.prune, originals)
    if opts.sparse:
        record.sparse_linears = _swap_semi_structured(frozen, opts)
    record.graph = frozen
    return downstream(frozen, inputs), keep


def _mutated_weights(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[str]:
    """Weight placeholders the graph writes in place (``add_`` on ``num_batches_tracked``, a
    ``batch_norm`` in training mode updating its running statistics): freezing them would
    leave the model's own tensors behind."""
    weights = {n for n, v in zip((n for n in gm.graph.nodes if n.op == "placeholder"),
                                 example_inputs)
               if isinstance(v, torch.Tensor) and _is_weight(n, v)}
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", "")
        written: list[Any] = []
        if name.endswith("_") and not name.startswith("_") and node.args:
            written = [node.args[0]]
        elif name == "batch_norm" and _bn_training(node):
            written = list(node.args[1:3]) + [node.kwargs.get(k) for k in
                                              ("running_mean", "running_var")]
        out += [w.name for w in written if isinstance(w, torch.fx.Node) and w in weights]
    return out


def _bn_training(node: torch.fx.Node) -> bool:
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    return training is True


# ---- one decision per weight, across graph breaks and recompiles

_DECIDED: dict[float, Any] = {}


def _decisions(ratio: float) -> Any:
    """The removal chosen for each of the model's tensors at this ratio, per dim, over every
    graph compiled so far (weak keys: the model's own parameters)."""
    from torch.utils.weak import WeakIdKeyDictionary

    return _DECIDED.setdefault(float(ratio), WeakIdKeyDictionary())


def _as_decided(analysis: Analysis, removed: dict[int, np.ndarray],
                originals: dict[str, torch.Tensor], decided: Any) -> dict[int, np.ndarray]:
    """``removed`` with every group that holds a tensor an earlier graph already pruned (a
    graph break splits the model into graphs; a new input signature recompiles) removing
    exactly what that graph removed from it: one mask for the model, which every compiled
    graph then realises. A group whose decided slices its units cannot reproduce (the graphs
    couple the tensor differently) is an error naming the tensor."""
    out = dict(removed)
    for g in analysis.groups:
        implied: set[int] | None = None
        for m in g.members:
            tensor = originals.get(m.param)
            entry = decided.get(tensor) if tensor is not None else None
            if entry is None or entry[0] != tensor._version:
                continue
            gone = np.isin(m.positions, sorted(entry[1].get(m.dim, ())))
            units = set(m.units[gone].tolist())
            whole = np.isin(m.units, sorted(units))
            if not np.array_equal(whole, gone) or (implied is not None and units != implied):
                raise _disagreement(m.param)
            implied = units
        if implied is None:
            continue
        if any(g.pinned[u] for u in implied) or (implied and len(implied) == g.size):
            raise _disagreement(next(m.param for m in g.members if originals.get(m.param)
                                     is not None))
        if implied:
            out[g.id] = np.array(sorted(implied))
        else:
            out.pop(g.id, None)
    return out


def _disagreement(param: str) -> InputError:
    return InputError(
        f"secateurs backend: options['prune']: '{param}' is used by several compiled graphs "
        "(graph breaks, or recompiles for other inputs) whose channel analyses cannot remove "
        "the same units from it, so no single pruned model would compute them all; remove the "
        "graph break (torch._dynamo.explain(model)(x) lists them) or compile without 'prune'")


def _record_decisions(decided: Any, originals: dict[str, torch.Tensor], plan: Any) -> None:
    removed = plan.removed if plan is not None else {}
    for attr, tensor in originals.items():
        if tensor in decided:
            continue
        dims = removed.get(attr, {})
        decided[tensor] = (tensor._version, {d: frozenset(int(i) for i in dims.get(d, ()))
                                             for d in range(tensor.dim())})


def _warn_nothing_pruned(analysis: Analysis, ratio: float,
                         originals: dict[str, torch.Tensor]) -> None:
    """``prune`` asked for, and this graph keeps every channel: say so, with a reason."""
    weighted = [g for g in analysis.groups
                if g.size > 1 and any(m.param in originals for m in g.members)]
    if not weighted:
        return
    import warnings

    reasons = [r for g in weighted for r in g.pin_reasons]
    why = f" (e.g. {reasons[0]})" if reasons else ""
    warnings.warn(f"secateurs backend: options['prune']={ratio} removed nothing from a compiled "
                  f"graph with {len(weighted)} channel group(s): they are pinned{why}. A graph "
                  "break makes every tensor crossing it a graph output, which is kept whole; "
                  "torch._dynamo.explain(model)(x) lists the breaks", DenseFallbackWarning,
                  stacklevel=2)


def _concrete(value: Any) -> Any:
    """A symbolic size (``s0`` under dynamic shapes) as the int it has now, for analysis only.

    Analysing on the symbols themselves would call ``int()`` on them, which *specialises* them
    in dynamo's shape environment: a guard ``x.size()[0] == 2`` is installed and every new
    batch size recompiles. The plan depends on the weights, never on these sizes."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        from torch.fx.experimental import symbolic_shapes as sym

        for name in ("guarding_hint_or_throw", "hint_int"):  # the name moved between releases
            fn = getattr(sym, name, None)
            if fn is not None and not isinstance(value, torch.SymFloat):
                return fn(value)
        return value.node.hint
    return value


def _shapes_for_analysis(gm: torch.fx.GraphModule, inputs: list[Any]) -> None:
    """Record concrete shapes on ``gm`` for the channel analysis.

    dynamo's fake values (symbolic shapes) are dropped first: reading a symbolic shape as an
    int would specialise it (see _concrete). Shapes come from meta propagation; a graph that
    reads a value (``.item()`` on a scalar input, as ``dynamic=True`` makes of BatchNorm's
    momentum) is run for real once, on the current inputs."""
    for node in gm.graph.nodes:
        for key in ("val", "example_value", "tensor_meta"):
            node.meta.pop(key, None)
    reads_values = any(n.op == "call_method" and n.target in ("item", "tolist")
                       for n in gm.graph.nodes)
    if not reads_values:
        try:
            propagate_shapes(gm, tuple(inputs))
            return
        except InputError:
            pass
    with torch.no_grad():
        _RealShapes(gm).run(*inputs)


class _RealShapes(torch.fx.Interpreter):
    """Run the graph for real and record each node's output shape (as a meta tensor).

    Not ``ShapeProp``: inside a dynamo compile it picks up dynamo's fake mode and would
    propagate the symbolic shapes again."""

    def run_node(self, n: torch.fx.Node) -> Any:
        from secateurs.graph.fx_lower import _SHAPE_KEY

        out = super().run_node(n)

        def stub(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return torch.empty(v.shape, dtype=v.dtype, device="meta")
            if isinstance(v, (list, tuple)):
                return [stub(x) for x in v]
            return None

        meta = stub(out)
        if meta is not None:
            n.meta[_SHAPE_KEY] = meta
        return out


def _guard_recompile_limit(opts: BackendOptions) -> str:
    """Make dynamo's dense fallback loud when it would change the answer.

    Past ``torch._dynamo.config.recompile_limit`` compiles of one frame, dynamo stops compiling
    and runs the original Python code: the *dense* model. Dead-channel removal is exact, so that
    changes nothing; with ``prune`` it would silently change the outputs. So with ``prune``:
    ``on_recompile_limit="raise"`` (default) sets dynamo's ``fail_on_recompile_limit_hit``, which
    makes the call that would fall back raise instead; ``"warn"`` warns (DenseFallbackWarning)
    at the last compile dynamo allows. Returns the compile id ("frame/compile")."""
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None or not opts.prune:
        return str(cid or "")
    limit = int(getattr(torch._dynamo.config, "recompile_limit", 8))
    last = (cid.frame_compile_id or 0) + 1 >= limit
    if opts.on_recompile_limit == "raise" and hasattr(torch._dynamo.config,
                                                      "fail_on_recompile_limit_hit"):
        # process-wide in dynamo: set only once a pruned frame reaches its last compile, so
        # other models (and "warn") keep dynamo's own behaviour until then
        if last:
            torch._dynamo.config.fail_on_recompile_limit_hit = True
    elif last:
        import warnings

        warnings.warn(f"secateurs backend: compile {cid} is the last of dynamo's recompile_limit "
                      f"({limit}) for this frame; the next new input shape runs the original "
                      "DENSE model, not the pruned one. Keep input shapes dynamic "
                      "(torch._dynamo.mark_dynamic) or raise torch._dynamo.config.recompile_limit",
                      DenseFallbackWarning, stacklevel=2)
    return str(cid)


def copy_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    root = nn.Module()
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, nn.Parameter(p.detach().clone(), requires_grad=False))
    for name, b in gm.named_buffers(recurse=False):
        root.register_buffer(name, b.clone())
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    return torch.fx.GraphModule(root, copy_graph(gm))


def _same_outputs(a: torch.fx.GraphModule, b: torch.fx.GraphModule, inputs: list[Any]) -> bool:
    """``a`` and ``b`` agree on the call's inputs *and* on two random draws of its float
    inputs: a first call on a warm-up batch (zeros) made a wrong removal look exact."""
    gen = torch.Generator().manual_seed(0)

    def draw(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return (torch.randn(x.shape, generator=gen) * 2 + 0.5).to(x.dtype).to(x.device)
        return x

    for feed in (inputs, [draw(x) for x in inputs], [draw(x) for x in inputs]):
        try:
            with torch.no_grad():
                ra, rb = a(*feed), b(*feed)
        except Exception:  # noqa: BLE001 - a graph refusing random data proves nothing
            if feed is inputs:
                return False
            continue
        ra = ra if isinstance(ra, (list, tuple)) else (ra,)
        rb = rb if isinstance(rb, (list, tuple)) else (rb,)
        if len(ra) != len(rb) or not all(
                torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True)
                for x, y in zip(ra, rb) if isinstance(x, torch.Tensor)):
            return False
    return True

