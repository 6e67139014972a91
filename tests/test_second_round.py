"""A second round: ``transform`` of what ``compress`` returned, and higher-order-op branches.

    slim = transform(model, x, quantize=...).compress()
    transform(slim, x[, quantize=...])   # the groups of the slim sizes, its own quantizers kept

The oracle is the eager model of the slim sizes (same groups and units) and the slim model
itself (same outputs, gradients and parameters); a lowered model raises a clear error.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import max_rel_err
from torch import nn
from zoo import ZOO

import geta_fx
from geta_fx.errors import GetaFxError
from geta_fx.ir import meta
from geta_fx.passes import Normalize, ShapeProp


class Net(nn.Module):
    def __init__(self, a: int = 8, b: int = 8) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, a, 3, padding=1), nn.BatchNorm2d(a)
        self.c2, self.fc = nn.Conv2d(a, b, 3, padding=1), nn.Linear(b, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        return self.fc(F.relu(self.c2(x)).mean((2, 3)))


class CondNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Linear(6, 8), nn.Linear(8, 3)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pre(x))
        y = torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,))
        return self.post(torch.relu(y))


X = torch.randn(2, 3, 8, 8)
SLIM_SIZES = (6, 7)  # Net(8, 8) with 2 units of c1's group and 1 of c2's zeroed


def _slim(quantize: str | None, bits: float = 5.3) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = geta_fx.transform(Net().eval(), X, quantize=quantize)
    for q in gm.quantizers.values():
        q.set_bit_width(bits)
    gm.zero_units(0, [0, 1])
    gm.zero_units(1, [3])
    return gm.compress()


def _shape(gm: geta_fx.GetaModule) -> list[tuple[int, int, bool, list[str]]]:
    return [(g.num_units, g.unit_size, g.prunable, sorted({m.fqn for m in g.members}))
            for g in gm.groups]


def _bits(gm: geta_fx.GetaModule) -> dict[str, tuple[str, float]]:
    return {name: (q.kind, round(float(q.bit_width().detach()), 4))
            for name, q in gm.quantizers.items()}


def _quant_readers(gm: geta_fx.GetaModule) -> dict[str, int]:
    """param fqn -> number of quantizer nodes reading it (1: no stacked quantizers)."""
    out: dict[str, int] = {}
    for n in gm.graph_module.graph.nodes:
        info = n.meta.get(meta.QUANTIZER)
        if info is not None and info.target == "weight":
            out[info.param_fqn] = out.get(info.param_fqn, 0) + 1
    return out


@pytest.mark.parametrize("first", [None, "weight"])
@pytest.mark.parametrize("second", [None, "weight"])
def test_second_round_finds_the_slim_groups(first: str | None, second: str | None) -> None:
    slim = _slim(first)
    again = geta_fx.transform(slim, X, quantize=second)
    eager = geta_fx.transform(Net(*SLIM_SIZES).eval(), X, quantize=second)
    assert [g.num_units for g in again.groups] == [*SLIM_SIZES, 4]
    assert _shape(again) == _shape(eager)
    assert len(again.prunable_groups()) == 2
    torch.testing.assert_close(again(X), slim(X))


def test_second_round_keeps_learned_weight_quantizers() -> None:
    slim = _slim("weight", bits=5.3)
    for quantize in (None, "weight"):
        again = geta_fx.transform(slim, X, quantize=quantize)
        assert _bits(again) == {f"geta_quant.{p}_weight": ("weight", 5.3)
                                for p in ("c1", "c2", "fc")}
        assert _quant_readers(again) == {"c1.weight": 1, "c2.weight": 1, "fc.weight": 1}
        n_slim = sum(p.numel() for p in slim.parameters())
        assert sum(p.numel() for p in again.parameters()) == n_slim
        assert again.graph_module.get_submodule("geta_quant.c1_weight").param_fqn == "c1.weight"


def test_second_round_gradients_match_the_slim_model() -> None:
    slim = _slim("weight")
    again = geta_fx.transform(slim, X)
    again(X).square().sum().backward()
    slim(X).square().sum().backward()
    grads = dict(slim.named_parameters())
    for name, p in again.graph_module.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_weight_act_round_keeps_act_ranges_and_is_not_recalibrated() -> None:
    slim = _slim("weight_act")
    before = {n: (float(m.q_m), m.signed) for n, m in slim.named_modules()
              if n.endswith("_input")}
    assert len(before) == 3
    for quantize in (None, "weight", "weight_act"):
        again = geta_fx.transform(slim, X * 10, quantize=quantize)  # calibration would move
        after = {n: (float(q.q_m), q.signed) for n, q in again.quantizers.items()
                 if q.kind == "act"}
        assert after == before
        assert len(again.quantizers) == 6
        torch.testing.assert_close(again(X), slim(X))


def test_weight_slim_to_weight_act_adds_only_act_quantizers() -> None:
    slim = _slim("weight")
    again = geta_fx.transform(slim, X, quantize="weight_act")
    kinds = _bits(again)
    assert {k for k, (kind, _) in kinds.items() if kind == "weight"} == {
        "geta_quant.c1_weight", "geta_quant.c2_weight", "geta_quant.fc_weight"}
    assert all(b == 5.3 for kind, b in kinds.values() if kind == "weight")
    acts = [q for q in again.quantizers.values() if q.kind == "act"]
    assert len(acts) == 3 and all(round(float(q.bit_width().detach())) == 16 for q in acts)
    assert _quant_readers(again) == {"c1.weight": 1, "c2.weight": 1, "fc.weight": 1}


def test_third_round() -> None:
    again = geta_fx.transform(_slim("weight"), X, quantize="weight")
    again.zero_units(0, [5])
    third = geta_fx.transform(again.compress(), X, quantize="weight")
    assert [g.num_units for g in third.groups] == [5, 7, 4]
    assert len(third.quantizers) == 3


def test_refold_is_idempotent_and_keeps_parameter_identity() -> None:
    cap = geta_fx.capture(_slim("weight"), (X,)).graph_module
    ShapeProp()(cap)
    log_d = cap.get_submodule("geta_quant.c1_weight").log_d
    assert Normalize()(cap).modified
    q = cap.get_submodule("geta_quant.c1_weight")
    assert getattr(q, "is_geta_quantizer", False) and q.log_d is log_d
    assert not any(n.target is torch.ops.geta.quantize.default for n in cap.graph.nodes)
    assert Normalize()(cap).modified is False


class BareQuant(nn.Module):
    """Calls geta::quantize itself with a fixed step: not a traced Quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 2)
        self.register_buffer("d", torch.tensor([0.01]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = torch.ones(1)
        w = geta_fx.ops.quantize(self.fc1.weight, self.d, one, one)
        return self.fc2(torch.relu(F.linear(x, w, self.fc1.bias)))


def test_bare_quantize_is_not_refolded_but_stays_transparent() -> None:
    m = BareQuant()
    gm = geta_fx.transform(m, torch.randn(3, 5), quantize="weight")
    assert [q.param_fqn for q in gm.quantizers.values()] == ["fc2.weight"]
    assert gm.groups[0].prunable and gm.groups[0].num_units == 6
    assert {s.fqn for s in gm.groups[0].out_members} == {"fc1.weight", "fc1.bias"}
    x = torch.randn(3, 5)
    torch.testing.assert_close(gm(x), m(x), rtol=1e-3, atol=1e-2)  # fc2 at 16 bits


def test_lowered_model_raises_a_clear_error() -> None:
    torch.manual_seed(0)
    gm = geta_fx.transform(Net().eval(), X, quantize="weight")
    for q in gm.quantizers.values():
        q.set_bit_width(4)
    low = gm.compress(lower=True)
    with pytest.raises(GetaFxError, match=r"packed low-bit weights.*compress\(\) without "
                                          r"lower=True"):
        geta_fx.transform(low, X)
    for q in gm.quantizers.values():  # too wide to pack: frozen float buffers
        q.set_bit_width(12)
    with pytest.raises(GetaFxError, match="frozen by geta_fx.lower"):
        geta_fx.transform(gm.compress(lower=True), X)


def test_cond_branch_parameters_get_a_reason_each(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    m = CondNet().eval()
    x = torch.randn(4, 6)
    with caplog.at_level(logging.WARNING):
        gm = geta_fx.transform(m, x, quantize="weight")
    ungrouped = {n.fqn: n.reason for n in meta.get_ungrouped(gm.graph_module)}
    assert ungrouped == {
        "a.weight": "used inside torch.cond branch 'true_graph_0'; not analysed",
        "a.bias": "used inside torch.cond branch 'true_graph_0'; not analysed",
        "b.weight": "used inside torch.cond branch 'false_graph_0'; not analysed",
        "b.bias": "used inside torch.cond branch 'false_graph_0'; not analysed"}
    grouped = {s.fqn for g in gm.groups for s in g.members}
    assert {"pre.weight", "post.weight"} <= grouped and not grouped & set(ungrouped)
    unquantized = {n.fqn: n.reason for n in meta.get_unquantized(gm.graph_module)}
    assert set(unquantized) == {"a.weight", "b.weight"}  # biases are never quantized
    assert "higher-order-op branches" in unquantized["a.weight"]
    assert sorted(q.param_fqn for q in gm.quantizers.values()) == ["post.weight", "pre.weight"]
    text = caplog.text
    assert "a.weight" in text and "b.bias" in text and "true_graph_0" in text
    notes = geta_fx.report(gm).notes  # and the report says so
    assert any(n.startswith("a.weight is in no prunable group: used inside torch.cond")
               for n in notes)
    assert any(n.startswith("b.weight is not quantized") for n in notes)
    torch.testing.assert_close(gm(x), m(x), rtol=1e-3, atol=1e-3)


def test_plain_model_has_no_ungrouped_parameters() -> None:
    gm = geta_fx.transform(Net().eval(), X, quantize="weight")
    assert meta.get_ungrouped(gm.graph_module) == ()
    assert meta.get_unquantized(gm.graph_module) == ()


def test_second_round_trains_with_qasso_and_compresses_again() -> None:
    from geta_fx.optim import QASSO

    again = geta_fx.transform(_slim("weight"), X, quantize="weight")
    opt = QASSO(again, variant="adam", lr=1e-2, lr_quant=1e-2, target_sparsity=0.3,
                bit_range=(4, 8), start_pruning_step=1, pruning_steps=2)
    log_d = {n: float(q.log_d) for n, q in again.quantizers.items()}
    for _ in range(4):
        opt.zero_grad()
        again(X).square().mean().backward()
        opt.step()
    assert any(float(q.log_d) != log_d[n] for n, q in again.quantizers.items())
    third = again.compress()
    torch.testing.assert_close(third(X), again(X))
    assert sum(p.numel() for p in third.parameters()) < sum(
        p.numel() for p in again.parameters())


class TwoCalls(nn.Module):
    """The user's own Quantizer, called twice on one weight: traced into two quantize calls."""

    def __init__(self) -> None:
        super().__init__()
        from geta_fx.quantizer import Quantizer

        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)
        self.q = Quantizer("weight", bits=6).init_from_tensor(self.fc.weight.detach(), 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc.weight
        h = F.linear(x, self.q(w), self.fc.bias) + F.linear(2 * x, self.q(w))
        return self.out(torch.relu(h))


def test_one_quantizer_called_twice_is_refolded_once() -> None:
    m = TwoCalls()
    cap = geta_fx.capture(m, (torch.randn(3, 4),)).graph_module
    assert sum(n.target is torch.ops.geta.quantize.default for n in cap.graph.nodes) == 2
    gm = geta_fx.transform(m, torch.randn(3, 4), quantize="weight")
    assert _quant_readers(gm) == {"fc.weight": 1, "out.weight": 1}
    assert round(float(gm.quantizers["q"].bit_width().detach()), 4) == 6.0
    assert [g.num_units for g in gm.groups] == [6, 2]
    x = torch.randn(3, 4)
    ref = m.out(torch.relu(F.linear(x, m.q(m.fc.weight), m.fc.bias) +
                           F.linear(2 * x, m.q(m.fc.weight))))
    torch.testing.assert_close(gm(x), ref, rtol=1e-3, atol=1e-3)  # out.weight at 16 bits


def test_while_loop_body_parameters_get_a_reason_each() -> None:
    from torch._higher_order_ops.while_loop import while_loop  # NOTE: no public alias yet

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.body, self.post = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            i = torch.zeros((), dtype=torch.int64)
            _, h = while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, torch.tanh(self.body(h))),
                              (i, torch.relu(self.pre(x))))
            return self.post(h)

    m, x = Loop(), torch.randn(2, 4)
    gm = geta_fx.transform(m, x, quantize="weight")
    body = "used inside torch.while_loop body 'while_loop_body_graph_0'"
    assert {n.fqn: n.reason for n in meta.get_ungrouped(gm.graph_module)} == {
        "body.weight": f"{body}; not analysed", "body.bias": f"{body}; not analysed"}
    assert [n.fqn for n in meta.get_unquantized(gm.graph_module)] == ["body.weight"]
    torch.testing.assert_close(gm(x), m(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["mobilenetv2_block", "gpt_block", "multi_io"])
def test_zoo_second_round_is_the_first_round(name: str) -> None:
    model, args = ZOO[name]()
    first = geta_fx.transform(model, args, quantize="weight_act")
    slim = first.compress()  # nothing zeroed: the same sizes
    again = geta_fx.transform(slim, args, quantize="weight_act")
    assert _shape(again) == _shape(first)
    assert _bits(again) == _bits(first)
    assert max_rel_err(again(*args), slim(*args)) == 0.0
