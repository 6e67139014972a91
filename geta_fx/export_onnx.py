"""ONNX export of slim and lowered models (``geta_fx.save(m, "model.onnx")``).

``torch.onnx.export(..., dynamo=True)`` converts ATen ops; the ``geta`` ops have no ONNX
function, so before conversion:

* ``geta::quantize`` (weight and activation quantizers) is decomposed into its pure-PyTorch
  reference (``geta_fx.ops.reference``: abs/clamp/pow/div/round/mul/sign), which ONNX Runtime
  computes with the same rounding (``Round`` is half-to-even, as ``torch.round``);
* a packed low-bit weight (``geta::unpack_weight``, ``geta::lowbit_linear``) becomes an int8
  constant of its levels times its float32 scale, i.e. ``DequantizeLinear`` semantics, bit
  for bit the fake-quantized weight (the unpacking bit arithmetic has no ONNX form for int64).
  The file stores 1 byte per weight instead of 4; int4 initializers and ONNX Runtime's
  ``MatMulNBits`` are not emitted yet.

Dims that were symbolic at capture stay dynamic in the ONNX graph.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.fx

from geta_fx._compat import deepcopy_module
from geta_fx.errors import InputError

aten = torch.ops.aten


def _levels_constant(gm: torch.fx.GraphModule, packed: torch.fx.Node, bits: int, signed: bool,
                     shape: list[int]) -> torch.fx.Node:
    """A get_attr of the int8 levels ``packed`` encodes (registered once per packed buffer)."""
    from geta_fx.ir.query import get_attr_tensor
    from geta_fx.ops.lowbit import rows_cols, unpack_levels

    name = str(packed.target).replace(".", "_") + "_levels"
    if not hasattr(gm, name):
        _, k = rows_cols(shape)
        levels = unpack_levels(get_attr_tensor(gm, str(packed.target)), bits, signed, k)
        gm.register_buffer(name, levels.to(torch.int8).reshape(shape))
    with gm.graph.inserting_before(packed):
        return gm.graph.get_attr(name)


def _dequantize_lowbit(gm: torch.fx.GraphModule) -> None:
    """Rewrite lowbit ops as ``float32(levels) * scale`` (+ linear) on int8 constants."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.geta.unpack_weight.default:
            packed, scale, bits, signed, shape, dtype = node.args
            linear_x = linear_bias = None
        elif node.target is torch.ops.geta.lowbit_linear.default:
            linear_x, packed, scale, bits, in_features, signed, linear_bias = node.args
            shape = [int(packed.meta["val"].shape[0]), int(in_features)]
            dtype = None
        else:
            continue
        levels = _levels_constant(gm, packed, bits, signed, list(shape))
        with graph.inserting_before(node):
            w = graph.call_function(aten.mul.Tensor, (
                graph.call_function(aten._to_copy.default, (levels,), {"dtype": torch.float32}),
                graph.call_function(aten.reshape.default, (scale, [])),
            ))
            if linear_x is None:
                out = graph.call_function(aten._to_copy.default, (w,), {"dtype": dtype})
            else:
                w = graph.call_function(aten.type_as.default, (w, linear_x))
                out = graph.call_function(aten.linear.default, (linear_x, w, linear_bias))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()


def _decompositions() -> dict[Any, Any]:
    from geta_fx.ops.reference import quantize_reference

    table = torch.export.default_decompositions()
    table[torch.ops.geta.quantize.default] = quantize_reference
    return table


def save_onnx(gm: torch.fx.GraphModule, path: str | os.PathLike[str],
              example_inputs: tuple[Any, ...], dynamic_shapes: Any) -> Any:
    """Write ``gm`` (a slim or lowered GraphModule, eval flags) as an ONNX file; returns the
    ``torch.onnx.ONNXProgram``."""
    try:
        import onnx  # noqa: F401  (torch.onnx's dynamo exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise InputError(f"geta_fx.save(..., {os.fspath(path)!r}): ONNX export needs the "
                         "'onnx' and 'onnxscript' packages (pip install 'geta_fx[deploy]')"
                         ) from e
    gm = deepcopy_module(gm)
    _dequantize_lowbit(gm)
    ep = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes,
                             strict=False)
    ep = ep.run_decompositions(_decompositions())
    left = sorted({str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and "geta" in str(n.target)})
    if left:
        raise InputError(f"geta_fx.save(..., {os.fspath(path)!r}): no ONNX form for {left}")
    # NOTE: optimize=False: the optimizer would constant-fold float32(levels) * scale back
    # into float32 weights (4x the bytes).
    program = torch.onnx.export(ep, dynamo=True, verbose=False, optimize=False)
    program.save(os.fspath(path))
    return program
