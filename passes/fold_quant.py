"""fold_quant: remove redundant activation-quantizer nodes.

Rewrites (repeated to a fixpoint; ``modified`` is True iff one fired):

* duplicates: several act quantizers reading the same tensor -> the first one
  serves every reader (one activation quantizer per tensor)::

      x -> Q1 -> conv1          x -> Q1 -> conv1
      x -> Q2 -> conv2   ==>          `--> conv2

* back-to-back: Q2(Q1(x)) -> Q1(x) (the outer one only re-quantizes a grid);
* across pure view ops: Q(view(x)) -> view(Q(x)), so quantizers that read views
  of one tensor meet and merge (per-tensor quantization commutes with
  reshape/permute/transpose/flatten exactly).

Weight quantizers are never touched.  Idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx

from geta_fx.ir import meta, op_sets
from geta_fx.pipeline import PassResult


def _is_act_quant(node: torch.fx.Node) -> bool:
    info = node.meta.get(meta.QUANTIZER)
    return node.op == "call_module" and info is not None and info.target == "act"


def _erase_quant(gm: torch.fx.GraphModule, node: torch.fx.Node,
                 replacement: torch.fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    target = str(node.target)
    gm.graph.erase_node(node)
    if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
        gm.delete_submodule(target)


def _dedup(gm: torch.fx.GraphModule) -> bool:
    changed = False
    seen: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if not _is_act_quant(node):
            continue
        src = node.args[0]
        first = seen.get(src)
        if first is None:
            seen[src] = node
            continue
        _erase_quant(gm, node, first)
        changed = True
    return changed


def _back_to_back(gm: torch.fx.GraphModule) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if _is_act_quant(node) and isinstance(node.args[0], torch.fx.Node) and (
                node.args[0].meta.get(meta.QUANTIZER) is not None):
            _erase_quant(gm, node, node.args[0])
            changed = True
    return changed


def _hoist_over_views(gm: torch.fx.GraphModule) -> bool:
    """Q(view(x)) -> view'(Q(x)) when x is a tensor another act quantizer reads too,
    or when x is itself a view (so chains collapse onto the base tensor)."""
    changed = False
    readers: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        if _is_act_quant(node):
            base = _view_base(node.args[0])
            readers[base] = readers.get(base, 0) + 1
    for node in list(gm.graph.nodes):
        if not _is_act_quant(node):
            continue
        view = node.args[0]
        if not (isinstance(view, torch.fx.Node) and view.op == "call_function"
                and view.target in op_sets.VIEWS):
            continue
        if readers.get(_view_base(view), 0) < 2:
            continue
        x = view.args[0]
        with gm.graph.inserting_after(x):
            q2 = gm.graph.call_module(str(node.target), (x,))
        q2.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        if "val" in x.meta:
            q2.meta["val"] = x.meta["val"]
        with gm.graph.inserting_after(q2):
            v2 = gm.graph.call_function(view.target, (q2, *view.args[1:]), dict(view.kwargs))
        v2.meta.update(view.meta)
        node.replace_all_uses_with(v2)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _view_base(node: object) -> object:
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            node.target in op_sets.VIEWS:
        node = node.args[0]
    return node


@dataclass(frozen=True)
class FoldQuant:
    name: ClassVar[str] = "fold_quant"
    requires: ClassVar[frozenset[str]] = frozenset({"geta.quantizer"})
    provides: ClassVar[frozenset[str]] = frozenset({"quant_folded"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"geta.group"})
    max_iters: int = 8

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for _ in range(self.max_iters):
            changed = _back_to_back(gm)
            changed |= _hoist_over_views(gm)
            changed |= _dedup(gm)
            if not changed:
                break
            modified = True
        if modified:
            for node in reversed(list(gm.graph.nodes)):
                if node.op == "call_function" and node.target in op_sets.VIEWS and not node.users:
                    gm.graph.erase_node(node)
        return PassResult(gm, modified)
