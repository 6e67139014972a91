"""The channel rule table: ATen OpOverload -> how channel atoms flow through it.

This is the only op table of dependency grouping.  Each rule is a function
``rule(an, node) -> Label | list[Label | None] | None`` receiving the analyzer
(``passes/dependency_groups.py``), which offers: ``an.label(x)``, ``an.shape(x)``,
``an.fresh(n, node)``, ``an.unify(a, b)``, ``an.pin(label, node, reason)``,
``an.param(x)``, ``an.label_param(...)``, ``an.external(...)`` and
``an.from_grid(...)``.  Ops missing from the table pin every channel they touch
(unprunable with a reason): geta_fx is conservative, never wrong.

Rule kinds (DESIGN §4): stems open a channel space (conv, linear, matmul/addmm
with a parameter, embedding); pass-through ops keep it (activations, norms,
pooling, dropout, quantizers); joint ops unify (add/mul/... with broadcasting,
matmul between activations, attention); index-moving ops carry it (cat, split,
slice, view/reshape, permute); ops that reduce over a channel dimension pin it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from geta_fx.ir.channels import Label, concrete, reshape_groups

aten = torch.ops.aten
Rule = Callable[[Any, torch.fx.Node], Any]
RULES: dict[Any, Rule] = {}


def _register(*ops: Any) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for op in ops:
            packet = getattr(aten, op.split(".")[0], None) if isinstance(op, str) else None
            if isinstance(op, str):
                name, _, overload = op.partition(".")
                if packet is None:
                    continue
                target = getattr(packet, overload or "default", None)
                if target is None:
                    continue
                RULES[target] = fn
            else:
                RULES[op] = fn
        return fn
    return deco


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# --------------------------------------------------------------------------- pass-through

ZERO_PRESERVING = [
    "relu", "relu_", "gelu", "silu", "silu_", "tanh", "hardtanh", "hardtanh_", "leaky_relu",
    "elu", "selu", "celu", "mish", "hardswish", "neg", "abs", "sign", "sin", "erf", "sqrt",
    "square", "relu6", "gelu_", "clone", "contiguous", "alias", "detach", "lift_fresh_copy",
    "_to_copy", "to.dtype", "to.dtype_layout", "to.device", "to.other", "type_as", "dropout",
    "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "trunc", "round", "floor_divide",
    "sgn", "atan", "asin", "sinh", "tan", "expm1", "log1p", "fill_", "zero_",
]
NOT_ZERO_PRESERVING = [
    "sigmoid", "exp", "cos", "log", "rsqrt", "reciprocal", "hardsigmoid", "softplus",
    "logical_not", "cosh", "erfc", "log_sigmoid", "bitwise_not", "acos", "ceil", "floor",
    "isnan", "isinf", "ones_like", "full_like", "rand_like", "randn_like",
]


@_register(*ZERO_PRESERVING)
def _unary_zero(an: Any, node: torch.fx.Node) -> Label | None:
    return an.label(node.args[0])


@_register(*NOT_ZERO_PRESERVING)
def _unary_nonzero(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    return lab.moved(lab.dim, ok=False) if lab else None


@_register("native_dropout")
def _native_dropout(an: Any, node: torch.fx.Node) -> list[Label | None]:
    lab = an.label(node.args[0])
    return [lab, lab.moved(lab.dim, ok=False) if lab else None]


@_register("zeros_like", "empty_like")
def _zeros_like(an: Any, node: torch.fx.Node) -> Label | None:
    return an.label(node.args[0])


# --------------------------------------------------------------------------- elementwise

ADD, MUL, DIV, MAX, CMP = "add", "mul", "div", "max", "cmp"
ELEMENTWISE = {
    "add.Tensor": ADD, "add_.Tensor": ADD, "sub.Tensor": ADD, "sub_.Tensor": ADD,
    "add.Scalar": ADD, "sub.Scalar": ADD, "rsub.Scalar": ADD, "rsub.Tensor": ADD,
    "mul.Tensor": MUL, "mul_.Tensor": MUL, "mul.Scalar": MUL, "mul_.Scalar": MUL,
    "div.Tensor": DIV, "div.Scalar": DIV, "div.Tensor_mode": DIV, "div_.Tensor": DIV,
    "true_divide.Tensor": DIV,
    "maximum.default": MAX, "minimum.default": MAX, "where.self": MAX,
    "where.ScalarOther": MAX, "where.ScalarSelf": MAX, "where.Scalar": MAX,
    "eq.Tensor": CMP, "ne.Tensor": CMP, "gt.Tensor": CMP, "lt.Tensor": CMP, "ge.Tensor": CMP,
    "le.Tensor": CMP, "eq.Scalar": CMP, "ne.Scalar": CMP, "gt.Scalar": CMP, "lt.Scalar": CMP,
    "ge.Scalar": CMP, "le.Scalar": CMP, "logical_and.default": CMP, "logical_or.default": CMP,
    "bitwise_and.Tensor": CMP, "bitwise_or.Tensor": CMP,
}


_WHERE = {getattr(aten.where, o) for o in ("self", "ScalarOther", "ScalarSelf", "Scalar")
          if hasattr(aten.where, o)}


def _elementwise(kind: str) -> Rule:
    def rule(an: Any, node: torch.fx.Node) -> Label | None:
        out_shape = an.shape(node)
        if out_shape is None:
            return an.pin_inputs(node, "elementwise op with non-tensor output")
        nd = len(out_shape)
        operands = [(i, a) for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node)]
        labels: list[tuple[int, Any, Label]] = []
        for i, a in operands:
            lab = an.label(a)
            if lab is not None:
                labels.append((i, a, lab.moved(lab.dim + nd - len(an.shape(a)))))
        if not labels:
            return None
        dims = {lab.dim for _, _, lab in labels}
        if len(dims) > 1:
            return an.pin_inputs(node, f"{node.target}: operands carry channels on different dims")
        (dim,) = dims
        size = concrete(out_shape[dim])
        full = [lab for _, _, lab in labels if len(lab.atoms) == size]
        if not full:  # only broadcast (size-1) labeled operands: channels are replicated
            return an.pin_inputs(node, f"{node.target}: channel dim is broadcast")
        atoms = full[0].atoms
        for lab in full[1:]:
            an.unify(atoms, lab.atoms)
        for _, _, lab in labels:
            if len(lab.atoms) != size:
                an.pin(lab, node, f"{node.target}: size-1 channel dim broadcast")
        ok_labeled = [lab.ok for lab in full]
        scalar_nonzero = any(not isinstance(a, torch.fx.Node) and a not in (0, 0.0, None)
                             and not isinstance(a, bool) for a in node.args)
        extra_nonzero = False
        labeled_idx = {i for i, _, _ in labels}
        for i, a in operands:
            if i in labeled_idx:
                continue
            shp = an.shape(a)
            if shp is None:
                continue
            od = dim - (nd - len(shp))
            if od < 0 or concrete(shp[od]) == 1:
                extra_nonzero = True
                continue
            src = an.param(a)
            if src is not None:
                fqn, perm, trainable = src
                role = "out" if kind in (ADD, MUL) and trainable else "in"
                an.label_param(fqn, perm[od], atoms, role)
                if role == "in":
                    extra_nonzero = True
            else:
                an.external(node, i, od)
                extra_nonzero = True
        if kind == ADD:
            ok = all(ok_labeled) and not extra_nonzero and not scalar_nonzero
        elif kind == MUL:
            ok = any(ok_labeled)
        elif kind == DIV:
            ok = 0 in labeled_idx and full[0].ok and len(full) == 1 and labels[0][0] == 0
        elif kind == MAX:
            ok = all(ok_labeled) and not extra_nonzero and not scalar_nonzero
            if node.target in _WHERE:  # the condition's zeros select, they are not values
                ok = (all(lab.ok for i, _, lab in labels if i != 0) and not extra_nonzero
                      and not scalar_nonzero)
        else:
            ok = False
        return Label(dim, atoms, ok)
    return rule


for _op, _kind in ELEMENTWISE.items():
    _register(_op)(_elementwise(_kind))


@_register("pow.Tensor_Scalar")
def _pow(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    e = node.args[1]
    return lab.moved(lab.dim, ok=lab.ok and isinstance(e, (int, float)) and e > 0)


@_register("clamp.default", "clamp_min.default", "clamp_max.default", "clip.default")
def _clamp(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    lo = _arg(node, 1, "min")
    hi = _arg(node, 2, "max")
    if node.target is aten.clamp_max.default:
        lo, hi = None, node.args[1]
    ok = lab.ok and (lo is None or (not isinstance(lo, torch.fx.Node) and lo <= 0)) and (
        hi is None or (not isinstance(hi, torch.fx.Node) and hi >= 0))
    return lab.moved(lab.dim, ok=ok)


@_register("masked_fill.Scalar")
def _masked_fill(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    mask = an.label(node.args[1])
    if mask is not None:
        return an.pin_inputs(node, "masked_fill with a channel-carrying mask")
    if lab is None:
        return None
    return lab.moved(lab.dim, ok=lab.ok and node.args[2] == 0)


# --------------------------------------------------------------------------- stems

def _bias(an: Any, b: Any, atoms: np.ndarray) -> None:
    if isinstance(b, torch.fx.Node):
        src = an.param(b)
        if src is None:
            an.external_bias(b)
        else:
            an.label_param(src[0], src[1][0], atoms, "out")


def _consume(an: Any, node: torch.fx.Node, lab: Label | None, src: Any, wdim: int) -> None:
    """The stem's input channel dimension reads ``lab``: weight dim ``wdim`` is sliced."""
    if lab is None:
        an.reads_fixed_channels(src[0], src[1][wdim], node)
        return
    if not lab.ok:
        an.pin(lab, node, f"{node.target}: input channels are not zero when pruned "
                          "(a non-zero-preserving op precedes this layer)")
    an.label_param(src[0], src[1][wdim], lab.atoms, "in")


def _stem_out(an: Any, node: torch.fx.Node, src: Any, wdim: int, n: int) -> np.ndarray:
    existing = an.param_atoms(src[0], src[1][wdim])
    atoms = an.fresh(n, node)
    if existing is not None:
        an.unify(atoms, existing)
    an.label_param(src[0], src[1][wdim], atoms, "out")
    return atoms


@_register("linear")
def _linear(an: Any, node: torch.fx.Node) -> Label | None:
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias")
    src = an.param(w)
    lab = an.label(x)
    if src is None:
        return an.pin_inputs(node, "linear with a computed (non-parameter) weight")
    nd = len(an.shape(x))
    if lab is not None and lab.dim != nd - 1:
        an.pin(lab, node, "linear applied along a channel-carrying dimension's neighbour")
        lab = None
    _consume(an, node, lab, src, 1)
    atoms = _stem_out(an, node, src, 0, concrete(an.shape(w)[0]))
    _bias(an, b, atoms)
    return Label(len(an.shape(node)) - 1, atoms)


@_register("matmul", "mm", "bmm")
def _matmul(an: Any, node: torch.fx.Node) -> Label | None:
    a, b = node.args[0], node.args[1]
    sa, sb = an.shape(a), an.shape(b)
    la, lb = an.label(a), an.label(b)
    pb, pa = an.param(b), an.param(a)
    if pb is not None and len(sb) == 2:  # x @ W  (W: [K, N])
        if la is not None and la.dim != len(sa) - 1:
            an.pin(la, node, "matmul with a parameter along a non-contracted channel dim")
            la = None
        _consume(an, node, la, pb, 0)
        atoms = _stem_out(an, node, pb, 1, concrete(sb[1]))
        return Label(len(an.shape(node)) - 1, atoms)
    if pa is not None:
        return an.pin_inputs(node, "matmul with a parameter on the left")
    if len(sa) < 2 or len(sb) < 2:
        return an.pin_inputs(node, "matmul with a 1-D operand")
    out_nd = len(an.shape(node))
    out: list[tuple[int, np.ndarray, bool]] = []
    contract: list[Label] = []
    for lab, shp, which in ((la, sa, "a"), (lb, sb, "b")):
        if lab is None:
            continue
        nd = len(shp)
        if (which == "a" and lab.dim == nd - 1) or (which == "b" and lab.dim == nd - 2):
            contract.append(lab)
        elif which == "a" and lab.dim == nd - 2:
            out.append((out_nd - 2, lab.atoms, lab.ok))
        elif which == "b" and lab.dim == nd - 1:
            out.append((out_nd - 1, lab.atoms, lab.ok))
        else:  # batch dim
            out.append((lab.dim + out_nd - nd, lab.atoms, lab.ok))
    if contract:
        if len(contract) == 2:
            an.unify(contract[0].atoms, contract[1].atoms)
            if not (contract[0].ok or contract[1].ok):
                an.pin(contract[0], node, "matmul contracts a channel dim that is not zero")
        else:
            other = b if contract[0] is la else a
            if not contract[0].ok:
                an.pin(contract[0], node, "matmul contracts a channel dim that is not zero")
            idx = 1 if other is b else 0
            od = len(sb) - 2 if other is b else len(sa) - 1
            an.external(node, idx, od, source=a if contract[0] is la else b)
    dims = {d for d, _, _ in out}
    if len(dims) > 1:
        for _, atoms, _ in out:
            an.pin(atoms, node, "matmul output would carry channels on two dims")
        return None
    if not out:
        return None
    atoms = out[0][1]
    for _, other_atoms, _ in out[1:]:
        an.unify(atoms, other_atoms)
    return Label(out[0][0], atoms, any(ok for _, _, ok in out))


@_register("addmm")
def _addmm(an: Any, node: torch.fx.Node) -> Label | None:
    bias, x, w = node.args[:3]
    src = an.param(w)
    if src is None:
        return an.pin_inputs(node, "addmm with a computed weight")
    lab = an.label(x)
    if lab is not None and lab.dim != 1:
        an.pin(lab, node, "addmm along a non-contracted channel dim")
        lab = None
    _consume(an, node, lab, src, 0)
    atoms = _stem_out(an, node, src, 1, concrete(an.shape(w)[1]))
    _bias(an, bias, atoms)
    return Label(1, atoms)


@_register("embedding")
def _embedding(an: Any, node: torch.fx.Node) -> Label | None:
    w = node.args[0]
    src = an.param(w)
    if src is None:
        return an.pin_inputs(node, "embedding with a computed table")
    atoms = _stem_out(an, node, src, 1, concrete(an.shape(w)[1]))
    return Label(len(an.shape(node)) - 1, atoms)


def _conv_args(node: torch.fx.Node) -> tuple[Any, Any, Any, bool, int, int]:
    """(x, w, b, transposed, groups, groups_arg_index)."""
    t = node.target
    if t is aten.convolution.default:
        return node.args[0], node.args[1], node.args[2], bool(node.args[6]), node.args[8], 8
    transposed = "transpose" in str(t)
    gi = 6
    return (node.args[0], node.args[1], _arg(node, 2, "bias"), transposed,
            _arg(node, gi, "groups", 1), gi)


@_register("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding",
           "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input",
           "convolution")
def _conv(an: Any, node: torch.fx.Node) -> Label | None:
    x, w, b, transposed, groups, _ = _conv_args(node)
    src = an.param(w)
    if src is None:
        return an.pin_inputs(node, "convolution with a computed weight")
    sx, sw = an.shape(x), an.shape(w)
    cdim = 1 if len(sx) == len(sw) else 0
    lab = an.label(x)
    if lab is not None and lab.dim != cdim:
        an.pin(lab, node, "convolution over a channel-carrying spatial dim")
        lab = None
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    cin = concrete(sx[cdim])
    cout = concrete(an.shape(node)[cdim])
    if groups == 1:
        _consume(an, node, lab, src, in_dim)
        atoms = _stem_out(an, node, src, out_dim, cout)
        _bias(an, b, atoms)
        return Label(cdim, atoms)
    if transposed:
        return an.pin_inputs(node, "grouped transposed convolution")
    # Grouped / depthwise: a unit is a whole convolution group (input block + output block).
    in_atoms = lab.atoms if lab is not None else np.zeros(cin, dtype=np.int64)
    atoms = _stem_out(an, node, src, out_dim, cout)
    ib = in_atoms.reshape(groups, cin // groups)
    ob = atoms.reshape(groups, cout // groups)
    an.unify(ib, ib[:, :1])
    an.unify(ob, ob[:, :1])
    an.unify(ib[:, :1], ob[:, :1])
    _bias(an, b, atoms)
    return Label(cdim, atoms)


# --------------------------------------------------------------------------- norms

def _channel_norm(an: Any, node: torch.fx.Node, x: Any, w: Any, b: Any,
                  buffers: tuple[Any, ...], stats_ok: bool) -> Label | None:
    lab = an.label(x)
    if lab is None:
        return None
    if lab.dim != 1:
        an.pin(lab, node, f"{node.target}: channels on a normalised (non-channel) dim")
        return None
    for p in (w, b):
        _bias(an, p, lab.atoms)
    for buf in buffers:
        if isinstance(buf, torch.fx.Node):
            src = an.param(buf)
            if src is not None:
                an.label_param(src[0], src[1][0], lab.atoms, "in")
    ok = lab.ok and (stats_ok or (isinstance(w, torch.fx.Node) and isinstance(b, torch.fx.Node))
                     or (b is None and stats_ok))
    if b is None and not stats_ok:
        ok = False
    return lab.moved(1, ok=ok)


@_register("batch_norm")
def _batch_norm(an: Any, node: torch.fx.Node) -> Label | None:
    x, w, b, rm, rv = node.args[:5]
    training = node.args[5]
    # (x - mean) / std * w + b: zero iff w, b are zero or (no affine and batch stats of 0).
    ok_without_affine = bool(training) and b is None
    lab = _channel_norm(an, node, x, w, b, (rm, rv), stats_ok=ok_without_affine)
    if lab is not None and not isinstance(b, torch.fx.Node) and not training:
        lab = lab.moved(1, ok=False)
    return lab


@_register("_native_batch_norm_legit_no_training")
def _bn_no_training(an: Any, node: torch.fx.Node) -> list[Label | None]:
    x, w, b, rm, rv = node.args[:5]
    lab = _channel_norm(an, node, x, w, b, (rm, rv), stats_ok=False)
    return [lab, None, None]


@_register("instance_norm")
def _instance_norm(an: Any, node: torch.fx.Node) -> Label | None:
    x, w, b, rm, rv, use_input_stats = node.args[:6]
    return _channel_norm(an, node, x, w, b, (rm, rv), stats_ok=bool(use_input_stats))


@_register("group_norm")
def _group_norm(an: Any, node: torch.fx.Node) -> Label | None:
    x, groups = node.args[0], node.args[1]
    w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    lab = an.label(x)
    if lab is None:
        return None
    if lab.dim != 1:
        an.pin(lab, node, "group_norm over channel-carrying spatial dims")
        return None
    blocks = lab.atoms.reshape(groups, -1)
    an.unify(blocks, blocks[:, :1])  # a unit is a whole normalisation group
    return _channel_norm(an, node, x, w, b, (), stats_ok=True)


@_register("layer_norm", "rms_norm")
def _layer_norm(an: Any, node: torch.fx.Node) -> Label | None:
    """Norms over the channel dim stay exact if the statistics keep the original count.

    Zeroed channels add 0 to sum(x) and sum(x^2); physical_prune rewrites the norm to
    divide by the original channel count (and adds the removed zeros' share of the
    variance), so hidden sizes behind LayerNorm/RMSNorm are prunable (DESIGN §4).
    """
    x, shape = node.args[0], node.args[1]
    lab = an.label(x)
    if lab is None:
        return None
    nd = len(an.shape(x))
    is_ln = node.target is aten.layer_norm.default
    w = _arg(node, 2, "weight")
    b = _arg(node, 3, "bias") if is_ln else None
    if lab.dim >= nd - len(shape):
        why = ("over several dims" if len(shape) != 1 else
               "whose input is not zero for pruned channels" if not lab.ok else
               "without an affine weight" if not isinstance(w, torch.fx.Node) else None)
        if why:
            an.pin(lab, node, f"{node.target}: normalises over the channel dim {why}")
            return None
        _bias(an, w, lab.atoms)
        _bias(an, b, lab.atoms)
        return lab  # zeroed unit: (0 - mean) / std * 0 + 0 = 0
    return lab.moved(lab.dim, ok=lab.ok and b is None)


# --------------------------------------------------------------------------- reductions

_SUM_LIKE = {"sum.dim_IntList", "sum.default", "linalg_vector_norm.default", "norm.ScalarOpt_dim"}
_ZERO_KEEPING = {"mean.dim", "mean.default", "amax.default", "amin.default", "max.dim",
                 "min.dim", "var.correction", "var.dim", "std.correction", "std.dim",
                 "prod.dim_int", "logsumexp.default", "argmax.default", "argmin.default",
                 "var_mean.correction", "max.default", "min.default", "any.dim", "all.dim"}


def _reduce_dims(node: torch.fx.Node, nd: int) -> tuple[list[int], bool]:
    name = node.target.__name__ if hasattr(node.target, "__name__") else str(node.target)
    args = node.args
    if name in ("sum.default", "mean.default", "max.default", "min.default"):
        return list(range(nd)), False
    if name == "linalg_vector_norm.default":
        dims, keep = _arg(node, 2, "dim"), _arg(node, 3, "keepdim", False)
    elif name in ("var.correction", "std.correction", "var_mean.correction"):
        dims, keep = _arg(node, 1, "dim"), node.kwargs.get("keepdim", False)
    elif name in ("max.dim", "min.dim", "prod.dim_int", "argmax.default", "argmin.default",
                  "any.dim", "all.dim"):
        dims, keep = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
    else:
        dims, keep = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
    if dims is None or dims == []:
        dims = list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(_norm_dim(d, nd) for d in dims), bool(keep)


def _reduction(sum_like: bool) -> Rule:
    def rule(an: Any, node: torch.fx.Node) -> Any:
        lab = an.label(node.args[0])
        multi = isinstance(node.meta.get("val"), (tuple, list))
        if lab is None:
            return [None, None] if multi else None
        nd = len(an.shape(node.args[0]))
        dims, keep = _reduce_dims(node, nd)
        if lab.dim in dims:
            # sum: zeroed channels add 0.  mean: physical_prune divides by the original
            # count (static sizes only).  Anything else over channels is pinned.
            rescalable = node.target is aten.mean.dim and all(
                concrete(an.shape(node.args[0])[d]) is not None for d in dims)
            if not ((sum_like or rescalable) and lab.ok):
                an.pin(lab, node, f"{node.target}: reduces over the channel dim")
            return [None, None] if multi else None
        new_dim = lab.dim if keep else lab.dim - sum(d < lab.dim for d in dims)
        out = lab.moved(new_dim, ok=lab.ok and "logsumexp" not in str(node.target))
        return [out, out] if multi else out
    return rule


_register(*_SUM_LIKE)(_reduction(True))
_register(*_ZERO_KEEPING)(_reduction(False))


@_register("softmax.int", "_softmax", "log_softmax.int", "_log_softmax", "cumsum")
def _softmax(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    if _norm_dim(node.args[1], len(an.shape(node.args[0]))) == lab.dim:
        an.pin(lab, node, f"{node.target}: normalises over the channel dim")
        return None
    return lab.moved(lab.dim, ok=lab.ok and "cumsum" in str(node.target))


# --------------------------------------------------------------------------- spatial ops

@_register("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
           "_adaptive_avg_pool2d", "upsample_nearest1d.vec", "upsample_nearest2d.vec",
           "upsample_bilinear2d.vec", "upsample_nearest3d.vec", "upsample_linear1d.vec",
           "upsample_bicubic2d.vec", "max_pool2d_with_indices", "adaptive_max_pool2d",
           "constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d", "im2col")
def _spatial(an: Any, node: torch.fx.Node) -> Any:
    lab = an.label(node.args[0])
    multi = isinstance(node.meta.get("val"), (tuple, list))
    if lab is None:
        return [None, None] if multi else None
    x_nd = len(an.shape(node.args[0]))
    out_nd = len(an.shape(node)) if not multi else x_nd
    spatial_from = x_nd - (len(node.args[1]) // 2 if "pad" in str(node.target) else 0) \
        if "pad" in str(node.target) else None
    if "pad" in str(node.target):
        if lab.dim >= spatial_from:
            an.pin(lab, node, f"{node.target}: pads a channel dim")
            return None
        value = _arg(node, 2, "value", 0) if "constant" in str(node.target) else 0
        return lab.moved(lab.dim, ok=lab.ok and value in (0, 0.0, None))
    if "im2col" in str(node.target):
        return an.pin_inputs(node, "im2col mixes channels")
    cdim = 1 if x_nd >= 3 and out_nd == x_nd else 0
    if lab.dim != cdim and not (x_nd == 3 and lab.dim == 1):
        an.pin(lab, node, f"{node.target}: pools over a channel-carrying dim")
        return [None, None] if multi else None
    return [lab, lab] if multi else lab


@_register("pixel_shuffle")
def _pixel_shuffle(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    if lab.dim != nd - 3:
        an.pin(lab, node, "pixel_shuffle over a channel-carrying spatial dim")
        return None
    r2 = node.args[1] ** 2
    blocks = lab.atoms.reshape(-1, r2)
    an.unify(blocks, blocks[:, :1])
    return Label(lab.dim, blocks[:, 0].copy(), lab.ok)


@_register("pixel_unshuffle")
def _pixel_unshuffle(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    if lab.dim != len(an.shape(node.args[0])) - 3:
        an.pin(lab, node, "pixel_unshuffle over a channel-carrying spatial dim")
        return None
    return Label(lab.dim, np.repeat(lab.atoms, node.args[1] ** 2), lab.ok)


# --------------------------------------------------------------------------- shape ops

@_register("view", "_unsafe_view", "reshape", "view_as", "reshape_as", "flatten.using_ints",
           "unflatten.int", "squeeze.dim", "squeeze.dims", "squeeze.default", "unsqueeze",
           "expand", "expand_as", "expand_copy", "view_copy", "alias_copy")
def _reshape(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    a = an.shape(node.args[0])
    b = an.shape(node)
    if "expand" in str(node.target):
        shift = len(b) - len(a)
        d = lab.dim + shift
        if concrete(b[d]) != len(lab.atoms):  # size-1 channel dim expanded
            return Label(d, np.repeat(lab.atoms, concrete(b[d])), lab.ok)
        return lab.moved(d)
    groups = reshape_groups(a, b)
    if groups is None:
        return an.pin_inputs(node, f"{node.target}: cannot match reshape dims")
    for gi, gj in groups:
        if lab.dim not in gi:
            continue
        if gi == [lab.dim] and len(gj) == 1 and (a[gi[0]] - b[gj[0]]) == 0:
            return lab.moved(gj[0])
        sizes_in = [concrete(a[i]) for i in gi]
        sizes_out = [concrete(b[j]) for j in gj]
        if None in sizes_in or None in sizes_out or not gj:
            an.pin(lab, node, f"{node.target}: reshape mixes the channel dim with a dynamic dim")
            return None
        shape = [1] * len(gi)
        shape[gi.index(lab.dim)] = len(lab.atoms)
        grid = np.broadcast_to(lab.atoms.reshape(shape), sizes_in).reshape(sizes_out)
        return an.from_grid(grid, gj, lab.ok)
    return an.pin_inputs(node, f"{node.target}: lost track of the channel dim")


@_register("permute", "permute_copy")
def _permute(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    perm = [_norm_dim(d, nd) for d in node.args[1]]
    return lab.moved(perm.index(lab.dim))


@_register("transpose.int", "transpose_copy.int", "swapaxes", "t", "numpy_T", "movedim.int")
def _transpose(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    if node.target in (aten.t.default,):
        d0, d1 = 0, 1
    elif node.target is aten.movedim.int:
        src, dst = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
        order = [d for d in range(nd) if d != src]
        order.insert(dst, src)
        return lab.moved(order.index(lab.dim))
    else:
        d0, d1 = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
    return lab.moved({d0: d1, d1: d0}.get(lab.dim, lab.dim))


@_register("repeat")
def _repeat(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    reps = list(node.args[1])
    nd_in = len(an.shape(node.args[0]))
    d = lab.dim + len(reps) - nd_in
    return Label(d, np.tile(lab.atoms, reps[d]), lab.ok)


@_register("slice.Tensor", "narrow", "slice_copy.Tensor")
def _slice(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    dim = _norm_dim(_arg(node, 1, "dim", 0), nd)
    if dim != lab.dim:
        return lab
    n = len(lab.atoms)
    if node.target is aten.narrow.default:
        start, length = node.args[2], node.args[3]
        sl = slice(start, start + length, 1)
    else:
        sl = slice(_arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1))
    if any(isinstance(v, torch.fx.Node) for v in (sl.start, sl.stop, sl.step)):
        return an.pin_inputs(node, "slice of the channel dim with dynamic bounds")
    idx = range(n)[slice(sl.start, None if sl.stop is not None and sl.stop > n else sl.stop,
                         sl.step)]
    if idx.step != 1:
        return an.pin_inputs(node, "strided slice of the channel dim")
    return Label(lab.dim, lab.atoms[idx.start: idx.stop], lab.ok)


@_register("select.int", "select_copy.int")
def _select(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    dim = _norm_dim(node.args[1], nd)
    if dim == lab.dim:
        an.pin(lab.atoms[node.args[2]: node.args[2] + 1 or None], node,
               "select picks one channel")
        return None
    return lab.moved(lab.dim - (dim < lab.dim))


@_register("index_select", "gather", "index.Tensor", "take_along_dim")
def _index(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    nd = len(an.shape(node.args[0]))
    if node.target is aten.index.Tensor:
        idx = node.args[1]
        touched = [i for i, t in enumerate(idx) if t is not None]
        if lab.dim in touched or len(touched) != 1 or lab.dim < touched[0]:
            return an.pin_inputs(node, "advanced indexing touches the channel dim")
        idx_nd = len(an.shape(idx[touched[0]]))
        return lab.moved(lab.dim + idx_nd - 1)
    dim = _norm_dim(node.args[1], nd)
    if dim == lab.dim:
        return an.pin_inputs(node, f"{node.target}: gathers along the channel dim")
    return lab


@_register("split.Tensor", "split_with_sizes", "chunk", "unbind.int", "tensor_split.sections",
           "split_with_sizes_copy", "unsafe_split.Tensor")
def _split(an: Any, node: torch.fx.Node) -> list[Label | None] | None:
    outs = node.meta.get("val")
    lab = an.label(node.args[0])
    if not isinstance(outs, (list, tuple)):
        return an.pin_inputs(node, "split with unknown outputs")
    if lab is None:
        return [None] * len(outs)
    nd = len(an.shape(node.args[0]))
    default_dim = 0
    dim = _norm_dim(_arg(node, 2, "dim", default_dim) if node.target is not aten.unbind.int
                    else _arg(node, 1, "dim", 0), nd)
    if dim != lab.dim:
        if node.target is aten.unbind.int:
            return [lab.moved(lab.dim - (dim < lab.dim)) for _ in outs]
        return [lab for _ in outs]
    if node.target is aten.unbind.int:
        an.pin(lab, node, "unbind along the channel dim")
        return [None] * len(outs)
    labels: list[Label | None] = []
    start = 0
    for o in outs:
        size = concrete(an.shape_of_val(o)[dim])
        labels.append(Label(lab.dim, lab.atoms[start: start + size], lab.ok))
        start += size
    return labels


@_register("cat", "concat")
def _cat(an: Any, node: torch.fx.Node) -> Label | None:
    tensors = list(node.args[0])
    out_nd = len(an.shape(node))
    dim = _norm_dim(_arg(node, 1, "dim", 0), out_nd)
    labels = [an.label(t) for t in tensors]
    shapes = [an.shape(t) for t in tensors]
    if all(lab is None for lab in labels):
        return None
    live = [(lab, shp) for lab, shp in zip(labels, shapes, strict=True) if len(shp) == out_nd]
    if any(lab is not None and lab.dim != dim for lab, _ in live):
        # cat along a non-channel dim (e.g. ViT's [cls; patches] along tokens): the
        # channel dims must line up; a parameter input (cls token) joins the units.
        dims = {lab.dim for lab, _ in live if lab is not None}
        if len(dims) != 1:
            return an.pin_inputs(node, "cat of tensors whose channel dims do not line up")
        d = dims.pop()
        atoms = next(lab for lab, _ in live if lab is not None).atoms
        for t, (lab, shp) in zip([t for t in tensors if len(an.shape(t)) == out_nd], live,
                                 strict=True):
            if lab is not None:
                an.unify(atoms, lab.atoms)
                continue
            src = an.param(t)
            if src is None or concrete(shp[d]) != len(atoms):
                return an.pin_inputs(node, "cat of a channel-carrying tensor with one "
                                           "whose channels no layer produces")
            an.label_param(src[0], src[1][d], atoms, "out" if src[2] else "in")
        return Label(d, atoms, all(lab.ok for lab, _ in live if lab is not None))
    parts = []
    for lab, shp in live:
        if lab is None:
            parts.append(np.zeros(concrete(shp[dim]), dtype=np.int64))  # untracked channels
        else:
            parts.append(lab.atoms)
    ok = all(lab.ok for lab, _ in live if lab is not None)
    return Label(dim, np.concatenate(parts), ok)


@_register("stack")
def _stack(an: Any, node: torch.fx.Node) -> Label | None:
    tensors = list(node.args[0])
    labels = [an.label(t) for t in tensors]
    if all(lab is None for lab in labels):
        return None
    nd = len(an.shape(tensors[0]))
    dim = _norm_dim(_arg(node, 1, "dim", 0), nd + 1)
    if any(lab is None for lab in labels) or len({lab.dim for lab in labels}) != 1:
        return an.pin_inputs(node, "stack of tensors whose channels do not line up")
    atoms = labels[0].atoms
    for lab in labels[1:]:
        an.unify(atoms, lab.atoms)
    d = labels[0].dim
    return Label(d if d < dim else d + 1, atoms, all(lab.ok for lab in labels))


# --------------------------------------------------------------------------- attention

@_register("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")
def _sdpa(an: Any, node: torch.fx.Node) -> Any:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    lq, lk, lv = an.label(q), an.label(k), an.label(v)
    labs = [lab for lab in (lq, lk, lv) if lab is not None]
    multi = isinstance(node.meta.get("val"), (tuple, list))
    if not labs:
        return None
    sq, sk = an.shape(q), an.shape(k)
    if len(sq) < 3 or any(lab is None or lab.dim != len(sq) - 3 for lab in (lq, lk, lv)):
        an.pin_inputs(node, "attention whose q/k/v do not all carry heads on the head dim")
        return None
    mask_heads = None
    if isinstance(mask, torch.fx.Node):
        # A per-head additive mask (T5/ALiBi-style position bias) only shifts scores: a pruned
        # head's output is still zero (its v is).  Its head dim must follow q's heads: unified
        # with them when it carries channels (a bias table's head columns are pruned along),
        # else index_select'ed by physical_prune (a positional operand only).
        ms, ml = an.shape(mask), an.label(mask)
        per_head = len(ms) >= 3 and concrete(ms[-3]) not in (1, None)
        if ml is not None and ml.dim == len(ms) - 3 and len(ml.atoms) == len(lq.atoms):
            mask_heads = ml.atoms
        elif ml is not None or (per_head and not (len(node.args) > 3
                                                  and node.args[3] is mask)):
            an.pin_inputs(node, "attention mask varies over heads")
            return None
        elif per_head:
            an.external(node, 3, len(ms) - 3, source=q)
    hq, hk = len(lq.atoms), len(lk.atoms)
    if hk != len(lv.atoms) or hq % hk:
        return an.pin_inputs(node, "attention with mismatched head counts")
    # A unit is a kv head plus every q head reading it (GQA/MQA); head_dim stays whole.
    an.unify(lk.atoms, lv.atoms)
    an.unify(lq.atoms.reshape(hk, hq // hk), lk.atoms[:, None])
    if mask_heads is not None:
        an.unify(mask_heads, lq.atoms)
    out = Label(len(an.shape(node if not multi else q)) - 3, lq.atoms, lv.ok)
    return [out] + [None] * (len(node.meta["val"]) - 1) if multi else out


# --------------------------------------------------------------------------- getitem

def _getitem(an: Any, node: torch.fx.Node) -> Label | None:
    parent = node.args[0]
    labels = an.labels.get(parent)
    if isinstance(labels, list) and isinstance(node.args[1], int) and node.args[1] < len(labels):
        return labels[node.args[1]]
    return None


RULES[operator.getitem] = _getitem

#: Ops that only consume shapes or have no tensor output touching channels.
IGNORED = {
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
    aten._assert_tensor_metadata.default, aten._assert_scalar.default,
}
for _name in ("sym_constrain_range_for_size", "sym_constrain_range", "_assert_async"):
    _pk = getattr(aten, _name, None)
    if _pk is not None:
        IGNORED |= {getattr(_pk, o) for o in _pk.overloads()}


# --------------------------------------------------------------------------- geta's own


def is_geta_op(target: Any, *names: str) -> bool:
    """``target`` is one of the ``geta::<name>`` ops (checked without importing geta_fx.ops,
    which loads the kernels)."""
    return getattr(target, "namespace", None) == "geta" and \
        str(getattr(target, "__name__", "")).split(".")[0] in names


def quantizer_module(gm: torch.fx.GraphModule, x: Any) -> torch.nn.Module | None:
    """The geta quantizer module ``x`` calls, if ``x`` is such a ``call_module`` node."""
    if isinstance(x, torch.fx.Node) and x.op == "call_module":
        mod = gm.get_submodule(str(x.target))
        if getattr(mod, "is_geta_quantizer", False):
            return mod
    return None
