"""shape_prop: a graph without ``meta["val"]`` gets one on every value node, with the shapes
and dtypes a real run produces; a graph that has them is left alone (modified False)."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import geta_fx
from geta_fx.errors import PassError
from geta_fx.ir import meta
from geta_fx.passes import ShapeProp
from geta_fx.pipeline import PassResult, Pipeline


class Net(nn.Module):
    """x -> conv -> relu -> flatten -> linear; y = x.mean() (a 0-d value)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(torch.relu(self.conv(x)).flatten(1)), x.mean()


def _real_shapes(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = (tuple(out.shape), out.dtype)
            return out

    Record(gm).run(x)
    return shapes


def test_fills_val_like_a_real_run() -> None:
    gm = torch.fx.symbolic_trace(Net())  # no meta["val"] anywhere
    x = torch.randn(2, 3, 6, 6)
    assert not any("val" in n.meta for n in gm.graph.nodes)
    res = Pipeline([ShapeProp(example_inputs=(x,))])(gm)
    assert res.modified is False  # metadata only
    real = _real_shapes(gm, x)
    assert real  # the interpreter saw the tensors
    for n in gm.graph.nodes:
        if n.name in real:
            val = n.meta["val"]
            assert (tuple(val.shape), val.dtype) == real[n.name], n.name
    assert meta.check_fact(gm, "val") is None


def test_exported_graph_is_left_alone() -> None:
    gm = geta_fx.capture(Net(), (torch.randn(2, 3, 6, 6),)).graph_module
    vals = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    assert ShapeProp()(gm).modified is False
    assert {n.name: n.meta.get("val") for n in gm.graph.nodes} == vals


def test_without_vals_or_inputs_is_an_error() -> None:
    gm = torch.fx.symbolic_trace(Net())
    with pytest.raises(PassError, match="shape_prop"):
        Pipeline([ShapeProp()])(gm)


def test_a_pass_that_claims_val_without_filling_it_is_caught() -> None:
    """What makes a no-op ShapeProp fail: the Pipeline checks the fact it provides."""
    class NoOpShapeProp(ShapeProp):
        def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
            return PassResult(gm, False)

    gm = torch.fx.symbolic_trace(Net())
    with pytest.raises(PassError, match=r"provides 'val'.*has no meta\['val'\]"):
        Pipeline([NoOpShapeProp(example_inputs=(torch.randn(2, 3, 6, 6),))])(gm)
