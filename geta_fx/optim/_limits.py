"""Per-group pruning limits of QASSO: ``min_kept``, ``max_sparsity``, ``skip`` and the default
protection of small groups, resolved once at construction into ``keep_min[g]`` (the fewest
units prunable group ``g`` may keep).

Rule (every prunable group ``g`` of ``n`` units; ``min_kept`` / ``max_sparsity`` are one value
for every group or ``{pattern: value}`` for the groups those patterns name, matched like
``skip``, the strictest value winning where several apply)::

    keep_min[g] = n                                     if a skip pattern names the group
                = max(1, units(min_kept), ceil((1 - max_sparsity) * n))   otherwise
    units(min_kept) = min_kept            (int, units; capped at n)
                    = ceil(min_kept * n)  (float in (0, 1), a fraction)

Default (no ``min_kept`` or ``max_sparsity`` value applies to the group): ``keep_min =
max(1, ceil((1 - s) / 2 * n))`` for target sparsity ``s``: no group is cut below half of the
average kept share, so a global ranking cannot leave 1 of 8 channels in one layer (at s = 0.5
every group keeps >= 25%, at 0.3 >= 35%).  Uniform allocation always satisfies it, so it
never makes a target unreachable except by rounding in groups of a few units.  ``min_kept=1``
restores "one unit per group".

With ``group_divisible = d > 1`` the kept count must also be a multiple of ``d``: the group
keeps at least the smallest multiple of ``d`` that is ``>= keep_min``, or stays whole when that
exceeds ``n``.  :func:`resolve` also says, per group, why units cannot go (for the warning).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
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


#: a limit: one value for every group, or ``{pattern: value}`` for the groups a pattern names
Limit = int | float | Mapping[str, int | float] | None


def _check_min_kept(min_kept: object) -> None:
    if isinstance(min_kept, bool) or not isinstance(min_kept, int | float):
        raise InputError(f"QASSO: min_kept must be an int (units) or a float in (0, 1) "
                         f"(fraction of each group), or a {{pattern: value}} dict of them, got "
                         f"{min_kept!r}")
    if isinstance(min_kept, int) and min_kept < 1:
        raise InputError(f"QASSO: min_kept={min_kept}: every group keeps at least one unit "
                         "(removing a group's last unit would cut the network); use >= 1")
    if isinstance(min_kept, float) and not 0.0 < min_kept < 1.0:
        raise InputError(f"QASSO: a fractional min_kept must lie in (0, 1), got {min_kept}")


def _check_max_sparsity(max_sparsity: object) -> None:
    if isinstance(max_sparsity, bool) or not isinstance(max_sparsity, int | float) or \
            not 0.0 < float(max_sparsity) <= 1.0:
        raise InputError(f"QASSO: max_sparsity must lie in (0, 1] (or be a {{pattern: value}} "
                         f"dict of such values), got {max_sparsity!r}")


def match_groups(pattern: str, groups: Sequence[PruneGroup], names: Sequence[str],
                 what: str) -> set[int]:
    """Ids of the groups whose ``"out"`` slices ``pattern`` names (fnmatch on the parameter
    name or its module path); a pattern that names no parameter or module of the model is an
    InputError (``what`` says which argument it came from)."""
    if not isinstance(pattern, str) or not pattern:
        raise InputError(f"QASSO: {what} patterns must be non-empty strings, got {pattern!r}")
    modules = sorted({n.rsplit(".", 1)[0] for n in names if "." in n})
    if not any(fnmatch.fnmatchcase(n, pattern) for n in (*names, *modules)):
        close = [n for n in modules if n.split(".")[-1] in pattern][:5] or modules[:5]
        raise InputError(f"QASSO: {what} pattern {pattern!r} matches no parameter or module "
                         f"of the model (fnmatch on names such as {close})")
    hit: set[int] = set()
    for g in groups:
        for m in g.out_members:
            if fnmatch.fnmatchcase(m.fqn, pattern) or \
                    fnmatch.fnmatchcase(m.fqn.rsplit(".", 1)[0], pattern):
                hit.add(g.id)
                break
    return hit


def _per_group(value: Limit, what: str, check: Callable[[object], None],
               groups: Sequence[PruneGroup], names: Sequence[str]) -> list[list[float]]:
    """The values of a limit that apply to each group (none, one, or several patterns')."""
    if value is None:
        return [[] for _ in groups]
    if not isinstance(value, Mapping):
        check(value)
        return [[value] for _ in groups]
    out: list[list[float]] = [[] for _ in groups]
    for pattern, v in value.items():
        check(v)
        ids = match_groups(pattern, groups, names, what)
        for vals, g in zip(out, groups, strict=True):
            if g.id in ids:
                vals.append(v)
    return out


def _units(n: int) -> str:
    return f"{n} unit" if n == 1 else f"{n} units"


def _kept_units(value: float, n: int) -> int:
    """Units a ``min_kept`` value keeps in a group of ``n`` (int: units, float: share)."""
    if isinstance(value, int):
        return min(value, n)
    return math.ceil(value * n - _EPS)


def resolve(groups: Sequence[PruneGroup], *, target: float, min_kept: Limit,
            max_sparsity: Limit, skip: Sequence[str], divisible: int,
            names: Iterable[str]) -> Limits:
    """``keep_min``/``floor`` of every prunable group (``groups`` in layout order).

    ``min_kept`` / ``max_sparsity`` are one value for all groups or ``{pattern: value}`` for
    the groups the patterns name (several matching values: the strictest holds); a group that
    no value applies to gets the default protection.
    """
    names = list(names)
    mk = _per_group(min_kept, "min_kept", _check_min_kept, groups, names)
    ms = _per_group(max_sparsity, "max_sparsity", _check_max_sparsity, groups, names)
    skipped: set[int] = set()
    for pattern in skip:
        skipped |= match_groups(pattern, groups, names, "skip")
    keep, floor, why = [], [], []
    for g, mk_g, ms_g in zip(groups, mk, ms, strict=True):
        n = g.num_units
        if g.id in skipped:
            k, reason = n, "skip"
        else:
            need = {"one unit per group": 1}
            if not mk_g and not ms_g:
                need["default protection (1 - target) / 2"] = math.ceil(
                    (1.0 - target) / 2 * n - _EPS)
            if mk_g:
                need["min_kept"] = max(_kept_units(v, n) for v in mk_g)
            if ms_g:
                need["max_sparsity"] = max(math.ceil((1.0 - float(v)) * n - _EPS) for v in ms_g)
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

