"""GetaModule: the trainable, transformed model returned by ``geta_fx.transform``."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from geta_fx.errors import InputError
from geta_fx.ir import meta
from geta_fx.ir import units as _units

aten = torch.ops.aten

# (op, index of its train flag): flags that export bakes in and train()/eval() must flip.
_TRAIN_FLAGS = {
    aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2, aten.native_dropout.default: 2,
    aten.batch_norm.default: 5,
}


def set_graph_training(gm: torch.fx.GraphModule, mode: bool) -> bool:
    """Rewrite dropout/batch_norm train flags in ``gm``; returns whether anything changed."""
    changed = False
    for node in gm.graph.nodes:
        idx = _TRAIN_FLAGS.get(node.target) if node.op == "call_function" else None
        if idx is None:
            continue
        if len(node.args) > idx and node.args[idx] != mode:
            args = list(node.args)
            args[idx] = mode
            node.args = tuple(args)
            changed = True
    if changed:
        gm.recompile()
    return changed


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
        if self._flat_io:
            flat, _ = pytree.tree_flatten((args, kwargs))
            out = self.graph_module(*flat)
            return pytree.tree_unflatten(list(out), self._out_spec)
        return self.graph_module(*args, **kwargs)

    def train(self, mode: bool = True) -> GetaModule:
        super().train(mode)
        set_graph_training(self.graph_module, mode)
        return self

    # ---------------------------------------------------------------- groups
    @property
    def groups(self) -> tuple[meta.PruneGroup, ...]:
        return meta.get_groups(self.graph_module)

    @property
    def quantizers(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.graph_module.named_modules()
                if getattr(m, "is_geta_quantizer", False)}

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
    def compress(self, removed_units: np.ndarray | None = None, *,
                 lower: bool = False) -> torch.fx.GraphModule:
        """A slim GraphModule without the all-zero units; same outputs as this module.

        The slim graph keeps this module's current train/eval flags and its own copy of
        every parameter; this module is not modified.  ``lower=True`` also packs every
        quantized weight at its learned bit width (``geta_fx.lower``).
        """
        from geta_fx.passes.physical_prune import PhysicalPrune

        self.validate()
        slim = copy.deepcopy(self.graph_module)
        PhysicalPrune(removed_units=removed_units)(slim)
        slim.meta.setdefault(meta.LOG, [])
        if lower:  # pack quantized weights at their learned bit widths (geta_fx.deploy)
            from geta_fx.deploy import lower as _lower

            slim = _lower(slim, reference=self, inplace=True)
        return slim

    def extra_repr(self) -> str:
        groups = self.groups
        prunable = [g for g in groups if g.prunable]
        return (f"groups={len(groups)} (prunable {len(prunable)}, "
                f"{sum(g.num_units for g in prunable)} units), quantizers={len(self.quantizers)}")
