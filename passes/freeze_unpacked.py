"""freeze_unpacked: weights read through ``geta::unpack_weight`` become frozen float buffers.

Why: a lowered conv (or unfused linear) unpacks its packed levels on every call::

    packed, scale -> geta::unpack_weight -> type_as(., dtype_like) -> conv2d
        ==>  geta_lowbit.<qid>.weight -> conv2d

That costs a kernel call and a fresh weight tensor per layer per call: measured on the slim
ResNet-8 of ``benchmarks/bench_pretrained.py`` (10 convs, batch 64, 1 thread) 3-5% of the
lowered model's time, 3-6% on the digits CNN.  The frozen value is the unpacked weight itself
(``geta::unpack_weight`` evaluated once here, cast like the graph casts it), so the model
computes exactly what it did; it stores ``32 / bits`` times the packed bytes of those weights.
``geta::lowbit_linear`` weights (memory-bound GEMV/GEMM that reads the packed levels directly)
stay packed.

* The holder keeps the quantizer's record: ``gm.meta["geta.lowbit"]`` entries of frozen weights
  become ``mode="float"`` (``stored_bytes`` = the float bytes), as for a weight wider than
  ``max_bits``, so :func:`geta_fx.report` still costs them at their learned bits.
* A packed buffer also read by another op (a ``lowbit_linear`` sharing it) stays packed.

Invariants: no ``geta::unpack_weight`` node left whose packed buffer only unpack nodes read; a
second run finds none (idempotent); new ``get_attr`` nodes carry ``val``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from geta_fx.ir.query import get_attr_tensor
from geta_fx.passes.lower_quant import LOWBIT, _drop_param, _fake_mode, _get_attr
from geta_fx.pipeline import PassResult

__all__ = ["FreezeUnpacked"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class FreezeUnpacked:
    """Replace ``type_as(geta::unpack_weight(packed, ...), dtype_like)`` by a frozen buffer."""

    name: ClassVar[str] = "freeze_unpacked"
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        mode = _fake_mode(gm)
        unpack = torch.ops.geta.unpack_weight.default
        readers: dict[str, list[torch.fx.Node]] = {}
        for n in gm.graph.nodes:
            for a in n.args:
                if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                    readers.setdefault(str(a.target), []).append(n)
        frozen: dict[str, int] = {}  # holder name (the qid) -> float bits
        for node in [n for n in gm.graph.nodes if n.target is unpack]:
            packed_n = node.args[0]
            target = str(packed_n.target)  # type: ignore[union-attr]
            if not all(r.target is unpack for r in readers.get(target, ())):
                continue
            path = target.rpartition(".")[0]
            holder = gm.get_submodule(path)
            args = [get_attr_tensor(gm, str(a.target)) if isinstance(a, torch.fx.Node) else a
                    for a in node.args]
            w = unpack(*args)
            users = list(node.users)
            casts = [u for u in users if u.target is aten.type_as.default and u.args[0] is node]
            like = (get_attr_tensor(gm, str(casts[0].args[1].target))  # type: ignore[union-attr]
                    if casts else None)
            if like is not None:
                w = w.type_as(like)
            holder.register_buffer("weight", w.detach().clone())
            attrs = [a for a in (*node.args, *(c.args[1] for c in casts))
                     if isinstance(a, torch.fx.Node)]
            with gm.graph.inserting_before(node):
                new = _get_attr(gm, node, f"{path}.weight", mode)
            for u in casts:
                u.replace_all_uses_with(new)
                gm.graph.erase_node(u)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            for a in dict.fromkeys(attrs):
                _drop_param(gm, a)
            frozen[path.rpartition(".")[2]] = w.element_size() * 8
        if not frozen:
            return PassResult(gm, False)
        gm.meta[LOWBIT] = tuple(
            dataclasses.replace(r, mode="float", bits=frozen[r.qid], stored_bytes=r.float_bytes)
            if r.qid in frozen and r.mode == "packed" else r
            for r in gm.meta.get(LOWBIT, ()))
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)
