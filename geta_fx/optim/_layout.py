"""Structured layout: where every prunable unit lives, as slabs of its tensors (issue #17).

Built once from a GetaModule's PruneGroups (``"out"`` ParamSlices of prunable groups) and its
weight quantizers.  Nothing here is per parameter *element*: a unit is reached through the
:class:`Slab` s of the tensors it zeroes -- "rows ``index`` of dimension ``dim`` of tensor
``t``, row ``k`` belonging to unit ``units[k]``" -- and every per-unit reduction is a strided
view (``narrow``) or an ``index_select`` along that dim, reduced over the other dims, then one
``index_add_`` of ``len(index)`` entries.  The layout's memory is therefore O(rows), not
O(elements) (the previous flat layout kept four int64 tensors per element: 32 bytes of index
per 4-byte weight).

Invariants:

* units of all prunable groups are numbered globally ``0..U-1`` (group by group, in group
  order); ``unit_group[u]`` is the prunable-group index of unit ``u``;
* ``tensors`` lists every tensor with ``"out"`` slices in prunable groups (parameters, frozen
  parameters and buffers; tied weights once): what committing a unit zeroes.  ``params`` are
  those of them that are trainable (the saliency statistics' and the joint update's tensors),
  ``param_layer[i]`` the index of their weight quantizer (``L`` = not quantized);
* a slab's ``index``/``units`` are in the coordinates of the tensor this process holds: under
  FSDP2 (``DTensor`` parameters sharded along ``dim 0``) a slab along the sharded dim keeps its
  local rows only, shifted to local positions, and a slab along another dim covers local
  partial rows -- per-unit sums are then completed by one ``all_reduce`` (:attr:`sharded`);
* ``overlap[i]`` is True when an element of ``params[i]`` lies in more than one slab (slices on
  several dims, or a row in two slices); the joint update then decays it once, at the largest
  rate (GETA_SPEC G.2 #10), through a lazily built per-element map of that tensor only;
* ``in_params`` / ``in_slabs`` (built with ``consumer_slices=True`` only) are the trainable
  tensors holding ``"in"`` slices of prunable units -- the consumers' input rows that a
  unit's removal deletes along with it -- as slabs read by the saliency statistics alone
  (``QASSO(importance_scope="removed")``): they are never zeroed or decayed (the unit's
  ``"out"`` rows being zero already makes them dead), and ``unit_numel`` then counts them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from geta_fx.errors import InputError
from geta_fx.ir import meta
from geta_fx.ir.query import get_attr_tensor


@dataclass(frozen=True, eq=False)
class Slab:
    """Rows ``index`` of dimension ``dim`` of ``Layout.tensors[tensor]``; row ``k`` is unit
    ``units[k]`` (global).  ``param`` indexes ``Layout.params`` (None: zeroed only)."""

    tensor: int
    param: int | None
    dim: int
    index: Tensor                    # [n] long, local positions along ``dim``
    units: Tensor                    # [n] long, global unit ids
    span: tuple[int, int] | None     # ``index == arange(a, b)``: read as a narrow view
    replicated: bool                 # every rank holds these rows whole (count them once)

    def rows(self, t: Tensor) -> Tensor:
        """The slab's rows of (the local part of) ``t``: a view when contiguous, else a copy."""
        if self.span is not None:
            return t.narrow(self.dim, self.span[0], self.span[1] - self.span[0])
        return t.index_select(self.dim, self.index)

    def row_sums(self, t: Tensor) -> Tensor:
        """``[n]``: ``t`` (shaped like the slab's rows) summed over every dim but ``dim``."""
        return sum_but(t, self.dim)


def sum_but(t: Tensor, dim: int) -> Tensor:
    """``t`` summed over every dim but ``dim`` (``t`` itself when it is 1-D)."""
    dims = [d for d in range(t.dim()) if d != dim]
    return t.sum(dims) if dims else t


@dataclass
class Layout:
    num_units: int
    group_ids: tuple[int, ...]            # PruneGroup.id of each prunable group
    group_offsets: tuple[int, ...]        # first global unit of each prunable group
    unit_group: Tensor                    # [U] long
    group_size: Tensor                    # [G] long
    group_start: Tensor                   # [G] long
    params: list[nn.Parameter]            # trainable tensors with slabs, in order
    param_fqns: list[str]
    numels: list[int]                     # global numel of each of ``params``
    param_layer: list[int]                # weight-quantizer index of each (L = none)
    unit_numel: Tensor                    # [U] float: elements per unit (params only)
    tensors: list[Tensor]                 # everything committing a unit zeroes
    tensor_fqns: list[str]
    slabs: list[Slab]
    overlap: list[bool]                   # per param: some element in several slabs
    sharded: bool                         # some param is a sharded DTensor (FSDP2)
    in_params: list[nn.Parameter] = field(default_factory=list)  # stat-only "in" tensors
    in_slabs: list[list[Slab]] = field(default_factory=list)     # their slabs (tensor -1, param None)

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    @property
    def num_elems(self) -> int:
        return sum(self.numels)

    def param_slabs(self, i: int) -> list[Slab]:
        """The slabs of ``params[i]``."""
        return [s for s in self.slabs if s.param == i]

    def index_bytes(self) -> int:
        """Bytes of index tensors the layout holds (what it costs besides the state)."""
        own = [self.unit_group, self.group_size, self.group_start, self.unit_numel]
        own += [t for s in self.slabs for t in (s.index, s.units)]
        return sum(t.numel() * t.element_size() for t in own)

    def signature(self) -> dict[str, object]:
        """What a checkpoint must match to be loaded into this model."""
        return {"group_ids": list(self.group_ids),
                "group_sizes": self.group_size.tolist(),
                "params": list(self.param_fqns)}


# ------------------------------------------------------------------ sharding (FSDP2)
def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds (``DTensor.to_local()``; ``t`` itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and hasattr(t, "placements") else t


def _shard_info(t: Tensor, fqn: str) -> tuple[int | None, int, int]:
    """``(shard dim or None, first local row, local rows)`` of a tensor this process holds.

    Plain tensors and replicated DTensors: ``(None, 0, 0)``.  A DTensor sharded on a 1-D mesh
    follows ``torch.chunk`` (what FSDP2 uses): rank ``r`` holds rows ``[r*c, (r+1)*c)``,
    ``c = ceil(size / world)``, clipped to the size.
    """
    placements = getattr(t, "placements", None)
    if placements is None:
        return None, 0, 0
    shards = [p for p in placements if p.is_shard()]
    if not shards:
        return None, 0, 0
    mesh = t.device_mesh  # type: ignore[attr-defined]
    if len(placements) != 1 or mesh.ndim != 1:
        raise InputError(f"QASSO: {fqn!r} is a DTensor on a {mesh.ndim}-D mesh with "
                         f"placements {placements}; only a 1-D mesh (FSDP2) is supported")
    dim = shards[0].dim
    size, world = int(t.shape[dim]), mesh.size()
    chunk = math.ceil(size / world) if size else 0
    start = min(mesh.get_local_rank() * chunk, size)
    return dim, start, min(start + chunk, size) - start


def _make_slab(t: Tensor, fqn: str, m: meta.ParamSlice, unit_offset: int, tensor: int,
               param: int | None, device: torch.device) -> Slab:
    """One ParamSlice as a slab in this process's local coordinates."""
    idx = m.indices.to(torch.long).cpu()
    units = m.units.to(torch.long).cpu() + unit_offset
    shard_dim, start, n_local = _shard_info(t, fqn)
    if shard_dim == m.dim:
        keep = (idx >= start) & (idx < start + n_local)
        idx, units = idx[keep] - start, units[keep]
    span = None
    if len(idx) and torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + len(idx))):
        span = (int(idx[0]), int(idx[0]) + len(idx))
    return Slab(tensor=tensor, param=param, dim=m.dim, index=idx.to(device),
                units=units.to(device), span=span, replicated=shard_dim is None)


def _overlaps(slices: list[meta.ParamSlice]) -> bool:
    """Does an element lie in two of these slices (of one tensor)?"""
    if len({m.dim for m in slices}) > 1:
        return True
    idx = torch.cat([m.indices.to(torch.long).cpu() for m in slices])
    return len(torch.unique(idx)) != len(idx)


# ------------------------------------------------------------------ construction
def _collect(graph_module: nn.Module, prunable: list[meta.PruneGroup], role: str = "out"
             ) -> tuple[dict[str, Tensor], dict[str, list[tuple[meta.ParamSlice, int]]]]:
    """Tensors with ``role`` slices (one key per tensor: tied weights once) and their slices."""
    tensors: dict[str, Tensor] = {}
    slices: dict[str, list[tuple[meta.ParamSlice, int]]] = {}
    by_id: dict[int, str] = {}
    off = 0
    for g in prunable:
        for m in g.members:
            if m.role != role:
                continue
            t = get_attr_tensor(graph_module, m.fqn)
            if not isinstance(t, Tensor):
                raise InputError(f"QASSO: {m.fqn!r} of group {g.id} is not a tensor")
            key = by_id.setdefault(id(t), m.fqn)
            tensors[key] = t
            slices.setdefault(key, []).append((m, off))
        off += g.num_units
    return tensors, slices


def build_layout(graph_module: nn.Module, groups: tuple[meta.PruneGroup, ...],
                 weight_layer: dict[int, int], num_layers: int,
                 device: torch.device, consumer_slices: bool = False) -> Layout:
    """Slabs of every prunable unit (construction time only; O(rows) memory).

    Args:
        graph_module: the GetaModule's ``graph_module`` (ParamSlice FQNs resolve inside it).
        groups: all PruneGroups; unprunable ones are ignored.
        weight_layer: ``id(weight tensor)`` -> index of its weight quantizer (by identity, so
            tied weights reached under several FQNs resolve to the same quantizer).
        num_layers: ``L``, the number of quantizers (the "not quantized" layer id).
        device: where the index tensors live (the parameters' device).
        consumer_slices: also build the stat-only ``in_params`` / ``in_slabs`` (module
            docstring).

    Raises:
        InputError: a slice names something that is not a tensor, a trainable tensor is not
            contiguous, or a DTensor is sharded in a way QASSO does not handle.
    """
    prunable = [g for g in groups if g.prunable and g.num_units > 0]
    offsets = [0]
    for g in prunable:
        offsets.append(offsets[-1] + g.num_units)
    total = offsets.pop()
    sizes = torch.tensor([g.num_units for g in prunable], dtype=torch.long)
    unit_group = torch.repeat_interleave(torch.arange(len(prunable)), sizes)

    tensors, slices = _collect(graph_module, prunable)
    params: list[nn.Parameter] = []
    param_fqns: list[str] = []
    slabs: list[Slab] = []
    overlap: list[bool] = []
    unit_numel = torch.zeros(total, dtype=torch.float32)
    for ti, (key, t) in enumerate(tensors.items()):
        pi: int | None = None
        if isinstance(t, nn.Parameter) and t.requires_grad:
            if not t.is_contiguous():
                raise InputError(f"QASSO: parameter {key!r} is not contiguous")
            pi = len(params)
            params.append(t)
            param_fqns.append(key)
            overlap.append(_overlaps([m for m, _ in slices[key]]))
        for m, off in slices[key]:
            slabs.append(_make_slab(t, key, m, off, ti, pi, device))
            if pi is not None:
                _count_elements(unit_numel, t, m, off)
    in_params: list[nn.Parameter] = []
    in_fqns: list[str] = []
    in_slabs: list[list[Slab]] = []
    if consumer_slices:
        in_tensors, in_slices = _collect(graph_module, prunable, role="in")
        for key, t in in_tensors.items():
            if not (isinstance(t, nn.Parameter) and t.requires_grad):
                continue  # a frozen consumer: nothing QASSO steps, nothing to score by
            in_params.append(t)
            in_fqns.append(key)
            in_slabs.append([_make_slab(t, key, m, off, -1, None, device)
                             for m, off in in_slices[key]])
            for m, off in in_slices[key]:
                _count_elements(unit_numel, t, m, off)
    return Layout(
        num_units=total, group_ids=tuple(g.id for g in prunable), group_offsets=tuple(offsets),
        unit_group=unit_group.to(device), group_size=sizes.to(device),
        group_start=torch.tensor(offsets, dtype=torch.long).to(device), params=params,
        param_fqns=param_fqns, numels=[p.numel() for p in params],
        param_layer=[weight_layer.get(id(p), num_layers) for p in params],
        unit_numel=unit_numel.to(device), tensors=list(tensors.values()),
        tensor_fqns=list(tensors), slabs=slabs, overlap=overlap,
        sharded=any(_shard_info(p, n)[0] is not None
                    for p, n in zip(params + in_params, param_fqns + in_fqns)),
        in_params=in_params, in_slabs=in_slabs)


def _count_elements(unit_numel: Tensor, t: Tensor, m: meta.ParamSlice, off: int) -> None:
    """Add the elements per unit of slice ``m`` of ``t`` (from the global shape)."""
    per_row = t.numel() // max(int(t.shape[m.dim]), 1)
    unit_numel.index_add_(0, m.units.to(torch.long).cpu() + off,
                          torch.full((len(m.units),), float(per_row)))
