"""Channel labels: the data the dependency analysis propagates.

Every dim of every tensor value carries a *label vector*: one integer label per position along
that dim. Rules (``channel_rules``) create labels, copy, slice, concatenate and tile label
vectors, and record *unifications* (two positions must be removed together) — exactly the way
shape propagation moves sizes around.

Three kinds of facts are recorded, never resolved eagerly:

* ``unify(a, b)``: position-wise equality of two label vectors (residual add, BN after conv,
  contraction of q·k);
* ``compose(a, b)``: a *composite* label for every pair ``(a[i], b[j])`` in row-major order
  — the labels of a flattened ``(len(a), len(b))`` block. A reshape that splits a dim into
  ``(heads, head_dim)`` unifies the original labels with ``compose(heads, head_dim)``, which
  makes heads and head dims units of their own;
* births: label vectors created together. *Root* births introduce channels (a conv's or
  linear's output dim, the factors of a reshape, a graph input); atoms born together on a
  root form one *channel group*. Other births (a BN scale after a concat, a consumer's input
  dim) only follow channels born elsewhere, so they never merge groups; they group atoms that
  no root reaches (a free-standing parameter multiplied into the graph).

``resolve`` turns them into frozen data with vectorised union-find (scipy's connected
components): every label maps to a component; a component that contains a composite stands for
the pair of its factors' components; unifying two composites unifies their factors, to a
fixpoint. Components that are no composite are *atoms*: the units that pruning removes. A
position is removed when any atom it is made of is removed, so removing a head drops
``head_dim`` consecutive channels and removing a head dim drops one channel in every head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["LabelSpace", "Resolution"]

_MAX_FACTORS = 8


class LabelSpace:
    """Allocates labels and records unifications, composites, births, pins and lossy marks."""

    def __init__(self) -> None:
        self.count = 0
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._comp_id: list[np.ndarray] = []
        self._comp_a: list[np.ndarray] = []
        self._comp_b: list[np.ndarray] = []
        self.births: list[np.ndarray] = []
        self.roots: list[np.ndarray] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.lossy: list[tuple[np.ndarray, str]] = []
        # labels a rule accounted for without a constraint (``unify(a, a)``, :meth:`note`)
        self._noted: list[np.ndarray] = []
        # (first label, where): labels from ``first`` on were made by ``where`` (for messages)
        self.origins: list[tuple[int, str]] = []

    def origin(self, where: str) -> None:
        """Labels allocated from now on are made by ``where`` (a node, for messages)."""
        self.origins.append((self.count, where))

    def made_by(self, label: int) -> str | None:
        starts = [s for s, _ in self.origins]
        i = int(np.searchsorted(starts, label, side="right")) - 1
        return self.origins[i][1] if i >= 0 else None

    def _alloc(self, n: int) -> np.ndarray:
        out = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return out

    def fresh(self, n: int, pin: str | None = None, root: bool = True) -> np.ndarray:
        """``n`` new atom labels born together; pinned with ``pin`` as the reason if given."""
        labels = self._alloc(n)
        (self.roots if root else self.births).append(labels)
        if pin is not None:
            self.pins.append((labels, pin))
        return labels

    def declare_root(self, labels: np.ndarray) -> None:
        """Mark labels (e.g. a weight's output dim) as where a channel group is born."""
        self.roots.append(labels)

    def compose(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Composite labels of the row-major flattening of ``a × b``."""
        self._noted += (a, b)  # the rule's own arrays, for ``arrays_since``
        if len(a) == 1:
            return b.copy()
        if len(b) == 1:
            return a.copy()
        out = self._alloc(len(a) * len(b))
        self._comp_id.append(out)
        self._comp_a.append(np.repeat(a, len(b)))
        self._comp_b.append(np.tile(b, len(a)))
        return out

    def compose_all(self, vectors: list[np.ndarray]) -> np.ndarray:
        """Row-major flattening of several label vectors."""
        out = vectors[-1]
        for vec in reversed(vectors[:-1]):
            out = self.compose(vec, out)
        return out

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise ValueError(f"cannot unify label vectors of lengths {len(a)} and {len(b)}")
        if a is b:
            self._noted.append(a)
            return
        self._edges.append((a, b))

    def factor(self, labels: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        """Split a dim into ``sizes`` (row-major): fresh atoms for each factor, unified with the
        original positions through a composite."""
        if len(sizes) == 1:
            return [labels]
        parts = [self.fresh(s) for s in sizes]
        self.unify(labels, self.compose_all(parts))
        return parts

    def pin(self, labels: np.ndarray, reason: str) -> None:
        self.pins.append((labels, reason))

    def mark_lossy(self, labels: np.ndarray, reason: str) -> None:
        self.lossy.append((labels, reason))

    def note(self, labels: np.ndarray) -> None:
        """A rule accounts for an input dim without a constraint: it copies the labels into
        an output (a concat's pieces), or the op does not read the values (a size taken for a
        shape argument only)."""
        self._noted.append(labels)

    def mark(self) -> tuple[int, ...]:
        """Where the records stand now, for :meth:`touched_since`."""
        return (len(self._edges), len(self._comp_id), len(self.roots), len(self.births),
                len(self.pins), len(self.lossy), len(self._noted))

    def arrays_since(self, mark: tuple[int, ...]) -> list[np.ndarray]:
        """The label arrays records made after ``mark`` hold (unified, composed, born, pinned,
        marked lossy, noted): the cheap check of what a rule did, by identity."""
        e, _c, r, b, p, l_, n = mark
        out = [v for a, bb in self._edges[e:] for v in (a, bb)]
        out += self.roots[r:] + self.births[b:] + self._noted[n:]
        return out + [v for v, _ in self.pins[p:]] + [v for v, _ in self.lossy[l_:]]

    def touched_since(self, mark: tuple[int, ...]) -> np.ndarray:
        """Every label a record made after ``mark`` names (unified, composed, born, pinned,
        marked lossy or noted), sorted and unique: what a rule did with the labels it
        was given (``group_channels`` pins an input dim a rule left out of all of them)."""
        e, c, r, b, p, l_, n = mark
        parts = [v for a, bb in self._edges[e:] for v in (a, bb)]
        parts += self._comp_a[c:] + self._comp_b[c:] + self.roots[r:] + self.births[b:]
        parts += [v for v, _ in self.pins[p:]] + [v for v, _ in self.lossy[l_:]]
        parts += self._noted[n:]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def resolve(self) -> Resolution:
        return _resolve(self)


@dataclass(frozen=True)
class Resolution:
    """Resolved labels.

    ``comp[label]`` is the label's component; ``atoms[component]`` the atoms (themselves
    components) it is made of, left-packed and padded with -1; ``group[atom]`` the channel group
    of an atom (-1 for non-atoms); ``pin_reason``/``lossy_reason`` map atom → first reason.
    """

    comp: np.ndarray
    atoms: np.ndarray
    is_atom: np.ndarray
    group: np.ndarray
    n_groups: int
    pin_reason: dict[int, str]
    lossy_reason: dict[int, str]

    def atoms_of(self, labels: np.ndarray) -> np.ndarray:
        """``[len(labels), W]`` atom matrix of a label vector (-1 padded)."""
        return self.atoms[self.comp[labels]]

    _alive_cache: list[Any] = field(default_factory=list, repr=False, compare=False)

    def alive(self, labels: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """Boolean mask of positions that survive when atoms with ``removed[atom]`` go.

        For a read-only ``removed`` (what ``Analysis.removed_atoms`` returns) the survival of
        every component is computed once and each call is a gather."""
        if not removed.flags.writeable:
            return self._component_alive(removed)[self.comp[labels]]
        mat = self.atoms_of(labels)
        gone = np.where(mat >= 0, removed[np.maximum(mat, 0)], False)
        return ~gone.any(axis=1)

    def _component_alive(self, removed: np.ndarray) -> np.ndarray:
        cache = self._alive_cache
        if cache and cache[0] is removed:
            return cache[1]
        gone = np.where(self.atoms >= 0, removed[np.maximum(self.atoms, 0)], False)
        mask = ~gone.any(axis=1)
        cache[:] = [removed, mask]
        return mask


def _components(n: int, us: list[np.ndarray], vs: list[np.ndarray]) -> np.ndarray:
    if not us:
        return np.arange(n, dtype=np.int64)
    u = np.concatenate(us)
    v = np.concatenate(vs)
    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return comp.astype(np.int64)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _resolve(space: LabelSpace) -> Resolution:
    n = space.count
    us = [a for a, _ in space._edges]
    vs = [b for _, b in space._edges]
    cid, ca, cb = _cat(space._comp_id), _cat(space._comp_a), _cat(space._comp_b)
    comp = _components(n, us, vs)
    # Fixpoint: composites in one component must have unified factors.
    for _ in range(64):
        if len(cid) == 0:
            break
        order = np.argsort(comp[cid], kind="stable")
        keys = comp[cid][order]
        first = np.r_[True, keys[1:] != keys[:-1]]
        rep = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
        a_new = comp[ca[order]] != comp[ca[rep]]
        b_new = comp[cb[order]] != comp[cb[rep]]
        if not (a_new.any() or b_new.any()):
            break
        us += [ca[order][a_new], cb[order][b_new]]
        vs += [ca[rep][a_new], cb[rep][b_new]]
        comp = _components(n, us, vs)
    n_comp = int(comp.max()) + 1 if n else 0
    is_atom = np.ones(n_comp, dtype=bool)
    pa = np.full(n_comp, -1, dtype=np.int64)
    pb = np.full(n_comp, -1, dtype=np.int64)
    if len(cid):
        is_atom[comp[cid]] = False
        pa[comp[cid]] = comp[ca]
        pb[comp[cid]] = comp[cb]
    atoms = _expand(is_atom, pa, pb)
    pin_reason = _first_reasons(atoms, comp, space.pins)
    lossy_reason = _first_reasons(atoms, comp, space.lossy)
    cyclic = ~is_atom & (atoms[:, 0] < 0)
    if cyclic.any():
        _pin_cycles(space, comp, cid, cyclic, is_atom, pa, pb, pin_reason)
    group, n_groups = _groups(space.roots, space.births, comp, is_atom)
    return Resolution(comp, atoms, is_atom, group, n_groups, pin_reason, lossy_reason)


def _pin_cycles(space: LabelSpace, comp: np.ndarray, cid: np.ndarray, cyclic: np.ndarray,
                is_atom: np.ndarray, pa: np.ndarray, pb: np.ndarray,
                pin_reason: dict[int, str]) -> None:
    """Composites that contain themselves (reshapes that factor a dim in two incompatible ways,
    as Hiera's unroll/reroll of spatial dims into the batch dim does) expand to no atoms: their
    positions are never removed, and every atom they are built from is pinned, with a reason
    naming the reshape that made the first such composite."""
    bad = np.nonzero(cyclic)[0]
    made = cid[cyclic[comp[cid]]]
    where = space.made_by(int(made.min())) if len(made) else None
    reason = (f"{where or 'a reshape'} and a later reshape factor this dim in incompatible "
              "ways; its channels are kept")
    seen = np.zeros(len(is_atom), dtype=bool)
    seen[bad] = True
    frontier = bad
    while len(frontier):
        nxt = np.concatenate([pa[frontier], pb[frontier]])
        nxt = np.unique(nxt[nxt >= 0])
        frontier = nxt[~seen[nxt]]
        seen[frontier] = True
    for c in np.nonzero(seen)[0].tolist():
        pin_reason.setdefault(c, reason)


def _expand(is_atom: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """Atom matrix of every component: atoms are themselves; composites concatenate their
    factors' atoms. Vectorised over depth levels."""
    n = len(is_atom)
    width = _MAX_FACTORS
    mat = np.full((n, width), -1, dtype=np.int64)
    mat[is_atom, 0] = np.nonzero(is_atom)[0]
    done = is_atom.copy()
    while True:
        ready = ~done & (pa >= 0) & done[np.maximum(pa, 0)] & done[np.maximum(pb, 0)]
        if not ready.any():
            return mat
        rows = np.nonzero(ready)[0]
        both = np.concatenate([mat[pa[rows]], mat[pb[rows]]], axis=1)
        packed = np.take_along_axis(both, np.argsort(both < 0, axis=1, kind="stable"), axis=1)
        if (packed[:, width:] >= 0).any():
            raise ValueError(f"a dim factors into more than {width} units; cannot analyse it")
        mat[rows] = packed[:, :width]
        done[rows] = True


def _first_reasons(atoms: np.ndarray, comp: np.ndarray,
                   marks: list[tuple[np.ndarray, str]]) -> dict[int, str]:
    """atom -> the reason of the first mark (pin or lossy) that reaches it, all at once."""
    if not marks:
        return {}
    labels = np.concatenate([lab for lab, _ in marks])
    which = np.repeat(np.arange(len(marks)), [len(lab) for lab, _ in marks])
    mat = atoms[comp[labels]]
    row, col = np.nonzero(mat >= 0)
    atom, mark = mat[row, col], which[row]
    order = np.lexsort((mark, atom))
    atom, mark = atom[order], mark[order]
    first = np.r_[True, atom[1:] != atom[:-1]] if len(atom) else np.zeros(0, dtype=bool)
    return {a: marks[m][1] for a, m in zip(atom[first].tolist(), mark[first].tolist())}


def _groups(roots: list[np.ndarray], births: list[np.ndarray], comp: np.ndarray,
            is_atom: np.ndarray):
    """Atoms born together on a root belong to one channel group; atoms no root reaches are
    grouped by the (non-root) dims they were born on."""
    n = len(is_atom)
    us, vs = [], []
    covered = np.zeros(n, dtype=bool)
    for labels in roots:
        c = comp[labels]
        c = c[is_atom[c]]
        covered[c] = True
        if len(c) > 1:
            us.append(c[:-1])
            vs.append(c[1:])
    for labels in births:
        c = comp[labels]
        c = c[is_atom[c] & ~covered[c]]
        if len(c) > 1:
            us.append(c[:-1])
            vs.append(c[1:])
    g = _components(n, us, vs)
    # renumber groups over atoms only, in order of first atom
    group = np.full(n, -1, dtype=np.int64)
    atom_ids = np.nonzero(is_atom)[0]
    _, first, inverse = np.unique(g[atom_ids], return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    group[atom_ids] = order[inverse]
    return group, len(first)
