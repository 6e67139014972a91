"""lower_quant: replace fake-quant weights by integer levels packed at their learned bit width.

Why: after QASSO a weight quantizer still stores a float32 weight and re-quantizes it on every
forward.  A deployed model stores each quantized weight as ``bits``-bit integer levels plus the
quantizer's step ``d`` (``geta_fx.ops.lowbit`` defines the packed format), and computes with the
``geta`` low-bit ops::

    W -> Q_w (geta_quant.*) -> linear(x, ., b)   ==>  packed, scale -> lowbit_linear(x, ., ., b)
    W -> Q_w -> conv2d(x, ., ...)                ==>  packed, scale -> unpack_weight -> conv2d
    x -> Q_a (geta_quant.*_input) -> ...         ==>  x -> geta::quantize(x, d, q_m, t) -> ...

* ``level = round(Q_w(W) / d)`` is read back from the quantizer's own output and checked:
  ``float32(level) * d`` must equal ``Q_w(W)`` bit for bit (else :class:`NodeError`), so the
  lowered model computes the fake-quant model's weights exactly; only the matmul's float
  rounding may differ where a fused kernel runs.
* ``bits`` is the fewest bits holding the quantizer's largest level ``round(q_m^t / d)`` (its
  learned bit width rounded up; at least 2).  Wider weights (``bits > max_bits``) stay float:
  their fake-quant value is frozen into a buffer (exact) and the quantizer goes away.
* Activation quantizers keep their semantics: the module call becomes the same
  ``geta::quantize`` with its ``d``, ``max(q_m, Q_M_MIN)`` and ``t`` frozen into buffers.
* Packed weights and frozen constants live under ``geta_lowbit.<quantizer id>``
  (a :class:`LowbitHolder`); the float parameter of a lowered weight is deleted when nothing
  else reads it.
* Reduced precision: the ops' float32 scalar operands (``scale``, ``d``, ``q_m``, ``t``) stay
  float32 when the lowered model is converted (``.half()``, ``.to(torch.bfloat16)``), and an
  unpacked weight is cast to the dtype of ``dtype_like``, an empty buffer of the weight's dtype
  that follows such a conversion (``aten.type_as``; a no-op until the model is converted), so
  a converted lowered model computes like the converted fake-quant model.
  :func:`adopt_holders` restores the holder class on a model rebuilt from its buffers
  (``torch.export.load(...).module()``).  ``lowbit_linear``
  computes in ``x``'s dtype (under autocast: the autocast dtype, as ``aten.linear`` does).

Invariants: the lowered graph has no ``is_geta_quantizer`` module left; new nodes carry ``val``
(fake tensors of the graph's fake mode), ``nn_module_stack``/``stack_trace`` of the layer and
``geta.origin``; ``gm.meta["geta.lowbit"]`` lists one :class:`LowbitWeight` per lowered weight.
``modified`` is True iff a quantizer was lowered or frozen; a second run finds none
(idempotent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.fx
from torch import nn

from geta_fx.errors import InputError, NodeError
from geta_fx.ir import meta
from geta_fx.ir.query import create_node_with_meta, get_attr_tensor, is_quantizer
from geta_fx.pipeline import PassResult

aten = torch.ops.aten

#: gm.meta key: tuple[LowbitWeight, ...] (NOTE: belongs in geta_fx/ir/meta.py with the others).
LOWBIT = "geta.lowbit"
#: Submodule holding the packed weights and frozen quantizer constants.
HOLDER = "geta_lowbit"
#: Widest packed weight (== geta_fx.ops.lowbit.MAX_BITS; a test checks it).  NOTE: this module
#: imports geta_fx.ops lazily (as insert_quantizers does), so importing geta_fx.passes neither
#: registers the ops nor loads kernels.
MAX_BITS = 8


def _lowbit() -> Any:
    from geta_fx.ops import lowbit

    return lowbit


@dataclass(frozen=True)
class LowbitWeight:
    """How one weight was lowered (JSON-able through ``dataclasses.asdict``)."""

    qid: str                          # quantizer id (``geta_quant.<qid>``), also the holder name
    param: str                        # FQN of the float parameter it replaces
    mode: Literal["packed", "float"]
    bits: int                         # storage bits per element (float: the dtype's width)
    learned_bits: float               # the quantizer's continuous bit width
    signed: bool
    max_level: int                    # largest |level| the quantizer can produce
    shape: tuple[int, ...]
    dtype: str
    stored_bytes: int                 # packed (or frozen float) bytes
    float_bytes: int                  # the same weight at its float dtype
    users: tuple[tuple[str, str], ...]  # (node name, op) of the layers computing with it


def _is_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        mod = gm.get_submodule(str(node.target))
    except AttributeError:
        return None
    return mod if is_quantizer(mod) else None


def _find_quantizers(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, nn.Module]]:
    return [(n, m) for n in gm.graph.nodes if (m := _is_quantizer(gm, n)) is not None]


#: Holder buffers that are float32 scalar operands of the ``geta`` ops.
FLOAT32_CONSTANTS = frozenset({"scale", "d", "q_m", "t"})


class LowbitHolder(nn.Module):
    """The constants of one lowered quantizer, read by ``get_attr`` nodes (no forward).

    Packed weight: ``packed`` (uint8), ``scale`` and, when a layer reads the unpacked weight,
    ``dtype_like``; frozen float weight: ``weight``; frozen activation quantizer: ``d``,
    ``q_m``, ``t``.  A dtype conversion of the model leaves the float32 scalar operands
    (:data:`FLOAT32_CONSTANTS`) float32 and only moves them; ``weight`` and ``dtype_like``
    follow it like any float tensor.
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor],
               recurse: bool = True) -> LowbitHolder:
        # NOTE: private nn.Module hook, as in geta_fx.quantizer.Quantizer._apply (imported
        # lazily: importing geta_fx.passes must not register the ops).
        from geta_fx.quantizer import keep_float32

        keep = [b for name, b in self._buffers.items()
                if name in FLOAT32_CONSTANTS and b is not None]
        super()._apply(keep_float32(fn, keep), recurse)
        return self


def adopt_holders(gm: nn.Module) -> int:
    """Make every ``geta_lowbit.<qid>`` submodule of ``gm`` a :class:`LowbitHolder`.

    For a lowered model rebuilt from its buffers, where the holders came back as plain
    ``nn.Module`` s (``torch.export.load(...).module()``, as in ``geta_fx.load``): afterwards
    ``.half()`` / ``.to(torch.bfloat16)`` keep its float32 op scalars, as on the model that was
    lowered.  Buffers (and their persistence) are kept as they are.  Returns how many holders
    were replaced; 0 if ``gm`` has none or they already are LowbitHolders (idempotent).
    """
    parent = getattr(gm, HOLDER, None)
    if not isinstance(parent, nn.Module):
        return 0
    replaced = 0
    for name, child in list(parent.named_children()):
        if isinstance(child, LowbitHolder):
            continue
        if next(child.children(), None) is not None or next(child.parameters(), None) is not None:
            raise InputError(f"adopt_holders: {HOLDER}.{name} holds submodules or parameters; "
                             f"a lowered holder holds only buffers")
        holder = LowbitHolder()
        persistent = set(child.state_dict(keep_vars=True))
        for bname, buf in child.named_buffers(recurse=False):
            holder.register_buffer(bname, buf, persistent=bname in persistent)
        setattr(parent, name, holder)
        replaced += 1
    return replaced


def _holder(gm: torch.fx.GraphModule, qid: str) -> tuple[nn.Module, str]:
    if not hasattr(gm, HOLDER):
        gm.add_submodule(HOLDER, nn.Module())
    name, k = qid, 1
    while hasattr(getattr(gm, HOLDER), name):
        k += 1
        name = f"{qid}_{k}"
    h = LowbitHolder()
    gm.add_submodule(f"{HOLDER}.{name}", h)
    return h, f"{HOLDER}.{name}"


def _fake_mode(gm: torch.fx.GraphModule) -> Any:
    for n in gm.graph.nodes:
        mode = getattr(n.meta.get("val"), "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _new_node(gm: torch.fx.GraphModule, anchor: torch.fx.Node, op: str, target: Any,
              args: tuple[Any, ...] = (), val: Any = None) -> torch.fx.Node:
    return create_node_with_meta(gm.graph, op, target, args, anchor=anchor, val=val)


def _get_attr(gm: torch.fx.GraphModule, anchor: torch.fx.Node, path: str, mode: Any
              ) -> torch.fx.Node:
    t = get_attr_tensor(gm, path)
    val = mode.from_tensor(t, static_shapes=True) if mode is not None else None
    return _new_node(gm, anchor, "get_attr", path, val=val)


def _drop_param(gm: torch.fx.GraphModule, attr: torch.fx.Node) -> None:
    """Erase a now-unused get_attr and delete its parameter if no node reads it any more."""
    if attr.users:
        return
    target = str(attr.target)
    gm.graph.erase_node(attr)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    *path, last = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    if last in owner._parameters:
        del owner._parameters[last]
    elif last in owner._buffers:
        del owner._buffers[last]


def _drop_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    target = str(node.target)
    gm.graph.erase_node(node)
    if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
        gm.delete_submodule(target)


def _bits_of(q: nn.Module) -> float:
    with torch.no_grad():
        return float(q.bit_width().detach().reshape(-1)[0])  # type: ignore[operator]


def _levels(node: torch.fx.Node, q: nn.Module, w: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(levels as float32, fake-quant weight in w's dtype, d, largest possible |level|)."""
    with torch.no_grad():
        y32 = q(w.detach().float())
        d = q.d.detach().float().reshape(())  # type: ignore[union-attr]
        levels = torch.round(y32 / d)
        if not torch.equal(levels * d, y32):
            raise NodeError(node, "lower_quant: the fake-quant weight is not level * d exactly "
                            "(non-finite weights or quantizer parameters?)")
        inf = torch.full((1,), math.inf, dtype=torch.float32, device=w.device)
        bound = int(torch.round(q(inf) / d).abs().max())
        biggest = int(levels.abs().max()) if levels.numel() else 0
        y = q(w.detach()) if w.dtype != torch.float32 else y32
    return levels, y, d, max(bound, biggest)


@dataclass(frozen=True)
class LowerQuant:
    """Pack every weight quantizer's weight at its bit width; freeze activation quantizers.

    Args:
        max_bits: widest packed weight (<= 8); wider ones stay float (frozen fake-quant value).
        fuse_linear: ``aten.linear`` on a packed weight becomes ``geta::lowbit_linear``; other
            layers (and linear with ``False``) read ``geta::unpack_weight``.
        freeze_act: replace activation quantizer modules by ``geta::quantize`` on buffers.
    """

    name: ClassVar[str] = "lower_quant"
    requires: ClassVar[frozenset[str]] = frozenset({"geta.quantizer"})
    provides: ClassVar[frozenset[str]] = frozenset({"geta.lowbit"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"geta.quantizer"})
    max_bits: int = MAX_BITS
    fuse_linear: bool = True
    freeze_act: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.max_bits <= MAX_BITS:
            raise InputError(f"LowerQuant.max_bits must be in [2, {MAX_BITS}], "
                             f"got {self.max_bits}")

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        mode = _fake_mode(gm)
        records = list(gm.meta.get(LOWBIT, ()))
        modified = False
        for node, q in _find_quantizers(gm):
            kind = getattr(q, "kind", None)
            if kind == "weight":
                rec = _maybe_lower_weight(gm, node, q, mode, self)
                if rec is not None:
                    records.append(rec)
                    modified = True
            elif kind == "act" and self.freeze_act:
                _rewrite_act(gm, node, q, mode)
                modified = True
        if modified:
            gm.meta[LOWBIT] = tuple(records)
        return PassResult(gm, modified)


def _maybe_lower_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, q: nn.Module, mode: Any,
                        cfg: LowerQuant) -> LowbitWeight | None:
    attr = node.args[0] if node.args else None
    if not (isinstance(attr, torch.fx.Node) and attr.op == "get_attr"):
        return None  # not a parameter read (nothing to pack); left as fake-quant
    w = get_attr_tensor(gm, str(attr.target))
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() == 0:
        return None
    lowbit = _lowbit()
    signed = bool(getattr(q, "signed", True))
    levels, y, d, max_level = _levels(node, q, w)
    bits = lowbit.bits_for_level(max_level, signed)
    qid = str(node.target).rpartition(".")[2]
    holder, path = _holder(gm, qid)
    users = tuple((u.name, str(getattr(u.target, "__name__", u.target))) for u in node.users)
    shape = tuple(int(s) for s in w.shape)
    float_bytes = w.numel() * w.element_size()
    with gm.graph.inserting_before(node):
        if bits > cfg.max_bits:
            holder.register_buffer("weight", y.detach().clone())
            frozen = _get_attr(gm, node, f"{path}.weight", mode)
            node.replace_all_uses_with(frozen)
            stored, rec_mode, rec_bits = float_bytes, "float", w.element_size() * 8
        else:
            n, k = lowbit.rows_cols(shape)
            packed = lowbit.pack_levels(levels.reshape(n, k), bits, signed)
            check = lowbit.unpack_weight_reference(packed, d.reshape(1), bits, signed, shape,
                                                   w.dtype)
            if not torch.equal(check, y):
                raise NodeError(node, "lower_quant: packed weight does not dequantize to the "
                                "fake-quant weight")
            holder.register_buffer("packed", packed)
            holder.register_buffer("scale", d.detach().clone().reshape(1))
            _rewrite_weight_users(gm, node, holder, path, bits, signed, shape, w.dtype, mode,
                                  cfg)
            stored, rec_mode, rec_bits = packed.numel(), "packed", bits
    _drop_quantizer(gm, node)
    _drop_param(gm, attr)
    return LowbitWeight(qid=qid, param=str(attr.target), mode=rec_mode,  # type: ignore[arg-type]
                        bits=rec_bits, learned_bits=_bits_of(q), signed=signed,
                        max_level=max_level, shape=shape, dtype=str(w.dtype).replace("torch.", ""),
                        stored_bytes=int(stored), float_bytes=int(float_bytes), users=users)


def _is_fusable_linear(user: torch.fx.Node, qnode: torch.fx.Node, ndim: int) -> bool:
    return (user.op == "call_function" and user.target is aten.linear.default and ndim == 2
            and len(user.args) >= 2 and user.args[1] is qnode and user.args[0] is not qnode
            and not user.kwargs.get("weight") and user.args[2:3] != (qnode,))


def _unpacked_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, holder: nn.Module, path: str,
                     args: tuple[Any, ...], dtype: torch.dtype, mode: Any) -> torch.fx.Node:
    """``type_as(unpack_weight(*args), dtype_like)``: the weight in the model's current dtype."""
    holder.register_buffer("dtype_like", torch.empty(0, dtype=dtype,
                                                     device=holder.packed.device))
    unpacked = _new_node(gm, node, "call_function", torch.ops.geta.unpack_weight.default, args,
                         val=node.meta.get("val"))
    like = _get_attr(gm, node, f"{path}.dtype_like", mode)
    return _new_node(gm, node, "call_function", aten.type_as.default, (unpacked, like),
                     val=node.meta.get("val"))


def _rewrite_weight_users(gm: torch.fx.GraphModule, node: torch.fx.Node, holder: nn.Module,
                          path: str, bits: int, signed: bool, shape: tuple[int, ...],
                          dtype: torch.dtype, mode: Any, cfg: LowerQuant) -> None:
    """Point every reader of the quantizer ``node`` at the packed weight (nodes go before it)."""
    packed = _get_attr(gm, node, f"{path}.packed", mode)
    scale = _get_attr(gm, node, f"{path}.scale", mode)
    unpacked: torch.fx.Node | None = None
    for user in list(node.users):
        if cfg.fuse_linear and _is_fusable_linear(user, node, len(shape)):
            bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
            with gm.graph.inserting_before(user):
                new = _new_node(gm, user, "call_function", torch.ops.geta.lowbit_linear.default,
                                (user.args[0], packed, scale, bits, shape[1], signed, bias),
                                val=user.meta.get("val"))
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
            continue
        if unpacked is None:
            unpacked = _unpacked_weight(gm, node, holder, path,
                                        (packed, scale, bits, signed, list(shape), dtype), dtype,
                                        mode)
        user.replace_input_with(node, unpacked)


def _rewrite_act(gm: torch.fx.GraphModule, node: torch.fx.Node, q: nn.Module, mode: Any) -> None:
    """``Q_a(x)`` -> ``geta::quantize(x, d, q_m_eff, t, signed)`` on frozen buffers (same bits)."""
    qid = str(node.target).rpartition(".")[2]
    holder, path = _holder(gm, qid)
    with torch.no_grad():
        holder.register_buffer("d", q.d.detach().clone())  # type: ignore[union-attr]
        holder.register_buffer("q_m", q.effective_q_m().detach().clone())  # type: ignore[operator]
        holder.register_buffer("t", q.t.detach().clone())  # type: ignore[union-attr]
    with gm.graph.inserting_before(node):
        consts = [_get_attr(gm, node, f"{path}.{k}", mode) for k in ("d", "q_m", "t")]
        new = _new_node(gm, node, "call_function", torch.ops.geta.quantize.default,
                        (node.args[0], *consts, bool(q.signed)), val=node.meta.get("val"))
    node.replace_all_uses_with(new)
    _drop_quantizer(gm, node)
