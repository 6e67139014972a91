"""Channel atoms, union-find and labels: the abstract domain of dependency grouping.

Every output channel a stem (conv, linear, embedding, ...) creates is an *atom*.
A tensor's *label* says which atom each index of one of its dimensions carries
(``Label.dim``, ``Label.atoms``).  Ops *unify* atoms that must be pruned
together; the connected components are the pruning *units*.  Atom 0 is the
"untracked" atom (an index no stem owns); anything unified with it is pinned.

Labels are always one-dimensional: when a reshape spreads a channel dimension
over several dimensions (hidden -> heads x head_dim) the inner dimensions are
made whole (their atoms unified), so a unit always removes whole slices of the
outermost channel dimension and every pruned tensor stays rectangular.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy
import torch
import torch.fx


class UnionFind:
    """Vectorised union-find over int64 atom ids (hooking to the smaller root)."""

    def __init__(self) -> None:
        self.parent = np.zeros(1024, dtype=np.int64)
        self.n = 1  # atom 0: untracked

    def new(self, k: int) -> np.ndarray:
        need = self.n + k
        if need > len(self.parent):
            grown = np.zeros(max(need, 2 * len(self.parent)), dtype=np.int64)
            grown[: self.n] = self.parent[: self.n]
            self.parent = grown
        ids = np.arange(self.n, need, dtype=np.int64)
        self.parent[ids] = ids
        self.n = need
        return ids

    def find(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.int64)
        r = self.parent[a]
        while True:
            rr = self.parent[r]
            if np.array_equal(rr, r):
                break
            r = rr
        self.parent[a] = r
        return r

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        a, b = a.ravel(), b.ravel()
        while True:
            ra, rb = self.find(a), self.find(b)
            diff = ra != rb
            if not diff.any():
                return
            lo = np.minimum(ra[diff], rb[diff])
            hi = np.maximum(ra[diff], rb[diff])
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        return self.find(np.arange(self.n, dtype=np.int64))


@dataclass
class Label:
    """Dimension ``dim`` of a tensor carries ``atoms`` (1-D, one atom per index).

    ``ok`` is the zero-invariance fact: when every parameter slice of a unit is zero,
    every index of this tensor carrying that unit's atoms is exactly zero.

    ``tile`` (a sympy expression, None: 1) says the dim holds ``tile`` copies of ``atoms``,
    index ``i`` carrying ``atoms[i % len(atoms)]``: channels interleaved with a dynamic dim,
    e.g. ``[L, B, E] -> view [L, B*H, D]`` in ``nn.MultiheadAttention``.  Only rules
    registered with ``tiled=True`` receive such labels (the others pin them).
    """

    dim: int
    atoms: np.ndarray
    ok: bool = True
    tile: Any = None

    def moved(self, dim: int, ok: bool | None = None) -> Label:
        return Label(dim, self.atoms, self.ok if ok is None else ok, self.tile)


class KeptChannels:
    """Which channels of each labelled tensor survive physical pruning.

    ``labels`` maps node names to ``(dim, atoms)`` (a list of them for multi-output
    nodes, see ``ChannelAnalysis.node_labels``); ``removed_atom`` marks the atoms removed.
    Rewrites that replace a node copy its entry to the replacement's name.
    """

    def __init__(self, removed_atom: np.ndarray, labels: dict[str, Any]) -> None:
        self.removed_atom = removed_atom
        self.labels = labels

    def of(self, node: Any, index: int | None = None) -> tuple[int, np.ndarray] | None:
        """(dim, kept indices) of a node's label, or None if it carries no channels."""
        if not isinstance(node, torch.fx.Node):
            return None
        lab = self.labels.get(node.name)
        if isinstance(lab, list):
            lab = lab[index] if index is not None and index < len(lab) else None
        if lab is None:
            return None
        dim, atoms = lab
        return dim, np.nonzero(~self.removed_atom[atoms])[0]

    def changed(self, node: Any, index: int | None = None) -> tuple[int, np.ndarray, int] | None:
        """(dim, kept indices, original count) when pruning removed some of its channels."""
        k = self.of(node, index)
        if k is None:
            return None
        lab = self.labels[node.name]
        n = len((lab[index] if isinstance(lab, list) else lab)[1])
        return (k[0], k[1], n) if len(k[1]) != n else None


def size_expr(s: object) -> sympy.Expr:
    if isinstance(s, torch.SymInt):
        return sympy.sympify(s.node.expr)
    return sympy.Integer(int(s))  # type: ignore[call-overload]


def concrete(e: sympy.Expr) -> int | None:
    return int(e) if e.is_number else None


def reshape_groups(a: list[sympy.Expr], b: list[sympy.Expr]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims of equal element count."""
    i = j = 0
    groups: list[tuple[list[int], list[int]]] = []
    while i < len(a) or j < len(b):
        gi: list[int] = []
        gj: list[int] = []
        pa: sympy.Expr = sympy.Integer(1)
        pb: sympy.Expr = sympy.Integer(1)
        if i < len(a):
            gi.append(i); pa = pa * a[i]; i += 1  # noqa: E702
        if j < len(b):
            gj.append(j); pb = pb * b[j]; j += 1  # noqa: E702
        while (pa - pb) != 0:
            ratio = pb / pa
            num, den = sympy.fraction(ratio)
            extend_a = bool(num.free_symbols) if (num.free_symbols or den.free_symbols) \
                else bool(ratio > 1)
            if extend_a and i < len(a):
                gi.append(i); pa = pa * a[i]; i += 1  # noqa: E702
            elif j < len(b):
                gj.append(j); pb = pb * b[j]; j += 1  # noqa: E702
            elif i < len(a):
                gi.append(i); pa = pa * a[i]; i += 1  # noqa: E702
            else:
                return None
        groups.append((gi, gj))
    return groups
