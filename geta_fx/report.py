"""``geta_fx.report``: what a (transformed or slim) model costs.

Counts, per compute layer of the ATen graph and in total (GETA_SPEC §E, with the reference's
metric defects of §G.2 #3 and #15 fixed):

* parameters (model parameters once each, tied weights once; quantizer scalars separately);
* MACs, from ``node.meta["val"]`` shapes at the example batch:
  conv (incl. transposed/grouped) ``numel(out) * C_in/groups * prod(k)``, linear/matmul family
  ``numel(out) * K``, einsum ``numel(out) * prod(contracted sizes)``, and
  ``scaled_dot_product_attention`` ``QK^T + AV``.  Matmuls between two activations (attention)
  are counted and listed as their own line, never dropped;
* BOPs ``= MACs * b_w * b_a`` with learned, rounded bit widths (32 where unquantized), absolute
  and **relative to FP32 (32 x 32 bits)** -- not to the W16/A32 init as the reference does;
* weight storage in bytes at the learned bit widths (unquantized parameters at their dtype
  width; quantizer scalars at 32 bits, listed separately), vs FP32 storage;
* average weight bit width (model parameters only);
* group sparsity: zero units / units of prunable groups (GetaModule or graphs with group meta).

The FP32 reference is the same graph at 32 x 32 bits unless ``reference=`` names another model
(e.g. ``report(gm.compress(), reference=gm)``: the slim model vs the unpruned FP32 model).
The reference is read, never modified (the reference GETA prunes in place and then reports
"full" numbers that equal the compressed ones, §E).

Symbolic (dynamic) sizes take the example inputs' sizes when ``example_inputs`` is given, else
the sizes of the inputs the graph was captured with (the symbols' hints).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.errors import InputError
from geta_fx.ir import meta
from geta_fx.ir.query import get_attr_tensor, tensor_val

__all__ = ["GroupRow", "LayerRow", "Report", "report"]

aten = torch.ops.aten

#: Bit width assumed for anything not quantized (GETA_SPEC §A.3, §E).
FP_BITS = 32


# ------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class LayerRow:
    """One compute node. ``w_bits``/``a_bits`` are the rounded bit widths used for BOPs."""

    name: str                 # graph node name
    module: str               # module path from nn_module_stack ("" at the top level)
    op: str                   # aten op, short ("conv2d", "linear", "scaled_dot_product_attention")
    kind: str                 # conv | linear | matmul | attention | embedding
    weight: str | None        # parameter FQN of the weight operand (None: activation x activation)
    in_channels: int | None
    out_channels: int | None  # output channels of the current graph
    kept_channels: int | None  # output channels whose weight slice is not all zero
    ref_channels: int | None  # output channels of the reference model (same weight FQN)
    params: int               # weight (+ bias) elements of this layer
    macs: int
    w_bits: int
    a_bits: int
    bops: int


@dataclass(frozen=True)
class GroupRow:
    id: int
    units: int
    unit_size: int
    prunable: bool
    zero_units: int
    reason: str | None
    params: tuple[str, ...]


@dataclass(frozen=True)
class QuantRow:
    name: str
    kind: str
    target: str | None       # weight FQN (weight quantizers) or the consuming nodes (act)
    bits: float              # continuous bit width
    bits_rounded: int


@dataclass
class Report:
    """Cost of a model; ``str(report)`` is the terminal table, ``to_json()`` the same as JSON."""

    model: str
    batch: int | None
    shapes_from: str                # "example inputs" | "capture-time sizes"
    reference: str                  # what the FP32 denominators describe
    params: int
    quantizer_params: int
    macs: int
    macs_weight_layers: int
    macs_act_matmuls: int
    bops: int
    bops_act_matmuls: int
    fp32_macs: int
    fp32_bops: int
    weight_bytes: float             # model params at learned bits (+ quantizer scalars)
    quantizer_bytes: float
    fp32_weight_bytes: int
    avg_weight_bits: float | None
    group_sparsity: float | None
    zero_units: int | None
    prunable_units: int | None
    sparsity_from: str | None
    layers: list[LayerRow] = field(default_factory=list)
    groups: list[GroupRow] = field(default_factory=list)
    quantizers: list[QuantRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # derived ------------------------------------------------------------------------------
    @property
    def relative_bops(self) -> float | None:
        return self.bops / self.fp32_bops if self.fp32_bops else None

    @property
    def relative_macs(self) -> float | None:
        return self.macs / self.fp32_macs if self.fp32_macs else None

    @property
    def relative_weight_bytes(self) -> float | None:
        return self.weight_bytes / self.fp32_weight_bytes if self.fp32_weight_bytes else None

    # serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_bops"] = self.relative_bops
        d["relative_macs"] = self.relative_macs
        d["relative_weight_bytes"] = self.relative_weight_bytes
        d["definitions"] = {
            "macs": "multiply-accumulates at the reported batch; activation x activation "
                    "matmuls (attention) included, also listed as macs_act_matmuls",
            "bops": "sum over layers of MACs * weight bits * activation bits (rounded learned "
                    f"bits, {FP_BITS} where unquantized)",
            "fp32_bops": f"reference MACs * {FP_BITS} * {FP_BITS} (FP32 weights and "
                         "activations), not the W16/A32 denominator of the GETA reference code",
            "weight_bytes": "model parameters at their learned bit widths (unquantized ones at "
                            "their dtype width) plus quantizer scalars at 32 bits, in bytes",
            "avg_weight_bits": "model-parameter bits / model parameters (quantizer scalars "
                               "excluded)",
            "group_sparsity": "zero units / units of prunable groups",
        }
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, *, layers: bool = True, groups: bool = False,
                quantizers: bool = True) -> str:
        """Terminal table: totals, then the per-layer table (and optionally groups)."""
        batch = self.batch if self.batch is not None else "?"
        out = [f"geta_fx report: {self.model}  (batch {batch}, sizes from {self.shapes_from})"]
        q = f" (+ {self.quantizer_params:,} quantizer scalars)" if self.quantizer_params else ""
        rows = [
            ("parameters", f"{self.params:,}{q}"),
            ("MACs", f"{_si(self.macs)}  (weight layers {_si(self.macs_weight_layers)}, "
                     f"activation x activation matmuls {_si(self.macs_act_matmuls)})"),
            ("MACs vs reference", f"{_pct(self.relative_macs)}  of {_si(self.fp32_macs)}"),
            ("BOPs", f"{_si(self.bops)}  (MACs x weight bits x activation bits; "
                     f"attention matmuls {_si(self.bops_act_matmuls)})"),
            ("BOPs vs FP32", f"{_pct(self.relative_bops)}  of {_si(self.fp32_bops)} = "
                             f"MACs x 32 x 32 of {self.reference}"),
            ("weight storage", f"{_bytes(self.weight_bytes)} at learned bit widths "
                               f"(quantizer scalars {_bytes(self.quantizer_bytes)}); FP32 "
                               f"{_bytes(self.fp32_weight_bytes)}: "
                               f"{_pct(self.relative_weight_bytes)}"),
            ("average weight bits", "n/a" if self.avg_weight_bits is None else
             f"{self.avg_weight_bits:.2f} per model parameter"),
            ("group sparsity", "n/a (no group metadata; pass reference=the GetaModule)"
             if self.group_sparsity is None else
             f"{_pct(self.group_sparsity)}  ({self.zero_units}/{self.prunable_units} units of "
             f"prunable groups are zero{', ' + self.sparsity_from if self.sparsity_from else ''})"),
        ]
        width = max(len(k) for k, _ in rows)
        out += [f"  {k:<{width}}  {v}" for k, v in rows]
        out += [f"  note: {n}" for n in self.notes]
        if layers and self.layers:
            out += ["", "layers"]
            out += _table(
                ["node", "module", "kind", "ch kept/total", "w_bits", "a_bits", "MACs", "BOPs"],
                [[r.name, r.module or "-", r.kind, _channels(r),
                  str(r.w_bits), str(r.a_bits), _si(r.macs), _si(r.bops)] for r in self.layers],
                right={3, 4, 5, 6, 7})
        if quantizers and self.quantizers:
            out += ["", "quantizers"]
            out += _table(["name", "kind", "target", "bits", "rounded"],
                          [[r.name, r.kind, r.target or "-", f"{r.bits:.2f}",
                            str(r.bits_rounded)] for r in self.quantizers], right={3, 4})
        if groups and self.groups:
            out += ["", "groups"]
            out += groups_table(self.groups)
        return "\n".join(out)


def groups_table(groups: Sequence[GroupRow], width: int = 100) -> list[str]:
    """Text table of prune groups: units x channels per unit, zero units, params or reason."""
    def what(g: GroupRow) -> str:
        text = (f"{len(g.params)} params: {', '.join(g.params)}" if g.prunable
                else f"unprunable: {g.reason}")
        return text if len(text) <= width else text[:width - 3] + "..."

    return _table(["id", "units", "ch/unit", "prunable", "zero", "params / reason"],
                  [[str(g.id), str(g.units), str(g.unit_size), "yes" if g.prunable else "no",
                    str(g.zero_units), what(g)] for g in groups], right={0, 1, 4})


# ------------------------------------------------------------------------------ formatting
def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bytes(x: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:g} B"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _channels(r: LayerRow) -> str:
    if r.out_channels is None or r.kind == "attention":
        return "-"
    total = r.ref_channels if r.ref_channels is not None else r.out_channels
    kept = r.kept_channels if r.kept_channels is not None else r.out_channels
    return f"{kept}/{total}"


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(header), "  " + "  ".join("-" * w for w in widths), *map(fmt, rows)]


# ------------------------------------------------------------------------------ sizes
class _Sizes:
    """Concrete ints for (possibly symbolic) sizes: example inputs first, then hints."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> None:
        self.subs: dict[Any, int] = {}
        self.from_inputs = False
        self.batch: int | None = None
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if example_inputs is not None:
            if isinstance(example_inputs, torch.Tensor):
                example_inputs = (example_inputs,)
            leaves = [x for x in pytree.tree_leaves(example_inputs)]
            tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
            vals = [tensor_val(n) for n in placeholders]
            vals_t = [v for v in vals if v is not None]
            if len(vals_t) != len(tensors):
                raise InputError(f"report: the graph has {len(vals_t)} tensor inputs but "
                                 f"example_inputs has {len(tensors)} tensors")
            for v, x in zip(vals_t, tensors, strict=True):
                if v.dim() != x.dim():
                    raise InputError(f"report: example input of shape {tuple(x.shape)} does "
                                     f"not match graph input of rank {v.dim()}")
                for s, c in zip(v.shape, x.shape, strict=True):
                    if isinstance(s, torch.SymInt):
                        expr = s.node.expr
                        if getattr(expr, "is_Symbol", False):
                            self.subs[expr] = int(c)
                    elif int(s) != int(c):
                        raise InputError(f"report: example input of shape {tuple(x.shape)} "
                                         f"does not match the graph's static size {int(s)}")
            self.from_inputs = True
            if tensors and tensors[0].dim():
                self.batch = int(tensors[0].shape[0])
        if self.batch is None:
            first = next((tensor_val(n) for n in placeholders if tensor_val(n) is not None), None)
            if first is not None and first.dim():
                self.batch = self.int(first.shape[0])

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


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


# ------------------------------------------------------------------------------ graph walks
# Ops that neither compute nor change which tensor a weight/activation operand is.
_TRANSPARENT = {
    "t", "transpose", "permute", "view", "_unsafe_view", "reshape", "expand", "contiguous",
    "clone", "to", "_to_copy", "alias", "detach", "unsqueeze", "squeeze", "flatten",
    "lift_fresh_copy", "type_as",
}
_FLIPS = {"t", "transpose", "permute"}


def _packet(node: torch.fx.Node) -> str:
    """aten op name without namespace/overload (``aten.conv2d.default`` -> ``conv2d``)."""
    target = node.target
    name = getattr(getattr(target, "overloadpacket", None), "__name__", None)
    if name is None:
        name = getattr(target, "__name__", str(target))
    return name.split(".")[-1]


def _quantizer_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        try:
            mod = gm.get_submodule(node.target)  # type: ignore[arg-type]
        except AttributeError:
            return None
        if getattr(mod, "is_geta_quantizer", False):
            return mod
    info = node.meta.get(meta.QUANTIZER)
    if info is not None:
        try:
            mod = gm.get_submodule(info.qid)
        except AttributeError:
            return None
        if getattr(mod, "is_geta_quantizer", False):
            return mod
    return None


def quantizer_bits(q: nn.Module) -> float:
    """Continuous bit width of a quantizer module (``.bit_width()``), as a float."""
    with torch.no_grad():
        b = q.bit_width()
    return float(torch.as_tensor(b).detach().float().reshape(-1)[0])


@dataclass
class _Operand:
    node: Any
    param: str | None = None         # get_attr target reached through transparent ops
    quantizer: nn.Module | None = None
    flips: int = 0


def _trace_operand(gm: torch.fx.GraphModule, arg: Any) -> _Operand:
    """Walk back from an operand through quantizers and view-like ops."""
    op = _Operand(arg)
    node = arg
    for _ in range(32):
        if not isinstance(node, torch.fx.Node):
            return op
        if node.op == "get_attr":
            op.param = str(node.target)
            return op
        q = _quantizer_module(gm, node)
        if q is not None:
            if op.quantizer is None:
                op.quantizer = q
            node = node.args[0] if node.args else None
            continue
        if node.op == "call_function" and _packet(node) in _TRANSPARENT and node.args:
            if _packet(node) in _FLIPS:
                op.flips += 1
            node = node.args[0]
            continue
        return op
    return op


def _bits_of(op: _Operand) -> int:
    return FP_BITS if op.quantizer is None else int(round(quantizer_bits(op.quantizer)))


@dataclass
class _Layer:
    node: torch.fx.Node
    kind: str
    macs: int
    weight: _Operand | None
    act: _Operand | None
    other: _Operand | None = None      # second activation operand (attention)
    extra_macs: int = 0                # sdpa: the AV part (its bits differ)
    value: _Operand | None = None
    w_out_dim: int | None = None        # output-channel dim of the weight parameter
    in_channels: int | None = None
    out_channels: int | None = None


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _conv(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: _Sizes) -> _Layer | None:
    x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
    name = _packet(node)
    transposed = name.startswith("conv_transpose") or (
        name in ("convolution", "_convolution") and bool(_arg(node, 6, "transposed", False)))
    ws, xs, ys = sz.shape(tensor_val(w)), sz.shape(tensor_val(x)), sz.shape(tensor_val(node))
    if ws is None or ys is None or xs is None:
        return None
    per = _numel(ws[1:])  # C_in/groups * prod(k) (C_out/groups * prod(k) transposed)
    macs = _numel(xs) * per if transposed else _numel(ys) * per
    wop = _trace_operand(gm, w)
    return _Layer(node, "conv", macs, wop, _trace_operand(gm, x),
                  w_out_dim=1 if transposed else 0,
                  in_channels=xs[1] if len(xs) > 1 else None,
                  out_channels=ys[1] if len(ys) > 1 else None)


def _linear(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: _Sizes) -> _Layer | None:
    x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
    ws, ys = sz.shape(tensor_val(w)), sz.shape(tensor_val(node))
    if ws is None or ys is None:
        return None
    return _Layer(node, "linear", _numel(ys) * ws[-1], _trace_operand(gm, w),
                  _trace_operand(gm, x), w_out_dim=0, in_channels=ws[-1],
                  out_channels=ys[-1] if ys else None)


def _matmul(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: _Sizes) -> _Layer | None:
    name = _packet(node)
    offset = 1 if name in ("addmm", "baddbmm", "addbmm", "addmv") else 0
    a, b = node.args[offset], node.args[offset + 1]
    as_, ys = sz.shape(tensor_val(a)), sz.shape(tensor_val(node))
    if as_ is None or ys is None:
        return None
    k = as_[-1]
    macs = max(_numel(ys), 1) * k if name != "addbmm" else _numel(ys) * k * as_[0]
    aop, bop = _trace_operand(gm, a), _trace_operand(gm, b)
    if bop.param is None and aop.param is not None:   # weight on the left (x @ W^T as W @ x)
        aop, bop = bop, aop
    if bop.param is not None:
        bshape = sz.shape(tensor_val(b)) or []
        return _Layer(node, "matmul", macs, bop, aop,
                      w_out_dim=0 if bop.flips % 2 else -1, in_channels=k,
                      out_channels=(bshape[-1] if len(bshape) > 1 else None))
    return _Layer(node, "attention", macs, None, aop, other=bop, in_channels=k,
                  out_channels=ys[-1] if ys else None)


def _einsum(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: _Sizes) -> _Layer | None:
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
    macs = _numel(ys) * _numel([sizes[c] for c in contracted])
    aop, bop = _trace_operand(gm, operands[0]), _trace_operand(gm, operands[1])
    if bop.param is None and aop.param is not None:
        aop, bop = bop, aop
    if bop.param is not None:
        return _Layer(node, "matmul", macs, bop, aop)
    return _Layer(node, "attention", macs, None, aop, other=bop)


def _sdpa(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: _Sizes) -> _Layer | None:
    q, k, v = node.args[:3]
    qs, ks, vs = (sz.shape(tensor_val(t)) for t in (q, k, v))
    if qs is None or ks is None or vs is None:
        return None
    s = ks[-2]
    qk = _numel(qs[:-1]) * s * qs[-1]
    av = _numel(qs[:-1]) * s * vs[-1]
    return _Layer(node, "attention", qk, None, _trace_operand(gm, q), other=_trace_operand(gm, k),
                  extra_macs=av, value=_trace_operand(gm, v), in_channels=qs[-1],
                  out_channels=vs[-1])


def _embedding(gm: torch.fx.GraphModule, node: torch.fx.Node, sz: _Sizes) -> _Layer | None:
    w = node.args[0]
    ws = sz.shape(tensor_val(w))
    if ws is None:
        return None
    return _Layer(node, "embedding", 0, _trace_operand(gm, w), None, w_out_dim=1,
                  in_channels=ws[0], out_channels=ws[1] if len(ws) > 1 else None)


_Handler = Callable[[torch.fx.GraphModule, torch.fx.Node, _Sizes], "_Layer | None"]
#: aten op name (overload packet) -> how to count it.  Everything else costs 0 MACs.
LAYER_OPS: dict[str, _Handler] = {
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                     "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), _conv),
    "linear": _linear,
    **dict.fromkeys(("mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm"), _matmul),
    "einsum": _einsum,
    **dict.fromkeys(("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                     "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_cudnn_attention"), _sdpa),
    "embedding": _embedding,
}


def _find_layers(gm: torch.fx.GraphModule, sz: _Sizes) -> list[_Layer]:
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        handler = LAYER_OPS.get(_packet(node))
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
        return _clean_path(str(path))
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def _clean_path(path: str) -> str:
    # Dynamo-style "L['self'].layers[0]" -> "layers.0"; export paths are already FQNs.
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
        path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path


def _bias_numel(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    name = _packet(node)
    idx = {"linear": 2, "conv1d": 2, "conv2d": 2, "conv3d": 2, "convolution": 2,
           "conv_transpose1d": 2, "conv_transpose2d": 2, "conv_transpose3d": 2,
           "addmm": 0}.get(name)
    if idx is None or len(node.args) <= idx:
        return 0
    b = _trace_operand(gm, node.args[idx])
    if b.param is None:
        return 0
    return int(get_attr_tensor(gm, b.param).numel())


def _kept(gm: torch.fx.GraphModule, fqn: str, dim: int | None) -> int | None:
    if dim is None:
        return None
    t = get_attr_tensor(gm, fqn)
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    with torch.no_grad():
        flat = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
        return int((flat != 0).any(1).sum())


# ------------------------------------------------------------------------------ the report
def _unwrap(m: Any, example_inputs: Any) -> tuple[torch.fx.GraphModule, str]:
    from geta_fx.module import GetaModule

    if isinstance(m, GetaModule):
        return m.graph_module, "GetaModule"
    if isinstance(m, torch.fx.GraphModule):
        return m, "GraphModule"
    if isinstance(m, nn.Module):
        if example_inputs is None:
            raise InputError(f"report: a plain {type(m).__name__} needs example_inputs to be "
                             "captured (or pass geta_fx.transform(...)'s result)")
        from geta_fx.capture import capture

        return capture(m, example_inputs).graph_module, type(m).__name__
    raise InputError(f"report: expected a GetaModule, GraphModule or nn.Module, "
                     f"got {type(m).__name__}")


def _quantizers(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    return {name: mod for name, mod in gm.named_modules()
            if getattr(mod, "is_geta_quantizer", False)}


def _weight_quantizer_by_fqn(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """param FQN -> weight quantizer, from the graph and from the modules' ``param_fqn``."""
    out: dict[str, nn.Module] = {}
    for name, mod in _quantizers(gm).items():
        fqn = getattr(mod, "param_fqn", None)
        if getattr(mod, "kind", None) == "weight" and fqn:
            out[str(fqn)] = mod
    for node in gm.graph.nodes:
        mod = _quantizer_module(gm, node)
        if mod is None or getattr(mod, "kind", None) != "weight":
            continue
        info = node.meta.get(meta.QUANTIZER)
        op = _trace_operand(gm, node.args[0] if node.args else None)
        fqn = op.param or (info.param_fqn if info is not None else None)
        if fqn:
            out[fqn] = mod
    return out


def _param_table(gm: torch.fx.GraphModule) -> tuple[dict[str, torch.Tensor], int]:
    """Model parameters by FQN (tied ones once; quantizer scalars excluded) and #quant scalars."""
    quant_prefixes = tuple(f"{n}." for n in _quantizers(gm))
    params: dict[str, torch.Tensor] = {}
    qparams = 0
    for name, p in gm.named_parameters():
        if quant_prefixes and name.startswith(quant_prefixes):
            qparams += p.numel()
        else:
            params[name] = p
    return params, qparams


def _group_rows(gm: torch.fx.GraphModule) -> list[GroupRow] | None:
    groups = meta.get_groups(gm)
    if meta.GROUPS not in gm.meta:
        return None
    from geta_fx.ir.units import zero_mask

    rows = []
    for g in groups:
        zero = int(zero_mask(gm, g).sum()) if g.prunable and g.num_units else 0
        rows.append(GroupRow(g.id, g.num_units, g.unit_size, g.prunable, zero, g.reason,
                             tuple(sorted({m.fqn for m in g.members if m.is_param}))))
    return rows


def report(m: Any, example_inputs: Any = None, *, reference: Any = None,
           compressed: bool = False) -> Report:
    """Cost report of a model (see the module docstring for every definition).

    Args:
        m: a GetaModule, a (slim or transformed) GraphModule, or a plain nn.Module (captured
            with ``example_inputs``).
        example_inputs: inputs fixing symbolic sizes (batch, sequence); default: the sizes the
            graph was captured with.
        reference: the model whose FP32 (32 x 32 bit) cost is the denominator of the relative
            numbers, e.g. the GetaModule a slim graph came from; default: ``m`` itself.
        compressed: with a GetaModule, report ``m.compress()`` against ``m`` (what the slim
            model would cost now).
    """
    from geta_fx.module import GetaModule

    if compressed:
        if not isinstance(m, GetaModule):
            raise InputError("report(compressed=True) needs a GetaModule")
        slim = report(m.compress(), example_inputs, reference=m)
        slim.model = "GetaModule.compress()"
        return slim
    gm, kind = _unwrap(m, example_inputs)
    sz = _Sizes(gm, example_inputs)
    notes: list[str] = []

    layers = _find_layers(gm, sz)
    params, qparams = _param_table(gm)
    wq = _weight_quantizer_by_fqn(gm)

    ref_gm = None
    ref_channels: dict[str, int] = {}
    if reference is not None:
        ref_gm, ref_kind = _unwrap(reference, example_inputs)
        ref_sz = _Sizes(ref_gm, example_inputs)
        ref_layers = _find_layers(ref_gm, ref_sz)
        for lay in ref_layers:
            if lay.weight is not None and lay.weight.param and lay.w_out_dim is not None:
                t = get_attr_tensor(ref_gm, lay.weight.param)
                ref_channels[lay.weight.param] = int(t.shape[lay.w_out_dim])
        ref_params, _ = _param_table(ref_gm)
        fp32_macs = sum(lay.macs + lay.extra_macs for lay in ref_layers)
        fp32_params = sum(p.numel() for p in ref_params.values())
        ref_name = f"the reference {ref_kind}"
    else:
        fp32_macs = sum(lay.macs + lay.extra_macs for lay in layers)
        fp32_params = sum(p.numel() for p in params.values())
        ref_name = "the same graph"

    rows: list[LayerRow] = []
    macs_w = macs_a = bops = bops_a = 0
    for lay in layers:
        wfqn = lay.weight.param if lay.weight is not None else None
        if lay.weight is not None:  # the graph path decides (a tied weight may be read
            w_bits = _bits_of(lay.weight)  # quantized by one layer and float by another)
        else:
            w_bits = _bits_of(lay.other) if lay.other is not None else FP_BITS
        a_bits = _bits_of(lay.act) if lay.act is not None else FP_BITS
        layer_bops = lay.macs * w_bits * a_bits
        if lay.value is not None:  # sdpa: softmax(QK^T) (unquantized) @ V
            layer_bops += lay.extra_macs * FP_BITS * _bits_of(lay.value)
        total_macs = lay.macs + lay.extra_macs
        if lay.weight is None:
            macs_a += total_macs
            bops_a += layer_bops
        else:
            macs_w += total_macs
        bops += layer_bops
        n_params = 0
        kept = None
        if wfqn is not None:
            w = get_attr_tensor(gm, wfqn)
            n_params = int(w.numel()) + _bias_numel(gm, lay.node)
            kept = _kept(gm, wfqn, lay.w_out_dim)
        rows.append(LayerRow(
            name=lay.node.name, module=module_path(lay.node), op=_packet(lay.node),
            kind=lay.kind, weight=wfqn, in_channels=lay.in_channels,
            out_channels=lay.out_channels, kept_channels=kept,
            ref_channels=ref_channels.get(wfqn) if wfqn else None, params=n_params,
            macs=total_macs, w_bits=w_bits, a_bits=a_bits, bops=layer_bops))

    # storage: model params at learned bits, unquantized at dtype width; quant scalars 32-bit
    bits_total = 0.0
    wq_by_tensor = {id(get_attr_tensor(gm, fqn)): q for fqn, q in wq.items()}
    for p in params.values():
        q = wq_by_tensor.get(id(p))  # by tensor: tied weights have several FQNs
        b = round(quantizer_bits(q)) if q is not None else p.element_size() * 8
        bits_total += p.numel() * b
    n_params = sum(p.numel() for p in params.values())
    quant_bytes = qparams * FP_BITS / 8
    consumers: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if _quantizer_module(gm, node) is not None:
            consumers.setdefault(str(node.target), []).extend(u.name for u in node.users)
    qrows = []
    for name, q in _quantizers(gm).items():
        bits = quantizer_bits(q)
        target = getattr(q, "param_fqn", None) or ", ".join(consumers.get(name, [])) or None
        qrows.append(QuantRow(name, str(getattr(q, "kind", "?")), target, bits,
                              int(round(bits))))

    group_rows = _group_rows(gm)
    sparsity_from = None
    if group_rows is None and ref_gm is not None:
        group_rows = _group_rows(ref_gm)
        sparsity_from = "zero units of the reference"
    if group_rows is not None:
        prunable_units = sum(g.units for g in group_rows if g.prunable)
        zero_units = sum(g.zero_units for g in group_rows if g.prunable)
        sparsity = zero_units / prunable_units if prunable_units else 0.0
    else:
        prunable_units = zero_units = None
        sparsity = None
    if macs_a:
        notes.append("activation x activation matmuls (attention) are counted in MACs/BOPs "
                     f"at {FP_BITS} bits unless their inputs are quantized")
    return Report(
        model=kind, batch=sz.batch,
        shapes_from="example inputs" if sz.from_inputs else "capture-time sizes",
        reference=ref_name, params=n_params, quantizer_params=qparams,
        macs=macs_w + macs_a, macs_weight_layers=macs_w, macs_act_matmuls=macs_a,
        bops=bops, bops_act_matmuls=bops_a, fp32_macs=fp32_macs,
        fp32_bops=fp32_macs * FP_BITS * FP_BITS,
        weight_bytes=bits_total / 8 + quant_bytes, quantizer_bytes=quant_bytes,
        fp32_weight_bytes=fp32_params * FP_BITS // 8,
        avg_weight_bits=bits_total / n_params if n_params else None,
        group_sparsity=sparsity, zero_units=zero_units, prunable_units=prunable_units,
        sparsity_from=sparsity_from, layers=rows, groups=group_rows or [], quantizers=qrows,
        notes=notes)
