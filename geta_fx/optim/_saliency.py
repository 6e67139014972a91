"""Saliency scores and the global, exact-K selection of redundant units (GETA_SPEC §C.6).

All functions are fixed-shape tensor programs over the ``U`` prunable units: no host sync, no
loop over groups or units, identical results on every DDP rank for identical inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from geta_fx.errors import InputError
from geta_fx.optim._layout import Slab

#: criterion -> default weight (GETA_SPEC C.6 table).
DEFAULT_IMPORTANCE: dict[str, float] = {
    "magnitude": 0.2,
    "avg_magnitude": 0.2,
    "cosine_similarity": 0.2,
    "taylor_first_order": 0.2,
    "taylor_second_order": 0.2,
}


def check_importance(importance: Mapping[str, float] | None) -> dict[str, float]:
    if importance is None:
        return dict(DEFAULT_IMPORTANCE)
    unknown = sorted(set(importance) - set(DEFAULT_IMPORTANCE))
    if unknown:
        raise InputError(f"QASSO: unknown importance criteria {unknown}; "
                         f"known: {sorted(DEFAULT_IMPORTANCE)}")
    out = {k: float(v) for k, v in importance.items()}
    if not out or all(v == 0 for v in out.values()):
        raise InputError("QASSO: importance needs at least one criterion with a non-zero weight")
    return out


def add_unit_stats(stats: Tensor, slabs: list[Slab], x: Tensor, g: Tensor) -> None:
    """Add one tensor's ``(sum x^2, sum x*g, sum g^2)`` per unit into ``stats [U, 3]``.

    Args:
        stats: float32 accumulator, one row per global unit.
        slabs: the slabs of this tensor (:meth:`Layout.param_slabs`).
        x, g: the (local) tensor and its search direction; read through each slab's rows, in
            float32, reduced over every dim but the slab's (temporaries: one slab at a time).
    """
    for s in slabs:
        if not len(s.index):
            continue
        xs, gs = s.rows(x).float(), s.rows(g).float()
        vals = torch.stack([s.row_sums(xs * xs), s.row_sums(xs * gs), s.row_sums(gs * gs)], 1)
        stats.index_add_(0, s.units, vals)


def importance_scores(stats: Tensor, unit_numel: Tensor, weights: Mapping[str, float],
                      alive: Tensor) -> Tensor:
    """Weighted sum of the normalised criteria; lower = more redundant.

    Each criterion is divided by its L2 norm over the *alive* (not yet pruned) units
    (``sqrt(sum s^2 + 1e-8) + 1e-8``).  The reference normalises over all units, pruned ones
    included; they are excluded from selection anyway (G.2 #11), so they should not dilute the
    scale of the others either.
    """
    xx, xg, gg = stats.unbind(1)
    nx = xx.sqrt()
    crit = {
        "magnitude": nx,
        "avg_magnitude": nx / unit_numel.clamp_min(1),
        "cosine_similarity": xg / ((nx + 1e-8) * (gg.sqrt() + 1e-8)) + 1,
        "taylor_first_order": xg.abs(),
        "taylor_second_order": 0.5 * xg * xg,
    }
    alive_f = alive.to(stats.dtype)
    score = torch.zeros_like(nx)
    for name, w in weights.items():
        if w == 0:
            continue
        s = crit[name] * alive_f
        score = score + w * s / ((s * s).sum() + 1e-8).sqrt().add(1e-8)
    return score


def _segment_rank(keys: Tensor, unit_group: Tensor, group_start: Tensor,
                  descending: bool) -> tuple[Tensor, Tensor]:
    """Rank of every unit inside its group by ``keys`` (ties: lower unit index first).

    Returns ``(rank [U], order [U])`` where ``order`` lists units grouped by group, each group
    sorted by key; ``order[group_start[g]]`` is group ``g``'s first unit in that order.
    """
    by_key = torch.argsort(keys, descending=descending, stable=True)
    by_group = by_key[torch.argsort(unit_group[by_key], stable=True)]
    pos = torch.empty_like(by_group)
    pos[by_group] = torch.arange(len(by_group), device=keys.device)
    return pos - group_start[unit_group], by_group


def select_units(scores: Tensor, pruned: Tensor, unit_group: Tensor, group_start: Tensor,
                 group_size: Tensor, n_new: Tensor, divisible: int = 1,
                 keep_min: Tensor | None = None) -> Tensor:
    """The ``n_new`` lowest-scoring units that may still be pruned, as a bool mask ``[U]``.

    GETA_SPEC G.2 #11 fixed: already-pruned units are excluded *before* ranking, then the
    ``n_new`` lowest scores are taken globally (the reference truncates an index-sorted set).

    "At least ``keep_min[g]`` units per group" (default one; see :mod:`geta_fx.optim._limits`)
    is enforced up front: in every group the ``keep_min[g]`` highest-scoring units that are not
    pruned are protected, so the global selection never has to be undone and only runs short
    when fewer than ``n_new`` units are selectable at all.  With
    ``divisible > 1`` each group's count is then rounded down so that the units it keeps are a
    multiple of ``divisible`` (the reference's ``group_divisible``), and the slots that frees go,
    a block of ``divisible`` units at a time, to the groups with the cheapest next block; what
    is still missing (less than ``divisible`` units when enough blocks exist) is the shortfall,
    which the caller carries to the next period.
    """
    big = torch.finfo(scores.dtype).max
    alive_scores = torch.where(pruned, -big, scores)
    if keep_min is None:
        keep_min = torch.ones_like(group_size)
    alive_rank, _ = _segment_rank(alive_scores, unit_group, group_start, descending=True)
    protected = alive_rank < keep_min[unit_group]
    excluded = pruned | protected
    masked = torch.where(excluded, big, scores)
    order = torch.argsort(masked, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=scores.device)
    selected = (rank < n_new) & ~excluded
    if divisible <= 1:
        return selected
    # per-group refinement: keep (num_units - pruned - s) a multiple of `divisible`
    num_groups = len(group_size)
    ones = torch.ones_like(scores, dtype=torch.long)
    sel_count = torch.zeros(num_groups, dtype=torch.long, device=scores.device).index_add_(
        0, unit_group, selected.long() * ones)
    kept_before = group_size - torch.zeros_like(sel_count).index_add_(
        0, unit_group, pruned.long() * ones)
    allowed = sel_count - torch.remainder(sel_count - kept_before, divisible)
    allowed = allowed.clamp_min(0)
    # The selected units of a group are its lowest-scoring selectable ones, so a group's
    # allowance is a prefix in in-group rank order.  Rounding down freed `remaining` slots:
    # hand them out greedily, one block per group, to the groups whose next block (the units
    # that bring its kept count to the next multiple) has the lowest highest score.
    in_group_rank, by_group = _segment_rank(masked, unit_group, group_start, descending=False)
    remaining = (n_new - allowed.sum()).clamp_min(0)
    gap = kept_before - allowed
    block = torch.where(gap % divisible == 0, torch.full_like(gap, divisible), gap % divisible)
    can = (gap - block >= divisible) & (gap - block >= keep_min)
    last = (group_start + allowed + block - 1).clamp(max=len(scores) - 1)
    block_score = torch.where(can, masked[by_group[last]], torch.full_like(masked[last], big))
    order_g = torch.argsort(block_score, stable=True)
    fits = torch.cumsum(torch.where(can, block, 0)[order_g], 0) <= remaining
    extra = torch.zeros_like(can)
    extra[order_g] = can[order_g] & fits
    allowed = allowed + extra.long() * block
    return (in_group_rank < allowed[unit_group]) & ~excluded


def max_prunable(group_size: Tensor, divisible: int) -> int:
    """Most units any selection can prune (one kept per group, kept count divisible)."""
    sizes = group_size.long()
    if divisible <= 1:
        return int((sizes - 1).clamp_min(0).sum())
    # kept must be a positive multiple of `divisible`; groups smaller than that stay whole
    kept = torch.where(sizes >= divisible, torch.full_like(sizes, divisible), sizes)
    return int((sizes - kept).sum())
