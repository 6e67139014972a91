"""Flat index layout that lets QASSO work on every prunable unit with a few tensor ops.

Built once from a GetaModule's PruneGroups (``"out"`` ParamSlices of prunable groups) and its
weight quantizers:

* units of all prunable groups are numbered globally ``0..U-1`` (group by group, in group
  order); ``unit_group[u]`` is the prunable-group index of unit ``u``;
* the *stats vector* is the concatenation of the flattened trainable parameters that have
  ``"out"`` slices in prunable groups (``params``); ``pair_elem[e]``/``pair_unit[e]`` say that
  element ``pair_elem[e]`` of that vector belongs to unit ``pair_unit[e]``.  An element may
  belong to more than one unit (then it appears in several pairs); ``pair_elem is None`` means
  the identity (every element in exactly one unit, in order), the common case;
* ``elem_layer[i]`` is the weight-quantizer index of stats element ``i`` (``L`` = none);
* ``zero_*`` list every tensor with ``"out"`` slices in prunable groups (parameters, frozen
  parameters and buffers) with their flat indices and units: what committing a unit zeroes.

Per-unit reductions are then one ``index_add_`` over ``pair_unit`` (the approach of
``geta_fx.ir.units``, vectorised over all groups at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from geta_fx.errors import InputError
from geta_fx.ir import meta
from geta_fx.ir.query import get_attr_tensor


def _slice_flat_indices(shape: torch.Size, m: meta.ParamSlice) -> tuple[Tensor, Tensor]:
    """Flat element indices of a ParamSlice and the local unit of each (both int64, CPU)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    ar = torch.arange(numel, dtype=torch.long).view(shape)
    idx = m.indices.to(torch.long).cpu()
    rows = ar.index_select(m.dim, idx).movedim(m.dim, 0).reshape(len(idx), -1)
    units = m.units.to(torch.long).cpu()[:, None].expand_as(rows)
    return rows.reshape(-1), units.reshape(-1)


@dataclass
class Layout:
    num_units: int
    group_ids: tuple[int, ...]            # PruneGroup.id of each prunable group
    group_offsets: tuple[int, ...]        # first global unit of each prunable group
    unit_group: Tensor                    # [U] long
    group_size: Tensor                    # [G] long
    group_start: Tensor                   # [G] long
    params: list[nn.Parameter]            # stats-vector parameters, in order
    param_fqns: list[str]
    numels: list[int]
    pair_elem: Tensor | None              # [E] long, None = identity
    pair_unit: Tensor                     # [E] long
    unit_numel: Tensor                    # [U] float: elements per unit (stats params only)
    elem_layer: Tensor                    # [N] long, L = not quantized
    zero_tensors: list[Tensor] = field(default_factory=list)
    zero_fqns: list[str] = field(default_factory=list)
    zero_idx: list[Tensor] = field(default_factory=list)
    zero_units: list[Tensor] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    @property
    def num_elems(self) -> int:
        return sum(self.numels)

    def signature(self) -> dict[str, object]:
        """What a checkpoint must match to be loaded into this model."""
        return {"group_ids": list(self.group_ids),
                "group_sizes": self.group_size.tolist(),
                "params": list(self.param_fqns)}


def build_layout(graph_module: nn.Module, groups: tuple[meta.PruneGroup, ...],
                 weight_layer: dict[int, int], num_layers: int,
                 device: torch.device) -> Layout:
    """Precompute the flat indices of every prunable unit (construction time only).

    Args:
        graph_module: the GetaModule's ``graph_module`` (ParamSlice FQNs resolve inside it).
        groups: all PruneGroups; unprunable ones are ignored.
        weight_layer: ``id(weight tensor)`` -> index of its weight quantizer (by identity, so
            tied weights reached under several FQNs resolve to the same quantizer).
        num_layers: ``L``, the number of quantizers (the "not quantized" layer id).
        device: where the index tensors live (the parameters' device).
    """
    prunable = [g for g in groups if g.prunable and g.num_units > 0]
    group_ids = tuple(g.id for g in prunable)
    offsets: list[int] = []
    total = 0
    for g in prunable:
        offsets.append(total)
        total += g.num_units
    sizes = torch.tensor([g.num_units for g in prunable], dtype=torch.long)
    starts = torch.tensor(offsets, dtype=torch.long)
    unit_group = torch.repeat_interleave(torch.arange(len(prunable)), sizes)

    # tensors with "out" slices: trainable params go to the stats vector, everything to zeroing
    stats_order: list[str] = []
    stats_param: dict[str, nn.Parameter] = {}
    by_id: dict[int, str] = {}           # tied weights: one entry per tensor
    zero_parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    zero_tensor: dict[str, Tensor] = {}
    for g, off in zip(prunable, offsets, strict=True):
        for m in g.out_members:
            t = get_attr_tensor(graph_module, m.fqn)
            if not isinstance(t, Tensor):
                raise InputError(f"QASSO: {m.fqn!r} of group {g.id} is not a tensor")
            key = by_id.setdefault(id(t), m.fqn)
            flat, units = _slice_flat_indices(t.shape, m)
            units = units + off
            idx_l, unit_l = zero_parts.setdefault(key, ([], []))
            idx_l.append(flat)
            unit_l.append(units)
            zero_tensor[key] = t
            if isinstance(t, nn.Parameter) and t.requires_grad and key not in stats_param:
                if not t.is_contiguous():
                    raise InputError(f"QASSO: parameter {key!r} is not contiguous")
                stats_param[key] = t
                stats_order.append(key)

    pair_elem_parts: list[Tensor] = []
    pair_unit_parts: list[Tensor] = []
    elem_layer_parts: list[Tensor] = []
    numels: list[int] = []
    base = 0
    for key in stats_order:
        p = stats_param[key]
        idx_l, unit_l = zero_parts[key]
        pair_elem_parts += [i + base for i in idx_l]
        pair_unit_parts += unit_l
        numels.append(p.numel())
        layer = weight_layer.get(id(p), num_layers)
        elem_layer_parts.append(torch.full((p.numel(),), layer, dtype=torch.long))
        base += p.numel()
    n = base
    pair_elem = torch.cat(pair_elem_parts) if pair_elem_parts else torch.zeros(0, dtype=torch.long)
    pair_unit = torch.cat(pair_unit_parts) if pair_unit_parts else torch.zeros(0, dtype=torch.long)
    elem_layer = (torch.cat(elem_layer_parts) if elem_layer_parts
                  else torch.zeros(0, dtype=torch.long))
    unit_numel = torch.zeros(total, dtype=torch.float32).index_add_(
        0, pair_unit, torch.ones(len(pair_unit)))

    # identity fast path: every stats element in exactly one unit
    identity: Tensor | None = pair_elem
    if len(pair_elem) == n:
        order = torch.argsort(pair_elem, stable=True)
        if torch.equal(pair_elem[order], torch.arange(n)):
            pair_unit = pair_unit[order]
            identity = None

    zero_keys = list(zero_tensor)
    return Layout(
        num_units=total, group_ids=group_ids, group_offsets=tuple(offsets),
        unit_group=unit_group.to(device), group_size=sizes.to(device),
        group_start=starts.to(device), params=[stats_param[k] for k in stats_order],
        param_fqns=stats_order, numels=numels,
        pair_elem=None if identity is None else identity.to(device),
        pair_unit=pair_unit.to(device), unit_numel=unit_numel.to(device),
        elem_layer=elem_layer.to(device),
        zero_tensors=[zero_tensor[k] for k in zero_keys], zero_fqns=zero_keys,
        zero_idx=[torch.cat(zero_parts[k][0]).to(device) for k in zero_keys],
        zero_units=[torch.cat(zero_parts[k][1]).to(device) for k in zero_keys])
