"""Built-in model zoo: small, deterministic models for tests, full-size ones for benchmarks.

Each entry is a :class:`ZooModel`: ``build()`` returns a fresh model in eval mode with
deterministic weights, non-trivial BatchNorm statistics and non-zero biases;
``example_inputs()`` returns deterministic inputs. Entries tagged ``"bench"`` (names ending in
``_full``) reproduce real architectures' shapes and are meant for ``with torch.device("meta"):``
analysis or benchmarks, not for unit tests. Entries tagged ``"fx-untraceable"`` need
``torch.export`` instead of ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

from secateurs.errors import InputError
from secateurs.zoo import (
    attention_wild,
    cnn,
    conv_wild,
    foundation,
    llama,
    misc,
    mixers,
    mobile,
    public_lookalikes,
    timm_wild,
    transformer,
)
from secateurs.zoo._common import ZooModel, randomize_affine, randomize_bn_stats

__all__ = ["ZooModel", "ZOO", "get", "names", "randomize_bn_stats", "randomize_affine"]


def _collect() -> dict[str, ZooModel]:
    zoo: dict[str, ZooModel] = {}
    for family in (cnn, mobile, transformer, llama, misc, attention_wild, conv_wild,
                   public_lookalikes, timm_wild, mixers, foundation):
        for entry in family.ENTRIES:
            if entry.name in zoo:
                raise RuntimeError(f"zoo model {entry.name!r} is registered twice")
            zoo[entry.name] = entry
    return zoo


ZOO: dict[str, ZooModel] = _collect()


def get(name: str) -> ZooModel:
    """The zoo entry called ``name``; raises :class:`InputError` listing the known names."""
    try:
        return ZOO[name]
    except KeyError:
        known = ", ".join(sorted(ZOO))
        raise InputError(f"unknown zoo model {name!r}; known models: {known}") from None


def names(tag: str | None = None) -> list[str]:
    """Sorted names of all zoo models, or of those carrying ``tag``."""
    return sorted(n for n, entry in ZOO.items() if tag is None or tag in entry.tags)
