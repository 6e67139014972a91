"""Autograd for ``geta::quantize``: the backward is the op ``geta::quantize_backward``.

Going through the op (rather than reference math in Python) lets a backend kernel for
``quantize_backward`` accelerate training as well; without one, the reference runs.  The
gradient rules (straight-through for ``x`` masked at ``+-q_m``, LSQ-style ``d``, ``q_m`` from
the saturated region, ``t`` from ``d(m^t)/dt``) are documented in :mod:`geta_fx.ops.reference`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, d, q_m, t, signed = inputs
    ctx.save_for_backward(x, d, q_m, t)
    ctx.signed = signed


def _backward(
    ctx: Any, grad_y: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, None]:
    x, d, q_m, t = ctx.saved_tensors
    grad_x, grad_d, grad_q_m, grad_t = torch.ops.geta.quantize_backward.default(
        grad_y, x, d, q_m, t, ctx.signed
    )
    need = ctx.needs_input_grad
    return (
        grad_x if need[0] else None,
        grad_d if need[1] else None,
        grad_q_m if need[2] else None,
        grad_t if need[3] else None,
        None,
    )


torch.library.register_autograd("geta::quantize", _backward, setup_context=_setup_context)
