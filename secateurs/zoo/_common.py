"""Shared machinery of the model zoo: the entry record, seeded builders and weight randomisation.

Freshly initialised networks are too regular to test a pruner against: BatchNorm starts as the
identity (running mean 0, variance 1, weight 1, bias 0), LayerNorm/GroupNorm/RMSNorm affine
parameters are 1 and 0, and attention in/out projection biases start at zero. A pruner that
forgets to slice a BN running mean or an attention bias then still gives exact results. Every
zoo builder therefore finishes with :func:`randomize_bn_stats` and :func:`randomize_affine`,
which give every such tensor deterministic, non-trivial values.

Randomisation skips tensors on the ``meta`` device (they have no values), so every builder also
works under ``with torch.device("meta"):`` — the way a full-size network is analysed without
allocating its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from secateurs.zoo.layers import RMSNorm

__all__ = [
    "ZooModel",
    "randomize_bn_stats",
    "randomize_affine",
    "seeded_build",
    "seeded_randn",
    "seeded_randint",
]

_NORMS_WITH_AFFINE: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, RMSNorm)


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the zoo.

    ``build`` returns a fresh model in ``eval()`` mode with deterministic weights;
    ``example_inputs`` returns deterministic CPU inputs for it.
    """

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]]
    description: str
    tags: frozenset[str]


def _fill_uniform_(tensor: torch.Tensor, low: float, high: float, gen: torch.Generator) -> None:
    """Overwrite ``tensor`` with U(low, high) drawn from ``gen``; meta tensors are left alone."""
    if tensor.is_meta:
        return
    values = torch.rand(tensor.shape, generator=gen, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        tensor.copy_(values * (high - low) + low)


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, in place.

    running_mean ~ U(-0.5, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5),
    bias ~ U(-0.5, 0.5); deterministic for a given ``seed`` and module order. Returns ``model``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        if module.running_mean is not None:
            _fill_uniform_(module.running_mean, -0.5, 0.5, gen)
        if module.running_var is not None:
            _fill_uniform_(module.running_var, 0.5, 2.0, gen)
        if module.weight is not None:
            _fill_uniform_(module.weight, 0.5, 1.5, gen)
        if module.bias is not None:
            _fill_uniform_(module.bias, -0.5, 0.5, gen)
    return model


def randomize_affine(model: nn.Module, seed: int = 1) -> nn.Module:
    """Make every bias non-zero and every LayerNorm/GroupNorm/RMSNorm weight non-unit, in place.

    Every parameter whose name ends in ``bias`` (conv, linear, attention ``in_proj_bias``, norm
    biases) ~ U(-0.2, 0.2); norm weights ~ U(0.5, 1.5). BatchNorm is left to
    :func:`randomize_bn_stats`. Deterministic for a given ``seed``. Returns ``model``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("bias"):
                _fill_uniform_(param, -0.2, 0.2, gen)
            elif name == "weight" and isinstance(module, _NORMS_WITH_AFFINE):
                _fill_uniform_(param, 0.5, 1.5, gen)
    return model


def seeded_build(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """Wrap ``factory`` into a zoo builder: seeded init, randomised norms and biases, eval mode.

    The global RNG is forked, so building a zoo model never disturbs the caller's random stream.
    """

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
        randomize_bn_stats(model, seed=seed)
        randomize_affine(model, seed=seed + 1)
        return model.eval()

    build.__doc__ = factory.__doc__
    build.__name__ = getattr(factory, "__name__", "build")
    return build


def seeded_randn(*shape: int, seed: int = 0) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Example-input factory: one standard-normal CPU tensor of ``shape``."""

    def example_inputs() -> tuple[torch.Tensor, ...]:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return (torch.randn(shape, generator=gen, device="cpu"),)

    return example_inputs


def seeded_randint(high: int, *shape: int, seed: int = 0) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Example-input factory: one int64 CPU tensor of ``shape`` with values in ``[0, high)``."""

    def example_inputs() -> tuple[torch.Tensor, ...]:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return (torch.randint(0, high, shape, generator=gen, device="cpu"),)

    return example_inputs


def lookalike(name: str, factory: Callable[[], nn.Module],
              inputs: Callable[[], tuple[torch.Tensor, ...]], description: str,
              *tags: str) -> ZooModel:
    """A zoo entry for a look-alike of a public architecture (tagged ``public-lookalike``),
    built with deterministic weights by ``seeded_build``."""
    return ZooModel(name=name, build=seeded_build(factory), example_inputs=inputs,
                    description=description, tags=frozenset({"public-lookalike", *tags}))
