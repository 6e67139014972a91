"""shape_prop: make sure every tensor node has ``meta["val"]`` (a FakeTensor).

Exported graphs already have it; symbolic_trace graphs lowered with make_fx do
too, but user-built graphs may not.  The pass fills the gaps by fake-propagating
from the placeholders' values (or from example inputs given to the pass).
``modified`` is False: the graph is never changed, only metadata added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from geta_fx.errors import GetaFxError
from geta_fx.ir import meta
from geta_fx.pipeline import PassResult


@dataclass(frozen=True)
class ShapeProp:
    name: ClassVar[str] = "shape_prop"
    requires: ClassVar[frozenset[str]] = frozenset({"graph"})
    provides: ClassVar[frozenset[str]] = frozenset({"val"})
    invalidates: ClassVar[frozenset[str]] = frozenset()
    example_inputs: tuple[Any, ...] | None = field(default=None, compare=False)

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        # call_module nodes without users (export's _guards_fn) produce no tensor.
        missing = [n for n in gm.graph.nodes if "val" not in n.meta and meta.needs_val(n, gm)]
        if not missing:
            return PassResult(gm, False)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if self.example_inputs is not None:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                      for x in self.example_inputs]
        elif all("val" in n.meta for n in placeholders):
            from torch._guards import detect_fake_mode

            inputs = [n.meta["val"] for n in placeholders]
            mode = detect_fake_mode(inputs) or FakeTensorMode(allow_non_fake_inputs=True)
        else:
            raise GetaFxError("shape_prop: placeholders have no 'val'; pass example_inputs")
        allow = mode.allow_non_fake_inputs
        mode.allow_non_fake_inputs = True
        try:
            with mode:
                FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
        finally:
            mode.allow_non_fake_inputs = allow
        return PassResult(gm, False)
