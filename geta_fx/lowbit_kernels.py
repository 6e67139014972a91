"""Loader for the compiled low-bit kernels (``geta::lowbit_linear``, ``geta::unpack_weight``).

``kernels/csrc/cpu/lowbit_cpu.cpp`` and ``kernels/csrc/cuda/lowbit_cuda.cu`` register CPU and
CUDA implementations of the schemas defined in :mod:`geta_fx.ops.schema`
(``TORCH_LIBRARY_IMPL(geta, CPU|CUDA)``, both ops in one block per device).  They are built,
checked and loaded by the quantizer kernels' loader (:class:`geta_fx.kernels.KernelLoader`, here
for the op set :data:`LOWBIT`), with the same guarantees:

* :func:`ensure_loaded` builds each device's library with :mod:`torch.utils.cpp_extension` on
  first use into the kernel cache (``geta_fx.kernels.cache_dir()``, subdirectories
  ``lowbit-<dev>-<key>``; the key covers sources, flags, torch/CUDA/Python versions, CPU
  capability and GPU architectures), **checks the fresh build in a subprocess** (which defines
  the schemas from ``schema.py`` alone and verifies that both ops got a kernel), writes
  ``checked.json``, and only then loads it here with :func:`torch.ops.load_library`.  So an op
  is never half-registered: a device gets both fused ops or neither.
* It never raises: without a compiler/ninja/CUDA toolkit, or after a failed build, the
  pure-PyTorch reference (:mod:`geta_fx.ops.lowbit`: unpack + ``F.linear``) keeps serving that
  device, and :func:`status` says why.  Lowering and loading (:mod:`geta_fx.deploy`) call it;
  nothing is built at ``import geta_fx``.

CUDA: built by default when torch has CUDA, a GPU is visible and a CUDA toolkit (``nvcc``) is
found, for the GPUs' architectures (or ``TORCH_CUDA_ARCH_LIST``), with ``-split-compile=0`` from
CUDA 12.1 on (its GEMV instantiations then compile in parallel).

Environment: ``GETA_FX_BUILD_LOWBIT_CUDA=0`` (or ``GETA_FX_BUILD_CUDA=0``, which covers every
CUDA build) skips the CUDA library (the reference then serves CUDA tensors); ``GETA_FX_NO_KERNELS=1`` loads nothing and ``GETA_FX_KERNEL_CACHE`` moves the
cache (both shared with ``geta_fx.kernels``).
"""

from __future__ import annotations

from typing import Any

from geta_fx.kernels import KernelLoader, OpSet

__all__ = ["LOWBIT", "OPS", "ensure_loaded", "status"]

#: The low-bit deployment kernels.
LOWBIT = OpSet(
    owner="geta_fx.lowbit_kernels", stem="lowbit", cache_prefix="lowbit-",
    ops=("geta::lowbit_linear", "geta::unpack_weight"),
    sources={"cpu": ("cpu/lowbit_cpu.cpp",), "cuda": ("cuda/lowbit_cuda.cu",)},
    headers=("lowbit_common.h", "quantize_common.h", "cuda/lowbit_gemv.cuh"),
    cuda_switch="GETA_FX_BUILD_LOWBIT_CUDA",
    x86_flags=("-mbmi2",),  # _pdep_u64 spreads a group of packed codes in one instruction
    # 63 GEMV instantiations (dtype x bits x M tile): let nvcc optimise them in parallel
    # (CUDA >= 12.1), else the build takes minutes on one core.
    cuda_flags=(("-split-compile=0", (12, 1)),),
)

#: Ops every low-bit kernel library must register, all of them, for its dispatch key.
OPS: tuple[str, ...] = LOWBIT.ops

_LOADER = KernelLoader(LOWBIT)


def status() -> dict[str, dict[str, Any]]:
    """``{"cpu": {...}, "cuda": {...}}``: ``impl`` (``"fused"``/``"reference"``) and ``reason``.

    Plus ``library``, ``load_s`` and ``log`` where a library was loaded or built
    (:meth:`geta_fx.kernels.KernelLoader.status`).
    """
    return _LOADER.status()


def ensure_loaded() -> dict[str, dict[str, Any]]:
    """Build (first time) and load the low-bit kernels; idempotent, never raises.

    Returns :func:`status`.
    """
    return _LOADER.ensure_loaded()
