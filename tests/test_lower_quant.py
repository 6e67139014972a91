"""lower_quant: fake-quant weights -> packed integer levels + geta low-bit ops (issue #7).

    W -> Q_w -> linear(x, ., b)     ==>   packed, scale -> geta.lowbit_linear(x, ., ., b)
    W -> Q_w -> conv2d(x, ., ...)   ==>   packed, scale -> geta.unpack_weight
                                          -> type_as(., dtype_like) -> conv2d
    x -> Q_a -> ...                 ==>   geta.quantize(x, d, q_m, t) (frozen buffers)

Dequantized weights must equal the fake-quant weights bit for bit (torch.equal), so lowered and
fake-quant slim models agree up to the float rounding of a fused matmul.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import max_rel_err
from torch.testing import FileCheck

import geta_fx
from geta_fx.errors import InputError, PipelineOrderError
from geta_fx.ir import meta
from geta_fx.ir.query import count_calls, get_attr_tensor
from geta_fx.ops.lowbit import lowbit_linear_reference, unpack_weight_reference
from geta_fx.passes.lower_quant import HOLDER, LOWBIT, LowbitHolder, LowerQuant, adopt_holders
from geta_fx.pipeline import PassResult, Pipeline

geta = torch.ops.geta


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(h)).mean((2, 3)))


class TiedLM(nn.Module):
    """Tied embedding / output head: one weight read by embedding (unpacked) and linear (fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 10)
        self.mix = nn.Linear(10, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(self.mix(self.emb(idx))), self.emb.weight)


def _slim(model: nn.Module, x: torch.Tensor, bits: list[float], mode: str = "weight",
          t: float | None = None) -> tuple[geta_fx.GetaModule, torch.fx.GraphModule]:
    gm = geta_fx.transform(model.eval(), (x,), quantize=mode)
    for i, q in enumerate(q for q in gm.quantizers.values() if q.kind == "weight"):
        if t is not None:
            with torch.no_grad():
                q.t.fill_(t)
        q.set_bit_width(bits[i % len(bits)])
    gm.eval()
    return gm, gm.compress()


def _lower(gm: torch.fx.GraphModule, **options: object) -> PassResult:
    """Run the pass on its own (as a Pipeline would: then recompile)."""
    res = LowerQuant(**options)(gm)  # type: ignore[arg-type]
    res.graph_module.recompile()
    return res


def _lowered_weights(low: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """param FQN -> dequantized weight, from the holder buffers through the reference."""
    out = {}
    for rec in low.meta[LOWBIT]:
        if rec.mode != "packed":
            continue
        holder = getattr(getattr(low, HOLDER), rec.qid)
        out[rec.param] = unpack_weight_reference(holder.packed, holder.scale, rec.bits,
                                                 rec.signed, list(rec.shape),
                                                 getattr(torch, rec.dtype))
    return out


def _fake_quant_weights(slim: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {q.param_fqn: q(get_attr_tensor(slim, q.param_fqn))
                for q in slim.modules() if getattr(q, "kind", None) == "weight"}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("t", [1.0, 1.37])
def test_dequantized_weight_equals_fake_quant_bit_for_bit(bits: int, t: float) -> None:
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Linear(37, 11))
    x = torch.randn(2, 4, 37) * 0.3
    _, slim = _slim(model, x, [bits], t=t)
    expected = _fake_quant_weights(slim)
    low = _lower(copy.deepcopy(slim)).graph_module
    (rec,) = low.meta[LOWBIT]
    assert rec.mode == "packed" and rec.bits == bits and rec.max_level == 2 ** (bits - 1) - 1
    assert rec.stored_bytes == 11 * math.ceil(37 / 8) * bits
    got = _lowered_weights(low)
    assert torch.equal(got["0.weight"], expected["0.weight"])
    # the dispatched op (the CPU kernel where built) dequantizes bit-exactly too
    holder = getattr(getattr(low, HOLDER), rec.qid)
    kernel = geta.unpack_weight.default(holder.packed, holder.scale, bits, True, [11, 37],
                                        torch.float32)
    assert torch.equal(kernel, expected["0.weight"])
    # the reference low-bit linear is the fake-quant linear, bit for bit
    ref = lowbit_linear_reference(x, holder.packed, holder.scale, bits, 37, True,
                                  slim.get_parameter("0.bias"))
    assert torch.equal(ref, slim(x))


def test_linear_layers_become_lowbit_linear() -> None:
    from zoo import MLP

    x = torch.randn(4, 12)
    _, slim = _slim(MLP(), x, [4, 3, 8])
    expected = slim(x)
    res = _lower(slim)
    low = res.graph_module
    assert res.modified and low is slim
    assert count_calls(low, geta.lowbit_linear.default) == 3
    assert count_calls(low, torch.ops.aten.linear.default) == 0
    assert not [m for m in low.modules() if getattr(m, "is_geta_quantizer", False)]
    assert not any(n.op == "call_module" and str(n.target).startswith("geta_quant")
                   for n in low.graph.nodes)
    params = dict(low.named_parameters())
    assert "fc1.weight" not in params and "fc1.bias" in params  # the float weight is gone
    FileCheck().check("geta.lowbit_linear").check("geta.lowbit_linear").check(
        "geta.lowbit_linear").run(low.code)
    assert [r.bits for r in low.meta[LOWBIT]] == [4, 3, 8]
    for node in low.graph.nodes:
        if node.op in ("call_function", "get_attr"):
            assert isinstance(node.meta.get("val"), torch.Tensor), node.format_node()
        if node.target is geta.lowbit_linear.default:
            assert node.meta["nn_module_stack"] and node.meta[meta.ORIGIN]
    torch.testing.assert_close(low(x), expected, rtol=1e-6, atol=1e-6)


def test_conv_reads_unpack_weight_and_matches_exactly() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm, slim = _slim(ConvNet(), x, [5, 2, 6])
    gm.zero_units(0, [1, 4, 5])
    slim = gm.compress()
    expected = slim(x)
    low = Pipeline([LowerQuant(fuse_linear=False)])(slim).graph_module
    assert count_calls(low, geta.unpack_weight.default) == 3
    assert count_calls(low, geta.lowbit_linear.default) == 0
    FileCheck().check("geta.unpack_weight").check("aten.type_as").check("aten.conv2d").run(
        low.code)
    assert count_calls(low, torch.ops.aten.type_as.default) == 3
    holders = list(getattr(low, HOLDER).children())
    assert len(holders) == 3 and all(isinstance(h, LowbitHolder) for h in holders)
    assert all(h.dtype_like.dtype == torch.float32 and h.dtype_like.numel() == 0
               for h in holders)
    assert low.meta[meta.LOG][-1].name == "lower_quant"
    assert torch.equal(low(x), expected)  # unpacked weights are bit-identical; same ATen ops


def test_wide_weights_stay_float_and_activations_are_frozen() -> None:
    from zoo import MLP

    x = torch.randn(4, 12)
    gm, slim = _slim(MLP(), x, [12, 4, 9], mode="weight_act")
    acts = [q for q in gm.quantizers.values() if q.kind == "act"]
    expected = slim(x)
    low = _lower(slim, max_bits=8).graph_module
    modes = {r.param: (r.mode, r.bits) for r in low.meta[LOWBIT]}
    assert modes == {"fc1.weight": ("float", 32), "fc2.weight": ("packed", 4),
                     "fc3.weight": ("float", 32)}
    assert count_calls(low, torch.ops.aten.linear.default) == 2  # float layers stay aten
    assert count_calls(low, geta.lowbit_linear.default) == 1
    assert count_calls(low, geta.quantize.default) == len(acts)
    assert torch.equal(low(x), _reference_run(low, x))
    torch.testing.assert_close(low(x), expected, rtol=1e-6, atol=1e-6)


def _reference_run(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """Run ``gm`` with geta low-bit ops replaced by their references (no kernel)."""
    table = {geta.lowbit_linear.default: lowbit_linear_reference,
             geta.unpack_weight.default: unpack_weight_reference}

    class Ref(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):  # type: ignore[no-untyped-def]
            return super().call_function(table.get(target, target), args, kwargs)

    out: torch.Tensor = Ref(gm).run(x)
    return out


def test_activation_quantizer_freezing_is_bit_exact() -> None:
    from zoo import MLP

    x = torch.randn(4, 12)
    _, slim = _slim(MLP(), x, [12], mode="weight_act")  # weights stay float: no fused matmul
    expected = slim(x)
    low = _lower(slim).graph_module
    assert count_calls(low, geta.quantize.default) == 3
    assert torch.equal(low(x), expected)


def test_tied_weight_packed_once_fused_and_unpacked() -> None:
    idx = torch.randint(0, 20, (3, 5))
    gm = geta_fx.transform(TiedLM().eval(), (idx,), quantize="weight", embedding=True, bits=4)
    slim = gm.compress()
    expected = slim(idx)
    low = _lower(slim).graph_module
    rec = {r.param: r for r in low.meta[LOWBIT]}["emb.weight"]
    assert rec.bits == 4 and {op for _, op in rec.users} == {"embedding.default", "linear.default"}
    assert count_calls(low, geta.lowbit_linear.default) == 2  # mix and the tied head
    assert count_calls(low, geta.unpack_weight.default) == 1  # the embedding
    assert "emb.weight" not in dict(low.named_parameters())
    torch.testing.assert_close(low(idx), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_converted_lowered_model_keeps_op_scalars_float32(dtype: torch.dtype) -> None:
    """``.to(dtype)``: holder scalars stay float32, the unpacked embedding follows dtype_like."""
    idx = torch.randint(0, 20, (3, 5))
    gm = geta_fx.transform(TiedLM().eval(), (idx,), quantize="weight", embedding=True, bits=4)
    low = _lower(gm.compress()).graph_module
    expected = low(idx)
    scalars = {n: b.clone() for n, b in low.named_buffers() if n.endswith(".scale")}
    half = copy.deepcopy(low).to(dtype)
    for n, b in half.named_buffers():
        if n in scalars:
            assert b.dtype == torch.float32 and torch.equal(b, scalars[n]), n
        elif n.endswith(".dtype_like"):
            assert b.dtype == dtype, n
    out = half(idx)  # embedding (unpacked, cast) -> lowbit_linear x2 in dtype
    assert out.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    assert float((out.float() - expected).abs().max()) < tol * float(expected.abs().max())
    # without LowbitHolder's float32 scalars the op refuses the converted model
    plain = copy.deepcopy(half)
    for h in getattr(plain, HOLDER).children():
        h.scale = h.scale.to(dtype)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        plain(idx)


def test_adopt_holders_makes_a_loaded_lowered_model_convertible(tmp_path) -> None:
    """``torch.export`` round trip: holders come back as plain modules; adopting them restores
    float32 op scalars under ``.half()`` (and ``dtype_like`` survives the export)."""
    x = torch.randn(2, 3, 8, 8)
    _, slim = _slim(ConvNet(), x, [5, 2, 6], mode="weight_act")
    low = Pipeline([LowerQuant()])(slim).graph_module
    geta_fx.save(low, tmp_path / "m.pt2")
    loaded = geta_fx.load(tmp_path / "m.pt2")
    assert count_calls(loaded, torch.ops.aten.type_as.default) == 2  # the two convs
    n_holders = len(list(getattr(loaded, HOLDER).children()))
    if not all(isinstance(h, LowbitHolder) for h in getattr(loaded, HOLDER).children()):
        with pytest.raises(RuntimeError, match="must be float32"):  # plain holders: rounded
            copy.deepcopy(loaded).half()(x.half())
    assert adopt_holders(loaded) in (0, n_holders) and adopt_holders(loaded) == 0
    keys = set(loaded.state_dict())
    expected = loaded(x)
    half = copy.deepcopy(loaded).half()
    assert set(half.state_dict()) == keys
    out = half(x.half())
    assert out.dtype == torch.float16
    assert max_rel_err(out, expected) < 4e-2  # activation levels at 2-6 bits may flip
    assert adopt_holders(nn.Linear(2, 2)) == 0


def test_unsigned_weight_quantizer() -> None:
    x = torch.randn(2, 9)
    model = nn.Linear(9, 4)
    with torch.no_grad():
        model.weight.abs_()
    gm = geta_fx.transform(model.eval(), (x,), quantize="weight")
    (q,) = gm.quantizers.values()
    q.signed = False
    q.set_bit_width(3)
    slim = gm.compress()
    expected = _fake_quant_weights(slim)["weight"]
    low = _lower(slim).graph_module
    (rec,) = low.meta[LOWBIT]
    assert (rec.signed, rec.bits, rec.max_level) == (False, 3, 7)
    assert torch.equal(_lowered_weights(low)["weight"], expected)


def test_idempotent_honest_and_negative_case() -> None:
    from zoo import MLP

    x = torch.randn(4, 12)
    _, slim = _slim(MLP(), x, [4])
    low = _lower(slim).graph_module
    code = low.code
    again = LowerQuant()(low)
    assert again.modified is False and low.code == code
    plain = geta_fx.transform(MLP().eval(), (x,)).compress()  # no quantizers at all
    code = plain.code
    res = LowerQuant()(plain)
    assert res.modified is False and plain.code == code and LOWBIT not in plain.meta


def test_order_error_without_quantizers_and_config_checks() -> None:
    from zoo import MLP

    x = torch.randn(4, 12)
    plain = geta_fx.transform(MLP().eval(), (x,)).compress()
    with pytest.raises(PipelineOrderError, match="lower_quant requires"):
        Pipeline([LowerQuant()])(plain)
    with pytest.raises(InputError):
        LowerQuant(max_bits=9)


def test_lowered_graph_exports_with_geta_ops() -> None:
    from zoo import MLP

    x = torch.randn(4, 12)
    _, slim = _slim(MLP(), x, [4, 3], mode="weight_act")
    low = _lower(slim).graph_module
    ep = torch.export.export(low, (x,), strict=False)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert {geta.lowbit_linear.default, geta.quantize.default} <= targets
    packed = [v for k, v in ep.state_dict.items() if k.endswith("packed")]
    assert packed and all(p.dtype == torch.uint8 for p in packed)
    torch.testing.assert_close(ep.module()(x), low(x), rtol=0, atol=0)


def test_max_bits_matches_the_packed_format() -> None:
    from geta_fx.passes import lower_quant

    from geta_fx.ops import lowbit

    assert lower_quant.MAX_BITS == lowbit.MAX_BITS == LowerQuant().max_bits
