"""Channel rules of vision-specific index maps: channel shuffle and ``roll``.

Why: ShuffleNet's channel shuffle (``view(B, g, C/g, H, W).transpose(1, 2).reshape(B, C, H,
W)``) is a permutation of the channels, not a merge of them; the generic reshape rule would
make each of the ``g`` rows one unit (a whole stage collapses into a few big units).  Here the
three ops are read as one index map: the output label is the input's atoms permuted, so every
channel stays its own unit, and physical_prune replaces the chain with one ``index_select``
of the kept channels in shuffled order (the slim tensor no longer splits into ``g`` equal
rows, so the views could not be kept).  Swin's ``roll`` of the token grid moves positions,
not channels: the label passes; a roll of the channel dim itself pins.

Invariants: a chain is only read as a shuffle when each of its nodes has exactly one user
(split view -> transpose/permute of the two split dims -> copies -> merge view back to the
input's shape); its inner nodes carry no label and are erased by the rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy
import torch
import torch.fx

from geta_fx.ir.args import arg
from geta_fx.ir.channels import KeptChannels, Label, concrete, size_expr
from geta_fx.ir.query import create_node_with_meta, tensor_val
from geta_fx.ir.registry import channel_rule

aten = torch.ops.aten

#: Views that split the channel dim (start of a shuffle) or merge it back (end).
_SPLITS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                     aten.unflatten.int})
_MERGES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                     aten.flatten.using_ints})
_SWAPS = frozenset({aten.transpose.int, aten.permute.default})
_COPIES = frozenset({aten.contiguous.default, aten.clone.default})

#: What :func:`shuffle_label` returns for a node that is not part of a channel shuffle.
NOT_A_SHUFFLE = object()


@dataclass(frozen=True)
class Shuffle:
    """``x`` [.., C, ..] -> split dim ``dim`` into (groups, C / groups) -> swap -> merge."""

    x: torch.fx.Node
    dim: int
    channels: int
    groups: int
    nodes: tuple[torch.fx.Node, ...]  # split, swap, copies..., merge

    def perm(self) -> np.ndarray:
        """Output channel j is input channel ``perm[j]``."""
        return np.arange(self.channels).reshape(self.groups, -1).T.ravel()

    def reads(self, lab: Label | None) -> bool:
        """``lab`` (of ``x``) is a plain label on the shuffled dim."""
        return lab is not None and lab.dim == self.dim and lab.tile is None and \
            len(lab.atoms) == self.channels


def _shape(node: Any) -> list[sympy.Expr] | None:
    val = tensor_val(node)
    return [size_expr(n) for n in val.shape] if val is not None else None


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return bool((a - b) == 0)


def _swaps(node: torch.fx.Node, d: int, nd: int) -> bool:
    """``node`` exchanges dims ``d`` and ``d + 1`` of an ``nd``-dim tensor and nothing else."""
    if node.target is aten.transpose.int:
        return sorted(int(x) % nd for x in node.args[1:3]) == [d, d + 1]
    order = [int(x) % nd for x in arg(node, "dims")]
    want = list(range(nd))
    want[d], want[d + 1] = d + 1, d
    return order == want


def _split_of(x_shape: list, s_shape: list) -> int | None:
    """The dim ``d`` of ``x`` that ``s`` splits into two static sizes (others equal)."""
    if len(s_shape) != len(x_shape) + 1:
        return None
    for d in range(len(x_shape)):
        same = all(_same(x_shape[i], s_shape[i]) for i in range(d)) and all(
            _same(x_shape[i], s_shape[i + 1]) for i in range(d + 1, len(x_shape)))
        sizes = [concrete(e) for e in (x_shape[d], s_shape[d], s_shape[d + 1])]
        if same and None not in sizes and sizes[1] * sizes[2] == sizes[0]:
            return d
    return None


def _chain_to(merge: torch.fx.Node) -> Shuffle | None:
    """The shuffle ending at ``merge``, walking back over single-user nodes."""
    if merge.op != "call_function" or merge.target not in _MERGES:
        return None
    nodes = [merge]
    p = merge.args[0]
    while isinstance(p, torch.fx.Node) and p.target in _COPIES and len(p.users) == 1:
        nodes.append(p)
        p = p.args[0]
    if not isinstance(p, torch.fx.Node) or p.target not in _SWAPS or len(p.users) != 1:
        return None
    s = p.args[0]
    if not isinstance(s, torch.fx.Node) or s.target not in _SPLITS or len(s.users) != 1:
        return None
    x = s.args[0]
    xs, ss, ms = _shape(x), _shape(s), _shape(merge)
    if xs is None or ss is None or ms is None or len(ms) != len(xs) or not all(
            _same(a, b) for a, b in zip(xs, ms)):
        return None
    d = _split_of(xs, ss)
    if d is None or not _swaps(p, d, len(ss)):
        return None
    return Shuffle(x, d, int(xs[d]), int(ss[d]), (s, p, *reversed(nodes)))


def _chain_from(split: torch.fx.Node) -> Shuffle | None:
    """The shuffle starting at ``split``: its single users forward to a merge, then back."""
    n = split
    for _ in range(8):  # split, swap, a few copies, merge
        if len(n.users) != 1:
            return None
        (n,) = n.users
        if n.target in _MERGES:
            sh = _chain_to(n)
            return sh if sh is not None and sh.nodes[0] is split else None
    return None


def shuffle_label(an: Any, node: torch.fx.Node) -> Any:
    """The reshape rule's first step: a node of a channel shuffle of a labelled tensor gets
    its label here (the split and the ops between: none; the merge: the input's atoms
    permuted); anything else is :data:`NOT_A_SHUFFLE`."""
    if node.target in _SPLITS and (sh := _chain_from(node)) is not None and \
            sh.reads(an.label(sh.x)):
        return None
    if node.target in _MERGES and (sh := _chain_to(node)) is not None and \
            sh.reads(lab := an.label(sh.x)):
        return Label(lab.dim, lab.atoms[sh.perm()], lab.ok)
    return NOT_A_SHUFFLE


def rewrite_shuffle(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: KeptChannels) -> bool:
    """At a shuffle's split: replace the chain by ``index_select(x, dim, kept order)`` when
    channels were removed; True if ``node`` starts a shuffle (whatever was removed)."""
    sh = _chain_from(node) if node.target in _SPLITS else None
    if sh is None or kept.of(sh.nodes[-1]) is None:
        return False
    merge = sh.nodes[-1]
    if kept.changed(sh.x) is None:
        return True
    _, kept_in = kept.of(sh.x)
    _, kept_out = kept.of(merge)
    idx = np.searchsorted(kept_in, sh.perm()[kept_out])
    name = f"_geta_shuffle_{merge.name}"
    gm.register_buffer(name, torch.from_numpy(idx.astype(np.int64)))
    with gm.graph.inserting_before(merge):
        index = create_node_with_meta(gm.graph, "get_attr", name, anchor=merge)
    merge.target, merge.args, merge.kwargs = aten.index_select.default, (sh.x, sh.dim, index), {}
    for n in reversed(sh.nodes[:-1]):
        gm.graph.erase_node(n)
    return True


# --------------------------------------------------------------------------- roll


@channel_rule(aten.roll.default, no_rewrite="rolls positions, not channels: the shape is "
                                            "unchanged (a roll of the channel dim is pinned)")
def _roll(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    dims = [int(d) % nd for d in (arg(node, "dims") or [])]
    if not dims or lab.dim in dims:  # no dims: the flattened tensor rolls, channels move
        an.pin(lab, node, "roll moves entries across the channel dim")
        return None
    return lab
