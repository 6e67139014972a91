"""Per-group pruning limits of QASSO: ``min_kept``, ``max_sparsity``, ``skip`` and the default
protection of small groups, resolved once at construction into ``keep_min[g]`` (the fewest
units prunable group ``g`` may keep).

Rule (every prunable group ``g`` of ``n`` units)::

    keep_min[g] = n                                     if a skip pattern names the group
                = max(1, units(min_kept), ceil((1 - max_sparsity) * n))   otherwise
    units(min_kept) = min_kept            (int, units; capped at n)
                    = ceil(min_kept * n)  (float in (0, 1), a fraction)

Default (neither ``min_kept`` nor ``max_sparsity`` given): ``keep_min = max(1, ceil((1 - s) / 2
* n))`` for target sparsity ``s``: no group is cut below half of the average kept share, so a
global ranking cannot leave 1 of 8 channels in one layer (at s = 0.5 every group keeps >= 25%,
at 0.3 >= 35%).  Uniform allocation always satisfies it, so it never makes a target unreachable
except by rounding in groups of a few units.  ``min_kept=1`` restores "one unit per group".

With ``group_divisible = d > 1`` the kept count must also be a multiple of ``d``: the group
keeps at least the smallest multiple of ``d`` that is ``>= keep_min``, or stays whole when that
exceeds ``n``.  :func:`resolve` also says, per group, why units cannot go (for the warning).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from geta_fx.errors import InputError
from geta_fx.ir.meta import PruneGroup

_EPS = 1e-9  # (1 - 0.7) * 10 = 3.0000000000000004 must not round up to 4


@dataclass(frozen=True)
class Limits:
    """Resolved limits of the prunable groups (layout order)."""

    keep_min: tuple[int, ...]            # fewest units each group may keep
    floor: tuple[int, ...]               # fewest units each group can keep (with divisibility)
    why: tuple[str | None, ...]          # what holds the group at ``floor`` (None: plain rule)
    skipped: tuple[int, ...]             # PruneGroup ids named by a skip pattern
    sizes: tuple[int, ...]               # units of each group

    @property
    def max_prunable(self) -> int:
        """Most units any selection can remove under these limits."""
        return sum(n - f for n, f in zip(self.sizes, self.floor, strict=True))


def _check_min_kept(min_kept: int | float | None) -> None:
    if min_kept is None:
        return
    if isinstance(min_kept, bool) or not isinstance(min_kept, int | float):
        raise InputError(f"QASSO: min_kept must be an int (units) or a float in (0, 1) "
                         f"(fraction of each group), got {min_kept!r}")
    if isinstance(min_kept, int) and min_kept < 1:
        raise InputError(f"QASSO: min_kept={min_kept}: every group keeps at least one unit "
                         "(removing a group's last unit would cut the network); use >= 1")
    if isinstance(min_kept, float) and not 0.0 < min_kept < 1.0:
        raise InputError(f"QASSO: a fractional min_kept must lie in (0, 1), got {min_kept}")


def _check_max_sparsity(max_sparsity: float | None) -> None:
    if max_sparsity is not None and not 0.0 < float(max_sparsity) <= 1.0:
        raise InputError(f"QASSO: max_sparsity must lie in (0, 1], got {max_sparsity}")


def match_skip(patterns: Iterable[str], groups: Sequence[PruneGroup],
               names: Iterable[str]) -> set[int]:
    """Ids of the groups whose ``"out"`` slices a pattern names (parameter name or module path,
    fnmatch); a pattern that names no parameter or module of the model is an InputError."""
    names = list(names)
    modules = {n.rsplit(".", 1)[0] for n in names if "." in n}
    hit: set[int] = set()
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise InputError(f"QASSO: skip patterns must be non-empty strings, got {pat!r}")
        if not any(fnmatch.fnmatchcase(n, pat) for n in (*names, *modules)):
            close = sorted(n for n in modules if n.split(".")[-1] in pat)[:5] or sorted(
                modules)[:5]
            raise InputError(f"QASSO: skip pattern {pat!r} matches no parameter or module of "
                             f"the model (fnmatch on names such as {close})")
        for g in groups:
            for m in g.out_members:
                mod = m.fqn.rsplit(".", 1)[0]
                if fnmatch.fnmatchcase(m.fqn, pat) or fnmatch.fnmatchcase(mod, pat):
                    hit.add(g.id)
                    break
    return hit


def resolve(groups: Sequence[PruneGroup], *, target: float, min_kept: int | float | None,
            max_sparsity: float | None, skip: Sequence[str], divisible: int,
            names: Iterable[str]) -> Limits:
    """``keep_min``/``floor`` of every prunable group (``groups`` in layout order)."""
    _check_min_kept(min_kept)
    _check_max_sparsity(max_sparsity)
    skipped = match_skip(skip, groups, names)
    default = min_kept is None and max_sparsity is None
    keep, floor, why = [], [], []
    for g in groups:
        n = g.num_units
        if g.id in skipped:
            k, reason = n, "skip"
        else:
            need = {"one unit per group": 1}
            if default:
                need["default protection (1 - target) / 2"] = math.ceil(
                    (1.0 - target) / 2 * n - _EPS)
            if isinstance(min_kept, int):
                need["min_kept"] = min(min_kept, n)
            elif isinstance(min_kept, float):
                need["min_kept"] = math.ceil(min_kept * n - _EPS)
            if max_sparsity is not None:
                need["max_sparsity"] = math.ceil((1.0 - float(max_sparsity)) * n - _EPS)
            reason, k = max(need.items(), key=lambda kv: kv[1])
            k = max(1, k)
            if n == 1:
                reason = "one-unit group"
        f = k
        if divisible > 1 and k % divisible:
            f = -(-k // divisible) * divisible
            if f > n:
                f, reason = n, f"group_divisible={divisible}"
            elif f > k:
                reason = f"group_divisible={divisible}"
        keep.append(k)
        floor.append(f)
        why.append(reason)
    return Limits(keep_min=tuple(keep), floor=tuple(floor), why=tuple(why),
                  skipped=tuple(sorted(skipped)), sizes=tuple(g.num_units for g in groups))


def shortfall_message(lim: Limits, group_ids: Sequence[int], target: float, k_target: int,
                      num_units: int) -> str:
    """Why at most ``lim.max_prunable`` of ``k_target`` units can go, by reason and group."""
    reach = lim.max_prunable
    head = (f"QASSO: target_sparsity={target:.1%} asks for {k_target} of {num_units} prunable "
            f"units, but at most {reach} ({reach / max(num_units, 1):.1%}) can be removed")
    by_reason: dict[str, list[tuple[int, int, int]]] = {}
    for gid, n, f, r in zip(group_ids, lim.sizes, lim.floor, lim.why, strict=True):
        if f > 0 and r is not None:
            by_reason.setdefault(r, []).append((gid, n, f))
    parts = []
    for reason, rows in sorted(by_reason.items(), key=lambda kv: -sum(f for _, _, f in kv[1])):
        shown = ", ".join(f"group {gid} ({_units(n)}) keeps {f}" for gid, n, f in rows[:4])
        more = f", ... {len(rows) - 4} more" if len(rows) > 4 else ""
        total = f" [{_units(sum(f for _, _, f in rows))} kept in all]" if len(rows) > 1 else ""
        parts.append(f"{reason}: {shown}{more}{total}")
    return head + ": " + "; ".join(parts) if parts else head


def _units(n: int) -> str:
    return f"{n} unit" if n == 1 else f"{n} units"
