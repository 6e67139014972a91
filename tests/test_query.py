"""ir.query: the one quantizer identity and the one node creator every pass uses."""

from __future__ import annotations

import torch
from torch import nn

import geta_fx
from geta_fx.ir import meta
from geta_fx.ir.query import create_node_with_meta, is_quantizer, quantizer_of


def test_quantizer_of_finds_exactly_the_quantizer_nodes() -> None:
    gm = geta_fx.transform(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), (torch.randn(2, 4),),
                           quantize="weight_act")
    g = gm.graph_module
    found = {n.name for n in g.graph.nodes if quantizer_of(g, n) is not None}
    assert found == {n.name for n in g.graph.nodes if meta.QUANTIZER in n.meta} and len(found) == 2
    assert not is_quantizer(nn.Linear(2, 2)) and all(is_quantizer(q) for q in gm.quantizers.values())


def test_new_nodes_are_born_with_metadata() -> None:
    g = geta_fx.capture(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(2, 4),)).graph_module
    anchor = next(n for n in g.graph.nodes if n.target is torch.ops.aten.linear.default)
    with g.graph.inserting_after(anchor):
        node = create_node_with_meta(g.graph, "call_function", torch.ops.aten.relu.default,
                                     (anchor,), anchor=anchor, val=anchor.meta["val"])
    assert node.meta[meta.ORIGIN] == (anchor.name,)
    assert node.meta["nn_module_stack"] == anchor.meta["nn_module_stack"]
    assert node.meta["val"] is anchor.meta["val"]
