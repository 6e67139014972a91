"""Fused C++/CUDA kernels for geta::quantize / geta::quantize_backward (geta_kernels/, issue #5).

    geta_fx.kernels.ensure_loaded()  --TORCH_LIBRARY_IMPL(geta, CPU|CUDA)-->  fused kernels
    oracle: geta_fx.ops.reference.quantize_reference / quantize_backward_reference

Every kernel result is compared with the pure-PyTorch reference on fresh random inputs (the seed
is printed on failure; GETA_FX_TEST_SEED reproduces a run) of every dtype, size and layout, and on
edge values.  Forward with t == 1 and grad_x must agree bitwise; with t != 1, exp/log may differ
by a few ulp, which can flip a near-tie of round() by one level d (the contract in
geta_fx/ops/reference.py).  CUDA tests carry the ``cuda`` marker and are skipped without a GPU.

The loader tests cover both op sets that the one loader (geta_fx.kernels.KernelLoader) serves:
the quantizer kernels (geta_fx.kernels) and the low-bit kernels (geta_fx.lowbit_kernels).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor

import geta_fx.kernels as kernels
from geta_fx.kernels import build_config
import geta_fx.lowbit_kernels as lowbit_kernels
import geta_fx.ops as ops
from geta_fx.ops.reference import quantize_backward_reference, quantize_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF, NAN = float("inf"), float("nan")
SEED = int(os.environ.get("GETA_FX_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
HAS_CUDA = torch.cuda.is_available()
NO_KERNELS = os.environ.get("GETA_FX_NO_KERNELS", "").strip().lower() not in (
    "", "0", "false", "no", "off")
NO_GPU = "no CUDA GPU visible (torch.cuda.is_available() is False): CUDA kernel tests skipped"
#: How the loaders say that this torch/machine has no usable CUDA.
NO_CUDA_REASONS = ("torch is built without CUDA", "torch is built for ROCm/HIP, not CUDA",
                   "no CUDA device visible")
#: Each op set's loader module and OpSet.
LOADERS = [pytest.param(kernels, kernels.QUANTIZE, id="quantize"),
           pytest.param(lowbit_kernels, lowbit_kernels.LOWBIT, id="lowbit")]

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


def has_cpu_toolchain() -> bool:
    cxx = os.environ.get("CXX", "c++").split()[0]
    ninja = shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None
    return shutil.which(cxx) is not None and ninja


def gen(device: str, salt: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(SEED * 7919 + salt)
    return g


def need_fused(device: str) -> None:
    """Skip (with the loader's reason) where no fused kernel serves ``device``."""
    st = kernels.status()[device]
    if st["impl"] != "fused":
        if device == "cpu" and has_cpu_toolchain() and not NO_KERNELS:
            pytest.fail(f"CPU kernel not in use although a compiler is present: {st}")
        pytest.skip(f"no fused {device} kernel: {st['reason']}")


def params(d: float, q_m: float, t: float, device: str, shape: tuple[int, ...] = (1,),
           requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(  # type: ignore[return-value]
        torch.full(shape, v, dtype=torch.float32, device=device, requires_grad=requires_grad)
        for v in (d, q_m, t))


def rand_x(shape: tuple[int, ...], dtype: torch.dtype, device: str, salt: int,
           scale: float = 1.2) -> Tensor:
    x = torch.randn(shape, generator=gen(device, salt), device=device) * scale
    if x.numel() > 8:  # some exact zeros, like pruned groups
        flat = x.view(-1)
        flat[:: max(1, x.numel() // 7)] = 0.0
    return x.to(dtype)


def ctx(**kw: object) -> str:
    return f"seed={SEED} " + " ".join(f"{k}={v}" for k, v in kw.items())


def same_nan_and_sign(a: Tensor, b: Tensor) -> None:
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN positions differ"


def assert_forward_close(y: Tensor, yr: Tensor, d: float, t: float, msg: str) -> None:
    assert y.dtype == yr.dtype and y.shape == yr.shape, msg
    assert y.stride() == yr.stride(), f"strides {y.stride()} != {yr.stride()}: {msg}"
    yf, rf = y.float(), yr.float()
    same_nan_and_sign(yf, rf)
    ok = ~torch.isnan(rf)
    yf, rf = yf[ok], rf[ok]
    if t == 1.0:  # every operation is correctly rounded: bitwise
        assert torch.equal(yf, rf), f"t == 1 must match bitwise: {msg}"
        assert torch.equal(torch.signbit(yf), torch.signbit(rf)), f"sign of zero: {msg}"
        return
    inf = torch.isinf(yf) | torch.isinf(rf)
    assert torch.equal(yf[inf], rf[inf]), msg
    diff = (yf - rf).abs()[~inf]
    eps = torch.finfo(y.dtype).eps
    tol = abs(d) * 1.001 + 2 * eps * rf.abs()[~inf]
    assert bool((diff <= tol).all()), f"more than one level apart: {diff.max()}: {msg}"
    mismatched = int((diff > 0).sum())
    assert mismatched <= max(3, yf.numel() // 500), f"{mismatched} near-tie flips: {msg}"


def grad_tolerances(gy: Tensor, x: Tensor, d: float, q_m: float, t: float,
                    signed: bool) -> tuple[float, float, float]:
    """Float64 bounds for the three sums: summation rounding plus near-tie flips of round()."""
    xf, g = x.double().cpu(), gy.double().cpu()
    xf = torch.where(torch.isnan(xf), 0.0, xf)
    g = torch.where(torch.isfinite(g), g, 0.0)
    a = xf.abs()
    m = torch.clamp(a, max=q_m) if q_m > 0 else torch.zeros_like(a)
    active = (m > 0) if signed else (m > 0) & (xf > 0)
    base = torch.where(active, m, 1.0)
    c = base**t
    ga = torch.where(active, g.abs(), 0.0)
    s_d = float((ga * 0.5).sum())
    s_q = float(ga[active & (a > q_m)].sum()) * abs(t) * (q_m ** (t - 1) if q_m > 0 else 0.0)
    s_t = float((ga * c * base.log().abs()).sum())
    flips = ulps_d = ulps_t = 0.0
    if t != 1.0:
        # exp(t*log(m)) is good to a few ulp times (1 + |t log m|) in each library; a change of
        # c moves round(r) - r with it, and a near-tie of round() may flip by one level.
        err_c = c * 2.0**-20 * (1 + (t * base.log()).abs())
        ulps_d = float((ga * err_c).sum()) / abs(d)
        ulps_t = float((ga * err_c * base.log().abs()).sum())
        r = c / d
        near = ((r - r.floor()) - 0.5).abs() <= 1e-4 * torch.clamp(r, min=1.0)
        flips = float(ga[near].sum())
    rel = 2e-5
    return (rel * s_d + ulps_d + flips + 1e-6, rel * s_q + 1e-6,
            rel * s_t + ulps_t + 1e-6)


def assert_backward_close(out: tuple[Tensor, ...], ref: tuple[Tensor, ...], tols: tuple,
                          msg: str) -> None:
    gx, rgx = out[0], ref[0]
    assert gx.dtype == rgx.dtype and gx.shape == rgx.shape, msg
    assert gx.stride() == rgx.stride(), f"grad_x strides {gx.stride()} != {rgx.stride()}: {msg}"
    same_nan_and_sign(gx.float(), rgx.float())
    ok = ~torch.isnan(rgx.float())
    assert torch.equal(gx[ok], rgx[ok]), f"grad_x must match bitwise: {msg}"
    for name, a, b, tol in zip(("grad_d", "grad_q_m", "grad_t"), out[1:], ref[1:], tols):
        assert a.dtype == torch.float32 and a.shape == b.shape, f"{name}: {msg}"
        av, bv = float(a.reshape(())), float(b.reshape(()))
        if bv != bv:
            assert av != av, f"{name}: kernel {av}, reference NaN: {msg}"
            continue
        assert abs(av - bv) <= tol, f"{name}: kernel {av} vs reference {bv} (tol {tol}): {msg}"


def run_both(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool, gy: Tensor,
             msg: str) -> None:
    dv, qv, tv = (float(p.reshape(())) for p in (d, q_m, t))
    y = torch.ops.geta.quantize(x, d, q_m, t, signed)
    assert_forward_close(y, quantize_reference(x, d, q_m, t, signed), dv, tv, msg)
    out = torch.ops.geta.quantize_backward(gy, x, d, q_m, t, signed)
    ref = quantize_backward_reference(gy, x, d, q_m, t, signed)
    assert_backward_close(out, ref, grad_tolerances(gy, x, dv, qv, tv, signed), msg)


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("loader", "opset"), LOADERS)
def test_status_describes_every_device(loader: ModuleType, opset: kernels.OpSet) -> None:
    st = loader.ensure_loaded()
    assert st == loader.status() == loader.ensure_loaded()
    assert set(st) == {"cpu", "cuda"}
    assert loader.OPS == opset.ops == build_config.OPSETS[opset.name].ops
    for dev, entry in st.items():
        assert entry["impl"] in ("fused", "reference"), (dev, entry)
        assert isinstance(entry["reason"], str) and entry["reason"], (dev, entry)


@pytest.mark.skipif(NO_KERNELS, reason="GETA_FX_NO_KERNELS is set")
@pytest.mark.parametrize(("loader", "opset"), LOADERS)
def test_cpu_kernel_is_in_use_when_a_compiler_is_present(loader: ModuleType,
                                                         opset: kernels.OpSet) -> None:
    """An install with a compiler builds the CPU library; the one for this CPU serves."""
    if not has_cpu_toolchain():
        pytest.skip("no C++ compiler or ninja: the reference serves the CPU")
    st = loader.ensure_loaded()["cpu"]
    assert st["impl"] == "fused", st
    assert Path(st["library"]).parent == kernels.library_dir(), st
    assert Path(st["library"]).name.startswith(f"_C_cpu_{build_config.cpu_tag()}."), st
    for op in opset.ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


@pytest.mark.parametrize("device", DEVICES)
def test_fused_device_has_every_op_registered(device: str) -> None:
    need_fused(device)
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    for op in kernels.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), op


@pytest.mark.skipif(NO_KERNELS, reason="GETA_FX_NO_KERNELS is set")
@pytest.mark.parametrize(("loader", "opset"), LOADERS)
def test_cuda_kernel_serves_where_shipped(loader: ModuleType, opset: kernels.OpSet) -> None:
    """Fused where a GPU is visible and the CUDA library holds the set; else it says why."""
    st = loader.ensure_loaded()["cuda"]
    if not HAS_CUDA:
        assert st["impl"] == "reference", st
        assert st["reason"].startswith(NO_CUDA_REASONS), st
        return
    if kernels._find_library("cuda") is None:
        assert st["impl"] == "reference" and "without CUDA" in st["reason"], st
        pytest.skip(f"this install has no CUDA library: {st['reason']}")
    if st["impl"] != "fused":
        assert f"{opset.cuda_switch}=0" in st["reason"], st
        pytest.skip(st["reason"])


@pytest.mark.parametrize("capability", ["AVX512", "AVX2", "DEFAULT", "ZVECTOR", "SVE256"])
def test_every_cpu_capability_maps_to_a_built_library_tag(capability: str) -> None:
    tag = build_config.cpu_tag(capability)
    assert tag in build_config.CPU_TAGS
    if capability in ("DEFAULT", "ZVECTOR", "SVE256"):
        assert tag == "default"
    flags, _ = build_config.cpu_build_flags(tag)
    assert ("-mavx2" in flags) == (tag == "avx2") and ("-mavx512f" in flags) == (tag == "avx512")
    with pytest.raises(ValueError, match="no CPU library"):
        build_config.cpu_build_flags("avx9000")


def test_every_op_set_source_exists_and_registers_its_ops() -> None:
    """Each op set's sources exist, are shipped (package-data) and register each of its ops."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for name, srcs in build_config.OPSETS.items():
        for dev in ("cpu", "cuda"):
            files = getattr(srcs, dev)
            assert files, (name, dev)
            text = "".join((build_config.CSRC / f).read_text() for f in files)
            assert f"TORCH_LIBRARY_IMPL(geta, {dev.upper()}, m)" in text, (name, dev)
            for op in srcs.ops:
                assert f'm.impl("{op.split("::")[1]}"' in text, (name, dev, op)
    for pattern in ("csrc/*.h", "csrc/cpu/*.cpp", "csrc/cuda/*.cu", "csrc/cuda/*.cuh"):
        assert f'"{pattern}"' in pyproject, pattern
    shipped = {p.relative_to(build_config.CSRC).as_posix()
               for pat in ("*.h", "cpu/*.cpp", "cuda/*.cu", "cuda/*.cuh")
               for p in build_config.CSRC.glob(pat)}
    every = {p.relative_to(build_config.CSRC).as_posix()
             for p in build_config.CSRC.rglob("*") if p.is_file()}
    assert every == shipped, f"sources package-data would leave out: {every - shipped}"


def test_missing_library_is_reported_with_how_to_build(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    monkeypatch.delenv("GETA_FX_NO_KERNELS", raising=False)
    lib = kernels._load_library("cpu")
    assert lib.path is None
    assert f"no compiled _C_cpu_{build_config.cpu_tag()} library" in lib.reason, lib
    assert kernels.HOW_TO_BUILD in lib.reason, lib
    (tmp_path / "_C_cpu_other.so").write_bytes(b"")
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    assert "found only _C_cpu_other.so" in kernels._load_library("cpu").reason


def test_newest_library_of_this_cpu_is_found(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """setup.py's _C_cpu_<tag>.abi3.so and --build's _C_cpu_<tag>.so: the newer one loads."""
    tag = build_config.cpu_tag()
    old, new, other = (tmp_path / f"_C_cpu_{tag}.abi3.so", tmp_path / f"_C_cpu_{tag}.so",
                       tmp_path / f"_C_cpu_{tag}x.so")
    for i, path in enumerate((old, new, other)):
        path.write_bytes(b"")
        os.utime(path, (1000 + i, 1000 + i))
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    assert kernels._find_library("cpu") == new
    os.utime(old, (2000, 2000))
    assert kernels._find_library("cpu") == old
    assert kernels._find_library("cuda") is None


def test_unloadable_library_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / f"_C_cpu_{build_config.cpu_tag()}.abi3.so").write_bytes(b"not an ELF file")
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    monkeypatch.delenv("GETA_FX_NO_KERNELS", raising=False)
    lib = kernels._load_library("cpu")
    assert lib.path is None and lib.reason.startswith("cannot load _C_cpu_"), lib


def test_library_without_an_op_of_the_set_serves_reference(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A loaded library lacking one op of a set: that set says reference, naming the op."""
    ghost = build_config.OpSetSources(ops=("geta::quantize", "geta::no_such_op"), cpu=(),
                                      cuda=(), cuda_switch="GETA_FX_BUILD_GHOST_CUDA")
    monkeypatch.setitem(build_config.OPSETS, "ghost", ghost)
    fake = kernels._Library(kernels.library_dir() / "_C_cpu_x.so", "loaded")
    monkeypatch.setattr(kernels, "_LIBRARIES", {"cpu": fake, "cuda": fake})
    st = kernels.KernelLoader(kernels.OpSet(owner="test", name="ghost")).ensure_loaded()
    assert all(st[dev]["impl"] == "reference" for dev in ("cpu", "cuda")), st
    assert "registers no CPU kernel for ['geta::no_such_op']" in st["cpu"]["reason"], st
    assert "'geta::no_such_op'] (built with GETA_FX_BUILD_GHOST_CUDA=0?)" in st["cuda"]["reason"]


_PROBE = """
    import json, sys, time
    import torch
    t0 = time.perf_counter()
    import geta_fx
    import geta_fx.ops as ops
    import geta_fx.kernels as k
    st = k.ensure_loaded()
    elapsed = time.perf_counter() - t0
    from geta_fx.ops.reference import quantize_reference
    x = torch.randn(1000)
    p = [torch.tensor([v]) for v in (0.05, 1.0, 1.0)]
    same = torch.equal(ops.quantize(x, *p), quantize_reference(x, *p, True))
    import geta_fx.lowbit_kernels as lk
    compiler = [m for m in ("torch.utils.cpp_extension", "setuptools") if m in sys.modules]
    print(json.dumps({"status": st, "elapsed": elapsed, "same": same,
                      "lowbit": lk.ensure_loaded(), "compiler": compiler}))
"""


@pytest.fixture(scope="module")
def fresh_processes() -> dict[str, dict]:
    """Import geta_fx in fresh interpreters, concurrently, one per loader scenario.

    Returns each child's ``status()``, the seconds ``import geta_fx`` + ``ensure_loaded()``
    took, whether ``ops.quantize`` still matched the reference there, the low-bit loader's
    ``ensure_loaded()`` and which build machinery modules the import pulled in.
    """
    scenarios: dict[str, dict[str, str]] = {"no_kernels": {"GETA_FX_NO_KERNELS": "1"}}
    if not NO_KERNELS:
        scenarios["shipped"] = {}
    procs = {
        name: subprocess.Popen([sys.executable, "-c", textwrap.dedent(_PROBE)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, **env))
        for name, env in scenarios.items()
    }
    results: dict[str, dict] = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-4000:]}"
        # the loader logs at DEBUG and never prints
        assert err.strip() == "" or "Warning" in err, f"{name}: {err[-2000:]}"
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def test_no_kernels_env_forces_reference(fresh_processes: dict[str, dict]) -> None:
    out = fresh_processes["no_kernels"]
    for st in (out["status"], out["lowbit"]):
        for dev in ("cpu", "cuda"):
            assert st[dev]["impl"] == "reference"
            assert "GETA_FX_NO_KERNELS" in st[dev]["reason"]
    assert out["same"]


@pytest.mark.skipif(NO_KERNELS, reason="GETA_FX_NO_KERNELS is set")
def test_import_loads_shipped_kernels_fast_and_never_compiles(fresh_processes: dict[str, dict]
                                                             ) -> None:
    need_fused("cpu")
    out = fresh_processes["shipped"]
    assert out["compiler"] == [], f"import geta_fx imported build machinery: {out['compiler']}"
    for cpu in (out["status"]["cpu"], out["lowbit"]["cpu"]):
        assert cpu["impl"] == "fused", out
        assert cpu["reason"].startswith("loaded _C_cpu_"), out
        assert cpu["load_s"] < 1.0, f"loading the CPU kernels took {cpu['load_s']} s"
    assert out["status"]["cpu"]["library"] == out["lowbit"]["cpu"]["library"], out
    assert out["elapsed"] < 20.0, f"import geta_fx + ensure_loaded took {out['elapsed']} s"
    assert out["same"]


def test_missing_compiler_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    reason = kernels.toolchain_problem("cpu")
    assert reason is not None and "compiler" in reason
    assert kernels.build(("cpu",)) == {"cpu": reason}


@pytest.mark.skipif(sys.platform == "win32", reason="uses `false` as the compiler")
def test_failed_jit_build_leaves_the_installed_library_alone(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    if shutil.which("false") is None or not has_cpu_toolchain():
        pytest.skip("needs `false` and ninja")
    monkeypatch.setenv("CXX", shutil.which("false") or "false")
    monkeypatch.setenv("GETA_FX_KERNEL_CACHE", str(tmp_path / "cache"))
    lib_dir = tmp_path / "pkg"
    lib_dir.mkdir()
    (lib_dir / "_C_cpu_default.so").write_bytes(b"old")
    monkeypatch.setattr(kernels, "_HERE", lib_dir)
    outcome = kernels.build(("cpu",))["cpu"]
    assert outcome.startswith("build of _C_cpu_") and "failed" in outcome, outcome
    assert (tmp_path / "cache").is_dir()
    assert sorted(p.name for p in lib_dir.iterdir()) == ["_C_cpu_default.so"]
    assert (lib_dir / "_C_cpu_default.so").read_bytes() == b"old"


@pytest.mark.slow
@pytest.mark.skipif(NO_KERNELS, reason="GETA_FX_NO_KERNELS is set")
def test_jit_build_installs_a_library_that_loads(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """geta-fx kernels --build: compiles this CPU's library, checked, into the package dir."""
    if not has_cpu_toolchain():
        pytest.skip("no C++ compiler or ninja")
    monkeypatch.setenv("GETA_FX_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    outcome = kernels.build(("cpu",), opsets=("quantize",))["cpu"]  # one source: faster
    lib = tmp_path / f"_C_cpu_{build_config.cpu_tag()}.so"
    assert outcome.startswith(f"built {lib}"), outcome
    assert kernels._find_library("cpu") == lib


# ---------------------------------------------------------------------------------------------
# values against the reference
# ---------------------------------------------------------------------------------------------
SHAPES = [(), (0,), (1,), (7,), (15,), (16,), (17,), (33,), (1023,), (2, 0, 3), (3, 5, 7),
          (64, 257), (16385,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("t", [1.0, 1.37, 0.6])
def test_random_inputs_match_reference(device: str, dtype: torch.dtype, signed: bool,
                                       t: float) -> None:
    need_fused(device)
    for i, shape in enumerate(SHAPES):
        x = rand_x(shape, dtype, device, salt=i)
        gy = rand_x(shape, dtype, device, salt=1000 + i, scale=1.0)
        q_m = 1.5
        d = q_m**t / 127
        run_both(x, *params(d, q_m, t, device), signed, gy,
                 ctx(device=device, dtype=dtype, shape=shape, signed=signed, t=t))


EDGE = [0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 0.99999994, -0.99999994, NAN, -NAN, INF,
        -INF, 1e-40, -1e-40, 1e-30, -1e-30, 1e30, -1e30, 0.05, -0.05, 0.15, -0.25, 0.5, 3.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("d", "q_m", "t"), [
    (0.1, 1.0, 1.0),      # the worked example: ties such as 0.05/0.1
    (0.1, 1.0, 1.5),
    (1e-30, 1.0, 1.0),    # tiny d: ~1e30 levels
    (1e-30, 1.0, 0.7),
    (1e30, 1.0, 1.0),     # huge d: everything rounds to 0
    (1e30, 1.0, 2.0),
    (0.01, 0.0, 1.0),     # q_m == 0: all zero, finite gradients
    (0.01, -1.0, 1.3),    # q_m < 0
    (2.0**-10, 0.5, 1.0),
    (1e-5, 4.0, 3.0),
])
def test_edge_values_match_reference(device: str, dtype: torch.dtype, signed: bool, d: float,
                                     q_m: float, t: float) -> None:
    need_fused(device)
    vals = EDGE + [q_m, -q_m, q_m * 2, -q_m * 2]
    x = torch.tensor(vals, dtype=torch.float32).to(dtype).to(device)
    finite = torch.tensor(vals[:8] + vals[12:], dtype=torch.float32).to(dtype).to(device)
    for xs in (x, finite):
        gy = torch.linspace(-2.0, 3.0, xs.numel(), device=device).to(dtype)
        run_both(xs, *params(d, q_m, t, device), signed, gy,
                 ctx(device=device, dtype=dtype, d=d, q_m=q_m, t=t, signed=signed, x=xs))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_to_every_gradient(device: str) -> None:
    need_fused(device)
    x = torch.tensor([0.3, NAN, -0.2, 0.0], device=device)
    gy = torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)
    gx, gd, gq, gt = torch.ops.geta.quantize_backward(gy, x, *params(0.1, 1.0, 1.2, device),
                                                      True)
    assert torch.isnan(gx[1]) and not torch.isnan(gx[[0, 2, 3]]).any()
    assert torch.isnan(gd).all() and torch.isnan(gq).all() and torch.isnan(gt).all()


def _layouts(device: str, dtype: torch.dtype) -> list[tuple[str, Tensor, Tensor]]:
    base = rand_x((33, 70), dtype, device, salt=7)
    g = rand_x((33, 70), dtype, device, salt=8, scale=1.0)
    x4 = rand_x((2, 5, 6, 7), dtype, device, salt=9)
    g4 = rand_x((2, 5, 6, 7), dtype, device, salt=10, scale=1.0)
    flat = rand_x((4099,), dtype, device, salt=11)
    gflat = rand_x((4099,), dtype, device, salt=12, scale=1.0)
    return [
        ("transposed", base.t(), g.t()),
        ("transposed x, contiguous grad", base.t(), g.t().contiguous()),
        ("step slice", base[:, ::3], g[:, ::3]),
        ("channels_last", x4.to(memory_format=torch.channels_last),
         g4.to(memory_format=torch.channels_last)),
        ("channels_last x, contiguous grad", x4.to(memory_format=torch.channels_last), g4),
        ("misaligned offset 1", flat[1:], gflat[1:]),
        ("misaligned offset 3", flat[3:4000], gflat[5:4002]),
        ("expanded grad", base, torch.ones((), dtype=dtype, device=device).expand(33, 70)),
        ("broadcast column", base[:, :1].expand(33, 70), g),
        ("0-dim", base[3, 4], g[3, 4]),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1.0, 0.8])
def test_non_contiguous_layouts_match_reference(device: str, dtype: torch.dtype,
                                                t: float) -> None:
    need_fused(device)
    for name, x, gy in _layouts(device, dtype):
        for signed in (True, False):
            run_both(x, *params(0.01, 2.0, t, device), signed, gy,
                     ctx(device=device, dtype=dtype, layout=name, t=t, signed=signed))


@pytest.mark.parametrize("device", DEVICES)
def test_scalar_parameter_shapes(device: str) -> None:
    need_fused(device)
    x = rand_x((100,), torch.float32, device, salt=3)
    gy = torch.ones_like(x)
    for shape in ((), (1,), (1, 1)):
        d, q_m, t = params(0.02, 1.0, 1.1, device, shape=shape)
        out = torch.ops.geta.quantize_backward(gy, x, d, q_m, t, True)
        ref = quantize_backward_reference(gy, x, d, q_m, t, True)
        for a, b in zip(out[1:], ref[1:]):
            assert a.shape == b.shape == torch.Size(shape)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_checks_inputs(device: str) -> None:
    need_fused(device)
    x = torch.randn(8, device=device)
    d, q_m, t = params(0.1, 1.0, 1.0, device)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.geta.quantize(x.double(), d, q_m, t, True)
    with pytest.raises(RuntimeError, match=r"exactly one element, got shape \[2\]"):
        torch.ops.geta.quantize(x, torch.ones(2, device=device), q_m, t, True)
    with pytest.raises(RuntimeError, match="must be float32"):
        torch.ops.geta.quantize(x, d.double(), q_m, t, True)
    with pytest.raises(RuntimeError, match="grad_y dtype"):
        torch.ops.geta.quantize_backward(x.half(), x, d, q_m, t, True)
    with pytest.raises(RuntimeError, match=r"grad_y shape \[4\] != x shape \[8\]"):
        torch.ops.geta.quantize_backward(x[:4], x, d, q_m, t, True)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="d is on cpu but x is on cuda"):
            torch.ops.geta.quantize(x, d.cpu(), q_m, t, True)


# ---------------------------------------------------------------------------------------------
# reductions: deterministic
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_are_deterministic(device: str, dtype: torch.dtype) -> None:
    need_fused(device)
    x = rand_x((300_001,), dtype, device, salt=21)
    gy = rand_x((300_001,), dtype, device, salt=22, scale=1.0)
    p = params(0.003, 1.0, 1.25, device)
    first = torch.ops.geta.quantize_backward(gy, x, *p, True)
    for _ in range(3):
        again = torch.ops.geta.quantize_backward(gy, x, *p, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_cpu_reductions_do_not_depend_on_thread_count() -> None:
    need_fused("cpu")
    x = rand_x((200_003,), torch.float32, "cpu", salt=31)
    gy = rand_x((200_003,), torch.float32, "cpu", salt=32, scale=1.0)
    p = params(0.003, 1.0, 0.9, "cpu")
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.geta.quantize_backward(gy, x, *p, True))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# autograd and opcheck through the dispatcher
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_uses_kernel_gradients(device: str, dtype: torch.dtype) -> None:
    need_fused(device)
    x = rand_x((40, 30), dtype, device, salt=41).requires_grad_(True)
    d, q_m, t = params(0.02, 1.0, 1.0, device, requires_grad=True)
    w = rand_x((40, 30), dtype, device, salt=42, scale=1.0)
    (ops.quantize(x, d, q_m, t) * w).sum().backward()
    ref = quantize_backward_reference(w, x.detach(), d.detach(), q_m.detach(), t.detach(), True)
    assert torch.equal(x.grad, ref[0])
    tols = grad_tolerances(w, x.detach(), 0.02, 1.0, 1.0, True)
    for p, r, tol in zip((d, q_m, t), ref[1:], tols):
        assert abs(float(p.grad) - float(r)) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device: str, dtype: torch.dtype) -> None:
    need_fused(device)
    x = rand_x((6, 9), dtype, device, salt=51)
    gy = rand_x((6, 9), dtype, device, salt=52, scale=1.0)
    samples = [
        (x, *params(0.05, 1.0, 1.0, device), True),
        (x.t(), *params(0.05, 1.0, 1.3, device), False),
        (x.clone().requires_grad_(True), *params(0.05, 1.0, 0.9, device, requires_grad=True),
         True),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.geta.quantize.default, args)
    torch.library.opcheck(torch.ops.geta.quantize_backward.default,
                          (gy, x, *params(0.05, 1.0, 1.2, device), True))


# ---------------------------------------------------------------------------------------------
# CUDA specifics
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_grid_stride_and_side_stream(dtype: torch.dtype) -> None:
    need_fused("cuda")
    n = (1 << 23) + 5  # more work than one resident grid, plus a ragged tail
    x = rand_x((n,), dtype, "cuda", salt=61)
    gy = rand_x((n,), dtype, "cuda", salt=62, scale=1.0)
    p = params(0.004, 1.0, 1.0, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = torch.ops.geta.quantize(x, *p, True)
        out = torch.ops.geta.quantize_backward(gy, x, *p, True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, quantize_reference(x, *p, True))
    ref = quantize_backward_reference(gy, x, *p, True)
    assert torch.equal(out[0], ref[0])
    tols = grad_tolerances(gy, x, 0.004, 1.0, 1.0, True)
    for a, b, tol in zip(out[1:], ref[1:], tols):
        assert abs(float(a) - float(b)) <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_cuda_nonlinear_agrees_almost_everywhere() -> None:
    """t != 1 uses expf/logf like ATen: report (and bound) the near-tie flips on 4M elements."""
    need_fused("cuda")
    x = rand_x((1 << 22,), torch.float32, "cuda", salt=71)
    p = params(1.0 / 4096, 1.0, 1.5, "cuda")
    y = torch.ops.geta.quantize(x, *p, True)
    yr = quantize_reference(x, *p, True)
    flips = int((y != yr).sum())
    assert flips <= x.numel() // 10_000, flips


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_nonlinear_fast_path_rounds_like_exact_path_at_ties(dtype: torch.dtype) -> None:
    """t != 1 takes a MUFU fast path only away from rounding ties (power_ratio in
    quantize_cuda.cu).  float32: inputs within 3 ulp of every tie x^t/d = k + 0.5; fp16/bf16:
    every one of the dtype's 65,536 bit patterns.  All must round exactly like the reference
    (ATen's exp/log on the same GPU), and the backward must agree too."""
    need_fused("cuda")
    t, q_m = 1.5, 3.0
    d = q_m**t / 127
    if dtype == torch.float32:
        ties = (torch.arange(127, dtype=torch.float64) + 0.5) * d
        bits = (ties ** (1.0 / t)).to(torch.float32).view(torch.int32)
        x = torch.cat([(bits + o).view(torch.float32) for o in range(-3, 4)])
        x = torch.cat([x, -x])
    else:
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x.cuda()
    p = params(d, q_m, t, "cuda")
    y = torch.ops.geta.quantize(x, *p, True)
    yr = quantize_reference(x, *p, True)
    differ = (y != yr) & ~(torch.isnan(y) & torch.isnan(yr))
    flips = int(differ.sum())
    assert flips == 0, (f"{flips} of {x.numel()} elements round differently ({dtype}), e.g. x="
                        f"{x[differ][:4].tolist()}")
    gy = torch.linspace(-1.0, 1.0, x.numel(), device="cuda").to(dtype)
    run_both(x, *p, True, gy, ctx(dtype=dtype, what="near ties / all bit patterns"))
