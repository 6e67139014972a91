"""Loader for the compiled C++/CUDA implementations of the ``geta`` ops (shipped, never built here).

``geta_kernels/csrc`` holds sources that register *implementations* for the op schemas defined once in
:mod:`geta_fx.ops.schema` (``TORCH_LIBRARY_IMPL(geta, CPU|CUDA, m)``; no ``TORCH_LIBRARY`` def
anywhere in C++).  ``pip install``/``pip wheel`` compile them ahead of time (``setup.py``, from
the table in :mod:`geta_fx.kernels.build_config`) into libraries in this package:
``_C_cpu_<tag>*.so`` (one per ATen CPU capability: ``default``, ``avx2``, ``avx512``) and
``_C_cuda*.so``.  A backend kernel takes precedence over the pure-PyTorch reference
(``CompositeExplicitAutograd``) on its device; where none is loaded, the reference runs.

:func:`ensure_loaded` (called by :mod:`geta_fx.ops` at import) ``dlopen``\\ s, per device, the
shipped library for the running CPU capability (:func:`torch.ops.load_library`, the torchao
pattern) and checks that it registered every op of each *op set* (:class:`OpSet`, a
:class:`KernelLoader` each): an op set is ``"fused"`` on a device only when all its ops have a
kernel there.  It never compiles and never raises: a missing library (an editable checkout
that was not built, a wheel without CUDA), a library that fails to load, or a missing op is
recorded, the reference serves, and :func:`status` says why.  This module's loader serves the
quantizer ops (:data:`QUANTIZE`); :mod:`geta_fx.lowbit_kernels` the low-bit ones.

Developers: :func:`build` (``geta-fx kernels --build``) JIT-compiles this machine's libraries
with :func:`torch.utils.cpp_extension.load` (ninja, incremental, build tree under
:func:`cache_dir`), checks them in a subprocess, and installs them next to this file.

Environment
    ``GETA_FX_NO_KERNELS=1``   load nothing; the reference serves every device.
    ``GETA_FX_KERNEL_CACHE``   :func:`build`'s build tree (default ``~/.cache/geta_fx/kernels``).
    Build-time switches (``GETA_FX_BUILD_CUDA``, ``GETA_FX_BUILD_LOWBIT_CUDA``,
    ``GETA_FX_CPU_TAGS``, ``TORCH_CUDA_ARCH_LIST``): :mod:`geta_fx.kernels.build_config`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from geta_fx.kernels import build_config

__all__ = ["HOW_TO_BUILD", "OPS", "QUANTIZE", "KernelLoader", "OpSet", "build", "cache_dir",
           "ensure_loaded", "library_dir", "status", "toolchain_problem"]

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_DEVICES = ("cpu", "cuda")
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_BUILD_TIMEOUT_S = 1800
#: How to get compiled kernels into a checkout (printed by status reasons and the CLI).
HOW_TO_BUILD = ("`pip install --no-build-isolation -e .` (or `geta-fx kernels --build`, "
                "JIT for this machine)")


@dataclass(frozen=True)
class OpSet:
    """Ops whose kernels are checked together: a device serves all of them fused, or none.

    Attributes:
        owner: module that loads the set; names it in status reasons and log lines.
        name: the set's key in :data:`build_config.OPSETS` (its ops, sources, CUDA switch).
    """

    owner: str
    name: str

    @property
    def ops(self) -> tuple[str, ...]:
        """Every op the set's libraries must register, per dispatch key."""
        return build_config.OPSETS[self.name].ops

    @property
    def cuda_switch(self) -> str:
        """Build-time variable whose value ``0`` leaves the set out of ``_C_cuda``."""
        return build_config.OPSETS[self.name].cuda_switch


def library_dir() -> Path:
    """Directory holding the compiled libraries (this package's directory)."""
    return _HERE


def cache_dir() -> Path:
    """Build tree of :func:`build` (``$GETA_FX_KERNEL_CACHE`` or ``~/.cache/geta_fx/kernels``)."""
    env = os.environ.get("GETA_FX_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "geta_fx" / "kernels"


# --------------------------------------------------------------------------------------------
# one library per device, shared by every op set
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Library:
    """Outcome of loading one device's library: ``path`` when loaded, else ``reason``."""

    path: Path | None
    reason: str
    load_s: float = 0.0


_LIB_LOCK = threading.RLock()
_LIBRARIES: dict[str, _Library] = {}


def _disabled() -> str | None:
    flag = os.environ.get("GETA_FX_NO_KERNELS", "").strip().lower()
    return None if flag in ("", "0", "false", "no", "off") else f"GETA_FX_NO_KERNELS={flag}"


def _cuda_unavailable() -> str | None:
    if torch.version.cuda is None:
        hip = getattr(torch.version, "hip", None)
        return "torch is built for ROCm/HIP, not CUDA" if hip else "torch is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return None


def _find_library(dev: str) -> Path | None:
    """The shipped (or ``--build``-installed) library for ``dev`` on this machine, if any."""
    stem = build_config.library_stem(dev)
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    found = [p for p in _HERE.glob(f"{stem}*{suffix}")
             if p.name[len(stem)] == "."]  # _C_cpu_avx2 must not match _C_cpu_avx2x
    # setup.py names it _C_cpu_avx2.abi3.so, --build _C_cpu_avx2.so: the newer build wins
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def _missing_reason(dev: str) -> str:
    stem = build_config.library_stem(dev)
    others = sorted(p.name for p in _HERE.glob("_C_*") if p.suffix in (".so", ".pyd"))
    have = f" (found only {', '.join(others)})" if others else ""
    if dev == "cuda":
        return (f"no {stem} library in {_HERE}{have}: this install was built without CUDA "
                "(torch without CUDA, no toolkit, or GETA_FX_BUILD_CUDA=0 at build time)")
    return (f"no compiled {stem} library in {_HERE}{have}; build it with {HOW_TO_BUILD}")


def _load_library(dev: str) -> _Library:
    """Load ``dev``'s library once per process (idempotent, thread-safe, never raises)."""
    with _LIB_LOCK:
        if dev in _LIBRARIES:
            return _LIBRARIES[dev]
        why = _disabled()
        if why is not None:
            lib = _Library(None, f"disabled by {why}")
        elif dev == "cuda" and (why := _cuda_unavailable()) is not None:
            lib = _Library(None, why)
        elif (path := _find_library(dev)) is None:
            lib = _Library(None, _missing_reason(dev))
        else:
            t0 = time.perf_counter()
            try:
                torch.ops.load_library(str(path))
                lib = _Library(path, "loaded", round(time.perf_counter() - t0, 4))
            except Exception as e:  # undefined symbols (another torch), a corrupt file, ...
                lib = _Library(None, f"cannot load {path.name}: {type(e).__name__}: {e}")
        logger.debug("geta_fx.kernels: %s library: %s (%s)", dev, lib.path, lib.reason)
        _LIBRARIES[dev] = lib
        return lib


def _registered(ops: tuple[str, ...], dev: str) -> list[str]:
    """Those of ``ops`` that have a kernel for ``dev``'s dispatch key."""
    key = _DISPATCH_KEY[dev]
    have = []
    for op in ops:
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
                have.append(op)
        except RuntimeError:  # no such op (its schema module was not imported)
            pass
    return have


class KernelLoader:
    """Loads (once) the device libraries and says, for one :class:`OpSet`, who serves each device.
    """

    def __init__(self, opset: OpSet) -> None:
        self.opset = opset
        self._lock = threading.RLock()
        self._status: dict[str, dict[str, Any]] = {
            dev: {"impl": "reference", "reason": f"{opset.owner}.ensure_loaded() has not run yet"}
            for dev in _DEVICES
        }
        self._done = False

    def status(self) -> dict[str, dict[str, Any]]:
        """Which implementation serves each device, and why.

        Returns ``{"cpu": {...}, "cuda": {...}}``; each entry has ``impl`` (``"fused"`` or
        ``"reference"``) and ``reason`` (a sentence), plus ``library`` (the loaded file) and
        ``load_s`` (seconds its ``dlopen`` took) where the set is fused.
        """
        with self._lock:
            return copy.deepcopy(self._status)

    def ensure_loaded(self) -> dict[str, dict[str, Any]]:
        """Load each device's shipped library (first call) and check the set's ops; :meth:`status`.

        Idempotent, thread-safe, never compiles and never raises.
        """
        with self._lock:
            if not self._done:
                for dev in _DEVICES:
                    try:
                        self._status[dev] = self._check(dev)
                    except Exception as e:  # never raise out of the loader
                        logger.debug("%s: %s check failed", self.opset.owner, dev, exc_info=True)
                        self._status[dev] = {"impl": "reference",
                                             "reason": f"loader error: {type(e).__name__}: {e}"}
                    logger.debug("%s: %s -> %s", self.opset.owner, dev, self._status[dev])
                self._done = True
        return self.status()

    def _check(self, dev: str) -> dict[str, Any]:
        ops = self.opset.ops
        lib = _load_library(dev)
        have = _registered(ops, dev)
        if lib.path is None:
            if len(have) == len(ops) and _disabled() is None:
                return {"impl": "fused",
                        "reason": "kernels were already registered in this process "
                                  f"(not by geta_fx.kernels; {lib.reason})"}
            return {"impl": "reference", "reason": lib.reason}
        if len(have) == len(ops):
            return {"impl": "fused", "reason": f"loaded {lib.path.name} ({_describe(dev)})",
                    "library": str(lib.path), "load_s": lib.load_s}
        missing = [op for op in ops if op not in have]
        hint = (f" (built with {self.opset.cuda_switch}=0?)" if dev == "cuda" else "")
        return {"impl": "reference",
                "reason": f"{lib.path.name} registers no {_DISPATCH_KEY[dev]} kernel for "
                          f"{missing}{hint}; the reference serves {self.opset.name}"}


def _describe(dev: str) -> str:
    if dev == "cpu":
        try:
            cap = str(torch.backends.cpu.get_cpu_capability())
        except Exception:
            cap = "unknown"
        return f"CPU capability {cap}, library {build_config.cpu_tag()}"
    return f"CUDA {torch.version.cuda}"


#: The quantizer kernels, loaded by this module's :func:`ensure_loaded`.
QUANTIZE = OpSet(owner="geta_fx.kernels", name="quantize")

#: Ops every quantizer kernel library must register, all of them, for its dispatch key.
OPS: tuple[str, ...] = QUANTIZE.ops

_LOADER = KernelLoader(QUANTIZE)


def status() -> dict[str, dict[str, Any]]:
    """Which implementation serves each device for the quantizer ops (:meth:`KernelLoader.status`).
    """
    return _LOADER.status()


def ensure_loaded() -> dict[str, dict[str, Any]]:
    """Load the shipped quantizer kernels (:meth:`KernelLoader.ensure_loaded`); never compiles.
    """
    return _LOADER.ensure_loaded()


# --------------------------------------------------------------------------------------------
# developer JIT build: geta-fx kernels --build
# --------------------------------------------------------------------------------------------
def toolchain_problem(dev: str) -> str | None:
    """Why ``dev``'s library cannot be JIT-built here, or None."""
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        return "ninja not found (pip install ninja); torch.utils.cpp_extension needs it"
    cxx = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    if dev == "cuda":
        if (why := _cuda_unavailable()) is not None:
            return why
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "no CUDA toolkit found (CUDA_HOME unset and nvcc not on PATH)"
    return None


def build(devices: tuple[str, ...] = _DEVICES,
          opsets: tuple[str, ...] | None = None) -> dict[str, str]:
    """JIT-build this machine's libraries and install them next to this file (developers).

    Each library is compiled by :func:`torch.utils.cpp_extension.load` in a subprocess (which
    defines the schemas from ``schema.py`` alone and checks that every op of every op set in
    it got a kernel), then copied into :func:`library_dir` as the wheel would ship it.  A
    library already loaded in this process is only replaced on disk: a new process uses it.

    ``opsets`` limits the libraries to those op sets (default: every one; the others then
    run the reference until the next full build).

    Returns ``{device: outcome}``, each a sentence (``"built ... in 12.3 s"`` or why not).
    Raises nothing.
    """
    import geta_fx.ops.schema as schema_mod

    out: dict[str, str] = {}
    for dev in devices:
        problem = toolchain_problem(dev)
        out[dev] = problem if problem is not None else _build_one(dev, schema_mod.__file__, opsets)
    return out


def _build_one(dev: str, schema_py: str, only: tuple[str, ...] | None) -> str:
    stem = build_config.library_stem(dev)
    opsets = build_config.cuda_opsets() if dev == "cuda" else tuple(build_config.OPSETS)
    opsets = opsets if only is None else tuple(n for n in opsets if n in only)
    if not opsets:
        return f"no op set to build for {dev} (GETA_FX_BUILD_CUDA=0, or none selected)"
    name = f"geta_fx{stem}"
    build_dir = cache_dir() / f"build-{stem.lstrip('_')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if dev == "cpu":
        cflags, ldflags = build_config.cpu_build_flags(build_config.cpu_tag())
        cuda_cflags: list[str] = []
    else:
        cflags, ldflags, cuda_cflags = [], [], build_config.cuda_build_flags()
    payload = {
        "name": name, "dir": str(build_dir), "schema": schema_py, "key_name": _DISPATCH_KEY[dev],
        "sources": [str(build_config.CSRC / s) for s in build_config.sources(dev, opsets)],
        "cflags": cflags, "cuda_cflags": cuda_cflags, "ldflags": ldflags,
        "ops": [op for n in opsets for op in build_config.OPSETS[n].ops],
    }
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(payload)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, GETA_FX_NO_KERNELS="1"),
                              timeout=_BUILD_TIMEOUT_S, check=False)
        log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired:
        log, rc = f"build timed out after {_BUILD_TIMEOUT_S} s", -1
    (build_dir / "build.log").write_text(log)
    if rc != 0 or "GETA_FX_BUILD_OK" not in log:
        tail = "\n".join(log.strip().splitlines()[-12:])
        return f"build of {stem} failed (exit {rc}; log {build_dir / 'build.log'}): {tail}"
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    target = _HERE / f"{stem}{suffix}"
    for old in _HERE.glob(f"{stem}.*{suffix}"):  # a setup.py build of the same library
        old.unlink()
    tmp = target.with_suffix(".tmp")
    shutil.copy2(build_dir / f"{name}{suffix}", tmp)
    os.replace(tmp, target)  # atomic: a running process keeps its mapped copy
    return f"built {target} in {time.perf_counter() - t0:.1f} s (log {build_dir / 'build.log'})"


# Runs in a fresh interpreter: defines the schemas from schema.py alone (not the geta_fx
# package, so no loader), builds with cpp_extension (which also loads the library), and checks
# that every op got a kernel for the device's dispatch key.
_CHILD = r"""
import importlib.util, json, sys
spec = json.loads(sys.argv[1])
import torch
m = importlib.util.spec_from_file_location("_geta_fx_schema_for_build", spec["schema"])
mod = importlib.util.module_from_spec(m); m.loader.exec_module(mod)
from torch.utils.cpp_extension import load
load(name=spec["name"], sources=spec["sources"], extra_cflags=spec["cflags"],
     extra_cuda_cflags=spec["cuda_cflags"] or None, extra_ldflags=spec["ldflags"],
     build_directory=spec["dir"], is_python_module=False, verbose=True)
missing = [op for op in spec["ops"]
           if not torch._C._dispatch_has_kernel_for_dispatch_key(op, spec["key_name"])]
if missing:
    sys.exit("built library registers no %s kernel for %s" % (spec["key_name"], missing))
print("GETA_FX_BUILD_OK")
"""
