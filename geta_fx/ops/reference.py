"""Pure-PyTorch reference implementation of ``geta::quantize`` and ``geta::quantize_backward``.

Registered for ``CompositeExplicitAutograd``: it is the fallback on every device for which no
``TORCH_LIBRARY_IMPL(geta, <backend>)`` kernel is loaded, and the test oracle for those kernels.
A backend kernel takes precedence over this one on its device, so tests that compare a kernel
with the reference call :func:`quantize_reference` / :func:`quantize_backward_reference`
directly instead of going through the dispatcher.

The semantics below are the **contract** every implementation (C++ CPU, CUDA) must follow.

Inputs (checked by :func:`check_quantize_inputs`, also in the fake impl; kernels ``TORCH_CHECK``
the same conditions)
    ``x``: float32, float16 or bfloat16, any shape (0-dim and empty included), any strides.
    ``d`` (step size), ``q_m`` (clipping range), ``t`` (exponent): float32, exactly one element
    (shape ``[]`` or ``[1]``), on ``x``'s device.
    Preconditions that are *not* checked, because checking a value would sync the host with the
    device on every call (GETA_SPEC G.2 #16): ``d > 0``, ``q_m > 0``, all three finite.
    ``geta_fx.quantizer.Quantizer`` guarantees them (``d = exp(log_d)``,
    ``q_m = exp(log_q_m)``, both kept float32 under module dtype conversions) and its
    ``validate()`` reports violations.  With ``q_m <= 0`` every output element is 0
    (NaN ``x`` aside) and all gradients are finite; ``d <= 0`` is undefined behaviour.

Arithmetic
    All arithmetic is float32 (``x`` is upcast first); the result is cast back to ``x.dtype``
    with round-to-nearest-even.  Reductions accumulate in float32.  Notation, per element::

        a = |x|
        m = min(a, q_m)                   # clipped magnitude; +-inf -> q_m
        P(b, e) = b                       if e == 1      (exact: the linear quantizer, no exp/log)
                = exp(e * log(b))         otherwise      (only ever evaluated for b > 0)
        c = P(m, t)                       # clipped power
        r = c / d                         # true IEEE division, not a multiplication by 1/d
        level = round(r) * d              # round = round-half-to-even (torch.round, rintf)
        active = x != 0 and (signed or x > 0) and m > 0 and x is not NaN
        s = -1 if x < 0 else +1           # only used where active

Forward (GETA_SPEC §A.2 with the dead zone q_s = 0)::

        y = NaN              if x is NaN          (NaN is propagated, never laundered into 0)
          = s * level        if active
          = 0                otherwise            (x == 0; unsigned and x < 0, incl. -inf)

    * ``Q(0) = 0`` exactly, for every ``d``, ``q_m``, ``t`` (pruned groups stay exactly zero).
    * ``+-inf`` saturate to ``+-d * round(q_m^t / d)`` (unsigned: ``-inf -> 0``).
    * For ``|x| >= q_m`` this is ``s * d * round(q_m^t / d)``.  The reference repo adds ``1e-6``
      to ``q_m`` in the nonlinear variant before the power; that quirk is dropped, so the
      saturated level is the same on both sides of ``|x| == q_m``.
    * ``t == 1`` takes the exact branch of ``P``: ``exp(log(0.05))`` is not ``0.05`` in float32,
      and a ulp there flips ties such as ``round(0.05 / 0.1) = round(0.5) = 0``.  With ``t == 1``
      every operation is correctly rounded IEEE arithmetic, so kernels must agree **bitwise**.
      With ``t != 1``, ``exp``/``log`` may differ by a few ulp between libraries, which can flip a
      near-tie of ``round`` by one level ``d``; kernels must agree to within ``d`` elementwise and
      exactly almost everywhere.
    * For a negative ``x`` whose level rounds to 0 the output is ``-0.0`` (equal to ``0``).
    * The output approximates ``sign(x) * |x|^t``; the power is not inverted (as in the paper).
    * Output: dtype of ``x``, strides of ``torch.empty_like(x)``.

Backward (GETA_SPEC §A.4 rules, with defect G.2 #4 fixed and no NaN check / host sync)::

        grad_x = NaN                      if x is NaN
               = 0                        if a > q_m                   (clipped)
               = 0                        if not signed and x < 0      (unsigned dead side)
               = grad_y                   otherwise (straight-through; includes x == 0 and
                                          a == q_m exactly, the torch.clamp convention)
        grad_d   = sum over active of  grad_y * s * (round(r) - r)
        grad_q_m = sum over active with a > q_m of  grad_y * s   times   t * P(q_m, t - 1)
        grad_t   = sum over active of  grad_y * s * c * log(m)

    * ``grad_d`` is the LSQ-style derivative of ``d * round(c / d)`` with the rounding treated as
      straight-through; ``grad_q_m`` treats the saturated output as ``s * q_m^t`` (the reference
      repo's rule); ``grad_t`` is ``d(s * m^t)/dt``.  None of them differentiates through the
      ``round``; ``grad_x`` ignores the derivative of ``|x|^t`` (STE, as in the reference).
    * ``grad_q_m`` is strictly ``a > q_m``: an element at exactly ``a == q_m`` sends its gradient
      to ``x`` and not to ``q_m``, so no element counts for both.
    * Compared with the reference repo: ``grad_x`` is masked at ``+-q_m`` instead of a fixed
      clip at ``(-2, 2)``, unsigned inputs get 0 gradient on the dead side, and there is no
      per-call NaN check.  Instead, NaN is propagated: a NaN element of ``x`` makes its
      ``grad_x`` NaN and each of ``grad_d``, ``grad_q_m``, ``grad_t`` NaN (whatever ``grad_y``
      is), so a divergence shows up in the quantizer parameters (``Quantizer.validate()``)
      without a sync.
    * Shapes/dtypes: ``grad_x`` has ``x``'s dtype and the strides of ``torch.empty_like(x)``;
      ``grad_d``/``grad_q_m``/``grad_t`` have the shapes of ``d``/``q_m``/``t`` and dtype float32.
      ``grad_y`` must have ``x``'s shape and dtype but may have any strides (autograd passes
      expanded, stride-0 gradients, e.g. after ``.sum()``).
    * The order of the float32 summation is unspecified; kernels agree with this reference up
      to summation rounding (``grad_q_m`` may multiply inside or outside the sum).
"""

from __future__ import annotations

import torch
from torch import Tensor

from geta_fx.ops.schema import lib

__all__ = [
    "X_DTYPES",
    "check_quantize_backward_inputs",
    "check_quantize_inputs",
    "quantize_backward_reference",
    "quantize_reference",
]

#: dtypes accepted for ``x`` (and ``grad_y``); everything is computed in float32.
X_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def check_quantize_inputs(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor) -> None:
    """Check dtypes, element counts and devices (never values: that would sync).

    Shared by the reference and the fake impl so both reject the same inputs; raises
    ``RuntimeError`` like a kernel's ``TORCH_CHECK``.
    """
    torch._check(
        x.dtype in X_DTYPES,
        lambda: f"geta::quantize: x must be float32, float16 or bfloat16, got {x.dtype}",
    )
    for name, p in (("d", d), ("q_m", q_m), ("t", t)):
        _check_scalar_param(name, p, x)


def _check_scalar_param(name: str, p: Tensor, x: Tensor) -> None:
    torch._check(
        p.numel() == 1,
        lambda: f"geta::quantize: {name} must have exactly one element, got shape "
        f"{tuple(p.shape)}",
    )
    torch._check(
        p.dtype == torch.float32,
        lambda: f"geta::quantize: {name} must be float32, got {p.dtype}",
    )
    torch._check(
        p.device == x.device,
        lambda: f"geta::quantize: {name} is on {p.device} but x is on {x.device}",
    )


def check_quantize_backward_inputs(
    grad_y: Tensor, x: Tensor, d: Tensor, q_m: Tensor, t: Tensor
) -> None:
    """:func:`check_quantize_inputs` plus: ``grad_y`` has ``x``'s shape, dtype and device."""
    check_quantize_inputs(x, d, q_m, t)
    torch._check(
        grad_y.dtype == x.dtype,
        lambda: f"geta::quantize_backward: grad_y dtype {grad_y.dtype} != x dtype {x.dtype}",
    )
    torch._check(
        grad_y.device == x.device,
        lambda: f"geta::quantize_backward: grad_y is on {grad_y.device}, x on {x.device}",
    )
    torch._check(
        grad_y.dim() == x.dim(),
        lambda: f"geta::quantize_backward: grad_y shape {tuple(grad_y.shape)} != x shape "
        f"{tuple(x.shape)}",
    )
    for gs, xs in zip(grad_y.shape, x.shape, strict=True):
        torch._check(
            gs == xs,
            lambda: f"geta::quantize_backward: grad_y shape {tuple(grad_y.shape)} != x shape "
            f"{tuple(x.shape)}",
        )


def _pow_pos(base: Tensor, exponent: Tensor) -> Tensor:
    """``base ** exponent`` for ``base > 0``: exact when ``exponent == 1``, else exp(e*log(b))."""
    return torch.where(exponent == 1, base, torch.exp(exponent * torch.log(base)))


def _like(x: Tensor, y: Tensor) -> Tensor:
    """Return ``y`` (float32, same shape as ``x``) with ``x``'s dtype and empty_like strides."""
    out = torch.empty_like(x)
    if y.dtype == out.dtype and y.stride() == out.stride():
        return y
    return out.copy_(y)


def _scalars(d: Tensor, q_m: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # 0-dim views broadcast against any x, including a 0-dim one.
    return d.reshape(()), q_m.reshape(()), t.reshape(())


def quantize_reference(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool) -> Tensor:
    """Reference forward of ``geta::quantize``; see the module docstring for the contract."""
    check_quantize_inputs(x, d, q_m, t)
    d0, q0, t0 = _scalars(d, q_m, t)
    xf = x.float()
    m = torch.minimum(xf.abs(), q0)  # NaN stays NaN, so `m > 0` is False for NaN
    active = m > 0 if signed else (m > 0) & (xf > 0)
    c = _pow_pos(torch.where(active, m, 1.0), t0)
    level = torch.round(c / d0) * d0
    y = torch.where(active, torch.where(xf < 0, -level, level), 0.0)
    y = torch.where(torch.isnan(xf), xf, y)
    return _like(x, y)


def quantize_backward_reference(
    grad_y: Tensor, x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference ``geta::quantize_backward``: ``(grad_x, grad_d, grad_q_m, grad_t)``.

    See the module docstring for the exact rules (STE masked at ``+-q_m``, LSQ-style ``grad_d``,
    NaN propagation).
    """
    check_quantize_backward_inputs(grad_y, x, d, q_m, t)
    d0, q0, t0 = _scalars(d, q_m, t)
    xf = x.float()
    g = grad_y.float()
    is_nan = torch.isnan(xf)
    a = xf.abs()
    m = torch.minimum(a, q0)
    active = m > 0 if signed else (m > 0) & (xf > 0)
    clipped = a > q0

    blocked = clipped if signed else clipped | (xf < 0)
    grad_x = torch.where(blocked, 0.0, g)
    grad_x = torch.where(is_nan, xf, grad_x)

    m_safe = torch.where(active, m, 1.0)
    c = _pow_pos(m_safe, t0)
    r = c / d0
    gs = torch.where(active, torch.where(xf < 0, -g, g), 0.0)  # grad_y * s, 0 where inactive
    nan = torch.full((), float("nan"), dtype=torch.float32, device=x.device)

    contrib_d = torch.where(is_nan, nan, gs * (torch.round(r) - r))
    contrib_q = torch.where(is_nan, nan, torch.where(active & clipped, gs, 0.0))
    contrib_t = torch.where(is_nan, nan, gs * c * torch.log(m_safe))

    q_safe = torch.where(q0 > 0, q0, 1.0)
    dq_factor = torch.where(q0 > 0, t0 * _pow_pos(q_safe, t0 - 1), 0.0)
    grad_d = contrib_d.sum().reshape(d.shape)
    grad_q_m = (contrib_q.sum() * dq_factor).reshape(q_m.shape)
    grad_t = contrib_t.sum().reshape(t.shape)
    return _like(x, grad_x), grad_d, grad_q_m, grad_t


lib.impl("quantize", quantize_reference, "CompositeExplicitAutograd")
lib.impl("quantize_backward", quantize_backward_reference, "CompositeExplicitAutograd")
