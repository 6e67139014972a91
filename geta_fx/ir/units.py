"""Unit-level views of a group's parameter slices: norms, zero masks, zeroing.

Vectorised over units (index_add over the member's unit ids), so QASSO and
``GetaModule.zero_mask`` never loop over units in Python.
"""

from __future__ import annotations

import torch
import torch.fx

from geta_fx.ir import meta
from geta_fx.ir.query import get_attr_tensor


def member_rows(gm: torch.nn.Module, m: meta.ParamSlice) -> torch.Tensor:
    """The member's slices as a [len(indices), -1] matrix (a copy)."""
    t = get_attr_tensor(gm, m.fqn)
    sel = t.index_select(m.dim, m.indices.to(t.device))
    return sel.movedim(m.dim, 0).reshape(len(m.indices), -1)


def unit_sq_norms(gm: torch.nn.Module, group: meta.PruneGroup,
                  role: str | None = "out") -> torch.Tensor:
    """Sum of squares of every ``role`` slice of each unit: float32 [num_units]."""
    device = None
    out: torch.Tensor | None = None
    for m in group.members:
        if role is not None and m.role != role:
            continue
        rows = member_rows(gm, m)
        device = rows.device
        if out is None:
            out = torch.zeros(group.num_units, dtype=torch.float32, device=device)
        out.index_add_(0, m.units.to(device), rows.float().pow(2).sum(1))
    return out if out is not None else torch.zeros(group.num_units)


def zero_mask(gm: torch.nn.Module, group: meta.PruneGroup) -> torch.Tensor:
    """Bool [num_units]: units whose every "out" slice is exactly zero."""
    return unit_sq_norms(gm, group) == 0


@torch.no_grad()
def zero_units(gm: torch.nn.Module, group: meta.PruneGroup, units: torch.Tensor) -> None:
    """Set every "out" slice of ``units`` to exactly 0 (in place)."""
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
    if len(units) and (units.min() < 0 or units.max() >= group.num_units):
        raise IndexError(f"group {group.id} has {group.num_units} units; got {units.tolist()}")
    for m in group.out_members:
        t = get_attr_tensor(gm, m.fqn)
        mask = torch.isin(m.units, units.cpu())
        if mask.any():
            t.index_fill_(m.dim, m.indices[mask].to(t.device), 0)
