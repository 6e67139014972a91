"""Fake (meta) implementations of the ``geta`` quantizer ops, for torch.export / torch.compile.

They only compute output metadata and run the same input checks as the reference
(:mod:`geta_fx.ops.reference`), so a graph that exports also runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geta_fx.ops.reference import check_quantize_backward_inputs, check_quantize_inputs


@torch.library.register_fake("geta::quantize")
def _quantize_fake(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool) -> Tensor:
    check_quantize_inputs(x, d, q_m, t)
    return torch.empty_like(x)


@torch.library.register_fake("geta::quantize_backward")
def _quantize_backward_fake(
    grad_y: Tensor, x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_quantize_backward_inputs(grad_y, x, d, q_m, t)
    return (
        torch.empty_like(x),
        d.new_empty(d.shape, dtype=torch.float32),
        q_m.new_empty(q_m.shape, dtype=torch.float32),
        t.new_empty(t.shape, dtype=torch.float32),
    )
