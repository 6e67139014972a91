"""The ``geta`` custom ops: schema, reference (CPU fallback and oracle), fake, autograd.

Import order matters: the schema is defined first, then every Python registration for it.
Compiled kernels (``geta_fx.kernels``) only add ``TORCH_LIBRARY_IMPL(geta, CPU|CUDA)`` impls
for the same schemas; they are loaded last, by :func:`_load_kernels`, when present.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

# NOTE: registration order matters (schema before every impl); keep it, do not sort.
# isort: off
from geta_fx.ops import schema as schema  # NOTE: first; defines the op schemas
from geta_fx.ops import reference as reference  # CompositeExplicitAutograd impls
from geta_fx.ops import fake as fake  # register_fake
from geta_fx.ops import autograd as autograd  # register_autograd (backward = quantize_backward)
# isort: on

__all__ = ["quantize"]

logger = logging.getLogger(__name__)


def quantize(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, *, signed: bool = True) -> Tensor:
    """GETA nonlinear quantizer ``torch.ops.geta.quantize`` (GETA_SPEC §A.2, q_s = 0).

    ``y = sign(x) * d * round(min(|x|, q_m)^t / d)`` elementwise, ``y = 0`` at ``x == 0``
    (exactly), NaN propagated; with ``signed=False`` every ``x <= 0`` maps to 0.  Differentiable
    in ``x`` (straight-through inside ``[-q_m, q_m]``), ``d``, ``q_m`` and ``t``.  The exact
    forward/backward contract is in :mod:`geta_fx.ops.reference`.

    Args:
        x: float32/float16/bfloat16 tensor of any shape; computed in float32.
        d: step size, float32 with one element, ``> 0``, on ``x``'s device.
        q_m: clipping range, float32 with one element, ``> 0``.
        t: exponent, float32 with one element (``t == 1``: linear quantizer).
        signed: symmetric signed quantizer (True) or unsigned, for non-negative inputs.

    Returns:
        Tensor with ``x``'s shape and dtype.
    """
    y: Tensor = torch.ops.geta.quantize.default(x, d, q_m, t, signed)
    return y


# --- kernel loading hook (owned by the kernels engineer: geta_fx.kernels.ensure_loaded) -------
def _load_kernels() -> bool:
    """Load the compiled ``geta`` kernels if the ``geta_fx.kernels`` package is importable.

    Calls ``geta_fx.kernels.ensure_loaded()`` when it exists.  Only ``ImportError`` is
    swallowed (no package: the reference impls serve every device); any other error from the
    loader propagates.  Returns whether ``ensure_loaded`` was found and called.
    """
    try:
        import geta_fx.kernels as kernels
    except ImportError:
        logger.debug("geta_fx.kernels not importable; using the pure-PyTorch reference ops")
        return False
    ensure_loaded = getattr(kernels, "ensure_loaded", None)
    if ensure_loaded is None:
        logger.debug("geta_fx.kernels has no ensure_loaded(); using the reference ops")
        return False
    ensure_loaded()
    logger.debug("geta_fx.kernels.ensure_loaded() called")
    return True


_load_kernels()

from geta_fx.ops import lowbit as lowbit  # noqa: E402  (geta::lowbit_linear / unpack_weight)
from geta_fx.ops import quantize_table as quantize_table  # noqa: E402  (geta::quantize.table)
