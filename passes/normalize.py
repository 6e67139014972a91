"""normalize: canonicalise the captured graph before analysis.

* drops runtime assertion nodes torch.export leaves behind
  (``_assert_tensor_metadata``, ``_assert_scalar``, ``sym_constrain_range*``);
* re-folds geta quantizers: re-exporting a quantized model (a second ``transform`` of a
  ``compress()``-ed GetaModule) traces each :class:`~geta_fx.quantizer.Quantizer` into
  ``geta::quantize(x, exp(P.log_d), clamp_min(abs(P.q_m), Q_M_MIN), P.t, signed)`` over a
  plain module ``P`` holding the three parameters.  That pattern becomes a
  ``call_module`` quantizer node again (``P`` a Quantizer owning the *same* parameters,
  so the learned bit width is kept and the numerics are unchanged), with
  ``geta.quantizer`` metadata, so later passes see the quantizers as if inserted here;
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

from geta_fx.ir import meta
from geta_fx.ir.ops_table import is_geta_op
from geta_fx.ir.query import get_attr_tensor
from geta_fx.pipeline import PassResult

logger = logging.getLogger(__name__)
aten = torch.ops.aten

#: The three learnable tensors of a traced Quantizer, and how each reaches geta::quantize.
_QUANT_OPERANDS = {1: ("log_d", aten.exp.default), 2: ("q_m", aten.clamp_min.default),
                   3: ("t", None)}


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
        modified = _refold_quantizers(gm)
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


# ------------------------------------------------------------------ quantizer re-folding
def _operand_attr(arg: Any, leaf: str, via: Any) -> torch.fx.Node | None:
    """The ``get_attr`` of ``<owner>.<leaf>`` that ``arg`` computes from, or None."""
    if via is aten.exp.default:  # d = exp(log_d)
        if not (isinstance(arg, torch.fx.Node) and arg.target is via):
            return None
        arg = arg.args[0]
    elif via is aten.clamp_min.default:  # max(|q_m|, Q_M_MIN)
        if not (isinstance(arg, torch.fx.Node) and arg.target is via
                and isinstance(arg.args[0], torch.fx.Node)
                and arg.args[0].target is aten.abs.default):
            return None
        from geta_fx.quantizer import Q_M_MIN

        if float(arg.args[1]) != Q_M_MIN:
            return None
        arg = arg.args[0].args[0]
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and \
            str(arg.target).rsplit(".", 1)[-1] == leaf:
        return arg
    return None


def _traced_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node
                      ) -> tuple[str, list[torch.fx.Node]] | None:
    """(owner path, its three get_attrs) if ``node`` is a traced Quantizer's quantize call."""
    if node.op != "call_function" or not is_geta_op(node.target, "quantize") or \
            len(node.args) != 5 or node.kwargs:
        return None
    attrs = [_operand_attr(node.args[i], leaf, via) for i, (leaf, via) in
             _QUANT_OPERANDS.items()]
    if any(a is None for a in attrs):
        return None
    owners = {str(a.target).rsplit(".", 1)[0] for a in attrs if a is not None}
    if len(owners) != 1 or "." not in str(attrs[0].target):  # type: ignore[union-attr]
        return None
    owner_path = owners.pop()
    owner = gm.get_submodule(owner_path)
    if getattr(owner, "is_geta_quantizer", False):
        return owner_path, attrs  # type: ignore[return-value]
    names = {n for n, _ in owner.named_parameters(recurse=False)}
    if names != {"log_d", "q_m", "t"} or any(True for _ in owner.children()):
        return None
    return owner_path, attrs  # type: ignore[return-value]


def _is_param_attr(gm: torch.fx.GraphModule, x: Any) -> bool:
    return isinstance(x, torch.fx.Node) and x.op == "get_attr" and \
        isinstance(get_attr_tensor(gm, str(x.target)), nn.Parameter)


def _rebuild(gm: torch.fx.GraphModule, owner_path: str, node: torch.fx.Node) -> nn.Module:
    """A Quantizer at ``owner_path`` owning the traced module's own parameters."""
    from geta_fx.quantizer import Quantizer

    owner = gm.get_submodule(owner_path)
    if getattr(owner, "is_geta_quantizer", False):
        return owner
    x, signed = node.args[0], bool(node.args[4])
    weight = _is_param_attr(gm, x)
    qid = owner_path.removeprefix("geta_quant.")
    q = Quantizer("weight" if weight else "act", signed=signed,
                  name=str(x.target) if weight else qid)  # type: ignore[union-attr]
    for leaf in ("log_d", "q_m", "t"):  # the same Parameter objects: values, grads, identity
        q.register_parameter(leaf, getattr(owner, leaf))
    if weight:
        q.param_fqn = str(x.target)  # type: ignore[attr-defined,union-attr]
    q.refolded = True  # type: ignore[attr-defined]  # learned, not fresh: see keep_refolded
    gm.set_submodule(owner_path, q)
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
    for node in list(gm.graph.nodes):
        found = _traced_quantizer(gm, node)
        if found is None:
            continue
        owner_path, attrs = found
        q = _rebuild(gm, owner_path, node)
        with gm.graph.inserting_before(node):
            qnode = gm.graph.call_module(owner_path, (node.args[0],))
        qnode.meta.update({k: v for k, v in node.meta.items() if k != meta.QUANTIZER})
        param_fqn = getattr(q, "param_fqn", None) if q.kind == "weight" else None
        qnode.meta[meta.QUANTIZER] = meta.QuantizerInfo(
            qid=owner_path.removeprefix("geta_quant."), target=q.kind, param_fqn=param_fqn)
        node.replace_all_uses_with(qnode)
        gm.graph.erase_node(node)
        for a in attrs:
            _erase_dead_chain(gm, a)
        folded.append(owner_path)
    if folded:
        logger.info("normalize: re-folded %d traced geta quantizer(s) into quantizer modules "
                    "(bit widths kept): %s", len(folded), ", ".join(folded))
    return bool(folded)


def _erase_dead_chain(gm: torch.fx.GraphModule, attr: torch.fx.Node) -> None:
    """Erase the now-unused exp/abs/clamp_min nodes above ``attr``'s users, then ``attr``."""
    changed = True
    while changed:
        changed = False
        for user in list(attr.users):
            chain = [user]
            while chain[-1].users and len(chain[-1].users) == 1:
                chain.append(next(iter(chain[-1].users)))
            if not chain[-1].users and all(n.op == "call_function" for n in chain):
                for n in reversed(chain):
                    gm.graph.erase_node(n)
                changed = True
    if not attr.users:
        gm.graph.erase_node(attr)
