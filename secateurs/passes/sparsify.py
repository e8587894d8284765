"""Sparsify: rewrite weights to unstructured, N:M or block (BSR) sparsity.

Which weights, along which axis
    Every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` weight is a candidate, and
    transformers' ``Conv1D`` (GPT-2: weight ``[in, out]``, groups along dim 0). Weights tied to
    another kind of module (an ``lm_head`` and its embedding), parametrized weights and matrix
    parameters no layer holds (MoE experts' ``[E, ...]`` weights) are reported as skipped. Hardware reads
    N:M groups along the *reduction* axis, so groups of ``M`` run along ``in`` of a Linear
    weight ``[out, in]`` and along ``C`` of a Conv weight ``[K, C, R, S]`` for each
    ``(k, r, s)``. Internally a weight is viewed as a 2-D matrix whose columns run along the
    reduction axis: a Linear weight as is, a Conv weight as its im2col matrix in *channel-last*
    order, ``W2[k, (r·S + s)·C + c] = W[k, c, r, s]``, so every group of ``M`` consecutive
    columns is ``M`` consecutive input channels at one kernel position. Calibration inputs are
    unfolded into the same column order, so ``W2 @ X2ᵀ`` is the layer's output.

Methods
    ``magnitude`` keeps the largest ``|W|``; ``wanda`` keeps the largest ``|W_ij|·‖X_j‖₂``
    (see :mod:`secateurs.passes.wanda`); ``sparsegpt`` chooses the mask and updates the kept
    weights with the OBS update (see :mod:`secateurs.passes.sparsegpt`). Calibrated methods run
    layer by layer in execution order: each layer's statistics are collected from the model in
    which every earlier layer is already sparse (a forward pre-hook accumulates the layer's
    input and stops the forward, so only the model prefix runs).

Layers a pattern cannot serve are skipped with a reason (``Conv 'layer1.conv' has C=3, not a
multiple of 4``, grouped convs, layers under ``min_numel`` weights) and listed in the report.

Streaming (:func:`sparsify_streaming`) runs the same per-layer procedure one block at a time,
loading just that block's tensors from ``*.safetensors`` shards (:class:`ShardedCheckpoint`),
writing the sparse block out and keeping only the activations between blocks in memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from secateurs.errors import InputError
from secateurs.passes.calibration import BoundArgs, StopForward, call_batch, run_hooked
from secateurs.passes.masks import (
    Masks,
    Pattern,
    mask_from_scores,
    parse_pattern,
    save_masks,
    unstructured_mask,
)
from secateurs.passes.sparsegpt import HessianAccumulator, SparseGPTOptions, sparsegpt_prune
from secateurs.passes.wanda import ColumnNormAccumulator, wanda_mask

__all__ = [
    "is_nm_sparse",
    "is_block_sparse",
    "Sparsify",
    "sparsify",
    "SparsifyResult",
    "SparsityReport",
    "LayerSparsity",
    "SkippedLayer",
    "ShardedCheckpoint",
    "save_sharded",
    "sparsify_streaming",
    "StreamingResult",
    "weight_to_2d",
    "weight_from_2d",
]

log = logging.getLogger(__name__)

Method = Literal["magnitude", "wanda", "sparsegpt"]
METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- pattern checks


def is_nm_sparse(weight: torch.Tensor, n: int, m: int, axis: int = 1) -> bool:
    """True when every group of ``m`` consecutive entries along ``axis`` has at most ``n`` non-zeros.

    Pure: reads ``weight`` only. ``axis`` is the reduction axis (1 for Linear ``[out, in]`` and
    Conv ``[K, C, R, S]``; 0 for an ONNX MatMul weight ``[K, N]``). A size along ``axis`` that
    is not a multiple of ``m`` is not N:M sparse.
    """
    if weight.dim() == 0 or not 1 <= n < m:
        return False
    moved = torch.movedim(weight.detach(), axis, -1)
    if moved.shape[-1] % m:
        return False
    groups = (moved != 0).reshape(-1, m)
    return bool((groups.sum(-1, dtype=torch.int32) <= n).all())


def is_block_sparse(weight: torch.Tensor, block: int, min_zero_blocks: float = 0.0) -> bool:
    """True when a 2-D ``weight`` tiles into ``block×block`` blocks and at least a
    ``min_zero_blocks`` fraction of those blocks are entirely zero. Pure."""
    if weight.dim() != 2 or block < 1 or weight.shape[0] % block or weight.shape[1] % block:
        return False
    rows, cols = weight.shape
    nz = (weight.detach() != 0).reshape(rows // block, block, cols // block, block).any(dim=(1, 3))
    zero_fraction = float((~nz).float().mean())
    return zero_fraction >= min_zero_blocks - 1e-9


# --------------------------------------------------------------------------- layer views


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT-2-style models): a linear layer whose weight is
    stored ``[in, out]`` and applied as ``x @ W + b``, so it reduces along dim 0."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") \
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def reduction_axis(module: nn.Module) -> int:
    """The axis of ``module.weight`` its forward reduces over (where N:M groups run)."""
    return 0 if _is_hf_conv1d(module) else 1


def _module_2d(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` of ``module`` as ``[out, reduction]`` (see :func:`weight_to_2d`)."""
    return weight.t() if _is_hf_conv1d(module) else weight_to_2d(weight)


def _module_from_2d(module: nn.Module, w2: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return w2.t().contiguous() if _is_hf_conv1d(module) else weight_from_2d(w2, shape)


def weight_to_2d(weight: torch.Tensor) -> torch.Tensor:
    """Linear ``[out, in]`` as is; Conv ``[K, C, *k]`` as ``[K, prod(k)·C]`` in channel-last order."""
    if weight.dim() == 2:
        return weight
    perm = (0, *range(2, weight.dim()), 1)
    return weight.permute(perm).reshape(weight.shape[0], -1)


def weight_from_2d(w2: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`weight_to_2d` for a weight of ``shape``."""
    if len(shape) == 2:
        return w2.reshape(shape)
    k, c, *spatial = shape
    nd = len(shape)
    return w2.reshape(k, *spatial, c).permute(0, nd - 1, *range(1, nd - 1)).contiguous()


def _conv_columns(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfold a conv input into rows ``[N·L, prod(k)·C]`` matching :func:`weight_to_2d`."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        padding = module.padding if isinstance(module.padding, str) else (0, *module.padding)
    else:
        kernel, stride, dilation, padding = module.kernel_size, module.stride, module.dilation, module.padding
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if isinstance(padding, str):
        pads: list[int] = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = d * (k - 1) if padding == "same" else 0
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    n, _, length = cols.shape
    c = x.shape[1]
    return cols.reshape(n, c, -1, length).permute(0, 3, 2, 1).reshape(n * length, -1)


def _layer_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if _is_hf_conv1d(module):
        return x.reshape(-1, module.weight.shape[0])
    return _conv_columns(module, x)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class LayerSparsity:
    """One sparsified weight: its shape, the fraction zeroed, and whether the pattern holds."""

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    valid: bool

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SkippedLayer:
    """A candidate weight the pattern could not serve, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer outcome of a sparsify run, plus totals over the sparsified weights."""

    pattern: str
    method: str
    target_sparsity: float
    layers: tuple[LayerSparsity, ...]
    skipped: tuple[SkippedLayer, ...]
    model_params: int = 0

    @property
    def total_numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def total_zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Zeros over all sparsified weights."""
        return self.total_zeros / self.total_numel if self.total_numel else 0.0

    @property
    def model_sparsity(self) -> float:
        """Zeros of the sparsified weights over all the model's parameters."""
        return self.total_zeros / self.model_params if self.model_params else 0.0

    @property
    def all_valid(self) -> bool:
        return all(layer.valid for layer in self.layers)

    def table(self) -> str:
        """A fixed-width text table: one line per layer, the skipped layers, and totals."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [
            f"sparsify pattern={self.pattern} method={self.method}",
            f"{'layer':<{width}}  {'type':<7} {'shape':<20} {'sparsity':>8}  pattern",
        ]
        for layer in self.layers:
            shape = "x".join(str(d) for d in layer.shape)
            ok = "ok" if layer.valid else "VIOLATED"
            lines.append(f"{layer.name:<{width}}  {layer.kind:<7} {shape:<20} {layer.sparsity:>8.1%}  {ok}")
        for skip in self.skipped:
            lines.append(f"{skip.name:<{width}}  skipped: {skip.reason}")
        lines.append(
            f"total: {len(self.layers)} layers sparsified, {len(self.skipped)} skipped; "
            f"{self.total_zeros}/{self.total_numel} weights zero ({self.sparsity:.1%}); "
            f"{self.model_sparsity:.1%} of all {self.model_params} parameters"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "pattern": self.pattern,
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "layers": [
                {"name": x.name, "kind": x.kind, "shape": list(x.shape), "numel": x.numel,
                 "zeros": x.zeros, "sparsity": x.sparsity, "valid": x.valid}
                for x in self.layers
            ],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "total_numel": self.total_numel,
            "total_zeros": self.total_zeros,
            "sparsity": self.sparsity,
            "model_params": self.model_params,
            "model_sparsity": self.model_sparsity,
        }


@dataclass(frozen=True)
class SparsifyResult:
    """The sparse model, its keep-masks (``param_name -> bool``) and the report."""

    model: nn.Module
    masks: Masks
    report: SparsityReport


# --------------------------------------------------------------------------- calibration


_NOT_RUN = (
    "not executed on the calibration inputs (its forward is never called, e.g. "
    "nn.MultiheadAttention.out_proj is applied functionally); use method='magnitude' for it"
)


def _materialise(calibration: Iterable[Any] | torch.Tensor | None) -> list[Any]:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        return [calibration]
    return list(calibration)


def _execution_order(
    model: nn.Module, layers: Mapping[str, nn.Module], sample: Any
) -> tuple[dict[str, int], list[list[str]]]:
    """Calls per layer in one forward (first-call order), and the layers grouped into runs.

    A run is consecutive layers, each called once, that read the *same* input tensor (q, k, v
    of an attention block): sparsifying one cannot change the others' input, so a run is
    calibrated with one prefix pass. Inputs are held alive during the pass, so identity is exact.
    """
    calls, groups, _ = _probe(model, layers, sample, None)
    return calls, groups


# --------------------------------------------------------------------------- chained blocks
#
# Sequential calibration needs each layer's inputs from the model whose earlier layers are
# already sparse. Running the model prefix for every layer costs O(layers²) forwards. When the
# layers sit in a chain of blocks (the children of one ModuleList / Sequential: transformer
# layers, ResNet stages) where block i+1 is called on block i's output with the very same
# other arguments, each block's inputs are cached once and every layer is calibrated by running
# only its own block (stopped at the layer), then the block's outputs become the next block's
# inputs: O(layers) forwards, as the papers' layer-by-layer loops. The chain is verified on the
# first calibration sample (calls, argument identity, every layer call inside its own block)
# and a replay (a block re-run on its captured inputs reproduces its output); otherwise the
# prefix runs are used, which are always right.


@dataclass(frozen=True)
class _Chain:
    names: tuple[str, ...]
    blocks: tuple[nn.Module, ...]
    first: bool  # a tuple output: its element 0 feeds the next block
    captured: tuple[tuple[BoundArgs, Any], ...] = field(repr=False, default=())  # sample 0

    def block_of(self, group: Sequence[str]) -> int | None:
        found = {self._index(name) for name in group}
        return found.pop() if len(found) == 1 else None

    def _index(self, name: str) -> int | None:
        for i, block in enumerate(self.names):
            if name == block or name.startswith(block + "."):
                return i
        return None

    def head(self, output: Any) -> Any:
        return output[0] if self.first else output


def _chain_container(model: nn.Module, layers: Mapping[str, nn.Module]) -> tuple[str, ...] | None:
    """The ModuleList / Sequential whose children hold the most candidate layers (>= 2)."""
    best: tuple[int, int, tuple[str, ...]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [f"{name}.{child}" if name else child for child, _ in module.named_children()]
        holding = [c for c in children if any(n == c or n.startswith(c + ".") for n in layers)]
        if len(holding) < 2:
            continue
        key = (len(holding), -name.count("."), tuple(children))
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def _same_arg(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # noqa: BLE001 - an arbitrary object's __eq__
        return False


def _probe(
    model: nn.Module, layers: Mapping[str, nn.Module], sample: Any,
    block_names: Sequence[str] | None,
) -> tuple[dict[str, int], list[list[str]], _Chain | None]:
    """One forward on ``sample``: layer calls and runs (see ``_execution_order``) and, for the
    candidate chain ``block_names``, whether it really is a chain (see above)."""
    calls: dict[str, int] = {}
    first_input: dict[str, Any] = {}
    owners: dict[str, set[int | None]] = {}
    active: list[int] = []
    order: list[int] = []
    seen: dict[int, tuple[BoundArgs, Any]] = {}
    modules = dict(model.named_modules())
    blocks = [modules[n] for n in block_names] if block_names else []

    def record(name: str, args: tuple[Any, ...]) -> None:
        calls[name] = calls.get(name, 0) + 1
        first_input.setdefault(name, args[0] if args else None)
        owners.setdefault(name, set()).add(active[-1] if active else None)

    def enter(i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        active.append(i)
        order.append(i)
        seen.setdefault(i, (BoundArgs(tuple(args), dict(kwargs)), None))

    def leave(i: int, output: Any) -> None:
        active.pop()
        if seen[i][1] is None:
            seen[i] = (seen[i][0], output)

    hooks = [(mod, lambda m, args, kwargs, n=name: record(n, args)) for name, mod in layers.items()]
    hooks += [(blk, lambda m, args, kwargs, i=i: enter(i, args, kwargs))
              for i, blk in enumerate(blocks)]
    outs = [blk.register_forward_hook(lambda m, args, output, i=i: leave(i, output))
            for i, blk in enumerate(blocks)]
    try:
        run_hooked(model, [sample], hooks)
    finally:
        for h in outs:
            h.remove()
    groups: list[list[str]] = []
    for name in calls:
        last = groups[-1][-1] if groups else None
        if last is not None and calls[name] == 1 and calls[last] == 1 and first_input[name] is first_input[last]:
            groups[-1].append(name)
        else:
            groups.append([name])
    chain = None
    if blocks and order == list(range(len(blocks))):
        chain = _Chain(tuple(block_names or ()), tuple(blocks), False,
                       tuple(seen[i] for i in range(len(blocks))))
        chain = _verify_chain(chain, calls, owners)
    return calls, groups, chain


def _one_row(sample: Any, row: int = 0) -> Any:
    """The first row of a batch whose tensors all share one leading size: the probe learns
    the call order and the chain from it at a fraction of a padded batch's cost. Anything
    else (no tensor, mixed leading sizes) is probed whole."""
    if isinstance(sample, BoundArgs):
        return sample
    items = list(sample.values()) if isinstance(sample, Mapping) else (
        list(sample) if isinstance(sample, (tuple, list)) else [sample])
    sizes = {int(t.shape[0]) for t in items if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1 or sizes == {1} or not all(
            isinstance(t, torch.Tensor) and t.dim() > 0 for t in items):
        return sample
    pick = slice(row, row + 1) if row >= 0 else slice(row, None if row == -1 else row + 1)
    if isinstance(sample, Mapping):
        return {k: v[pick] for k, v in sample.items()}
    if isinstance(sample, (tuple, list)):
        return type(sample)(t[pick] for t in sample)
    return sample[pick]


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Calibrate a Hugging Face decoder without its KV cache (``config.use_cache``, on by
    default in every checkpoint): with it, every forward and every block replay appended its
    keys and values to the cache the layers' kwargs hold, so padded batches failed ("size of
    tensor a (16) must match ... b (8)") and later blocks were calibrated on stale K/V."""
    configs = {id(c): c for m in model.modules()
               if getattr(c := getattr(m, "config", None), "use_cache", False) is True}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _stateful(value: Any) -> bool:
    """A cache object (transformers' ``DynamicCache`` & co) among a block's arguments: state a
    replay would mutate."""
    return any("Cache" in t.__name__ for t in type(value).__mro__)


def _verify_chain(chain: _Chain, calls: Mapping[str, int],
                  owners: Mapping[str, set[int | None]]) -> _Chain | None:
    if any(_stateful(v) for bound, _ in chain.captured
           for v in (*bound.args, *bound.kwargs.values())):
        return None  # replaying the blocks would grow the cache: prefix runs instead
    for name in calls:  # every call of a layer happens inside its own block (or outside all)
        if owners[name] - {chain._index(name)}:
            return None
    outputs = [out for _, out in chain.captured]
    first = isinstance(outputs[0], (tuple, list))
    for i in range(1, len(chain.blocks)):
        prev, cur = chain.captured[i - 1][0], chain.captured[i][0]
        out = outputs[i - 1]
        if isinstance(out, (tuple, list)) != first or (first and not out):
            return None
        head = out[0] if first else out
        if not isinstance(head, torch.Tensor) or not cur.args or cur.args[0] is not head:
            return None
        if len(cur.args) != len(prev.args) or set(cur.kwargs) != set(prev.kwargs):
            return None
        if not all(_same_arg(a, b) for a, b in zip(cur.args[1:], prev.args[1:])):
            return None
        if not all(_same_arg(cur.kwargs[k], prev.kwargs[k]) for k in cur.kwargs):
            return None
    return _Chain(chain.names, chain.blocks, first, chain.captured)


def _replays(chain: _Chain, model: nn.Module, samples: Sequence[Any]) -> bool:
    """Blocks are functions of their arguments: re-run on the probe's captured inputs after a
    forward of another input (a row of the last sample) they reproduce the captured outputs."""
    with torch.no_grad():
        other = _one_row(samples[-1], -1)
        if other is not samples[0] or len(samples) > 1:
            call_batch(model, other)
        for i in sorted({0, len(chain.blocks) - 1}):
            bound, out = chain.captured[i]
            again = call_batch(chain.blocks[i], bound)
            if not torch.equal(chain.head(again), chain.head(out)):
                return False
    return True


class _ChainInputs:
    """Each block's inputs for every calibration sample, advanced block by block."""

    def __init__(self, chain: _Chain, model: nn.Module, samples: Sequence[Any]) -> None:
        self.chain, self.model, self.samples = chain, model, samples
        self.index: int | None = None
        self.inputs: list[BoundArgs] = []

    def at(self, block: int) -> list[BoundArgs]:
        if self.index is None or self.index > block:
            self._capture(block)
        while self.index is not None and self.index < block:
            self._advance()
        return self.inputs

    def _capture(self, block: int) -> None:
        captured: list[BoundArgs] = []

        def grab(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append(BoundArgs(tuple(args), dict(kwargs)))
            raise StopForward

        run_hooked(self.model, self.samples, [(self.chain.blocks[block], grab)])
        self.index, self.inputs = block, captured

    def _advance(self) -> None:
        assert self.index is not None
        block = self.chain.blocks[self.index]
        nxt = []
        with torch.no_grad():
            for bound in self.inputs:
                head = self.chain.head(call_batch(block, bound))
                nxt.append(BoundArgs((head, *bound.args[1:]), bound.kwargs))
        self.index += 1
        self.inputs = nxt


def _collect(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    samples: Sequence[Any],
    accs: Mapping[str, Any],
    stop_at: str | None,
) -> None:
    """Run the model over ``samples``, feeding each module's input columns to its accumulator.

    With ``stop_at``, the forward stops once that module has seen its input: only the model
    prefix up to it runs.
    """

    def hook(name: str, mod: nn.Module, args: tuple[Any, ...]) -> None:
        accs[name].add(_layer_columns(mod, args[0].detach()).float())
        if name == stop_at:
            raise StopForward

    run_hooked(model, samples, [(mod, lambda m, args, kwargs, n=name: hook(n, m, args))
                                for name, mod in modules.items()])


# --------------------------------------------------------------------------- the pass


def _kind(module: nn.Module) -> str:
    return type(module).__name__


def _skip_reason(name: str, module: nn.Module, pattern: Pattern, method: str, min_numel: int) -> str | None:
    kind = _kind(module)
    if not isinstance(module._parameters.get("weight"), nn.Parameter) or \
            parametrize.is_parametrized(module, "weight"):
        return (f"{kind} '{name}' computes its weight (weight_norm / spectral_norm or another "
                "parametrization): a sparse copy would be recomputed away; remove the "
                "parametrization first (torch.nn.utils.parametrize.remove_parametrizations)")
    weight = module.weight
    if isinstance(module, nn.Conv3d):
        return f"Conv3d '{name}' is not supported"
    if weight.numel() < min_numel:
        return f"{kind} '{name}' has {weight.numel()} weights, below min_numel={min_numel}"
    is_conv = not isinstance(module, nn.Linear) and not _is_hf_conv1d(module)
    if is_conv and module.groups != 1 and (pattern.kind != "unstructured" or method != "magnitude"):
        return f"Conv '{name}' has groups={module.groups} (grouped/depthwise): {pattern} along C does not apply"
    if pattern.kind == "nm":
        size = weight.shape[reduction_axis(module)]
        if size % pattern.m:
            dim = "C" if is_conv else "in_features"
            return f"{'Conv' if is_conv else kind} '{name}' has {dim}={size}, not a multiple of {pattern.m}"
    if pattern.kind == "bsr":
        if is_conv:
            return f"Conv '{name}': block sparsity applies to Linear layers only"
        b = pattern.block
        if weight.shape[0] % b or weight.shape[1] % b:
            return f"{kind} '{name}' has shape {tuple(weight.shape)}, not divisible into {b}x{b} blocks"
    return None


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, _LAYER_TYPES) or _is_hf_conv1d(module)


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every module holding each parameter (a tied weight has several)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(
                    (f"{name}.{pname}" if name else pname, module))
    return owners


def _tied_reason(name: str, module: nn.Module,
                 owners: Mapping[int, list[tuple[str, nn.Module]]]) -> str | None:
    """A weight tied to a module that is not a layer of the same kind (GPT-2's ``lm_head``
    and its token embedding): sparsifying it would change the other use, unreported."""
    param = module._parameters.get("weight")
    others = [(n, m) for n, m in owners.get(id(param), []) if m is not module]
    foreign = [(n, m) for n, m in others
               if not _is_layer(m) or reduction_axis(m) != reduction_axis(module)]
    if not foreign:
        return None
    other, owner = foreign[0]
    return (f"{_kind(module)} '{name}' shares its weight with '{other}' ({type(owner).__name__}, "
            "e.g. tied input embeddings): sparsifying it would zero that use too; untie the "
            "weights first to sparsify it")


def _dense_leftovers(model: nn.Module, prefix: str, handled: set[int]) -> list[SkippedLayer]:
    """Matrix parameters no candidate layer holds (MoE experts' batched ``[E, ...]`` weights,
    custom modules' ``weight``, RNN weights): listed as skipped, so the report says they stay
    dense. Embedding tables, norms' vectors and ``[1, ...]`` tokens are not matrices of a GEMM."""
    out, seen = [], set(handled)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        for pname, param in module._parameters.items():
            if param is None or id(param) in seen or param.dim() < 2 or param.shape[0] < 2:
                continue
            seen.add(id(param))
            what = ("3-D weights outside a recognised MoE block (a router and an experts "
                    "module) are not sparsified" if param.dim() == 3
                    else "not an nn.Linear / Conv / Conv1D weight")
            full = f"{prefix}{name}.{pname}" if name else f"{prefix}{pname}"
            out.append(SkippedLayer(full, f"{type(module).__name__} parameter of shape "
                                          f"{list(param.shape)}: {what}; left dense"))
    return out


def _expert_weights(model: nn.Module, prefix: str, ignore: set[str], pattern: Pattern,
                    method: str, global_: bool, min_numel: int
                    ) -> tuple[list[tuple[str, nn.Parameter, int]], list[tuple[str, str]]]:
    """MoE experts' batched 3-D weights (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
    or transposed, as recent transformers store them; ``hf.moe.moe_blocks`` finds the blocks
    and the width dim of each tensor) with the axis each expert's product reduces over — the
    width dim for ``down_proj`` (it reads the intermediate), the other one for the projections
    into it — and the ones left dense, with the reason. Magnitude only: a calibrated method
    needs each expert's routed inputs."""
    from secateurs.hf.moe import moe_blocks

    out: list[tuple[str, nn.Parameter, int]] = []
    skips: list[tuple[str, str]] = []
    try:
        blocks = moe_blocks(model)
    except Exception:  # noqa: BLE001 - a model moe_blocks cannot read keeps the leftover report
        return out, skips
    for block in blocks:
        widths = {name: dim for name, dim, _ in block.width}
        for name in block.expert_tensors:
            param = dict(model.named_parameters()).get(name)
            if param is None or param.dim() != 3:
                continue
            full = prefix + name
            why = None
            if _ignored(full, ignore) or _ignored(prefix + block.experts, ignore):
                why = "ignored by request"
            elif name not in widths:
                why = ("batched expert weights (MoE) whose layout cannot be told (hidden size "
                       "equals the expert width): left dense")
            elif method != "magnitude" or global_:
                why = (f"batched expert weights (MoE) are sparsified by method='magnitude' "
                       f"(per layer) only: {'a global threshold' if global_ else method} "
                       "needs each expert's routed inputs; left dense")
            elif pattern.kind == "bsr":
                why = "batched expert weights (MoE) take N:M or unstructured patterns; left dense"
            elif param.numel() < min_numel:
                why = f"numel {param.numel()} < min_numel {min_numel}"
            axis = widths.get(name, 1) if name.rsplit(".", 1)[-1].startswith("down") \
                else 3 - widths.get(name, 1)
            if why is None and pattern.kind == "nm" and param.shape[axis] % pattern.m:
                why = (f"reduction dim {param.shape[axis]} is not a multiple of {pattern.m}; "
                       "left dense")
            if why:
                skips.append((full, why))
            else:
                out.append((full, param, axis))
    return out, skips


@torch.no_grad()
def _sparsify_experts(param: nn.Parameter, axis: int, pattern: Pattern,
                      sparsity: float) -> torch.Tensor:
    """Zero ``param`` (``[E, a, b]``) expert by expert, groups along ``axis``; the keep mask."""
    keep = torch.empty(param.shape, dtype=torch.bool)
    for e in range(param.shape[0]):
        w = param[e].detach().float()
        rows = w if axis == 2 else w.t()  # [out, in]: groups along the last dim
        k = mask_from_scores(rows.abs(), pattern, sparsity)
        k = k if axis == 2 else k.t()
        param[e].mul_(k.to(param.dtype))
        keep[e] = k.cpu()
    return keep


def _resolve_ignore(model: nn.Module, ignore: Sequence[str]) -> set[str]:
    modules = {name for name, _ in model.named_modules(remove_duplicate=False)}
    # a tied weight's second name too (lm_head.weight of GPT-2)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    unknown = [x for x in ignore if x not in modules and x not in params]
    if unknown:
        known = sorted(n for n, m in model.named_modules() if _is_layer(m))[:8]
        raise InputError(
            f"ignore names {unknown} not found in the model; give module or parameter names, e.g. {known}"
        )
    return set(ignore)


def _param_name(prefix: str, module_name: str) -> str:
    return f"{prefix}{module_name}.weight" if module_name else f"{prefix}weight"


def _ignored(name: str, ignore: set[str]) -> bool:
    return any(name == x or name.startswith(x + ".") or f"{name}.weight" == x for x in ignore)


def _calibration_units(groups: Sequence[list[str]], chain: _Chain | None, mode: str
                       ) -> list[tuple[int | None, list[list[str]]]]:
    """Groups calibrated by one statistics pass each, in execution order: every group alone
    (``layer``), or every block's consecutive groups together (``block``: the papers' loop)."""
    units: list[tuple[int | None, list[list[str]]]] = []
    for group in groups:
        block = chain.block_of(group) if chain is not None else None
        if mode == "block" and block is not None and units and units[-1][0] == block:
            units[-1][1].append(group)
        else:
            units.append((block, [group]))
    return units


@dataclass(frozen=True)
class Sparsify:
    """The sparsify pass; fields are its options.

    ``pattern``: ``"2:4"`` (any ``"N:M"``), ``"unstructured"`` or ``"bsr"``; ``sparsity``: the
    target for unstructured/bsr (N:M implies ``1 - N/M``); ``method``: ``magnitude``, ``wanda``
    or ``sparsegpt``; ``ignore``: module or parameter names to leave dense (a module name covers
    its submodules); ``block_size``: BSR block; ``global_``: one magnitude threshold over all
    layers (unstructured only); ``min_numel``: skip weights smaller than this; ``sequential``:
    ``True`` / ``"block"`` calibrates the layers of each block of a verified chain (transformer
    layers, see "chained blocks") together on the block's inputs from the already-sparse earlier
    blocks, as the Wanda and SparseGPT papers' loops do, and every other layer on the
    already-sparse prefix; ``"layer"`` calibrates every layer on the prefix in which all
    earlier layers are sparse (within blocks too); ``False``: one pass on the dense model;
    ``percdamp``/``obs_blocksize``: SparseGPT dampening and column block.
    """

    pattern: str | Pattern = "2:4"
    sparsity: float = 0.5
    method: str = "magnitude"
    ignore: tuple[str, ...] = ()
    block_size: int = 16
    global_: bool = False
    min_numel: int = 0
    sequential: bool | str = True
    percdamp: float = 0.01
    obs_blocksize: int = 128

    def parsed(self) -> Pattern:
        """Validate the options; returns the parsed pattern."""
        pattern = parse_pattern(self.pattern, self.block_size)
        if self.method not in METHODS:
            raise InputError(f"method={self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if pattern.kind != "nm" and not 0.0 <= self.sparsity < 1.0:
            raise InputError(f"sparsity={self.sparsity} is out of range; use 0 <= sparsity < 1")
        if self.global_ and (self.method != "magnitude" or pattern.kind != "unstructured"):
            raise InputError("global_=True needs pattern='unstructured' and method='magnitude'")
        if self.sequential not in (True, False, "block", "layer"):
            raise InputError(f"sequential={self.sequential!r}: use True/'block', 'layer' or False")
        if not self.percdamp > 0:
            raise InputError(f"percdamp={self.percdamp} must be positive")
        return pattern

    @property
    def target_sparsity(self) -> float:
        pattern = parse_pattern(self.pattern, self.block_size)
        return pattern.nm_sparsity if pattern.kind == "nm" else self.sparsity

    def __call__(
        self, model: nn.Module, calibration: Iterable[Any] | torch.Tensor | None = None, inplace: bool = False
    ) -> SparsifyResult:
        pattern = self.parsed()
        samples = _materialise(calibration)
        if self.method != "magnitude" and not samples:
            raise InputError(f"method={self.method!r} needs calibration=<iterable of model inputs>")
        ignore = _resolve_ignore(model, self.ignore)
        work = model if inplace else copy.deepcopy(model)
        with _no_kv_cache(work) if self.method != "magnitude" else contextlib.nullcontext():
            masks, layers, skipped = self._run(work, samples, pattern, ignore, prefix="")
        report = SparsityReport(
            pattern=str(pattern), method=self.method, target_sparsity=self.target_sparsity,
            layers=tuple(layers), skipped=tuple(skipped),
            model_params=sum(p.numel() for p in work.parameters()),
        )
        return SparsifyResult(work, masks, report)

    # -- the per-model procedure, shared by in-memory and streaming runs

    def _run(
        self, model: nn.Module, samples: Sequence[Any], pattern: Pattern, ignore: set[str], prefix: str,
        whole_block: bool = False,
    ) -> tuple[Masks, list[LayerSparsity], list[SkippedLayer]]:
        """``whole_block``: ``model`` is one block of a chain (streaming): in ``block`` mode all
        its layers are calibrated by one pass, as in the in-memory run of the whole chain."""
        candidates: dict[str, nn.Module] = {}
        skipped: list[SkippedLayer] = []
        owners = _owners(model)
        handled: set[int] = set()
        for name, module in model.named_modules():
            if not _is_layer(module):
                continue
            full = (prefix + name).rstrip(".")
            pname = _param_name(prefix, name)
            handled.update(id(p) for p in module.parameters())  # incl. a parametrization's
            if _ignored(full, ignore):
                skipped.append(SkippedLayer(pname, "ignored by request"))
                continue
            reason = _skip_reason(full or "(root)", module, pattern, self.method,
                                  self.min_numel) or _tied_reason(full or "(root)", module, owners)
            if reason:
                skipped.append(SkippedLayer(pname, reason))
                continue
            candidates[name] = module
        experts, expert_skips = _expert_weights(model, prefix, ignore, pattern, self.method,
                                                self.global_, self.min_numel)
        handled.update(id(p) for _, p, _ in experts)
        handled.update(id(model.get_parameter(n[len(prefix):])) for n, _ in expert_skips)
        skipped += [SkippedLayer(n, why) for n, why in expert_skips]
        skipped += _dense_leftovers(model, prefix, handled)

        groups = [[name] for name in candidates]
        calls: dict[str, int] = {}
        was_training = model.training
        calibrated = self.method != "magnitude"
        mode = self.mode
        chain = None
        if calibrated:
            model.eval()
            container = _chain_container(model, candidates) if mode != "dense" and not (
                whole_block and mode == "block") else None
            calls, groups, chain = _probe(model, candidates, _one_row(samples[0]), container)
            if chain is not None:  # keep the verdict, drop sample 0's captured activations
                chain = _Chain(chain.names, chain.blocks, chain.first) if _replays(
                    chain, model, samples) else None
            for name in candidates:
                if name not in calls:
                    skipped.append(SkippedLayer(_param_name(prefix, name), _NOT_RUN))
        global_masks = self._global_masks(candidates) if self.global_ else {}

        masks: Masks = {}
        layers: list[LayerSparsity] = []
        stats: dict[str, Any] = {}
        if calibrated and mode == "dense":
            stats = self._stats(model, groups, candidates, samples, calls, stop=False)
        chained = _ChainInputs(chain, model, samples) if chain is not None else None
        units = _calibration_units(groups, chain, mode)
        if whole_block and mode == "block" and groups:
            units = [(None, list(groups))]
        for block, unit in units:
            if calibrated and mode != "dense":
                if chained is None or block is None:
                    stats = self._stats(model, unit, candidates, samples, calls)
                else:  # only this block, on its cached inputs
                    assert chain is not None
                    stats = self._stats(chain.blocks[block], unit, candidates,
                                        chained.at(block), calls)
            for name in (n for group in unit for n in group):
                module = candidates[name]
                keep = self._sparsify_layer(module, pattern, global_masks.get(name), stats.get(name))
                masks[_param_name(prefix, name)] = keep
                layers.append(self._layer_report(_param_name(prefix, name), module, keep, pattern))
                log.debug("sparsified %s%s: %.1f%% zeros", prefix, name, 100 * layers[-1].sparsity)
        for full, param, axis in experts:
            keep = _sparsify_experts(param, axis, pattern, self.sparsity)
            masks[full] = keep
            weight = param.detach().cpu()
            valid = is_nm_sparse(weight, pattern.n, pattern.m, axis) if pattern.kind == "nm" \
                else True
            layers.append(LayerSparsity(
                name=full, kind="experts", shape=tuple(weight.shape), numel=weight.numel(),
                zeros=weight.numel() - int(weight.count_nonzero()),
                valid=valid and not bool(weight.ne(0).logical_and_(~keep).any())))
        model.train(was_training)
        return masks, layers, skipped

    @property
    def mode(self) -> str:
        """``block`` (True), ``layer`` or ``dense`` (False): see the class docstring."""
        if self.sequential is True or self.sequential == "block":
            return "block"
        if self.sequential is False:
            return "dense"
        return "layer"

    def _stats(
        self, model: nn.Module, groups: Sequence[Sequence[str]], candidates: Mapping[str, nn.Module],
        samples: Sequence[Any], calls: Mapping[str, int], stop: bool = True,
    ) -> dict[str, Any]:
        """Statistics of ``groups`` from one pass of ``model`` over ``samples``. The layers of a
        run group read one input tensor: they share one accumulator, fed once. With ``stop``,
        the pass ends at the last hooked layer when every hooked layer is called once."""
        make = ColumnNormAccumulator if self.method == "wanda" else HessianAccumulator
        accs: dict[str, Any] = {}
        hooked: dict[str, nn.Module] = {}
        for group in groups:
            if group[0] not in calls:
                continue
            acc = make(_module_2d(candidates[group[0]], candidates[group[0]].weight).shape[1])
            accs.update({name: acc for name in group})
            hooked[group[0]] = candidates[group[0]]
        once = all(calls[name] == 1 for name in hooked)
        stop_at = next(reversed(hooked)) if stop and once and hooked else None
        _collect(model, hooked, samples, accs, stop_at)
        return accs

    def _global_masks(self, candidates: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
        names = list(candidates)
        flat = [candidates[n].weight.detach().abs().float().reshape(1, -1) for n in names]
        if not flat:
            return {}
        keep = unstructured_mask(torch.cat(flat, dim=1), self.sparsity).reshape(-1)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for name, scores in zip(names, flat):
            size = scores.numel()
            out[name] = _module_2d(candidates[name],
                                   keep[start : start + size].reshape(candidates[name].weight.shape))
            start += size
        return out

    @torch.no_grad()
    def _sparsify_layer(
        self, module: nn.Module, pattern: Pattern, global_keep: torch.Tensor | None, stats: Any
    ) -> torch.Tensor:
        weight = module.weight
        w2 = _module_2d(module, weight.detach()).float()
        if global_keep is not None:
            keep2 = global_keep
            new2 = w2 * keep2
        elif self.method == "magnitude":
            keep2 = mask_from_scores(w2.abs(), pattern, self.sparsity)
            new2 = w2 * keep2
        elif self.method == "wanda":
            keep2 = wanda_mask(w2, stats.norm_sq(), pattern, self.sparsity)
            new2 = w2 * keep2
        else:
            opts = SparseGPTOptions(percdamp=self.percdamp, blocksize=self.obs_blocksize)
            new2, keep2 = sparsegpt_prune(w2, stats.hessian(), pattern, self.sparsity, opts)
        shape = tuple(weight.shape)
        weight.copy_(_module_from_2d(module, new2, shape).to(weight.dtype))
        return _module_from_2d(module, keep2.to(torch.bool), shape).cpu()

    @staticmethod
    def _layer_report(name: str, module: nn.Module, keep: torch.Tensor, pattern: Pattern) -> LayerSparsity:
        weight = module.weight.detach().cpu()
        zeros_where_masked = not bool(weight.ne(0).logical_and_(keep.logical_not()).any())
        if pattern.kind == "nm":
            valid = is_nm_sparse(weight, pattern.n, pattern.m, axis=reduction_axis(module))
        elif pattern.kind == "bsr":
            b = pattern.block
            keep_tiles = keep.reshape(keep.shape[0] // b, b, keep.shape[1] // b, b).any(dim=(1, 3))
            tile_constant = bool((keep == keep_tiles.repeat_interleave(b, 0).repeat_interleave(b, 1)).all())
            valid = tile_constant and is_block_sparse(weight, b, float((~keep_tiles).float().mean()))
        else:
            valid = True
        return LayerSparsity(
            name=name, kind=_kind(module), shape=tuple(weight.shape), numel=weight.numel(),
            # the weight's zeros, not only the mask's: padding rows and SparseGPT's dead
            # input columns were zero already
            zeros=weight.numel() - int(weight.count_nonzero()), valid=valid and zeros_where_masked,
        )


def sparsify(
    model: nn.Module,
    pattern: str = "2:4",
    sparsity: float = 0.5,
    method: str = "magnitude",
    calibration: Iterable[Any] | torch.Tensor | None = None,
    ignore: Sequence[str] = (),
    block_size: int = 16,
    global_: bool = False,
    inplace: bool = False,
    min_numel: int = 0,
    sequential: bool | str = True,
    percdamp: float = 0.01,
    obs_blocksize: int = 128,
) -> SparsifyResult:
    """Sparsify ``model``'s Linear/Conv weights; see :class:`Sparsify` for the options.

    ``calibration`` is an iterable of model inputs (a tensor, a tuple of positional args, or a
    dict of keyword args per item) and is required by ``wanda`` and ``sparsegpt``. The caller's
    model is deep-copied unless ``inplace=True``.
    """
    if isinstance(ignore, str):
        ignore = (ignore,)
    options = Sparsify(
        pattern=pattern, sparsity=sparsity, method=method, ignore=tuple(ignore), block_size=block_size,
        global_=global_, min_numel=min_numel, sequential=sequential, percdamp=percdamp,
        obs_blocksize=obs_blocksize,
    )
    return options(model, calibration, inplace=inplace)


# --------------------------------------------------------------------------- streaming


class ShardedCheckpoint:
    """Lazy access to a directory of ``*.safetensors`` shards (+ optional ``*.index.json``).

    Only the tensors asked for are read, so a block can be loaded without the rest of the model.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputError(f"checkpoint directory {self.directory} does not exist")
        indexes = sorted(self.directory.glob("*.safetensors.index.json"))
        if indexes:
            data = json.loads(indexes[0].read_text())
            self.weight_map: dict[str, str] = dict(data["weight_map"])
        else:
            self.weight_map = {}
            for shard in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    self.weight_map.update({k: shard.name for k in f.keys()})
        if not self.weight_map:
            raise InputError(f"no *.safetensors tensors found in {self.directory}")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly ``names``, opening each shard once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise InputError(f"tensor {name!r} is not in the checkpoint {self.directory}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(str(self.directory / file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors named ``prefix.*``, keyed without the prefix."""
        names = [n for n in self.weight_map if n.startswith(prefix + ".")]
        return {n[len(prefix) + 1 :]: t for n, t in self.load(names).items()}


def _save_shard(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    from secateurs.runtime.io import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp)


def _write_index(directory: Path, weight_map: Mapping[str, str], total_size: int) -> Path:
    index = directory / "model.safetensors.index.json"
    payload = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    from secateurs.runtime.io import atomic_write_text

    atomic_write_text(index, json.dumps(payload, indent=1, sort_keys=True))
    return index


def save_sharded(
    state_dict: Mapping[str, torch.Tensor], directory: str | os.PathLike[str], max_shard_bytes: int = 1 << 30
) -> Path:
    """Write ``state_dict`` as ``model-XXXXX.safetensors`` shards plus ``model.safetensors.index.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(shard, out / file)
        weight_map.update({k: file for k in shard})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    return _write_index(out, weight_map, total)


@dataclass(frozen=True)
class StreamingResult:
    """Masks and report of a streaming run; the sparse checkpoint lives in ``directory``."""

    directory: Path
    masks: Masks = field(repr=False)
    report: SparsityReport


def _next_inputs(output: Any) -> tuple[Any, ...]:
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, (tuple, list)):
        return tuple(output)
    raise InputError(f"a streamed block returned {type(output).__name__}; return a tensor or a tuple")


def sparsify_streaming(
    blocks: Sequence[tuple[str, Callable[[], nn.Module]]],
    checkpoint: str | os.PathLike[str] | ShardedCheckpoint,
    calibration: Iterable[Any] | torch.Tensor | None,
    out_dir: str | os.PathLike[str],
    options: Sparsify | None = None,
) -> StreamingResult:
    """Sparsify a checkpoint one block at a time, holding one block's weights in memory.

    ``blocks`` lists ``(prefix, factory)`` in execution order: ``factory()`` builds the empty
    block (on CPU or ``meta``) whose parameters are the checkpoint tensors named ``prefix.*``;
    block ``i`` takes block ``i-1``'s output (a tensor, or a tuple passed as positional args).
    ``calibration`` holds the inputs of the first block. For each block: load its tensors, run
    the per-layer procedure of :class:`Sparsify` on it with the current activations, write the
    sparse block to ``out_dir`` as its own shard, then push the activations through the sparse
    block and free it. Tensors outside every block are copied unchanged. The masks equal those
    of an in-memory run on ``nn.Sequential`` of the same blocks.
    """
    opts = options or Sparsify()
    pattern = opts.parsed()
    samples = [s if isinstance(s, (tuple, list, Mapping)) else (s,) for s in _materialise(calibration)]
    if opts.method != "magnitude" and not samples:
        raise InputError(f"method={opts.method!r} needs calibration=<inputs of the first block>")
    if opts.global_:
        raise InputError("global_=True is not available when streaming; sparsify per layer instead")
    ckpt = checkpoint if isinstance(checkpoint, ShardedCheckpoint) else ShardedCheckpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ignore = set(opts.ignore)
    masks: Masks = {}
    layers: list[LayerSparsity] = []
    skipped: list[SkippedLayer] = []
    weight_map: dict[str, str] = {}
    total_size = 0
    model_params = 0
    for i, (prefix, factory) in enumerate(blocks):
        block = factory()
        tensors = ckpt.load_prefix(prefix)
        if not tensors:
            raise InputError(f"block {prefix!r}: the checkpoint has no tensors named '{prefix}.*'")
        on_meta = any(p.is_meta for p in block.parameters())
        block.load_state_dict(tensors, strict=True, assign=on_meta)
        block_masks, block_layers, block_skipped = opts._run(block, samples, pattern, ignore,
                                                             prefix=prefix + ".", whole_block=True)
        masks.update(block_masks)
        layers += block_layers
        skipped += block_skipped
        file = f"block-{i:05d}.safetensors"
        state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
        _save_shard(state, out / file)
        weight_map.update({k: file for k in state})
        total_size += sum(t.numel() * t.element_size() for t in state.values())
        model_params += sum(p.numel() for p in block.parameters())
        if i + 1 < len(blocks) and samples:
            block.eval()
            with torch.no_grad():
                samples = [_next_inputs(call_batch(block, s)) for s in samples]
        del block, tensors, state
    rest = [n for n in ckpt.names() if n not in weight_map]
    for j, name in enumerate(rest):
        tensor = ckpt.load([name])[name]
        file = f"rest-{j:05d}.safetensors"
        _save_shard({name: tensor}, out / file)
        weight_map[name] = file
        total_size += tensor.numel() * tensor.element_size()
        model_params += tensor.numel()
    _write_index(out, weight_map, total_size)
    save_masks(masks, out / "masks.pt")
    report = SparsityReport(
        pattern=str(pattern), method=opts.method, target_sparsity=opts.target_sparsity,
        layers=tuple(layers), skipped=tuple(skipped), model_params=model_params,
    )
    return StreamingResult(out, masks, report)
