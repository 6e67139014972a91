"""The joint pruning + quantization update of GETA_SPEC §C.6, vectorised over groups and layers.

A :class:`JointPlan` is built once per pruning period (when the redundant units are selected;
that is the only place with a host sync, to size the row lists): per slab of the layout, the
rows of its redundant units (no per-element index).  Each joint step then reads just those
rows (``index_select`` along the slab's dim), computes the forget rate ``gamma`` per prunable
group and the step size ``d*`` per quantized layer from per-row sums, and returns per block the
rate its rows' forget term is scaled by.  Under FSDP2 the per-group and per-layer sums are
completed across ranks by the caller's ``reduce``, so every rank computes the same rates.

Departures from the reference, each a defect of GETA_SPEC G.2:

* #8  the "nothing to forget" guard uses the norm of the clipped weights, ``||c|| < 1e-8``,
  not their signed mean (which is negative for about half of all weight sets and then froze
  ``gamma`` at 0 and forced ``d`` to ``d_hi``);
* #9  ``d*`` is computed and written per quantized layer, from that layer's redundant rows and
  its own ``q_m``, ``t`` and bit bounds.  The reference writes one shared ``d`` (from the
  group's largest ``q_m``) into every layer of a node group, although residual-stream groups
  hold layers with very different ranges.  A layer whose rows lie in several active groups
  uses the smallest of their forget rates;
* #10 every element is decayed exactly once per step: an element shared by several units
  (auxiliary / concatenated channels) takes the largest of their rates instead of being
  scaled once per unit;
* ``gamma`` is clipped to ``[0, 1]`` (a rate above 1 would flip the sign of the redundant
  weights; the negative-alignment branch is unbounded in the reference) and the final ``d*`` to
  ``[d(b_u), d(b_l)]`` so the bit range holds exactly even when the closed-form count of the
  reference's ``while d* < d_lo: gamma *= 0.8; d* /= 0.8`` loop is off by one rounding step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from geta_fx.optim._layout import Layout, sum_but
from geta_fx.quantizer import d_for_bits

#: ``reduce(op, tensor)``: the tensor completed across ranks (``op``: ``"sum"`` or ``"min"``).
Reduce = Callable[[str, Tensor], Tensor]

ETA = 0.999   # GETA_SPEC C.6 safety factor eta
ZETA = 0.9    # GETA_SPEC C.6 safety factor zeta
SHRINK = 0.8  # the reference's gamma back-off factor


@dataclass(frozen=True, eq=False)
class Block:
    """The redundant rows of one slab: ``rows`` (local positions along ``dim``) of
    ``Layout.params[param]``, row ``k`` in prunable group ``row_group[k]``."""

    param: int
    dim: int
    rows: Tensor          # [r] long
    row_group: Tensor     # [r] long
    layer: int            # weight-quantizer index of the tensor (L = not quantized)


@dataclass
class JointPlan:
    """One period's redundant rows, slab by slab (no per-element index)."""

    redundant: Tensor                 # [U] bool
    blocks: list[Block]

    @property
    def empty(self) -> bool:
        return not self.blocks

    @property
    def params(self) -> list[int]:
        """Indices (into ``Layout.params``) of the tensors with redundant rows, each once."""
        return sorted({b.param for b in self.blocks})


def build_plan(redundant: Tensor, layout: Layout) -> JointPlan:
    """The redundant rows of every parameter slab; syncs once (the sizes of the row lists)."""
    blocks = []
    for s in layout.slabs:
        if s.param is None or not len(s.index):
            continue
        keep = redundant[s.units]
        if not bool(keep.any()):
            continue
        blocks.append(Block(param=s.param, dim=s.dim, rows=s.index[keep],
                            row_group=layout.unit_group[s.units[keep]],
                            layer=layout.param_layer[s.param]))
    return JointPlan(redundant=redundant, blocks=blocks)


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    """``v [r]`` shaped to broadcast along dim ``dim`` of an ``ndim``-D block."""
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


def clipped_power(a: Tensor, q: Tensor, t: Tensor) -> Tensor:
    """``min(a, q)^t`` for ``a >= 0`` with the reference op's exact ``t == 1`` branch."""
    m = torch.minimum(a, q)
    return torch.where(t == 1, m, torch.exp(t * torch.log(m)))


#: ``(sign(x), min(|x|, q_m)^t)`` of a block, computed once per joint step and shared by the
#: statistics and the forget term (both use the same, updated ``q_m`` and ``t``).
Parts = tuple[Tensor, Tensor]


def fake_quant(x: Tensor, d: Tensor, q: Tensor, t: Tensor, signed: Tensor,
               parts: Parts | None = None) -> Tensor:
    """Elementwise ``geta::quantize`` with per-element ``d``, ``q_m``, ``t``, ``signed``.

    Same forward contract as :mod:`geta_fx.ops.reference` (``Q(0) = 0``; unsigned maps
    ``x <= 0`` to 0), used where one op call per layer would loop over layers.  ``parts``:
    ``(sign(x), clipped_power(|x|, q, t))`` when the caller has them (bitwise the same).
    """
    sgn, c = parts if parts is not None else (torch.sign(x), clipped_power(x.abs(), q, t))
    level = torch.round(c / d) * d
    active = (x != 0) & (signed | (x > 0)) & (torch.minimum(x.abs(), q) > 0)
    return torch.where(active, sgn * level, torch.zeros_like(x))


def _forget_rate(stats: Tensor, rate: float, lr: float) -> Tensor:
    """``gamma`` per group from ``(<c,g>, ||c||^2, ||g||^2)`` (GETA_SPEC C.6 rule)."""
    cg, cc, gg = stats.unbind(1)
    nc, ng = cc.sqrt(), gg.sqrt()
    cos = cg / (nc.clamp_min(1e-8) * ng)
    neg = -(1 - ETA) * lr * ng / (cos * nc.clamp_min(1e-8))
    gamma = torch.where(cos >= 0, torch.full_like(cos, rate), neg)
    ok = torch.isfinite(cos) & (nc >= 1e-8)  # G.2 #8: a norm, not the signed mean
    gamma = torch.where(ok & torch.isfinite(gamma), gamma, torch.zeros_like(gamma))
    return gamma.clamp(0.0, 1.0)


def _step_size(stats: Tensor, gamma: Tensor, d_lo: Tensor, d_hi: Tensor,
               lr: float) -> tuple[Tensor, Tensor]:
    """``(d*, gamma')`` per layer from ``(<r,g>, ||r||^2, ||g||^2)`` and the layer's gamma."""
    rg, rr, gg = stats.unbind(1)
    nr, ng = rr.sqrt(), gg.sqrt()
    cos = rg / (nr.clamp_min(1e-8) * ng)
    d_star = -ZETA * ETA * lr * ng / (gamma * cos * nr.clamp_min(1e-8))
    use_hi = ~(cos < 0) | ~(gamma > 0) | ~torch.isfinite(d_star) | ~(d_star > 0)
    d_star = torch.where(use_hi, d_hi, d_star)
    # closed form of `while d* < d_lo: gamma *= 0.8; d* /= 0.8`
    n = torch.ceil(torch.log(d_lo / d_star) / math.log(1 / SHRINK)).clamp_min(0)
    n = torch.where(d_star < d_lo, n, torch.zeros_like(n))
    scale = torch.pow(torch.full_like(n, SHRINK), n)
    gamma = torch.where(use_hi, gamma, gamma * scale)
    d_star = torch.minimum(torch.maximum(d_star / scale, d_lo), d_hi)
    return d_star, gamma


def _block_terms(x: Tensor, quant: bool, d: Tensor, q: Tensor, t: Tensor
                 ) -> tuple[Tensor, Tensor | None, Parts | None]:
    """``(c, r, parts)`` of a block: clipped-powered weights, quantization residual and the
    :data:`Parts` the forget term reuses (None when the tensor is not quantized: ``c = x``,
    ``r = 0``)."""
    if not quant:
        return x, None, None
    sgn = torch.sign(x)
    c_abs = clipped_power(x.abs(), q, t)
    ratio = c_abs / d
    r = torch.where(x != 0, sgn * (torch.round(ratio) - ratio), torch.zeros_like(x))
    return sgn * c_abs, r, (sgn, c_abs)


def _block_stats(plan: JointPlan, xs: list[Tensor], gs: list[Tensor], d_old: Tensor,
                 q_m: Tensor, t: Tensor, num_groups: int, reduce: Reduce | None
                 ) -> tuple[Tensor, Tensor, list[Parts | None]]:
    """Per group ``(<c,g>, ||c||^2, ||g||^2)`` and per layer ``(<r,g>, ||r||^2, ||g||^2, n)``
    over the redundant rows (all ranks' rows when ``reduce`` sums across them), and each
    block's :data:`Parts`."""
    num_layers = len(d_old) - 1
    gstats = torch.zeros(num_groups, 3, dtype=torch.float32, device=d_old.device)
    lstats = torch.zeros(num_layers + 1, 4, dtype=torch.float32, device=d_old.device)
    parts: list[Parts | None] = []
    for b, x, g in zip(plan.blocks, xs, gs, strict=True):
        quant = b.layer < num_layers
        c, r, part = _block_terms(x, quant, d_old[b.layer], q_m[b.layer], t[b.layer])
        parts.append(part)
        gg = sum_but(g * g, b.dim)
        gstats.index_add_(0, b.row_group, torch.stack([sum_but(c * g, b.dim),
                                                       sum_but(c * c, b.dim), gg], 1))
        if quant and r is not None:
            lstats[b.layer] += torch.stack([(r * g).sum(), (r * r).sum(), gg.sum(),
                                            torch.tensor(float(x.numel()), device=x.device)])
    if reduce is not None:
        gstats, lstats = reduce("sum", gstats), reduce("sum", lstats)
    return gstats, lstats, parts


def joint_update(plan: JointPlan, xs: list[Tensor], gs: list[Tensor], d_old: Tensor,
                 q_m: Tensor, t: Tensor, signed: Tensor, b_l: float | Tensor,
                 b_u: float | Tensor, rate: float,
                 lr: float, num_groups: int, reduce: Reduce | None = None
                 ) -> tuple[list[Tensor], Tensor, Tensor, list[Parts | None]]:
    """One joint step over the redundant rows.

    Args:
        plan: this period's redundant rows.
        xs, gs: per block of ``plan``, its rows' current values and search directions
            (float32, shaped like the rows).
        d_old, q_m, t, signed: per quantizer, with a dummy last entry for "not quantized"
            (``[L + 1]``); ``d_old`` before this step, ``q_m`` (effective) and ``t`` after the
            plain step of the quantizer scalars.
        b_l, b_u: the bit range in force (or per quantizer, ``[L + 1]``: a bit budget's
            allocation, :mod:`geta_fx.optim._budget`).
        rate: ``1 / (T - t)``, the positive-alignment forget rate.
        lr: the weights' current learning rate (the reference's alpha).
        reduce: ``reduce(op, tensor)`` completes per-group/per-layer sums (``"sum"``) and the
            per-layer rates (``"min"``) across ranks (FSDP2); None: this process sees all rows.

    Returns:
        ``(rates, d_new [L + 1], joint [L + 1] bool, parts)``: ``rates[i]`` broadcasts against
        block ``i``; subtract ``rates[i] * base_i`` (:func:`forget_base`, given ``parts[i]``)
        from its rows.  Layers with ``joint`` get ``d = d_new`` instead of their projected
        plain step.
    """
    num_layers = len(d_old) - 1
    gstats, lstats, parts = _block_stats(plan, xs, gs, d_old, q_m, t, num_groups, reduce)
    gamma_g = _forget_rate(gstats, rate, lr)
    inf = torch.full((num_layers + 1,), float("inf"), dtype=torch.float32, device=d_old.device)
    gamma_l = inf.clone()
    for b in plan.blocks:  # a layer in several active groups takes the smallest rate (#9)
        if b.layer < num_layers:
            gamma_l[b.layer] = torch.minimum(gamma_l[b.layer], gamma_g[b.row_group].min())
    if reduce is not None:
        gamma_l = reduce("min", gamma_l)
    joint = lstats[:, 3] > 0
    gamma_l = torch.where(joint, gamma_l, torch.zeros_like(gamma_l))
    d_lo = d_for_bits(torch.as_tensor(b_u, dtype=torch.float32, device=d_old.device), q_m, t,
                      signed)
    d_hi = d_for_bits(torch.as_tensor(b_l, dtype=torch.float32, device=d_old.device), q_m, t,
                      signed)
    d_new, gamma_l = _step_size(lstats[:, :3], gamma_l, d_lo, d_hi, lr)
    rates = [gamma_l[b.layer] if b.layer < num_layers
             else _along(gamma_g[b.row_group], b.dim, x.dim())
             for b, x in zip(plan.blocks, xs, strict=True)]
    return rates, d_new, joint, parts


def forget_base(x: Tensor, layer: int, d_new: Tensor, q_m: Tensor, t: Tensor,
                signed: Tensor, parts: Parts | None = None) -> Tensor:
    """What the forget term scales: ``Q_{d*,q_m,t}(x)`` for a quantized tensor, else ``x``
    (``parts``: the block's from :func:`joint_update`)."""
    if layer >= len(d_new) - 1:
        return x
    return fake_quant(x, d_new[layer], q_m[layer], t[layer], signed[layer], parts)
