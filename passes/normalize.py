"""normalize: canonicalise the captured graph before analysis.

* drops runtime assertion nodes torch.export leaves behind
  (``_assert_tensor_metadata``, ``_assert_scalar``, ``sym_constrain_range*``);
* removes dead pure nodes (no users, no side effects).

``modified`` is True only if a node was erased.  Idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from geta_fx.pipeline import PassResult

aten = torch.ops.aten


def _assert_targets() -> set:
    out = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
    for name in ("sym_constrain_range_for_size", "sym_constrain_range", "_assert_async"):
        packet = getattr(aten, name, None)
        if packet is not None:
            out |= {getattr(packet, o) for o in packet.overloads()}
    return out


_ASSERTS = _assert_targets()


@dataclass(frozen=True)
class Normalize:
    name: ClassVar[str] = "normalize"
    requires: ClassVar[frozenset[str]] = frozenset({"val"})
    provides: ClassVar[frozenset[str]] = frozenset({"normalized"})
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op == "call_function" and node.target in _ASSERTS:
                gm.graph.erase_node(node)
                modified = True
            elif (node.op == "call_function" and not node.users and not node.is_impure()
                  and not _mutates(node)):
                gm.graph.erase_node(node)
                modified = True
        return PassResult(gm, modified)


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)
