"""Recovery after structured pruning without distillation: re-fit every pruned layer's output
projections by ridge least squares, layer by layer, against the dense model.

For layer ``i`` in order, with ``h_i`` the *pruned* model's input to that layer (so what the
earlier layers still get wrong is part of the data):

* run the **dense** layer ``i`` on ``h_i`` and record ``s_d``, the sum "projection output +
  residual" after each sublayer (the input of the norm that follows it; for pre-LN layers the
  MLP sum is the layer output);
* run the pruned layer on ``h_i`` and record, for the projection, its input ``x``, its output
  ``y`` and the same sum ``s_p``; the residual is ``s_p - y``, so the output the projection
  should give is ``t = s_d - (s_p - y)``;
* fit ``W, b = argmin Σ‖W x + b − t‖² + λ‖W − W0‖²`` over real (unpadded) calibration tokens,
  with ``x`` centred so ``b = mean(t) − W mean(x)`` is not regularised (bias compensation) and
  ``λ = alpha · mean diag(Xcᵀ Xc)``; projections without a bias are fitted without intercept.

The attention output projection (``attention.output.dense``, ``o_proj``, ``attn.c_proj``) is
fitted first; the layer is then re-run and the MLP output projection (``output.dense``,
``down_proj``, ``fc2``, ``mlp.c_proj``) is fitted against the same dense sums, so it also
absorbs what the attention refit left. Sums of squares are accumulated in float64 per
projection (``(F+1)²`` numbers), never per token, so calibration size is limited by time only.
The fit never increases the calibration reconstruction error (``W0`` is a feasible point of the
ridge objective); ``RecoveryReport`` carries both errors per projection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.hf.criteria import token_mask
from secateurs.hf.layout import block_list as _block_list
from secateurs.hf.layout import hidden_size as _hidden_size
from secateurs.passes.calibration import StopForward, run_hooked

__all__ = ["SITES", "ProjectionFit", "RecoveryReport", "refit_output_projections"]

# family -> ((projection, module whose input is "projection output + residual"; None: the
# layer's output), ...) in execution order, names relative to one layer
SITES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "bert": (("attention.output.dense", "attention.output.LayerNorm"),
             ("output.dense", "output.LayerNorm")),
    "llama": (("self_attn.o_proj", "post_attention_layernorm"), ("mlp.down_proj", None)),
    "qwen2": (("self_attn.o_proj", "post_attention_layernorm"), ("mlp.down_proj", None)),
    "mistral": (("self_attn.o_proj", "post_attention_layernorm"), ("mlp.down_proj", None)),
    "vit": (("attention.o_proj", "layernorm_after"), ("mlp.fc2", None)),
    "gpt2": (("attn.c_proj", "ln_2"), ("mlp.c_proj", None)),
}


@dataclass(frozen=True)
class ProjectionFit:
    name: str
    tokens: int
    features: int
    error_before: float  # Σ‖Wx + b − t‖² / Σ‖t‖² on the calibration tokens
    error_after: float
    ridge: float  # λ used


@dataclass(frozen=True)
class RecoveryReport:
    fits: tuple[ProjectionFit, ...]
    seconds: float

    @property
    def error_before(self) -> float:
        return sum(f.error_before for f in self.fits) / max(len(self.fits), 1)

    @property
    def error_after(self) -> float:
        return sum(f.error_after for f in self.fits) / max(len(self.fits), 1)


def _layer_inputs(model: nn.Module, layer: nn.Module,
                  batches: list[Any]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of ``layer``'s first call on every batch."""
    got: list[tuple[tuple, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((args, kwargs))
        raise StopForward

    run_hooked(model, batches, [(layer, hook)])
    if len(got) != len(batches):
        raise InputError(f"{type(layer).__name__} was not called once per calibration batch")
    return got


def _hidden(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: tuple[tuple, dict], h: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _run(layer: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    out = layer(*call[0], **call[1])
    return out[0] if isinstance(out, (tuple, list)) else out


def _rows(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    t = t.detach()
    if keep is not None and tuple(t.shape[:-1]) == tuple(keep.shape):
        t = t[keep]
    return t.reshape(-1, t.shape[-1]).double()


def _sum_site(layer: nn.Module, site: str | None, store: dict[str, torch.Tensor]):
    """Hook recording the sum after a sublayer into ``store["s"]``."""
    if site is None:
        def out_hook(mod, args, out):
            store["s"] = out[0] if isinstance(out, (tuple, list)) else out
        return layer.register_forward_hook(out_hook)

    def pre_hook(mod, args):
        store["s"] = args[0]
    return layer.get_submodule(site).register_forward_pre_hook(pre_hook)


def _weight_t(proj: nn.Module) -> torch.Tensor:
    """[in, out] view of a Linear or GPT-2 Conv1D weight, float64."""
    w = proj.weight.detach()
    return (w if type(proj).__name__ == "Conv1D" else w.T).double()


@torch.no_grad()
def _set_weight(proj: nn.Module, wt: torch.Tensor, b: torch.Tensor | None) -> None:
    w = wt if type(proj).__name__ == "Conv1D" else wt.T
    proj.weight.copy_(w.to(proj.weight.dtype))
    if b is not None and proj.bias is not None:
        proj.bias.copy_(b.to(proj.bias.dtype))


def _fit(proj: nn.Module, xtx: torch.Tensor, xtt: torch.Tensor, tt: float, n: int,
         alpha: float) -> tuple[float, float, float]:
    """Ridge refit from the augmented sums (last row/col: the constant 1). Returns
    (relative error before, after, λ)."""
    f = xtx.shape[0] - 1
    w0 = _weight_t(proj)
    has_bias = getattr(proj, "bias", None) is not None
    b0 = proj.bias.detach().double() if has_bias else torch.zeros(w0.shape[1], dtype=torch.float64)
    wa0 = torch.cat([w0, b0[None]], 0)

    def err(wa: torch.Tensor) -> float:
        return float((wa * (xtx @ wa)).sum() - 2 * (wa * xtt).sum() + tt) / max(tt, 1e-30)

    before = err(wa0)
    if has_bias:
        mu_x, mu_t = xtx[:f, f] / n, xtt[f] / n
        cxx = xtx[:f, :f] - n * torch.outer(mu_x, mu_x)
        cxt = xtt[:f] - n * torch.outer(mu_x, mu_t)
    else:
        cxx, cxt = xtx[:f, :f], xtt[:f]
    lam = alpha * float(cxx.diagonal().mean())
    eye = torch.eye(f, dtype=torch.float64)
    wt = torch.linalg.solve(cxx + lam * eye, cxt + lam * w0)
    b = (mu_t - mu_x @ wt) if has_bias else None
    wa = torch.cat([wt, (b if b is not None else b0)[None]], 0)
    after = err(wa)
    if after > before:  # only rounding can do this (W0 is feasible); keep what we had
        return before, before, lam
    _set_weight(proj, wt, b)
    return before, after, lam


def refit_output_projections(dense: nn.Module, pruned: nn.Module, calibration: list[Any], *,
                             alpha: float = 0.1, sites: tuple | None = None) -> RecoveryReport:
    """Re-fit ``pruned``'s attention and MLP output projections in place, layer by layer, so
    each pruned layer reproduces the dense layer on the pruned model's own inputs (see the
    module docstring). ``calibration``: batches as for ``prune_hf`` (dicts of tokenizer output
    keep padding out through ``attention_mask``); use more real tokens than the widest
    projection input (e.g. the kept MLP width). ``alpha``: ridge strength relative to the mean
    input variance (0.1 was best on a held-out validation set for all-MiniLM-L6-v2 at 70% and
    50% MACs, ``tools/bench/hf_minilm.py``). ``sites`` overrides the family table ``SITES``."""
    t0 = time.perf_counter()
    family = getattr(pruned.config, "model_type", "")
    sites = sites or SITES.get(family)
    if sites is None:
        raise InputError(f"no output-projection table for model_type {family!r}; pass "
                         f"sites=((projection, norm or None), ...) (known: {sorted(SITES)})")
    if _hidden_size(dense.config) != _hidden_size(pruned.config):
        raise InputError("refit_output_projections needs the dense hidden size "
                         f"({_hidden_size(dense.config)} vs {_hidden_size(pruned.config)}): the "
                         "dense sums are the targets")
    d_layers, p_layers = _block_list(dense)[1], _block_list(pruned)[1]
    if len(d_layers) != len(p_layers):
        raise InputError(f"layer counts differ ({len(d_layers)} vs {len(p_layers)}); "
                         "recovery pairs layer i with layer i")
    p_name = _block_list(pruned)[0]
    masks = [token_mask(b) for b in calibration]
    p_calls = _layer_inputs(pruned, p_layers[0], calibration)
    d_calls = _layer_inputs(dense, d_layers[0], calibration)  # dense mask / rotary tables
    fits = []
    with torch.no_grad():
        for i, (d_layer, p_layer) in enumerate(zip(d_layers, p_layers, strict=True)):
            targets: list[list[torch.Tensor]] = [[] for _ in sites]
            for pc, dc, keep in zip(p_calls, d_calls, masks, strict=True):
                stores = [{} for _ in sites]
                hooks = [_sum_site(d_layer, site, st) for (_, site), st in zip(sites, stores)]
                try:
                    _run(d_layer, _with_hidden(dc, _hidden(pc)))
                finally:
                    for h in hooks:
                        h.remove()
                for k, st in enumerate(stores):
                    targets[k].append(_rows(st["s"], keep))
            for k, (proj_name, site) in enumerate(sites):
                proj = p_layer.get_submodule(proj_name)
                xtx = xtt = None
                tt, n = 0.0, 0
                for j, (pc, keep) in enumerate(zip(p_calls, masks, strict=True)):
                    st: dict[str, torch.Tensor] = {}

                    def grab(mod, args, out, st=st):
                        st["x"], st["y"] = args[0], out

                    hooks = [proj.register_forward_hook(grab), _sum_site(p_layer, site, st)]
                    try:
                        _run(p_layer, pc)
                    finally:
                        for h in hooks:
                            h.remove()
                    x = _rows(st["x"], keep)
                    t = targets[k][j] - _rows(st["s"], keep) + _rows(st["y"], keep)
                    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
                    xtx = xa.T @ xa if xtx is None else xtx + xa.T @ xa
                    xtt = xa.T @ t if xtt is None else xtt + xa.T @ t
                    tt += float((t * t).sum())
                    n += len(x)
                assert xtx is not None and xtt is not None
                before, after, lam = _fit(proj, xtx, xtt, tt, n, alpha)
                fits.append(ProjectionFit(f"{p_name}.{i}.{proj_name}", n, xtx.shape[0] - 1,
                                          before, after, lam))
            p_calls = [_with_hidden(pc, _run(p_layer, pc)) for pc in p_calls]
    return RecoveryReport(tuple(fits), time.perf_counter() - t0)

