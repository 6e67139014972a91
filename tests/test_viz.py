"""geta_fx.viz: DOT text (group colours, quant labels, clusters), draw, DotDumper."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import geta_fx
from geta_fx import passes
from geta_fx.errors import InputError
from geta_fx.pipeline import PassResult, Pipeline
from geta_fx.report import report
from geta_fx.viz import (CREATED_FILL, ERASED_FILL, UNPRUNABLE_FILL, DotDumper, bits_color,
                         dot_binary, draw, dump_observer, group_color, to_dot)

needs_dot = pytest.mark.skipif(dot_binary() is None,
                               reason="Graphviz's 'dot' program is not installed "
                               "(apt-get install graphviz); DOT-text tests still run")


class Block(nn.Module):
    """x -> conv1 -> bn1 -> relu -> conv2 -> bn2 -(+ x)-> relu -> pool -> fc

    groups: conv1's channels (inner, prunable); the residual stream x/conv2 (unprunable:
    the graph input carries it); fc's outputs (unprunable: graph output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(y + x), 1).flatten(1))


def _node_attrs(dot: str, name: str) -> dict[str, str]:
    m = re.search(rf'^\s*"{re.escape(name)}" \[(.*)\];$', dot, re.M)
    assert m, f"node {name} not in DOT"
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1)))


@pytest.fixture(scope="module")
def block_gm() -> geta_fx.GetaModule:
    return geta_fx.transform(Block().eval(), (torch.randn(2, 4, 6, 6),))


def test_group_colours_one_per_group(block_gm: geta_fx.GetaModule) -> None:
    dot = to_dot(block_gm, "group")
    gm = block_gm.graph_module
    inner = next(g for g in block_gm.groups if g.prunable)
    colour = group_color(inner.id)
    coloured = [n.name for n in gm.graph.nodes
                if any(m.group_id == inner.id for m in n.meta.get("geta.group", ()))]
    assert len(coloured) >= 3                          # conv2d, batch_norm, relu
    for name in coloured:
        attrs = _node_attrs(dot, name)
        assert attrs["fillcolor"] == colour
        assert f"g{inner.id}: {inner.num_units}x1" in attrs["label"]
    # the parameters holding the group's rows share the colour; conv2 lists it as input
    assert _node_attrs(dot, "conv1_weight")["fillcolor"] == colour
    assert f"in: g{inner.id}" in _node_attrs(dot, "conv2_weight")["label"]
    # unprunable groups are grey and dashed, with the reason as the tooltip
    for g in block_gm.groups:
        if g.prunable:
            continue
        node = next(n.name for n in gm.graph.nodes
                    if any(m.group_id == g.id for m in n.meta.get("geta.group", ())))
        attrs = _node_attrs(dot, node)
        assert attrs["fillcolor"] == UNPRUNABLE_FILL and "dashed" in attrs["style"]
        assert attrs["color"] == group_color(g.id)
        assert g.reason and g.reason.split(" (")[0] in attrs["tooltip"]
    # nodes are labelled with op, shape and dtype
    assert "[s" in _node_attrs(dot, "conv2d")["label"] and " f32" in dot
    assert "legend" in dot
    assert dot == to_dot(block_gm, "group")           # deterministic


def test_group_colours_are_stable_and_distinct() -> None:
    colours = [group_color(i) for i in range(12)]
    assert colours == [group_color(i) for i in range(12)]
    assert len(set(colours)) == 12
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)


def test_quant_nodes_show_bit_widths(block_gm: geta_fx.GetaModule) -> None:
    gm = geta_fx.transform(Block().eval(), (torch.randn(2, 4, 6, 6),), quantize="weight_act")
    q = gm.quantizers["geta_quant.conv1_weight"]
    q.set_bit_width(4)
    dot = to_dot(gm, "group")
    attrs = _node_attrs(dot, "geta_quant_conv1_weight")
    assert attrs["shape"] == "hexagon" and attrs["label"].startswith("Qw 4b")
    assert any(_node_attrs(dot, n.name)["label"].startswith("Qa 16b")
               for n in gm.graph_module.graph.nodes
               if n.meta.get("geta.quantizer") and n.meta["geta.quantizer"].target == "act")
    qdot = to_dot(gm, "quant")
    assert _node_attrs(qdot, "conv2d")["fillcolor"] == bits_color(4)
    assert "W4 A16" in _node_attrs(qdot, "conv2d")["label"]
    assert _node_attrs(qdot, "conv2d_1")["fillcolor"] == bits_color(16)
    assert bits_color(None) == bits_color(32) == "#ffffff" != bits_color(4)


class _StandInQuantizer(nn.Module):
    """Duck-typed quantizer: what viz/report rely on, nothing more."""

    is_geta_quantizer = True

    def __init__(self, bits: float) -> None:
        super().__init__()
        self.kind, self.param_fqn, self._bits = "weight", "fc.weight", bits

    def bit_width(self) -> torch.Tensor:
        return torch.tensor([self._bits])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


def test_any_duck_typed_quantizer_is_drawn_and_counted() -> None:
    """fc_weight -> [stand-in Q 3.2 bits] -> linear, inserted by hand"""
    gm = geta_fx.transform(Block().eval(), (torch.randn(2, 4, 6, 6),)).graph_module
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fc.weight")
    gm.add_submodule("stand_in_q", _StandInQuantizer(3.2))
    with gm.graph.inserting_after(weight):
        qnode = gm.graph.call_module("stand_in_q", (weight,))
    weight.replace_all_uses_with(qnode, delete_user_cb=lambda u: u is not qnode)
    qnode.meta["val"] = weight.meta["val"]
    gm.recompile()
    assert _node_attrs(to_dot(gm), qnode.name)["label"].startswith("Qw 3b")
    row = next(r for r in report(gm).layers if r.module == "fc")
    assert row.w_bits == 3


def test_op_colouring_and_clusters() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
                          nn.Linear(8, 2))
    gm = geta_fx.transform(model, (torch.randn(3, 4),))
    dot = to_dot(gm, "op")
    assert _node_attrs(dot, "linear")["fillcolor"] != _node_attrs(dot, "relu")["fillcolor"]
    assert _node_attrs(dot, "linear")["fillcolor"] == _node_attrs(dot, "linear_1")["fillcolor"]
    assert 'label="1: Sequential"' in dot             # container module boxed
    assert "subgraph cluster_0_" not in dot           # a leaf Linear is not boxed
    assert "subgraph cluster_0_" in to_dot(gm, "op", cluster="all")
    assert "subgraph" not in to_dot(gm, "op", cluster=False)
    assert '"_0_weight" [' in dot and '"_0_weight" [' not in to_dot(gm, "op", params=False)
    with pytest.raises(InputError, match="color_by"):
        to_dot(gm, "size")  # type: ignore[arg-type]


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4))
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.out(x)


def test_collapse_repeated_blocks() -> None:
    gm = geta_fx.transform(Stack(), (torch.randn(2, 4),))
    full, short = to_dot(gm), to_dot(gm, collapse=True)
    assert "collapsed__layers_1" in short and "layers.1 .. layers.3" in short
    assert "3 x Sequential, same graph as layers.0" in short
    assert '"linear_4"' in full and '"linear_4" [' not in short        # layers.3's linear
    assert '"linear_1" [' in short                                       # layers.0 stays
    # edges into and out of hidden nodes are redirected to the summary node
    assert '"add" -> "collapsed__layers_1";' in short
    assert '"collapsed__layers_1" -> "add_3";' in short


@dataclass(frozen=True)
class ReluToClamp:
    """relu(x) ==> clamp_min(x, 0): creates one node, erases one."""

    name: ClassVar[str] = "relu_to_clamp"
    requires: ClassVar[frozenset[str]] = frozenset({"val"})
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.aten.relu.default:
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(torch.ops.aten.clamp_min.default,
                                                 (node.args[0], 0.0))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                modified = True
        return PassResult(gm, modified)


def test_dot_dumper_before_after(tmp_path: Path) -> None:
    captured = geta_fx.capture(Block().eval(), (torch.randn(2, 4, 6, 6),))
    gm = captured.graph_module
    dumper = dump_observer(DotDumper(tmp_path, formats=("dot",)), gm)
    Pipeline([passes.ShapeProp(), passes.Normalize(), passes.DependencyGroups(),
              ReluToClamp()], observers=[dumper])(gm)
    index = json.loads((tmp_path / "passes.json").read_text())
    assert [r["name"] for r in index] == ["shape_prop", "normalize", "dependency_groups",
                                          "relu_to_clamp"]
    assert not index[1]["modified"] and index[1]["files"] == []   # nothing changed: no files
    assert index[2]["files"] == ["02_dependency_groups_before.dot",
                                 "02_dependency_groups_after.dot"]   # groups appeared
    assert index[3]["created"] and index[3]["erased"] == ["relu", "relu_1"]
    before = (tmp_path / "03_relu_to_clamp_before.dot").read_text()
    after = (tmp_path / "03_relu_to_clamp_after.dot").read_text()
    for erased in index[3]["erased"]:
        attrs = _node_attrs(before, erased)
        assert attrs["fillcolor"] == ERASED_FILL and "dashed" in attrs["style"]
        assert f'"{erased}"' not in after
    for created in index[3]["created"]:
        assert _node_attrs(after, created)["fillcolor"] == CREATED_FILL
        assert f'"{created}" [' not in before


def test_dot_dumper_through_transform_observers(tmp_path: Path) -> None:
    dumper = DotDumper(tmp_path)
    geta_fx.transform(Block().eval(), (torch.randn(2, 4, 6, 6),), quantize="weight",
                      observers=[dumper])
    names = sorted(p.name for p in tmp_path.glob("*.dot"))
    assert "03_insert_quantizers_after.dot" in names
    after = (tmp_path / "03_insert_quantizers_after.dot").read_text()
    assert _node_attrs(after, "geta_quant_conv1_weight")["fillcolor"] == CREATED_FILL
    assert all(p.parent == tmp_path for p in dumper.files)


def test_draw_formats(tmp_path: Path, block_gm: geta_fx.GetaModule) -> None:
    path = draw(block_gm, tmp_path / "g.dot", "quant")
    assert path.read_text().startswith("digraph G {")
    slim = block_gm.compress()
    assert draw(slim, tmp_path / "slim.gv").exists()  # slim graphs draw too (no groups)
    with pytest.raises(InputError, match="format"):
        draw(block_gm, tmp_path / "g.txt")
    with pytest.raises(InputError, match="GetaModule or torch.fx.GraphModule"):
        draw(nn.Linear(1, 1), tmp_path / "x.dot")


@needs_dot
def test_dot_renders_svg(tmp_path: Path, block_gm: geta_fx.GetaModule) -> None:
    for mode in ("group", "quant", "op"):
        svg = draw(block_gm, tmp_path / f"{mode}.svg", mode, collapse=True).read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    svg = (tmp_path / "group.svg").read_text()
    inner = next(g for g in block_gm.groups if g.prunable)
    assert group_color(inner.id) in svg
