"""lower_act (issue #12 item 4): frozen activation quantizers as ``geta::quantize.table``.

    x -> geta::quantize(x, d, q_m, t, s)   ==>   geta::quantize.table(x, d, q_m, t, s, scale,
                                                                       bounds, base)

The table op must equal ``geta::quantize`` bit for bit (signs of zero and NaN included), so a
lowered ``quantize="weight_act"`` slim model computes exactly what the fake-quant slim graph does.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geta_fx
from geta_fx import deploy
from geta_fx.errors import InputError, NodeError
from geta_fx.ops import quantize_table as qt
from geta_fx.ops.quantize_table import build_table, quantize_table_reference
from geta_fx.passes.lower_act import ACT_TABLE, LowerActTable

geta = torch.ops.geta
EDGES = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 1e30, -1e30]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


def consts(d: float, q_m: float, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor([d]), torch.tensor([q_m]), torch.tensor([t]))


def table_args(d: torch.Tensor, q_m: torch.Tensor, t: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tab = build_table(d, q_m, t)
    return tab.scale, tab.bounds, tab.base


def sample(n: int, q_m: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * q_m * 0.8
    k = min(n, len(EDGES) + 2)
    x[:k] = torch.tensor(EDGES + [q_m, -q_m])[:k]
    return x


# (d, q_m, t): 8-bit unsigned act-like, t far from 1, the exact linear case, 2-level, wide t
PARAMS = [(0.0298, 7.52, 0.99975), (0.0223, 2.82, 1.00723), (0.05, 3.0, 1.0),
          (0.4, 1.0, 1.3), (0.0404, 9.26, 1.14375), (0.001, 0.5, 0.7)]


@pytest.mark.parametrize(("d", "q_m", "t"), PARAMS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 100_003])
def test_table_equals_quantize_bitwise(d: float, q_m: float, t: float, signed: bool,
                                       n: int) -> None:
    seed = n + int(signed)
    dd, qq, tt = consts(d, q_m, t)
    x = sample(n, q_m, seed)
    tab = table_args(dd, qq, tt)
    want = geta.quantize(x, dd, qq, tt, signed)
    got = geta.quantize.table(x, dd, qq, tt, signed, *tab)
    ref = quantize_table_reference(x, dd, qq, tt, signed, *tab)
    assert torch.equal(bits(got), bits(want)), f"seed {seed}"
    assert torch.equal(bits(ref), bits(want)), f"seed {seed}"


def test_table_near_every_threshold() -> None:
    """Every float32 within 3 ulp of each threshold, both signs: the step is where the
    quantizer puts it."""
    dd, qq, tt = consts(0.0404, 9.26, 1.14375)
    tab = build_table(dd, qq, tt)
    thr = tab.bounds[tab.bounds != 0x7F800000].long()
    m = (thr[:, None] + torch.arange(-3, 4)).reshape(-1).to(torch.int32).view(torch.float32)
    x = torch.cat([m, -m])
    for signed in (True, False):
        assert torch.equal(bits(geta.quantize.table(x, dd, qq, tt, signed, tab.scale, tab.bounds,
                                                    tab.base)),
                           bits(geta.quantize(x, dd, qq, tt, signed)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_table_half_dtypes(dtype: torch.dtype) -> None:
    dd, qq, tt = consts(0.0298, 7.52, 0.99975)
    x = sample(1000, 7.52, 3).to(dtype)
    tab = table_args(dd, qq, tt)
    got = geta.quantize.table(x, dd, qq, tt, False, *tab)
    assert got.dtype == dtype
    assert torch.equal(got.float().view(torch.int32),
                       geta.quantize(x, dd, qq, tt, False).float().view(torch.int32))


def test_table_layouts() -> None:
    """Channels-last, transposed, sliced and 0-dim inputs: values and empty_like strides."""
    dd, qq, tt = consts(0.0223, 2.82, 1.00723)
    tab = table_args(dd, qq, tt)
    base = sample(2 * 5 * 7 * 9, 2.82, 5).reshape(2, 5, 7, 9)
    for x in (base.to(memory_format=torch.channels_last), base.transpose(1, 3),
              base[:, ::2, 1:], base[0, 0, 0, 0]):
        got = geta.quantize.table(x, dd, qq, tt, True, *tab)
        want = geta.quantize(x, dd, qq, tt, True)
        assert got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(bits(got), bits(want))


def test_degenerate_quantizer_has_no_levels() -> None:
    """q_m^t / d < 0.5: every finite x quantizes to 0; the table has no threshold."""
    dd, qq, tt = consts(1.0, 0.3, 1.0)
    tab = build_table(dd, qq, tt)
    assert tab.max_level == 0 and bool((tab.base == 0).all())
    x = sample(100, 0.3, 1)
    assert torch.equal(bits(geta.quantize.table(x, dd, qq, tt, True, tab.scale, tab.bounds,
                                                tab.base)),
                       bits(geta.quantize(x, dd, qq, tt, True)))


def test_table_input_checks() -> None:
    dd, qq, tt = consts(0.05, 3.0, 1.0)
    scale, bounds, base = table_args(dd, qq, tt)
    x = torch.randn(10)
    for fn in (geta.quantize.table, quantize_table_reference):
        with pytest.raises(RuntimeError, match="bounds must be a 1-D int32 tensor"):
            fn(x, dd, qq, tt, True, scale, bounds.float(), base)
        with pytest.raises(RuntimeError, match="must have the same non-zero length"):
            fn(x, dd, qq, tt, True, scale, bounds, base[:-1])
        with pytest.raises(RuntimeError, match="scale must be float32 with one element"):
            fn(x, dd, qq, tt, True, scale.double(), bounds, base)
        with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
            fn(x.double(), dd, qq, tt, True, scale, bounds, base)


def test_build_table_refuses() -> None:
    with pytest.raises(ValueError, match="needs finite d > 0 and q_m > 0"):
        build_table(*consts(float("nan"), 1.0, 1.0))
    with pytest.raises(ValueError, match="needs finite d > 0 and q_m > 0"):
        build_table(*consts(0.1, 0.0, 1.0))
    with pytest.raises(ValueError, match="verify must be 'window' or 'all'"):
        build_table(*consts(0.1, 1.0, 1.0), verify="some")


def test_build_table_detects_a_non_monotone_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantizer whose level drops back near a threshold cannot be a table: ValueError."""
    real = qt._levels

    def wobbly(f_bits: torch.Tensor, d: torch.Tensor, q_m: torch.Tensor, t: torch.Tensor
               ) -> torch.Tensor:
        lv = real(f_bits, d, q_m, t)
        odd = (f_bits.to(torch.int64) % 97 == 0) & (lv > 0)  # sporadic one-level dips
        return lv - odd.to(lv.dtype)

    monkeypatch.setattr(qt, "_levels", wobbly)
    with pytest.raises(ValueError, match="not monotone in \\|x\\|"):
        build_table(*consts(0.05, 3.0, 1.0))


def test_build_table_refuses_too_many_levels() -> None:
    with pytest.raises(ValueError, match="levels .* more than a table of 65536 cells holds"):
        build_table(*consts(1e-5, 1.0, 1.0))


def test_build_table_refuses_a_tiny_clipping_range() -> None:
    """cells / q_m must be a finite float32 (the cell index is m * scale)."""
    d, q_m = (torch.tensor([b], dtype=torch.int32).view(torch.float32) for b in (2, 20))
    with pytest.raises(ValueError, match="q_m=.* is too small for a table"):
        build_table(d, q_m, torch.ones(1))


# ------------------------------------------------------------------------------ model level
class Net(nn.Module):
    """conv-bn-relu (unsigned act quantizer next), relu-maxpool-flatten, a signed input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def _trained_like(seed: int = 0, net: type[nn.Module] = Net, t: tuple[float, float] = (0.95, 0.03),
                  every: int = 3, bn_scales: bool = False
                  ) -> tuple[geta_fx.GetaModule, torch.Tensor]:
    """A weight_act GetaModule with calibrated quantizers, t != 1 (as after QASSO) and
    zeroed units (every ``every``-th of each group); ``bn_scales``: batch norm scales in
    (-1.5, 1.5), negative ones too (``max_pool(bn(x)) != bn(max_pool(x))`` then)."""
    torch.manual_seed(seed)
    model = net()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            if bn_scales:
                bn.weight.uniform_(-1.5, 1.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 8, 8)
    gm = geta_fx.transform(model.eval(), (x,), quantize="weight_act")
    geta_fx.calibrate(gm, [(torch.randn(16, 3, 8, 8),)])
    with torch.no_grad():
        for i, q in enumerate(gm.quantizers.values()):
            q.t.fill_(t[0] + t[1] * i)
            q.set_bit_width(8 if q.kind == "act" else 4)
    for g in gm.prunable_groups():
        gm.zero_units(g.id, torch.arange(0, g.num_units, every))
    return gm.eval(), x


def test_lowered_weight_act_model_is_bit_exact() -> None:
    gm, x = _trained_like()
    slim = gm.compress()
    low = gm.compress(lower=True)  # the default: act_table=True
    plain = deploy.lower(slim, act_table=False)
    # unfused linears: the lowered graph is the fake-quant one op for op (the fused
    # geta::lowbit_linear kernel agrees with aten.linear only to matmul rounding)
    unfused = deploy.lower(slim, fuse_linear=False)
    record = low.meta[ACT_TABLE]
    assert record["kept"] == [] and len(record["tables"]) == 4
    assert {r["qid"]: r["relu_fused"] for r in record["tables"]} == {
        "conv1_input": False, "conv2_input": True, "fc1_input": True, "fc2_input": True}
    nodes = list(low.graph.nodes)
    assert not any(n.target is geta.quantize.default for n in nodes)
    assert sum(n.target is torch.ops.aten.relu.default for n in nodes) == 0
    with torch.inference_mode():
        for xb in (x, torch.randn(7, 3, 8, 8) * 3):  # the captured batch and another
            want = slim(xb)
            assert torch.equal(unfused(xb), want)
            assert torch.equal(low(xb), plain(xb))
            torch.testing.assert_close(low(xb), want, rtol=1e-5, atol=1e-6)
            # the unpruned fake-quant model with the same zeroed units: pruned convs sum fewer
            # terms (float rounding), which can move an activation level by one step
            torch.testing.assert_close(gm(xb), want, rtol=0.05, atol=0.05)


def _saved_and_loaded(gm: torch.fx.GraphModule, tmp_path: object) -> torch.fx.GraphModule:
    """``gm`` through ``geta_fx.save`` / ``geta_fx.load`` (a .pt2 under ``tmp_path``)."""
    path = f"{tmp_path}/m.pt2"
    geta_fx.save(gm, path)
    return geta_fx.load(path)


def test_lowered_table_model_saves_loads_and_converts(tmp_path: object) -> None:
    gm, x = _trained_like(1)
    low = gm.compress(lower=True)
    back = _saved_and_loaded(low, tmp_path)
    with torch.inference_mode():
        assert torch.equal(back(x), low(x))
        half = low.half()
        holder = half.geta_lowbit.conv1_input
        assert holder.scale.dtype == torch.float32 and holder.bounds.dtype == torch.int32
        assert half(x.half()).dtype == torch.float16


def test_onnx_path_turns_tables_back_into_quantize() -> None:
    gm, x = _trained_like(2)
    low = gm.compress(lower=True)
    back = deploy._without_act_tables(low)
    assert back is not low
    assert not any(n.target is geta.quantize.table for n in back.graph.nodes)
    assert any(n.target is geta.quantize.table for n in low.graph.nodes)  # untouched
    with torch.inference_mode():
        assert torch.equal(back(x), low(x))
    assert deploy._without_act_tables(back) is back


def test_lower_refuses_bad_options_and_diverged_quantizers() -> None:
    gm, _ = _trained_like(3)
    slim = gm.compress()
    with pytest.raises(InputError, match="act_table must be True or False, got 'yes'"):
        deploy.lower(slim, act_table="yes")  # type: ignore[arg-type]
    low = deploy.lower(slim, act_table=False)
    low.geta_lowbit.conv2_input.d.fill_(float("nan"))
    with pytest.raises(NodeError, match="activation quantizer 'conv2_input'.*diverged"):
        LowerActTable()(low)


def test_untabulable_quantizer_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table build that fails (non-monotone, too many cells) keeps that quantizer as
    geta::quantize, says so in meta, and the model stays exact."""
    gm, x = _trained_like(5)
    slim = gm.compress()
    real = qt.build_table

    def refuse_fc1(d: torch.Tensor, q_m: torch.Tensor, t: torch.Tensor, **kw: object
                   ) -> qt.QuantizeTable:
        if abs(float(t) - float(gm.quantizers["geta_quant.fc1_input"].t.detach())) < 1e-7:
            raise ValueError("build_table: thresholds too unevenly spaced (test)")
        return real(d, q_m, t, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(qt, "build_table", refuse_fc1)
    low = deploy.lower(slim)
    kept = low.meta[ACT_TABLE]["kept"]
    assert [k["qid"] for k in kept] == ["fc1_input"] and "unevenly" in kept[0]["reason"]
    assert sum(n.target is geta.quantize.default for n in low.graph.nodes) == 1
    with torch.inference_mode():
        assert torch.equal(low(x), deploy.lower(slim, act_table=False)(x))


def test_report_reads_bits_of_table_nodes() -> None:
    gm, x = _trained_like(6)
    slim = gm.compress()
    a = geta_fx.report(deploy.lower(slim, act_table=False), (x,))
    b = geta_fx.report(deploy.lower(slim), (x,))
    assert a.bops == b.bops and a.macs == b.macs


@pytest.mark.slow
def test_build_table_exhaustive_act_quantizer() -> None:
    """verify="all": every float32 in (0, q_m] of a 6-bit act-like quantizer with t != 1."""
    tab = build_table(*consts(0.07, 4.4, 1.07), verify="all")
    assert tab.max_level == int(round(4.4 ** 1.07 / 0.07))


# ------------------------------------------------- batch_norm (+ add) (+ pool) -> table, fused
def test_fma_reference_rounds_once_at_float32_midpoints() -> None:
    """Products whose float64 sum lands on a float32 rounding midpoint: a float64 fma would
    round twice there; fma_reference must round the exact value once (checked with
    Fractions)."""
    from fractions import Fraction

    import numpy as np

    gen = torch.Generator().manual_seed(0)
    x, a = (1 + torch.rand(300_000, generator=gen)).float(), (1 + torch.rand(300_000,
                                                                           generator=gen)).float()
    p = x.double() * a.double()
    ulp = torch.where(p >= 2, 2.0 ** -22, 2.0 ** -23).double()
    delta = (torch.floor(p / ulp) + 0.5) * ulp - p  # to the midpoint above, exact
    keep = (delta.abs() < 2.0 ** -34) & (delta != 0) & (delta.float().double() == delta)
    x, a, delta = x[keep], a[keep], delta[keep].float()
    sign = 1.0 - 2.0 * (torch.arange(len(x)) % 2)
    b = (delta.double() * (1 + sign * 2.0 ** -20)).float()  # just past / short of the midpoint
    assert len(x) > 50

    def exact(xi: float, ai: float, bi: float) -> float:
        q = Fraction(xi) * Fraction(ai) + Fraction(bi)
        c = np.float32(float(q))
        near = [c, np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(-np.inf))]
        return float(min(near, key=lambda v: (abs(Fraction(float(v)) - q),
                                              int(np.float32(v).view(np.int32)) & 1)))

    want = torch.tensor([exact(*v) for v in zip(x.tolist(), a.tolist(), b.tolist())])
    got = qt.fma_reference(x, a, b)
    assert torch.equal(got, want.float())
    assert not torch.equal((x.double() * a.double() + b.double()).float(), want.float())


AFFINE_CASES = [  # (shape, pool, other: 0 none / 1 raw / 2 through its own affine)
    ((3, 5, 37), [], 0), ((5, 7), [], 1), ((4, 6, 9, 11), [], 2), ((2, 3, 40, 40), [], 1),
    ((4, 6, 16, 16), [2, 2, 2, 2], 0), ((4, 6, 9, 11), [2, 2, 2, 2], 2),
    ((2, 3, 8, 40), [2, 2, 2, 2], 1), ((2, 3, 9, 9), [3, 3, 2, 2], 0),
    ((2, 3, 7, 8), [2, 3, 1, 2], 2), ((1, 2, 4, 4), [4, 4, 4, 4], 0)]


def _affine_case(shape: tuple[int, ...], other: int, seed: int
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen) * 4
    x.view(-1)[:8] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40,
                                   1e30, float("nan")])
    kw = {"alpha": torch.randn(c, generator=gen), "beta": torch.randn(c, generator=gen)}
    if other:
        kw["other"] = torch.randn(shape, generator=gen) * 3
    if other == 2:
        kw["alpha2"], kw["beta2"] = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    return x, kw


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN payloads aside (max pooling keeps one of several NaNs)."""
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b))
                and torch.equal(bits(a)[~nan], bits(b)[~nan]))


@pytest.mark.parametrize(("shape", "pool", "other"), AFFINE_CASES)
@pytest.mark.parametrize("signed", [True, False])
def test_affine_table_kernel_equals_reference(shape: tuple[int, ...], pool: list[int],
                                              other: int, signed: bool) -> None:
    dd, qq, tt = consts(0.0298, 7.52, 0.99975)
    tab = table_args(dd, qq, tt)
    x, kw = _affine_case(shape, other, len(shape) + other)
    got = geta.quantize.affine_table(x, dd, qq, tt, signed, *tab, pool=pool, **kw)
    ref = qt.affine_table_reference(x, dd, qq, tt, signed, *tab, pool=pool, **kw)
    assert got.shape == ref.shape and got.is_contiguous()
    assert same(got, ref)


@pytest.mark.parametrize(("shape", "pool", "other"), AFFINE_CASES[:7])
def test_affine_table_equals_the_aten_ops_it_replaces(shape: tuple[int, ...], pool: list[int],
                                                      other: int) -> None:
    """batch_norm (+ batch_norm | + x) (max_pool2d) -> quantize.table, as the lowered graph
    had them, with alpha/beta from batch_norm_affine: bit for bit on this CPU."""
    gen = torch.Generator().manual_seed(7)
    c = shape[1]

    def bn_params() -> tuple[torch.Tensor, ...]:
        return (torch.randn(c, generator=gen), torch.randn(c, generator=gen),
                torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.1)

    dd, qq, tt = consts(0.0404, 9.26, 1.14375)
    tab = table_args(dd, qq, tt)
    x, o = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen) * 3
    p1, p2 = bn_params(), bn_params()
    plane = math.prod(shape[2:])
    ab1 = qt.batch_norm_affine(*p1, 1e-5, (min(plane, 37),))
    ab2 = qt.batch_norm_affine(*p2, 1e-5, (min(plane, 37),))
    if isinstance(ab1, str) or isinstance(ab2, str):
        pytest.skip(f"this CPU's batch_norm is not an fma: {ab1 if isinstance(ab1, str) else ab2}")
    bn = torch.ops.aten.batch_norm.default
    v = bn(x, *p1, False, 0.1, 1e-5, False)
    kw: dict[str, torch.Tensor] = {}
    if other == 1:
        v, kw = v + o, {"other": o}
    elif other == 2:
        v = v + bn(o, *p2, False, 0.1, 1e-5, False)
        kw = {"other": o, "alpha2": ab2[0], "beta2": ab2[1]}
    if pool:
        v = F.max_pool2d(v, pool[:2], pool[2:])
    want = geta.quantize.table(v, dd, qq, tt, False, *tab)
    got = geta.quantize.affine_table(x, dd, qq, tt, False, *tab, ab1[0], ab1[1], pool=pool,
                                     **kw)
    assert same(got, want)


def test_affine_table_dtypes_and_layouts() -> None:
    """float16/bfloat16 (computed in float32, cast back, as the reference) and non-contiguous
    inputs (made contiguous; the result is contiguous)."""
    dd, qq, tt = consts(0.0223, 2.82, 1.00723)
    tab = table_args(dd, qq, tt)
    x, kw = _affine_case((2, 4, 6, 6), 2, 3)
    for dtype in (torch.float16, torch.bfloat16):
        xs, o = x.to(dtype), kw["other"].to(dtype)
        args = (dd, qq, tt, True, *tab, kw["alpha"], kw["beta"], o, kw["alpha2"], kw["beta2"])
        got = geta.quantize.affine_table(xs, *args, pool=[2, 2, 2, 2])
        assert got.dtype == dtype and got.shape == (2, 4, 3, 3)
        assert same(got.float(), qt.affine_table_reference(xs, *args, pool=[2, 2, 2, 2]).float())
    xt = x.transpose(2, 3)
    ot = kw["other"].transpose(2, 3)
    kt = dict(kw, other=ot)
    assert same(geta.quantize.affine_table(xt, dd, qq, tt, False, *tab, **kt),
                geta.quantize.affine_table(xt.contiguous(), dd, qq, tt, False, *tab,
                                           **dict(kw, other=ot.contiguous())))


def test_affine_table_input_checks() -> None:
    dd, qq, tt = consts(0.05, 3.0, 1.0)
    tab = table_args(dd, qq, tt)
    x = torch.randn(2, 3, 4, 4)
    a, b = torch.ones(3), torch.zeros(3)
    for fn in (geta.quantize.affine_table, qt.affine_table_reference):
        with pytest.raises(RuntimeError, match="alpha must be a 1-D float tensor of 3 channels"):
            fn(x, dd, qq, tt, True, *tab, torch.ones(4), b)
        with pytest.raises(RuntimeError, match="alpha2 and beta2 must be given together"):
            fn(x, dd, qq, tt, True, *tab, a, b, x, a, None)
        with pytest.raises(RuntimeError, match="alpha2/beta2 need other"):
            fn(x, dd, qq, tt, True, *tab, a, b, None, a, b)
        with pytest.raises(RuntimeError, match="other must have x's shape"):
            fn(x, dd, qq, tt, True, *tab, a, b, x[:1])
        with pytest.raises(RuntimeError, match=r"pool must be \[\] or \[kh, kw, sh, sw\]"):
            fn(x, dd, qq, tt, True, *tab, a, b, pool=[2, 2])
        with pytest.raises(RuntimeError, match="does not fit x"):
            fn(x, dd, qq, tt, True, *tab, a, b, pool=[5, 5, 1, 1])
        with pytest.raises(RuntimeError, match="pool needs x of shape"):
            fn(x.flatten(2), dd, qq, tt, True, *tab, a, b, pool=[2, 2, 2, 2])
        with pytest.raises(RuntimeError, match="must have a channel dimension"):
            fn(torch.randn(5), dd, qq, tt, True, *tab, torch.ones(1), torch.zeros(1))


def test_batch_norm_affine_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    c = 4
    w, b, m, v = torch.randn(c), torch.randn(c), torch.randn(c), torch.rand(c) + 0.1
    ok = qt.batch_norm_affine(w, b, m, v, 1e-5)
    assert not isinstance(ok, str) and ok[0].dtype == torch.float32
    assert "not float32" in str(qt.batch_norm_affine(w.double(), b, m, v, 1e-5))
    assert "non-finite" in str(qt.batch_norm_affine(w * float("inf"), b, m, v, 1e-5))
    monkeypatch.setattr(qt, "fma_reference", lambda x, a, bb: x * a + bb)  # two roundings
    assert "is not fma" in str(qt.batch_norm_affine(w, b, m, v, 1e-5))


class ResNetlet(nn.Module):
    """stem conv-bn-relu, two blocks with conv-bn shortcuts, an identity-shortcut block,
    relu-maxpool-flatten, fc: each fusion pattern (bn, bn + bn, bn + x -> pool -> flatten) and
    one that must stay unfused (a block output read by the next block's conv and shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        def cb(i: int, o: int, k: int = 3) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False),
                                 nn.BatchNorm2d(o))
        self.stem, self.c1, self.c2, self.sc = cb(3, 8), cb(8, 12), cb(12, 12), cb(8, 12, 1)
        self.c3, self.sc2, self.c4 = cb(12, 12), cb(12, 12, 1), cb(12, 12)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.c2(F.relu(self.c1(h))) + self.sc(h))
        h = F.relu(self.c3(h) + self.sc2(h))
        h = F.relu(self.c4(h) + h)
        return self.fc(F.max_pool2d(h, 2).flatten(1))


def _resnetlet(seed: int = 0) -> tuple[geta_fx.GetaModule, torch.Tensor]:
    return _trained_like(seed, ResNetlet, (0.97, 0.02), 4, bn_scales=True)


def test_lowered_model_fuses_batch_norms_bit_exact() -> None:
    gm, x = _resnetlet()
    slim = gm.compress()
    low = gm.compress(lower=True)
    unfused = deploy.lower(slim, fuse_linear=False)
    record = low.meta[ACT_TABLE]["affine"]
    if any(not r["fused"] for r in record):
        pytest.skip(f"this CPU's batch_norm is not an fma: {record}")
    shapes = sorted((r["batch_norms"], r["add"], r["pool"]) for r in record)
    assert shapes == [(1, False, []), (1, False, []), (1, True, [2, 2, 2, 2]),
                      (2, True, [])], shapes
    nodes = list(low.graph.nodes)
    # left: block 2's (its output feeds block 3's conv quantizer and the identity add)
    assert sum(n.target is torch.ops.aten.batch_norm.default for n in nodes) == 2
    assert sum(n.target is geta.quantize.affine_table for n in nodes) == 4
    # the fused batch_norms' constants are read no more (alpha/beta are, from the holders);
    # their tensors stay, as the model's parameters
    read = {str(n.target).rpartition(".")[0] for n in nodes
            if n.op == "get_attr" and str(n.target).endswith(".running_var")}
    assert read == {"c3.1", "sc2.1"}, read
    assert "c1.1.weight" in dict(low.named_parameters())
    two = next(r["qid"] for r in record if r["batch_norms"] == 2)
    assert getattr(low.geta_lowbit, two).alpha2.shape == (12 - 3,)
    with torch.inference_mode():
        for xb in (x, torch.randn(7, 3, 8, 8) * 3):
            want = slim(xb)
            assert torch.equal(unfused(xb), want)
            torch.testing.assert_close(low(xb), want, rtol=1e-5, atol=1e-6)  # fused linear
            assert torch.equal(low(xb), deploy.lower(slim)(xb))  # deterministic
            no_fuse = deploy.lower(slim, act_table=False)
            torch.testing.assert_close(low(xb), no_fuse(xb), rtol=1e-5, atol=1e-6)
    report_a = geta_fx.report(deploy.lower(slim, act_table=False), (x,))
    report_b = geta_fx.report(low, (x,))
    assert report_a.bops == report_b.bops and report_a.macs == report_b.macs


def test_fusion_left_out_where_batch_norm_is_not_fma(monkeypatch: pytest.MonkeyPatch) -> None:
    gm, x = _resnetlet(1)
    slim = gm.compress()
    monkeypatch.setattr(qt, "batch_norm_affine", lambda *a, **k: "not an fma (test)")
    low = deploy.lower(slim)
    record = low.meta[ACT_TABLE]["affine"]
    assert record and all(r == {"qid": r["qid"], "fused": False, "reason": "not an fma (test)"}
                          for r in record)
    assert not any(n.target is geta.quantize.affine_table for n in low.graph.nodes)
    with torch.inference_mode():
        assert torch.equal(low(x), deploy.lower(slim, fuse_linear=True, act_table=True)(x))


def test_fusion_needs_a_compiled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    gm, x = _resnetlet(4)
    slim = gm.compress()
    monkeypatch.setattr(qt, "status", lambda op="table": {"cpu": {"impl": "reference",
                                                                  "reason": "(test)"}})
    low = deploy.lower(slim)
    record = low.meta[ACT_TABLE]["affine"]
    assert record and all(not r["fused"] and "no compiled geta::quantize.affine_table kernel "
                          "on cpu: (test)" == r["reason"] for r in record)
    assert not any(n.target is geta.quantize.affine_table for n in low.graph.nodes)


def _slim_8_4(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """The calibrated weight_act slim graph of ``model`` (8-bit activations, 4-bit weights)."""
    gm = geta_fx.transform(model.eval(), (x,), quantize="weight_act")
    geta_fx.calibrate(gm, [(torch.randn(16, *x.shape[1:]),)])
    with torch.no_grad():
        for q in gm.quantizers.values():
            q.set_bit_width(8 if q.kind == "act" else 4)
    return gm.eval().compress()


class TransposedBN(nn.Module):
    """(N, L, C) -> transpose -> BatchNorm1d -> relu -> conv1d: the batch_norm reads a
    non-contiguous input, on which ATen's eval batch_norm rounds twice (not an fma)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm1d(8), nn.Conv1d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(F.relu(self.bn(x.transpose(1, 2)))).flatten(1))


def test_batch_norm_on_a_transposed_input_stays_unfused() -> None:
    torch.manual_seed(0)
    model = TransposedBN()
    with torch.no_grad():
        model.bn.weight.uniform_(-1.5, 1.5)
        model.bn.bias.uniform_(-1.0, 1.0)
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    slim = _slim_8_4(model, torch.randn(4, 6, 8))
    low = deploy.lower(slim, fuse_linear=False)
    plain = deploy.lower(slim, fuse_linear=False, act_table=False)
    (rec,) = low.meta[ACT_TABLE]["affine"]
    assert not rec["fused"] and "neither contiguous nor channels-last" in rec["reason"], rec
    # inputs whose batch_norm lands within 8 ulp of each level threshold of the next quantizer
    bn = next(n for n in plain.graph.nodes if n.target is torch.ops.aten.batch_norm.default)
    w, b, mean, var = (plain.get_parameter(str(a.target)) if "weight" in str(a.target)
                       or "bias" in str(a.target) else plain.get_buffer(str(a.target))
                       for a in bn.args[1:5])
    alpha, beta = qt.batch_norm_affine(w.detach(), b.detach(), mean, var, float(bn.args[7]))
    tab = low.geta_lowbit.conv_input
    thr = tab.bounds[tab.bounds != 0x7F800000].view(torch.float32)
    tgt = (thr[:, None] * (1 + torch.arange(-8.0, 9.0) * 2.0**-23)).reshape(-1)
    tgt = tgt[: tgt.numel() // 6 * 6]
    x = ((tgt[:, None] - beta) / alpha).reshape(-1, 6, 8)
    with torch.inference_mode():
        assert torch.equal(low(x), plain(x))


class Pool3d(nn.Module):
    """BatchNorm1d on (N, C, L), then max_pool2d of that 3-D tensor (unbatched (C, H, W) to
    max_pool2d: it pools channels): not the fused op's pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn = nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.conv, self.fc = nn.Conv1d(4, 4, 3, padding=1), nn.Linear(4 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(F.max_pool2d(self.bn(self.conv0(x)), 2)).flatten(1))


def test_max_pool_of_a_3d_batch_norm_output_stays_unfused() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6)
    slim = _slim_8_4(Pool3d(), x)
    low = deploy.lower(slim, fuse_linear=False)
    assert not low.meta[ACT_TABLE].get("affine")
    with torch.inference_mode():
        assert torch.equal(low(x), deploy.lower(slim, fuse_linear=False, act_table=False)(x))


class DoubledBN(nn.Module):
    """conv -> bn -> h + h -> relu -> conv: the residual add reads one batch_norm twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        return self.head(F.relu(h + h))


def test_an_add_of_one_batch_norm_to_itself_fuses_once_and_exactly() -> None:
    import warnings

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    slim = _slim_8_4(DoubledBN(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fx warns when a node is erased twice
        low = deploy.lower(slim, fuse_linear=False)
    fused = [r for r in low.meta[ACT_TABLE].get("affine", []) if r.get("fused")]
    if not fused:
        pytest.skip(f"no fused affine_table here: {low.meta[ACT_TABLE].get('affine')}")
    assert fused[0]["batch_norms"] == 1 and fused[0]["add"]
    with torch.inference_mode():
        assert torch.equal(low(x), deploy.lower(slim, fuse_linear=False, act_table=False)(x))


def test_fused_model_saves_loads_and_exports_onnx_form(tmp_path: object) -> None:
    gm, x = _resnetlet(2)
    low = gm.compress(lower=True)
    back = _saved_and_loaded(low, tmp_path)
    plain = deploy._without_act_tables(low)
    assert not any(n.target in (geta.quantize.table, geta.quantize.affine_table)
                   for n in plain.graph.nodes)
    with torch.inference_mode():
        assert torch.equal(back(x), low(x))
        # x * alpha + beta rounds twice: an activation may move one level (d <= 0.05 here)
        torch.testing.assert_close(plain(x), low(x), rtol=0.05, atol=0.1)


def test_pack_linear_freezes_unpacked_conv_weights(tmp_path: object) -> None:
    """lower(pack="linear"): conv weights frozen as their unpacked float values (no
    geta::unpack_weight per call), linear weights packed; same outputs, same report."""
    gm, x = _resnetlet(3)
    slim = gm.compress()
    packed = deploy.lower(slim)
    low = deploy.lower(slim, pack="linear")
    ops = [n.target for n in low.graph.nodes]
    assert geta.unpack_weight.default not in ops and geta.lowbit_linear.default in ops
    modes = {r.param: r.mode for r in low.meta["geta.lowbit"]}
    assert modes["fc.weight"] == "packed"
    assert {m for p, m in modes.items() if p != "fc.weight"} == {"float"}
    assert list(dict(low.geta_lowbit.c1_0_weight.named_buffers())) == ["weight"]
    rows = {r["weight"]: r["stored_as"] for r in low.meta[deploy.META_KEY]["layers"]
            if r.get("weight")}
    assert rows == {"fc.weight": "packed"} | {p: "float" for p in modes if p != "fc.weight"}
    with torch.inference_mode():
        assert torch.equal(low(x), packed(x))
    a, b = geta_fx.report(slim, (x,), reference=gm), geta_fx.report(low, (x,))
    assert (a.bops, a.macs, a.params) == (b.bops, b.macs, b.params)
    back = _saved_and_loaded(low, tmp_path)
    with torch.inference_mode():
        assert torch.equal(back(x), low(x))
    with pytest.raises(InputError, match="pack must be 'all' or 'linear', got 'conv'"):
        deploy.lower(slim, pack="conv")


@pytest.mark.cuda  # for a GPU session (benchmarks/gpu_checks.sh runs it): the CUDA kernels
def test_lowered_on_cuda_equals_the_fake_quant_slim_graph_on_cuda() -> None:  # are unrun yet
    """Lowered on the GPU (tables built with CUDA's own geta::quantize), the table and fused
    batch_norm kernels give the fake-quant slim graph's outputs there, bit for bit."""
    from geta_fx.module import move_to_device

    gm, x = _resnetlet()
    slim = move_to_device(gm.compress(), "cuda")
    low = deploy.lower(slim, fuse_linear=False)
    assert any(n.target in (torch.ops.geta.quantize.table, torch.ops.geta.quantize.affine_table)
               for n in low.graph.nodes)
    xc = x.cuda()
    with torch.inference_mode():
        assert torch.equal(low(xc), slim(xc))
