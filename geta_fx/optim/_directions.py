"""Search directions g^ of QASSO (GETA_SPEC §C.2), as multi-tensor (``torch._foreach_*``) ops.

* ``sgd``: heavy ball ``m <- momentum * m + (1 - dampening) * g`` (first call ``m <- g``, as in
  ``torch.optim.SGD``); ``g^ = m`` (``g`` when momentum is 0).
* ``adam`` / ``adamw``: ``m <- lerp(m, g, 1 - b1)``, ``v <- b2 v + (1 - b2) g^2``,
  ``g^ = (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)``.  GETA_SPEC G.2 #14 fixed: the
  moments start at **zero** and are bias-corrected (the reference starts them at ``g`` and
  ``g^2``, which scales the first steps by about 0.32).
* ``adam`` and ``sgd`` add L2 weight decay ``wd * p`` to the gradient; ``adamw``'s decoupled
  decay is applied by the caller.  Quantizer scalars never get weight decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def weight_directions(variant: str, weights: list[nn.Parameter], state: Any,
                      group: dict[str, Any]) -> list[Tensor | None]:
    """g^ of every weight (``None`` where it has no gradient: it is not updated)."""
    idx = [i for i, p in enumerate(weights) if p.grad is not None]
    out: list[Tensor | None] = [None] * len(weights)
    if not idx:
        return out
    ps = [weights[i] for i in idx]
    grads: list[Tensor] = [weights[i].grad for i in idx]  # type: ignore[misc]
    wd = float(group["weight_decay"])
    if wd != 0 and variant != "adamw":
        grads = list(torch._foreach_add(grads, ps, alpha=wd))  # L2 (GETA_SPEC C.2)
    if variant == "sgd":
        mom, damp = float(group["momentum"]), float(group["dampening"])
        if mom == 0:
            dirs = list(grads)
        else:
            old_b, old_g = [], []
            for p, g in zip(ps, grads, strict=True):
                st = state[p]
                if "momentum_buffer" not in st:  # first call: m <- g
                    st["momentum_buffer"] = g.detach().clone()
                else:
                    old_b.append(st["momentum_buffer"])
                    old_g.append(g)
            if old_b:
                torch._foreach_mul_(old_b, mom)
                torch._foreach_add_(old_b, old_g, alpha=1.0 - damp)
            dirs = [state[p]["momentum_buffer"] for p in ps]
    else:
        b1, b2 = group["betas"]
        states = [state[p] for p in ps]
        for st in states:
            st["step"] += 1
        m = [st["exp_avg"] for st in states]
        v = [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(m, grads, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1.0 - b2)
        bc1 = [1.0 - b1 ** st["step"] for st in states]
        bc2 = [math.sqrt(1.0 - b2 ** st["step"]) for st in states]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, float(group["eps"]))
        dirs = list(torch._foreach_div(m, denom))
        torch._foreach_div_(dirs, bc1)
    for i, d in zip(idx, dirs, strict=True):
        out[i] = d
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
