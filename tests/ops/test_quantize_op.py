"""geta::quantize / geta::quantize_backward: reference semantics, fake, autograd, export.

    x --geta::quantize(d, q_m, t, signed)--> y        backward: geta::quantize_backward

Oracle triad (extension-cpp style): values against hand-computed / float64 re-implementations,
gradients against a differentiable float64 surrogate and finite differences, and opcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import geta_fx.ops as ops
from geta_fx.ops.reference import quantize_backward_reference, quantize_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF, NAN = float("inf"), float("nan")


def scalars(d: float, q_m: float, t: float, shape: tuple[int, ...] = (1,),
            requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(  # type: ignore[return-value]
        torch.full(shape, v, dtype=torch.float32, requires_grad=requires_grad)
        for v in (d, q_m, t))


def count_calls(gm: torch.fx.GraphModule, target: object) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


# ---------------------------------------------------------------------------------------------
# forward values
# ---------------------------------------------------------------------------------------------
WORKED_X = [-0.7, -0.05, 0.0, 0.12, 0.5, 1.3, 2.5]


@pytest.mark.parametrize(("t", "expected"), [
    (1.0, [-0.7, -0.0, 0.0, 0.1, 0.5, 1.0, 1.0]),
    (1.5, [-0.6, -0.0, 0.0, 0.0, 0.4, 1.0, 1.0]),
])
def test_worked_example_spec_a2(t: float, expected: list[float]) -> None:
    """GETA_SPEC §A.2 worked example, d = 0.1, q_m = 1 (|-0.05|/0.1 = 0.5 rounds to even 0)."""
    y = ops.quantize(torch.tensor(WORKED_X), *scalars(0.1, 1.0, t))
    torch.testing.assert_close(y, torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.signbit(y[1])  # sign(x) * 0 keeps the sign, as in the reference


def test_linear_is_exact_float32_arithmetic() -> None:
    """t == 1 uses no exp/log: y == round(min(|x|,q_m)/d)*d bit for bit (kernels must match)."""
    x = torch.randn(4096) * 2
    d, q_m, t = scalars(0.037, 1.3, 1.0)
    expected = torch.sign(x) * torch.round(torch.minimum(x.abs(), q_m) / d) * d
    assert torch.equal(ops.quantize(x, d, q_m, t), expected)


def test_unsigned_worked_example() -> None:
    y = ops.quantize(torch.tensor(WORKED_X), *scalars(0.1, 1.0, 1.0), signed=False)
    torch.testing.assert_close(y, torch.tensor([0, 0, 0, 0.1, 0.5, 1.0, 1.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("d", "q_m", "t"), [(0.1, 1.0, 1.0), (1e-8, 0.5, 1.7), (1e3, 1.0, 0.6),
                                             (0.3, 1e-10, 1.0), (0.1, 0.0, 1.0)])
def test_zero_maps_to_exact_zero(dtype: torch.dtype, signed: bool, d: float, q_m: float,
                                 t: float) -> None:
    x = torch.tensor([0.0, -0.0, 0.0], dtype=dtype)
    y = ops.quantize(x, *scalars(d, q_m, t), signed=signed)
    assert y.dtype == dtype
    assert torch.equal(y, torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_matches_float32_on_upcast_input(dtype: torch.dtype) -> None:
    x = (torch.randn(257) * 2).to(dtype)
    params = scalars(0.05, 1.5, 1.2)
    y = ops.quantize(x, *params)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, ops.quantize(x.float(), *params).to(dtype))


def test_nan_propagates_and_inf_saturates() -> None:
    x = torch.tensor([NAN, INF, -INF, 0.0, 3.0, -3.0])
    d, q_m, t = scalars(0.1, 1.0, 1.5)
    y = ops.quantize(x, d, q_m, t)
    assert torch.isnan(y[0])
    torch.testing.assert_close(y[1:], torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0]))
    yu = ops.quantize(x, d, q_m, t, signed=False)
    assert torch.isnan(yu[0])
    torch.testing.assert_close(yu[1:], torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]))


def test_edge_values_tiny_and_huge_step() -> None:
    x = torch.tensor([0.0, 0.3, -1.0, 1.0, 2.0, -5.0])
    # tiny d: essentially sign(x) * min(|x|, q_m)^t
    y = ops.quantize(x, *scalars(1e-8, 1.0, 1.0))
    torch.testing.assert_close(y, torch.tensor([0.0, 0.3, -1.0, 1.0, 1.0, -1.0]), atol=1e-7,
                               rtol=0)
    y = ops.quantize(x, *scalars(1e-8, 1.0, 2.0))
    torch.testing.assert_close(y, torch.tensor([0.0, 0.09, -1.0, 1.0, 1.0, -1.0]), atol=1e-6,
                               rtol=0)
    # huge d: every level rounds to 0
    y = ops.quantize(x, *scalars(1e3, 1.0, 1.0))
    assert torch.equal(y.abs(), torch.zeros(6))
    # |x| == q_m gives the saturated level, same as |x| > q_m (no 1e-6 quirk)
    y = ops.quantize(torch.tensor([0.7, 0.7000001, 9.0]), *scalars(0.2, 0.7, 1.3))
    assert y[0] == y[1] == y[2]


@pytest.mark.parametrize("param_shape", [(), (1,)])
def test_scalar_shapes_and_zero_dim_x(param_shape: tuple[int, ...]) -> None:
    params = scalars(0.1, 1.0, 1.0, shape=param_shape)
    y = ops.quantize(torch.tensor(0.26), *params)
    assert y.shape == () and torch.isclose(y, torch.tensor(0.3))
    assert ops.quantize(torch.empty(0, 3), *params).shape == (0, 3)


def test_output_strides_follow_empty_like() -> None:
    x = torch.randn(6, 4).t()
    y = ops.quantize(x, *scalars(0.1, 1.0, 1.0))
    assert y.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(y, ops.quantize(x.contiguous(), *scalars(0.1, 1.0, 1.0)))


@pytest.mark.parametrize("bad", [
    lambda x, d, q, t: (x.double(), d, q, t),
    lambda x, d, q, t: (x, d.double(), q, t),
    lambda x, d, q, t: (x, d, torch.ones(2), t),
    lambda x, d, q, t: (x.int(), d, q, t),
])
def test_rejects_bad_dtypes_and_shapes(bad) -> None:  # type: ignore[no-untyped-def]
    args = bad(torch.randn(3), *scalars(0.1, 1.0, 1.0))
    with pytest.raises(RuntimeError, match="geta::quantize"):
        ops.quantize(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:  # fake impl rejects the same
        fargs = tuple(mode.from_tensor(a) for a in args)
        with pytest.raises(RuntimeError, match="geta::quantize"):
            ops.quantize(*fargs)


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=32),
    d=st.floats(1e-3, 1.0), q_m=st.floats(0.05, 3.0), t=st.floats(0.5, 2.0),
    signed=st.booleans(),
)
def test_properties(xs: list[float], d: float, q_m: float, t: float, signed: bool) -> None:
    """Levels are integer multiples of d, bounded by the saturated level, sign-preserving and
    monotone in x."""
    x = torch.tensor(sorted(xs))
    dd, qq, tt = scalars(d, q_m, t)
    y = ops.quantize(x, dd, qq, tt, signed=signed)
    top = quantize_reference(torch.tensor([INF]), dd, qq, tt, signed)
    assert (y.abs() <= top + 1e-6).all()
    k = y / dd
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert (y * x >= 0).all()
    if not signed:
        assert (y >= 0).all()
    assert (y[1:] >= y[:-1]).all()


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def surrogate64(x: Tensor, d: Tensor, q_m: Tensor, t: Tensor, signed: bool) -> Tensor:
    """Differentiable float64 model of the op whose autograd gradients are the contract's
    surrogate gradients (STE via detach); its value equals the op's forward."""
    x, d, q_m, t = (v.double() for v in (x, d, q_m, t))
    a = x.detach().abs()
    s = torch.sign(x.detach()) if signed else (x.detach() > 0).double()
    clipped = a > q_m.detach()
    m = torch.where(clipped, q_m, a)  # depends on q_m only where clipped
    m_safe = torch.where(m > 0, m, torch.ones_like(m))
    c = torch.where(m > 0, m_safe ** t, torch.zeros_like(m))
    r = c / d
    r_ste = r + (torch.round(r) - r).detach()
    y = s * d * r_ste
    passes = ~clipped if signed else ~clipped & (x.detach() >= 0)
    return y + torch.where(passes, x - x.detach(), torch.zeros_like(x))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("d", "q_m", "t"), [(0.05, 1.2, 1.0), (0.02, 0.8, 1.4),
                                             (1e-8, 1.0, 0.7), (1e3, 1.0, 1.0)])
def test_autograd_matches_float64_surrogate(signed: bool, d: float, q_m: float, t: float) -> None:
    x = torch.cat([torch.randn(500) * 1.5,
                   torch.tensor([0.0, q_m, -q_m, 3 * q_m, -3 * q_m])]).requires_grad_()
    params = scalars(d, q_m, t, requires_grad=True)
    g = torch.randn(x.shape)
    (ops.quantize(x, *params, signed=signed) * g).sum().backward()

    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    (surrogate64(x64, *p64, signed=signed) * g.double()).sum().backward()

    assert torch.equal(x.grad, x64.grad.float())  # masks: exact
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.shape == (1,)
    if d < 1e-6:
        # c/d ~ 1e8 has no fractional bits in float32, so round(r) - r is (correctly) ~0 there
        # while float64 still sees the fraction: only the bound |grad_d| <= sum|g|/2 is common.
        assert float(params[0].grad.abs()) <= 0.5 * float(g.abs().sum())
        params, p64 = params[1:], p64[1:]
    for p, p_ref in zip(params, p64, strict=True):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-4, atol=1e-4)


def test_grad_x_masks_at_boundaries() -> None:
    """STE: 1 for |x| <= q_m (x = 0 and |x| == q_m included), 0 beyond; unsigned: 0 for x < 0."""
    x = torch.tensor([0.0, 0.3, -0.3, 1.0, -1.0, 1.5, -1.5, INF]).requires_grad_()
    params = scalars(0.1, 1.0, 1.3)
    ops.quantize(x, *params).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0]))
    x.grad = None
    ops.quantize(x, *params, signed=False).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1, 0, 1, 0, 0, 0, 0]))


def test_grad_q_m_only_from_strictly_clipped() -> None:
    """d/dq_m = sign(x) * t * q_m^(t-1) summed over |x| > q_m; |x| == q_m does not count."""
    x = torch.tensor([0.5, 1.0, -1.0, 2.0, 3.0, -4.0])
    d, q_m, t = scalars(0.01, 1.0, 1.5, requires_grad=True)
    ops.quantize(x, d, q_m, t).sum().backward()
    torch.testing.assert_close(q_m.grad, torch.tensor([1.5 * (1 + 1 - 1)]))


def test_backward_nan_poisons_parameter_grads() -> None:
    x = torch.tensor([NAN, 0.5, 2.0]).requires_grad_()
    params = scalars(0.1, 1.0, 1.2, requires_grad=True)
    ops.quantize(x, *params).sum().backward()
    assert torch.isnan(x.grad[0]) and torch.equal(x.grad[1:], torch.tensor([1.0, 0.0]))
    assert all(torch.isnan(p.grad).all() for p in params)


def test_backward_edge_values_are_finite() -> None:
    x = torch.tensor([0.0, -0.0, 1e-30, 0.5, 1.0, 2.0, -INF, INF])
    for d, q_m, t in [(1e-8, 1.0, 1.0), (1e3, 1.0, 2.0), (0.1, 1.0, 0.3), (0.1, 0.0, 1.0)]:
        for signed in (True, False):
            gx, gd, gq, gt = torch.ops.geta.quantize_backward(
                torch.ones_like(x), x, *scalars(d, q_m, t), signed)
            assert all(torch.isfinite(v).all() for v in (gx, gd, gq, gt)), (d, q_m, t, signed)


def _finite_difference(f, v: Tensor, eps: float) -> float:  # type: ignore[no-untyped-def]
    return (float(f(v + eps)) - float(f(v - eps))) / (2 * eps)


@pytest.mark.parametrize("signed", [True, False])
def test_grad_t_and_q_m_match_finite_differences(signed: bool) -> None:
    """With d tiny, y ~ s * min(|x|, q_m)^t is smooth in t and in q_m (x kept away from q_m),
    so the surrogate gradients are the true derivatives there."""
    torch.manual_seed(0)
    x = torch.cat([torch.rand(64) * 0.8 + 0.1, -(torch.rand(64) * 0.8 + 0.1),
                   torch.rand(32) + 1.3, -(torch.rand(32) + 1.3)])
    d, q_m, t = scalars(1e-7, 1.1, 1.3, requires_grad=True)
    g = torch.randn(x.shape)
    (ops.quantize(x, d, q_m, t, signed=signed) * g).sum().backward()

    def loss_t(tv: Tensor) -> Tensor:
        return (ops.quantize(x, d.detach(), q_m.detach(), tv, signed=signed) * g).sum()

    def loss_q(qv: Tensor) -> Tensor:
        return (ops.quantize(x, d.detach(), qv, t.detach(), signed=signed) * g).sum()

    fd_t = _finite_difference(loss_t, t.detach(), 1e-2)
    fd_q = _finite_difference(loss_q, q_m.detach(), 1e-2)
    assert math.isclose(float(t.grad), fd_t, rel_tol=2e-3, abs_tol=2e-3)
    assert math.isclose(float(q_m.grad), fd_q, rel_tol=2e-3, abs_tol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_backward_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(33, dtype=dtype, requires_grad=True)
    params = scalars(0.1, 1.0, 1.2, requires_grad=True)
    ops.quantize(x, *params).sum().backward()
    assert x.grad.dtype == dtype
    assert all(p.grad.dtype == torch.float32 for p in params)
    gx, *_ = quantize_backward_reference(torch.ones(33), x.detach().float(),
                                         *(p.detach() for p in params), True)
    assert torch.equal(x.grad, gx.to(dtype))


# ---------------------------------------------------------------------------------------------
# opcheck and export
# ---------------------------------------------------------------------------------------------
def _quantize_samples() -> list[tuple[tuple[object, ...], str]]:
    g = torch.Generator().manual_seed(0)
    samples: list[tuple[tuple[object, ...], str]] = []
    for dtype in DTYPES:
        for signed in (True, False):
            x = (torch.randn(4, 5, generator=g) * 1.5).to(dtype).requires_grad_()
            params = scalars(0.1, 1.0, 1.3, requires_grad=True)
            samples.append(((x, *params, signed), f"{dtype}-{signed}"))
    x = torch.randn(6, 4, generator=g)
    samples.append(((x.t().requires_grad_(), *scalars(0.2, 0.9, 1.0), True), "transposed"))
    samples.append(((x[:, ::2].detach().requires_grad_(), *scalars(0.2, 0.9, 1.0), True),
                    "sliced"))
    samples.append(((torch.empty(0, 3, requires_grad=True),
                     *scalars(0.1, 1.0, 1.0, requires_grad=True), True), "empty"))
    samples.append(((torch.tensor(0.4, requires_grad=True),
                     *scalars(0.1, 1.0, 1.0, shape=(), requires_grad=True), False), "0-dim"))
    return samples


@pytest.mark.parametrize(("args", "label"), _quantize_samples(),
                         ids=[label for _, label in _quantize_samples()])
def test_opcheck_quantize(args: tuple[object, ...], label: str) -> None:
    torch.library.opcheck(torch.ops.geta.quantize.default, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
def test_opcheck_quantize_backward(dtype: torch.dtype, signed: bool) -> None:
    x = (torch.randn(3, 7) * 1.5).to(dtype)
    grad_y = torch.randn(3, 7).to(dtype)
    torch.library.opcheck(torch.ops.geta.quantize_backward.default,
                          (grad_y, x, *scalars(0.1, 1.0, 1.3), signed))


def test_opcheck_quantize_backward_expanded_grad_and_empty() -> None:
    x = torch.randn(4, 3)
    torch.library.opcheck(torch.ops.geta.quantize_backward.default,
                          (torch.ones(()).expand(4, 3), x, *scalars(0.1, 1.0, 1.0), True))
    torch.library.opcheck(torch.ops.geta.quantize_backward.default,
                          (torch.empty(0), torch.empty(0), *scalars(0.1, 1.0, 1.0, shape=()),
                           False))


class _QuantLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.d = torch.nn.Parameter(torch.tensor([0.05]))
        self.q_m = torch.nn.Parameter(torch.tensor([1.0]))
        self.t = torch.nn.Parameter(torch.tensor([1.2]))

    def forward(self, x: Tensor) -> Tensor:
        w = ops.quantize(self.lin.weight, self.d, self.q_m, self.t)
        xq = ops.quantize(torch.relu(x), self.d, self.q_m, self.t, signed=False)
        return torch.nn.functional.linear(xq, w, self.lin.bias)


def test_export_keeps_quantize_op() -> None:
    model = _QuantLinear()
    x = torch.randn(2, 4)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert count_calls(ep.graph_module, torch.ops.geta.quantize.default) == 2
    ep = ep.run_decompositions()
    assert count_calls(ep.graph_module, torch.ops.geta.quantize.default) == 2
    x5 = torch.randn(5, 4)
    torch.testing.assert_close(ep.module()(x5), model(x5))
