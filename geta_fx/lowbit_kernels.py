"""Loader for the compiled low-bit kernels (``geta::lowbit_linear``, ``geta::unpack_weight``).

``geta_kernels/csrc/cpu/lowbit_cpu.cpp`` and ``geta_kernels/csrc/cuda/lowbit_cuda.cu`` register CPU and
CUDA implementations of the schemas defined in :mod:`geta_fx.ops.schema`
(``TORCH_LIBRARY_IMPL(geta, CPU|CUDA)``, both ops in one block per device).  They are compiled
ahead of time into the same per-device libraries as the quantizer kernels
(``geta_fx/kernels/_C_cpu_<tag>*.so``, ``_C_cuda*.so``; see
:mod:`geta_fx.kernels.build_config`), and this module's :class:`~geta_fx.kernels.KernelLoader`
for the op set :data:`LOWBIT` checks that both ops got a kernel: a device gets both fused ops
or neither.  Where none is loaded (no library shipped, CUDA built with
``GETA_FX_BUILD_LOWBIT_CUDA=0``, ``GETA_FX_NO_KERNELS=1``), the pure-PyTorch reference
(:mod:`geta_fx.ops.lowbit`: unpack + ``F.linear``) serves that device and :func:`status` says
why.  Nothing is ever compiled here.
"""

from __future__ import annotations

from typing import Any

from geta_fx.kernels import KernelLoader, OpSet

__all__ = ["LOWBIT", "OPS", "ensure_loaded", "status"]

#: The low-bit deployment kernels.
LOWBIT = OpSet(owner="geta_fx.lowbit_kernels", name="lowbit")

#: Ops every low-bit kernel library must register, all of them, for its dispatch key.
OPS: tuple[str, ...] = LOWBIT.ops

_LOADER = KernelLoader(LOWBIT)


def status() -> dict[str, dict[str, Any]]:
    """``{"cpu": {...}, "cuda": {...}}``: ``impl`` (``"fused"``/``"reference"``) and ``reason``.

    Plus ``library`` and ``load_s`` where the set is fused
    (:meth:`geta_fx.kernels.KernelLoader.status`).
    """
    return _LOADER.status()


def ensure_loaded() -> dict[str, dict[str, Any]]:
    """Load the shipped low-bit kernels and check both ops; idempotent, never compiles or raises.

    Returns :func:`status`.
    """
    return _LOADER.ensure_loaded()
