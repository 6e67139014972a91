"""normalize: export's runtime-assert nodes and dead pure nodes go, numerics stay, idempotent,
an already-normal graph is untouched (modified False)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import geta_fx
from geta_fx.errors import PassError
from geta_fx.ir import meta
from geta_fx.passes import Normalize
from geta_fx.pipeline import PassResult, Pipeline


class Casts(nn.Module):
    """x -> to(float64) -> linear(.double()) -> to(float32); ``t`` is computed and unused.

    Export leaves ``_assert_tensor_metadata`` nodes for the dtype conversions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x * 2  # noqa: F841 - dead on purpose
        return self.fc(x.to(torch.float64).to(torch.float32))


def _asserts(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function"
            and "assert" in getattr(n.target, "__name__", "")]


def test_drops_asserts_and_dead_nodes_numerics_unchanged() -> None:
    model = Casts().eval()
    gm = geta_fx.capture(model, (torch.randn(2, 4),)).graph_module
    assert _asserts(gm), gm.code  # the case this pass exists for
    before = len(gm.graph.nodes)
    x = torch.randn(5, 4)
    res = Pipeline([Normalize()])(gm)
    assert res.modified and len(gm.graph.nodes) < before
    assert _asserts(gm) == [] and meta.check_fact(gm, "normalized") is None
    assert not any(n.op == "call_function" and not n.users for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))
    code = gm.code
    assert Normalize()(gm).modified is False and gm.code == code  # idempotent, honest


def test_normal_graph_is_untouched() -> None:
    gm = geta_fx.capture(nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(),
                         (torch.randn(2, 4),)).graph_module
    code = gm.code
    assert Normalize()(gm).modified is False and gm.code == code


def test_a_no_op_normalize_is_caught() -> None:
    class NoOp(Normalize):
        def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
            return PassResult(gm, False)

    gm = geta_fx.capture(Casts().eval(), (torch.randn(2, 4),)).graph_module
    with pytest.raises(PassError, match=r"provides 'normalized'.*assert node"):
        Pipeline([NoOp()])(gm)
