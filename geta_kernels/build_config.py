"""What the compiled ``geta`` kernels are built from: op sets, sources, libraries and flags.

One table, read by three users:

* ``setup.py`` (``pip install .``, ``pip wheel .``, editable installs) builds every library
  ahead of time with :mod:`torch.utils.cpp_extension` (:func:`extensions`);
* the loader (:mod:`geta_fx.kernels`) finds the shipped library for the running device and CPU
  capability (:func:`library_stem`, :func:`cpu_tag`) and checks each op set's ops;
* ``geta-fx kernels --build`` (developers) JIT-builds the same library for this machine.

This module imports only the standard library (``torch`` lazily, inside functions): ``setup.py``
loads it by file path before ``geta_fx`` is installed.

Libraries (``geta_fx/kernels/_C_<dev>_<tag>*.so``, loaded with :func:`torch.ops.load_library`,
the torchao pattern: they hold ``TORCH_LIBRARY_IMPL`` blocks only, no Python module):

* ``_C_cpu_<tag>``: every op set's CPU sources, one library per CPU capability that ATen
  dispatches to (``default``, ``avx2``, ``avx512`` on x86-64; ``default`` elsewhere), compiled
  with ATen's own flags for that capability so ``at::vec`` and Sleef match the reference ops;
* ``_C_cuda``: every op set's CUDA sources (only where torch has CUDA and a toolkit is found).

Build-time switches: ``GETA_FX_BUILD_CUDA=0`` builds no CUDA library;
``GETA_FX_BUILD_LOWBIT_CUDA=0`` leaves the low-bit op set out of it (its GEMV instantiations
take minutes of nvcc); ``GETA_FX_CPU_TAGS=avx512,default`` builds only those CPU libraries.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CPU_TAGS", "CSRC", "OPSETS", "OpSetSources", "cpu_build_flags", "cpu_tag",
           "cuda_build_flags", "cuda_opsets", "extensions", "library_stem", "sources"]

#: ``geta_kernels/csrc`` (next to this file in the checkout and in the installed package).
CSRC = Path(__file__).resolve().parent / "csrc"


@dataclass(frozen=True)
class OpSetSources:
    """One op set: its ops (all registered by one source file per device) and those files.

    Attributes:
        ops: ``namespace::name`` of every op the set's sources register, per dispatch key.
        cpu: CPU sources (relative to ``geta_kernels/csrc``).
        cuda: CUDA sources (relative to ``geta_kernels/csrc``).
        cuda_switch: build-time variable whose value ``0`` leaves the set out of ``_C_cuda``.
    """

    ops: tuple[str, ...]
    cpu: tuple[str, ...]
    cuda: tuple[str, ...]
    cuda_switch: str = "GETA_FX_BUILD_CUDA"


#: Every op set (key: its name in status lines; ``geta_fx.kernels.QUANTIZE``/``LOWBIT``).
OPSETS: dict[str, OpSetSources] = {
    "quantize": OpSetSources(
        ops=("geta::quantize", "geta::quantize_backward"),
        cpu=("cpu/quantize_cpu.cpp",), cuda=("cuda/quantize_cuda.cu",)),
    "lowbit": OpSetSources(
        ops=("geta::lowbit_linear", "geta::unpack_weight"),
        cpu=("cpu/lowbit_cpu.cpp",), cuda=("cuda/lowbit_cuda.cu",),
        cuda_switch="GETA_FX_BUILD_LOWBIT_CUDA"),
    "quantize_table": OpSetSources(
        ops=("geta::quantize.table",),
        cpu=("cpu/quantize_table_cpu.cpp",), cuda=("cuda/quantize_table_cuda.cu",)),
    "affine_table": OpSetSources(
        ops=("geta::quantize.affine_table",),
        cpu=("cpu/affine_table_cpu.cpp",), cuda=("cuda/affine_table_cuda.cu",)),
}

#: CPU libraries built on this machine's architecture, by ATen capability tag.
CPU_TAGS: tuple[str, ...] = (
    ("default", "avx2", "avx512") if platform.machine().lower() in ("x86_64", "amd64")
    else ("default",))

#: ATen CPU capability (``torch.backends.cpu.get_cpu_capability()``) -> CPU library tag.
_TAG_OF_CAPABILITY = {"AVX512": "avx512", "AVX2": "avx2"}

#: Flags ATen compiles its AVX2 / AVX-512 kernel copies with (so at::vec picks the matching
#: Vectorized<float>, and Sleef exp/log come from libtorch_cpu); -mbmi2: the low-bit unpack's
#: _pdep_u64 (every AVX2 CPU ATen dispatches to has BMI2).
_X86_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-DCPU_CAPABILITY=AVX2",
             "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mbmi2",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}

# -fvisibility=hidden: torch loads op libraries RTLD_GLOBAL; nothing of ours may interpose on
# (or be interposed by) another library's inline/template copies.  -g0: Python's own CFLAGS
# (which setuptools passes first) carry -g; debug info makes each library 30x larger.
_COMMON_CFLAGS = ["-O3", "-DNDEBUG", "-g0", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]

#: nvcc flags each with the oldest CUDA (major, minor) that accepts it.  -split-compile=0: the
#: low-bit GEMV's 63 instantiations compile in parallel (else minutes on one core).
_CUDA_VERSIONED_FLAGS = (("-split-compile=0", (12, 1)),)


def cpu_tag(capability: str | None = None) -> str:
    """The CPU library tag serving ATen capability ``capability`` (default: the running one)."""
    if capability is None:
        import torch

        try:
            capability = str(torch.backends.cpu.get_cpu_capability())
        except Exception:  # very old or exotic builds: the portable library
            capability = "DEFAULT"
    tag = _TAG_OF_CAPABILITY.get(capability.upper(), "default")
    return tag if tag in CPU_TAGS else "default"


def library_stem(dev: str, tag: str | None = None) -> str:
    """File-name stem of a library: ``_C_cpu_<tag>`` or ``_C_cuda``."""
    if dev == "cpu":
        return f"_C_cpu_{tag or cpu_tag()}"
    if dev == "cuda":
        return "_C_cuda"
    raise ValueError(f"unknown device {dev!r}; expected 'cpu' or 'cuda'")


def cuda_opsets() -> tuple[str, ...]:
    """Op sets whose CUDA sources go into ``_C_cuda`` (each set's switch is not ``0``)."""
    if _off("GETA_FX_BUILD_CUDA"):
        return ()
    return tuple(name for name, s in OPSETS.items() if not _off(s.cuda_switch))


def sources(dev: str, opsets: tuple[str, ...] | None = None) -> list[str]:
    """Sources (paths relative to ``geta_kernels/csrc``) of ``dev``'s library, in op-set order."""
    names = tuple(OPSETS) if opsets is None else opsets
    return [src for name in names for src in getattr(OPSETS[name], dev)]


def _openmp() -> bool:
    import torch

    try:
        return "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux")
    except Exception:
        return False


def cpu_build_flags(tag: str) -> tuple[list[str], list[str]]:
    """Compiler and linker flags of the CPU library ``tag``."""
    cflags = [*_COMMON_CFLAGS, *_X86_FLAGS.get(tag, [])] if tag in CPU_TAGS else None
    if cflags is None:
        raise ValueError(f"no CPU library {tag!r} on {platform.machine()}; known: {CPU_TAGS}")
    ldflags: list[str] = []
    if _openmp():  # at::parallel_for is inline OpenMP code in the headers
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def cuda_build_flags() -> list[str]:
    """nvcc flags of ``_C_cuda`` (each versioned flag where torch's CUDA is new enough)."""
    import torch

    # No --use_fast_math: expf/logf/IEEE division must match the reference's ATen ops.
    flags = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler", "-fvisibility=hidden",
             "-Xcompiler", "-fvisibility-inlines-hidden"]
    version = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return flags + [flag for flag, oldest in _CUDA_VERSIONED_FLAGS if version >= oldest]


def _off(var: str) -> bool:
    return os.environ.get(var, "1").strip() == "0"


def _cpu_tags_wanted() -> tuple[str, ...]:
    env = os.environ.get("GETA_FX_CPU_TAGS", "").replace(";", ",")
    wanted = tuple(t.strip() for t in env.split(",") if t.strip())
    unknown = [t for t in wanted if t not in CPU_TAGS]
    if unknown:
        raise ValueError(f"GETA_FX_CPU_TAGS names {unknown}; this machine builds {CPU_TAGS}")
    return wanted or CPU_TAGS


def extensions(package: str = "geta_fx.kernels", root: str = "geta_kernels") -> list[Any]:
    """The setuptools extensions of every library this machine can build (for ``setup.py``).

    Args:
        package: the package the libraries are installed into.
        root: the package's directory relative to ``setup.py`` (sources must be relative).
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    def rel(paths: list[str]) -> list[str]:
        return [f"{root}/csrc/{p}" for p in paths]

    exts = []
    for tag in _cpu_tags_wanted():
        cflags, ldflags = cpu_build_flags(tag)
        exts.append(CppExtension(
            f"{package}.{library_stem('cpu', tag)}", rel(sources("cpu")),
            extra_compile_args={"cxx": cflags}, extra_link_args=ldflags,
            py_limited_api=True))
    cuda_sets = cuda_opsets()
    if cuda_sets and torch.version.cuda is not None and CUDA_HOME is not None:
        exts.append(CUDAExtension(
            f"{package}.{library_stem('cuda')}", rel(sources("cuda", cuda_sets)),
            extra_compile_args={"cxx": list(_COMMON_CFLAGS), "nvcc": cuda_build_flags()},
            py_limited_api=True))
    return exts
