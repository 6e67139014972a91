"""Reduced precision (issue 11 point 6): GetaModule, slim and lowered models in fp16 / bf16.

    model.to(dtype) / torch.autocast(cpu, bf16)  ==>  runs, activations in the model's dtype,
                                                     quantizer scalars still exact float32,
                                                     output = the float32 model's to that
                                                     dtype's tolerance

The float32 GetaModule is the oracle.  Quantizers are set to 4-6 bits first, so lowering packs
every weight (conv: ``unpack_weight``; linear: ``lowbit_linear``) instead of freezing it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import max_rel_err
from torch import nn

import geta_fx
from geta_fx import ops
from geta_fx.ops.lowbit import pack_levels
from geta_fx.optim import QASSO

geta = torch.ops.geta

HALF = (torch.float16, torch.bfloat16)
#: max |y - y32| / max |y32| allowed, per quantize mode and dtype.  Unquantized: a few of the
#: dtype's ulps.  Quantized: where the dtype's rounding moves a weight (or activation) across a
#: rounding boundary of its quantizer, it lands one level ``d`` away, and at 4-6 bits one level
#: is 2-14 % of the range, so the bound is that of a few flipped levels.  (Measured on this
#: model: None 6e-4 / 3e-3, weight 2e-3 / 1.2e-2, weight_act 1.4e-2 / 2.5e-2 for fp16 / bf16.)
TOL = {None: {torch.float16: 2e-3, torch.bfloat16: 1e-2},
       "weight": {torch.float16: 1e-2, torch.bfloat16: 4e-2},
       "weight_act": {torch.float16: 4e-2, torch.bfloat16: 6e-2}}


class ConvNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear -> ReLU -> linear (both lowering paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _models(quantize: str | None) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """{"gm", "slim", "lowered"} (no "lowered" without quantizers), in eval mode, float32."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    gm = geta_fx.transform(ConvNet().eval(), (x,), quantize=quantize)
    if quantize == "weight_act":
        geta_fx.calibrate(gm, [x])
    for i, q in enumerate(gm.quantizers.values()):
        q.set_bit_width(4.0 + i % 3)
    gm.zero_units(next(g.id for g in gm.groups if g.prunable), [0, 1])
    gm.eval()
    models: dict[str, nn.Module] = {"gm": gm, "slim": gm.compress()}
    if quantize is not None:
        models["lowered"] = gm.compress(lower=True)
    return models, x


def _float32_scalars(m: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer scalar and every float32 op constant of a lowered holder."""
    out = {n: p.detach().clone() for n, p in m.named_parameters()
           if n.rsplit(".", 1)[-1] in ("log_d", "log_q_m", "t") and "geta_quant" in n}
    out |= {n: b.clone() for n, b in m.named_buffers()
            if "geta_lowbit" in n and n.rsplit(".", 1)[-1] in ("scale", "d", "q_m", "t")}
    return out


def _lowered_ops(m: nn.Module) -> set[object]:
    return {n.target for n in m.graph.nodes if n.op == "call_function"}  # type: ignore[union-attr]


@pytest.mark.parametrize("quantize", [None, "weight", "weight_act"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_to_dtype_runs_and_matches_float32(quantize: str | None, dtype: torch.dtype) -> None:
    models, x = _models(quantize)
    y32 = models["gm"](x)
    if "lowered" in models:  # both lowering paths are exercised
        assert {geta.unpack_weight.default, geta.lowbit_linear.default} <= _lowered_ops(
            models["lowered"])
    for name, m in models.items():
        scalars = _float32_scalars(m)
        assert bool(scalars) == (quantize is not None), name
        half = copy.deepcopy(m).to(dtype)
        for k, v in _float32_scalars(half).items():  # exact float32, not rounded through dtype
            assert v.dtype == torch.float32 and torch.equal(v, scalars[k]), (name, k)
        others = [p for n, p in half.named_parameters() if "geta_quant" not in n]
        assert others and all(p.dtype == dtype for p in others), name
        y = half(x.to(dtype))
        assert y.dtype == dtype, name
        err = max_rel_err(y, y32)
        assert err < TOL[quantize][dtype], (name, err)


@pytest.mark.parametrize("quantize", [None, "weight", "weight_act"])
def test_autocast_bf16_matches_float32(quantize: str | None) -> None:
    models, x = _models(quantize)
    y32 = models["gm"](x)
    outs = {}
    for name, m in models.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[name] = m(x)
        assert outs[name].dtype == torch.bfloat16, name  # the last layer is a linear
        assert max_rel_err(outs[name], y32) < TOL[quantize][torch.bfloat16], name
    if "lowered" in outs:
        # lowbit_linear follows aten.linear's autocast rule: same inputs, same bf16 math
        assert max_rel_err(outs["lowered"], outs["slim"]) < 1e-2


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lowered_model_unpacks_in_its_current_dtype(dtype: torch.dtype) -> None:
    """After ``.to(dtype)`` the unpacked conv weight is the float32 one rounded once to dtype."""
    models, _ = _models("weight")
    low32 = models["lowered"]
    low = copy.deepcopy(low32).to(dtype)
    likes = {n: b for n, b in low.named_buffers() if n.endswith(".dtype_like")}
    assert likes and all(b.dtype == dtype and b.numel() == 0 for b in likes.values())
    node = next(n for n in low.graph.nodes if n.target is geta.unpack_weight.default)
    (cast,) = node.users
    assert cast.target is torch.ops.aten.type_as.default and cast.args[0] is node

    def unpacked(m: nn.Module) -> torch.Tensor:
        packed, scale, bits, signed, shape, dt = node.args
        w = geta.unpack_weight.default(m.get_buffer(packed.target), m.get_buffer(scale.target),
                                       bits, signed, shape, dt)
        return w.type_as(m.get_buffer(cast.args[1].target))

    w32 = unpacked(low32)
    assert w32.dtype == torch.float32 and torch.equal(unpacked(low), w32.to(dtype))


def test_bf16_training_steps_flow_gradients_and_prune() -> None:
    """A bf16 GetaModule trains with QASSO through projection, pruning and cool-down."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 4, (8,))
    gm = geta_fx.transform(ConvNet().eval(), (x,), quantize="weight").to(torch.bfloat16).train()
    xb = x.to(torch.bfloat16)
    opt = QASSO(gm, variant="adam", lr=1e-2, lr_quant=1e-2, target_sparsity=0.4,
                bit_range=(4, 8), start_projection_step=1, projection_steps=2,
                projection_periods=2, start_pruning_step=3, pruning_steps=4, pruning_periods=2)
    for k in range(10):
        loss = F.cross_entropy(gm(xb).float(), y)
        opt.zero_grad()
        loss.backward()
        for n, p in gm.named_parameters():
            is_q = "geta_quant" in n
            assert p.dtype == (torch.float32 if is_q else torch.bfloat16), n
            assert p.grad is not None and p.grad.dtype == p.dtype, (k, n)
            assert torch.isfinite(p.grad).all(), (k, n)
        assert any(float(q.log_d.grad.abs()) > 0 for q in gm.quantizers.values()), k
        opt.step()
    m = opt.metrics()
    assert m["stage"] == "cooldown" and m["num_pruned"] == m["num_zero_units"] == m["K"] > 0
    assert 4 - 1e-4 <= m["bits_min"] <= m["bits_max"] <= 8 + 1e-4
    gm.validate()
    gm.eval()
    slim = gm.compress(lower=True)
    assert max_rel_err(slim(xb), gm(xb)) < TOL["weight"][torch.bfloat16]


def test_autocast_training_step_and_bf16_capture() -> None:
    """Mixed precision: weights and quantizer scalars stay float32, their grads too; a model
    captured in bf16 gets float32 quantizer scalars and lowers exactly."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 4, (8,))
    gm = geta_fx.transform(ConvNet().eval(), (x,), quantize="weight_act").train()
    opt = QASSO(gm, variant="adam", lr=1e-2, lr_quant=1e-2, target_sparsity=0.3,
                start_pruning_step=1, pruning_steps=2, pruning_periods=1)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gm(x)
        assert out.dtype == torch.bfloat16
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        for n, p in gm.named_parameters():
            assert p.dtype == torch.float32 and p.grad is not None, n
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
        opt.step()
    assert opt.metrics()["num_pruned"] == opt.k_target > 0
    gm.validate()

    model = ConvNet().eval().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    gmb = geta_fx.transform(model, (xb,), quantize="weight")
    assert all(p.dtype == torch.float32 for q in gmb.quantizers.values() for p in q.parameters())
    for q in gmb.quantizers.values():
        q.set_bit_width(5.0)
    gmb.eval()
    yb = gmb(xb)
    assert yb.dtype == torch.bfloat16
    # same bf16 weights; a fused low-bit kernel may round its bf16 matmul differently
    assert max_rel_err(gmb.compress(lower=True)(xb), yb) < 1e-2


# ------------------------------------------------------------------------------ negative cases
def test_ops_still_require_float32_scalars() -> None:
    """The op contract is unchanged: it is the modules that keep their scalars float32."""
    x = torch.randn(8, dtype=torch.float16)
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match="d must be float32, got Half"):
        ops.quantize(x, one.half(), one, one)
    packed = torch.zeros(4, 2 * 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        geta.lowbit_linear.default(torch.randn(2, 16), packed, one.bfloat16(), 4, 16, True, None)


def test_lowbit_bias_dtype_checked_outside_autocast() -> None:
    """The autocast rule casts the bias only under autocast; outside it a mismatch is named."""
    packed = pack_levels(torch.ones(4, 16), 4, True)  # every weight = level 1 * scale 1
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    bias = torch.randn(4)
    with pytest.raises(RuntimeError, match="bias dtype Float != x dtype BFloat16"):
        geta.lowbit_linear.default(x, packed, torch.ones(1), 4, 16, True, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = geta.lowbit_linear.default(x, packed, torch.ones(1), 4, 16, True, bias)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, torch.ones(4, 16, dtype=torch.bfloat16), bias.bfloat16()))
