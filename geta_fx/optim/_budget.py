"""Bit budgets for QASSO (issue #20): ``target_avg_bits`` / ``target_bops``, met on the slim model.

GETA's joint step sends every quantized layer of a group being pruned to the lowest bit width
(GETA_SPEC C.6: ``d* = d_hi`` when ``cos_r >= 0`` or ``gamma == 0``), so without a budget a run
ends as uniform ``b_l``-bit QAT.  With a budget, the weight bit widths are *allocated* instead,
by this rule:

Sensitivity
    ``s_l(b) = 1/2 * sum_i F_i * (Q_b(w_i) - w_i)^2`` over the weights of quantizer ``l``: the
    second-order loss change of quantizing them at ``b`` bits with the layer's own ``q_m``,
    ``t`` and signedness (:func:`geta_fx.optim._joint.fake_quant`, the op's forward), weighted
    by the diagonal empirical Fisher ``F = E[g^2]`` -- Adam's bias-corrected second moment
    (``adam``/``adamw``), or an EMA of ``g^2`` with the same ``beta2`` that QASSO keeps for
    ``sgd`` in budget mode.  Pruned (zero) weights contribute nothing (``Q(0) = 0``).  The
    first-order term ``g . e`` is left out: its sign is noise at a trained point (HAWQ's
    reasoning).  A layer whose output the loss ignores has ``F = 0`` and gets the floor; one
    it cannot tolerate keeps bits.
Allocation
    The integer bits ``b_l`` in ``[b_l, final b_u]`` that minimise ``sum_l s_l(b_l)`` with the
    budget met: ``sum_l cost_l * b_l + fixed`` within the tolerance below the target (a
    multiple-choice knapsack, solved exactly by dynamic programming on a fine grid of the
    budget; :func:`allocate`).  ``cost_l`` is the quantizer's stored weights
    (average bits) or its MACs times the other operand's bits (BOPs): both budgets are linear
    in the weight bits (activation bits are what they learned, rounded, within
    ``act_bit_range``), from :func:`geta_fx.report.bit_cost` -- the cost model the report uses.
When
    A provisional allocation at the first projection step (from the dense model's cost; a BOPs
    budget scaled by ``(1 - target_sparsity)^2`` for the pruning to come) pins each weight
    quantizer at its bits through projection and pruning, so the joint step decays redundant
    rows towards the layer's allocated grid, not to ``b_l``.  At the first cool-down step the
    pruned structure is final: the allocation is redone exactly on ``gm.compress()`` (default
    arguments) and frozen, and the achieved value is reported by ``QASSO.metrics()``.
Selection (``target_bops``, ``QASSO(budget_selection=True)``)
    The units are priced too: ``saliency - lam * saving`` (:func:`priced`), ``saving`` being
    what removing a unit saves of the BOPs at the allocated bits, measured per group on the
    slim model.  :func:`budget_price` finds ``lam*``, the least price at which the units still
    to remove meet the budget at those bits; QASSO then tries fractions of it and keeps the
    one whose exactly allocated structure has the least ``1/2 sum F w^2`` (removed rows) plus
    ``sum_l s_l(b_l)``: removal and quantization in one second-order loss estimate.

Tolerance: 0.05 bits for ``target_avg_bits``; 1% of the target for ``target_bops``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from geta_fx.errors import InputError
from geta_fx.optim._joint import fake_quant
from geta_fx.quantizer import d_for_bits

if TYPE_CHECKING:
    from geta_fx.report import BitCost

AVG_BITS_TOL = 0.05   # bits
BOPS_REL_TOL = 0.01   # of the target


@dataclass(frozen=True)
class Budget:
    """``kind`` ``"avg_bits"`` (bits per quantized weight) or ``"bops"`` (fraction of the dense
    FP32 BOPs)."""

    kind: Literal["avg_bits", "bops"]
    value: float

    @property
    def tol(self) -> float:
        return AVG_BITS_TOL if self.kind == "avg_bits" else BOPS_REL_TOL * self.value

    def describe(self, v: float) -> str:
        return f"{v:.3f} bits" if self.kind == "avg_bits" else f"{v:.4%} of the FP32 BOPs"


def make(target_avg_bits: float | None, target_bops: float | None) -> Budget | None:
    """The budget the arguments ask for (at most one), checked for range."""
    if target_avg_bits is not None and target_bops is not None:
        raise InputError("QASSO: give target_avg_bits or target_bops, not both")
    if target_avg_bits is not None:
        v = float(target_avg_bits)
        if not v > 0:
            raise InputError(f"QASSO: target_avg_bits must be > 0, got {target_avg_bits}")
        return Budget("avg_bits", v)
    if target_bops is not None:
        v = float(target_bops)
        if not 0 < v <= 1:
            raise InputError(f"QASSO: target_bops is a fraction of the dense FP32 BOPs, in "
                             f"(0, 1], got {target_bops}")
        return Budget("bops", v)
    return None


@dataclass(frozen=True)
class Linear:
    """A budget's total as ``fixed + sum_l unit[l] * bits[l]`` over the weight quantizers,
    against ``limit`` (all in the budget's units: bits x parameters, or BOPs / FP32 BOPs)."""

    unit: Tensor    # [L] float64, 0 for quantizers that cost nothing (activations)
    fixed: float
    limit: float
    scale: float    # what the total is divided by to read as the budget (params; 1)


def linear_cost(budget: Budget, bc: BitCost, names: list[str], is_weight: list[bool],
                act_bits: dict[str, int], shrink: float = 1.0) -> Linear:
    """The budget as a :class:`Linear` form over the weight quantizers ``names`` (``bc``: the
    report's cost with the bits left open; ``act_bits``: the activation quantizers' bits).
    ``shrink`` scales the MACs (the provisional BOPs estimate of pruning to come)."""
    L = len(names)
    unit = torch.zeros(L, dtype=torch.float64)
    index = {n: i for i, n in enumerate(names)}
    if budget.kind == "avg_bits":
        n = 0
        for q, k in bc.weight_numel.items():
            if q in index and is_weight[index[q]]:
                unit[index[q]] += k
                n += k
        return Linear(unit, 0.0, budget.value * n, float(max(n, 1)))
    fixed = 0.0
    fp32 = float(bc.fp32_bops)
    for macs, w, a in bc.terms:
        wq = [s for s in (w, a) if isinstance(s, str) and s in index and is_weight[index[s]]]
        if wq:  # linear in the weight quantizer's bits
            other = a if wq[0] == w else w
            ob = other if isinstance(other, int) else act_bits[other]
            unit[index[wq[0]]] += macs * ob * shrink / fp32
        else:
            bw = w if isinstance(w, int) else act_bits[w]
            ba = a if isinstance(a, int) else act_bits[a]
            fixed += macs * bw * ba * shrink / fp32
    return Linear(unit, fixed, budget.value, 1.0)


def sensitivities(ws: list[Tensor | None], fishers: list[Tensor | None], q_m: Tensor, t: Tensor,
                  signed: Tensor, lo: int, hi: int) -> Tensor:
    """``s[l, j] = 1/2 sum F (Q_{lo+j}(w) - w)^2`` for every weight quantizer (rows of ``None``
    weights: zeros), float64 ``[L, hi - lo + 1]`` on the CPU."""
    out = torch.zeros(len(ws), hi - lo + 1, dtype=torch.float64)
    for i, (w, f) in enumerate(zip(ws, fishers, strict=True)):
        if w is None or f is None:
            continue
        w32 = w.detach().float()
        for j, b in enumerate(range(lo, hi + 1)):
            d = d_for_bits(torch.tensor(float(b)), q_m[i], t[i], signed[i])
            e = fake_quant(w32, d, q_m[i], t[i], signed[i]) - w32
            out[i, j] = 0.5 * float((f.float() * e * e).sum(dtype=torch.float64))
    return out


def allocate(sens: Tensor, cost: Linear, lo: int, hi: int, tol: float,
             active: Tensor) -> tuple[Tensor, float]:
    """The least total sensitivity with the budget met (module docstring): integer bits
    ``[L]`` (``lo`` where not ``active``) and the budget value they reach.

    A multiple-choice knapsack solved by dynamic programming over the layers, on a grid of
    the budget fine enough (``tol / (2 L)``) that rounding every layer's cost to it moves the
    total by at most ``tol / 4``.  Preferred: a total in ``[limit - tol, limit + tol / 4]``;
    else within ``tol`` above; else the reachable total nearest the limit (the caller reports
    the miss).
    """
    L, nb = sens.shape
    unit = cost.unit
    bits = torch.full((L,), lo, dtype=torch.long)
    layers = [i for i in range(L) if bool(active[i]) and float(unit[i]) > 0]
    base = cost.fixed + float(unit[layers].sum()) * lo if layers else cost.fixed
    tol_raw = tol * cost.scale
    span = cost.limit + tol_raw - base
    if not layers or span <= 0:
        return bits, (base if layers else cost.fixed) / cost.scale
    delta = max(tol_raw / (2 * len(layers)), span / 400_000)
    G = int(span / delta) + 1
    inf = float("inf")
    dp = torch.full((G,), inf, dtype=torch.float64)
    dp[0] = 0.0
    choice = torch.zeros(len(layers), G, dtype=torch.int8)
    for n, i in enumerate(layers):
        new = torch.full_like(dp, inf)
        for j in range(nb):
            k = int(round(float(unit[i]) * j / delta))
            if k >= G:
                break
            cand = torch.full_like(dp, inf)
            cand[k:] = dp[:G - k] + float(sens[i, j])
            better = cand < new
            new = torch.where(better, cand, new)
            choice[n] = torch.where(better, torch.tensor(j, dtype=torch.int8), choice[n])
        dp = new
    grid = torch.arange(G, dtype=torch.float64) * delta + base
    finite = torch.isfinite(dp)
    pick = None
    # the grid total is within tol / 4 of the exact one: windows narrowed by that much
    inner = 0.75 * tol_raw
    for lo_t, hi_t in ((cost.limit - inner, cost.limit), (cost.limit - inner,
                                                         cost.limit + inner)):
        ok = finite & (grid >= lo_t) & (grid <= hi_t)
        if bool(ok.any()):
            pick = int(torch.where(ok, dp, torch.tensor(inf, dtype=torch.float64)).argmin())
            break
    if pick is None:  # nothing near the limit: the reachable total closest to it
        dist = torch.where(finite, (grid - cost.limit).abs(), torch.tensor(inf,
                                                                          dtype=torch.float64))
        pick = int(dist.argmin())
    g = pick
    for n in range(len(layers) - 1, -1, -1):
        i = layers[n]
        j = int(choice[n, g])
        bits[i] = lo + j
        g -= int(round(float(unit[i]) * j / delta))
    total = cost.fixed + float((unit[layers] * bits[layers].double()).sum())
    return bits, total / cost.scale


def reach(cost: Linear, lo: int, hi: int, active: Tensor) -> tuple[float, float]:
    """The least and most the budget can read over the bit range."""
    u = cost.unit[active]
    return ((cost.fixed + float(u.sum()) * lo) / cost.scale,
            (cost.fixed + float(u.sum()) * hi) / cost.scale)



def priced(scores: Tensor, saving: Tensor, lam: float) -> Tensor:
    """``scores - lam * saving / max(saving)``: saliency priced by what removal saves."""
    top = float(saving.max()) if saving.numel() else 0.0
    return scores if lam == 0 or top <= 0 else scores - lam * (saving / top)


def budget_price(scores: Tensor, saving: Tensor, base: float, limit: float,
                 plan: Callable[[Tensor], Tensor], iters: int = 40) -> tuple[float, float]:
    """The least price that makes the planned removal meet the budget.

    ``scores`` [U]: saliency, lower = more redundant; ``saving`` [U] >= 0: what removing each
    unit saves of the budget (its group's marginal cost at the allocated bits); ``base``: the
    committed structure's cost; ``plan(adjusted)``: the units the selection would remove by
    the end of the pruning stage, ranked by ``adjusted`` scores (all its limits applied).

    Returns the least ``lam >= 0`` for which the plan ranked by :func:`priced` scores costs
    ``base - sum(saving[plan]) <= limit`` (a Lagrangian relaxation of "least saliency removed,
    budget met": ``lam = 0`` is GETA's ranking), found by bisection, and that plan's cost.
    When no ``lam`` meets the limit, the one that ranks by saving alone (the most removed;
    the caller's budget check reports the miss).
    """
    def cost(lam: float) -> float:
        return base - float(saving[plan(priced(scores, saving, lam))].sum())

    top = float(saving.max()) if saving.numel() else 0.0
    if top <= 0 or cost(0.0) <= limit:
        return 0.0, cost(0.0)
    unit = saving / top
    spread = float(scores.max() - scores.min()) + 1e-12
    hi = spread / max(float(unit[unit > 0].min()), 1e-12) * 2  # ranking by saving alone
    if cost(hi) > limit:
        return hi, cost(hi)
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if cost(mid) <= limit else (mid, hi)
    return hi, cost(hi)
