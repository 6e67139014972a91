"""Benchmark the fused geta::quantize kernels against the reference, torch.compile and copy.

For every device (cpu, and cuda when available), shape (a 4096x4096 weight and an 8x2048x4096
activation), dtype (float32, float16, bfloat16) and quantizer (linear: t = 1, nonlinear: t = 1.5),
prints ms and GB/s for the forward and for forward+backward of

    fused       torch.ops.geta.quantize (+ geta.quantize_backward), the kernels in geta_kernels/
    reference   geta_fx.ops.reference.quantize_reference (+ quantize_backward_reference)
    compiled    torch.compile of those reference functions (the peer)
    aten_fq     torch._fake_quantize_learnable_per_tensor_affine (+ its backward), the fused
                ATen learnable per-tensor fake-quant, where it supports the dtype
    copy        the bandwidth floor: x.clone() forward; x*1.0 and grad*1.0 forward+backward

all in the same run.  GB/s counts the fewest bytes each variant must move: forward reads x and
writes y (2 tensors); forward+backward adds reading grad_y and x and writing grad_x (5 tensors;
x*1.0 fwd+bwd moves 4).  "%copy" is a variant's GB/s over x.clone()'s GB/s on the same device,
shape and dtype.  Timing: the median of --reps batches (CUDA events around a batch of queued
calls on GPU, perf_counter on CPU), divided by the batch size.  Rows are printed (and appended
to --out) as they are measured.

    python benchmarks/bench_kernels.py                      # everything
    python benchmarks/bench_kernels.py --devices cpu --shapes weight --no-compile
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from _common import commit
import geta_fx.kernels as kernels
import geta_fx.ops  # noqa: F401  (schema, reference, fake, autograd; loads the kernels)
from geta_fx.ops.reference import quantize_backward_reference, quantize_reference

SHAPES = {"weight": (4096, 4096), "activation": (8, 2048, 4096)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZERS = {"linear": 1.0, "nonlinear": 1.5}
Q_M = 3.0


def timer(device: str, fn: Callable[[], Any], warmup: int, iters: int, reps: int = 3) -> float:
    """Median over ``reps`` batches of the mean milliseconds of ``fn()`` in a batch of ``iters``.

    On CUDA a batch is queued back to back between two events (host launch overhead overlaps
    the GPU work, as in a training step); on CPU it is timed with perf_counter.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def fused_fwd(x, d, q, t):
    return torch.ops.geta.quantize(x, d, q, t, True)


def fused_fb(x, gy, d, q, t):
    y = torch.ops.geta.quantize(x, d, q, t, True)
    return y, torch.ops.geta.quantize_backward(gy, x, d, q, t, True)


def ref_fwd(x, d, q, t):
    return quantize_reference(x, d, q, t, True)


def ref_fb(x, gy, d, q, t):
    y = quantize_reference(x, d, q, t, True)
    return y, quantize_backward_reference(gy, x, d, q, t, True)


def copy_fwd(x):
    return x.clone()


def copy_fb(x, gy):
    return x * 1.0, gy * 1.0


def aten_fns(x: torch.Tensor, d: torch.Tensor) -> tuple[Callable, Callable] | None:
    """ATen's fused learnable per-tensor fake-quant (8-bit) with the same step size."""
    zp = torch.zeros(1, device=x.device)
    scale = d.clone()

    def fwd():
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, -128, 127, 1.0)

    def fb(gy):
        y = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, -128, 127, 1.0)
        return y, torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
            gy, x, scale, zp, -128, 127, 1.0)

    try:
        fwd()
        fb(torch.ones_like(x))
    except Exception:
        return None
    return fwd, fb


def num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--quantizers", default=",".join(QUANTIZERS))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--iters", type=int, default=0, help="calls per timed batch (0: per device)")
    ap.add_argument("--reps", type=int, default=3, help="timed batches; the median is reported")
    ap.add_argument("--out", default="", help="append the table (markdown) to this file")
    args = ap.parse_args()

    st = kernels.ensure_loaded()
    devices = [dv for dv in args.devices.split(",") if dv == "cpu" or torch.cuda.is_available()]
    header = [
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"torch: {torch.__version__} (CUDA {torch.version.cuda}), "
        f"python {platform.python_version()}",
        f"commit: {commit()}",
        f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
        f" capability {torch.backends.cpu.get_cpu_capability()}",
    ]
    if hasattr(os, "getloadavg"):
        header.append("cpu load average (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())
    if torch.cuda.is_available():
        header.append(f"gpu: {torch.cuda.get_device_name()}")
    for dev in ("cpu", "cuda"):
        header.append(f"kernels[{dev}]: {st[dev]['impl']} ({st[dev]['reason']})")
    cols = ("device", "shape", "dtype", "quantizer", "impl", "fwd ms", "fwd GB/s", "fwd %copy",
            "fwd+bwd ms", "fwd+bwd GB/s", "f+b %copy", "vs ref fwd", "vs ref f+b")
    lines = [*(f"# {h}" for h in header), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def emit(line: str) -> None:
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")

    for line in lines:
        emit(line)

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    c_fwd = c_fb = None
    if not args.no_compile:
        c_fwd = torch.compile(ref_fwd, dynamic=False)
        c_fb = torch.compile(ref_fb, dynamic=False)

    for dev in devices:
        warmup, iters = (3, args.iters or 20) if dev == "cuda" else (1, args.iters or 1)
        fused_ok = st[dev]["impl"] == "fused"
        for sname in args.shapes.split(","):
            shape = SHAPES[sname]
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                gen = torch.Generator(device=dev).manual_seed(0)
                x = (torch.randn(shape, generator=gen, device=dev) * 1.5).to(dtype)
                gy = torch.randn(shape, generator=gen, device=dev).to(dtype)
                n, es = x.numel(), x.element_size()
                fwd_bytes, fb_bytes, copy_fb_bytes = 2 * n * es, 5 * n * es, 4 * n * es
                tm = lambda f: timer(dev, f, warmup, iters, args.reps)  # noqa: E731
                clone_ms = tm(lambda: copy_fwd(x))
                copy_gbs = fwd_bytes / clone_ms / 1e6
                rows: list[tuple] = []
                cfb_ms = tm(lambda: copy_fb(x, gy))
                rows.append(("copy", clone_ms, fwd_bytes, cfb_ms, copy_fb_bytes))
                aten = aten_fns(x, torch.full((1,), Q_M / 127, device=dev))
                if aten is not None:
                    rows.append(("aten_fq", tm(aten[0]), fwd_bytes,
                                 tm(lambda: aten[1](gy)), fb_bytes))
                for qname in args.quantizers.split(","):
                    tv = QUANTIZERS[qname]
                    p = [torch.full((1,), v, device=dev) for v in (Q_M**tv / 127, Q_M, tv)]
                    qrows: list[tuple] = []
                    ref = (tm(lambda: ref_fwd(x, *p)), tm(lambda: ref_fb(x, gy, *p)))
                    if fused_ok:
                        y = fused_fwd(x, *p)
                        yr = ref_fwd(x, *p)
                        exact = bool(torch.equal(y, yr))
                        near = float((y.float() - yr.float()).abs().max()) <= float(p[0]) * 1.01
                        if not (exact or (tv != 1.0 and near)):
                            emit(f"# WARNING: fused {dev} {sname} {dname} {qname} != reference")
                        qrows.append(("fused", tm(lambda: fused_fwd(x, *p)), fwd_bytes,
                                      tm(lambda: fused_fb(x, gy, *p)), fb_bytes))
                    qrows.append(("reference", ref[0], fwd_bytes, ref[1], fb_bytes))
                    if c_fwd is not None:
                        try:
                            qrows.append(("compiled", tm(lambda: c_fwd(x, *p)), fwd_bytes,
                                          tm(lambda: c_fb(x, gy, *p)), fb_bytes))
                        except Exception as e:  # report, keep benchmarking
                            emit(f"# torch.compile failed on {dev}: {type(e).__name__}: {e}")
                            c_fwd = c_fb = None
                    for impl, f_ms, f_b, b_ms, b_b in qrows:
                        rows.append((impl, f_ms, f_b, b_ms, b_b, qname, ref))
                for row in rows:
                    impl, f_ms, f_b, b_ms, b_b = row[:5]
                    qname = row[5] if len(row) > 5 else "-"
                    ref = row[6] if len(row) > 6 else None
                    f_gbs, b_gbs = f_b / f_ms / 1e6, b_b / b_ms / 1e6
                    vs = (f"{ref[0] / f_ms:.1f}x", f"{ref[1] / b_ms:.1f}x") if ref else ("", "")
                    emit("| " + " | ".join((
                        dev, "x".join(map(str, shape)), dname, qname, impl,
                        f"{f_ms:.3f}", num(f_gbs), f"{100 * f_gbs / copy_gbs:.0f}%",
                        f"{b_ms:.3f}", num(b_gbs), f"{100 * b_gbs / copy_gbs:.0f}%", *vs,
                    )) + " |")
                del x, gy
                if dev == "cuda":
                    torch.cuda.empty_cache()
    if not devices:
        print("no device to benchmark", file=sys.stderr)


if __name__ == "__main__":
    main()
