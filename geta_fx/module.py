"""GetaModule: the trainable, transformed model returned by ``geta_fx.transform``."""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx._compat import deepcopy_module
from geta_fx.errors import InputError
from geta_fx.graph_pickle import GraphModuleState, make_picklable
from geta_fx.ir import meta
from geta_fx.ir import units as _units
from geta_fx.ir.query import is_quantizer

def set_graph_training(gm: torch.fx.GraphModule, mode: bool) -> bool:
    """Set ``gm``'s baked-in train flags (the ``train_mode`` pass, run by a Pipeline, not
    logged: modes switch every epoch); returns whether anything changed."""
    from geta_fx.passes.train_mode import SetTrainingMode
    from geta_fx.pipeline import Pipeline

    return Pipeline([SetTrainingMode(mode)], log=False)(gm).modified


def retarget_graph_devices(gm: torch.fx.GraphModule, device: torch.device | str) -> bool:
    """Point every device ``gm``'s graph recorded at ``device`` (the ``retarget_device``
    pass, see :mod:`geta_fx.passes.retarget_device`); returns whether anything changed."""
    from geta_fx.passes.retarget_device import RetargetDevice
    from geta_fx.pipeline import Pipeline

    return Pipeline([RetargetDevice(torch.device(device))], log=False)(gm).modified


_Blend = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _advance_batch_norms(gm: torch.fx.GraphModule,
                         states: tuple[meta.BatchNormState, ...]) -> _Blend:
    """Before a train-mode call: ``num_batches_tracked += 1`` for every BatchNorm (as
    ``nn.BatchNorm*.forward`` does), and for ``momentum=None`` ones the running statistics to
    blend with (their batch_norm node runs with momentum 1.0: running := batch statistics).

    Returns ``[(running_stat, previous_value, weight 1/num_batches_tracked)]``.
    """
    blend: _Blend = []
    if not states:
        return blend
    with torch.no_grad():
        for s in states:
            count = gm.get_buffer(s.num_batches_tracked) if s.num_batches_tracked else None
            if count is not None:
                count.add_(1)
            if s.cumulative:
                weight = 1.0 / count.to(torch.float32) if count is not None else \
                    torch.tensor(0.0)
                for fqn in (s.running_mean, s.running_var):
                    stat = gm.get_buffer(fqn)
                    blend.append((stat, stat.clone(), weight.to(stat)))
    return blend


def _blend_cumulative_stats(gm: torch.fx.GraphModule, blend: _Blend) -> None:
    """After a train-mode call: ``stat = lerp(previous, batch stat, 1/num_batches_tracked)``,
    PyTorch's cumulative moving average for ``momentum=None``."""
    with torch.no_grad():
        for stat, previous, weight in blend:
            stat.copy_(torch.lerp(previous, stat, weight))


def move_to_device(gm: torch.fx.GraphModule, device: torch.device | str) -> torch.fx.GraphModule:
    """Move a plain GraphModule (e.g. the slim model from ``GetaModule.compress``) to ``device``.

    ``gm.to(device)`` alone moves only the parameters and buffers; factory ops in the graph
    would still create tensors on the capture device.  This moves the parameters, buffers and
    constant tensors and retargets every device recorded in the graph (the
    ``retarget_device`` pass).  In place; returns ``gm``.  (A
    ``GetaModule`` does this by itself on ``.to(device)``/``.cuda()``/``.cpu()``.)
    """
    if not isinstance(gm, torch.fx.GraphModule):
        hint = " (a GetaModule retargets itself: use gm.to(device))" \
            if isinstance(gm, GetaModule) else ""
        raise InputError(f"move_to_device expects a torch.fx.GraphModule, got "
                         f"{type(gm).__name__}{hint}")
    device = torch.device(device)
    gm.to(device)
    retarget_graph_devices(gm, device)
    return gm


def _tensor_devices(module: nn.Module) -> set[torch.device]:
    return {t.device for t in itertools.chain(module.parameters(), module.buffers())}


class GetaModule(nn.Module):
    """A captured, pass-transformed model.

    Attributes:
        graph_module: the torch.fx.GraphModule after the pipeline.
        groups: the PruneGroups found by dependency_groups.
        quantizers: name -> quantizer module (empty unless ``quantize`` was set).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, *, training: bool,
                 flat_io: bool = False, in_spec: Any = None, out_spec: Any = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self._flat_io = flat_io
        self._in_spec = in_spec
        self._out_spec = out_spec
        nn.Module.train(self, training)
        set_graph_training(graph_module, training)

    # ---------------------------------------------------------------- calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        states = self.graph_module.meta.get(meta.BATCHNORM, ()) if self.training else ()
        previous = _advance_batch_norms(self.graph_module, states)
        if self._flat_io:
            flat, _ = pytree.tree_flatten((args, kwargs))
            out = self.graph_module(*flat)
            out = pytree.tree_unflatten(list(out), self._out_spec)
        else:
            out = self.graph_module(*args, **kwargs)
        _blend_cumulative_stats(self.graph_module, previous)
        return out

    def train(self, mode: bool = True) -> GetaModule:
        super().train(mode)
        set_graph_training(self.graph_module, mode)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor],
               recurse: bool = True) -> GetaModule:
        """``nn.Module._apply`` (behind ``to``/``cuda``/``cpu``/``half``...), plus: after a
        device move that leaves every parameter and buffer on one device, the graph's
        recorded devices (factory ops' ``device=``, constants) follow them.

        Nothing is retargeted when the parameters and buffers did not change device (dtype
        conversions), end up on several devices, or do not exist.
        """
        before = _tensor_devices(self)
        super()._apply(fn, recurse)
        after = _tensor_devices(self)
        if len(after) == 1 and after != before:
            retarget_graph_devices(self.graph_module, next(iter(after)))
        return self

    # ---------------------------------------------------------------- pickling
    # pickle/torch.save keep outputs, groups, quantizers, train/eval flags and node metadata;
    # ``meta["val"]`` is re-derived on load, and export's generated guards module is replaced
    # by the equivalent input checks of its forward pre-hook (mismatching static sizes raise
    # RuntimeError instead of AssertionError).  copy/deepcopy do not take this path.
    def __getstate__(self) -> dict[str, Any]:
        """Picklable state: the graph module travels as a :class:`GraphModuleState`."""
        state = self.__dict__.copy()
        modules = OrderedDict(state["_modules"])
        modules["graph_module"] = GraphModuleState.of(modules["graph_module"])
        state["_modules"] = modules
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        modules = state["_modules"]
        if isinstance(modules.get("graph_module"), GraphModuleState):
            modules = OrderedDict(modules)
            modules["graph_module"] = modules["graph_module"].build()
            state = {**state, "_modules": modules}
        super().__setstate__(state)

    def __copy__(self) -> GetaModule:
        new = type(self).__new__(type(self))
        nn.Module.__setstate__(new, self.__dict__.copy())
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> GetaModule:
        # the plain deepcopy (GraphModule.__deepcopy__ keeps all node meta), not the pickle path
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        nn.Module.__setstate__(new, deepcopy_module(self.__dict__, memo))
        return new

    # ---------------------------------------------------------------- groups
    @property
    def groups(self) -> tuple[meta.PruneGroup, ...]:
        return meta.get_groups(self.graph_module)

    @property
    def quantizers(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.graph_module.named_modules()
                if is_quantizer(m)}

    def group(self, group_id: int) -> meta.PruneGroup:
        groups = self.groups
        if not 0 <= group_id < len(groups):
            raise InputError(f"group_id {group_id} out of range (model has {len(groups)} groups)")
        return groups[group_id]

    def zero_units(self, group_id: int, units: Any) -> None:
        """Set every parameter slice of ``units`` of group ``group_id`` to exactly 0."""
        g = self.group(group_id)
        if not g.prunable:
            raise InputError(f"group {group_id} is not prunable: {g.reason}")
        _units.zero_units(self.graph_module, g, torch.as_tensor(units, dtype=torch.long))

    def zero_mask(self, group_id: int) -> torch.Tensor:
        """Bool tensor [num_units]: which units of the group are exactly zero now."""
        return _units.zero_mask(self.graph_module, self.group(group_id))

    def validate(self) -> None:
        """Raise QuantizerError naming the first quantizer whose d, q_m or t is NaN/inf or
        non-positive (a diverged run), instead of letting it produce a silent NaN model."""
        for name, q in self.quantizers.items():
            try:
                q.validate()
            except Exception as e:
                raise type(e)(f"{name}: {e}") from None

    def prunable_groups(self) -> list[meta.PruneGroup]:
        return [g for g in self.groups if g.prunable]

    # ---------------------------------------------------------------- compress
    #: name -> shape of every parameter/buffer of the captured module (``compress(into=)``)
    _source_shapes: dict[str, tuple[int, ...]] | None = None
    #: (args, kwargs) the module was captured with (``compress(into=)`` verifies on them)
    _example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    #: a parameter-less copy of a transformers causal LM (``geta_fx.generate``), else None
    _generation_source: Any = None

    def compress(self, removed_units: np.ndarray | None = None, *,
                 lower: bool = False, align: int | str = "auto",
                 into: nn.Module | None = None) -> Any:
        """A slim GraphModule without the all-zero units; same outputs as this module.

        The slim graph keeps this module's current train/eval flags and its own copy of
        every parameter; this module is not modified.  ``lower=True`` also packs every
        quantized weight at its learned bit width (``geta_fx.lower``).  ``align=8`` (say)
        keeps back a few zero units so that every prunable group keeps a multiple of 8
        channels; the default ``"auto"`` does so only where the measured rule of
        :func:`geta_fx.passes.physical_prune.align_removed_units` says it pays (at most 1/8
        more channels; odd widths are slower per channel in oneDNN/MKL); ``align=1`` keeps the
        exact counts.  Kept-back units are zero, so outputs are unchanged either way.

        ``into=model`` (the module that was captured) slices ``model`` itself in place and
        returns it instead (:mod:`geta_fx.into`): its own class, ``forward`` and tooling, any
        input shape; verified against this module before ``model`` is touched.

        The slim graph lives on this module's device at the time of the call.  Being a plain
        GraphModule, its ``.to(device)`` moves only parameters and buffers, not the devices its
        factory ops (``torch.arange(..., device=x.device)``) recorded at capture: move it with
        :func:`geta_fx.module.move_to_device` instead.
        """
        from geta_fx.api import compress_pipeline
        from geta_fx.pipeline import Pipeline

        if align != "auto" and (isinstance(align, bool) or not isinstance(align, int)
                                or align < 1):
            raise InputError(f"compress: align must be an int >= 1 or 'auto', got {align!r}")
        if any(hasattr(p, "device_mesh") for p in self.parameters()):
            raise InputError("compress() of a module with FSDP2-sharded (DTensor) parameters: "
                             "gather a full state dict (torch.distributed.checkpoint.state_dict."
                             "get_model_state_dict(..., full_state_dict=True)), load it into an "
                             "unsharded copy and compress that (examples/fsdp2_llama.py)")
        if self.graph_module.meta.get(meta.BLOCKS):  # split for FSDP2: prune the flat graph
            from geta_fx.distributed import merge_blocks

            flat = deepcopy_module(self)
            merge_blocks(flat)
            return flat.compress(removed_units, lower=lower, align=align, into=into)
        self.validate()
        if into is not None:
            if lower:
                raise InputError("compress(into=..., lower=True): packed low-bit weights live "
                                 "in the graph only; use one or the other")
            from geta_fx.into import compress_into

            return compress_into(self, into, removed_units=removed_units, align=align)
        if self.training and self.graph_module.meta.get(meta.BATCHNORM):
            warnings.warn("compress() of a GetaModule in train mode: the slim graph's "
                          "BatchNorms normalise with batch statistics, but only a GetaModule "
                          "advances num_batches_tracked and cumulative (momentum=None) "
                          "averages; call gm.eval() first for an inference graph",
                          RuntimeWarning, stacklevel=2)
        slim = deepcopy_module(self.graph_module)
        slim = Pipeline(compress_pipeline(removed_units=removed_units,
                                          align=align))(slim).graph_module
        from geta_fx.report import record_dense_origin

        record_dense_origin(slim, self)  # report(slim) compares with this dense model
        if lower:  # pack quantized weights at their learned bit widths (geta_fx.deploy)
            from geta_fx.deploy import lower as _lower

            slim = _lower(slim, reference=self, inplace=True)
        from geta_fx.generate import attach_generation

        attach_generation(slim, self, removed_units=removed_units, align=align, lowered=lower)
        return make_picklable(slim)  # torch.save(slim) works (geta_fx.save is for deploying)

    def extra_repr(self) -> str:
        groups = self.groups
        prunable = [g for g in groups if g.prunable]
        return (f"groups={len(groups)} (prunable {len(prunable)}, "
                f"{sum(g.num_units for g in prunable)} units), quantizers={len(self.quantizers)}")
