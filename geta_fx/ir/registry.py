"""The op registry: one :class:`ChannelRule` per op, holding both halves of its channel logic.

* ``analyze(an, node)``: how channel labels flow through the op and which atoms are pruned
  together (dependency_groups' abstract interpretation; ``an`` is its analyzer).
* ``rewrite(gm, node, kept)``: what physical_prune changes at the op once units are removed
  (shape constants, group counts, norm counts...); ``kept`` is a
  :class:`~geta_fx.ir.channels.KeptChannels`.  A rule that needs none says why in
  ``no_rewrite`` (parameters are sliced, and computed operands ``an.external`` records are
  ``index_select``-ed, by physical_prune for every op).

Rules are registered with op objects, as ``torch.utils.flop_counter.register_flop_formula``
does::

    @channel_rule(aten.group_norm.default, rewrite=_rewrite_num_groups)
    def _group_norm(an, node): ...

Registering something that is not an ``OpOverload`` (a string, a packet) or an op twice
raises :class:`RegistryError`.  An op with no rule pins every channel it touches.  The rules
live in ``geta_fx/ir/rules_*.py``; importing ``geta_fx.ir.ops_table`` loads them all (read
``RULES`` after that import).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.fx
from torch._ops import OpOverload

from geta_fx.errors import GetaFxError

Analysis = Callable[[Any, torch.fx.Node], Any]
Rewrite = Callable[[torch.fx.GraphModule, torch.fx.Node, Any], None]

#: Python callables a graph calls that are not ATen ops but carry channels.
PYTHON_TARGETS = frozenset({operator.getitem})


class RegistryError(GetaFxError, ValueError):
    """A rule was registered for something that is not an op, or for an op twice."""


@dataclass(frozen=True)
class ChannelRule:
    """Analysis and rewrite of one op (exactly one of ``rewrite`` / ``no_rewrite``)."""

    op: Any
    analyze: Analysis
    rewrite: Rewrite | None = None
    no_rewrite: str | None = None

    def __post_init__(self) -> None:
        if (self.rewrite is None) == (not self.no_rewrite):
            raise RegistryError(f"rule for {self.op}: give either a rewrite or the reason it "
                                "needs none (no_rewrite=...), not both or neither")


_RULES: dict[Any, ChannelRule] = {}
#: op -> its rule (read-only view; register through :func:`channel_rule`).
RULES: Mapping[Any, ChannelRule] = MappingProxyType(_RULES)


def _check_target(op: Any) -> None:
    if isinstance(op, OpOverload) or op in PYTHON_TARGETS:
        return
    hint = (" (pick an overload, e.g. .default)" if isinstance(op, torch._ops.OpOverloadPacket)
            else "")
    raise RegistryError(f"channel_rule: {op!r} is not an OpOverload{hint}")


def channel_rule(*ops: Any, rewrite: Rewrite | None = None,
                 no_rewrite: str | None = None) -> Callable[[Analysis], Analysis]:
    """Register ``analyze`` (the decorated function) and its rewrite for each of ``ops``.

    Decorators stack: one analysis may serve op sets that need different rewrites.
    """
    for op in ops:
        _check_target(op)

    def deco(analyze: Analysis) -> Analysis:
        for op in ops:
            if op in _RULES:
                raise RegistryError(f"channel_rule: duplicate registration for {op} "
                                    f"({_RULES[op].analyze.__qualname__} and "
                                    f"{analyze.__qualname__})")
        for op in ops:
            _RULES[op] = ChannelRule(op, analyze, rewrite, no_rewrite)
        return analyze
    return deco


def register_all(ops: Iterable[Any], analyze: Analysis, *, rewrite: Rewrite | None = None,
                 no_rewrite: str | None = None) -> None:
    """:func:`channel_rule` for a rule built by a factory (``_elementwise(kind)``)."""
    channel_rule(*ops, rewrite=rewrite, no_rewrite=no_rewrite)(analyze)


def rule_for(target: Any) -> ChannelRule | None:
    """The rule of ``target``, or None (the op pins every channel it touches)."""
    try:
        return _RULES.get(target)
    except TypeError:  # unhashable target
        return None
