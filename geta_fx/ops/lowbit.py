"""Low-bit deployment ops: ``geta::lowbit_linear`` and ``geta::unpack_weight`` (issue #7).

Pure-PyTorch reference implementations (registered ``CompositeExplicitAutograd``: the fallback on
every device without a compiled kernel, and the test oracle), fake impls (so lowered graphs still
``torch.export``), the packing helpers used by ``passes/lower_quant.py``, and typed wrappers.
Compiled kernels (``geta_kernels/csrc/cpu/lowbit_cpu.cpp``, loaded by :mod:`geta_fx.lowbit_kernels`)
register ``TORCH_LIBRARY_IMPL(geta, CPU)`` for the same schemas (defined in
:mod:`geta_fx.ops.schema`).

Packed format (the contract every implementation follows)
    A weight of shape ``shape`` is viewed as ``[N, K]`` with ``N = shape[0]`` (1 for a 1-D
    weight) and ``K = numel / N`` (linear: ``[out, in]``; conv: ``[C_out, C_in/g * prod(k)]``).
    Each element holds an integer **level** ``L`` (``|L| <= 2^(bits-1) - 1`` signed, ``0 <= L <=
    2^bits - 1`` unsigned) stored as the unsigned **code** ``u = L + offset`` with ``offset =
    2^(bits-1)`` (signed) or ``0`` (unsigned), ``bits`` in ``[2, 8]``.

    ``packed`` is uint8 ``[N, G * bits]`` with ``G = ceil(K / 8)``: row ``n`` is a little-endian
    bitstream, code ``k`` occupying stream bits ``[k*bits, (k+1)*bits)``, stream bit ``i`` being
    bit ``i % 8`` of byte ``i // 8``.  So every group of 8 codes is exactly ``bits`` bytes (2 bits:
    4 codes per byte, 4 bits: 2 per byte low nibble first, 8 bits: one per byte; 3/5/6/7 bits
    straddle bytes), rows start on a byte boundary, and the ``G*8 - K`` padding codes of a row's
    last group are ``offset`` (level 0) and never read.

    ``scale`` is the quantizer's step ``d``: float32 with one element.  The dequantized weight is
    ``float32(L) * scale`` (one IEEE multiply), cast to the output dtype.  The GETA quantizer
    computes ``sign(w) * (round(c / d) * d)`` in float32 (:mod:`geta_fx.ops.reference`) and IEEE
    multiplication is sign-symmetric, so this equals the fake-quant weight **bit for bit** (a
    negative weight whose level is 0 gives ``+0.0`` instead of ``-0.0``; they compare equal).

``unpack_weight(packed, scale, bits, signed, shape, dtype) -> Tensor``
    The dequantized weight, shape ``shape``, dtype ``dtype`` (float32/float16/bfloat16).
``lowbit_linear(x, packed, scale, bits, in_features, signed, bias) -> Tensor``
    ``linear(x, unpack_weight(...).to(x.dtype), bias)`` with ``K = in_features``;
    ``x``: float32/float16/bfloat16 ``[..., K]``; ``bias``: ``None`` or ``[N]`` of ``x``'s dtype;
    output ``[..., N]`` of ``x``'s dtype.  The reference computes exactly that (so a lowered
    model on the reference path equals the fake-quant one bit for bit); kernels fuse the unpack
    into the matmul and agree to float rounding of the matmul (summation order, and fp16/bf16
    activations may be multiplied with the float32 weight instead of its fp16/bf16 rounding).

Inference only: no autograd formula is registered (the packed weight is not trainable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from geta_fx.ops.schema import lib

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "X_DTYPES",
    "bits_for_level",
    "check_lowbit_linear_inputs",
    "check_unpack_weight_inputs",
    "level_offset",
    "lowbit_linear",
    "lowbit_linear_reference",
    "pack_levels",
    "packed_row_bytes",
    "rows_cols",
    "unpack_levels",
    "unpack_weight",
    "unpack_weight_reference",
]

#: Bit widths a packed weight may have.
MIN_BITS, MAX_BITS = 2, 8
#: Activation / output dtypes.
X_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------- format helpers
def level_offset(bits: int, signed: bool) -> int:
    """``code - level``: ``2^(bits-1)`` for signed levels, 0 for unsigned ones."""
    return 1 << (bits - 1) if signed else 0


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` codes: ``ceil(k / 8) * bits``."""
    return -(-k // 8) * bits


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """``(N, K)`` of a weight shape: rows are ``shape[0]`` (1 for 1-D), ``K = numel / N``."""
    n = int(shape[0]) if len(shape) >= 2 else 1
    numel = math.prod(int(s) for s in shape)
    return n, (numel // n if n else 0)


def bits_for_level(max_level: int, signed: bool) -> int:
    """Fewest bits (>= ``MIN_BITS``) whose levels reach ``max_level``.

    Signed: ``2^(b-1) - 1 >= max_level`` (symmetric, the GETA grid); unsigned: ``2^b - 1``.
    """
    b = max(int(max_level), 0).bit_length() + (1 if signed else 0)
    return max(MIN_BITS, b)


def pack_levels(levels: Tensor, bits: int, signed: bool) -> Tensor:
    """Pack integer levels ``[N, K]`` into the uint8 ``[N, ceil(K/8) * bits]`` format.

    Raises ``ValueError`` if ``bits`` is outside ``[2, 8]`` or a level does not fit.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"pack_levels: bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if levels.dim() != 2:
        raise ValueError(f"pack_levels: levels must be 2-D [N, K], got {tuple(levels.shape)}")
    n, k = levels.shape
    off = level_offset(bits, signed)
    codes = levels.to(torch.int64) + off
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        lo, hi = (-(off - 1), off - 1) if signed else (0, (1 << bits) - 1)
        raise ValueError(f"pack_levels: levels must lie in [{lo}, {hi}] for {bits} "
                         f"{'signed' if signed else 'unsigned'} bits, got "
                         f"[{int(levels.min())}, {int(levels.max())}]")
    g = -(-k // 8)
    codes = F.pad(codes, (0, g * 8 - k), value=off).view(n, g, 8)
    if bits == 8:  # one code per byte: the bitstream is the codes themselves
        return codes.to(torch.uint8).reshape(n, g * 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (codes << shifts).sum(-1, keepdim=True)  # < 2^56: no int64 overflow for bits <= 7
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(n, g * bits)


def unpack_levels(packed: Tensor, bits: int, signed: bool, k: int) -> Tensor:
    """Inverse of :func:`pack_levels`: int32 levels ``[N, k]``."""
    n = packed.shape[0]
    g = packed.shape[1] // bits
    raw = packed.view(n, g, bits).to(torch.int64)
    if bits == 8:
        codes = raw.reshape(n, g * 8)
    else:
        byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
        words = (raw << byte_shifts).sum(-1, keepdim=True)
        shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
        codes = ((words >> shifts) & ((1 << bits) - 1)).reshape(n, g * 8)
    return (codes[:, :k] - level_offset(bits, signed)).to(torch.int32)


# ------------------------------------------------------------------------------------- checks
def _check_packed(who: str, packed: Tensor, scale: Tensor, bits: int, n: int | None, k: int,
                  device: torch.device) -> None:
    torch._check(MIN_BITS <= bits <= MAX_BITS,
                 lambda: f"{who}: bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    torch._check(packed.dtype == torch.uint8,
                 lambda: f"{who}: packed must be uint8, got {packed.dtype}")
    torch._check(packed.dim() == 2,
                 lambda: f"{who}: packed must be 2-D [N, ceil(K/8)*bits], got shape "
                 f"{tuple(packed.shape)}")
    if n is not None:
        torch._check(packed.shape[0] == n,
                     lambda: f"{who}: packed has {packed.shape[0]} rows, expected {n}")
    torch._check(packed.shape[1] == packed_row_bytes(k, bits),
                 lambda: f"{who}: packed rows have {packed.shape[1]} bytes, expected "
                 f"ceil({k}/8)*{bits} = {packed_row_bytes(k, bits)}")
    torch._check(scale.numel() == 1 and scale.dtype == torch.float32,
                 lambda: f"{who}: scale must be float32 with one element, got {scale.dtype} "
                 f"shape {tuple(scale.shape)}")
    for name, t in (("packed", packed), ("scale", scale)):
        torch._check(t.device == device,
                     lambda name=name, t=t: f"{who}: {name} is on {t.device}, expected {device}")


def check_unpack_weight_inputs(packed: Tensor, scale: Tensor, bits: int,
                               shape: Sequence[int], dtype: torch.dtype) -> None:
    """Checks shared by the reference, the fake impl and (same words) the kernels."""
    who = "geta::unpack_weight"
    torch._check(dtype in X_DTYPES,
                 lambda: f"{who}: dtype must be float32, float16 or bfloat16, got {dtype}")
    torch._check(len(shape) >= 1, lambda: f"{who}: shape must have at least one dim")
    n, k = rows_cols(shape)
    _check_packed(who, packed, scale, bits, n, k, packed.device)


def check_lowbit_linear_inputs(x: Tensor, packed: Tensor, scale: Tensor, bits: int,
                               in_features: int, bias: Tensor | None) -> None:
    """Checks shared by the reference, the fake impl and (same words) the kernels."""
    who = "geta::lowbit_linear"
    torch._check(x.dtype in X_DTYPES,
                 lambda: f"{who}: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"{who}: x must have at least one dim")
    torch._check(x.shape[-1] == in_features,
                 lambda: f"{who}: x has {x.shape[-1]} features, expected {in_features}")
    _check_packed(who, packed, scale, bits, None, in_features, x.device)
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == packed.shape[0],
                     lambda: f"{who}: bias must be [{packed.shape[0]}], got "
                     f"{tuple(bias.shape)}")
        torch._check(bias.dtype == x.dtype,
                     lambda: f"{who}: bias dtype {bias.dtype} != x dtype {x.dtype}")
        torch._check(bias.device == x.device,
                     lambda: f"{who}: bias is on {bias.device}, x on {x.device}")


# ------------------------------------------------------------------------ reference impls
def _dequant(packed: Tensor, scale: Tensor, bits: int, signed: bool, k: int) -> Tensor:
    levels = unpack_levels(packed, bits, signed, k)
    return levels.to(torch.float32) * scale.reshape(())  # the fake-quant weight, bit for bit


def unpack_weight_reference(packed: Tensor, scale: Tensor, bits: int, signed: bool,
                            shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Reference ``geta::unpack_weight``: ``(float32(level) * scale).to(dtype)``, ``shape``."""
    check_unpack_weight_inputs(packed, scale, bits, shape, dtype)
    _, k = rows_cols(shape)
    return _dequant(packed, scale, bits, signed, k).to(dtype).reshape(list(shape))


def lowbit_linear_reference(x: Tensor, packed: Tensor, scale: Tensor, bits: int,
                            in_features: int, signed: bool, bias: Tensor | None) -> Tensor:
    """Reference ``geta::lowbit_linear``: ``linear(x, unpack(...).to(x.dtype), bias)``."""
    check_lowbit_linear_inputs(x, packed, scale, bits, in_features, bias)
    w = _dequant(packed, scale, bits, signed, in_features).to(x.dtype)
    return F.linear(x, w, bias)


lib.impl("unpack_weight", unpack_weight_reference, "CompositeExplicitAutograd")
lib.impl("lowbit_linear", lowbit_linear_reference, "CompositeExplicitAutograd")


# ------------------------------------------------------------------------------------ autocast
def _lowbit_linear_autocast(device_type: str) -> Callable[..., Tensor]:
    """Autocast rule of ``lowbit_linear``, the one of ``aten.linear`` (lower-precision op).

    Under ``torch.autocast(device_type)``, ``x`` and ``bias`` are cast to the autocast dtype
    and the op runs with autocast off, so it computes and returns that dtype, as the linear it
    replaced does (``bias`` is a float32 parameter while ``x`` may already be bfloat16).
    ``packed`` and ``scale`` keep their dtypes.
    """

    def kernel(x: Tensor, packed: Tensor, scale: Tensor, bits: int, in_features: int,
               signed: bool, bias: Tensor | None) -> Tensor:
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype) if x.dtype in X_DTYPES else x  # other dtypes: the op's check names them
        if bias is not None and bias.dtype in X_DTYPES:
            bias = bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            y: Tensor = torch.ops.geta.lowbit_linear.default(x, packed, scale, bits,
                                                             in_features, signed, bias)
        return y

    return kernel


lib.impl("lowbit_linear", _lowbit_linear_autocast("cpu"), "AutocastCPU")
lib.impl("lowbit_linear", _lowbit_linear_autocast("cuda"), "AutocastCUDA")


# -------------------------------------------------------------------------------------- fakes
@torch.library.register_fake("geta::unpack_weight")
def _unpack_weight_fake(packed: Tensor, scale: Tensor, bits: int, signed: bool,
                        shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    check_unpack_weight_inputs(packed, scale, bits, shape, dtype)
    return packed.new_empty(list(shape), dtype=dtype)


@torch.library.register_fake("geta::lowbit_linear")
def _lowbit_linear_fake(x: Tensor, packed: Tensor, scale: Tensor, bits: int, in_features: int,
                        signed: bool, bias: Tensor | None) -> Tensor:
    check_lowbit_linear_inputs(x, packed, scale, bits, in_features, bias)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# ----------------------------------------------------------------------------- typed wrappers
def unpack_weight(packed: Tensor, scale: Tensor, *, bits: int, shape: Sequence[int],
                  signed: bool = True, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dequantized weight of a packed tensor (``torch.ops.geta.unpack_weight``).

    Args:
        packed: uint8 ``[N, ceil(K/8) * bits]`` (see the module docstring for the format).
        scale: float32 one-element step size ``d``.
        bits: 2..8.
        shape: the weight's shape (``N = shape[0]``, ``K = numel / N``).
        signed: signed levels (offset ``2^(bits-1)``) or unsigned ones.
        dtype: float32, float16 or bfloat16.
    """
    y: Tensor = torch.ops.geta.unpack_weight.default(packed, scale, bits, signed, list(shape),
                                                     dtype)
    return y


def lowbit_linear(x: Tensor, packed: Tensor, scale: Tensor, *, bits: int, in_features: int,
                  signed: bool = True, bias: Tensor | None = None) -> Tensor:
    """``linear(x, dequantized weight, bias)`` on a packed weight (``geta::lowbit_linear``).

    Args:
        x: float32/float16/bfloat16 ``[..., in_features]``.
        packed, scale, bits, signed: the packed weight ``[N, in_features]``.
        in_features: ``K``.
        bias: ``None`` or ``[N]`` of ``x``'s dtype.

    Returns:
        ``[..., N]`` of ``x``'s dtype.
    """
    y: Tensor = torch.ops.geta.lowbit_linear.default(x, packed, scale, bits, in_features, signed,
                                                     bias)
    return y
