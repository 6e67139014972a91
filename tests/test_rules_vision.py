"""Channel rules for vision blocks (issue #14): in-place ops, gates, shuffles, windows, GRN.

Each rule: zero units of the groups it makes prunable, ``compress()``, and compare with the
zeroed model (itself checked against the user's eager model); and a case where it must pin.

    model --transform--> gm (== model) --zero half of every group--> zeroed --compress--> slim
    assert slim(x) == zeroed(x) and the op's channels are in a prunable group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import max_rel_err, num_params, zero_random_units
from torch import nn

import geta_fx
from geta_fx.ir import meta, op_sets
from geta_fx.ir.registry import RULES, rule_for
from geta_fx.passes import DependencyGroups

aten = torch.ops.aten


def _exact(model: nn.Module, x: torch.Tensor) -> geta_fx.GetaModule:
    """Transform (== eager), zero half of every prunable group, compress (== zeroed)."""
    model = model.eval()
    gm = geta_fx.transform(model, (x,))
    assert max_rel_err(model(x), gm(x)) <= 1e-6
    assert zero_random_units(gm, 0.5) > 0
    zeroed = gm(x)
    slim = gm.compress()
    assert max_rel_err(zeroed, slim(x)) <= 1e-5
    assert num_params(slim) < num_params(gm)
    return gm


def _group(gm: geta_fx.GetaModule, fqn: str) -> geta_fx.PruneGroup:
    return next(g for g in gm.groups for m in g.members if m.fqn == fqn and m.role == "out")


def _targets(gm: geta_fx.GetaModule) -> set:
    return {n.target for n in gm.graph_module.graph.nodes if n.op == "call_function"}


# --------------------------------------------------------------------------- in-place ops


def test_every_inplace_variant_resolves_to_its_siblings_rule() -> None:
    assert {aten.relu_.default, aten.hardswish_.default, aten.dropout_.default,
            aten.add_.Tensor, aten.mul_.Tensor, aten.hardsigmoid_.default,
            aten.silu_.default, aten.sigmoid_.default} <= op_sets.INPLACE
    for op in op_sets.INPLACE:
        base = op_sets.out_of_place(op)
        rule = rule_for(op)
        assert op not in RULES and rule is not None and rule.op is op, op
        assert rule.no_rewrite == RULES[base].no_rewrite, op
    # no sibling, a sibling without a rule, or one that is a view: no rule (pins)
    for op in (aten.copy_.default, aten.fill_.Scalar, aten.unsqueeze_.default,
               aten.transpose_.default, aten.add.out):
        assert rule_for(op) is None, op


class InplaceActs(nn.Module):
    """MobileNetV3-style in-place activations, residual ``+=``, in-place gate and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.drop = nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.c1(x)))
        y = F.relu(self.bn2(self.c2(h)), inplace=True)
        y += h
        g = F.hardsigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))),
                          inplace=True)
        y.mul_(g)
        return self.head(self.drop(y))


def test_inplace_ops_prune_exactly() -> None:
    gm = _exact(InplaceActs(), torch.randn(2, 3, 8, 8))
    assert {aten.hardswish_.default, aten.relu_.default, aten.add_.Tensor, aten.mul_.Tensor,
            aten.hardsigmoid_.default, aten.dropout_.default} <= _targets(gm)
    g = _group(gm, "c1.weight")
    assert g.prunable and g.num_units == 8
    assert {"c2.weight", "fc2.weight", "bn1.weight"} <= {m.fqn for m in g.members}
    assert _group(gm, "fc1.weight").prunable


class StaleView(nn.Module):
    """A view made before an in-place sigmoid_ and read after it sees sigmoid's values."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        v = h.transpose(2, 3)
        h.sigmoid_()
        return self.c2(v)


def test_inplace_write_read_through_an_older_view_pins() -> None:
    model = StaleView().eval()
    x = torch.randn(2, 3, 4, 5)
    gm = geta_fx.transform(model, (x,))
    assert max_rel_err(model(x), gm(x)) == 0.0
    assert aten.sigmoid_.default in _targets(gm)
    g = _group(gm, "c1.weight")
    assert not g.prunable and "in-place write makes pruned channels non-zero" in g.reason


def test_inplace_write_read_through_the_mutated_tensor_pins() -> None:
    """A graph that reads the operand of ``sigmoid_`` itself afterwards (export always reads
    the result instead, so the graph is edited): the operand takes the result's label."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(self.c1(x).sigmoid_())

    x = torch.randn(2, 3, 4, 4)
    gm = geta_fx.transform(Net().eval(), (x,)).graph_module
    (sig,) = [n for n in gm.graph.nodes if n.target is aten.sigmoid_.default]
    (conv2,) = [n for n in gm.graph.nodes if n.target is aten.conv2d.default and
                n.args[0] is sig]
    conv2.args = (sig.args[0], *conv2.args[1:])  # read the mutated conv1 output
    gm.recompile()
    DependencyGroups()(gm)
    g = next(g for g in gm.meta[meta.GROUPS] for m in g.members if m.fqn == "c1.weight")
    assert not g.prunable and "input channels are not zero" in g.reason
