"""Cost model of an ATen graph: compute layers, their MACs, operands, bits and weight storage.

Shared by :mod:`geta_fx.report` (which turns it into tables), :mod:`geta_fx.viz` (layer bits)
and :mod:`geta_fx.deploy` (artifact metadata).  One network comes in three forms, and all three
cost the same:

* transformed and slim graphs: a weight is a parameter read through a weight-quantizer module
  (``call_module``), an activation quantizer is a module call on the activation;
* lowered graphs (``passes/lower_quant.py``): a quantized weight is a packed buffer
  ``geta_lowbit.<qid>.packed`` read by ``geta::unpack_weight`` or ``geta::lowbit_linear`` (or a
  frozen float buffer ``geta_lowbit.<qid>.weight`` when wider than 8 bits), an activation
  quantizer is ``geta::quantize`` on frozen ``d``/``q_m``/``t`` buffers;
* loaded artifacts (``geta_fx.load``): the lowered graph after ``torch.export`` (new node names,
  same ops and buffers).

A packed weight counts as its logical elements (not its bytes), at the *learned* bit width
rounded -- the same number the fake-quant weight's quantizer gives -- read from the lowering
records in ``gm.meta["geta.lowbit"]`` (:class:`~geta_fx.passes.lower_quant.LowbitWeight`, or the
JSON dicts an artifact stores).  Without records the op's packed storage bits are all there is
(:attr:`StoredWeight.learned` is False then).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.errors import InputError
from geta_fx.ir import meta, op_sets
from geta_fx.ir.query import get_attr_tensor, is_quantizer, tensor_val

__all__ = [
    "FP_BITS", "LAYER_OPS", "BitSource", "BopsTerm", "Layer", "Operand", "PackedRef", "Sizes",
    "Storage", "StoredWeight", "bit_source", "bits_of", "bops_terms", "find_layers",
    "frozen_quantize_bits", "kept_channels", "module_path", "quantizer_bits", "source_bits",
    "storage",
    "stored_weights", "weight_bits", "weight_fqn", "weight_numel", "weight_shape",
]

#: Bit width assumed for anything not quantized (GETA_SPEC §A.3, §E).
FP_BITS = 32
#: gm.meta key of the lowering records (== passes.lower_quant.LOWBIT; a test checks it).
LOWBIT = "geta.lowbit"
#: Submodule of a lowered graph holding packed weights and frozen quantizer constants
#: (== passes.lower_quant.HOLDER; a test checks it).
HOLDER = "geta_lowbit"


# ------------------------------------------------------------------------------ sizes
class Sizes:
    """Concrete ints for (possibly symbolic) sizes: example inputs first, then ``default_sizes``
    (the sizes a slim graph's dense origin was costed at), then the symbols' hints."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Any,
                 default_sizes: Sequence[Sequence[int]] | None = None) -> None:
        self.subs: dict[Any, int] = {}
        self.from_inputs = False
        self.batch: int | None = None
        vals = [v for n in gm.graph.nodes if n.op == "placeholder"
                if (v := tensor_val(n)) is not None]
        if example_inputs is not None:
            if isinstance(example_inputs, torch.Tensor):
                example_inputs = (example_inputs,)
            tensors = [x for x in pytree.tree_leaves(example_inputs)
                       if isinstance(x, torch.Tensor)]
            if len(vals) != len(tensors):
                raise InputError(f"report: the graph has {len(vals)} tensor inputs but "
                                 f"example_inputs has {len(tensors)} tensors")
            for v, x in zip(vals, tensors, strict=True):
                if v.dim() != x.dim():
                    raise InputError(f"report: example input of shape {tuple(x.shape)} does "
                                     f"not match graph input of rank {v.dim()}")
            self._bind(vals, [list(x.shape) for x in tensors], strict=True)
            self.from_inputs = True
            if tensors and tensors[0].dim():
                self.batch = int(tensors[0].shape[0])
        elif default_sizes is not None and len(default_sizes) == len(vals) and all(
                len(s) == v.dim() for v, s in zip(vals, default_sizes, strict=True)):
            self._bind(vals, default_sizes, strict=False)
        if self.batch is None and vals and vals[0].dim():
            self.batch = self.int(vals[0].shape[0])
        self.inputs = [self.shape(v) or [] for v in vals]

    def _bind(self, vals: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]],
              strict: bool) -> None:
        for v, shape in zip(vals, shapes, strict=True):
            for s, c in zip(v.shape, shape, strict=True):
                expr = s.node.expr if isinstance(s, torch.SymInt) else s
                if getattr(expr, "is_Symbol", False):
                    self.subs[expr] = int(c)
                elif strict and getattr(expr, "is_number", True) and int(expr) != int(c):
                    raise InputError(f"report: example input of shape {tuple(shape)} "
                                     f"does not match the graph's static size {int(expr)}")

    def int(self, s: Any) -> int:
        if not isinstance(s, torch.SymInt):
            return int(s)
        if self.subs:
            try:
                return int(s.node.expr.xreplace(self.subs))
            except (TypeError, AttributeError):
                pass
        from torch.fx.experimental import symbolic_shapes

        hint = getattr(symbolic_shapes, "optimization_hint", None)
        if hint is not None:
            return int(hint(s))
        return int(symbolic_shapes.hint_int(s))  # type: ignore[attr-defined]  # older torch

    def shape(self, t: torch.Tensor | None) -> list[int] | None:
        return None if t is None else [self.int(s) for s in t.shape]


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


# ------------------------------------------------------------------------------ graph walks
def packet(node: torch.fx.Node) -> str:
    """aten op name without namespace/overload (``aten.conv2d.default`` -> ``conv2d``)."""
    target = node.target
    name = getattr(getattr(target, "overloadpacket", None), "__name__", None)
    if name is None:
        name = getattr(target, "__name__", str(target))
    return name.split(".")[-1]


def _geta_op(node: torch.fx.Node) -> str | None:
    """``"unpack_weight"`` for ``geta::unpack_weight`` etc.; None for any other node."""
    if node.op != "call_function" or getattr(node.target, "namespace", None) != "geta":
        return None
    return packet(node)


def quantizer_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        try:
            mod = gm.get_submodule(node.target)  # type: ignore[arg-type]
        except AttributeError:
            return None
        if is_quantizer(mod):
            return mod
    info = node.meta.get(meta.QUANTIZER)
    if info is not None:
        try:
            mod = gm.get_submodule(info.qid)
        except AttributeError:
            return None
        if is_quantizer(mod):
            return mod
    return None


def quantizer_bits(q: nn.Module) -> float:
    """Continuous bit width of a quantizer module (``.bit_width()``), as a float."""
    with torch.no_grad():
        b = q.bit_width()
    return float(torch.as_tensor(b).detach().float().reshape(-1)[0])


def frozen_quantize_bits(gm: torch.fx.GraphModule, node: torch.fx.Node) -> float | None:
    """Continuous bit width of a lowered activation quantizer ``geta::quantize(x, d, q_m, t,
    signed)`` on frozen buffers (the formula of :func:`geta_fx.quantizer.bit_width`)."""
    if _geta_op(node) != "quantize":
        return None
    from geta_fx.quantizer import bit_width

    consts = node.args[1:4]
    if len(consts) != 3 or not all(isinstance(c, torch.fx.Node) and c.op == "get_attr"
                                   for c in consts):
        return None
    d, q_m, t = (get_attr_tensor(gm, str(c.target)) for c in consts)  # type: ignore[union-attr]
    signed = bool(node.args[4]) if len(node.args) > 4 else True
    with torch.no_grad():
        b = bit_width(d.detach().float(), q_m.detach().float(), t.detach().float(), signed)
    return float(torch.as_tensor(b).reshape(-1)[0])


@dataclass(frozen=True)
class PackedRef:
    """How a lowbit op reads a packed weight: storage bits, signedness, logical shape."""

    bits: int
    signed: bool
    shape: tuple[int, ...]


@dataclass
class Operand:
    node: Any
    param: str | None = None         # get_attr target reached through transparent ops
    quantizer: nn.Module | None = None
    flips: int = 0
    bits: int | None = None          # bits a geta op states (packed storage, frozen act quant)
    packed: PackedRef | None = None  # the get_attr is a packed weight


def trace_operand(gm: torch.fx.GraphModule, arg: Any) -> Operand:
    """Walk back from an operand through quantizers, lowbit unpacking and view-like ops."""
    op = Operand(arg)
    node = arg
    for _ in range(32):
        if not isinstance(node, torch.fx.Node):
            return op
        if node.op == "get_attr":
            op.param = str(node.target)
            return op
        q = quantizer_module(gm, node)
        geta = _geta_op(node)
        if q is not None:
            if op.quantizer is None and op.bits is None:
                op.quantizer = q
        elif geta == "unpack_weight" and len(node.args) >= 5:
            bits, signed, shape = node.args[2:5]
            op.packed = PackedRef(int(bits), bool(signed), tuple(int(s) for s in shape))
            if op.quantizer is None and op.bits is None:
                op.bits = int(bits)
        elif geta == "quantize":
            act_bits = frozen_quantize_bits(gm, node)
            if op.quantizer is None and op.bits is None and act_bits is not None:
                op.bits = int(round(act_bits))
        elif not (node.op == "call_function" and node.target in op_sets.OPERAND_TRANSPARENT):
            return op
        elif node.target in op_sets.FLIPS:
            op.flips += 1
        if not node.args:
            return op
        node = node.args[0]
    return op


def bits_of(op: Operand) -> int:
    """Rounded bits of an operand as the graph states them (32 where unquantized)."""
    if op.quantizer is not None:
        return int(round(quantizer_bits(op.quantizer)))
    return op.bits if op.bits is not None else FP_BITS


@dataclass
class Layer:
    node: torch.fx.Node
    kind: str
    macs: int
    weight: Operand | None
    act: Operand | None
    other: Operand | None = None      # second activation operand (attention)
    extra_macs: int = 0                # sdpa: the AV part (its bits differ)
    value: Operand | None = None
    w_out_dim: int | None = None       # output-channel dim of the weight parameter
    in_channels: int | None = None
    out_channels: int | None = None


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _conv(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: Sizes) -> Layer | None:
    x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
    name = packet(node)
    transposed = name.startswith("conv_transpose") or (
        name in ("convolution", "_convolution") and bool(_arg(node, 6, "transposed", False)))
    ws, xs, ys = sz.shape(tensor_val(w)), sz.shape(tensor_val(x)), sz.shape(tensor_val(node))
    if ws is None or ys is None or xs is None:
        return None
    per = numel(ws[1:])  # C_in/groups * prod(k) (C_out/groups * prod(k) transposed)
    macs = numel(xs) * per if transposed else numel(ys) * per
    wop = trace_operand(gm, w)
    return Layer(node, "conv", macs, wop, trace_operand(gm, x),
                 w_out_dim=1 if transposed else 0,
                 in_channels=xs[1] if len(xs) > 1 else None,
                 out_channels=ys[1] if len(ys) > 1 else None)


def _linear(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: Sizes) -> Layer | None:
    x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
    ws, ys = sz.shape(tensor_val(w)), sz.shape(tensor_val(node))
    if ws is None or ys is None:
        return None
    return Layer(node, "linear", numel(ys) * ws[-1], trace_operand(gm, w),
                 trace_operand(gm, x), w_out_dim=0, in_channels=ws[-1],
                 out_channels=ys[-1] if ys else None)


def _lowbit_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: Sizes) -> Layer | None:
    """``geta::lowbit_linear(x, packed, scale, bits, in_features, signed, bias)``: a linear
    layer whose ``[N, in_features]`` weight is packed at ``bits``."""
    if len(node.args) < 6:
        return None
    x, packed, _, bits, k, signed = node.args[:6]
    ps, ys = sz.shape(tensor_val(packed)), sz.shape(tensor_val(node))
    if ps is None or ys is None:
        return None
    wop = trace_operand(gm, packed)
    wop.packed = PackedRef(int(bits), bool(signed), (ps[0], int(k)))
    wop.bits = int(bits)
    return Layer(node, "linear", numel(ys) * int(k), wop, trace_operand(gm, x), w_out_dim=0,
                 in_channels=int(k), out_channels=ys[-1] if ys else None)


def _matmul(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: Sizes) -> Layer | None:
    name = packet(node)
    offset = 1 if name in ("addmm", "baddbmm", "addbmm", "addmv") else 0
    a, b = node.args[offset], node.args[offset + 1]
    as_, ys = sz.shape(tensor_val(a)), sz.shape(tensor_val(node))
    if as_ is None or ys is None:
        return None
    k = as_[-1]
    macs = max(numel(ys), 1) * k if name != "addbmm" else numel(ys) * k * as_[0]
    aop, bop = trace_operand(gm, a), trace_operand(gm, b)
    if bop.param is None and aop.param is not None:   # weight on the left (x @ W^T as W @ x)
        aop, bop = bop, aop
    if bop.param is not None:
        bshape = sz.shape(tensor_val(b)) or []
        return Layer(node, "matmul", macs, bop, aop,
                     w_out_dim=0 if bop.flips % 2 else -1, in_channels=k,
                     out_channels=(bshape[-1] if len(bshape) > 1 else None))
    return Layer(node, "attention", macs, None, aop, other=bop, in_channels=k,
                 out_channels=ys[-1] if ys else None)


def _einsum(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: Sizes) -> Layer | None:
    eq, operands = node.args[0], list(node.args[1])
    if not isinstance(eq, str) or len(operands) != 2:
        return None
    lhs, _, rhs = eq.replace(" ", "").partition("->")
    specs = lhs.split(",")
    sizes: dict[str, int] = {}
    for spec, o in zip(specs, operands, strict=True):
        shape = sz.shape(tensor_val(o))
        if shape is None:
            return None
        letters = spec.replace("...", "")
        tail = shape[len(shape) - len(letters):] if "..." in spec and spec.startswith("...") \
            else shape[:len(letters)] if "..." in spec else shape
        for c, s in zip(letters, tail, strict=False):
            sizes[c] = s
    ys = sz.shape(tensor_val(node)) or []
    contracted = [c for c in sizes if c not in rhs]
    macs = numel(ys) * numel([sizes[c] for c in contracted])
    aop, bop = trace_operand(gm, operands[0]), trace_operand(gm, operands[1])
    if bop.param is None and aop.param is not None:
        aop, bop = bop, aop
    if bop.param is not None:
        return Layer(node, "matmul", macs, bop, aop)
    return Layer(node, "attention", macs, None, aop, other=bop)


def _sdpa(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: Sizes) -> Layer | None:
    q, k, v = node.args[:3]
    qs, ks, vs = (sz.shape(tensor_val(t)) for t in (q, k, v))
    if qs is None or ks is None or vs is None:
        return None
    s = ks[-2]
    qk = numel(qs[:-1]) * s * qs[-1]
    av = numel(qs[:-1]) * s * vs[-1]
    return Layer(node, "attention", qk, None, trace_operand(gm, q), other=trace_operand(gm, k),
                 extra_macs=av, value=trace_operand(gm, v), in_channels=qs[-1],
                 out_channels=vs[-1])


def _embedding(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: Sizes) -> Layer | None:
    w = node.args[0]
    ws = sz.shape(tensor_val(w))
    if ws is None:
        return None
    return Layer(node, "embedding", 0, trace_operand(gm, w), None, w_out_dim=1,
                 in_channels=ws[0], out_channels=ws[1] if len(ws) > 1 else None)


_Handler = Callable[[torch.fx.GraphModule, torch.fx.Node, Sizes], "Layer | None"]
#: op name (overload packet) -> how to count it.  Everything else costs 0 MACs.
LAYER_OPS: dict[str, _Handler] = {
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                     "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), _conv),
    "linear": _linear,
    "lowbit_linear": _lowbit_linear,
    **dict.fromkeys(("mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm"), _matmul),
    "einsum": _einsum,
    **dict.fromkeys(("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                     "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_cudnn_attention"), _sdpa),
    "embedding": _embedding,
}
#: op name -> argument index of its bias.
_BIAS_ARG = {**dict.fromkeys(("linear", "conv1d", "conv2d", "conv3d", "convolution",
                              "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), 2),
             "addmm": 0, "lowbit_linear": 6}


def find_layers(gm: torch.fx.GraphModule, sz: Sizes) -> list[Layer]:
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        handler = LAYER_OPS.get(packet(node))
        if handler is None:
            continue
        layer = handler(gm, node, sz)
        if layer is not None:
            layers.append(layer)
    return layers


def module_path(node: torch.fx.Node) -> str:
    """Innermost module FQN of a node (from ``nn_module_stack``), '' at top level."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return clean_path(str(path))
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def clean_path(path: str) -> str:
    # Dynamo-style "L['self'].layers[0]" -> "layers.0"; export paths are already FQNs.
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
        path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path


def bias_numel(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    idx = _BIAS_ARG.get(packet(node))
    if idx is None or len(node.args) <= idx:
        return 0
    b = trace_operand(gm, node.args[idx])
    if b.param is None:
        return 0
    return int(get_attr_tensor(gm, b.param).numel())


# ------------------------------------------------------------------------------ weights
def weight_shape(gm: torch.fx.GraphModule, op: Operand) -> tuple[int, ...] | None:
    """Logical shape of a weight operand (a packed weight: its unpacked shape)."""
    if op.packed is not None:
        return op.packed.shape
    t = get_attr_tensor(gm, op.param) if op.param else None
    return tuple(int(s) for s in t.shape) if isinstance(t, torch.Tensor) else None


def weight_numel(gm: torch.fx.GraphModule, op: Operand) -> int:
    """Logical elements of a weight operand (a packed weight counts elements, not bytes)."""
    shape = weight_shape(gm, op)
    return numel(shape) if shape is not None else 0


def _weight_values(gm: torch.fx.GraphModule, op: Operand) -> torch.Tensor | None:
    """The weight (a packed one: its integer levels, zero exactly where the weight is)."""
    if op.param is None:
        return None
    t = get_attr_tensor(gm, op.param)
    if not isinstance(t, torch.Tensor):
        return None
    if op.packed is None:
        return t.detach()
    from geta_fx.ops.lowbit import rows_cols, unpack_levels

    _, k = rows_cols(op.packed.shape)
    return unpack_levels(t.detach(), op.packed.bits, op.packed.signed, k).reshape(
        op.packed.shape)


def kept_channels(gm: torch.fx.GraphModule, op: Operand, dim: int | None) -> int | None:
    """Output channels (along ``dim``) whose weight slice is not all zero."""
    if dim is None:
        return None
    t = _weight_values(gm, op)
    if t is None or t.dim() == 0:
        return None
    with torch.no_grad():
        flat = t.movedim(dim, 0).reshape(t.shape[dim], -1)
        return int((flat != 0).any(1).sum())


def quantizers(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    return {name: mod for name, mod in gm.named_modules()
            if is_quantizer(mod)}


def weight_quantizer_by_fqn(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """param FQN -> weight quantizer, from the graph and from the modules' ``param_fqn``."""
    out: dict[str, nn.Module] = {}
    for mod in quantizers(gm).values():
        fqn = getattr(mod, "param_fqn", None)
        if getattr(mod, "kind", None) == "weight" and fqn:
            out[str(fqn)] = mod
    for node in gm.graph.nodes:
        mod = quantizer_module(gm, node)
        if mod is None or getattr(mod, "kind", None) != "weight":
            continue
        info = node.meta.get(meta.QUANTIZER)
        op = trace_operand(gm, node.args[0] if node.args else None)
        fqn = op.param or (info.param_fqn if info is not None else None)
        if fqn:
            out[fqn] = mod
    return out


@dataclass(frozen=True)
class StoredWeight:
    """A weight a lowered graph stores in place of a (quantized) parameter."""

    path: str        # the graph attribute (``geta_lowbit.<qid>.packed`` / ``.weight``)
    param: str       # FQN of the parameter it replaces (``path`` when unrecorded)
    mode: str        # "packed" | "float"
    bits: int        # rounded learned bits (storage bits when not ``learned``)
    numel: int       # logical elements
    learned_bits: float | None  # the quantizer's continuous bits (None: no lowering record)

    @property
    def learned(self) -> bool:
        """``bits`` come from the lowering record, not just from the graph."""
        return self.learned_bits is not None


def _record(rec: Any) -> Mapping[str, Any]:
    return rec if isinstance(rec, Mapping) else dataclasses.asdict(rec)


def _has_attr(gm: torch.fx.GraphModule, path: str) -> bool:
    try:
        return isinstance(get_attr_tensor(gm, path), torch.Tensor)
    except AttributeError:
        return False


def stored_weights(gm: torch.fx.GraphModule) -> dict[str, StoredWeight]:
    """Graph attribute -> the weight stored there, for every lowered weight of ``gm``.

    From the lowering records (``gm.meta["geta.lowbit"]``), then every packed buffer a lowbit
    op reads and every frozen ``<holder>.weight`` that has no record (storage bits stand in for
    the learned ones).
    """
    out: dict[str, StoredWeight] = {}
    for rec in map(_record, gm.meta.get(LOWBIT) or ()):
        path = f"{HOLDER}.{rec['qid']}.{'packed' if rec['mode'] == 'packed' else 'weight'}"
        if _has_attr(gm, path):
            out[path] = StoredWeight(path, str(rec["param"]), str(rec["mode"]),
                                     int(round(float(rec["learned_bits"]))),
                                     numel([int(s) for s in rec["shape"]]),
                                     float(rec["learned_bits"]))
    for node in gm.graph.nodes:
        geta = _geta_op(node)
        if geta not in ("unpack_weight", "lowbit_linear"):
            continue
        if geta == "unpack_weight":  # (packed, scale, bits, signed, shape, dtype)
            op, bits = trace_operand(gm, node.args[0]), int(node.args[2])
            size = numel([int(s) for s in node.args[4]])
        else:  # lowbit_linear(x, packed, scale, bits, in_features, signed, bias)
            op, bits = trace_operand(gm, node.args[1]), int(node.args[3])
            size = int(get_attr_tensor(gm, op.param).shape[0]) * int(node.args[4]) \
                if op.param else 0
        if op.param is not None and op.param not in out:
            out[op.param] = StoredWeight(op.param, op.param, "packed", bits, size, None)
    for name, b in gm.named_buffers():  # frozen float weights (wider than a packed one)
        if name.startswith(f"{HOLDER}.") and name.endswith(".weight") and name not in out:
            out[name] = StoredWeight(name, name, "float", b.element_size() * 8, b.numel(), None)
    return out


def weight_fqn(op: Operand, stored: Mapping[str, StoredWeight]) -> str | None:
    """The parameter FQN a weight operand stands for (a stored weight: the one it replaced)."""
    if op.param is None:
        return None
    s = stored.get(op.param)
    return s.param if s is not None else op.param


def weight_bits(op: Operand, stored: Mapping[str, StoredWeight]) -> int:
    """Rounded learned bits of a weight operand (the lowering record's for a stored weight)."""
    if op.quantizer is None and op.param in stored:
        return stored[op.param].bits
    return bits_of(op)


#: Where a bit width comes from, as the cost model reads it: a quantizer module (its rounded
#: learned bits, so the same term costs differently as the bits change) or a fixed width.
BitSource = nn.Module | int


def bit_source(op: Operand, stored: Mapping[str, StoredWeight] | None = None) -> BitSource:
    """The quantizer an operand is read through, else its fixed bits (:func:`weight_bits`)."""
    if op.quantizer is not None:
        return op.quantizer
    return weight_bits(op, stored) if stored is not None else bits_of(op)


def source_bits(src: BitSource) -> int:
    """Rounded bits of a :data:`BitSource` now."""
    return src if isinstance(src, int) else int(round(quantizer_bits(src)))


@dataclass(frozen=True)
class BopsTerm:
    """``macs * bits(w) * bits(a)``: one part of a layer's BOPs."""

    macs: int
    w: BitSource
    a: BitSource


def bops_terms(lay: Layer, stored: Mapping[str, StoredWeight]) -> list[BopsTerm]:
    """A layer's BOPs as terms in its operands' bit sources (GETA_SPEC §E: MACs * b_w * b_a;
    an activation x activation matmul has the second activation in the ``w`` place; sdpa adds
    its unquantized ``softmax(QK^T) @ V`` part)."""
    if lay.weight is not None:  # the graph path decides (a tied weight may be read
        w = bit_source(lay.weight, stored)  # quantized by one layer, float by another)
    else:
        w = bit_source(lay.other) if lay.other is not None else FP_BITS
    a = bit_source(lay.act) if lay.act is not None else FP_BITS
    terms = [BopsTerm(lay.macs, w, a)]
    if lay.value is not None:
        terms.append(BopsTerm(lay.extra_macs, FP_BITS, bit_source(lay.value)))
    return terms


@dataclass(frozen=True)
class Storage:
    params: int                # model parameters (stored weights at their logical size)
    bits: float                # their storage bits at the learned widths
    quantizer_scalars: int     # quantizer parameters, or a lowered graph's frozen constants
    unlearned: tuple[str, ...]  # stored weights whose learned bits are unknown
    quant_params: int = 0      # of ``params``, those stored at a learned (quantized) width
    quant_bits: float = 0.0    # ... and their bits
    #: weight-quantizer module name -> parameters stored at its bits (tied ones once)
    by_quantizer: Mapping[str, int] = dataclasses.field(default_factory=dict)


def storage(gm: torch.fx.GraphModule) -> Storage:
    """Model parameters and their bits; tied parameters once, quantizer scalars apart.

    A parameter that a lowered graph keeps as a float parameter (a tied weight another layer
    reads unquantized) *and* as a stored weight counts once, at the stored weight's learned
    bits: as the slim model counts it (at its quantizer's bits).
    """
    quant_prefixes = tuple(f"{n}." for n in quantizers(gm))
    wq = weight_quantizer_by_fqn(gm)
    wq_by_tensor = {id(get_attr_tensor(gm, fqn)): q for fqn, q in wq.items()
                    if _has_attr(gm, fqn)}
    stored = stored_weights(gm)
    replaced = {s.param for s in stored.values()}
    aliases: dict[int, set[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), set()).add(name)
    qname = {id(m): name for name, m in quantizers(gm).items()}
    n = scalars = qn = 0
    bits = qbits = 0.0
    by_q: dict[str, int] = {}
    for name, p in gm.named_parameters():
        if quant_prefixes and name.startswith(quant_prefixes):
            scalars += p.numel()
            continue
        if aliases[id(p)] & replaced:
            continue
        q = wq_by_tensor.get(id(p))  # by tensor: tied weights have several FQNs
        n += p.numel()
        if q is None:
            bits += p.numel() * p.element_size() * 8
            continue
        b = p.numel() * round(quantizer_bits(q))
        bits, qn, qbits = bits + b, qn + p.numel(), qbits + b
        by_q[qname[id(q)]] = by_q.get(qname[id(q)], 0) + p.numel()
    for s in stored.values():
        n += s.numel
        bits += s.numel * s.bits
        if s.learned:
            qn, qbits = qn + s.numel, qbits + s.numel * s.bits
    scalars += sum(b.numel() for name, b in gm.named_buffers()
                   if name.startswith(f"{HOLDER}.") and name not in stored)
    return Storage(n, bits, scalars, tuple(s.path for s in stored.values() if not s.learned),
                   quant_params=qn, quant_bits=qbits, by_quantizer=by_q)
