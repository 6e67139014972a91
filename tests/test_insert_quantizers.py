"""insert_quantizers: weight/act quantizer nodes, policy, signedness, negative cases.

    x -> conv -> relu -> linear      ==>  x -> Qa -> conv(Qw(w)) -> relu -> Qa(unsigned) -> linear(Qw(w))
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geta_fx
from geta_fx.ir import meta
from geta_fx.passes import InsertQuantizers, QuantPolicy


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def _quant_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if meta.QUANTIZER in n.meta]


def test_weight_mode_inserts_one_quantizer_per_weight() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight")
    nodes = _quant_nodes(gm.graph_module)
    assert sorted(n.meta[meta.QUANTIZER].param_fqn for n in nodes) == ["conv.weight", "fc.weight"]
    for q in gm.quantizers.values():
        assert abs(float(q.bit_width().detach()) - 16.0) < 1e-3
        assert q.kind == "weight"
    # the quantizer sits on the weight input of its layer
    for n in nodes:
        (user,) = n.users
        assert user.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
        assert user.args[1] is n
        assert n.meta["val"].shape == n.args[0].meta["val"].shape


def test_weight_act_mode_unsigned_after_relu_and_calibrated() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight_act")
    acts = {q.name: q for q in gm.quantizers.values() if q.kind == "act"}
    assert len(acts) == 2
    assert acts["input of conv"].signed is True  # raw input can be negative
    assert acts["input of fc"].signed is False  # mean of relu output
    # calibrated from the example input: q_m is the input's max |x|
    assert torch.allclose(acts["input of conv"].q_m.detach(), x.abs().max().reshape(1))


def test_policy_skip_and_first_last() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight",
                           policy=QuantPolicy(skip=("fc.*",)))
    assert [q.param_fqn for q in gm.quantizers.values()] == ["conv.weight"]
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight", quantize_first=False)
    assert [q.param_fqn for q in gm.quantizers.values()] == ["fc.weight"]
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight", skip_ops=("conv2d",),
                           quantize_last=True)
    assert [q.param_fqn for q in gm.quantizers.values()] == ["fc.weight"]


def test_bad_arguments_name_the_argument() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="quantize"):
        geta_fx.transform(ConvNet(), (x,), quantize="int8")
    with pytest.raises(ValueError, match="bits"):
        geta_fx.transform(ConvNet(), (x,), quantize="weight", bits=1)
    with pytest.raises(ValueError, match="mode"):
        InsertQuantizers(mode="act")  # type: ignore[arg-type]


def test_no_layers_means_not_modified() -> None:
    class NoLayers(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * 2

    cap = geta_fx.capture(NoLayers(), (torch.randn(2, 3),))
    code = cap.graph_module.code
    res = InsertQuantizers(mode="weight_act")(cap.graph_module)
    assert res.modified is False
    assert cap.graph_module.code == code


def test_diverged_quantizer_is_reported_by_name() -> None:
    gm = geta_fx.transform(ConvNet(), (torch.randn(2, 3, 8, 8),), quantize="weight")
    name, q = next(iter(gm.quantizers.items()))
    with torch.no_grad():
        q.log_q_m.fill_(float("nan"))
    with pytest.raises(geta_fx.QuantizerError, match=name):
        gm.compress()
    with torch.no_grad():
        q.log_q_m.fill_(-1e4)  # q_m = exp(log_q_m) > 0 by construction; this underflows
    with pytest.raises(geta_fx.QuantizerError, match="q_m"):
        gm.validate()


def test_second_run_keeps_existing_quantizers_and_adds_only_missing_act_ones() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight")
    g = gm.graph_module
    names = sorted(gm.quantizers)
    assert InsertQuantizers(mode="weight")(g).modified is False  # no second weight quantizer
    assert sorted(gm.quantizers) == names
    assert InsertQuantizers(mode="weight_act")(g).modified is True
    kinds = sorted(q.kind for q in gm.quantizers.values())
    assert kinds == ["act", "act", "weight", "weight"]
    assert len(_quant_nodes(g)) == 4  # each weight read through exactly one quantizer
    assert InsertQuantizers(mode="weight_act")(g).modified is False


def test_weights_left_float_are_recorded_with_the_reason() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight",
                           policy=QuantPolicy(skip=("fc.*",)))
    assert [(n.fqn, n.reason) for n in meta.get_unquantized(gm.graph_module)] == [
        ("fc.weight", "left float by the policy (linear.default at linear)")]
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight", quantize_first=False)
    (note,) = meta.get_unquantized(gm.graph_module)
    assert note.fqn == "conv.weight" and "quantize_first=False" in note.reason
    gm = geta_fx.transform(ConvNet(), (x,), quantize="weight")
    assert meta.get_unquantized(gm.graph_module) == ()
