"""``geta::quantize.table``: an activation quantizer's inference form (levels from a table).

``geta::quantize(x, d, q_m, t, signed)`` computes ``round(min(|x|, q_m)^t / d)`` per element; with
``t != 1`` (every trained GETA quantizer) that is an ``exp`` and a ``log`` per element, which on
CPU costs more than the small convolutions of a slim model around it.  With frozen ``d``, ``q_m``,
``t`` the level is a step function of ``m = min(|x|, q_m)``: level ``k`` starts at a threshold
``m_k`` (the smallest float32 ``m`` the quantizer maps to level ``>= k``), so the level of ``m`` is
the number of thresholds ``<= m``.  :func:`build_table` finds the thresholds with the quantizer
itself (bisection over the float32 bit patterns, evaluated by the ``geta::quantize`` the model
would run, so the fused kernel's own ``exp``/``log`` rounding is what is reproduced) and the op
reads the count from a table instead of computing a power.

Contract (reference: :func:`quantize_table_reference`; the CPU kernel
``kernels/csrc/cpu/quantize_table_cpu.cpp`` and the CUDA one agree bit for bit)
    ``x``: float32/float16/bfloat16, any shape and strides; computed in float32, the result cast
    back to ``x.dtype``.  ``d``, ``q_m``, ``t``: the frozen quantizer's float32 one-element
    tensors (``t`` is not read by the table; it is there so the node still *is* the quantizer:
    ``geta_fx.report`` reads its bits from ``d``/``q_m``/``t`` and
    :func:`as_quantize` turns the node back into ``geta::quantize``).  ``scale``: float32 one
    element, ``G / q_m``; ``bounds``: int32 ``[G]`` (float32 bit patterns); ``base``: int32
    ``[G]``; all on ``x``'s device.  Per element::

        m = min(|x|, q_m)                              # NaN stays NaN
        j = clamp(int(m * scale), 0, G - 1)            # float32 multiply, truncation
        level = base[j] + (bits(m) >= bounds[j])       # bits(m): m's float32 bit pattern
        y = NaN (x itself)      if x is NaN
          = -(level * d)        if x < 0 and signed    # float32(level) * d: one IEEE multiply
          = 0                   if x <= 0 and not signed
          = level * d           otherwise

    ``bounds[j]`` is the threshold whose cell ``int(m_k * scale)`` is ``j`` (at most one per
    cell; ``+inf`` where none), ``base[j]`` the number of thresholds in cells ``< j``.  The cell
    map is monotone, so ``level`` is exactly the number of thresholds ``<= m``.

Exactness: the table reproduces ``geta::quantize`` on the device it was built on, bit for bit
(signs of zero included), for every ``x``, provided the quantizer's level is a non-decreasing
function of ``m``.  That holds exactly for ``t == 1`` (IEEE division and rounding are
monotone).  For ``t != 1`` the power is ``exp(t * log(m))`` with a few ulp of error, which can
only move a level where ``m^t / d`` is within that error of a half-integer, i.e. within a few
ulp of a threshold; :func:`build_table` evaluates the quantizer at every float32 within
:data:`WINDOW` ulp (1024; the error is < 100 ulp for ``|t log m| < 10``) of each threshold and
refuses (``ValueError``) a table that disagrees there.  ``verify="all"`` checks every float32 in
``(0, q_m]`` instead (seconds; tests).

Inference only: no autograd formula (the lowered model is not trained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from geta_fx.kernels import KernelLoader, OpSet
from geta_fx.ops.reference import check_quantize_inputs
from geta_fx.ops.schema import lib

__all__ = ["MAX_CELLS", "TABLE_KERNELS", "WINDOW", "QuantizeTable", "as_quantize", "build_table",
           "check_quantize_table_inputs", "ensure_loaded", "quantize_table_reference",
           "status"]

#: ulp on each side of every threshold where :func:`build_table` checks the table.
WINDOW = 1024
#: Most cells a table may have (int32 bounds + base: 8 bytes a cell).
MAX_CELLS = 1 << 16
_INF_BITS = 0x7F800000

#: Kernel op set of this op (``kernels/build_config.py``); loaded with the device libraries.
TABLE_KERNELS = OpSet(owner="geta_fx.ops.quantize_table", name="quantize_table")
_LOADER = KernelLoader(TABLE_KERNELS)


def status() -> dict[str, dict[str, object]]:
    """Which implementation serves ``geta::quantize.table`` per device, and why."""
    return _LOADER.status()


def ensure_loaded() -> dict[str, dict[str, object]]:
    """Load the shipped kernels (shared device libraries) and check this op; never raises."""
    return _LOADER.ensure_loaded()


# ------------------------------------------------------------------------------------ reference
def check_quantize_table_inputs(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, scale: Tensor,
                                bounds: Tensor, base: Tensor) -> None:
    """:func:`~geta_fx.ops.reference.check_quantize_inputs` plus the table's dtypes and shapes."""
    check_quantize_inputs(x, d, q_m, t)
    op = "geta::quantize.table"
    torch._check(scale.numel() == 1 and scale.dtype == torch.float32,
                 lambda: f"{op}: scale must be float32 with one element, got {scale.dtype} "
                 f"{tuple(scale.shape)}")
    for name, tab in (("bounds", bounds), ("base", base)):
        torch._check(tab.dtype == torch.int32 and tab.dim() == 1,
                     lambda: f"{op}: {name} must be a 1-D int32 tensor, got {tab.dtype} "
                     f"{tuple(tab.shape)}")
    torch._check(bounds.shape == base.shape and bounds.numel() >= 1,
                 lambda: f"{op}: bounds {tuple(bounds.shape)} and base {tuple(base.shape)} must "
                 "have the same non-zero length")
    for name, p in (("scale", scale), ("bounds", bounds), ("base", base)):
        torch._check(p.device == x.device,
                     lambda: f"{op}: {name} is on {p.device} but x is on {x.device}")


def _cell(m: Tensor, scale: Tensor, cells: int) -> Tensor:
    """``clamp(int(m * scale), 0, cells - 1)`` (m >= 0 float32, no NaN), as the kernels do."""
    return (m * scale).to(torch.int32).clamp_(0, cells - 1)


def quantize_table_reference(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool,
                             scale: Tensor, bounds: Tensor, base: Tensor) -> Tensor:
    """Reference ``geta::quantize.table`` (module docstring); CompositeExplicitAutograd."""
    check_quantize_table_inputs(x, d, q_m, t, scale, bounds, base)
    xf = x.float()
    nan = torch.isnan(xf)
    m = torch.minimum(xf.abs(), q_m.reshape(()))
    m = torch.where(nan, 0.0, m)
    j = _cell(m, scale.reshape(()), bounds.numel()).long()
    level = base[j] + (m.view(torch.int32) >= bounds[j]).to(torch.int32)
    mag = level.float() * d.reshape(())
    y = torch.where(xf < 0, -mag, mag) if signed else torch.where(xf > 0, mag, 0.0)
    y = torch.where(nan, xf, y)
    out = torch.empty_like(x)
    return out.copy_(y)


lib.impl("quantize.table", quantize_table_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("geta::quantize.table")
def _quantize_table_fake(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool,
                         scale: Tensor, bounds: Tensor, base: Tensor) -> Tensor:
    check_quantize_table_inputs(x, d, q_m, t, scale, bounds, base)
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------- builder
@dataclass(frozen=True)
class QuantizeTable:
    """The table of one frozen quantizer (tensors on the quantizer's device)."""

    scale: Tensor       # float32 [1]: cells / q_m
    bounds: Tensor      # int32 [cells]: threshold bit patterns, +inf where a cell has none
    base: Tensor        # int32 [cells]: thresholds in the cells below
    max_level: int      # level at m = q_m
    checked: int        # float32 values the quantizer was compared with the table at


def _levels(f_bits: Tensor, d: Tensor, q_m: Tensor, t: Tensor) -> Tensor:
    """Level of each non-negative float32 given as bit patterns, by ``geta::quantize``."""
    y = torch.ops.geta.quantize.default(f_bits.view(torch.float32), d, q_m, t, False)
    return torch.round(y / d.reshape(())).to(torch.int64)


def _count(thresholds: Tensor, m_bits: Tensor) -> Tensor:
    return torch.searchsorted(thresholds, m_bits, right=True)


def build_table(d: Tensor, q_m: Tensor, t: Tensor, *, verify: str = "window",
                window: int = WINDOW) -> QuantizeTable:
    """Thresholds of a frozen quantizer and its cell table, checked against ``geta::quantize``.

    Args:
        d, q_m, t: float32 one-element tensors (``q_m`` the effective clipping range, > 0).
        verify: ``"window"`` (every float32 within ``window`` ulp of each threshold) or
            ``"all"`` (every float32 in ``(0, q_m]``; ~10^9 values at 8 bits: for tests).
        window: ulp on each side of each threshold for ``verify="window"``.

    Raises:
        ValueError: non-finite or non-positive parameters, more than ``MAX_CELLS / 2``
            levels (over 15 bits) or more than :data:`MAX_CELLS` cells needed, or a level that
            is not a non-decreasing function of ``|x|`` near a
            threshold (the table would differ from ``geta::quantize`` there).
    """
    if verify not in ("window", "all"):
        raise ValueError(f"build_table: verify must be 'window' or 'all', got {verify!r}")
    dev = d.device
    d, q_m, t = (p.detach().float().reshape(1) for p in (d, q_m, t))
    dv, qv, tv = float(d), float(q_m), float(t)
    if not all(math.isfinite(v) for v in (dv, qv, tv)) or dv <= 0 or qv <= 0:
        raise ValueError(f"build_table: needs finite d > 0 and q_m > 0, got d={dv}, q_m={qv}, "
                         f"t={tv}")
    q_bits = int(q_m.view(torch.int32))
    top = int(_levels(q_m.view(torch.int32), d, q_m, t)[0])
    if 2 * top > MAX_CELLS:
        raise ValueError(f"build_table: {top} levels (about {math.log2(top + 1):.1f} bits) are "
                         f"more than a table of {MAX_CELLS} cells holds")
    if top > 0:
        # bisection on bit patterns: the smallest m with level(m) >= k, for every k at once
        want = torch.arange(1, top + 1, device=dev, dtype=torch.int64)
        lo = torch.zeros(top, device=dev, dtype=torch.int64)      # level(lo) < k
        hi = torch.full((top,), q_bits, device=dev, dtype=torch.int64)  # level(hi) >= k
        for _ in range(32):
            if not bool((hi - lo > 1).any()):
                break
            mid = (lo + hi) // 2
            ok = _levels(mid.to(torch.int32), d, q_m, t) >= want
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        thr = hi
        if bool((thr[1:] <= thr[:-1]).any()):
            raise ValueError(f"build_table: two levels share a threshold (d={dv}, q_m={qv}, "
                             f"t={tv}): a level is never produced")
    else:
        thr = torch.zeros(0, device=dev, dtype=torch.int64)
    checked = _verify(thr, d, q_m, t, q_bits, verify, window)
    cells = max(16, 1 << max(0, (2 * top - 1).bit_length()))
    while True:
        scale = torch.tensor([cells / qv], dtype=torch.float32, device=dev)
        if not math.isfinite(float(scale)):
            raise ValueError(f"build_table: q_m={qv} is too small for a table of {cells} cells")
        cell = _cell(thr.to(torch.int32).view(torch.float32), scale, cells).long()
        if cell.numel() < 2 or bool((cell[1:] > cell[:-1]).all()):
            break
        cells *= 2
        if cells > MAX_CELLS:
            raise ValueError(f"build_table: thresholds too unevenly spaced for {MAX_CELLS} "
                             f"cells (d={dv}, q_m={qv}, t={tv})")
    bounds = torch.full((cells,), _INF_BITS, dtype=torch.int32, device=dev)
    bounds[cell] = thr.to(torch.int32)
    base = torch.searchsorted(cell, torch.arange(cells, device=dev), right=False)
    return QuantizeTable(scale, bounds, base.to(torch.int32), top, checked)


def _verify(thr: Tensor, d: Tensor, q_m: Tensor, t: Tensor, q_bits: int, verify: str,
            window: int) -> int:
    """Compare the quantizer's level with the count of thresholds; returns values checked."""
    dev = thr.device
    if verify == "all":
        checked, chunk = 0, 1 << 22
        for start in range(0, q_bits + 1, chunk):
            bits = torch.arange(start, min(start + chunk, q_bits + 1), device=dev,
                                dtype=torch.int64)
            _compare(thr, bits, d, q_m, t)
            checked += bits.numel()
        return checked
    if thr.numel() == 0:
        bits = torch.tensor([0, 1, q_bits], device=dev, dtype=torch.int64)
    else:
        off = torch.arange(-window, window + 1, device=dev, dtype=torch.int64)
        bits = (thr[:, None] + off).reshape(-1).clamp_(0, q_bits)
        bits = torch.cat([bits, torch.tensor([0, 1, q_bits], device=dev)])
    _compare(thr, bits, d, q_m, t)
    return bits.numel()


def _compare(thr: Tensor, bits: Tensor, d: Tensor, q_m: Tensor, t: Tensor) -> None:
    got = _levels(bits.to(torch.int32), d, q_m, t)
    want = _count(thr, bits)
    bad = (got != want).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        m = float(bits[i : i + 1].to(torch.int32).view(torch.float32))
        raise ValueError(f"build_table: the quantizer's level is not monotone in |x| near "
                         f"m={m!r} (level {int(got[i])}, table {int(want[i])}; d={float(d)}, "
                         f"q_m={float(q_m)}, t={float(t)})")


def as_quantize(node: torch.fx.Node) -> None:
    """Turn a ``geta::quantize.table`` node back into the ``geta::quantize`` it stands for."""
    node.target = torch.ops.geta.quantize.default
    node.args = node.args[:5]


ensure_loaded()  # the device libraries are loaded by geta_fx.ops (kernels.ensure_loaded) first
