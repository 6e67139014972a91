"""Loader for the compiled low-bit kernels (``geta::lowbit_linear``, ``geta::unpack_weight``).

``kernels/csrc/cpu/lowbit_cpu.cpp`` registers CPU implementations of the schemas defined in
:mod:`geta_fx.ops.schema` (``TORCH_LIBRARY_IMPL(geta, CPU)``, both ops in one block).
:func:`ensure_loaded` builds it with :mod:`torch.utils.cpp_extension` on first use into the
kernel cache (``geta_fx.kernels.cache_dir()``; a content key over the source, flags and
torch/Python versions), **checks the fresh build in a subprocess** (which defines the schemas
from ``schema.py`` alone and verifies that both ops got a CPU kernel), and only then loads it
here with :func:`torch.ops.load_library`.  So an op is never half-registered: this process loads
a library that registered both ops or none, and re-checks after loading.

It never raises: without a compiler/ninja, or after a failed build, the pure-PyTorch reference
(:mod:`geta_fx.ops.lowbit`) keeps serving, and :func:`status` says why.  Lowering and loading
(:mod:`geta_fx.deploy`) call it; nothing is built at ``import geta_fx``.

CUDA: ``kernels/csrc/cuda/lowbit_cuda.cu`` is **untested** (written without a GPU) and is built
only on request: ``GETA_FX_BUILD_LOWBIT_CUDA=1`` with a CUDA torch, a visible GPU and ``nvcc``.
Without it, CUDA tensors use the reference (unpack + ``F.linear``).

Environment: ``GETA_FX_NO_KERNELS=1`` loads nothing (shared with ``geta_fx.kernels``);
``GETA_FX_KERNEL_CACHE`` moves the cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from geta_fx.kernels import _CHILD as _BUILD_SCRIPT
from geta_fx.kernels import _file_lock

__all__ = ["OPS", "ensure_loaded", "status"]

logger = logging.getLogger(__name__)

#: Ops every low-bit kernel library must register, all of them, for its dispatch key.
OPS: tuple[str, ...] = ("geta::lowbit_linear", "geta::unpack_weight")

_RECIPE_VERSION = "1"
_SOURCES = {"cpu": "cpu/lowbit_cpu.cpp", "cuda": "cuda/lowbit_cuda.cu"}
_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_BUILD_TIMEOUT_S = 1800

_lock = threading.RLock()
_done = False
_status: dict[str, dict[str, Any]] = {
    dev: {"impl": "reference", "reason": "geta_fx.lowbit_kernels.ensure_loaded() has not run"}
    for dev in ("cpu", "cuda")
}


def status() -> dict[str, dict[str, Any]]:
    """``{"cpu": {...}, "cuda": {...}}``: ``impl`` (``"fused"``/``"reference"``) and ``reason``."""
    with _lock:
        return copy.deepcopy(_status)


def ensure_loaded() -> dict[str, dict[str, Any]]:
    """Build (first time) and load the low-bit kernels; idempotent, never raises.

    Returns :func:`status`.
    """
    global _done
    with _lock:
        if _done:
            return status()
        try:
            import geta_fx.ops  # noqa: F401  (the schemas must exist before any impl)

            for dev in ("cpu", "cuda"):
                try:
                    _load(dev)
                except Exception as e:  # never raise out of the loader
                    logger.debug("lowbit kernels: %s failed", dev, exc_info=True)
                    _set(dev, "reference", f"loader error: {type(e).__name__}: {e}")
        finally:
            _done = True
    return status()


def _set(dev: str, impl: str, reason: str, **extra: Any) -> None:
    _status[dev] = {"impl": impl, "reason": reason, **extra}
    logger.debug("lowbit kernels: %s -> %s (%s)", dev, impl, reason)


def _registered(dev: str) -> list[str]:
    return [op for op in OPS if torch._C._dispatch_has_kernel_for_dispatch_key(op, _KEY[dev])]


def _skip_reason(dev: str) -> str | None:
    flag = os.environ.get("GETA_FX_NO_KERNELS", "").strip().lower()
    if flag not in ("", "0", "false", "no", "off"):
        return f"disabled by GETA_FX_NO_KERNELS={flag}"
    if dev == "cuda":
        if os.environ.get("GETA_FX_BUILD_LOWBIT_CUDA", "0").strip() != "1":
            return ("the CUDA low-bit kernel is untested and built only with "
                    "GETA_FX_BUILD_LOWBIT_CUDA=1; the reference serves CUDA tensors")
        if torch.version.cuda is None or not torch.cuda.is_available():
            return "no CUDA torch or no visible GPU"
    ninja = shutil.which("ninja") is not None
    if not ninja:
        with contextlib.suppress(ImportError):
            import ninja as _ninja  # noqa: F401

            ninja = True
    if not ninja:
        return "ninja not found (pip install ninja)"
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    if dev == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "no CUDA toolkit found"
    return None


def _cpu_flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-DNDEBUG", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    ldflags: list[str] = []
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        cap = "DEFAULT"
    if platform.machine().lower() in ("x86_64", "amd64"):
        # ATen's own flags for its AVX2 / AVX-512 kernels, so at::vec picks the matching width.
        if cap == "AVX512":
            cflags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mbmi2",
                       "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        elif cap == "AVX2":
            cflags += ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-DCPU_CAPABILITY=AVX2",
                       "-DCPU_CAPABILITY_AVX2"]
    with contextlib.suppress(Exception):
        if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
            cflags.append("-fopenmp")  # at::parallel_for is inline OpenMP in the headers
            ldflags.append("-fopenmp")
    return cflags, ldflags


def _cache_root() -> Path:
    try:  # the quantizer kernels' cache, so one directory holds every geta build
        from geta_fx.kernels import cache_dir

        root = cache_dir()
    except (ImportError, AttributeError):
        env = os.environ.get("GETA_FX_KERNEL_CACHE")
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(env).expanduser() if env else
                (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "geta_fx" / "kernels")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    import tempfile

    fallback = Path(tempfile.gettempdir()) / f"geta_fx_kernels_{os.getuid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _csrc() -> Path:
    # The sources ship inside the geta_fx.kernels package (the repo's kernels/ directory).
    import importlib.util

    spec = importlib.util.find_spec("geta_fx.kernels")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve() / "csrc"
    return Path(__file__).resolve().parent.parent / "kernels" / "csrc"


def _spec(dev: str) -> dict[str, Any]:
    src = _csrc() / _SOURCES[dev]
    archs: list[str] = []
    if dev == "cpu":
        cflags, ldflags = _cpu_flags()
        cuda_cflags: list[str] = []
    else:
        from geta_fx.kernels import _cuda_archs, _cuda_flags

        cflags, ldflags = ["-O3", "-DNDEBUG", "-fvisibility=hidden"], []
        cuda_cflags = _cuda_flags()
        # ~100 GEMV instantiations (dtype x bits x M tile): let nvcc optimise them in parallel
        # (CUDA >= 12.1), else the build takes minutes on one core.
        ver = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
        if ver >= (12, 1):
            cuda_cflags = [*cuda_cflags, "-split-compile=0"]
        archs = _cuda_archs()
    h = hashlib.sha256(src.read_bytes())
    for part in (_RECIPE_VERSION, dev, torch.__version__, str(torch.version.cuda), sys.version,
                 platform.machine(), os.environ.get("CXX", ""), repr(cflags), repr(cuda_cflags),
                 repr(ldflags), repr(archs)):
        h.update(b"\0" + part.encode())
    key = h.hexdigest()[:16]
    name = f"geta_fx_lowbit_{dev}"
    directory = _cache_root() / f"lowbit-{dev}-{key}"
    return {"name": name, "sources": [str(src)], "cflags": cflags, "cuda_cflags": cuda_cflags,
            "ldflags": ldflags, "archs": archs, "dir": str(directory), "key_name": _KEY[dev],
            "ops": list(OPS),
            "so": str(directory / f"{name}.so")}


def _build(spec: dict[str, Any]) -> tuple[bool, str]:
    import geta_fx.ops.schema as schema

    directory = Path(spec["dir"])
    directory.mkdir(parents=True, exist_ok=True)
    payload = dict(spec, schema=str(Path(schema.__file__).resolve()))
    env = dict(os.environ, GETA_FX_NO_KERNELS="1")
    t0 = time.perf_counter()
    try:
        # The quantizer kernels' build script: fresh interpreter, schemas from schema.py
        # alone, cpp_extension.load, then check that every op got a kernel.
        proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(payload)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, timeout=_BUILD_TIMEOUT_S, check=False)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired:
        out, rc = f"build timed out after {_BUILD_TIMEOUT_S} s", -1
    log = directory / "build.log"
    with contextlib.suppress(OSError):
        log.write_text(out)
    if rc != 0 or "GETA_FX_BUILD_OK" not in out:
        tail = "\n".join(out.strip().splitlines()[-12:])
        return False, f"build of {spec['name']} failed (exit {rc}; log {log}): {tail}"
    (directory / "checked.json").write_text(json.dumps(
        {"name": spec["name"], "torch": torch.__version__,
         "build_s": round(time.perf_counter() - t0, 1)}))
    return True, "built"


def _load(dev: str) -> None:
    t0 = time.perf_counter()
    if len(_registered(dev)) == len(OPS):
        _set(dev, "fused", "already registered in this process")
        return
    skip = _skip_reason(dev)
    if skip is not None:
        _set(dev, "reference", skip)
        return
    spec = _spec(dev)
    so, marker = Path(spec["so"]), Path(spec["dir"]) / "checked.json"
    built = False
    if not (so.is_file() and marker.is_file()):
        Path(spec["dir"]).mkdir(parents=True, exist_ok=True)
        with _file_lock(Path(spec["dir"]) / "geta.lock"):
            if not (so.is_file() and marker.is_file()):  # another process may have built it
                stale = Path(spec["dir"]) / "lock"  # cpp_extension's baton, left by a crash
                if stale.exists():
                    stale.unlink()
                ok, reason = _build(spec)
                if not ok:
                    _set(dev, "reference", reason)
                    return
                built = True
    torch.ops.load_library(str(so))
    have = _registered(dev)
    if len(have) != len(OPS):  # cannot happen for a checked build; never half-use one
        _set(dev, "reference", f"{so.name} registered only {have} of {list(OPS)}")
        return
    how = "built and loaded" if built else "loaded from cache"
    _set(dev, "fused", f"{how}: {so}", library=str(so),
         load_s=round(time.perf_counter() - t0, 3))
