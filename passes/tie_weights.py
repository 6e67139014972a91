"""tie_weights: one parameter, one ``get_attr`` node, one name for every tied tensor.

A model with tied weights (``GPT2LMHeadModel``'s ``transformer.wte.weight`` and
``lm_head.weight``) reaches the unlifted graph as one tensor registered under two names and
read by two ``get_attr`` nodes.  Every later pass keys parameters by name, so the tie would
be lost: two quantizers on one table, two groups' slices of one tensor, two tables in the
slim model.  This pass keeps the first name (``named_parameters`` order, the one
``nn.Module.parameters()`` counts), points every ``get_attr`` of the tensor at one node with
that name, removes the other names from the module tree and records them in
``gm.meta["geta.tied"]`` (alias -> kept name).

Invariants after it: no two attribute names of ``gm`` refer to the same tensor; at most one
``get_attr`` node per target, placed before every user.  Honest ``modified``; idempotent.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from geta_fx.ir import meta
from geta_fx.pipeline import PassResult


def _find_aliases(gm: torch.fx.GraphModule) -> dict[str, str]:
    """alias fqn -> the first fqn registered for the same tensor."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for fqn, t in itertools.chain(gm.named_parameters(remove_duplicate=False),
                                  gm.named_buffers(remove_duplicate=False)):
        kept = first.setdefault(id(t), fqn)
        if kept != fqn:
            aliases[fqn] = kept
    return aliases


def _rewrite_get_attrs(gm: torch.fx.GraphModule, aliases: dict[str, str]) -> bool:
    """Merge get_attr nodes reading the same tensor into one (placed before all users)."""
    changed = False
    kept: dict[str, torch.fx.Node] = {}
    for node in list(gm.graph.find_nodes(op="get_attr")):
        target = aliases.get(str(node.target), str(node.target))
        keep = kept.get(target)
        if keep is None:
            if node.target != target:
                node.target = target
                changed = True
            kept[target] = node
            continue
        node.prepend(keep)  # ``node`` may come first in the graph: keep precedes its users
        node.replace_all_uses_with(keep)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _remove_alias(gm: torch.fx.GraphModule, fqn: str) -> None:
    owner_name, _, name = fqn.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)


@dataclass(frozen=True)
class TieWeights:
    name: ClassVar[str] = "tie_weights"
    requires: ClassVar[frozenset[str]] = frozenset({"graph"})
    provides: ClassVar[frozenset[str]] = frozenset({"tied"})
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        aliases = _find_aliases(gm)
        if not aliases:
            return PassResult(gm, False)
        _rewrite_get_attrs(gm, aliases)
        for fqn in aliases:
            _remove_alias(gm, fqn)
        gm.meta[meta.TIED] = {**gm.meta.get(meta.TIED, {}), **aliases}
        return PassResult(gm, True)
