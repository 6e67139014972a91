"""``geta_fx.transform``: capture + pass pipeline -> GetaModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.capture import capture
from geta_fx.errors import InputError
from geta_fx.module import GetaModule
from geta_fx.pipeline import GraphPass, Pipeline

QuantizeMode = Literal["weight", "weight_act"] | None


def default_pipeline(quantize: QuantizeMode = None, **quant_options: Any) -> list[GraphPass]:
    """tie_weights -> shape_prop -> normalize [-> insert_quantizers -> fold_quant] ->
    dependency_groups.

    NOTE: dependency_groups runs last so its channel labels cover the quantizer and
    view nodes fold_quant creates; the groups themselves are identical with and
    without quantizers (tested), which is the invariant DESIGN §1 names.
    """
    from geta_fx import passes

    pipeline: list[GraphPass] = [passes.TieWeights(), passes.ShapeProp(), passes.Normalize()]
    if quantize is not None:
        policy = quant_options.pop("policy", None) or passes.QuantPolicy(**quant_options)
        pipeline += [passes.InsertQuantizers(mode=quantize, policy=policy), passes.FoldQuant()]
    elif quant_options:
        raise InputError(f"quantization options {sorted(quant_options)} need quantize=")
    pipeline.append(passes.DependencyGroups())
    return pipeline


def compress_pipeline(*, removed_units: Any = None,
                      align: int | str = 1) -> list[GraphPass]:
    """What ``GetaModule.compress()`` runs on a copy of its graph: physical_prune."""
    from geta_fx import passes

    return [passes.PhysicalPrune(removed_units=removed_units, align=align)]


def lower_pipeline(*, max_bits: int = 8, fuse_linear: bool = True,
                   freeze_act: bool = True) -> list[GraphPass]:
    """What ``geta_fx.lower`` runs on a slim graph: eval flags, then lower_quant."""
    from geta_fx import passes

    return [passes.SetTrainingMode(False),
            passes.LowerQuant(max_bits=max_bits, fuse_linear=fuse_linear,
                              freeze_act=freeze_act)]


def _own_weights(gm: torch.fx.GraphModule) -> None:
    """Give the graph its own parameter/buffer tensors so training never touches the user's.

    Tensors the model shares (tied weights) stay shared: one copy per tensor.
    """
    copies: dict[int, torch.Tensor] = {}

    def own(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in copies:
            clone = t.detach().clone()
            copies[id(t)] = nn.Parameter(clone, requires_grad=t.requires_grad) if param else clone
        return copies[id(t)]

    for module in gm.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = own(p, True)  # type: ignore[assignment]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = own(b, False)


def transform(model: nn.Module, example_inputs: Any, *, quantize: QuantizeMode = None,
              pipeline: Sequence[GraphPass] | None = None, capture_method: str = "export",
              strict: bool = False, example_kwargs: dict | None = None,
              copy_weights: bool = True, observers: Sequence[Any] = (), calibrate: bool = True,
              dump_dir: Any = None, dynamic_shapes: Any = None,
              **quant_options: Any) -> GetaModule:
    """Capture ``model`` and run the pass pipeline; returns a trainable GetaModule.

    Args:
        model: any nn.Module; it is not modified (weights are copied unless
            ``copy_weights=False``, train/eval flags untouched).
        example_inputs: a tensor or tuple of positional inputs.
        quantize: None, "weight" or "weight_act".
        pipeline: explicit list of passes (replaces the default pipeline).
        capture_method: "export" (default) or "symbolic_trace".
        dynamic_shapes: which input sizes stay symbolic (export capture).  ``None``
            (default): every dim the model allows (batch, sequence length, resolution),
            found by ``torch.export.Dim.AUTO``; channel dims that meet a weight stay static.
            ``"batch"``: only dim 0; ``"static"``: none; or an explicit ``torch.export``
            ``dynamic_shapes`` spec, passed through.
        calibrate: with activation quantizers, set their ranges (and signedness) from
            ``example_inputs`` (call ``geta_fx.calibrate`` with real batches for better ones).
        dump_dir: a directory (or a configured ``geta_fx.viz.DotDumper``) for before/after
            drawings of every pass that changed the graph.
        quant_options: ``policy=QuantPolicy(...)`` or its fields (``bits``, ``skip``, ...).
    """
    if quantize not in (None, "weight", "weight_act"):
        raise InputError(f"quantize must be None, 'weight' or 'weight_act', got {quantize!r}")
    passes_ = list(pipeline) if pipeline is not None else default_pipeline(quantize,
                                                                           **quant_options)
    Pipeline(passes_).validate(frozenset({"graph"}))  # order errors before any work
    cap = capture(model, example_inputs, example_kwargs=example_kwargs,
                  method=capture_method, strict=strict,  # type: ignore[arg-type]
                  dynamic_shapes=dynamic_shapes)
    gm = cap.graph_module
    if copy_weights:
        _own_weights(gm)
    if dump_dir is not None:  # before/after drawings of each pass (geta_fx.viz.DotDumper)
        from geta_fx.viz import dump_observer

        observers = [*observers, dump_observer(dump_dir, gm)]
    result = Pipeline(passes_, observers=observers)(gm)
    module = GetaModule(result.graph_module, training=cap.training, flat_io=cap.flat_io,
                        in_spec=cap.in_spec, out_spec=cap.out_spec)
    module._source_shapes = {name: tuple(t.shape) for name, t in
                             [*model.named_parameters(remove_duplicate=False),
                              *model.named_buffers(remove_duplicate=False)]}
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)
    module._example_inputs = pytree.tree_map_only(
        torch.Tensor, lambda t: t.detach().clone(), (args, dict(example_kwargs or {})))
    from geta_fx.generate import generation_source

    module._generation_source = generation_source(model)  # causal LMs: geta_fx.generate
    if calibrate and any(q.kind == "act" for q in module.quantizers.values()):
        from geta_fx.passes.normalize import keep_refolded
        from geta_fx.quantizer import calibrate as _calibrate

        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        with keep_refolded(module):  # a second round keeps its learned act ranges
            _calibrate(module, [tuple(args)])
    return module
