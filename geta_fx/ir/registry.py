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

A rule registered with ``tiled=True`` also accepts tiled labels (channels interleaved with a
dynamic dim, :class:`~geta_fx.ir.channels.Label`); any other rule never sees one: the
analyzer pins them first.

Registering something that is not an ``OpOverload`` (a string, a packet) or an op twice
raises :class:`RegistryError`.  An in-place op (``relu_``, ``add_``) is never registered: it
resolves to its out-of-place sibling's rule, which also records that ``self`` now holds the
result (``rule_for``).  An op with no rule pins every channel it touches.  The rules
live in ``geta_fx/ir/rules_*.py``; importing ``geta_fx.ir.ops_table`` loads them all (read
``RULES`` after that import).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.fx
from torch._ops import OpOverload

from geta_fx.errors import GetaFxError
from geta_fx.ir import op_sets

Analysis = Callable[[Any, torch.fx.Node], Any]
Rewrite = Callable[[torch.fx.GraphModule, torch.fx.Node, Any], None]

#: Python callables a graph calls that are not ATen ops but carry channels.
PYTHON_TARGETS = frozenset({operator.getitem})


class RegistryError(GetaFxError, ValueError):
    """A rule was registered for something that is not an op, or for an op twice."""


@dataclass(frozen=True)
class ChannelRule:
    """Analysis and rewrite of one op (exactly one of ``rewrite`` / ``no_rewrite``);
    ``tiled``: the analysis handles tiled labels."""

    op: Any
    analyze: Analysis
    rewrite: Rewrite | None = None
    no_rewrite: str | None = None
    tiled: bool = False

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


def channel_rule(*ops: Any, rewrite: Rewrite | None = None, no_rewrite: str | None = None,
                 tiled: bool = False) -> Callable[[Analysis], Analysis]:
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
            _RULES[op] = ChannelRule(op, analyze, rewrite, no_rewrite, tiled)
        return analyze
    return deco


def register_all(ops: Iterable[Any], analyze: Analysis, *, rewrite: Rewrite | None = None,
                 no_rewrite: str | None = None, tiled: bool = False) -> None:
    """:func:`channel_rule` for a rule built by a factory (``_elementwise(kind)``)."""
    channel_rule(*ops, rewrite=rewrite, no_rewrite=no_rewrite, tiled=tiled)(analyze)


def rule_for(target: Any) -> ChannelRule | None:
    """The rule of ``target``, or None (the op pins every channel it touches).

    An in-place op with no rule of its own (``relu_``, ``add_``, ``hardswish_``, ...) gets
    its out-of-place sibling's (:func:`~geta_fx.ir.op_sets.out_of_place`), see
    :func:`_inplace_rule`.
    """
    try:
        rule = _RULES.get(target)
    except TypeError:  # unhashable target
        return None
    if rule is None and (base_op := op_sets.out_of_place(target)) is not None:
        base = _RULES.get(base_op)
        return _inplace_rule(target, base_op, base) if base is not None else None
    return rule


@contextlib.contextmanager
def _retargeted(node: torch.fx.Node, op: Any) -> Iterator[None]:
    """``node`` calls ``op`` for the duration (a rule's ``node.target is ...`` checks and
    argument names then read the sibling's schema); its own target afterwards, unless the
    rewrite replaced the op."""
    own = node.target
    node.target = op
    try:
        yield
    finally:
        if node.target is op:
            node.target = own


def _inplace_rule(op: OpOverload, base_op: OpOverload, base: ChannelRule) -> ChannelRule:
    """The rule of in-place ``op`` from its out-of-place sibling's ``base``.

    The analysis is the sibling's, after which the analyzer learns that the result was
    written into ``self`` (``an.mutated``): later readers of that tensor see the result's
    label, and other views of it that are read later are pinned if the write can make
    zeroed channels non-zero.  The rewrite (if any) is the sibling's.
    """
    def analyze(an: Any, node: torch.fx.Node) -> Any:
        with _retargeted(node, base_op):
            out = base.analyze(an, node)
        an.mutated(node.args[0], out, node)
        return out

    def rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Any) -> None:
        assert base.rewrite is not None
        with _retargeted(node, base_op):
            base.rewrite(gm, node, kept)

    return dataclasses.replace(base, op=op, analyze=analyze,
                               rewrite=rewrite if base.rewrite is not None else None)
