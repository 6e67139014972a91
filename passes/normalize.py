"""normalize: canonicalise the captured graph before analysis.

* drops runtime assertion nodes torch.export leaves behind
  (``_assert_tensor_metadata``, ``_assert_scalar``, ``sym_constrain_range*``);
* re-folds geta quantizers: re-exporting a quantized model (a second ``transform`` of a
  ``compress()``-ed GetaModule) traces each :class:`~geta_fx.quantizer.Quantizer` into
  ``geta::quantize(x, f(P.log_d), g(P.log_q_m), P.t, signed)`` (``f``, ``g``: short chains
  of unary ops such as ``exp``, ``clamp_min``) over a plain module ``P`` holding exactly a
  Quantizer's parameters.  When a Quantizer owning *those same* parameters reproduces the
  three operands bit for bit (checked by replaying the chains), the call becomes a
  ``call_module`` quantizer node again: learned bit width kept, numerics unchanged, with
  ``geta.quantizer`` metadata, so later passes see it as if inserted here.  Anything
  else stays a bare ``geta::quantize`` (dependency_groups treats it as transparent);
* removes dead pure nodes (no users, no side effects) and the ``get_attr`` nodes a
  re-fold left unused.

``modified`` is True only if a node was erased or re-folded.  Idempotent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

from geta_fx.ir import meta, op_sets
from geta_fx.ir.ops_table import is_geta_op
from geta_fx.ir.query import get_attr_tensor, is_quantizer
from geta_fx.pipeline import PassResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Normalize:
    name: ClassVar[str] = "normalize"
    requires: ClassVar[frozenset[str]] = frozenset({"val"})
    provides: ClassVar[frozenset[str]] = frozenset({"normalized"})
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = _refold_quantizers(gm)
        for node in reversed(list(gm.graph.nodes)):
            if node.op == "call_function" and node.target in op_sets.ASSERTS:
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


# ------------------------------------------------------------------ quantizer re-folding
#: geta::quantize(x, d, q_m, t, signed): operands 1..3 come from the Quantizer's parameters.
_OPERANDS = (1, 2, 3)
#: At most this many unary ops between a quantizer parameter and the op (exp, abs, clamp).
_MAX_CHAIN = 4


def _chain(arg: Any) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(get_attr, the unary ops from it to ``arg`` in order) if ``arg`` is such a chain."""
    chain: list[torch.fx.Node] = []
    while isinstance(arg, torch.fx.Node) and arg.op == "call_function":
        if len(chain) == _MAX_CHAIN or arg.all_input_nodes != [arg.args[0]]:
            return None
        chain.append(arg)
        arg = arg.args[0]
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return arg, chain[::-1]
    return None


def _replay(t: torch.Tensor, chain: list[torch.fx.Node]) -> torch.Tensor:
    for n in chain:
        t = n.target(t, *n.args[1:], **n.kwargs)  # type: ignore[operator]
    return t


def _candidate(gm: torch.fx.GraphModule, node: torch.fx.Node
               ) -> tuple[str, nn.Module, list[tuple[torch.fx.Node, list[torch.fx.Node]]]] | None:
    """(owner path, Quantizer, operand chains) when ``node`` is a traced Quantizer's
    ``geta::quantize`` whose operands the Quantizer reproduces bit for bit."""
    if node.op != "call_function" or not is_geta_op(node.target, "quantize") or \
            len(node.args) != 5 or node.kwargs or not isinstance(node.args[4], bool):
        return None
    chains = [_chain(node.args[i]) for i in _OPERANDS]
    if any(c is None for c in chains):
        return None
    targets = [str(c[0].target) for c in chains if c is not None]
    owners = {t.rpartition(".")[0] for t in targets}
    if len(owners) != 1 or not next(iter(owners)):
        return None
    owner_path = owners.pop()
    q = _as_quantizer(gm, owner_path, node)
    if q is None:
        return None
    with torch.no_grad():
        want = (q.d, q.effective_q_m(), q.t)
        got = [_replay(get_attr_tensor(gm, t), c[1]) for t, c in zip(targets, chains)
               if c is not None]
        if not all(torch.equal(a, b) for a, b in zip(want, got, strict=True)):
            return None
    return owner_path, q, chains  # type: ignore[return-value]


def _is_param_attr(gm: torch.fx.GraphModule, x: Any) -> bool:
    return isinstance(x, torch.fx.Node) and x.op == "get_attr" and \
        isinstance(get_attr_tensor(gm, str(x.target)), nn.Parameter)


def _as_quantizer(gm: torch.fx.GraphModule, owner_path: str,
                  node: torch.fx.Node) -> nn.Module | None:
    """A Quantizer owning the parameters of the module at ``owner_path`` (not installed),
    or None when that module does not hold exactly a Quantizer's parameters."""
    from geta_fx.quantizer import Quantizer

    owner = gm.get_submodule(owner_path)
    if is_quantizer(owner):
        return owner
    x, signed = node.args[0], bool(node.args[4])
    weight = _is_param_attr(gm, x)
    q = Quantizer("weight" if weight else "act", signed=signed,
                  name=str(x.target) if weight else owner_path.removeprefix("geta_quant."))
    own = dict(owner.named_parameters(recurse=False))
    fresh = dict(q.named_parameters())
    if set(own) != set(fresh) or any(True for _ in owner.children()) or any(
            own[k].shape != v.shape for k, v in fresh.items()):
        return None
    for leaf, p in own.items():  # the same Parameter objects: values, grads, identity
        q.register_parameter(leaf, p)
    if weight:
        q.param_fqn = str(x.target)  # type: ignore[attr-defined,union-attr]
    q.refolded = True  # type: ignore[attr-defined]  # learned, not fresh: see keep_refolded
    return q


@contextlib.contextmanager
def keep_refolded(model: nn.Module) -> Iterator[None]:
    """Restore the re-folded (already learned) quantizers of ``model`` on exit.

    ``transform`` calibrates the activation quantizers it inserts; quantizers a second
    round re-folded carry learned ranges and must come out of calibration unchanged.
    """
    saved = [(q, q.signed, {k: v.detach().clone() for k, v in q.named_parameters()})
             for q in model.modules() if getattr(q, "refolded", False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for q, signed, params in saved:
                q.signed = signed
                for k, v in params.items():
                    getattr(q, k).copy_(v)


def _refold_quantizers(gm: torch.fx.GraphModule) -> bool:
    """Re-fold every traced Quantizer into a ``call_module`` quantizer node; True if any."""
    folded: list[str] = []
    nodes: dict[tuple[str, torch.fx.Node], torch.fx.Node] = {}  # one node per (Q, input)
    for node in list(gm.graph.nodes):
        found = _candidate(gm, node)
        if found is None:
            continue
        owner_path, q, chains = found
        if gm.get_submodule(owner_path) is not q:
            gm.set_submodule(owner_path, q)
        qnode = nodes.get((owner_path, node.args[0]))
        if qnode is None:
            with gm.graph.inserting_before(node):
                qnode = gm.graph.call_module(owner_path, (node.args[0],))
            qnode.meta.update({k: v for k, v in node.meta.items() if k != meta.QUANTIZER})
            param_fqn = getattr(q, "param_fqn", None) if q.kind == "weight" else None
            qnode.meta[meta.QUANTIZER] = meta.QuantizerInfo(
                qid=owner_path.removeprefix("geta_quant."), target=q.kind, param_fqn=param_fqn)
            nodes[(owner_path, node.args[0])] = qnode
        node.replace_all_uses_with(qnode)
        gm.graph.erase_node(node)
        for attr, ops in chains:
            for n in [*ops[::-1], attr]:  # the operand chains, now unused
                if not n.users:
                    gm.graph.erase_node(n)
        folded.append(owner_path)
    if folded:
        logger.info("normalize: re-folded %d traced geta quantizer(s) into quantizer modules "
                    "(bit widths kept): %s", len(folded), ", ".join(folded))
    return bool(folded)
