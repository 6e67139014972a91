"""fold_quant: one activation quantizer per tensor, across views; idempotent; honest.

    x -> view -> Qa -> fc1          x -> Qa -> view -> fc1
    x -> view -> Qa -> fc2   ==>          `--> view -> fc2     (one Qa)
"""

from __future__ import annotations

import torch
from torch import nn

import geta_fx
from geta_fx.ir import meta
from geta_fx.passes import FoldQuant, InsertQuantizers, Normalize, ShapeProp


class TwoViews(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(8, 4)
        self.fc3 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc1(x.reshape(-1, 8))
        b = self.fc2(x.view(-1, 8))
        c = self.fc3(x.reshape(-1, 8))
        return a + b + c


def _acts(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if meta.QUANTIZER in n.meta and n.meta[meta.QUANTIZER].target == "act"]


def _inserted(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = geta_fx.capture(model, (x,)).graph_module
    for p in (ShapeProp(), Normalize(), InsertQuantizers(mode="weight_act")):
        p(gm)
    gm.recompile()
    return gm


def test_merges_quantizers_across_views_and_is_idempotent() -> None:
    x = torch.randn(2, 3, 8)
    gm = _inserted(TwoViews(), x)
    assert len(_acts(gm)) == 3
    for q in (m for m in gm.modules() if getattr(m, "is_geta_quantizer", False)):
        if q.kind == "act":
            q.set_q_m(3.0)
    expected = gm(x)
    res = FoldQuant()(gm)
    gm.recompile()
    assert res.modified
    (act,) = _acts(gm)
    assert act.args[0].op == "placeholder"  # hoisted above the views onto x
    gm.graph.lint()
    # per-tensor quantization commutes with views: numerics unchanged
    torch.testing.assert_close(gm(x), expected)
    code = gm.code
    assert FoldQuant()(gm).modified is False
    assert gm.code == code
    act_modules = [n for n, m in gm.named_modules()
                   if getattr(m, "is_geta_quantizer", False) and m.kind == "act"]
    assert len(act_modules) == 1  # removed nodes' modules are gone too


def test_back_to_back_quantizers_fold() -> None:
    x = torch.randn(4, 8)
    gm = _inserted(nn.Sequential(nn.Linear(8, 8)), x)
    (act,) = _acts(gm)
    q = gm.get_submodule(str(act.target))
    with gm.graph.inserting_after(act):
        dup = gm.graph.call_module(str(act.target), (act,))
    dup.meta.update(act.meta)
    act.replace_all_uses_with(dup)
    dup.args = (act,)
    gm.recompile()
    assert len(_acts(gm)) == 2
    assert FoldQuant()(gm).modified
    assert len(_acts(gm)) == 1
    assert q is gm.get_submodule(str(_acts(gm)[0].target))


def test_no_quantizers_not_modified() -> None:
    gm = geta_fx.capture(nn.Linear(3, 3), (torch.randn(2, 3),)).graph_module
    code = gm.code
    assert FoldQuant()(gm).modified is False
    assert gm.code == code
