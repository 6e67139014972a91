"""Parameters that reach higher-order-op branches (``torch.cond``, ``while_loop``, ``map``...).

torch.export keeps a higher-order op as one ``call_function`` whose branch bodies are
``get_attr`` GraphModules and whose parameters are lifted into its operands.  The passes
do not analyse inside those bodies (a body's channels, and its shape constants, would have
to be pruned with the outer graph), so every parameter routed into one is reported with a
reason per parameter instead of being dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.utils._pytree as pytree

from geta_fx.ir.ops_table import quantizer_module
from geta_fx.ir.query import get_attr_tensor


@dataclass(frozen=True)
class BranchUse:
    """Parameter ``fqn`` is operand ``index`` of higher-order op ``node`` (named ``op``).

    ``branches`` names the body graphs that read it (all bodies when the operand-to-
    placeholder mapping is not known); ``inputs[k]`` is its placeholder in ``branches[k]``
    (None when not known).
    """

    fqn: str
    node: str
    op: str
    branches: tuple[str, ...]
    inputs: tuple[torch.fx.Node | None, ...]

    def describe(self) -> str:
        where = ", ".join(repr(b) for b in self.branches) or "(unused by every branch)"
        kind = "branch" if self.op == "cond" else "body"
        plural = "es" if kind == "branch" and len(self.branches) > 1 else (
            "s" if len(self.branches) > 1 else "")
        return f"used inside torch.{self.op} {kind}{plural} {where}"


def is_higher_order(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and \
        getattr(node.target, "namespace", None) == "higher_order"


def _bodies(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[tuple[str, torch.fx.Graph]]:
    out = []
    for a in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(a, torch.fx.Node) and _is_body(gm, a):
            out.append((str(a.target), get_attr_tensor(gm, str(a.target)).graph))
    return out


def _is_body(gm: torch.fx.GraphModule, x: torch.fx.Node) -> bool:
    return x.op == "get_attr" and isinstance(get_attr_tensor(gm, str(x.target)),
                                              torch.fx.GraphModule)


def _operands(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensor operands mapped positionally onto each body's placeholders (cond: the
    operand tuple; otherwise every non-body node operand, flattened)."""
    if getattr(node.target, "__name__", "") == "cond" and len(node.args) >= 4:
        return [a for a in pytree.tree_leaves(node.args[3]) if isinstance(a, torch.fx.Node)]
    return [a for a in pytree.tree_leaves((node.args, node.kwargs))
            if isinstance(a, torch.fx.Node) and not _is_body(gm, a)]


def branch_uses(gm: torch.fx.GraphModule) -> list[BranchUse]:
    """One BranchUse per (parameter, higher-order op) pair in ``gm``'s top-level graph."""
    out: list[BranchUse] = []
    for node in gm.graph.nodes:
        if not is_higher_order(node):
            continue
        bodies = _bodies(gm, node)
        operands = _operands(gm, node)
        op = str(getattr(node.target, "__name__", node.target))
        for i, x in enumerate(operands):
            x = _through_quantizer(gm, x)
            if x.op != "get_attr" or not isinstance(get_attr_tensor(gm, str(x.target)),
                                                    torch.nn.Parameter):
                continue
            names: list[str] = []
            inputs: list[torch.fx.Node | None] = []
            for name, graph in bodies:
                phs = [n for n in graph.nodes if n.op == "placeholder"]
                if len(phs) != len(operands):  # mapping unknown: name every body
                    names.append(name)
                    inputs.append(None)
                elif phs[i].users:
                    names.append(name)
                    inputs.append(phs[i])
            out.append(BranchUse(str(x.target), node.name, op, tuple(names), tuple(inputs)))
    return out


def _through_quantizer(gm: torch.fx.GraphModule, x: torch.fx.Node) -> torch.fx.Node:
    if quantizer_module(gm, x) is not None and isinstance(x.args[0], torch.fx.Node):
        return x.args[0]
    return x
