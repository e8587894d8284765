"""The pruning plan: the decision as data.

``removed`` maps every sliced tensor, by its source name (the original model's
``named_parameters()``/``named_buffers()`` name, or the ONNX initializer name), to the indices
removed along each dim. ``constants`` maps graph nodes (FX node names / ONNX node names) to the
canonical constants they need afterwards (reshape sizes, split sizes, group counts, module
widths). A plan is JSON-serialisable, can be applied again (``apply_plan``), audited and diffed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secateurs.errors import PlanError
from secateurs.passes.channel_rules import rule_for
from secateurs.passes.group_channels import Analysis

__all__ = ["Plan", "build_plan"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Plan:
    removed: dict[str, dict[int, list[int]]]
    constants: dict[str, dict[str, Any]] = field(default_factory=dict)
    frontend: str = "fx"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self, indent: int | None = 2) -> str:
        doc = {
            "format": "secateurs-plan",
            "version": FORMAT_VERSION,
            "frontend": self.frontend,
            "removed": {k: {str(d): list(map(int, v)) for d, v in dims.items()}
                        for k, dims in self.removed.items()},
            "constants": {k: {a: _encode(v) for a, v in c.items()}
                          for k, c in self.constants.items()},
            "meta": self.meta,
        }
        return json.dumps(doc, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != "secateurs-plan":
            raise PlanError("not a secateurs plan (missing \"format\": \"secateurs-plan\")")
        if doc.get("version") != FORMAT_VERSION:
            raise PlanError(f"plan format version {doc.get('version')} is not supported "
                            f"(this secateurs reads version {FORMAT_VERSION})")
        removed = {k: {int(d): list(v) for d, v in dims.items()}
                   for k, dims in doc["removed"].items()}
        constants = {k: {a: _decode(v) for a, v in c.items()}
                     for k, c in doc.get("constants", {}).items()}
        return cls(removed, constants, doc.get("frontend", "fx"), doc.get("meta", {}))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    @property
    def n_removed(self) -> int:
        return sum(len(v) for dims in self.removed.values() for v in dims.values())


def _encode(v: Any) -> Any:
    if isinstance(v, slice):
        return {"slice": [v.start, v.stop, v.step]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and "slice" in v:
        return slice(*v["slice"])
    if isinstance(v, dict) and v.get("ellipsis"):
        return Ellipsis
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _free_units(analysis: Analysis) -> np.ndarray:
    """As a removed-atoms mask: the unpinned units of the groups that touch a parameter."""
    return analysis.removed_atoms({g.id: np.nonzero(~g.pinned)[0]
                                   for g in analysis.groups if g.members})


def _all_free(atoms: np.ndarray, free: np.ndarray) -> bool:
    """Every atom of an ``atoms_of`` matrix (-1 padded) is marked in ``free``: atoms in no
    group at all (the batch of a graph input, spatial positions) are not."""
    atoms = atoms[atoms >= 0]
    return atoms.size > 0 and bool(free[atoms].all())


def build_plan(analysis: Analysis, removed_units: dict[int, np.ndarray],
               meta: dict[str, Any] | None = None) -> Plan:
    """Turn chosen units into sliced indices and rewritten constants."""
    res = analysis.resolution
    gone = analysis.removed_atoms(removed_units)
    removed: dict[str, dict[int, list[int]]] = {}
    pd = analysis.param_dims
    if pd is not None and len(pd.labels):  # every parameter dim in one gather
        dead = np.nonzero(~res.alive(pd.labels, gone))[0]
        vec = np.searchsorted(pd.starts, dead, side="right") - 1
        cuts = np.r_[0, np.nonzero(np.diff(vec))[0] + 1, len(vec)] if len(vec) else []
        for a, b in zip(cuts[:-1], cuts[1:]):
            k = int(vec[a])
            removed.setdefault(pd.names[pd.owner[k]], {})[int(pd.dims[k])] = \
                (dead[a:b] - pd.starts[k]).tolist()
    else:
        for pname, vname in analysis.param_values.items():
            for d, labels in enumerate(analysis.labels[vname]):
                alive = res.alive(labels, gone)
                if not alive.all():
                    removed.setdefault(pname, {})[d] = np.nonzero(~alive)[0].tolist()
    constants: dict[str, dict[str, Any]] = {}
    weights: np.ndarray | None = None  # free-unit mask for channel_dims, made on first use
    for node in analysis.graph.nodes:
        rule = rule_for(node.op)
        keep = analysis.keep.get(node.name)
        if rule.rewrite is None or not keep:
            continue
        before = rule.rewrite(node, keep, len)
        after = rule.rewrite(node, keep, lambda v: int(res.alive(v, gone).sum()))
        if after != before:
            if "shape" in after and "out" in keep:
                # which dims are channels (sizes the weights fix): a size the model computes at
                # run time there (``C // heads`` of another, pruned tensor's width) becomes
                # the new constant even where this dim kept its size. A dim is a channel dim
                # only if every atom of every one of its labels is an unpinned unit of a
                # parameter group: one atom of the batch, of tokens or of spatial positions
                # (``batch x patch_area`` in MobileViT's unfold, a batch x heads merge) keeps
                # the computed size, which changes with the input at run time
                if weights is None:
                    weights = _free_units(analysis)
                after["channel_dims"] = [i for i, v in enumerate(keep["out"])
                                         if _all_free(res.atoms_of(v), weights)]
            constants[node.name] = after
    return Plan(removed, constants, analysis.graph.frontend, dict(meta or {}))
