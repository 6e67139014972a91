"""lower_act: frozen activation quantizers read their levels from a table (quantize.table).

Why: a lowered ``quantize="weight_act"`` graph keeps every activation quantizer as
``geta::quantize(x, d, q_m, t, signed)`` on frozen buffers (``lower_quant``), and with a learned
``t != 1`` that is an ``exp`` and a ``log`` per activation element: on CPU it cost more than
pruning saved (a 30%-pruned ResNet-8 ran 0.7x the dense model).  Runs after ``lower_quant``::

    x -> geta::quantize(x, d, q_m, t, s)          ==>  x -> geta::quantize.table(x, d, q_m, t, s,
                                                                scale, bounds, base)
    y -> relu -> geta::quantize(., ..., False)    ==>  y -> geta::quantize.table(y, ..., False, ...)
    y -> relu -> max_pool2d -> flatten -> Q(False) ==>  y -> max_pool2d -> flatten -> Q.table(...)

* The table (``scale``, ``bounds``, ``base``: :func:`geta_fx.ops.quantize_table.build_table`) is
  built by evaluating the ``geta::quantize`` the graph runs on the quantizer's device and
  checked against it near every level threshold, so the lowered op computes the same values bit
  for bit (contract and the exactness argument: :mod:`geta_fx.ops.quantize_table`).  It is
  stored next to ``d``/``q_m``/``t`` in the quantizer's ``geta_lowbit.<qid>`` holder (``scale``
  float32, kept float32 under ``.half()``; ``bounds``/``base`` int32).
* An unsigned quantizer maps every ``x <= 0`` to 0 and propagates NaN, as ``relu`` followed by
  it does, so a ``relu`` read only by such a quantizer is dropped (exact), also through
  single-user max pooling and reshapes in between (they commute with ``relu`` exactly).
* A quantizer whose table cannot be built (its level is not monotone near a threshold, or it
  would need more than ``MAX_CELLS`` cells) stays ``geta::quantize`` and is listed, with the
  reason, in ``gm.meta["geta.act_table"]["kept"]``; non-finite or non-positive ``d``/``q_m`` are a
  :class:`~geta_fx.errors.NodeError` naming the quantizer (a diverged model).

Invariants: every ``geta::quantize`` node on ``get_attr`` constants is rewritten or listed as kept;
a second run finds none (idempotent); new ``get_attr`` nodes carry ``val`` and the layer's
metadata.  :func:`geta_fx.ops.quantize_table.as_quantize` turns a table node back into the
``geta::quantize`` it stands for (``geta_fx.save`` does for ONNX).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from geta_fx.errors import NodeError
from geta_fx.ir.query import get_attr_tensor
from geta_fx.passes.lower_quant import _fake_mode, _get_attr
from geta_fx.pipeline import PassResult

__all__ = ["ACT_TABLE", "LowerActTable"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

#: gm.meta key: {"tables": [{qid, max_level, cells, relu_fused}], "kept": [{qid, reason}]}.
ACT_TABLE = "geta.act_table"
_TABLE_BUFFERS = ("scale", "bounds", "base")


def _frozen_quantize(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.ops.geta.quantize.default
            and len(node.args) == 5 and not node.kwargs
            and all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in node.args[1:4]))


#: Ops between a relu and an unsigned quantizer that commute with relu exactly (max and
#: reshaping: ``maxpool(relu(x)) == relu(maxpool(x))``, NaN included), so the relu can go.
_RELU_COMMUTES = frozenset({aten.max_pool2d.default, aten.max_pool1d.default,
                            aten.flatten.using_ints, aten.view.default, aten.reshape.default})


def _relu_before(x: Any) -> torch.fx.Node | None:
    """The ``relu`` feeding ``x`` through single-user ops that commute with it, or None."""
    for _ in range(8):
        if not (isinstance(x, torch.fx.Node) and x.op == "call_function" and len(x.users) == 1
                and x.args and isinstance(x.args[0], torch.fx.Node)):
            return None
        if x.target is aten.relu.default:
            return x
        if x.target not in _RELU_COMMUTES:
            return None
        x = x.args[0]
    return None


@dataclass(frozen=True)
class LowerActTable:
    """Rewrite frozen ``geta::quantize`` nodes to ``geta::quantize.table``.

    Args:
        fuse_relu: drop a ``relu`` read only by an unsigned quantizer.
        verify: ``"window"`` (the default; checks every float32 near each threshold) or
            ``"all"`` (every float32 in ``(0, q_m]``; seconds per quantizer).
    """

    name: ClassVar[str] = "lower_act_table"
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    fuse_relu: bool = True
    verify: str = "window"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        from geta_fx.ops.quantize_table import build_table

        mode = _fake_mode(gm)
        record: dict[str, list[dict[str, Any]]] = {"tables": [], "kept": []}
        for node in [n for n in gm.graph.nodes if _frozen_quantize(n)]:
            x, d_n, q_n, t_n, signed = node.args
            path = str(d_n.target).rpartition(".")[0]  # type: ignore[union-attr]
            qid = path.rpartition(".")[2]
            d, q_m, t = (get_attr_tensor(gm, str(a.target))  # type: ignore[union-attr]
                         for a in (d_n, q_n, t_n))
            try:
                tab = build_table(d, q_m, t, verify=self.verify)
            except ValueError as e:
                if "needs finite" in str(e):
                    raise NodeError(node, f"lower_act_table: activation quantizer {qid!r}: "
                                    f"{e} (a diverged model?)") from None
                logger.warning("lower_act_table: %s keeps geta::quantize: %s", qid, e)
                record["kept"].append({"qid": qid, "reason": str(e)})
                continue
            holder = gm.get_submodule(path)
            for name in _TABLE_BUFFERS:
                holder.register_buffer(name, getattr(tab, name))
            with gm.graph.inserting_before(node):
                consts = [_get_attr(gm, node, f"{path}.{k}", mode) for k in _TABLE_BUFFERS]
            node.target = torch.ops.geta.quantize.table
            node.args = (x, d_n, q_n, t_n, signed, *consts)
            relu = _relu_before(x) if self.fuse_relu and not signed else None
            if relu is not None:
                relu.replace_all_uses_with(relu.args[0])  # type: ignore[arg-type]
                gm.graph.erase_node(relu)
            fused = relu is not None
            record["tables"].append({"qid": qid, "max_level": tab.max_level,
                                     "cells": int(tab.bounds.numel()), "relu_fused": fused})
        modified = bool(record["tables"])
        if modified or record["kept"]:
            gm.meta[ACT_TABLE] = record
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
