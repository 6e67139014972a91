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

* Then (``fuse_affine``) an eval ``batch_norm`` read only by a table quantizer, possibly through
  a residual ``add`` (of a second such ``batch_norm`` or of any tensor of the same shape), a
  ``max_pool2d`` (no padding, dilation 1) and reshapes, is folded into it::

      conv -> batch_norm [-> add(., bn2(conv') | h)] [-> max_pool2d] [-> flatten] -> Q.table
        ==>  conv -> geta::quantize.affine_table(conv, ..., alpha, beta, [conv' or h, alpha2,
             beta2], pool) [-> flatten]

  one pass instead of three or four (a slim ResNet-8's batch norms and adds cost as much as
  its quantizers; ATen's NCHW max_pool2d more than the table).  ``alpha``/``beta``
  (:func:`~geta_fx.ops.quantize_table.batch_norm_affine`: read back from ``batch_norm`` and
  checked to give its results bit for bit as an fma on this CPU) go into the quantizer's
  holder; a batch_norm that is not an fma here stays, as do all where no compiled kernel of
  the op serves the device (its reference is exact but slow), and
  ``meta["geta.act_table"]["affine"]`` says why.  The batch_norm's tensors stay in the module,
  unread (they are still the model's parameters for :func:`geta_fx.report`).

Invariants: every ``geta::quantize`` node on ``get_attr`` constants is rewritten or listed as kept;
a second run finds none (idempotent); new ``get_attr`` nodes carry ``val`` and the layer's
metadata.  :func:`geta_fx.ops.quantize_table.as_quantize` turns a table node back into the
``geta::quantize`` it stands for (``geta_fx.save`` does for ONNX).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from geta_fx.errors import NodeError
from geta_fx.ir.query import create_node_with_meta, get_attr_tensor
from geta_fx.passes.lower_quant import _fake_mode, _get_attr
from geta_fx.pipeline import PassResult

__all__ = ["ACT_TABLE", "LowerActTable"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

#: gm.meta key: {"tables": [{qid, max_level, cells, relu_fused}], "kept": [{qid, reason}],
#: "affine": [{qid, fused, batch_norms, add, pool} or {qid, fused: False, reason}]}.
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
        fuse_affine: fold an eval ``batch_norm`` (+ residual ``add``) (+ ``max_pool2d``) read
            only by a table quantizer into it (``geta::quantize.affine_table``).
        verify: ``"window"`` (the default; checks every float32 near each threshold) or
            ``"all"`` (every float32 in ``(0, q_m]``; seconds per quantizer).
    """

    name: ClassVar[str] = "lower_act_table"
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    fuse_relu: bool = True
    verify: str = "window"
    fuse_affine: bool = True

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
        if self.fuse_affine and record["tables"]:
            record["affine"] = fuse_affine(gm, mode)
        modified = bool(record["tables"])
        if modified or record["kept"]:
            gm.meta[ACT_TABLE] = record
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


# ------------------------------------------------------------------- batch_norm (+add) fusion
_VIEWS = frozenset({aten.flatten.using_ints, aten.view.default, aten.reshape.default})


def _single_user(n: Any, target: Any) -> bool:
    return (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is target
            and len(n.users) == 1)


def _eval_bn(n: Any) -> bool:
    """An eval ``aten.batch_norm`` on get_attr constants, read by one node."""
    if not (_single_user(n, aten.batch_norm.default) and len(n.args) >= 8 and not n.kwargs):
        return False
    x, w, b, mean, var, training = n.args[:6]
    return (training is False and isinstance(x, torch.fx.Node)
            and all(a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr")
                    for a in (w, b)) and all(isinstance(a, torch.fx.Node) and a.op == "get_attr"
                                             for a in (mean, var)))


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _pool_of(n: torch.fx.Node) -> list[int] | None:
    """[kh, kw, sh, sw] of a fusable ``max_pool2d`` (no padding/dilation/ceil), else None."""
    args = list(n.args[1:]) + [None] * (5 - len(n.args[1:]))
    kernel, stride, padding, dilation, ceil = args[:5]
    kw = dict(n.kwargs)
    stride, padding = kw.pop("stride", stride), kw.pop("padding", padding)
    dilation, ceil = kw.pop("dilation", dilation), kw.pop("ceil_mode", ceil)
    if kw:
        return None

    def pair(v: Any, default: int) -> list[int] | None:
        if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
            return [default, default] if default else None
        v = [v] if isinstance(v, int) else list(v)
        return [int(v[0]), int(v[-1])] if len(v) in (1, 2) and all(
            isinstance(e, int) for e in v) else None

    k = pair(kernel, 0)
    s = pair(stride, 0) or k
    if k is None or s is None or pair(padding, 0) not in (None, [0, 0]) \
            or pair(dilation, 1) != [1, 1] or ceil not in (None, False):
        return None
    return k + s


@dataclass
class _Match:
    table: torch.fx.Node
    views: list[torch.fx.Node]            # between the table and the pool/add/bn, outermost first
    pool: torch.fx.Node | None
    add: torch.fx.Node | None
    bn: torch.fx.Node
    other: Any = None                     # the add's other operand (raw or its batch_norm)
    bn2: torch.fx.Node | None = None


def _match(table: torch.fx.Node) -> _Match | None:
    """bn [+ (bn2 | other)] [-> max_pool2d] [-> views] -> quantize.table, single users."""
    n: Any = table.args[0]
    views: list[torch.fx.Node] = []
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in _VIEWS \
            and len(n.users) == 1:
        views.append(n)
        n = n.args[0]
    pool = None
    if _single_user(n, aten.max_pool2d.default) and _pool_of(n) is not None:
        val = _val(n.args[0])  # a 3-D input is an unbatched (C, H, W): it pools channels
        if not (isinstance(val, torch.Tensor) and val.dim() == 4):
            return None
        pool, n = n, n.args[0]
    add = None
    if _single_user(n, aten.add.Tensor) and not n.kwargs and len(n.args) == 2:
        add = n
        a, b = n.args
        va, vb = _val(a), _val(b)
        if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
                and va.shape == vb.shape and va.dtype == vb.dtype):
            return None
        if not _eval_bn(a):
            a, b = b, a
        if not _eval_bn(a):
            return None
        return _Match(table, views, pool, add, a, b, b if _eval_bn(b) else None)
    if not _eval_bn(n):
        return None
    return _Match(table, views, pool, None, n)


def _affine_of(gm: torch.fx.GraphModule, bn: torch.fx.Node) -> tuple[torch.Tensor,
                                                                     torch.Tensor] | str:
    from geta_fx.ops.quantize_table import batch_norm_affine

    x, w, b, mean, var, _tr, _mom, eps = bn.args[:8]
    val = _val(x)
    if not (isinstance(val, torch.Tensor) and val.dtype == torch.float32 and val.dim() >= 2):
        return "batch_norm input is not a float32 (N, C, ...) tensor"
    # ATen's eval batch_norm is an fma on contiguous and channels-last inputs (checked below);
    # on other layouts (a transposed (N, C, L) input) it rounds twice
    four = val.dim() == 4
    if not (val.is_contiguous()
            or (four and val.is_contiguous(memory_format=torch.channels_last))):
        return ("batch_norm input is neither contiguous nor channels-last (strides "
                f"{tuple(val.stride())}): aten.batch_norm on it is not an fma")
    get = [None if a is None else get_attr_tensor(gm, str(a.target))  # type: ignore[union-attr]
           for a in (w, b, mean, var)]
    # ATen's eval batch_norm has one CPU path for 1-element planes and one for the rest
    spatial = list(val.shape[2:])
    plane = math.prod(int(s) for s in spatial) if all(isinstance(s, int) for s in spatial) \
        else None
    planes = (37, 1) if plane is None else (max(1, min(plane, 37)),)
    return batch_norm_affine(*get, float(eps), planes,  # type: ignore[arg-type]
                             channels_last=four)


def fuse_affine(gm: torch.fx.GraphModule, mode: Any) -> list[dict[str, Any]]:
    """Fold each eval batch_norm (+ residual add) (+ max pool) read only by a table quantizer
    into it (``geta::quantize.affine_table``); returns one record per quantizer looked at."""
    from geta_fx.ops.quantize_table import status

    records: list[dict[str, Any]] = []
    for table in [n for n in gm.graph.nodes if n.target is torch.ops.geta.quantize.table]:
        m = _match(table)
        if m is None:
            continue
        _x, d_n, q_n, t_n, signed, *tab = table.args
        path = str(d_n.target).rpartition(".")[0]  # type: ignore[union-attr]
        qid = path.rpartition(".")[2]
        dev = get_attr_tensor(gm, str(d_n.target)).device.type  # type: ignore[union-attr]
        served = status("affine_table").get(dev, {})
        if served.get("impl") != "fused":  # the reference is exact but slow: keep the aten ops
            records.append({"qid": qid, "fused": False, "reason": "no compiled "
                            f"geta::quantize.affine_table kernel on {dev}: {served.get('reason')}"})
            continue
        affines = [_affine_of(gm, bn) for bn in (m.bn, m.bn2) if bn is not None]
        why = next((a for a in affines if isinstance(a, str)), None)
        if why is not None:
            records.append({"qid": qid, "fused": False, "reason": why})
            continue
        holder = gm.get_submodule(path)
        names = ["alpha", "beta", "alpha2", "beta2"][:2 * len(affines)]
        for name, v in zip(names, [v for ab in affines for v in ab]):  # type: ignore[union-attr]
            holder.register_buffer(name, v)
        pool = _pool_of(m.pool) if m.pool is not None else []
        anchor = m.views[-1] if m.views else table
        with gm.graph.inserting_before(anchor):
            consts = [_get_attr(gm, table, str(a.target), mode)  # type: ignore[union-attr]
                      for a in (d_n, q_n, t_n, *tab)]
            ab = [_get_attr(gm, table, f"{path}.{k}", mode) for k in names]
            other = m.other if m.bn2 is None else m.bn2.args[0]
            args = (m.bn.args[0], *consts[:3], signed, *consts[3:], ab[0], ab[1],
                    other, *(ab[2:] or [None, None]), pool)
            src = m.pool or m.add or m.bn
            fused = create_node_with_meta(gm.graph, "call_function",
                                          torch.ops.geta.quantize.affine_table, args,
                                          anchor=table, val=_val(src))
        if m.views:
            m.views[-1].replace_input_with(src, fused)
            table.replace_all_uses_with(m.views[0])
        else:
            table.replace_all_uses_with(fused)
        # dict.fromkeys: ``h + h`` has m.bn2 is m.bn (one node, erased once)
        dead = list(dict.fromkeys([table, *(n for n in (m.pool, m.add, m.bn2, m.bn)
                                            if n is not None)]))
        attrs = [a for n in dead for a in n.args[1:] if isinstance(a, torch.fx.Node)
                 and a.op == "get_attr"]
        for n in dead:
            gm.graph.erase_node(n)
        for a in dict.fromkeys(attrs):  # the tensors stay: the batch_norm's are still the
            if not a.users:             # model's parameters (geta_fx.report counts them)
                gm.graph.erase_node(a)
        records.append({"qid": qid, "fused": True,
                        "batch_norms": 1 + (m.bn2 is not None and m.bn2 is not m.bn),
                        "add": m.add is not None,
                        "pool": pool})
    return records
