"""The one place where ``geta`` op schemas are defined.

Every implementation (pure-PyTorch reference, fake/meta, autograd, C++/CUDA
kernels in ``geta_kernels/``) registers *for* these schemas; none defines its own.

Ops
---
``geta::quantize(Tensor x, Tensor d, Tensor q_m, Tensor t, bool signed) -> Tensor``
    GETA_SPEC §A.2 forward.  ``d``, ``q_m``, ``t`` are float32 tensors with one
    element (shape ``[]`` or ``[1]``).  Output has the dtype and shape of ``x``.
``geta::quantize_backward(Tensor grad_y, Tensor x, Tensor d, Tensor q_m, Tensor t,
bool signed) -> (Tensor grad_x, Tensor grad_d, Tensor grad_q_m, Tensor grad_t)``
    grad_x has the dtype/shape of ``x``; the three reductions have the shape of
    ``d``/``q_m``/``t`` and dtype float32 (accumulated in float32).
"""

from __future__ import annotations

import torch

lib = torch.library.Library("geta", "FRAGMENT")

lib.define("quantize(Tensor x, Tensor d, Tensor q_m, Tensor t, bool signed) -> Tensor")
lib.define(
    "quantize_backward(Tensor grad_y, Tensor x, Tensor d, Tensor q_m, Tensor t, bool signed)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)

# --- low-bit deployment ops (issue #7; reference, fake and contract: geta_fx/ops/lowbit.py) ----
# ``packed``: uint8 [N, ceil(K/8) * bits], each row a little-endian bitstream of K unsigned
# codes (element k at bits [k*bits, (k+1)*bits)); level = code - 2^(bits-1) (signed) or code
# (unsigned); the weight is ``float32(level) * scale`` (bit-identical to the fake-quant weight).
lib.define(
    "lowbit_linear(Tensor x, Tensor packed, Tensor scale, int bits, int in_features, bool signed,"
    " Tensor? bias) -> Tensor"
)
lib.define(
    "unpack_weight(Tensor packed, Tensor scale, int bits, bool signed, int[] shape,"
    " ScalarType dtype) -> Tensor"
)
# --- inference form of an activation quantizer (reference, fake and contract:
# geta_fx/ops/quantize_table.py): geta::quantize(x, d, q_m, t, signed) with the levels read from
# a precomputed threshold table (``scale``, ``bounds``, ``base``) instead of exp/log per element.
lib.define(
    "quantize.table(Tensor x, Tensor d, Tensor q_m, Tensor t, bool signed, Tensor scale,"
    " Tensor bounds, Tensor base) -> Tensor"
)
lib.define(  # eval batch_norm (+ residual add) (+ max pool) -> quantize.table, fused (same file)
    "quantize.affine_table(Tensor x, Tensor d, Tensor q_m, Tensor t, bool signed, Tensor scale,"
    " Tensor bounds, Tensor base, Tensor alpha, Tensor beta, Tensor? other=None,"
    " Tensor? alpha2=None, Tensor? beta2=None, int[] pool=[]) -> Tensor"
)
