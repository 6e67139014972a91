"""Quantizer module (log-d / log-q_m parameterisation, bit width, validation, float32 scalars
under dtype conversions, legacy state dicts) and activation calibration.

    x --Quantizer(kind, signed)--> geta::quantize(x, exp(log_d), max(exp(log_q_m), 1e-10), t)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import geta_fx.ops as ops
from geta_fx.errors import GetaFxError, InputError, QuantizerError
from geta_fx.quantizer import Quantizer, bit_width, calibrate, d_for_bits, keep_float32


def bits_of(q: Quantizer) -> float:
    return float(q.bit_width().detach())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [16.0, 8.0, 4.0, 2.5])
def test_bit_width_after_init(bits: float, signed: bool) -> None:
    q = Quantizer("weight", signed=signed, bits=bits, q_m=0.37, t=1.3, name="w")
    b = q.bit_width()
    assert b.dtype == torch.float32 and b.shape == (1,)
    assert math.isclose(float(b.detach()), bits, abs_tol=1e-4)
    assert all(p.dtype == torch.float32 and p.shape == (1,) for p in q.parameters())
    assert {n for n, _ in q.named_parameters()} == {"log_d", "log_q_m", "t"}
    assert q.q_m.item() == pytest.approx(0.37) and q.q_m.shape == (1,)
    assert q.is_geta_quantizer  # how GetaModule.quantizers finds it


def test_bit_width_formula_spec_a3() -> None:
    """q_m = 1, d = 0.1: b = log2(11) + 1 = 4.46 signed; log2(11) = 3.46 unsigned."""
    q = Quantizer("act", q_m=1.0)
    q.set_d(0.1)
    assert math.isclose(bits_of(q), math.log2(11) + 1, rel_tol=1e-6)
    q.signed = False
    assert math.isclose(bits_of(q), math.log2(11), rel_tol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_set_bit_width_round_trip(signed: bool) -> None:
    q = Quantizer("weight", signed=signed, q_m=2.5, t=0.8)
    for bits in (3.0, 5.7, 8.0, 12.0, 16.0):
        q.set_bit_width(bits)
        assert math.isclose(bits_of(q), bits, abs_tol=1e-4)
        assert torch.allclose(q.d, q.d_for_bits(bits), rtol=1e-5)
        q.set_d(q.d.detach())
        assert math.isclose(bits_of(q), bits, abs_tol=1e-4)


def test_unsigned_has_one_more_bit_of_levels() -> None:
    s = Quantizer("act", signed=True, bits=8.0)
    u = Quantizer("act", signed=False, bits=8.0)
    assert torch.allclose(s.d / u.d, torch.tensor([255.0 / 127.0]))


def test_vectorised_d_for_bits_and_bit_width() -> None:
    """One call for many quantizers (stacked [1]-params), mixed signedness."""
    bits = torch.tensor([4.0, 8.0, 16.0, 6.0])
    q_m = torch.tensor([0.5, 1.0, 3.0, 1.0])
    t = torch.tensor([1.0, 1.2, 0.9, 1.0])
    signed = torch.tensor([True, True, False, False])
    d = d_for_bits(bits, q_m, t, signed)
    torch.testing.assert_close(bit_width(d, q_m, t, signed), bits)
    torch.testing.assert_close(d[0], torch.tensor(0.5 / 7))
    torch.testing.assert_close(d[3], torch.tensor(1.0 / 63))
    quantizers = [Quantizer("weight", signed=bool(s), bits=float(b), q_m=float(m), t=float(tt))
                  for b, m, tt, s in zip(bits, q_m, t, signed, strict=True)]
    torch.testing.assert_close(torch.cat([q.d for q in quantizers]).detach(), d)


def test_init_from_tensor_spec_a5() -> None:
    w = torch.tensor([[0.2, -0.9], [0.4, 0.1]])
    q = Quantizer("weight", name="conv1.weight", q_m=5.0, t=1.7).init_from_tensor(w, bits=8)
    assert q.q_m.item() == pytest.approx(0.9) and q.t.item() == 1.0
    assert math.isclose(bits_of(q), 8.0, abs_tol=1e-4)
    torch.testing.assert_close(q.d, torch.tensor([0.9 / 127]))
    zero = Quantizer("weight").init_from_tensor(torch.zeros(3), bits=4)
    assert zero.q_m.item() == 1.0 and math.isclose(bits_of(zero), 4.0, abs_tol=1e-4)
    with pytest.raises(QuantizerError, match=r"conv1\.weight"):
        q.init_from_tensor(torch.tensor([1.0, float("inf")]), bits=8)


def test_forward_matches_op_and_grads_reach_all_params() -> None:
    q = Quantizer("weight", bits=4.0, q_m=1.0, t=1.2, name="w")
    x = torch.randn(64) * 1.5
    y = q(x)
    expected = ops.quantize(x, q.d.detach(), q.q_m.detach(), q.t.detach())
    assert torch.equal(y.detach(), expected)
    (y * torch.randn(64)).sum().backward()
    for p in q.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # chain rule through d = exp(log_d): dL/dlog_d = dL/dd * d
    q.zero_grad()
    d = q.d.detach().requires_grad_()
    ops.quantize(x, d, q.q_m.detach(), q.t.detach()).sum().backward()
    q(x).sum().backward()
    torch.testing.assert_close(q.log_d.grad, d.grad * q.d.detach())
    # chain rule through q_m = exp(log_q_m): dL/dlog_q_m = dL/dq_m * q_m (GETA_SPEC A.4 rule)
    q.zero_grad()
    q_m = q.q_m.detach().requires_grad_()
    ops.quantize(x, q.d.detach(), q_m, q.t.detach()).sum().backward()
    q(x).sum().backward()
    assert q_m.grad.abs().sum() > 0  # some of x is clipped
    torch.testing.assert_close(q.log_q_m.grad, q_m.grad * q.q_m.detach())


def test_q_m_is_positive_by_construction() -> None:
    """No value of the parameter gives a non-positive range; set_q_m rejects one."""
    q = Quantizer("weight", bits=8.0, q_m=0.8, name="fc.weight")
    x = torch.randn(32)
    for raw in (-5.0, -0.5, 0.0, 3.0):
        with torch.no_grad():
            q.log_q_m.fill_(raw)
        assert q.q_m.item() == pytest.approx(math.exp(raw)) and q.q_m.item() > 0
        q.validate()
        assert torch.isfinite(q(x)).all()
    q.set_q_m(0.25)
    assert q.log_q_m.item() == pytest.approx(math.log(0.25))
    for bad in (0.0, -0.0025, float("nan"), float("inf")):
        with pytest.raises(QuantizerError, match=r"fc\.weight.*q_m must be"):
            q.set_q_m(bad)
    assert q.q_m.item() == pytest.approx(0.25)  # unchanged by the rejected values


def test_zero_input_stays_zero() -> None:
    for signed in (True, False):
        q = Quantizer("act", signed=signed, bits=3.0, q_m=0.5, t=1.4)
        assert torch.equal(q(torch.zeros(2, 5)), torch.zeros(2, 5))


@pytest.mark.parametrize(("param", "value", "match"), [
    ("t", float("nan"), "t is nan"),
    ("log_q_m", float("inf"), "log_q_m is inf"),
    ("log_q_m", float("nan"), "log_q_m is nan"),
    ("log_q_m", -1e4, "q_m = 0.0 is below 1e-10"),
    ("log_d", float("inf"), "log_d is inf"),
    ("log_d", -1e4, "d = 0.0 is not positive"),
])
def test_validate_names_the_quantizer(param: str, value: float, match: str) -> None:
    q = Quantizer("act", name="layer3.conv2:input")
    q.validate()
    with torch.no_grad():
        getattr(q, param).fill_(value)
    with pytest.raises(QuantizerError, match=match) as info:
        q.validate()
    assert "layer3.conv2:input" in str(info.value)
    assert isinstance(info.value, GetaFxError)


def test_constructor_and_setter_errors() -> None:
    with pytest.raises(InputError, match="kind"):
        Quantizer("bias", name="b")  # type: ignore[arg-type]
    with pytest.raises(QuantizerError, match="needs a finite bit width > 1"):
        Quantizer("weight", bits=1.0, name="w")
    Quantizer("act", signed=False, bits=1.0)  # one unsigned bit is valid: levels {0, q_m}
    q = Quantizer("weight", name="fc.weight")
    with pytest.raises(QuantizerError, match=r"fc\.weight"):
        q.set_d(-0.1)
    with pytest.raises(QuantizerError, match="q_m must be"):
        Quantizer("weight", q_m=0.0)


def test_state_dict_round_trips_signedness() -> None:
    q = Quantizer("act", signed=False, bits=5.0, q_m=2.0, t=1.1)
    r = Quantizer("act")
    r.load_state_dict(q.state_dict())
    assert r.signed is False and math.isclose(bits_of(r), 5.0, abs_tol=1e-4)
    x = torch.randn(10)
    assert torch.equal(r(x), q(x))


def test_legacy_state_dict_with_raw_q_m_loads_or_fails_clearly() -> None:
    """A state dict from before log_q_m (raw ``q_m`` key) converts; a non-positive one raises."""
    q = Quantizer("act", signed=False, bits=5.0, q_m=2.0, t=1.1)
    legacy = {("q_m" if k == "log_q_m" else k): (v.exp() if k == "log_q_m" else v)
              for k, v in q.state_dict().items()}
    assert "q_m" in legacy and "log_q_m" not in legacy
    r = Quantizer("act", name="blk.input")
    r.load_state_dict(legacy)
    torch.testing.assert_close(r.q_m, q.q_m.detach())
    x = torch.randn(50) * 3
    torch.testing.assert_close(r(x), q(x))
    # nested prefix (a quantizer inside a model) and strict loading
    outer, src = nn.Sequential(Quantizer("act")), nn.Sequential(q)
    nested = {k.replace("log_q_m", "q_m"): (v.exp() if k.endswith("log_q_m") else v)
              for k, v in src.state_dict().items()}
    outer.load_state_dict(nested, strict=True)
    torch.testing.assert_close(outer[0].q_m, q.q_m.detach())
    legacy["q_m"] = torch.tensor([-0.0025])
    with pytest.raises(QuantizerError, match=r"blk\.input.*legacy 'q_m' = -0\.0025,"):
        r.load_state_dict(legacy)


def test_legacy_pickle_with_raw_q_m_parameter_unpickles() -> None:
    """A Quantizer pickled before log_q_m (``q_m`` in ``_parameters``) comes back upgraded."""
    import pickle

    q = Quantizer("weight", bits=6.0, q_m=0.6, t=1.2, name="fc.weight")
    x = torch.randn(40)
    expected = q(x)
    old = Quantizer("weight", name="fc.weight")
    old.load_state_dict(q.state_dict())
    del old._parameters["log_q_m"]
    old._parameters["q_m"] = nn.Parameter(q.q_m.detach().clone())  # the legacy layout
    new = pickle.loads(pickle.dumps(old))
    assert {n for n, _ in new.named_parameters()} == {"log_d", "log_q_m", "t"}
    torch.testing.assert_close(new(x), expected)
    new.load_state_dict(q.state_dict())  # and it still loads current state dicts
    old._parameters["q_m"] = nn.Parameter(torch.tensor([-0.0025]))
    with pytest.raises(QuantizerError, match=r"fc\.weight.*legacy 'q_m' = -0\.0025,"):
        pickle.loads(pickle.dumps(old))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_conversion_keeps_scalars_float32(dtype: torch.dtype) -> None:
    """``.to(dtype)`` converts nothing of a Quantizer: its scalars stay exact float32."""
    q = Quantizer("weight", bits=6.0, q_m=0.7, t=1.3, name="w")
    x = torch.randn(64)
    q(x).sum().backward()
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    q.to(dtype)
    for n, p in q.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[n]), n
        assert p.grad is not None and p.grad.dtype == torch.float32, n
    if dtype != torch.float64:  # the op takes float32/16/bf16 x: output in x's dtype
        y = q(x.to(dtype))
        assert y.dtype == dtype
        assert torch.equal(y, q(x.to(dtype).float()).to(dtype))  # float32 math, one rounding
    q.to("meta")  # device moves still apply
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in q.parameters())


def test_keep_float32_leaves_other_tensors_to_fn() -> None:
    kept, other = torch.ones(1), torch.ones(2)
    fn = keep_float32(lambda t: t.half(), [kept])
    assert fn(kept).dtype == torch.float32 and fn(other).dtype == torch.float16
    assert fn(torch.ones(1)).dtype == torch.float16  # identity, not value, decides


def test_export_of_module_with_quantizer() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = Quantizer("act", signed=False, bits=8.0, name="in")

        def forward(self, x: Tensor) -> Tensor:
            return self.q(torch.relu(x)) * 2

    m = M()
    x = torch.randn(3, 4)
    ep = torch.export.export(m, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.geta.quantize.default) == 1
    torch.testing.assert_close(ep.module()(x), m(x))


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------
class _QLinear(nn.Module):
    """input --act Quantizer--> linear(weight Quantizer(W))"""

    def __init__(self, cin: int, cout: int, name: str) -> None:
        super().__init__()
        self.lin = nn.Linear(cin, cout)
        self.wq = Quantizer("weight", name=f"{name}.weight").init_from_tensor(self.lin.weight, 8)
        self.aq = Quantizer("act", bits=6.0, q_m=0.01, name=f"{name}.input")

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.aq(x), self.wq(self.lin.weight), self.lin.bias)


class _Net(nn.Module):
    """x -> QLinear -> BN -> ReLU -> QLinear"""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = _QLinear(4, 8, "fc1")
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = _QLinear(8, 3, "fc2")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_calibrate_sets_unsigned_after_relu_and_q_m_from_data() -> None:
    torch.manual_seed(0)
    net = _Net()
    net.train()
    net.bn.eval()  # mixed modes must come back as they were
    batches = [torch.randn(16, 4) * 3 for _ in range(3)]
    bn_stats = net.bn.running_mean.clone()

    result = calibrate(net, batches)

    assert set(result) == {"fc1.aq", "fc2.aq"}
    q_m1, signed1 = result["fc1.aq"]
    assert signed1 is True and net.fc1.aq.signed is True
    assert q_m1 == pytest.approx(float(torch.cat(batches).abs().max()))
    q_m2, signed2 = result["fc2.aq"]
    assert signed2 is False and net.fc2.aq.signed is False
    # fc2's input is the float ReLU output (fc1's act quantizer passed through while observing)
    with torch.no_grad():
        net.eval()
        fc1 = net.fc1
        h = torch.cat([torch.relu(net.bn(nn.functional.linear(b, fc1.wq(fc1.lin.weight),
                                                               fc1.lin.bias)))
                       for b in batches])
    assert q_m2 == pytest.approx(float(h.max()), rel=1e-5)
    for q in (net.fc1.aq, net.fc2.aq):  # bit width kept
        assert math.isclose(bits_of(q), 6.0, abs_tol=1e-4)
        assert not q._forward_hooks
    assert net.fc1.wq.q_m.item() == pytest.approx(net.fc1.lin.weight.abs().max().item())
    net.train()
    net.bn.eval()
    assert net.training and net.fc1.training and not net.bn.training
    torch.testing.assert_close(net.bn.running_mean, bn_stats)


def test_calibrate_restores_modes_on_error_and_checks_inputs() -> None:
    net = _Net().train()
    with pytest.raises(RuntimeError):
        calibrate(net, [torch.randn(2, 5)])  # wrong feature size
    assert all(m.training for m in net.modules())
    assert not net.fc1.aq._forward_hooks
    with pytest.raises(InputError, match="percentile"):
        calibrate(net, [torch.randn(2, 4)], percentile=0.0)
    with pytest.raises(InputError, match="no batches"):
        calibrate(net, [])
    assert calibrate(nn.Linear(2, 2), [torch.randn(1, 2)]) == {}


def test_calibrate_percentile_and_batch_forms() -> None:
    q = Quantizer("act", bits=8.0, name="solo")
    model = nn.Sequential(q)
    data = torch.arange(1, 101, dtype=torch.float32)  # |x| = 1..100, non-negative
    res = calibrate(model, [(data,), {"input": data}], percentile=90.0)
    assert res == {"0": (pytest.approx(90.0), False)}
    assert math.isclose(bits_of(q), 8.0, abs_tol=1e-4)
    res = calibrate(model, [torch.cat([data, -torch.tensor([500.0, float("inf")])])])
    assert res["0"] == (pytest.approx(500.0), True)
