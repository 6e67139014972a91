"""Loader for the fused C++/CUDA implementations of the ``geta`` ops.

``kernels/csrc`` holds sources that register *implementations* for the op schemas defined once in
:mod:`geta_fx.ops.schema` (``TORCH_LIBRARY_IMPL(geta, CPU|CUDA, m)``; no ``TORCH_LIBRARY`` def
anywhere in C++).  A backend kernel takes precedence over the pure-PyTorch reference
(``CompositeExplicitAutograd``) on its device; where none is loaded, the reference runs.

One loader serves every *op set* (:class:`OpSet`: its ops, sources per device and extra
compiler flags; a :class:`KernelLoader` each).  This module's :func:`ensure_loaded` and
:func:`status` load the quantizer kernels (:data:`QUANTIZE`: ``geta::quantize``,
``geta::quantize_backward``); :mod:`geta_fx.lowbit_kernels` loads the low-bit deployment kernels
(``geta::lowbit_linear``, ``geta::unpack_weight``) with the same machinery and cache.

:func:`ensure_loaded` (called by :mod:`geta_fx.ops` at import time) builds each device's extension
with :mod:`torch.utils.cpp_extension` (ninja) on first use into a cache directory, checks the fresh
build in a subprocess, and loads it with :func:`torch.ops.load_library`.  Later processes find the
checked ``.so`` in the cache by a content key (sources, flags, torch/CUDA/Python versions, CPU
capability, GPU architectures) and only ``dlopen`` it, without importing the build machinery.
It never raises: every failure (no compiler, no ninja, no CUDA toolkit, a failed build) is
recorded, the reference keeps serving that device, and :func:`status` says why.

Each device's ``.so`` registers all of its op set's ops for its dispatch key in one
``TORCH_LIBRARY_IMPL`` block, and is loaded only after a subprocess (which defines the schemas
from ``schema.py`` alone) loaded it and found a kernel for every op (then ``checked.json`` is
written next to it): a device gets all fused ops of the set or none, never some.

Environment
    ``GETA_FX_NO_KERNELS=1``   load nothing, for any op set; the reference serves every device.
    ``GETA_FX_BUILD_CUDA=0``   skip the quantizer's CUDA extension (``1``, the default, builds it
                              when torch has CUDA, a GPU is visible and a CUDA toolkit is found;
                              each op set has its own switch, :attr:`OpSet.cuda_switch`).
    ``GETA_FX_KERNEL_CACHE``   cache directory, shared by every op set (default
                              ``$XDG_CACHE_HOME/geta_fx/kernels``, i.e.
                              ``~/.cache/geta_fx/kernels``).
    ``TORCH_CUDA_ARCH_LIST``   GPU architectures to build for (default: those of the visible GPUs).

Pre-building (e.g. at install time, where a compiler is present):
``python -c "import geta_fx.kernels as k; print(k.ensure_loaded())"`` (the low-bit kernels:
``geta_fx.lowbit_kernels`` likewise).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["OPS", "QUANTIZE", "KernelLoader", "OpSet", "cache_dir", "ensure_loaded", "status"]

logger = logging.getLogger(__name__)

#: Bump to invalidate every cached build (e.g. when the build recipe below changes).
_RECIPE_VERSION = "1"

_HERE = Path(__file__).resolve().parent
_CSRC = _HERE / "csrc"
_DEVICES = ("cpu", "cuda")
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_BUILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class OpSet:
    """Ops whose kernels are built, checked and loaded together, one library per device.

    Attributes:
        owner: module that loads the set; names it in status reasons and log lines.
        stem: library name stem; a device's library is ``geta_fx_{stem}_{dev}_{tag}``.
        cache_prefix: prefix of the set's cache subdirectories (``{cache_prefix}{dev}-{key}``).
        ops: ops every library of the set must register, all of them, for its dispatch key.
        sources: per device, the sources of its extension (relative to ``kernels/csrc``).
        headers: headers the sources include (relative to ``kernels/csrc``; content-keyed).
        cuda_switch: environment variable whose value ``0`` skips the set's CUDA extension.
        x86_flags: extra compiler flags of the AVX2 / AVX-512 CPU builds (e.g. ``-mbmi2``).
        cuda_flags: extra nvcc flags, each with the oldest CUDA version (major, minor) that
            accepts it; older toolkits build without it.
    """

    owner: str
    stem: str
    cache_prefix: str
    ops: tuple[str, ...]
    sources: Mapping[str, tuple[str, ...]]
    headers: tuple[str, ...] = ()
    cuda_switch: str = "GETA_FX_BUILD_CUDA"
    x86_flags: tuple[str, ...] = ()
    cuda_flags: tuple[tuple[str, tuple[int, int]], ...] = ()


class KernelLoader:
    """Builds (first use), checks and loads one :class:`OpSet`'s libraries; holds its status."""

    def __init__(self, opset: OpSet) -> None:
        self.opset = opset
        self._lock = threading.RLock()
        self._schema_py = ""  # path of geta_fx/ops/schema.py, set before any build thread starts
        self._done = False
        self._in_progress = False
        self._status: dict[str, dict[str, Any]] = {
            dev: {"impl": "reference", "reason": f"{opset.owner}.ensure_loaded() has not run yet"}
            for dev in _DEVICES
        }

    def status(self) -> dict[str, dict[str, Any]]:
        """Which implementation serves each device, and why.

        Returns ``{"cpu": {...}, "cuda": {...}}``; each entry has ``impl`` (``"fused"`` or
        ``"reference"``) and ``reason`` (a sentence), plus ``library`` (the loaded ``.so``) and
        ``load_s`` (seconds spent building/loading) where a library was loaded, and ``log`` (the
        build log) where a build ran.
        """
        with self._lock:
            return copy.deepcopy(self._status)

    def ensure_loaded(self) -> dict[str, dict[str, Any]]:
        """Build (first time) and load the fused kernels for every device that can have them.

        Idempotent and thread-safe; cheap after the first call in a process, and well under a
        second in a new process once the builds are cached.  Never raises: failures are recorded
        in :meth:`status` and the reference implementation serves that device.  Returns
        :meth:`status`.
        """
        if self._done:
            return self.status()
        with self._lock:
            if self._done or self._in_progress:  # re-entered through the geta_fx.ops import
                return self.status()
            self._in_progress = True
            try:
                self._load_all()
            except Exception as e:  # never raise out of the loader
                logger.debug("%s: unexpected loader error", self.opset.owner, exc_info=True)
                for entry in self._status.values():
                    if entry["impl"] != "fused":
                        entry.update(impl="reference",
                                     reason=f"loader error: {type(e).__name__}: {e}")
            finally:
                self._in_progress = False
                self._done = True
        return self.status()

    def _set(self, dev: str, impl: str, reason: str, **extra: Any) -> None:
        self._status[dev] = {"impl": impl, "reason": reason, **extra}
        logger.debug("%s: %s -> %s (%s)", self.opset.owner, dev, impl, reason)

    def _load_all(self) -> None:
        flag = os.environ.get("GETA_FX_NO_KERNELS", "").strip().lower()
        if flag not in ("", "0", "false", "no", "off"):
            for dev in _DEVICES:
                self._set(dev, "reference", f"disabled by GETA_FX_NO_KERNELS={flag}")
            return
        # The schemas must exist before a library registers impls for them (the subprocess check
        # imports schema.py on its own; here the normal package import does it).
        try:
            import geta_fx.ops.schema as schema_mod

            self._schema_py = str(Path(schema_mod.__file__).resolve())
        except Exception as e:
            for dev in _DEVICES:
                self._set(dev, "reference",
                          f"cannot import geta_fx.ops.schema: {type(e).__name__}: {e}")
            return
        # Phase 1 (builds, if any, run concurrently: each is a compiler subprocess);
        # phase 2 loads each device's checked library in this process.
        plans: dict[str, dict[str, Any]] = {}

        def prepare(dev: str) -> None:
            try:
                plans[dev] = self._prepare_device(dev)
            except Exception as e:
                logger.debug("%s: %s prepare failed", self.opset.owner, dev, exc_info=True)
                plans[dev] = {"skip": f"loader error: {type(e).__name__}: {e}"}

        threads = [threading.Thread(target=prepare, args=(dev,),
                                    name=f"geta_fx-build-{self.opset.stem}-{dev}")
                   for dev in _DEVICES]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for dev in _DEVICES:
            try:
                self._load_device(dev, plans[dev])
            except Exception as e:
                logger.debug("%s: %s load failed", self.opset.owner, dev, exc_info=True)
                self._set(dev, "reference", f"loader error: {type(e).__name__}: {e}")

    def _registered(self, dev: str) -> list[str]:
        """Ops of the set that have a kernel for ``dev``'s dispatch key."""
        key = _DISPATCH_KEY[dev]
        have = []
        for op in self.opset.ops:
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
                    have.append(op)
            except Exception:
                pass
        return have

    def _spec(self, dev: str) -> dict[str, Any]:
        """Name, sources, flags and content key of ``dev``'s extension."""
        rels = self.opset.sources[dev]
        sources = [str(_CSRC / s) for s in rels]
        h = hashlib.sha256()
        for rel in (*rels, *self.opset.headers):
            h.update(rel.encode())
            h.update((_CSRC / rel).read_bytes())
        spec: dict[str, Any] = {"dev": dev, "sources": sources}
        if dev == "cpu":
            cflags, ldflags = _cpu_flags(self.opset.x86_flags)
            tag = _cpu_capability().lower().replace(" ", "_")
            spec.update(cflags=cflags, cuda_cflags=[], ldflags=ldflags, archs=[])
        else:
            cflags, ldflags = ["-O3", "-DNDEBUG", "-fvisibility=hidden"], []
            archs = _cuda_archs()
            tag = "sm" + "_".join(a.replace(".", "").replace("+", "") for a in archs)
            spec.update(cflags=cflags, cuda_cflags=_cuda_flags(self.opset.cuda_flags),
                        ldflags=ldflags, archs=archs)
        for part in (
            _RECIPE_VERSION, dev, torch.__version__, str(torch.version.cuda),
            str(getattr(torch.version, "git_version", "")), sys.version, sys.platform,
            platform.machine(), os.environ.get("CXX", ""), repr(spec["cflags"]),
            repr(spec["cuda_cflags"]), repr(spec["ldflags"]), repr(spec["archs"]),
        ):
            h.update(b"\0" + part.encode())
        key = h.hexdigest()[:16]
        spec["name"] = f"geta_fx_{self.opset.stem}_{dev}_{tag}"
        spec["key"] = key
        spec["dir"] = _writable_cache() / f"{self.opset.cache_prefix}{dev}-{key}"
        return spec

    def _prepare_device(self, dev: str) -> dict[str, Any]:
        """Find or build ``dev``'s checked library; returns a plan for :meth:`_load_device`."""
        t0 = time.perf_counter()
        if dev == "cuda":
            skip = _cuda_skip_reason(self.opset.cuda_switch)
            if skip is not None:
                return {"skip": skip}
        if len(self._registered(dev)) == len(self.opset.ops):
            return {"already": True}
        spec = self._spec(dev)
        so, marker = _so_path(spec), _marker(spec)
        built = False
        if not (so.is_file() and marker.is_file()):
            problem = _toolchain_problem(dev)
            if problem is not None:
                return {"skip": problem}
            spec["dir"].mkdir(parents=True, exist_ok=True)
            with _file_lock(spec["dir"] / "geta.lock"):
                if not (so.is_file() and marker.is_file()):  # another process may have built it
                    ok, reason = self._build(spec)
                    if not ok:
                        return {"skip": reason, "log": str(spec["dir"] / "build.log")}
                    built = True
        return {"spec": spec, "so": so, "built": built, "t0": t0}

    def _load_device(self, dev: str, plan: dict[str, Any]) -> None:
        if "skip" in plan:
            extra = {"log": plan["log"]} if "log" in plan else {}
            self._set(dev, "reference", plan["skip"], **extra)
            return
        if plan.get("already"):
            self._set(dev, "fused",
                      "kernels were already registered in this process (not by this loader)")
            return
        spec, so, built = plan["spec"], plan["so"], plan["built"]
        torch.ops.load_library(str(so))
        have = self._registered(dev)
        if len(have) != len(self.opset.ops):  # cannot happen for a checked build; never half-use
            self._set(dev, "reference",
                      f"{so.name} loaded but registered only {have} of {list(self.opset.ops)} "
                      f"for {_DISPATCH_KEY[dev]}")
            return
        how = "built and loaded" if built else "loaded from cache"
        extra: dict[str, Any] = {"library": str(so),
                                 "load_s": round(time.perf_counter() - plan["t0"], 3)}
        if built:
            extra["log"] = str(spec["dir"] / "build.log")
        self._set(dev, "fused", f"{how}: {so.name} ({_describe(spec)})", **extra)

    def _build(self, spec: dict[str, Any]) -> tuple[bool, str]:
        """Build and check ``spec`` in a subprocess; on success write the marker file."""
        # (No imports here: this runs in a worker thread while the main thread may be inside
        # `import geta_fx.ops`, whose module lock a thread-side import would wait for forever.)
        # cpp_extension's own lock file; only a crashed build leaves it, and we hold the flock.
        stale = spec["dir"] / "lock"
        if stale.exists():
            stale.unlink()
        payload = {
            "name": spec["name"], "sources": spec["sources"], "cflags": spec["cflags"],
            "cuda_cflags": spec["cuda_cflags"], "ldflags": spec["ldflags"],
            "archs": spec["archs"], "dir": str(spec["dir"]), "schema": self._schema_py,
            "ops": list(self.opset.ops), "key_name": _DISPATCH_KEY[spec["dev"]],
        }
        env = dict(os.environ, GETA_FX_NO_KERNELS="1")
        log_path = spec["dir"] / "build.log"
        logger.debug("%s: building %s in %s (first use; cached afterwards)",
                     self.opset.owner, spec["name"], spec["dir"])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, json.dumps(payload)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                timeout=_BUILD_TIMEOUT_S, check=False,
            )
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout if isinstance(e.stdout, str) else ""
            rc = -1
            out += f"\n[geta_fx] build timed out after {_BUILD_TIMEOUT_S} s"
        elapsed = time.perf_counter() - t0
        with contextlib.suppress(OSError):
            log_path.write_text(out)
        if rc != 0 or "GETA_FX_BUILD_OK" not in out:
            tail = "\n".join(out.strip().splitlines()[-12:])
            return False, f"build of {spec['name']} failed (exit {rc}; log {log_path}): {tail}"
        with contextlib.suppress(OSError):
            _marker(spec).write_text(json.dumps({
                "name": spec["name"], "key": spec["key"], "torch": torch.__version__,
                "build_s": round(elapsed, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }))
        logger.debug("%s: built %s in %.1f s", self.opset.owner, spec["name"], elapsed)
        return True, "built"


#: The quantizer kernels, loaded by this module's :func:`ensure_loaded`.
QUANTIZE = OpSet(
    owner="geta_fx.kernels", stem="kernels", cache_prefix="",
    ops=("geta::quantize", "geta::quantize_backward"),
    sources={"cpu": ("cpu/quantize_cpu.cpp",), "cuda": ("cuda/quantize_cuda.cu",)},
    headers=("quantize_common.h", "cuda/quantize_kernels.cuh"),
)

#: Ops every quantizer kernel library must register, all of them, for its dispatch key.
OPS: tuple[str, ...] = QUANTIZE.ops

_LOADER = KernelLoader(QUANTIZE)


def status() -> dict[str, dict[str, Any]]:
    """Which implementation serves each device for the quantizer ops (:meth:`KernelLoader.status`).

    ``{"cpu": {...}, "cuda": {...}}`` with ``impl`` (``"fused"``/``"reference"``), ``reason``
    and, where a library was loaded or built, ``library``, ``load_s`` and ``log``.
    """
    return _LOADER.status()


def ensure_loaded() -> dict[str, dict[str, Any]]:
    """Build (first time) and load the fused quantizer kernels (:meth:`KernelLoader.ensure_loaded`).

    Idempotent, thread-safe and never raises; returns :func:`status`.
    """
    return _LOADER.ensure_loaded()


def cache_dir() -> Path:
    """Directory holding the cached builds (one subdirectory per op set, device and key)."""
    env = os.environ.get("GETA_FX_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "geta_fx" / "kernels"


# --------------------------------------------------------------------------------------------
# internals shared by every op set
# --------------------------------------------------------------------------------------------
def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return "DEFAULT"


def _openmp() -> bool:
    try:
        return "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux")
    except Exception:
        return False


def _cpu_flags(x86_flags: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Compiler and linker flags of a CPU build; ``x86_flags`` join the AVX2/AVX-512 flags."""
    # -fvisibility=hidden: torch loads op libraries RTLD_GLOBAL; nothing of ours may interpose
    # on (or be interposed by) another library's inline/template copies.
    cflags = ["-O3", "-DNDEBUG", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    ldflags: list[str] = []
    cap = _cpu_capability()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        # Same flags ATen uses for its AVX2 / AVX-512 kernel copies, so at::vec picks the
        # matching Vectorized<float> (and Sleef exp/log, exported by libtorch_cpu).
        if cap == "AVX512":
            cflags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                       *x86_flags, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        elif cap == "AVX2":
            cflags += ["-mavx2", "-mfma", "-mf16c", *x86_flags, "-DCPU_CAPABILITY=AVX2",
                       "-DCPU_CAPABILITY_AVX2"]
    if _openmp():  # at::parallel_for is inline OpenMP code in the headers
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _cuda_archs() -> list[str]:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return sorted(set(env.replace(";", " ").split()))
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return [f"{major}.{minor}" for major, minor in sorted(caps)]


def _cuda_flags(extra: tuple[tuple[str, tuple[int, int]], ...]) -> list[str]:
    """nvcc flags; each of ``extra`` is added where torch's CUDA is at least its version."""
    # No --use_fast_math: expf/logf/IEEE division must match the reference's ATen ops.
    flags = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler", "-fvisibility=hidden",
             "-Xcompiler", "-fvisibility-inlines-hidden"]
    version = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return flags + [flag for flag, oldest in extra if version >= oldest]


def _cuda_skip_reason(switch: str) -> str | None:
    """Why no CUDA extension is built here (``switch`` is the op set's opt-out), or None.

    ``GETA_FX_BUILD_CUDA=0`` turns off every op set's CUDA build; ``switch`` only its own.
    """
    for var in dict.fromkeys(("GETA_FX_BUILD_CUDA", switch)):
        if os.environ.get(var, "1").strip() == "0":
            return f"disabled by {var}=0"
    if torch.version.cuda is None:
        hip = getattr(torch.version, "hip", None)
        return "torch is built for ROCm/HIP, not CUDA" if hip else "torch is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return None


def _writable_cache() -> Path:
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = Path(tempfile.gettempdir()) / f"geta_fx_kernels_{uid}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _so_path(spec: dict[str, Any]) -> Path:
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    return spec["dir"] / f"{spec['name']}{suffix}"


def _marker(spec: dict[str, Any]) -> Path:
    return spec["dir"] / "checked.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Inter-process lock (flock: released by the OS if the holder dies, so never stale)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: cpp_extension's own FileBaton still serialises builds
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _describe(spec: dict[str, Any]) -> str:
    if spec["dev"] == "cpu":
        return f"CPU capability {_cpu_capability()}, {'OpenMP' if _openmp() else 'serial'}"
    return f"CUDA {torch.version.cuda}, archs {','.join(spec['archs'])}"


def _toolchain_problem(dev: str) -> str | None:
    """Why ``dev``'s extension cannot be built here, or None."""
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        return "ninja not found (pip install ninja); torch.utils.cpp_extension needs it"
    cxx = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    if dev == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "no CUDA toolkit found (CUDA_HOME unset and nvcc not on PATH)"
        nvcc = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
        if not nvcc.is_file():
            return f"no CUDA toolkit found (no {nvcc})"
    return None


# Runs in a fresh interpreter: defines the schemas from schema.py alone (not the geta_fx
# package, so no loader re-entry), builds with cpp_extension (which also loads the library),
# and checks that every op got a kernel for the device's dispatch key.
_CHILD = r"""
import importlib.util, json, os, sys
spec = json.loads(sys.argv[1])
import torch
m = importlib.util.spec_from_file_location("_geta_fx_schema_for_build", spec["schema"])
mod = importlib.util.module_from_spec(m); m.loader.exec_module(mod)
if spec["archs"]:
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(spec["archs"])
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

