"""The joint pruning + quantization update of GETA_SPEC §C.6, vectorised over groups and layers.

A :class:`JointPlan` is built once per pruning period (when the redundant units are selected;
that is the only place with a host sync, to size the index tensors).  Each joint step then
gathers just the redundant elements, computes the forget rate ``gamma`` per prunable group and
the step size ``d*`` per quantized layer with a handful of ``index_add_`` /
``scatter_reduce_`` calls, and returns the forget term to subtract from those elements.

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
from dataclasses import dataclass

import torch
from torch import Tensor

from geta_fx.quantizer import d_for_bits

ETA = 0.999   # GETA_SPEC C.6 safety factor eta
ZETA = 0.9    # GETA_SPEC C.6 safety factor zeta
SHRINK = 0.8  # the reference's gamma back-off factor


@dataclass
class JointPlan:
    """Index tensors of one period's redundant elements (sub-vector of the stats vector)."""

    redundant: Tensor                              # [U] bool
    slices: list[tuple[int, Tensor, int, int]]     # (param index, local flat idx, start, end)
    sub_layer: Tensor                              # [Nr] layer of each redundant element
    pair_sub: Tensor | None                        # [Er] pair -> sub element (None: identity)
    pair_group: Tensor                             # [Er] prunable-group index of each pair
    num_elems: int

    @property
    def empty(self) -> bool:
        return self.num_elems == 0


def build_plan(redundant: Tensor, pair_elem: Tensor | None, pair_unit: Tensor,
               unit_group: Tensor, elem_layer: Tensor, numels: list[int]) -> JointPlan:
    """Gather the redundant elements; syncs once (sizes of the index tensors)."""
    dev = pair_unit.device
    red_pairs = torch.nonzero(redundant[pair_unit]).squeeze(1)
    elem = red_pairs if pair_elem is None else pair_elem[red_pairs]
    sub_elem, pair_sub = torch.unique(elem, sorted=True, return_inverse=True)
    bases = torch.tensor([0, *numels], dtype=torch.long).cumsum(0).to(dev)
    bounds = torch.searchsorted(sub_elem, bases).tolist()
    slices = []
    for i in range(len(numels)):
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            slices.append((i, sub_elem[lo:hi] - bases[i], lo, hi))
    identity = len(pair_sub) == len(sub_elem)
    return JointPlan(redundant=redundant, slices=slices, sub_layer=elem_layer[sub_elem],
                     pair_sub=None if identity else pair_sub,
                     pair_group=unit_group[pair_unit[red_pairs]], num_elems=len(sub_elem))


def clipped_power(a: Tensor, q: Tensor, t: Tensor) -> Tensor:
    """``min(a, q)^t`` for ``a >= 0`` with the reference op's exact ``t == 1`` branch."""
    m = torch.minimum(a, q)
    return torch.where(t == 1, m, torch.exp(t * torch.log(m)))


def fake_quant(x: Tensor, d: Tensor, q: Tensor, t: Tensor, signed: Tensor) -> Tensor:
    """Elementwise ``geta::quantize`` with per-element ``d``, ``q_m``, ``t``, ``signed``.

    Same forward contract as :mod:`geta_fx.ops.reference` (``Q(0) = 0``; unsigned maps
    ``x <= 0`` to 0), used where one op call per layer would loop over layers.
    """
    c = clipped_power(x.abs(), q, t)
    level = torch.round(c / d) * d
    active = (x != 0) & (signed | (x > 0)) & (torch.minimum(x.abs(), q) > 0)
    return torch.where(active, torch.sign(x) * level, torch.zeros_like(x))


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


def joint_update(plan: JointPlan, x: Tensor, g: Tensor, d_old: Tensor, q_m: Tensor, t: Tensor,
                 signed: Tensor, b_l: float, b_u: float, rate: float, lr: float,
                 num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """One joint step over the redundant elements.

    Args:
        plan: this period's redundant elements.
        x, g: their current values and search directions (``[Nr]``).
        d_old, q_m, t, signed: per quantizer, with a dummy last entry for "not quantized"
            (``[L + 1]``); ``d_old`` before this step, ``q_m`` (effective) and ``t`` after the
            plain step of the quantizer scalars.
        b_l, b_u: the bit range in force.
        rate: ``1 / (T - t)``, the positive-alignment forget rate.
        lr: the weights' current learning rate (the reference's alpha).

    Returns:
        ``(delta [Nr], d_new [L + 1], joint [L + 1] bool)``: subtract ``delta`` from the
        redundant elements; layers with ``joint`` get ``d = d_new`` instead of their projected
        plain step.
    """
    num_layers = len(d_old) - 1
    lay = plan.sub_layer
    quant = lay < num_layers
    q_e, t_e = q_m[lay], t[lay]
    sgn = torch.sign(x)
    c_abs = clipped_power(x.abs(), q_e, t_e)
    c = torch.where(quant, sgn * c_abs, x)
    ratio = c_abs / d_old[lay]
    r = torch.where(quant & (x != 0), sgn * (torch.round(ratio) - ratio), torch.zeros_like(x))

    ps = plan.pair_sub
    c_p, r_p, g_p = (c, r, g) if ps is None else (c[ps], r[ps], g[ps])
    lay_p = lay if ps is None else lay[ps]
    quant_p = lay_p < num_layers
    gid = plan.pair_group
    gstats = torch.zeros(num_groups, 3, dtype=x.dtype, device=x.device).index_add_(
        0, gid, torch.stack([c_p * g_p, c_p * c_p, g_p * g_p], 1))
    gamma_g = _forget_rate(gstats, rate, lr)
    gamma_pair = gamma_g[gid]

    qf = quant_p.to(x.dtype)
    lstats = torch.zeros(num_layers + 1, 4, dtype=x.dtype, device=x.device).index_add_(
        0, lay_p, torch.stack([r_p * g_p, r_p * r_p, g_p * g_p, qf], 1) * qf[:, None])
    inf = torch.full((num_layers + 1,), float("inf"), dtype=x.dtype, device=x.device)
    gamma_l = inf.scatter_reduce(0, lay_p, torch.where(quant_p, gamma_pair, inf[lay_p]), "amin")
    joint = lstats[:, 3] > 0
    gamma_l = torch.where(joint, gamma_l, torch.zeros_like(gamma_l))
    d_lo = d_for_bits(torch.tensor(b_u, dtype=x.dtype), q_m, t, signed)
    d_hi = d_for_bits(torch.tensor(b_l, dtype=x.dtype), q_m, t, signed)
    d_new, gamma_l = _step_size(lstats[:, :3], gamma_l, d_lo, d_hi, lr)

    gamma_pair = torch.where(quant_p, gamma_l[lay_p], gamma_pair)
    if ps is None:
        gamma_e = gamma_pair
    else:  # G.2 #10: one decay per element (the largest rate of its units)
        gamma_e = torch.zeros_like(x).scatter_reduce(0, ps, gamma_pair, "amax")
    base = torch.where(quant, fake_quant(x, d_new[lay], q_e, t_e, signed[lay]), x)
    return gamma_e * base, d_new, joint
