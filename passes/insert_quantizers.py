"""insert_quantizers: weight (and activation) quantizers as ``call_module`` nodes.

Why: GETA learns a bit width per layer (GETA_SPEC §A).  Each quantized layer's
weight gets a per-tensor :class:`~geta_fx.quantizer.Quantizer` (initialised at
``policy.bits`` from the weight's max, §A.5); with ``mode="weight_act"`` its
data input gets one too (unsigned where the producer is provably non-negative,
§G.2 #3).  Quantizers live on the GraphModule under ``geta_quant.*``; a
quantizer node is a leaf ``call_module`` that re-exports as ``geta::quantize``.

Invariants: a weight parameter has one quantizer even when shared by several
layers, and across rounds: a weight already read through a quantizer (one a second
round's ``normalize`` re-folded) keeps it, and only a missing act quantizer is added;
new nodes carry ``val`` (same as their input), ``nn_module_stack`` of the layer and
``geta.quantizer``; dependency grouping is unchanged (quantizers are transparent,
Q(0) = 0).  ``gm.meta["geta.unquantized"]`` gives a reason per weight left float
(policy, or inside a higher-order-op branch: logged as a warning).  ``modified`` is
True iff a quantizer was inserted.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.fx
from torch import nn

from geta_fx.errors import InputError
from geta_fx.ir import meta, op_sets
from geta_fx.ir.args import arg
from geta_fx.ir.branches import branch_uses
from geta_fx.ir.ops_table import quantizer_module
from geta_fx.ir.query import create_node_with_meta, get_attr_tensor, tensor_val
from geta_fx.pipeline import PassResult

logger = logging.getLogger(__name__)
aten = torch.ops.aten

@dataclass(frozen=True)
class QuantPolicy:
    """Which layers get quantizers.

    Args:
        bits: initial bit width of every quantizer (GETA starts at 16, §A.5).
        skip: fnmatch patterns on weight names (``"fc.*"``, ``"*lm_head*"``) to leave float.
        skip_ops: ATen op names to leave float (``"conv2d"``, ``"linear"``, ``"embedding"``).
        quantize_first / quantize_last: quantize the first / last quantizable layer.
        embedding: also quantize embedding tables (weights only).
    """

    bits: float = 16.0
    skip: tuple[str, ...] = ()
    skip_ops: tuple[str, ...] = ()
    quantize_first: bool = True
    quantize_last: bool = True
    embedding: bool = False

    def __post_init__(self) -> None:
        if not 2 <= float(self.bits) <= 32:
            raise InputError(f"QuantPolicy.bits must lie in [2, 32], got {self.bits}")

    def wants(self, op_name: str, fqn: str) -> bool:
        if op_name in self.skip_ops or op_name.split(".")[0] in self.skip_ops:
            return False
        if op_name.startswith("embedding") and not self.embedding:
            return False
        return not any(fnmatch.fnmatchcase(fqn, pat) for pat in self.skip)


def _op_name(target: Any) -> str:
    return str(getattr(target, "__name__", target))


def _weight_attr(gm: torch.fx.GraphModule, node: Any) -> torch.fx.Node | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        t = get_attr_tensor(gm, str(node.target))
        if isinstance(t, nn.Parameter) and t.is_floating_point():
            return node
    return None


def non_negative(node: Any, depth: int = 0) -> bool:
    """Whether ``node``'s value is provably >= 0 (walks through sign-keeping ops)."""
    if not isinstance(node, torch.fx.Node) or depth > 8 or node.op != "call_function":
        return False
    if node.target in op_sets.NON_NEGATIVE:
        return True
    if node.target is aten.hardtanh.default:
        return arg(node, "min_val", -1.0) >= 0
    if node.target in op_sets.KEEPS_SIGN:
        return non_negative(node.args[0], depth + 1)
    if node.target is aten.cat.default:
        return all(non_negative(a, depth + 1) for a in node.args[0])
    return False


def _safe(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def new_quant_node(gm: torch.fx.GraphModule, anchor: torch.fx.Node, source: torch.fx.Node,
                   q: nn.Module, qid: str, target: Literal["weight", "act"],
                   param_fqn: str | None) -> torch.fx.Node:
    """Register ``q`` as ``geta_quant.<qid>`` and create its node right after ``source``."""
    base, k = qid, 1
    while hasattr(gm, "geta_quant") and hasattr(gm.geta_quant, qid):
        k += 1
        qid = f"{base}_{k}"
    path = f"geta_quant.{qid}"
    gm.add_submodule(path, q)
    with gm.graph.inserting_after(source):
        node = create_node_with_meta(gm.graph, "call_module", path, (source,), anchor=anchor,
                                     val=source.meta.get("val"))
    node.meta[meta.QUANTIZER] = meta.QuantizerInfo(qid=qid, target=target, param_fqn=param_fqn)
    return node


@dataclass(frozen=True)
class InsertQuantizers:
    name: ClassVar[str] = "insert_quantizers"
    requires: ClassVar[frozenset[str]] = frozenset({"val"})
    provides: ClassVar[frozenset[str]] = frozenset({"geta.quantizer"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"geta.group"})
    mode: Literal["weight", "weight_act"] = "weight"
    policy: QuantPolicy = field(default_factory=QuantPolicy)

    def __post_init__(self) -> None:
        if self.mode not in ("weight", "weight_act"):
            raise InputError(f"InsertQuantizers.mode must be 'weight' or 'weight_act', "
                             f"got {self.mode!r}")

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        from geta_fx.quantizer import Quantizer  # NOTE: lazy; it loads the op kernels

        layers, kept, notes = self._select(gm)
        weight_q: dict[str, torch.fx.Node] = {}
        inserted = False
        for node, attr in layers:
            fqn = str(attr.target)
            qnode = weight_q.get(fqn) or kept.get(fqn)
            if qnode is None:
                w = get_attr_tensor(gm, fqn)
                qid = _safe(fqn)
                q = Quantizer("weight", bits=self.policy.bits, name=fqn).init_from_tensor(
                    w.detach(), self.policy.bits)
                q.to(w.device)
                q.param_fqn = fqn  # type: ignore[attr-defined]
                qnode = new_quant_node(gm, node, attr, q, qid, "weight", fqn)
                weight_q[fqn] = qnode
                inserted = True
            if qnode is not _weight_arg(node):
                node.replace_input_with(attr, qnode)
            if self.mode == "weight_act" and not node.target is aten.embedding.default:
                inserted |= self._quantize_input(gm, node, fqn)
        if kept:
            logger.info("insert_quantizers: kept %d quantizer(s) the model already has (no "
                        "second quantizer on the same weight): %s", len(kept),
                        ", ".join(sorted(kept)))
        _record_unquantized(gm, notes)
        return PassResult(gm, inserted)

    def _select(self, gm: torch.fx.GraphModule) -> tuple[
            list[tuple[torch.fx.Node, torch.fx.Node]], dict[str, torch.fx.Node],
            list[meta.ParamNote]]:
        """(layer, weight get_attr) pairs to quantize, the weights' existing quantizer
        nodes, and a note per weight the policy leaves float."""
        layers: list[tuple[torch.fx.Node, torch.fx.Node]] = []
        kept: dict[str, torch.fx.Node] = {}
        notes: list[meta.ParamNote] = []
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in op_sets.STEMS:
                continue
            w = _weight_arg(node)
            attr = _weight_attr(gm, w)
            existing = None
            if attr is None and quantizer_module(gm, w) is not None:
                existing, attr = w, _weight_attr(gm, w.args[0])  # type: ignore[union-attr]
            if attr is None:
                continue
            fqn = str(attr.target)
            if existing is not None:
                kept.setdefault(fqn, existing)
                layers.append((node, attr))
            elif self.policy.wants(_op_name(node.target), fqn):
                layers.append((node, attr))
            else:
                notes.append(meta.ParamNote(fqn, f"left float by the policy ("
                                                 f"{_op_name(node.target)} at {node.name})"))
        for pos, keep in ((0, self.policy.quantize_first), (-1, self.policy.quantize_last)):
            if not keep and layers and str(layers[pos][1].target) not in kept:
                node, attr = layers.pop(pos)
                which = "first" if pos == 0 else "last"
                notes.append(meta.ParamNote(str(attr.target), f"left float by the policy "
                                            f"(quantize_{which}=False: {node.name})"))
        notes += _branch_notes(gm)
        return layers, kept, notes

    def _quantize_input(self, gm: torch.fx.GraphModule, node: torch.fx.Node, fqn: str) -> bool:
        x = arg(node, op_sets.STEMS[node.target].data)
        val = tensor_val(x)
        if not isinstance(x, torch.fx.Node) or val is None or not val.is_floating_point():
            return False
        if quantizer_module(gm, x) is not None:  # already quantized (a second round)
            return False
        qid = _safe(fqn.rsplit(".", 1)[0] or fqn) + "_input"
        from geta_fx.quantizer import Quantizer

        q = Quantizer("act", signed=not non_negative(x), bits=self.policy.bits,
                      name=f"input of {fqn.rsplit('.', 1)[0]}")
        if val.device.type != "meta":
            q.to(val.device)
        qnode = new_quant_node(gm, node, x, q, qid, "act", None)
        node.replace_input_with(x, qnode)
        return True


def _weight_arg(node: torch.fx.Node) -> Any:
    return arg(node, op_sets.STEMS[node.target].weight)


def _branch_notes(gm: torch.fx.GraphModule) -> list[meta.ParamNote]:
    """Layer weights inside higher-order-op branches: left float, each with the reason."""
    notes = []
    for use in branch_uses(gm):
        as_weight = any(ph is None or any(u.op == "call_function" and u.target in op_sets.STEMS
                                          and _weight_arg(u) is ph for u in ph.users)
                        for ph in use.inputs)
        if as_weight:  # a layer's weight there (or the branch mapping is unknown)
            notes.append(meta.ParamNote(use.fqn, f"{use.describe()}; quantizers are not "
                                                 "inserted inside higher-order-op branches"))
    return notes


def _record_unquantized(gm: torch.fx.GraphModule, notes: list[meta.ParamNote]) -> None:
    notes = list({n.fqn: n for n in notes}.values())
    gm.meta[meta.UNQUANTIZED] = tuple(notes)
    branch = [n for n in notes if "higher-order" in n.reason]
    if branch:
        logger.warning("insert_quantizers: %d weight(s) left unquantized: %s", len(branch),
                       "; ".join(f"{n.fqn} ({n.reason})" for n in branch))
    if len(notes) > len(branch):
        logger.info("insert_quantizers: weights left float: %s",
                    "; ".join(f"{n.fqn} ({n.reason})" for n in notes if n not in branch))
