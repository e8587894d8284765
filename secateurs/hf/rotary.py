"""Head-dim pruning and what a rebuilt attention computes: the attention scale and the rotary
frequencies (see the comment block below)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from secateurs.errors import InputError
from secateurs.hf.layout import is_attention

__all__ = ["rotary_modules", "check_head_dim_pruning", "rope_frequencies", "express_rotary",
           "fold_qk_scale"]


# ---------------------------------------------------------------- attention scale and rotary
#
# Removing head dims changes what a rebuilt attention module computes from the config:
# ``scaling = head_dim ** -0.5`` and the rotary frequencies ``inv_freq`` (recomputed from
# ``head_dim`` and ``rope_theta`` on load; the buffer is not saved). The pruned model keeps
# the original ``1/sqrt(D)`` and the kept frequencies, expressed so that a rebuild reproduces
# them:
#
# * rotary models: ``rope_type: "longrope"`` with ``short_factor = long_factor = f`` where
#   ``1 / (f_j * theta ** (2j / D')) == inv_freq[kept_j]`` (f is nudged in float32 until
#   HF's own float32 formula returns the kept frequency bit for bit), and
#   ``attention_factor = a0 * (D'/D) ** 0.25``: cos and sin are scaled by it, so q·k gains
#   ``sqrt(D'/D)``, which turns the rebuilt ``D' ** -0.5`` back into ``D ** -0.5``;
# * models without rotary: q (rows and bias) is multiplied by ``sqrt(D'/D)`` and the module's
#   ``scaling`` set to the architecture's value for ``D'``.
#
# The in-memory model is then rebuilt the same way (a new rotary module from the new config),
# so the saved and reloaded models compute bit-identical frequencies. RoPE types whose
# frequencies depend on the sequence length through ``head_dim`` at run time ("dynamic"),
# partial rotary and per-layer-type rope parameters cannot be expressed: head-dim pruning
# refuses them (``InputError``) before touching the model.


def rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "rope_type")]


def check_head_dim_pruning(model: nn.Module) -> None:
    """Raise ``InputError`` when head dims of ``model`` cannot be removed in a way its config
    can describe (so that ``save_pretrained`` + ``from_pretrained`` reproduce it)."""
    if not rotary_modules(model):
        return
    rp = getattr(model.config, "rope_parameters", None) or {}
    if not isinstance(rp.get("rope_type"), str):
        raise InputError("head-dim pruning: rope_parameters are set per layer type "
                         f"({sorted(rp)}); one rotary frequency set cannot describe them. "
                         "Prune heads and MLP neurons instead (head_dim=None).")
    if "dynamic" in rp["rope_type"]:
        raise InputError(f"head-dim pruning: rope_type {rp['rope_type']!r} recomputes the "
                         "rotary frequencies from head_dim at run time, so no config can keep "
                         "the pruned set; prune heads and MLP neurons instead (head_dim=None).")
    if float(rp.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise InputError("head-dim pruning: partial rotary embeddings "
                         f"(partial_rotary_factor={rp['partial_rotary_factor']}) are not "
                         "supported; prune heads and MLP neurons instead (head_dim=None).")


def rope_frequencies(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(short, long, attention factor) the config gives now, on CPU (works for meta models)."""
    rot = rotary_modules(model)
    if not rot:
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg, mod = model.config, rot[0][1]
    rtype = cfg.rope_parameters["rope_type"]
    if rtype == "default":
        short, attn = type(mod).compute_default_rope_parameters(cfg)
        return short.float(), short.float(), float(attn)
    init = ROPE_INIT_FUNCTIONS[rtype]
    short, attn = init(cfg, torch.device("cpu"))
    long = short
    if rtype == "longrope":
        omax = cfg.rope_parameters["original_max_position_embeddings"]
        long, _ = init(cfg, torch.device("cpu"), seq_len=omax + 1)
    return short.float(), long.float(), float(attn)


def _longrope_factors(target: torch.Tensor, theta: float, dim: int) -> list[float]:
    """Per-frequency factors f such that HF's float32 ``1.0 / (f * theta ** (arange(0, dim, 2)
    / dim))`` is ``target``: the float32 neighbours of the exact quotient are tried and the
    closest kept (bit-exact for most frequencies, else one float32 step away)."""
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    pw = theta ** shape
    f = (1.0 / (target.double() * pw.double())).float()
    cands = [f]
    lo = hi = f
    for _ in range(4):
        lo = torch.nextafter(lo, torch.zeros_like(lo))
        hi = torch.nextafter(hi, torch.full_like(hi, float("inf")))
        cands += [lo, hi]
    stack = torch.stack(cands)
    err = ((1.0 / (stack * pw)).double() - target.double()).abs()
    best = stack.gather(0, err.argmin(0, keepdim=True))[0]
    return [float(v) for v in best]


def express_rotary(model: nn.Module, before: tuple[torch.Tensor, torch.Tensor, float],
                    kept: list[int], old_hd: int, new_hd: int) -> dict[str, Any]:
    """New rope_parameters for the kept frequencies and the lost ``1/sqrt`` factor; rebuild
    the rotary modules from them."""
    cfg = model.config
    short, long, attn = before
    rp = dict(cfg.rope_parameters)
    theta = float(rp["rope_theta"])
    idx = torch.as_tensor(kept, dtype=torch.long)
    new = {"rope_type": "longrope", "rope_theta": theta,
           "short_factor": _longrope_factors(short[idx], theta, new_hd),
           "long_factor": _longrope_factors(long[idx], theta, new_hd),
           "factor": float(rp.get("factor") or 1.0) if rp["rope_type"] == "longrope" else 1.0,
           "attention_factor": attn * (new_hd / old_hd) ** 0.25,
           "original_max_position_embeddings": int(
               rp.get("original_max_position_embeddings") or cfg.max_position_embeddings)}
    cfg.rope_parameters = new
    for name, mod in rotary_modules(model):
        device = mod.inv_freq.device
        rebuilt = type(mod)(cfg).to(device)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], rebuilt)
        if device.type != "meta" and not torch.allclose(rebuilt.inv_freq.cpu(), short[idx],
                                                        rtol=1e-6, atol=0):
            raise InputError(f"{name}: rebuilt rotary frequencies differ from the kept ones")
    for mod in model.modules():  # the rebuilt D' ** -0.5; the rotary factor restores D ** -0.5
        if is_attention(mod):
            mod.scaling = float(mod.scaling) * math.sqrt(old_hd / new_hd)
    return new



@torch.no_grad()
def fold_qk_scale(model: nn.Module, old_hd: int, new_hd: int) -> dict[str, list[Any]]:
    """Models without rotary: q *= sqrt(D'/D) and ``scaling`` becomes the rebuilt value.

    Returns what was scaled, ``{parameter name: [factor, dim, stop]}`` (positions ``[:stop]``
    of ``dim``, all of them for ``None``), so ``shards.prune_checkpoint`` scales the streamed
    tensors the same way."""
    c = math.sqrt(new_hd / old_hd)
    scaled: dict[str, list[Any]] = {}

    def scale(name: str, t: torch.Tensor, dim: int, stop: int | None) -> None:
        t.narrow(dim, 0, t.shape[dim] if stop is None else stop).mul_(c)
        scaled[name] = [c, dim, stop]

    for name, mod in model.named_modules():
        if not is_attention(mod):
            continue
        if getattr(mod.config, "model_type", "") == "gpt2" and \
                not getattr(mod.config, "scale_attn_weights", True):
            continue  # GPT-2 without scaling: nothing depends on head_dim
        if hasattr(mod, "c_attn"):  # GPT-2 Conv1D [in, 3 * width]: q is the first third
            scale(f"{name}.c_attn.weight", mod.c_attn.weight, 1, mod.split_size)
            scale(f"{name}.c_attn.bias", mod.c_attn.bias, 0, mod.split_size)
        else:
            q_name = "q_proj" if hasattr(mod, "q_proj") else "query"
            q = getattr(mod, q_name)
            scale(f"{name}.{q_name}.weight", q.weight, 0, None)
            if q.bias is not None:
                scale(f"{name}.{q_name}.bias", q.bias, 0, None)
        scaling = float(mod.scaling) / c
        if math.isclose(scaling, new_hd ** -0.5, rel_tol=1e-12):
            scaling = new_hd ** -0.5  # bit for bit what a rebuild computes
        mod.scaling = scaling
    return scaled

