"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019;
Frankle et al. 2020 for rewinding to an early training step).

One round of :meth:`LotteryTicket.step`: train with the current masks held (masked weights
stay exactly zero: their gradients are zeroed and the mask is re-applied after every optimiser
step the training loop reports), remove ``prune_fraction`` of the *surviving* weights with the
smallest magnitude, then rewind the survivors to their values at initialisation
(``rewind_to="init"``) or at training step ``k`` of the first round (``rewind_to=k``). After
``n`` rounds a fraction ``(1 - prune_fraction) ** n`` of the weights survive.

Masks are data: ``dict[name, bool tensor]`` (True = kept) over the parameter source names, the
same form as the unstructured masks of ``secateurs.passes.sparsify``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from secateurs.errors import InputError

__all__ = ["LotteryTicket", "TrainFn"]

TrainFn = Callable[[nn.Module, Callable[[int], None]], Any]
"""``train_fn(model, on_step)``: train ``model`` in place, calling ``on_step(i)`` after the
``i``-th optimiser step (0-based)."""


def _default_targets(model: nn.Module) -> list[str]:
    return [f"{name}.weight" if name else "weight" for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd))]


class LotteryTicket:
    """Iterative magnitude pruning with weight rewinding on ``model`` (modified in place).

    ``params`` names the parameters to mask (default: every conv and linear weight);
    ``scope="layer"`` prunes each parameter by the same fraction, ``"global"`` ranks all
    surviving weights together.
    """

    def __init__(self, model: nn.Module, prune_fraction: float = 0.2,
                 rewind_to: str | int = "init", params: Iterable[str] | None = None,
                 scope: str = "layer") -> None:
        if not 0.0 < prune_fraction < 1.0:
            raise InputError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
        if rewind_to != "init" and not (isinstance(rewind_to, int) and rewind_to >= 0):
            raise InputError(f"rewind_to must be 'init' or a training step >= 0, got "
                             f"{rewind_to!r}")
        if scope not in ("layer", "global"):
            raise InputError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.model = model
        self.prune_fraction = prune_fraction
        self.rewind_to = rewind_to
        self.scope = scope
        named = dict(model.named_parameters())
        names = list(params) if params is not None else _default_targets(model)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise InputError(f"LotteryTicket: no parameters named {unknown}")
        self.params = {n: named[n] for n in names}
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.rewind_state: dict[str, torch.Tensor] | None = None
        if rewind_to == "init":
            self.rewind_state = self._snapshot()
        self.rounds = 0

    # ------------------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def apply_masks(self) -> None:
        """Zero every masked weight."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.mul_(self.masks[n])

    @property
    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def _on_step(self, i: int) -> None:
        self.apply_masks()
        if self.rounds == 0 and self.rewind_to == i and self.rewind_state is None:
            self.rewind_state = self._snapshot()

    def _prune(self) -> None:
        if self.scope == "global":
            alive = torch.cat([p.detach().abs()[self.masks[n]].flatten()
                               for n, p in self.params.items()])
            k = int(self.prune_fraction * alive.numel())
            if k == 0:
                return
            threshold = torch.kthvalue(alive.float(), k).values
            for n, p in self.params.items():
                self.masks[n] &= p.detach().abs() > threshold
            return
        for n, p in self.params.items():
            alive = p.detach().abs()[self.masks[n]]
            k = int(self.prune_fraction * alive.numel())
            if k == 0:
                continue
            # remove exactly the k smallest survivors (stable under ties)
            flat = torch.where(self.masks[n], p.detach().abs(),
                               torch.full_like(p, float("inf"))).flatten()
            drop = torch.argsort(flat, stable=True)[:k]
            mask = self.masks[n].flatten().clone()
            mask[drop] = False
            self.masks[n] = mask.view_as(p)

    def _rewind(self) -> None:
        assert self.rewind_state is not None
        self.model.load_state_dict(self.rewind_state)
        self.apply_masks()

    # ------------------------------------------------------------------------------------

    def step(self, train_fn: TrainFn) -> dict[str, torch.Tensor]:
        """Train, prune ``prune_fraction`` of the survivors, rewind; return the masks."""
        hooks = [p.register_hook(lambda g, m=self.masks[n]: g * m)
                 for n, p in self.params.items()]
        try:
            self.apply_masks()
            train_fn(self.model, self._on_step)
            self.apply_masks()
        finally:
            for h in hooks:
                h.remove()
        if self.rewind_state is None:
            raise InputError(f"rewind_to={self.rewind_to}: training never reported step "
                             f"{self.rewind_to} through on_step; call on_step(i) after each "
                             "optimiser step")
        self._prune()
        self._rewind()
        self.rounds += 1
        return self.masks
