"""Search directions g^ of QASSO (GETA_SPEC §C.2), as multi-tensor (``torch._foreach_*``) ops.

* ``sgd``: heavy ball ``m <- momentum * m + (1 - dampening) * g`` (first call ``m <- g``, as in
  ``torch.optim.SGD``); ``g^ = m`` (``g`` when momentum is 0).
* ``adam`` / ``adamw``: ``m <- lerp(m, g, 1 - b1)``, ``v <- b2 v + (1 - b2) g^2``,
  ``g^ = (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)``.  GETA_SPEC G.2 #14 fixed: the
  moments start at **zero** and are bias-corrected (the reference starts them at ``g`` and
  ``g^2``, which scales the first steps by about 0.32).
* ``adam`` and ``sgd`` add L2 weight decay ``wd * p`` to the gradient; ``adamw``'s decoupled
  decay is applied by the caller.  Quantizer scalars never get weight decay.

Mixed precision: a float16/bfloat16 weight has an fp32 master copy in ``state[p]["master"]``;
:func:`value` is that copy (what every update reads and writes), :func:`grad` the gradient in
float32, and the moments are float32 -- so a 16-bit model steps exactly as AdamW on fp32 copies
of its weights, rounded to 16 bits after each step (the caller copies them down).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from geta_fx.optim._layout import local_tensor


def _local(ts: list[Tensor]) -> list[Tensor]:
    """The parts this process holds (FSDP2 ``DTensor`` s -> local shards; no copy)."""
    return [local_tensor(t) for t in ts]


def value(p: Tensor, state: Any) -> Tensor:
    """What QASSO steps for ``p``: its fp32 master copy if it has one, else its local part
    (also for a buffer, which has no state)."""
    st = state.get(p)
    master = st.get("master") if st else None
    return master if master is not None else local_tensor(p)


def grad(p: Tensor, state: Any) -> Tensor:
    """The local gradient of ``p``, in float32 when ``p`` has an fp32 master copy."""
    g = local_tensor(p.grad)  # type: ignore[arg-type]
    st = state.get(p)
    return g.float() if st and "master" in st else g


def update_moments(variant: str, weights: list[nn.Parameter], state: Any,
                   group: dict[str, Any]) -> list[int]:
    """Advance the moment buffers of every weight with a gradient (in place, on the local
    shards); returns the indices of those weights.  Their directions are then
    :func:`directions` -- a pure function of the updated state, so it may be evaluated
    chunk by chunk, or twice, with identical results."""
    idx = [i for i, p in enumerate(weights) if p.grad is not None]
    if not idx or (variant == "sgd" and float(group["momentum"]) == 0):
        return idx
    ps = [value(weights[i], state) for i in idx]
    grads = [grad(weights[i], state) for i in idx]
    wd = float(group["weight_decay"])
    if wd != 0 and variant != "adamw":
        grads = list(torch._foreach_add(grads, ps, alpha=wd))  # L2 (GETA_SPEC C.2)
    states = [state[weights[i]] for i in idx]
    if variant == "sgd":
        mom, damp = float(group["momentum"]), float(group["dampening"])
        old_b, old_g = [], []
        for st, g in zip(states, grads, strict=True):
            if "momentum_buffer" not in st:  # first call: m <- g
                st["momentum_buffer"] = g.detach().clone()
            else:
                old_b.append(local_tensor(st["momentum_buffer"]))
                old_g.append(g)
        if old_b:
            torch._foreach_mul_(old_b, mom)
            torch._foreach_add_(old_b, old_g, alpha=1.0 - damp)
        return idx
    b1, b2 = group["betas"]
    for st in states:
        st["step"] += 1
    m = _local([st["exp_avg"] for st in states])
    v = _local([st["exp_avg_sq"] for st in states])
    torch._foreach_lerp_(m, grads, 1.0 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, 1.0 - b2)
    return idx


def directions(variant: str, ps: list[nn.Parameter], state: Any, group: dict[str, Any],
               take: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
    """g^ (local shards) of weights whose moments :func:`update_moments` just advanced.

    ``take`` (e.g. ``lambda t: t.index_select(dim, rows)``) is applied to every input first:
    the directions of those elements only, bitwise equal to the same elements of the whole
    (element-wise ops).  Temporaries: one or two tensors the size of ``ps`` (or ``take``'s).
    """
    pick = take if take is not None else (lambda t: t)
    if variant == "sgd":
        if float(group["momentum"]) != 0:
            return [pick(local_tensor(state[p]["momentum_buffer"])) for p in ps]
        grads = [pick(grad(p, state)) for p in ps]
        wd = float(group["weight_decay"])
        if wd == 0:
            return grads
        return list(torch._foreach_add(grads, [pick(value(p, state)) for p in ps], alpha=wd))
    m, denom, bc1 = _adam_parts(ps, state, group, pick)
    dirs = list(torch._foreach_div(m, denom))
    torch._foreach_div_(dirs, bc1)
    return dirs


def _adam_parts(ps: list[nn.Parameter], state: Any, group: dict[str, Any],
                pick: Callable[[Tensor], Tensor]) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """``(m, sqrt(v / (1 - b2^k)) + eps, 1 - b1^k)``: Adam's direction is ``m / denom / bc1``
    (the denominator is the one temporary, as in ``torch.optim``'s foreach Adam)."""
    b1, b2 = group["betas"]
    states = [state[p] for p in ps]
    m = [pick(local_tensor(st["exp_avg"])) for st in states]
    v = [pick(local_tensor(st["exp_avg_sq"])) for st in states]
    bc1 = [1.0 - b1 ** st["step"] for st in states]
    bc2 = [math.sqrt(1.0 - b2 ** st["step"]) for st in states]
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, float(group["eps"]))
    return m, list(denom), bc1


def step_(variant: str, ps: list[nn.Parameter], values: list[Tensor], state: Any,
          group: dict[str, Any], lr: float) -> None:
    """``values -= lr * g^`` in place (``values``: :func:`value` of ``ps``) without forming
    g^: Adam's is one ``_foreach_addcdiv_`` (what ``torch.optim.AdamW`` does; one
    temporary per tensor, the denominator), SGD's one ``_foreach_add_``."""
    if variant == "sgd":
        torch._foreach_add_(values, directions(variant, ps, state, group), alpha=-lr)
        return
    m, denom, bc1 = _adam_parts(ps, state, group, lambda t: t)
    torch._foreach_addcdiv_(values, m, denom, [-lr / b for b in bc1])


def chunks(sizes: list[int], budget: int = 1 << 22) -> list[list[int]]:
    """Positions ``0..len(sizes)-1`` in runs of at most ``budget`` elements (a larger tensor
    is a run of its own): the unit of work whose directions exist at the same time."""
    out: list[list[int]] = []
    total = budget
    for i, n in enumerate(sizes):
        if total + n > budget:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def quant_direction(variant: str, st: dict[str, Any], grads: Tensor,
                    hp: dict[str, Any]) -> Tensor:
    """g^ of the stacked quantizer scalars ``[log_d | log_q_m | t]`` (no weight decay)."""
    st["step"] += 1
    if variant == "sgd":
        mom, damp = float(hp["momentum"]), float(hp["dampening"])
        if mom == 0:
            return grads
        buf = st.get("momentum_buffer")
        if buf is None:
            st["momentum_buffer"] = buf = grads.clone()
        else:
            buf.mul_(mom).add_(grads, alpha=1.0 - damp)
        return buf
    b1, b2 = hp["betas"]
    st["exp_avg"].lerp_(grads, 1.0 - b1)
    st["exp_avg_sq"].mul_(b2).addcmul_(grads, grads, value=1.0 - b2)
    bc1 = 1.0 - b1 ** st["step"]
    bc2 = math.sqrt(1.0 - b2 ** st["step"])
    return (st["exp_avg"] / bc1) / (st["exp_avg_sq"].sqrt() / bc2 + float(hp["eps"]))
