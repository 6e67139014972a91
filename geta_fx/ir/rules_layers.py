"""Channel rules of layers: stems (linear, matmul/addmm with a parameter, embedding,
convolutions) and per-channel norms, with the rewrites pruning needs at them.

A stem's output channel dim opens a channel space (fresh atoms, its weight rows and bias
are "out" slices); its input channel dim consumes the incoming label (weight columns are
"in" slices).  A grouped convolution's unit is a whole convolution group, a GroupNorm's a
whole norm group: their group counts are rewritten.  LayerNorm/RMSNorm over the channel dim
(and mean over it, in ``rules_reduce``) are rewritten to keep the original count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from geta_fx.ir import op_sets
from geta_fx.ir.args import arg, set_arg
from geta_fx.ir.channels import KeptChannels, Label, concrete
from geta_fx.ir.query import tensor_val
from geta_fx.ir.registry import channel_rule

aten = torch.ops.aten

#: Why stems need no rewrite of their own: channel counts come from the sliced parameters.
SLICED = "channel counts come from the sliced weight and bias (physical_prune slices them)"


def bias(an: Any, b: Any, atoms: np.ndarray) -> None:
    """A parameter ``b`` (bias, norm affine) is sliced along ``atoms`` as an "out" slice."""
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


@channel_rule(aten.linear.default, no_rewrite=SLICED)
def _linear(an: Any, node: torch.fx.Node) -> Label | None:
    x, w, b = node.args[0], arg(node, "weight"), arg(node, "bias")
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
    bias(an, b, atoms)
    return Label(len(an.shape(node)) - 1, atoms)


def _matmul_param(an: Any, node: torch.fx.Node, la: Label | None, sa: list, sb: list,
                  pb: Any) -> Label:
    """``x @ W`` with a parameter ``W: [K, N]``: a stem."""
    if la is not None and la.dim != len(sa) - 1:
        an.pin(la, node, "matmul with a parameter along a non-contracted channel dim")
        la = None
    _consume(an, node, la, pb, 0)
    atoms = _stem_out(an, node, pb, 1, concrete(sb[1]))
    return Label(len(an.shape(node)) - 1, atoms)


def _matmul_contract(an: Any, node: torch.fx.Node, contract: list[Label], la: Label | None,
                     sa: list, sb: list) -> None:
    """Channels on the contracted dims of two activations: unified, or the other operand
    is an external along them."""
    a, b = node.args[0], node.args[1]
    if len(contract) == 2:
        an.unify(contract[0].atoms, contract[1].atoms)
        if not (contract[0].ok or contract[1].ok):
            an.pin(contract[0], node, "matmul contracts a channel dim that is not zero")
        return
    other = b if contract[0] is la else a
    if not contract[0].ok:
        an.pin(contract[0], node, "matmul contracts a channel dim that is not zero")
    idx = 1 if other is b else 0
    od = len(sb) - 2 if other is b else len(sa) - 1
    an.external(node, idx, od, source=a if contract[0] is la else b)


def _tiled_matmul(an: Any, node: torch.fx.Node, la: Label | None, lb: Label | None,
                  sa: list, sb: list) -> Label | None:
    """Tiled channels (heads interleaved with the batch, ``bmm`` over ``[B*H, L, D]``) pass
    a matmul on the batch dims of both operands, lined up; anything else pins."""
    labs = [lab for lab in (la, lb) if lab is not None]
    out_nd = len(an.shape(node))
    dims = {lab.dim + out_nd - len(s) for lab, s in ((la, sa), (lb, sb)) if lab is not None}
    batch = all(lab.dim < len(s) - 2 for lab, s in ((la, sa), (lb, sb)) if lab is not None)
    if not batch or len(dims) != 1 or len({lab.tile for lab in labs}) != 1 or \
            len({len(lab.atoms) for lab in labs}) != 1 or \
            an.param(node.args[0]) is not None or an.param(node.args[1]) is not None:
        return an.pin_inputs(node, f"{node.target}: tiled channels off the batch dims")
    for lab in labs[1:]:
        an.unify(labs[0].atoms, lab.atoms)
    return Label(dims.pop(), labs[0].atoms, any(lab.ok for lab in labs), labs[0].tile)


@channel_rule(aten.matmul.default, aten.mm.default, aten.bmm.default,
              no_rewrite=SLICED + "; computed operands are index_select'ed (an.external)",
              tiled=True)
def _matmul(an: Any, node: torch.fx.Node) -> Label | None:
    a, b = node.args[0], node.args[1]
    sa, sb = an.shape(a), an.shape(b)
    la, lb = an.label(a), an.label(b)
    if any(lab is not None and lab.tile is not None for lab in (la, lb)):
        return _tiled_matmul(an, node, la, lb, sa, sb)
    pb, pa = an.param(b), an.param(a)
    if pb is not None and len(sb) == 2:  # x @ W  (W: [K, N])
        return _matmul_param(an, node, la, sa, sb, pb)
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
        _matmul_contract(an, node, contract, la, sa, sb)
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


@channel_rule(aten.addmm.default, no_rewrite=SLICED)
def _addmm(an: Any, node: torch.fx.Node) -> Label | None:
    b, x, w = arg(node, "self"), arg(node, "mat1"), arg(node, "mat2")
    src = an.param(w)
    if src is None:
        return an.pin_inputs(node, "addmm with a computed weight")
    lab = an.label(x)
    if lab is not None and lab.dim != 1:
        an.pin(lab, node, "addmm along a non-contracted channel dim")
        lab = None
    _consume(an, node, lab, src, 0)
    atoms = _stem_out(an, node, src, 1, concrete(an.shape(w)[1]))
    bias(an, b, atoms)
    return Label(1, atoms)


@channel_rule(aten.embedding.default, no_rewrite=SLICED)
def _embedding(an: Any, node: torch.fx.Node) -> Label | None:
    w = arg(node, "weight")
    src = an.param(w)
    if src is None:
        return an.pin_inputs(node, "embedding with a computed table")
    atoms = _stem_out(an, node, src, 1, concrete(an.shape(w)[1]))
    return Label(len(an.shape(node)) - 1, atoms)


# --------------------------------------------------------------------------- convolutions

def _rewrite_conv_groups(gm: torch.fx.GraphModule, node: torch.fx.Node,
                         kept: KeptChannels) -> None:
    """A grouped convolution keeps ``groups * C'/C`` groups (a unit is a whole group)."""
    groups = arg(node, "groups", 1)
    inp = kept.changed(node.args[0]) if groups != 1 else None
    if inp is not None:
        _, k, n = inp
        set_arg(node, "groups", groups * len(k) // n, positional=True)


@channel_rule(*op_sets.CONVS, aten.convolution.default, rewrite=_rewrite_conv_groups)
@channel_rule(*op_sets.CONV_TRANSPOSES,
              no_rewrite=SLICED + "; grouped transposed convolutions are pinned")
def _conv(an: Any, node: torch.fx.Node) -> Label | None:
    x, w, b = node.args[0], arg(node, "weight"), arg(node, "bias")
    groups = arg(node, "groups", 1)
    transposed = (bool(arg(node, "transposed")) if node.target is aten.convolution.default
                  else node.target in op_sets.CONV_TRANSPOSES)
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
        bias(an, b, atoms)
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
    bias(an, b, atoms)
    return Label(cdim, atoms)


# --------------------------------------------------------------------------- norms

NORM_SLICED = "per-channel affine parameters and running stats are sliced by physical_prune"


def _channel_norm(an: Any, node: torch.fx.Node, x: Any, w: Any, b: Any,
                  buffers: tuple[Any, ...], stats_ok: bool) -> Label | None:
    lab = an.label(x)
    if lab is None:
        return None
    if lab.dim != 1:
        an.pin(lab, node, f"{node.target}: channels on a normalised (non-channel) dim")
        return None
    for p in (w, b):
        bias(an, p, lab.atoms)
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


def _norm_args(node: torch.fx.Node) -> tuple[Any, ...]:
    """(input, weight, bias, running_mean, running_var) of a batch/instance norm."""
    return tuple(arg(node, n) for n in ("input", "weight", "bias", "running_mean",
                                        "running_var"))


@channel_rule(aten.batch_norm.default, no_rewrite=NORM_SLICED)
def _batch_norm(an: Any, node: torch.fx.Node) -> Label | None:
    x, w, b, rm, rv = _norm_args(node)
    training = arg(node, "training")
    # (x - mean) / std * w + b: zero iff w, b are zero or (no affine and batch stats of 0).
    ok_without_affine = bool(training) and b is None
    lab = _channel_norm(an, node, x, w, b, (rm, rv), stats_ok=ok_without_affine)
    if lab is not None and not isinstance(b, torch.fx.Node) and not training:
        lab = lab.moved(1, ok=False)
    return lab


@channel_rule(aten._native_batch_norm_legit_no_training.default, no_rewrite=NORM_SLICED)
def _bn_no_training(an: Any, node: torch.fx.Node) -> list[Label | None]:
    x, w, b, rm, rv = _norm_args(node)
    lab = _channel_norm(an, node, x, w, b, (rm, rv), stats_ok=False)
    return [lab, None, None]


@channel_rule(aten.instance_norm.default, no_rewrite=NORM_SLICED)
def _instance_norm(an: Any, node: torch.fx.Node) -> Label | None:
    x, w, b, rm, rv = _norm_args(node)
    use_input_stats = arg(node, "use_input_stats")
    return _channel_norm(an, node, x, w, b, (rm, rv), stats_ok=bool(use_input_stats))


def _rewrite_num_groups(gm: torch.fx.GraphModule, node: torch.fx.Node,
                        kept: KeptChannels) -> None:
    """GroupNorm keeps ``G * C'/C`` groups (a unit is a whole norm group)."""
    inp = kept.changed(node.args[0])
    if inp is not None:
        _, k, n = inp
        set_arg(node, "num_groups", arg(node, "num_groups") * len(k) // n)


@channel_rule(aten.group_norm.default, rewrite=_rewrite_num_groups)
def _group_norm(an: Any, node: torch.fx.Node) -> Label | None:
    x, groups = node.args[0], arg(node, "num_groups")
    w, b = arg(node, "weight"), arg(node, "bias")
    lab = an.label(x)
    if lab is None:
        return None
    if lab.dim != 1:
        an.pin(lab, node, "group_norm over channel-carrying spatial dims")
        return None
    blocks = lab.atoms.reshape(groups, -1)
    an.unify(blocks, blocks[:, :1])  # a unit is a whole normalisation group
    return _channel_norm(an, node, x, w, b, (), stats_ok=True)


# ------------------------------------------------------------------ original-count statistics

def _mean_original_count(call: Any, node: torch.fx.Node, x: torch.fx.Node, in_dim: int,
                         n: int, shape: list) -> torch.fx.Node | None:
    """mean(x, dims) -> sum(x, dims) / N_orig (None: the mean is not over the channels)."""
    nd = len(shape)
    dims = sorted(d % nd for d in arg(node, "dim"))
    if in_dim not in dims:
        return None
    count = 1
    for d in dims:
        count *= n if d == in_dim else int(shape[d])
    keepdim = arg(node, "keepdim", False)
    kwargs = {"dtype": node.kwargs["dtype"]} if node.kwargs.get("dtype") else {}
    return call(aten.div.Tensor, call(aten.sum.dim_IntList, x, dims, keepdim, **kwargs),
                float(count))


def _norm_original_count(call: Any, node: torch.fx.Node, x: torch.fx.Node, n: int,
                         removed: int) -> torch.fx.Node:
    """layer_norm / rms_norm over the last dim with the statistics of the original count."""
    is_ln = node.target is aten.layer_norm.default
    w = arg(node, "weight")
    b = arg(node, "bias") if is_ln else None
    eps = arg(node, "eps", 1e-5 if is_ln else None)
    if eps is None:
        eps = torch.finfo(tensor_val(x).dtype).eps
    if is_ln:
        mu = call(aten.div.Tensor, call(aten.sum.dim_IntList, x, [-1], True), float(n))
        xc = call(aten.sub.Tensor, x, mu)
        ss = call(aten.sum.dim_IntList, call(aten.mul.Tensor, xc, xc), [-1], True)
        ss = call(aten.add.Tensor, ss,
                  call(aten.mul.Tensor, call(aten.mul.Tensor, mu, mu), float(removed)))
        var = call(aten.div.Tensor, ss, float(n))
        y = call(aten.mul.Tensor, xc,
                 call(aten.rsqrt.default, call(aten.add.Tensor, var, float(eps))))
    else:
        ms = call(aten.div.Tensor,
                  call(aten.sum.dim_IntList, call(aten.mul.Tensor, x, x), [-1], True),
                  float(n))
        y = call(aten.mul.Tensor, x,
                 call(aten.rsqrt.default, call(aten.add.Tensor, ms, float(eps))))
    if isinstance(w, torch.fx.Node):
        y = call(aten.mul.Tensor, y, w)
    if isinstance(b, torch.fx.Node):
        y = call(aten.add.Tensor, y, b)
    return y


def keep_original_count(gm: torch.fx.GraphModule, node: torch.fx.Node,
                        kept: KeptChannels) -> None:
    """Statistics over a pruned channel dim keep dividing by the original channel count.

        mean(x, dims)              -> sum(x, dims) / N_orig
        layer_norm(x, [C'], w, b)  -> mu = sum(x)/C;  var = (sum((x-mu)^2) + (C-C') mu^2) / C
        rms_norm(x, [C'], w)       -> x * rsqrt(sum(x^2)/C + eps) * w

    The removed channels were exactly zero, so these equal the unpruned statistics.
    """
    inp = kept.changed(node.args[0])
    if inp is None:
        return
    in_dim, k, n = inp
    x = node.args[0]
    shape = list(tensor_val(x).shape)
    graph = gm.graph

    def call(op: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        return graph.call_function(op, args, kwargs)

    with graph.inserting_before(node):
        if node.target is aten.mean.dim:
            out = _mean_original_count(call, node, x, in_dim, n, shape)
        else:
            out = (_norm_original_count(call, node, x, n, n - len(k))
                   if in_dim == len(shape) - 1 else None)
    if out is None:
        return
    # "val" (pre-prune, like every node's until physical_prune refreshes them) lets a later
    # rewrite that reads this output see its shape.
    out.meta.update({key: v for key, v in node.meta.items() if key in ("nn_module_stack",
                                                                       "stack_trace", "val")})
    # The replacement carries the norm's channels: later rewrites (e.g. a norm reading this
    # one, as in Bloom's embedding LayerNorm -> block LayerNorm) look labels up by node name.
    if node.name in kept.labels:
        kept.labels[out.name] = kept.labels[node.name]
    node.replace_all_uses_with(out)
    graph.erase_node(node)


@channel_rule(aten.layer_norm.default, aten.rms_norm.default, rewrite=keep_original_count)
def _layer_norm(an: Any, node: torch.fx.Node) -> Label | None:
    """Norms over the channel dim stay exact if the statistics keep the original count.

    Zeroed channels add 0 to sum(x) and sum(x^2); :func:`keep_original_count` rewrites the
    norm to divide by the original channel count (and adds the removed zeros' share of the
    variance), so hidden sizes behind LayerNorm/RMSNorm are prunable (DESIGN §4).
    """
    x, shape = node.args[0], arg(node, "normalized_shape")
    lab = an.label(x)
    if lab is None:
        return None
    nd = len(an.shape(x))
    w = arg(node, "weight")
    b = arg(node, "bias") if node.target is aten.layer_norm.default else None
    if lab.dim >= nd - len(shape):
        why = ("over several dims" if len(shape) != 1 else
               "whose input is not zero for pruned channels" if not lab.ok else
               "without an affine weight" if not isinstance(w, torch.fx.Node) else None)
        if why:
            an.pin(lab, node, f"{node.target}: normalises over the channel dim {why}")
            return None
        bias(an, w, lab.atoms)
        bias(an, b, lab.atoms)
        return lab  # zeroed unit: (0 - mean) / std * 0 + 0 = 0
    return lab.moved(lab.dim, ok=lab.ok and b is None)
