"""Channel rules of reductions, softmax, spatial ops (pooling, upsampling, padding) and
attention.

A reduction over non-channel dims carries the label; over the channel dim a sum is exact
(zeros add 0), a mean is rewritten to divide by the original count, anything else pins.
Attention's unit is a kv head plus every q head reading it (GQA/MQA); head_dim stays whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from geta_fx.ir.args import arg
from geta_fx.ir.channels import Label, concrete
from geta_fx.ir.registry import Analysis, channel_rule, register_all
from geta_fx.ir.rules_layers import keep_original_count
from geta_fx.ir.rules_shape import DERIVED, norm_dim

aten = torch.ops.aten

SUM_LIKE = frozenset({aten.sum.dim_IntList, aten.sum.default, aten.linalg_vector_norm.default,
                      aten.norm.ScalarOpt_dim})
ZERO_KEEPING = frozenset({
    aten.mean.default, aten.amax.default, aten.amin.default, aten.max.dim, aten.min.dim,
    aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim, aten.prod.dim_int,
    aten.logsumexp.default, aten.argmax.default, aten.argmin.default,
    aten.var_mean.correction, aten.max.default, aten.min.default, aten.any.dim, aten.all.dim,
})
#: Reductions over every dim (no ``dim`` argument).
_ALL_DIMS = frozenset({aten.sum.default, aten.mean.default, aten.max.default,
                       aten.min.default})
REDUCED = ("reduces non-channel dims only (over the channel dim: a sum is exact, the rest "
           "is pinned)")


def _reduce_dims(node: torch.fx.Node, nd: int) -> tuple[list[int], bool]:
    if node.target in _ALL_DIMS:
        return list(range(nd)), False
    dims, keep = arg(node, "dim"), arg(node, "keepdim", False)
    if dims is None or dims == []:
        dims = list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(norm_dim(d, nd) for d in dims), bool(keep)


def _reduction(sum_like: bool) -> Analysis:
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
        out = lab.moved(new_dim, ok=lab.ok and node.target is not aten.logsumexp.default)
        return [out, out] if multi else out
    return rule


register_all(SUM_LIKE, _reduction(True), no_rewrite=REDUCED)
register_all(ZERO_KEEPING, _reduction(False), no_rewrite=REDUCED)
register_all({aten.mean.dim}, _reduction(False), rewrite=keep_original_count)


@channel_rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
              aten._log_softmax.default, aten.cumsum.default,
              no_rewrite="over the channel dim it is pinned; elsewhere the shape is kept",
              tiled=True)
def _softmax(an: Any, node: torch.fx.Node) -> Label | None:
    lab = an.label(node.args[0])
    if lab is None:
        return None
    if norm_dim(arg(node, "dim"), len(an.shape(node.args[0]))) == lab.dim:
        an.pin(lab, node, f"{node.target}: normalises over the channel dim")
        return None
    return lab.moved(lab.dim, ok=lab.ok and node.target is aten.cumsum.default)


# --------------------------------------------------------------------------- spatial ops

PADS = frozenset({aten.constant_pad_nd.default, aten.pad.default,
                  aten.reflection_pad2d.default, aten.replication_pad2d.default})
SPATIAL = frozenset({
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool2d.default,
    aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec,
    aten.upsample_nearest3d.vec, aten.upsample_linear1d.vec, aten.upsample_bicubic2d.vec,
    aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default,
    aten.im2col.default,
})


def _fill(node: torch.fx.Node) -> tuple[bool, bool]:
    """(constant mode, the padded entries of a zero channel are zero) of a pad op."""
    if node.target is aten.constant_pad_nd.default:
        return True, arg(node, "value", 0) in (0, 0.0)
    if node.target is aten.pad.default and arg(node, "mode", "constant") == "constant":
        return True, arg(node, "value") in (0, 0.0, None)
    return False, True  # reflect / replicate / circular copy the channel's own zeros


def _pad(an: Any, node: torch.fx.Node, lab: Label, x_nd: int) -> Label | None:
    """Pad widths come in (before, after) pairs from the last dim backwards.

    Over other dims the label passes (zero-invariant if the fill keeps a zero channel
    zero).  A channel dim padded with a constant gains channels no layer produces (atom 0)
    on both sides: the widths stay right in the slim graph as they count added entries
    only.  Any other padding of the channel dim (a copy mode, a crop, dynamic widths) pins.
    """
    widths = list(node.args[1])
    constant, zero_fill = _fill(node)
    k = x_nd - 1 - lab.dim  # the channel dim's (before, after) pair
    mine = widths[2 * k: 2 * k + 2] if 2 * k < len(widths) else [0, 0]
    others = widths[: 2 * k] + widths[2 * k + 2:]
    pads_others = any(isinstance(w, torch.fx.Node) or w != 0 for w in others)
    ok = lab.ok and (zero_fill or not pads_others)
    if mine == [0, 0]:
        return lab.moved(lab.dim, ok=ok)
    if not constant or not all(isinstance(w, int) and w >= 0 for w in mine):
        an.pin(lab, node, f"{node.target}: pads a channel dim other than with a constant")
        return None
    before, after = (np.zeros(w, dtype=lab.atoms.dtype) for w in mine)
    return Label(lab.dim, np.concatenate([before, lab.atoms, after]), ok)


@channel_rule(*SPATIAL, *PADS, no_rewrite=DERIVED + " (spatial sizes only; a channel dim "
                                                     "they touch is pinned)")
def _spatial(an: Any, node: torch.fx.Node) -> Any:
    lab = an.label(node.args[0])
    multi = isinstance(node.meta.get("val"), (tuple, list))
    if lab is None:
        return [None, None] if multi else None
    x_nd = len(an.shape(node.args[0]))
    out_nd = len(an.shape(node)) if not multi else x_nd
    if node.target in PADS:
        return _pad(an, node, lab, x_nd)
    if node.target is aten.im2col.default:
        return an.pin_inputs(node, "im2col mixes channels")
    cdim = 1 if x_nd >= 3 and out_nd == x_nd else 0
    if lab.dim != cdim and not (x_nd == 3 and lab.dim == 1):
        an.pin(lab, node, f"{node.target}: pools over a channel-carrying dim")
        return [None, None] if multi else None
    return [lab, lab] if multi else lab


# --------------------------------------------------------------------------- attention

def _attention_mask_heads(an: Any, node: torch.fx.Node, lq: Label, q: Any) -> Any:
    """The atoms of a per-head mask's head dim (None: none), or False if it pins.

    A per-head additive mask (T5/ALiBi-style position bias) only shifts scores: a pruned
    head's output is still zero (its v is).  Its head dim must follow q's heads: unified
    with them when it carries channels (a bias table's head columns are pruned along),
    else index_select'ed by physical_prune (a positional operand only).
    """
    mask = arg(node, "attn_mask")
    if not isinstance(mask, torch.fx.Node):
        return None
    ms, ml = an.shape(mask), an.label(mask)
    per_head = len(ms) >= 3 and concrete(ms[-3]) not in (1, None)
    if ml is not None and ml.dim == len(ms) - 3 and len(ml.atoms) == len(lq.atoms):
        return ml.atoms
    if ml is not None or (per_head and not (len(node.args) > 3 and node.args[3] is mask)):
        an.pin_inputs(node, "attention mask varies over heads")
        return False
    if per_head:
        an.external(node, 3, len(ms) - 3, source=q)
    return None


@channel_rule(aten.scaled_dot_product_attention.default,
              aten._scaled_dot_product_flash_attention_for_cpu.default,
              no_rewrite="head counts follow q/k/v's pruned shapes; a per-head mask operand "
                         "is index_select'ed by physical_prune (an.external)")
def _sdpa(an: Any, node: torch.fx.Node) -> Any:
    q, k, v = node.args[:3]
    lq, lk, lv = an.label(q), an.label(k), an.label(v)
    labs = [lab for lab in (lq, lk, lv) if lab is not None]
    multi = isinstance(node.meta.get("val"), (tuple, list))
    if not labs:
        return None
    sq = an.shape(q)
    if len(sq) < 3 or any(lab is None or lab.dim != len(sq) - 3 for lab in (lq, lk, lv)):
        an.pin_inputs(node, "attention whose q/k/v do not all carry heads on the head dim")
        return None
    mask_heads = _attention_mask_heads(an, node, lq, q)
    if mask_heads is False:
        return None
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
