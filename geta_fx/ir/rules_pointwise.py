"""Channel rules of pointwise ops: unary, binary elementwise (with broadcasting), clamps.

Pass-through ops keep a tensor's channel label; ``ok`` (zero-invariance) survives only ops
with f(0) = 0.  Binary ops unify the channels of their operands; a parameter operand is
sliced along them, a computed one is recorded as an external (index_select'ed by
physical_prune).  None of these ops has a shape constant, so none needs a rewrite.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from geta_fx.ir import op_sets
from geta_fx.ir.args import arg
from geta_fx.ir.channels import Label, concrete
from geta_fx.ir.registry import Analysis, channel_rule, register_all

aten = torch.ops.aten

#: Why pointwise ops need no rewrite: their output shape follows their operands'.
SAME_SHAPE = "pointwise: the output shape follows the operands' (pruned) shapes"
BROADCAST = ("elementwise: shapes follow the operands; computed operands along the channels "
             "are index_select'ed by physical_prune (an.external)")


@channel_rule(*op_sets.ZERO_PRESERVING, no_rewrite=SAME_SHAPE, tiled=True)
def _unary_zero(an: Any, node: torch.fx.Node) -> Label | None:
    return an.label(node.args[0])


@channel_rule(*op_sets.NOT_ZERO_PRESERVING, no_rewrite=SAME_SHAPE, tiled=True)
def _unary_nonzero(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    return lab.moved(lab.dim, ok=False) if lab else None


@channel_rule(aten.native_dropout.default, no_rewrite=SAME_SHAPE, tiled=True)
def _native_dropout(an: Any, node: torch.fx.Node) -> list[Label | None]:
    lab = an.label(node.args[0])
    return [lab, lab.moved(lab.dim, ok=False) if lab else None]


@channel_rule(aten.zeros_like.default, aten.empty_like.default, no_rewrite=SAME_SHAPE)
def _zeros_like(an: Any, node: torch.fx.Node) -> Label | None:
    return an.label(node.args[0])


# --------------------------------------------------------------------------- elementwise

ADD, MUL, DIV, MAX, CMP = "add", "mul", "div", "max", "cmp"


def _labelled_operands(an: Any, node: torch.fx.Node, nd: int
                       ) -> list[tuple[int, Any, Label]]:
    """(arg index, operand, label aligned to the output's dims) of each labelled operand."""
    labels = []
    for i, a in enumerate(node.args):
        if isinstance(a, torch.fx.Node):
            lab = an.label(a)
            if lab is not None:
                labels.append((i, a, lab.moved(lab.dim + nd - len(an.shape(a)))))
    return labels


def _other_operand(an: Any, node: torch.fx.Node, i: int, kind: str, dim: int, nd: int,
                   atoms: Any) -> bool:
    """Slice unlabelled operand ``i`` along ``atoms`` if it is a parameter (an "out" slice
    when it adds or multiplies and trains: zeroed with the unit), record it as an external if
    it is computed; True if it may be non-zero where the channels are zero."""
    shp = an.shape(node.args[i])
    if shp is None:
        return False
    od = dim - (nd - len(shp))
    if od < 0 or concrete(shp[od]) == 1:
        return True
    src = an.param(node.args[i])
    if src is None:
        an.external(node, i, od)
        return True
    fqn, perm, trainable = src
    role = "out" if kind in (ADD, MUL) and trainable else "in"
    an.label_param(fqn, perm[od], atoms, role)
    return role == "in"


def _other_operands(an: Any, node: torch.fx.Node, kind: str, dim: int, nd: int,
                    atoms: Any, labeled_idx: set[int]) -> bool:
    """:func:`_other_operand` of every unlabelled tensor operand; True if any of them may be
    non-zero where the channels are zero."""
    nonzero = [_other_operand(an, node, i, kind, dim, nd, atoms)
               for i, a in enumerate(node.args)
               if isinstance(a, torch.fx.Node) and i not in labeled_idx]
    return any(nonzero)


def _line_up(an: Any, node: torch.fx.Node, labels: list[tuple[int, Any, Label]],
             out_shape: list) -> tuple[int, Any, list[Label]] | None:
    """(channel dim, atoms, full-size labels) of operands that carry channels on one dim,
    unified; size-1 (broadcast) channel dims are pinned.  None (inputs pinned) if they
    disagree."""
    dims = {lab.dim for _, _, lab in labels}
    if len(dims) > 1:
        return an.pin_inputs(node, f"{node.target}: operands carry channels on different dims")
    (dim,) = dims
    size = concrete(out_shape[dim])
    full = [lab for _, _, lab in labels if len(lab.atoms) == size]
    if not full:  # only broadcast (size-1) labeled operands: channels are replicated
        return an.pin_inputs(node, f"{node.target}: channel dim is broadcast")
    atoms = full[0].atoms
    for lab in full[1:]:
        an.unify(atoms, lab.atoms)
    for _, _, lab in labels:
        if len(lab.atoms) != size:
            an.pin(lab, node, f"{node.target}: size-1 channel dim broadcast")
    return dim, atoms, full


def _zero_invariant(kind: str, node: torch.fx.Node, labels: list[tuple[int, Any, Label]],
                    full: list[Label], nonzero: bool) -> bool:
    """Whether the output is zero where the labelled channels are (by how zeros combine).

    A product is zero where any factor carrying the channels (full size on the channel dim)
    is: ``x * gate(...)`` (squeeze-excitation, any gate) keeps ``x``'s zeros whatever the gate
    gives there (sigmoid(0) = 0.5), while a factor broadcast over the channels cannot be the
    zero one.  A sum needs every term zero."""
    ok_labeled = [lab.ok for lab in full]
    labeled_idx = {i for i, _, _ in labels}
    if kind == ADD:
        return all(ok_labeled) and not nonzero
    if kind == MUL:
        return any(ok_labeled)
    if kind == DIV:
        return 0 in labeled_idx and full[0].ok and len(full) == 1 and labels[0][0] == 0
    if kind == MAX:
        if node.target in op_sets.WHERES:  # the condition's zeros select, they are not values
            return all(lab.ok for i, _, lab in labels if i != 0) and not nonzero
        return all(ok_labeled) and not nonzero
    return False


def _tiled_elementwise(an: Any, node: torch.fx.Node, labels: list[tuple[int, Any, Label]],
                       kind: str) -> Label | None:
    """Tiled channels (heads interleaved with a dynamic dim) through an elementwise op: only
    with scalars or operands broadcast along the dim (no slice of them could follow)."""
    first = labels[0][2]
    nd = len(an.shape(node))
    if any(lab.dim != first.dim or lab.tile != first.tile or len(lab.atoms) != len(first.atoms)
           for _, _, lab in labels):
        return an.pin_inputs(node, f"{node.target}: tiled channels that do not line up")
    nonzero = False
    for i, a in enumerate(node.args):
        if isinstance(a, torch.fx.Node) and i not in {j for j, _, _ in labels}:
            shp = an.shape(a)
            od = first.dim - (nd - len(shp))
            if od >= 0 and concrete(shp[od]) != 1:
                return an.pin_inputs(node, f"{node.target}: an operand runs along tiled "
                                           "channels")
            nonzero = True
        elif not isinstance(a, (torch.fx.Node, bool)) and a not in (0, 0.0, None):
            nonzero = True
    for _, _, lab in labels[1:]:
        an.unify(first.atoms, lab.atoms)
    full = [lab for _, _, lab in labels]
    return Label(first.dim, first.atoms, _zero_invariant(kind, node, labels, full, nonzero),
                 first.tile)


def _elementwise(kind: str) -> Analysis:
    def rule(an: Any, node: torch.fx.Node) -> Label | None:
        out_shape = an.shape(node)
        if out_shape is None:
            return an.pin_inputs(node, "elementwise op with non-tensor output")
        nd = len(out_shape)
        labels = _labelled_operands(an, node, nd)
        if not labels:
            return None
        if any(lab.tile is not None for _, _, lab in labels):
            return _tiled_elementwise(an, node, labels, kind)
        lined = _line_up(an, node, labels, out_shape)
        if lined is None:
            return None
        dim, atoms, full = lined
        scalar_nonzero = any(not isinstance(a, torch.fx.Node) and a not in (0, 0.0, None)
                             and not isinstance(a, bool) for a in node.args)
        extra_nonzero = _other_operands(an, node, kind, dim, nd, atoms,
                                        {i for i, _, _ in labels})
        ok = _zero_invariant(kind, node, labels, full, extra_nonzero or scalar_nonzero)
        return Label(dim, atoms, ok)
    return rule


for _ops, _kind in ((op_sets.ADDS, ADD), (op_sets.MULS, MUL), (op_sets.DIVS, DIV),
                    (op_sets.SELECTS, MAX), (op_sets.COMPARISONS, CMP)):
    register_all(_ops, _elementwise(_kind), no_rewrite=BROADCAST, tiled=True)


@channel_rule(aten.addcmul.default, no_rewrite=BROADCAST)
def _addcmul(an: Any, node: torch.fx.Node) -> Label | None:
    """``self + value * tensor1 * tensor2`` (e.g. GRN's ``bias + weight * (x * nx)``): zero
    where ``self`` is zero and either factor is (a trainable parameter operand is an "out"
    slice, zeroed with the unit)."""
    out_shape = an.shape(node)
    nd = len(out_shape)
    labels = [t for t in _labelled_operands(an, node, nd) if t[0] < 3]
    if not labels:
        return None
    lined = _line_up(an, node, labels, out_shape)
    if lined is None:
        return None
    dim, atoms, _ = lined
    ok_of = {i: lab.ok and len(lab.atoms) == len(atoms) for i, _, lab in labels}
    zero = [ok_of[i] if i in ok_of else
            not _other_operand(an, node, i, ADD if i == 0 else MUL, dim, nd, atoms)
            for i in range(3)]
    return Label(dim, atoms, zero[0] and (zero[1] or zero[2]))


@channel_rule(aten.pow.Tensor_Scalar, no_rewrite=SAME_SHAPE)
def _pow(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    e = arg(node, "exponent")
    return lab.moved(lab.dim, ok=lab.ok and isinstance(e, (int, float)) and e > 0)


@channel_rule(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
              aten.clip.default, no_rewrite=SAME_SHAPE)
def _clamp(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    lo = arg(node, "min") if node.target is not aten.clamp_max.default else None
    hi = arg(node, "max") if node.target is not aten.clamp_min.default else None
    ok = lab.ok and (lo is None or (not isinstance(lo, torch.fx.Node) and lo <= 0)) and (
        hi is None or (not isinstance(hi, torch.fx.Node) and hi >= 0))
    return lab.moved(lab.dim, ok=ok)


@channel_rule(aten.masked_fill.Scalar, no_rewrite=SAME_SHAPE)
def _masked_fill(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    mask = an.label(arg(node, "mask"))
    if mask is not None:
        return an.pin_inputs(node, "masked_fill with a channel-carrying mask")
    if lab is None:
        return None
    return lab.moved(lab.dim, ok=lab.ok and arg(node, "value") == 0)
