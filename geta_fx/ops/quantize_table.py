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
``geta_kernels/csrc/cpu/quantize_table_cpu.cpp`` and the CUDA one agree bit for bit)
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

``geta::quantize.affine_table(x, d, q_m, t, signed, scale, bounds, base, alpha, beta,
other=None, alpha2=None, beta2=None, pool=[])``: the same table quantizer applied to an eval
batch_norm's output (and whatever sat between them), in one pass (reference:
:func:`affine_table_reference`; CPU kernel ``geta_kernels/csrc/cpu/affine_table_cpu.cpp``, CUDA one
compile-checked only)::

    v = fma(x, alpha[c], beta[c])                  # c = dim 1; one rounding (fma_reference)
    v = v + other                                  # if other (alpha2/beta2: fma(other, .) first)
    v = max_pool2d(v, pool[:2], pool[2:])          # if pool = [kh, kw, sh, sw] (no padding)
    y = quantize.table(v, d, q_m, t, signed, scale, bounds, base)   # contiguous, x.dtype

float16/bfloat16 inputs are computed in float32 and rounded once at the end.  Equal bit for bit
(NaN payloads aside) to ``batch_norm [-> add] [-> max_pool2d] -> quantize.table`` on float32
contiguous inputs wherever ATen's eval batch_norm is ``fma(x, alpha, beta)`` with the
``alpha``/``beta`` of :func:`batch_norm_affine` (checked by it when lowering; true of ATen's
AVX2/AVX-512 CPU builds for planes of more than one element).

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

__all__ = ["AFFINE_KERNELS", "MAX_CELLS", "TABLE_KERNELS", "WINDOW", "QuantizeTable",
           "affine_table_reference", "as_quantize", "batch_norm_affine", "build_table",
           "check_affine_table_inputs", "check_quantize_table_inputs", "ensure_loaded",
           "fma_reference", "quantize_table_reference", "status", "unfuse_affine_table"]

#: ulp on each side of every threshold where :func:`build_table` checks the table.
WINDOW = 1024
#: Most cells a table may have (int32 bounds + base: 8 bytes a cell).
MAX_CELLS = 1 << 16
_INF_BITS = 0x7F800000

#: Kernel op set of this op (``geta_kernels/build_config.py``); loaded with the device libraries.
TABLE_KERNELS = OpSet(owner="geta_fx.ops.quantize_table", name="quantize_table")
#: Kernel op set of ``geta::quantize.affine_table``.
AFFINE_KERNELS = OpSet(owner="geta_fx.ops.quantize_table", name="affine_table")
_LOADER = KernelLoader(TABLE_KERNELS)
_AFFINE_LOADER = KernelLoader(AFFINE_KERNELS)


def status(op: str = "table") -> dict[str, dict[str, object]]:
    """Which implementation serves ``geta::quantize.table`` (``op="affine_table"``:
    ``geta::quantize.affine_table``) per device, and why."""
    return (_AFFINE_LOADER if op == "affine_table" else _LOADER).status()


def ensure_loaded() -> dict[str, dict[str, object]]:
    """Load the shipped kernels (shared device libraries) and check both ops; never raises.
    Returns ``geta::quantize.table``'s status (:func:`status`)."""
    _AFFINE_LOADER.ensure_loaded()
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


# ------------------------------------------------------------------------- fused affine form
def fma_reference(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``fma(x, a, b)`` of float32 tensors (broadcast), rounded once, as the kernels' ``fmaf``.

    The product is exact in float64; the float64 sum ``s`` rounds, and only where ``s`` lands
    exactly on a float32 rounding midpoint can rounding ``s`` to float32 differ from rounding
    the exact sum once: there the sum's error term (TwoSum) picks the side.
    """
    p = x.double() * a.double()
    bd = b.double()
    s = p + bd
    bb = s - p
    err = (p - (s - bb)) + (bd - bb)                     # exact: s + err == p + bd
    r = s.float()
    r64 = r.double()
    inf = torch.tensor(math.inf, dtype=torch.float32, device=r.device)
    toward = torch.nextafter(r, torch.where(s > r64, inf, -inf))  # the other neighbour of s
    tie = (s != r64) & ((s - r64) * 2 == (toward.double() - r64))
    beyond = tie & (err != 0) & ((err > 0) == (s > r64))  # exact sum past the midpoint
    return torch.where(beyond, toward, r)


def _pool_pairs(pool: list[int] | tuple[int, ...]) -> tuple[list[int], list[int]]:
    return [int(pool[0]), int(pool[1])], [int(pool[2]), int(pool[3])]


def check_affine_table_inputs(x: Tensor, alpha: Tensor, beta: Tensor, other: Tensor | None,
                              alpha2: Tensor | None, beta2: Tensor | None,
                              pool: list[int] | tuple[int, ...]) -> None:
    """The affine operands of ``geta::quantize.affine_table`` (the C++ check's conditions)."""
    op = "geta::quantize.affine_table"
    torch._check(x.dim() >= 2, lambda: f"{op}: x must have a channel dimension (N, C, ...), "
                 f"got {tuple(x.shape)}")
    c = x.shape[1]
    for name, v in (("alpha", alpha), ("beta", beta), ("alpha2", alpha2), ("beta2", beta2)):
        if v is None:
            continue
        torch._check(v.dim() == 1 and v.numel() == c and v.is_floating_point(),
                     lambda: f"{op}: {name} must be a 1-D float tensor of {c} channels, got "
                     f"{v.dtype} {tuple(v.shape)}")
        torch._check(v.device == x.device,
                     lambda: f"{op}: {name} is on {v.device} but x is on {x.device}")
    torch._check((alpha2 is None) == (beta2 is None),
                 lambda: f"{op}: alpha2 and beta2 must be given together")
    torch._check(alpha2 is None or other is not None, lambda: f"{op}: alpha2/beta2 need other")
    if other is not None:
        torch._check(other.shape == x.shape and other.dtype == x.dtype
                     and other.device == x.device,
                     lambda: f"{op}: other must have x's shape, dtype and device, got "
                     f"{other.dtype} {tuple(other.shape)} vs {x.dtype} {tuple(x.shape)}")
    torch._check(len(pool) in (0, 4), lambda: f"{op}: pool must be [] or [kh, kw, sh, sw], "
                 f"got {list(pool)}")
    if pool:
        torch._check(x.dim() == 4, lambda: f"{op}: pool needs x of shape (N, C, H, W), got "
                     f"{tuple(x.shape)}")
        torch._check(all(int(v) > 0 for v in pool) and pool[0] <= x.shape[2]
                     and pool[1] <= x.shape[3],
                     lambda: f"{op}: pool {list(pool)} does not fit x {tuple(x.shape)}")


def affine_table_reference(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool,
                           scale: Tensor, bounds: Tensor, base: Tensor, alpha: Tensor,
                           beta: Tensor, other: Tensor | None = None,
                           alpha2: Tensor | None = None, beta2: Tensor | None = None,
                           pool: list[int] | tuple[int, ...] = ()) -> Tensor:
    """Reference ``geta::quantize.affine_table`` (module docstring); CompositeExplicitAutograd."""
    check_quantize_table_inputs(x, d, q_m, t, scale, bounds, base)
    check_affine_table_inputs(x, alpha, beta, other, alpha2, beta2, pool)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)

    def affine(v: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return fma_reference(v.float(), a.float().reshape(shape), b.float().reshape(shape))

    v = affine(x, alpha, beta)
    if other is not None:
        v = v + (other.float() if alpha2 is None or beta2 is None
                 else affine(other, alpha2, beta2))
    if pool:
        v = torch.ops.aten.max_pool2d.default(v, *_pool_pairs(pool))
    y = quantize_table_reference(v.contiguous(), d, q_m, t, signed, scale, bounds, base)
    return y.to(x.dtype)


lib.impl("quantize.affine_table", affine_table_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("geta::quantize.affine_table")
def _affine_table_fake(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool,
                       scale: Tensor, bounds: Tensor, base: Tensor, alpha: Tensor, beta: Tensor,
                       other: Tensor | None = None, alpha2: Tensor | None = None,
                       beta2: Tensor | None = None, pool: list[int] | tuple[int, ...] = ()
                       ) -> Tensor:
    check_quantize_table_inputs(x, d, q_m, t, scale, bounds, base)
    check_affine_table_inputs(x, alpha, beta, other, alpha2, beta2, pool)
    shape = list(x.shape)
    if pool:
        shape[2] = (shape[2] - pool[0]) // pool[2] + 1
        shape[3] = (shape[3] - pool[1]) // pool[3] + 1
    return x.new_empty(shape)


def batch_norm_affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                      eps: float, planes: tuple[int, ...] = (37,), *,
                      channels_last: bool = False) -> tuple[Tensor, Tensor] | str:
    """``(alpha, beta)`` (float32 ``[C]``) with ``fma(x, alpha, beta)`` equal to eval
    ``aten.batch_norm(x, weight, bias, mean, var, False, ., eps)`` bit for bit, or the reason
    why not.

    ``alpha`` and ``beta`` are read back from ``aten.batch_norm`` itself (``alpha``: of ones
    with zero bias and mean; ``beta``: of zeros), so whatever formula ATen uses for them is
    what the fused op multiplies with; then ATen's result on probes (random and edge values)
    with ``planes`` elements per (n, c) plane is compared with ``fma``: ATen has one CPU code
    path for planes of 1 element (``(N, C)`` inputs: found *not* to be an fma on an AVX-512
    build) and one for larger planes (an fma there), so ``planes`` names the sizes the layer
    runs at.  ``channels_last``: the probes are also run channels-last (ATen's third CPU
    path; others, as a transposed ``(N, C, L)`` input's, are not fmas: not fused by lower_act).
    A mismatch (e.g. an ATen build computing ``x * alpha + beta`` with two roundings)
    is refused here.
    """
    bn = torch.ops.aten.batch_norm.default
    c = mean.numel()
    if not all(v is None or (v.dtype == torch.float32 and v.numel() == c)
               for v in (weight, bias, mean, var)):
        return "batch_norm parameters are not float32 vectors of one length"
    with torch.no_grad():
        zeros = torch.zeros(c, dtype=torch.float32, device=mean.device)
        ones = torch.ones(1, c, 2, dtype=torch.float32, device=mean.device)
        alpha = bn(ones, weight, None, zeros, var, False, 0.1, eps, False)[0, :, 0].clone()
        beta = bn(torch.zeros_like(ones), weight, bias, mean, var, False, 0.1, eps,
                  False)[0, :, 0].clone()
        if not bool(torch.isfinite(alpha).all() and torch.isfinite(beta).all()):
            return "batch_norm has non-finite scale or shift"
        gen = torch.Generator(device="cpu").manual_seed(0)
        scale = torch.logspace(-3, 3, 37).reshape(1, 1, 37)
        probe = (torch.randn(4, c, 37, generator=gen) * scale).to(mean.device)
        probe[0, :, :3] = torch.stack([mean, mean + var.clamp_min(0).sqrt(), zeros], dim=-1)
        for plane in planes:
            x = (probe.repeat(1, 1, -(-plane // 37))[:, :, :plane] if plane > 1
                 else probe[:, :, 0]).contiguous()  # ATen's contiguous paths (conv outputs)
            cl = x.reshape(x.shape[0], c, -1, 1).contiguous(memory_format=torch.channels_last)
            for x in (x, cl) if channels_last else (x,):
                want = bn(x, weight, bias, mean, var, False, 0.1, eps, False)
                shape = (1, c) + (1,) * (x.dim() - 2)
                got = fma_reference(x, alpha.reshape(shape), beta.reshape(shape))
                if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
                    return ("aten.batch_norm on this CPU is not fma(x, alpha, beta) "
                            "(two roundings?)")
    return alpha, beta


def unfuse_affine_table(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Replace a ``geta::quantize.affine_table`` node by aten ops and ``geta::quantize``
    (``x * alpha + beta`` [+ other] [max_pool2d] -> quantize: the same values up to the fma's
    one rounding; for exporters without a form of the fused op, as ONNX)."""
    x, d, q_m, t, signed, _s, _b, _c, alpha, beta, *rest = node.args
    rest += [None] * (4 - len(rest))
    other, alpha2, beta2, pool = rest
    pool = node.kwargs.get("pool", pool) or []
    other = node.kwargs.get("other", other)
    alpha2, beta2 = node.kwargs.get("alpha2", alpha2), node.kwargs.get("beta2", beta2)
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    ndim = val.dim() if isinstance(val, Tensor) else 4
    aten = torch.ops.aten
    g = gm.graph
    with g.inserting_before(node):
        def affine(v: object, a: object, b: object) -> torch.fx.Node:
            c = -1
            sa = g.call_function(aten.view.default, (a, [1, c] + [1] * (ndim - 2)))
            sb = g.call_function(aten.view.default, (b, [1, c] + [1] * (ndim - 2)))
            return g.call_function(aten.add.Tensor,
                                   (g.call_function(aten.mul.Tensor, (v, sa)), sb))

        v = affine(x, alpha, beta)
        if other is not None:
            w = other if alpha2 is None else affine(other, alpha2, beta2)
            v = g.call_function(aten.add.Tensor, (v, w))
        if pool:
            v = g.call_function(aten.max_pool2d.default, (v, *_pool_pairs(pool)))
        q = g.call_function(torch.ops.geta.quantize.default, (v, d, q_m, t, signed))
    q.meta.update({k: node.meta[k] for k in ("val", "nn_module_stack", "stack_trace")
                   if k in node.meta})
    node.replace_all_uses_with(q)
    g.erase_node(node)


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
    ends = torch.tensor([0, 1, q_bits], device=dev, dtype=torch.int64)
    if thr.numel() == 0:
        _compare(thr, ends, d, q_m, t)
        return ends.numel()
    off = torch.arange(-window, window + 1, device=dev, dtype=torch.int64)
    gaps = thr[1:] - thr[:-1]
    if thr.numel() > 1 and bool((gaps <= window).any()):  # windows overlap: count them
        bits = torch.cat([(thr[:, None] + off).reshape(-1).clamp_(0, q_bits), ends])
        _compare(thr, bits, d, q_m, t)
        return bits.numel()
    # Windows apart (every level wider than the window, the usual case): the count at
    # thr[k] + off is k + (off >= 0), also where a window is clamped at 0 (thr[0] >= 1, so
    # only k = 0's left half) or at q_m (only the last threshold's right half reaches it).
    # No search: the check costs a few times what the op does per value.
    bits = (thr.to(torch.int32)[:, None] + off.to(torch.int32)).clamp_(0, q_bits)
    got = _levels(bits.reshape(-1), d, q_m, t).view(bits.shape)
    want = torch.arange(thr.numel(), device=dev)[:, None] + (off >= 0).long()
    if not torch.equal(got, want):
        _compare(thr, bits.reshape(-1).long(), d, q_m, t)  # names the first value that differs
        raise AssertionError("build_table: window check disagrees with the counted one")
    _compare(thr, ends, d, q_m, t)
    return bits.numel() + ends.numel()


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
