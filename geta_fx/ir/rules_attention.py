"""Channel rules of ``einsum``: its subscripts say which dims carry heads or channels.

Why: einsum attention (``"bhqd,bhkd->bhqk"``, ``"bhqk,bhkd->bhqd"``) and einsum layers
(``"bld,hd->blh"``) would otherwise pin every channel they touch.

The rule parses the equation (implicit outputs and ``...`` expanded) and follows each
operand's labelled subscript:

* a subscript labelled on several operands unifies their atoms (a head of q is the head of k
  it meets); a parameter operand with that subscript is sliced along it ("in": the labelled
  operand is zero there);
* a subscript kept in the output passes the label through: ``einsum`` multiplies its
  operands, so the output is zero where any zero-invariant labelled factor is;
* a contracted subscript needs one zero-invariant labelled operand (its zeros add 0 to the
  sum), or it pins;
* with no label reaching the output, a parameter's subscript that only it and the output
  have opens a channel space (a stem, like ``linear``), its slices "out" (one parameter
  operand only).

Pinned, with the reason: a labelled subscript repeated within an operand (a diagonal), one
whose sizes differ between operands (broadcast), a computed operand with no label along it
(nothing could slice it: einsum's operands are a list), tiled labels.  The output shape
follows the operands', so no rewrite is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from geta_fx.ir.args import arg
from geta_fx.ir.channels import Label, concrete
from geta_fx.ir.registry import channel_rule

aten = torch.ops.aten

#: Stand-ins for the dims an ellipsis covers (einsum subscripts are letters only).
_ELLIPSIS_DIMS = "0123456789"


def parse_equation(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """``(input subscripts, output subscripts)``, one character per dim, with ``...``
    expanded (right-aligned) and the implicit output (letters seen once, sorted) made
    explicit; None if the equation does not fit the operands' ranks."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        return None
    span = max((n - len(s.replace("...", "")) for s, n in zip(ins, ndims, strict=True)
                if "..." in s), default=0)
    if span > len(_ELLIPSIS_DIMS):
        return None
    fill = _ELLIPSIS_DIMS[:span]
    out_ins = []
    for s, n in zip(ins, ndims, strict=True):
        if "..." in s:
            s = s.replace("...", fill[span - (n - len(s.replace("...", ""))):])
        if len(s) != n:
            return None
        out_ins.append(s)
    if not arrow:
        letters = "".join(out_ins)
        rhs = fill + "".join(sorted(c for c in set(letters) if letters.count(c) == 1
                                    and c not in fill))
    else:
        rhs = rhs.replace("...", fill)
    return out_ins, rhs


def _letter_labels(an: Any, node: torch.fx.Node, tensors: list[Any], subs: list[str]
                   ) -> dict[str, list[Label]] | None:
    """Subscript -> the labels carried along it (None: a label the rule cannot follow)."""
    found: dict[str, list[Label]] = {}
    for t, s in zip(tensors, subs, strict=True):
        lab = an.label(t)
        if lab is None:
            continue
        letter = s[lab.dim]
        if lab.tile is not None or s.count(letter) > 1:
            return None
        found.setdefault(letter, []).append(lab)
    return found


def _slice_along(an: Any, node: torch.fx.Node, tensors: list[Any], subs: list[str],
                 letter: str, atoms: np.ndarray) -> bool:
    """Every operand with ``letter`` but no label along it: a parameter is sliced ("in"), a
    computed one cannot be (False)."""
    for t, s in zip(tensors, subs, strict=True):
        if letter not in s:
            continue
        d = s.index(letter)
        lab = an.label(t)
        if lab is not None and lab.dim == d:
            continue
        if concrete(an.shape(t)[d]) != len(atoms):
            return False
        src = an.param(t)
        if src is None:
            return False
        an.label_param(src[0], src[1][d], atoms, "in")
    return True


def _open_stem(an: Any, node: torch.fx.Node, tensors: list[Any], subs: list[str],
               rhs: str) -> Label | None:
    """A parameter's subscript only it and the output have: a fresh channel space."""
    params = [(i, an.param(t)) for i, t in enumerate(tensors)]
    params = [p for p in params if p[1] is not None]
    if len(params) != 1:
        return None
    i, (fqn, perm, _) = params[0]
    t, s = tensors[i], subs[i]
    others = "".join(o for j, o in enumerate(subs) if j != i)
    for d, letter in enumerate(s):
        if letter in rhs and letter not in others and s.count(letter) == 1:
            n = concrete(an.shape(t)[d])
            if n is None:
                return None
            atoms = an.fresh(n, node)
            an.label_param(fqn, perm[d], atoms, "out")
            return Label(rhs.index(letter), atoms)
    return None


@channel_rule(aten.einsum.default,
              no_rewrite="the output shape follows the operands' (sliced) shapes")
def _einsum(an: Any, node: torch.fx.Node) -> Label | None:
    tensors = list(arg(node, "tensors"))
    shapes = [an.shape(t) for t in tensors]
    parsed = parse_equation(arg(node, "equation"), [len(s) for s in shapes])
    if parsed is None:
        return an.pin_inputs(node, "einsum equation that does not fit its operands")
    subs, rhs = parsed
    letters = _letter_labels(an, node, tensors, subs)
    if letters is None:
        return an.pin_inputs(node, "einsum with a labelled subscript repeated in an operand "
                                   "(a diagonal), or tiled channels")
    out: Label | None = None
    for letter, labs in letters.items():
        atoms = labs[0].atoms
        if any(len(lab.atoms) != len(atoms) for lab in labs):
            return an.pin_inputs(node, f"einsum: subscript {letter!r} broadcasts channels")
        for lab in labs[1:]:
            an.unify(atoms, lab.atoms)
        if not _slice_along(an, node, tensors, subs, letter, atoms):
            for lab in labs:
                an.pin(lab, node, f"einsum: an operand along subscript {letter!r} carries no "
                                  "channels and is no parameter")
            continue
        ok = any(lab.ok for lab in labs)
        if letter not in rhs:
            if not ok:
                an.pin(atoms, node, f"einsum contracts subscript {letter!r} whose channels "
                                    "are not zero when pruned")
        elif out is None:
            out = Label(rhs.index(letter), atoms, ok)
        else:
            an.pin(atoms, node, "einsum output would carry channels on two dims")
    if out is None:
        out = _open_stem(an, node, tensors, subs, rhs)
    return out
