"""Op categories, defined once as ``OpOverload`` sets (composable with ``|``).

Passes import these instead of keeping their own tables (torchao's x86 quantizer style).
Every entry is an attribute access on ``torch.ops.aten``, so a name that does not exist
fails at import instead of being dropped silently.  The channel rules of dependency
grouping and physical pruning live in ``geta_fx.ir.registry`` (registered per op).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch._ops import OpOverload, OpOverloadPacket

aten = torch.ops.aten
OpSet = frozenset[OpOverload]


def overloads(*packets: OpOverloadPacket) -> OpSet:
    """Every overload of each packet (``aten._assert_async`` -> ``.default``, ``.msg``)."""
    return frozenset(getattr(p, o) for p in packets for o in p.overloads())


# ------------------------------------------------------------------ graph bookkeeping
#: Runtime assertions torch.export leaves behind; normalize drops them.
ASSERTS: OpSet = frozenset({aten._assert_tensor_metadata.default, aten._assert_scalar.default}) \
    | overloads(aten.sym_constrain_range_for_size, aten.sym_constrain_range, aten._assert_async)
#: Ops that read a tensor's sizes, never its values.
SHAPE_QUERIES: OpSet = frozenset({aten.sym_size.int, aten.sym_numel.default,
                                  aten.sym_stride.int})

# ------------------------------------------------------------------ value-preserving ops
#: Copies: same values, maybe another dtype/device/memory format.
COPIES: OpSet = frozenset({
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten.clone.default, aten.contiguous.default, aten.detach.default, aten.alias.default,
    aten.lift_fresh_copy.default,
})
#: Dim-reordering views of a weight (``W.t()``, ``W.T``, ``W.mT``, ``W.transpose``,
#: ``W.permute``, and their ``_copy`` forms).
TRANSPOSES: OpSet = frozenset({aten.t.default, aten.t_copy.default, aten.numpy_T.default,
                               aten.transpose.int, aten.transpose_copy.int,
                               aten.swapaxes.default, aten.swapdims.default})
PERMUTES: OpSet = frozenset({aten.permute.default, aten.permute_copy.default})
MATRIX_TRANSPOSES: OpSet = frozenset({aten.mT.default})
#: Views a quantizer commutes with (fold_quant moves act quantizers across them).
VIEWS: OpSet = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.flatten.using_ints, aten.unflatten.int, aten.t.default,
    aten.contiguous.default, aten.unsqueeze.default, aten.squeeze.dim,
})

# ------------------------------------------------------------------ signs
#: Producers whose output is never negative (unsigned activation quantizers, §G.2 #3).
NON_NEGATIVE: OpSet = frozenset({
    aten.relu.default, aten.relu_.default, aten.relu6.default, aten.sigmoid.default,
    aten.softmax.int, aten._softmax.default, aten.hardsigmoid.default, aten.abs.default,
    aten.exp.default,
})
#: Ops whose output is non-negative when their (first) input is.
KEEPS_SIGN: OpSet = frozenset({
    aten.max_pool2d.default, aten.max_pool1d.default, aten.max_pool3d.default,
    aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.view.default,
    aten.reshape.default, aten.flatten.using_ints, aten.dropout.default, aten.permute.default,
    aten.transpose.int, aten.contiguous.default, aten.clone.default, aten.mean.dim,
    aten.hardtanh.default, aten.upsample_nearest2d.vec,
})

# ------------------------------------------------------------------ stems


@dataclass(frozen=True)
class StemArgs:
    """Schema argument names of a layer op's data input, weight and bias (None: no bias)."""

    data: str
    weight: str
    bias: str | None


_CONV = StemArgs("input", "weight", "bias")
CONVS: OpSet = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
CONV_TRANSPOSES: OpSet = frozenset({aten.conv_transpose1d.default,
                                    aten.conv_transpose2d.input,
                                    aten.conv_transpose3d.input})
#: Layer ops with a weight operand: the ones insert_quantizers quantizes.
STEMS: Mapping[OpOverload, StemArgs] = MappingProxyType({
    **dict.fromkeys(CONVS | CONV_TRANSPOSES | {aten.convolution.default}, _CONV),
    aten.linear.default: StemArgs("input", "weight", "bias"),
    aten.matmul.default: StemArgs("self", "other", None),
    aten.mm.default: StemArgs("self", "mat2", None),
    aten.addmm.default: StemArgs("mat1", "mat2", "self"),
    aten.embedding.default: StemArgs("indices", "weight", None),
})

# ------------------------------------------------------------------ pointwise
#: Unary ops (and copies) with f(0) = 0: a zeroed channel stays zero.
ZERO_PRESERVING: OpSet = COPIES | frozenset({
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
    aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default, aten.selu.default,
    aten.celu.default, aten.mish.default, aten.hardswish.default, aten.relu6.default,
    aten.neg.default, aten.abs.default, aten.sign.default, aten.sgn.default, aten.sin.default,
    aten.erf.default, aten.sqrt.default, aten.square.default, aten.trunc.default,
    aten.round.default, aten.floor_divide.default, aten.atan.default, aten.asin.default,
    aten.sinh.default, aten.tan.default, aten.expm1.default, aten.log1p.default,
    aten.zero.default, aten.to.other, aten.type_as.default, aten.dropout.default,
    aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
})
#: Unary ops with f(0) != 0 (or producing fresh values): channels flow, but are not zero.
NOT_ZERO_PRESERVING: OpSet = frozenset({
    aten.sigmoid.default, aten.exp.default, aten.cos.default, aten.log.default,
    aten.rsqrt.default, aten.reciprocal.default, aten.hardsigmoid.default,
    aten.softplus.default, aten.logical_not.default, aten.cosh.default, aten.erfc.default,
    aten.log_sigmoid.default, aten.bitwise_not.default, aten.acos.default, aten.ceil.default,
    aten.floor.default, aten.isnan.default, aten.isinf.default, aten.ones_like.default,
    aten.full_like.default, aten.rand_like.default, aten.randn_like.default,
})
#: Binary elementwise ops by how zeros combine (broadcasting operands unify channels).
ADDS: OpSet = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar,
                         aten.rsub.Scalar, aten.rsub.Tensor})
MULS: OpSet = frozenset({aten.mul.Tensor, aten.mul.Scalar})
DIVS: OpSet = frozenset({aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode,
                         aten.true_divide.Tensor})
WHERES: OpSet = frozenset({aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
                           aten.where.Scalar})
SELECTS: OpSet = frozenset({aten.maximum.default, aten.minimum.default}) | WHERES
COMPARISONS: OpSet = frozenset({
    aten.eq.Tensor, aten.ne.Tensor, aten.gt.Tensor, aten.lt.Tensor, aten.ge.Tensor,
    aten.le.Tensor, aten.eq.Scalar, aten.ne.Scalar, aten.gt.Scalar, aten.lt.Scalar,
    aten.ge.Scalar, aten.le.Scalar, aten.logical_and.default, aten.logical_or.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
})
ELEMENTWISE: OpSet = ADDS | MULS | DIVS | SELECTS | COMPARISONS


# ------------------------------------------------------------------ in-place variants
def _same_arguments(a: OpOverload, b: OpOverload) -> bool:
    """Same arguments after ``self`` (names, kw-only flags), so positions and names agree."""
    xa, xb = a._schema.arguments, b._schema.arguments
    return len(xa) == len(xb) and all(
        p.name == q.name and p.kwarg_only == q.kwarg_only for p, q in zip(xa[1:], xb[1:]))


@functools.cache
def out_of_place(op: object) -> OpOverload | None:
    """The out-of-place sibling of an in-place op (``relu_.default`` -> ``relu.default``,
    ``add_.Tensor`` -> ``add.Tensor``), or None.

    In-place means ATen's convention: the name ends in ``_``, the first argument is the only
    one written (``Tensor(a!) self``) and the result is that same tensor; the sibling of the
    same overload must take the same arguments after ``self`` and return a new tensor.  Ops
    that write another argument (``out=`` forms) or change ``self``'s sizes instead of its
    values (``unsqueeze_``, ``transpose_``: their siblings are views) have no sibling here.
    """
    if not isinstance(op, OpOverload):
        return None
    schema = op._schema
    ns, _, name = schema.name.partition("::")
    args = schema.arguments
    if not (name.endswith("_") and not name.startswith("_") and args and len(schema.returns) == 1):
        return None
    written = [a for a in args if a.alias_info is not None and a.alias_info.is_write]
    ret = schema.returns[0].alias_info
    if written != [args[0]] or ret is None or not ret.is_write or \
            ret.before_set != args[0].alias_info.before_set:
        return None
    packet = getattr(getattr(torch.ops, ns), name[:-1], None)
    sibling = getattr(packet, op._overloadname, None) if packet is not None else None
    if not isinstance(sibling, OpOverload) or sibling._schema.is_mutable or \
            sibling._schema.returns[0].alias_info is not None or \
            not _same_arguments(op, sibling):
        return None  # no sibling, or one that returns a view (``unsqueeze_``, ``t_``)
    return sibling


def _inplace_of(op: OpOverload) -> OpOverload | None:
    ns, name = op._schema.name.split("::")
    packet = getattr(getattr(torch.ops, ns), name + "_", None)
    ov = getattr(packet, op._overloadname, None) if packet is not None else None
    return ov if out_of_place(ov) is op else None


#: The in-place variants of the value categories above (``relu_``, ``add_``, ``mul_``,
#: ``sigmoid_``...); the registry resolves every in-place op to its sibling's rule
#: (``geta_fx.ir.registry.rule_for``), so none of them is registered on its own.
INPLACE: OpSet = frozenset(filter(None, map(
    _inplace_of, ZERO_PRESERVING | NOT_ZERO_PRESERVING | ELEMENTWISE)))

# ------------------------------------------------------------------ operand walks (cost model)
#: Every overload of the ops between a weight/activation and the layer reading it that
#: neither compute nor change which tensor the operand is (the cost model walks them).
OPERAND_TRANSPARENT: OpSet = overloads(
    aten.t, aten.transpose, aten.permute, aten.view, aten._unsafe_view, aten.reshape,
    aten.expand, aten.contiguous, aten.clone, aten.to, aten._to_copy, aten.alias, aten.detach,
    aten.unsqueeze, aten.squeeze, aten.flatten, aten.lift_fresh_copy, aten.type_as)
#: Those of them that reorder dims (a transposed weight).
FLIPS: OpSet = overloads(aten.t, aten.transpose, aten.permute)
