"""ONNX export of slim and lowered models (``geta_fx.save(m, "model.onnx")``).

``torch.onnx.export(..., dynamo=True)`` converts ATen ops; the ``geta`` ops have no ONNX
function, so before conversion the graph is rewritten:

* ``geta::quantize`` (weight and activation quantizers) is decomposed into its pure-PyTorch
  reference (``geta_fx.ops.reference``: abs/clamp/pow/div/round/mul/sign), which ONNX Runtime
  computes with the same rounding (``Round`` is half-to-even, as ``torch.round``);
* a packed low-bit weight (``geta::unpack_weight``, ``geta::lowbit_linear``) becomes an ONNX
  ``DequantizeLinear`` of its integer levels with its per-tensor float32 scale and zero point 0
  (GETA's levels are symmetric signed or unsigned, so no offset is needed): the dequantized
  weight is ``float32(level) * scale``, one IEEE multiply, bit for bit the torch graph's weight
  (:mod:`geta_fx.ops.lowbit`).  Levels of <= 4 bits are stored as INT4 (signed) / UINT4
  (unsigned) initializers, 2 weights per byte (needs opset >= 21); 5-8 bits as INT8 (UINT8
  for unsigned levels, which reach 255 at 8 bits);
* with ``matmul_nbits=True``, a ``geta::lowbit_linear`` of 2, 4 or 8 bits whose ``K`` is a
  multiple of 16 becomes ONNX Runtime's contrib ``com.microsoft::MatMulNBits``: its ``B`` is the
  packed buffer itself (same little-endian codes, reshaped into blocks), every block gets the
  GETA scale, and the zero point is the code offset (the kernel's default ``2^(bits-1)`` for
  signed levels, explicit zeros for unsigned).  The weight is the same; the product differs
  from ``torch.nn.functional.linear`` by float32 summation order only (measured ~1e-7 relative),
  so it is off by default.  Other linears fall back to ``DequantizeLinear``.

Invariants: the rewrite works on a copy; no ``geta`` op reaches the ONNX converter (a clear
error names any that would); the exporter's optimizer stays off, since it would constant-fold
the dequantization back into float32 weights (4-8x the bytes).  Dims that were symbolic at
capture stay dynamic in the ONNX graph.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.fx

from geta_fx._compat import deepcopy_module
from geta_fx.errors import InputError

__all__ = ["DEFAULT_OPSET", "MATMULNBITS_BITS", "lower_lowbit_for_onnx", "onnx_dequantize",
           "onnx_matmul_nbits", "save_onnx"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

#: Opset written by default, the first with INT4/UINT4 tensors in ``DequantizeLinear``.
DEFAULT_OPSET = 21
INT4_MIN_OPSET = 21
#: Bit widths ONNX Runtime's CPU ``MatMulNBits`` accepts (1.32 refuses 3 and 5-7 at session
#: creation) and its block sizes, largest first (every block carries the same GETA scale).
MATMULNBITS_BITS = (2, 4, 8)
MATMULNBITS_BLOCKS = (128, 64, 32, 16)
#: Node metadata the int4 pass reads (and removes) on the exported ``DequantizeLinear`` nodes.
_BITS_KEY, _SIGNED_KEY = "geta_fx.bits", "geta_fx.signed"


# ------------------------------------------------------------------ ONNX ops, traced by export
def onnx_dequantize(levels: torch.Tensor, scale: torch.Tensor, bits: int,
                    signed: bool) -> torch.Tensor:
    """``DequantizeLinear(levels, scale)`` (zero point 0), tagged with the levels' width.

    Args:
        levels: int8 (signed) or uint8 (unsigned) integer levels, the weight's shape.
        scale: float32 scalar (per-tensor).
        bits: the width the levels were packed with (<= 4: stored as INT4/UINT4 later).
        signed: signed (symmetric) levels or unsigned ones.

    Returns:
        ``float32(levels) * scale`` in the ONNX graph (a placeholder tensor in torch).
    """
    return torch.onnx.ops.symbolic(
        "DequantizeLinear", (levels, scale), {}, dtype=torch.float32, shape=levels.shape,
        metadata_props={_BITS_KEY: str(bits), _SIGNED_KEY: str(int(signed))})


def onnx_matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                      zero_points: torch.Tensor | None, bias: torch.Tensor | None, k: int,
                      n: int, bits: int, block_size: int) -> torch.Tensor:
    """``com.microsoft::MatMulNBits(x, b, scales, zero_points, bias)``: ``x @ W.T + bias``.

    Args:
        x: float32 ``[..., k]``.
        b: uint8 ``[n, k / block_size, block_size * bits / 8]`` codes.
        scales: float32 ``[n * k / block_size]``.
        zero_points: ``None`` (the kernel's ``2^(bits-1)``) or packed uint8 codes.
        bias: ``None`` or float32 ``[n]``.
        k, n, bits, block_size: the kernel's attributes.
    """
    return torch.onnx.ops.symbolic(
        "com.microsoft::MatMulNBits", (x, b, scales, zero_points, None, bias),
        {"K": k, "N": n, "bits": bits, "block_size": block_size}, dtype=x.dtype,
        shape=(*x.shape[:-1], n), version=1)


# ----------------------------------------------------------------------------- fx rewrite
def _buffer(gm: torch.fx.GraphModule, anchor: torch.fx.Node, name: str,
            make: Any) -> torch.fx.Node:
    """A get_attr before ``anchor`` of buffer ``name``, registered once from ``make()``."""
    if not hasattr(gm, name):
        gm.register_buffer(name, make())
    with gm.graph.inserting_before(anchor):
        return gm.graph.get_attr(name)


def _tensor(gm: torch.fx.GraphModule, node: torch.fx.Node, who: torch.fx.Node) -> torch.Tensor:
    from geta_fx.ir.query import get_attr_tensor

    if node.op != "get_attr":
        raise InputError(f"ONNX export: {who.name} ({who.target}): expected a constant "
                         f"(get_attr) packed weight/scale, got {node.op} {node.name}")
    return get_attr_tensor(gm, str(node.target))


def _lowbit_args(node: torch.fx.Node) -> dict[str, Any] | None:
    """The packed-weight arguments of a lowbit node, or ``None`` for other nodes."""
    if node.op != "call_function":
        return None
    if node.target is torch.ops.geta.unpack_weight.default:
        packed, scale, bits, signed, shape, dtype = node.args
        return {"packed": packed, "scale": scale, "bits": int(bits), "signed": bool(signed),
                "shape": [int(s) for s in shape], "dtype": dtype, "x": None, "bias": None}
    if node.target is torch.ops.geta.lowbit_linear.default:
        x, packed, scale, bits, in_features, signed, bias = node.args
        return {"packed": packed, "scale": scale, "bits": int(bits), "signed": bool(signed),
                "shape": [int(packed.meta["val"].shape[0]), int(in_features)], "dtype": None,
                "x": x, "bias": bias}
    return None


def _dequantized(gm: torch.fx.GraphModule, node: torch.fx.Node, a: dict[str, Any]
                 ) -> torch.fx.Node:
    """``DequantizeLinear`` of the node's levels (an int8 buffer) and scalar scale."""
    from geta_fx.ops.lowbit import rows_cols, unpack_levels

    base = str(a["packed"].target).replace(".", "_")
    packed, scale = _tensor(gm, a["packed"], node), _tensor(gm, a["scale"], node)
    _, k = rows_cols(a["shape"])
    dtype = torch.int8 if a["signed"] else torch.uint8  # unsigned 8-bit levels reach 255
    levels = _buffer(gm, node, base + "_levels", lambda: unpack_levels(
        packed, a["bits"], a["signed"], k).to(dtype).reshape(a["shape"]))
    scalar = _buffer(gm, node, base + "_scale0", lambda: scale.detach().reshape(()).clone())
    with gm.graph.inserting_before(node):
        return gm.graph.call_function(onnx_dequantize, (levels, scalar, a["bits"], a["signed"]))


def _nbits_block(node: torch.fx.Node, a: dict[str, Any]) -> int | None:
    """MatMulNBits block size for a lowbit linear, or ``None`` where it does not apply."""
    k = a["shape"][1]
    x_val = a["x"].meta.get("val") if a["x"] is not None else None
    if x_val is None or x_val.dtype != torch.float32 or a["bits"] not in MATMULNBITS_BITS:
        logger.info("ONNX export: %s keeps DequantizeLinear (MatMulNBits needs float32 x and "
                    "bits in %s; got %s bits)", node.name, MATMULNBITS_BITS, a["bits"])
        return None
    block = next((b for b in MATMULNBITS_BLOCKS if k % b == 0), None)
    if block is None:
        logger.info("ONNX export: %s keeps DequantizeLinear (K=%d is not a multiple of %d)",
                    node.name, k, MATMULNBITS_BLOCKS[-1])
    return block


def _matmul_nbits(gm: torch.fx.GraphModule, node: torch.fx.Node, a: dict[str, Any],
                  block: int) -> torch.fx.Node:
    """``MatMulNBits`` on the packed buffer reshaped into ``[N, K / block, block*bits/8]``."""
    base = str(a["packed"].target).replace(".", "_")
    (n, k), bits = a["shape"], a["bits"]
    packed, scale = _tensor(gm, a["packed"], node), _tensor(gm, a["scale"], node)
    blocks = k // block
    b = _buffer(gm, node, base + "_nbits_b",
                lambda: packed.reshape(n, blocks, block * bits // 8).clone())
    scales = _buffer(gm, node, base + "_nbits_scales",
                     lambda: scale.detach().reshape(1).expand(n * blocks).clone())
    zp = None if a["signed"] else _buffer(  # signed: the kernel's default zero point 2^(b-1)
        gm, node, base + "_nbits_zp",
        lambda: torch.zeros(n * (-(-blocks * bits // 8)), dtype=torch.uint8))
    with gm.graph.inserting_before(node):
        return gm.graph.call_function(onnx_matmul_nbits, (a["x"], b, scales, zp, a["bias"], k,
                                                          n, bits, block))


def _replacement(gm: torch.fx.GraphModule, node: torch.fx.Node, a: dict[str, Any],
                 matmul_nbits: bool) -> torch.fx.Node:
    """The ONNX-convertible subgraph computing what the lowbit ``node`` computes."""
    graph = gm.graph
    if matmul_nbits and a["x"] is not None:
        block = _nbits_block(node, a)
        if block is not None:
            return _matmul_nbits(gm, node, a, block)
    w = _dequantized(gm, node, a)
    with graph.inserting_before(node):
        if a["x"] is None:
            if a["dtype"] == torch.float32:
                return w
            return graph.call_function(aten._to_copy.default, (w,), {"dtype": a["dtype"]})
        w = graph.call_function(aten.type_as.default, (w, a["x"]))
        return graph.call_function(aten.linear.default, (a["x"], w, a["bias"]))


def lower_lowbit_for_onnx(gm: torch.fx.GraphModule, matmul_nbits: bool = False) -> int:
    """Rewrite every lowbit op of ``gm`` (in place) into ONNX ops; returns how many.

    Args:
        gm: a lowered GraphModule (packed weights and scales as get_attr constants).
        matmul_nbits: emit ``com.microsoft::MatMulNBits`` for the linears it applies to.
    """
    count = 0
    for node in list(gm.graph.nodes):
        a = _lowbit_args(node)
        if a is None:
            continue
        node.replace_all_uses_with(_replacement(gm, node, a, matmul_nbits))
        gm.graph.erase_node(node)
        count += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return count


# --------------------------------------------------------------------- ONNX post-processing
def _int4_dtype(signed: bool) -> tuple[Any, Any]:
    """(onnx_ir data type, numpy dtype) of a 4-bit initializer."""
    import ml_dtypes
    import onnx_ir as ir

    if signed:
        return ir.DataType.INT4, ml_dtypes.int4
    return ir.DataType.UINT4, ml_dtypes.uint4


def _store_levels_as_int4(model: Any, int4: bool) -> int:
    """Retype the int8/uint8 level initializers of <= 4-bit ``DequantizeLinear`` nodes as
    INT4/UINT4 (if ``int4``) and drop the width tags.

    Returns:
        How many level initializers have <= 4 bits (all retyped if ``int4``).
    """
    import onnx_ir as ir

    done: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "DequantizeLinear" or _BITS_KEY not in node.metadata_props:
            continue
        bits = int(node.metadata_props.pop(_BITS_KEY))
        signed = node.metadata_props.pop(_SIGNED_KEY) == "1"
        x = node.inputs[0]
        if bits > 4 or x is None or x.const_value is None or x.name in done:
            continue
        done.add(str(x.name))
        if not int4:
            continue
        if x.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
            raise InputError(f"ONNX export: {node.name}: expected int8/uint8 levels in "
                             f"{x.name}, got {x.dtype}")
        dtype, np_dtype = _int4_dtype(signed)
        x.const_value = ir.Tensor(x.const_value.numpy().astype(np_dtype), dtype=dtype,
                                  name=x.name)
        x.dtype = dtype
    return len(done)


def _check_converted(ep: torch.export.ExportedProgram, path: str) -> None:
    left = sorted({str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("geta.")})
    if left:
        raise InputError(f"geta_fx.save(..., {path!r}): no ONNX form for {left}")


def _check_opset(model: Any, opset: int, path: str) -> None:
    """torch.onnx converts from its opset 18 and, where an op has no adapter, logs the failure
    and keeps the unconverted model: make that an error instead of a file at another opset."""
    got = model.opset_imports.get("")
    if got != opset:
        raise InputError(f"geta_fx.save(..., {path!r}, onnx_opset={opset}): the ONNX exporter "
                         f"wrote opset {got} (its version converter could not reach {opset}; "
                         f"opsets >= 18 are supported, >= {INT4_MIN_OPSET} for INT4 weights)")


def _decompositions() -> dict[Any, Any]:
    from geta_fx.ops.reference import quantize_reference

    table = torch.export.default_decompositions()
    table[torch.ops.geta.quantize.default] = quantize_reference
    return table


def _require_packages(path: str) -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx's dynamo exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise InputError(f"geta_fx.save(..., {path!r}): ONNX export needs the 'onnx' and "
                         "'onnxscript' packages (pip install 'geta_fx[deploy]')") from e


def save_onnx(gm: torch.fx.GraphModule, path: str | os.PathLike[str],
              example_inputs: tuple[Any, ...], dynamic_shapes: Any, *,
              opset: int | None = None, matmul_nbits: bool = False) -> Any:
    """Write ``gm`` (a slim or lowered GraphModule, eval flags) as an ONNX file.

    Args:
        gm: the graph (not modified).
        path: the ``.onnx`` file (large models also write ``<path>.data``).
        example_inputs, dynamic_shapes: as for :func:`torch.export.export`.
        opset: the ONNX opset (default :data:`DEFAULT_OPSET`); below 21 the <= 4-bit levels
            stay int8 (logged as a warning); an opset the exporter cannot convert to (below
            18 for most graphs) is an :class:`InputError`.
        matmul_nbits: emit ONNX Runtime's ``MatMulNBits`` for the lowbit linears it applies to
            (not bit-exact against ``F.linear``: summation order; see the module docstring).

    Returns:
        The ``torch.onnx.ONNXProgram``.
    """
    where = os.fspath(path)
    _require_packages(where)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    gm = deepcopy_module(gm)
    lowbit = lower_lowbit_for_onnx(gm, matmul_nbits=matmul_nbits)
    ep = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes,
                             strict=False)
    ep = ep.run_decompositions(_decompositions())
    _check_converted(ep, where)
    # NOTE: optimize=False: the optimizer would constant-fold the dequantization into float32.
    program = torch.onnx.export(ep, dynamo=True, verbose=False, optimize=False,
                                opset_version=opset)
    _check_opset(program.model, opset, where)
    low4 = _store_levels_as_int4(program.model, int4=opset >= INT4_MIN_OPSET)
    if low4 and opset < INT4_MIN_OPSET:
        logger.warning("geta_fx.save(..., %r): opset %d has no INT4/UINT4; <= 4-bit weights "
                       "are stored as int8 levels (opset >= %d stores 2 per byte)", where,
                       opset, INT4_MIN_OPSET)
    logger.info("ONNX export %s: opset %d, %d lowbit ops, %d <= 4-bit level initializers",
                where, opset, lowbit, low4)
    program.save(where)
    return program

