"""geta_fx.report on small models whose costs are computed by hand."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geta_fx
from geta_fx.errors import InputError
from geta_fx.report import DENSE, Report, report


class ConvNet(nn.Module):
    """x[2,3,8,8] -> conv3x3(3->4, pad 1) -> relu -> avgpool -> fc(4->5)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


CONV_MACS = 2 * 4 * 8 * 8 * (3 * 3 * 3)   # numel(out) * C_in * k*k = 13,824
FC_MACS = 2 * 5 * 4                        # numel(out) * in_features = 40
CONV_PARAMS = 4 * 3 * 9 + 4                # 112
FC_PARAMS = 5 * 4 + 5                      # 25


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


def test_fp32_counts_by_hand() -> None:
    gm = geta_fx.transform(ConvNet(), (_x(),))
    r = report(gm)
    assert isinstance(r, Report)
    assert r.params == CONV_PARAMS + FC_PARAMS and r.quantizer_params == 0
    assert r.macs == CONV_MACS + FC_MACS == r.macs_weight_layers
    assert r.macs_act_matmuls == 0
    assert r.bops == r.macs * 32 * 32 == r.fp32_bops
    assert r.relative_bops == 1.0
    assert r.weight_bytes == r.fp32_weight_bytes == 4 * (CONV_PARAMS + FC_PARAMS)
    assert r.avg_weight_bits == 32.0
    assert r.batch == 2
    by_name = {row.module: row for row in r.layers}
    assert by_name["conv"].macs == CONV_MACS and by_name["conv"].kind == "conv"
    assert by_name["fc"].macs == FC_MACS and by_name["fc"].params == FC_PARAMS
    assert (by_name["conv"].out_channels, by_name["conv"].kept_channels) == (4, 4)


def test_grouped_and_transposed_conv_by_hand() -> None:
    """x[1,4,6,6] -> depthwise 3x3 -> convT(4->2, k2, s2) -> [1,2,12,12]"""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                          nn.ConvTranspose2d(4, 2, 2, stride=2, bias=False))
    r = report(model, (torch.randn(1, 4, 6, 6),))      # plain module: captured here
    macs = [row.macs for row in r.layers]
    # depthwise: numel(out) * (C_in/groups) * k*k; transposed: numel(in) * (C_out/g) * k*k,
    # i.e. each of the 288 outputs receives 4*2*2/(2*2) = 4 products.
    assert macs == [4 * 6 * 6 * 1 * 9, 4 * 6 * 6 * 2 * 4]
    assert macs[1] == 2 * 12 * 12 * 4


class Attn(nn.Module):
    """x[2,5,8] -> q,k,v (linear 8->8) -> 2 heads of 4 -> q@k^T (explicit) and SDPA -> o"""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2))              # 2*2*5*5*4 = 400 MACs
        y = F.scaled_dot_product_attention(q, k, v)              # 400 (QK^T) + 400 (AV)
        y = y + torch.matmul(scores.softmax(-1), v)               # 400
        return self.o(y.transpose(1, 2).reshape(b, s, 8))


def test_attention_matmuls_are_counted_separately() -> None:
    gm = geta_fx.transform(Attn(), (torch.randn(2, 5, 8),))
    r = report(gm)
    linear = 4 * (2 * 5 * 8 * 8)
    assert r.macs_weight_layers == linear
    assert r.macs_act_matmuls == 400 + 800 + 400
    assert r.macs == linear + 1600
    kinds = sorted(row.kind for row in r.layers)
    assert kinds.count("attention") == 3 and kinds.count("linear") == 4
    assert r.bops_act_matmuls == 1600 * 32 * 32
    assert any("attention" in n for n in r.notes)


def test_learned_bits_bops_storage_by_hand() -> None:
    gm = geta_fx.transform(ConvNet(), (_x(),), quantize="weight_act")
    qs = gm.quantizers
    weight_q = {n: q for n, q in qs.items() if q.kind == "weight"}
    act_q = {n: q for n, q in qs.items() if q.kind == "act"}
    assert len(weight_q) == 2 and len(act_q) == 2
    for q in weight_q.values():
        q.set_bit_width(4)
    for q in act_q.values():
        q.set_bit_width(8)
    r = report(gm)
    assert r.bops == (CONV_MACS + FC_MACS) * 4 * 8
    assert r.fp32_bops == (CONV_MACS + FC_MACS) * 32 * 32
    assert r.relative_bops == pytest.approx(4 * 8 / (32 * 32))
    weights = 4 * 3 * 9 + 5 * 4
    biases = 4 + 5
    scalars = sum(p.numel() for q in qs.values() for p in q.parameters())
    assert r.quantizer_params == scalars == 3 * 4
    assert r.weight_bytes == pytest.approx((weights * 4 + biases * 32) / 8 + scalars * 4)
    assert r.avg_weight_bits == pytest.approx((weights * 4 + biases * 32) / (weights + biases))
    assert r.avg_quantized_weight_bits == pytest.approx(4.0)
    rows = {row.module: row for row in r.layers}
    assert (rows["conv"].w_bits, rows["conv"].a_bits) == (4, 8)
    assert {q.bits_rounded for q in r.quantizers} == {4, 8}


def test_bit_cost_is_the_report_with_bits_left_open() -> None:
    """bit_cost(m).bops(bits) / .avg_bits(bits) == report(m) once the quantizers have bits."""
    from geta_fx.report import bit_cost

    torch.manual_seed(0)
    gm = geta_fx.transform(ConvNet(), (_x(),), quantize="weight_act")
    bc = bit_cost(gm)
    chosen = {n: b for n, b in zip(gm.quantizers, (3, 7, 5, 6), strict=True)}
    for n, q in gm.quantizers.items():
        q.set_bit_width(chosen[n])
    r = report(gm)
    assert bc.bops(chosen) == r.bops and bc.fp32_bops == r.fp32_bops
    weights = {n: q for n, q in gm.quantizers.items() if q.kind == "weight"}
    assert set(bc.weight_numel) == set(weights)
    assert bc.avg_bits(chosen) == pytest.approx(r.avg_quantized_weight_bits)
    by_hand = (4 * 3 * 9 * chosen[next(n for n in weights if "conv" in n)] +
               5 * 4 * chosen[next(n for n in weights if "fc" in n)]) / (4 * 3 * 9 + 5 * 4)
    assert r.avg_quantized_weight_bits == pytest.approx(by_hand)
    slim = gm.compress()  # and on a slim graph (same quantizer names)
    assert bit_cost(slim).bops(chosen) == report(slim).bops


def test_weight_only_uses_32_bit_activations() -> None:
    gm = geta_fx.transform(ConvNet(), (_x(),), quantize="weight")
    for q in gm.quantizers.values():
        q.set_bit_width(6)
    r = report(gm)
    assert r.bops == (CONV_MACS + FC_MACS) * 6 * 32


def test_slim_model_against_its_reference() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = geta_fx.transform(model, (torch.randn(4, 6),))
    (group,) = gm.prunable_groups()
    gm.zero_units(group.id, [0, 1, 2])
    before = [p.detach().clone() for p in gm.parameters()]
    r_dense = report(gm)
    assert r_dense.zero_units == 3 and r_dense.prunable_units == 8
    assert r_dense.group_sparsity == pytest.approx(3 / 8)
    assert r_dense.layers[0].kept_channels == 5 and r_dense.layers[0].out_channels == 8

    slim = gm.compress()
    r = report(slim, reference=gm)
    kept = 5
    assert r.params == 6 * kept + kept + kept * 3 + 3
    assert r.macs == 4 * kept * 6 + 4 * 3 * kept
    assert r.fp32_macs == 4 * 8 * 6 + 4 * 3 * 8
    assert r.relative_macs == pytest.approx(r.macs / r.fp32_macs)
    assert r.fp32_weight_bytes == 4 * (6 * 8 + 8 + 8 * 3 + 3)
    assert r.layers[0].ref_channels == 8 and r.layers[0].out_channels == kept
    assert r.group_sparsity == pytest.approx(3 / 8) and r.sparsity_from
    assert "reference" in r.reference
    # the reference is read, never pruned in place (GETA_SPEC §E)
    assert all(torch.equal(a, b) for a, b in zip(before, gm.parameters(), strict=True))
    assert report(gm, compressed=True).macs == r.macs

    # compress() records the dense origin: the slim model alone reports against it
    alone = report(slim)
    assert (alone.fp32_macs, alone.fp32_weight_bytes, alone.group_sparsity) == (
        r.fp32_macs, r.fp32_weight_bytes, r.group_sparsity)
    assert [row.ref_channels for row in alone.layers] == [row.ref_channels for row in r.layers]
    slim.meta.pop(DENSE)  # without it, only the graph itself is known
    no_ref = report(slim)
    assert no_ref.group_sparsity is None and "n/a" in no_ref.to_text()
    assert no_ref.fp32_macs == no_ref.macs and any("dense-origin" in n for n in no_ref.notes)


def test_symbolic_batch_takes_example_inputs() -> None:
    gm = geta_fx.transform(ConvNet(), (_x(),))
    assert report(gm).shapes_from == "capture-time sizes"
    r5 = report(gm, (torch.randn(5, 3, 8, 8),))
    assert r5.batch == 5 and r5.shapes_from == "example inputs"
    assert r5.macs == (CONV_MACS + FC_MACS) // 2 * 5
    with pytest.raises(InputError, match="static size 3"):  # channels stay static
        report(gm, (torch.randn(5, 4, 8, 8),))
    with pytest.raises(InputError, match="tensor inputs"):
        report(gm, (torch.randn(5, 3, 8, 8), torch.randn(1)))


def test_text_and_json_say_what_the_denominator_is() -> None:
    gm = geta_fx.transform(ConvNet(), (_x(),), quantize="weight")
    r = report(gm)
    text = str(r)
    assert text == r.to_text()
    assert "MACs x 32 x 32" in text and "BOPs vs FP32" in text
    assert "conv" in text and "fc" in text            # per-layer table
    d = json.loads(r.to_json())
    assert d["macs"] == r.macs and d["relative_bops"] == r.relative_bops
    assert "W16/A32" in d["definitions"]["fp32_bops"]
    assert len(d["layers"]) == 2 and d["layers"][0]["kind"] == "conv"
    assert "groups" in r.to_text(groups=True)


def test_plain_module_needs_example_inputs() -> None:
    with pytest.raises(InputError, match="example_inputs"):
        report(ConvNet())
    with pytest.raises(InputError, match="expected a GetaModule"):
        report(42)
    with pytest.raises(InputError, match="GetaModule"):
        report(nn.Linear(2, 2), (torch.randn(1, 2),), compressed=True)


def test_public_name_is_the_function() -> None:
    """``geta_fx.report`` stays the function after the submodule of the same name is imported
    (the package binds the function eagerly; the module stays in sys.modules)."""
    import importlib

    module = importlib.import_module("geta_fx.report")
    import geta_fx.report  # noqa: F401  (must not rebind the package attribute)

    gm = geta_fx.transform(ConvNet(), (_x(),))
    assert geta_fx.report(gm).macs == module.report(gm).macs == CONV_MACS + FC_MACS
    assert geta_fx.report(gm).macs == CONV_MACS + FC_MACS          # second use too
    assert geta_fx.Report is Report


# ------------------------------------------ slim, lowered and loaded models report the same
class ConvBNNet(nn.Module):
    """x[2,3,8,8] -> conv(3->8)+bn+relu -> conv(8->8, no bias)+relu -> mean -> fc(8->5)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.relu(self.conv2(h)).mean((2, 3)))


def _cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    return ConvBNNet().eval(), (torch.randn(2, 3, 8, 8),), (torch.randn(5, 3, 8, 8),)


class TiedLM(nn.Module):
    """idx[2,6] -> emb(20x8) -> fc(8->8)+relu -> logits with the embedding's weight (tied head:
    quantized for the head, read as float by the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(self.fc(self.emb(idx))), self.emb.weight)


def _tied() -> tuple[nn.Module, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    return TiedLM().eval(), (torch.randint(0, 20, (2, 6)),), (torch.randint(0, 20, (3, 6)),)


def _gpt() -> tuple[nn.Module, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    from zoo import GPTBlock

    return (GPTBlock(d=16, heads=2, vocab=20).eval(), (torch.randint(0, 20, (2, 6)),),
            (torch.randint(0, 20, (3, 6)),))


#: Bits set on the weight quantizers in turn: 3.4 rounds to 3 but is stored in 4 bits, 12 is
#: wider than a packed weight (lowered as a frozen float buffer).
_BITS = (3.4, 4, 12, 2.6, 6)
_COUNTS = ("params", "macs", "macs_weight_layers", "macs_act_matmuls", "bops",
           "bops_act_matmuls", "fp32_macs", "fp32_bops", "fp32_weight_bytes", "zero_units",
           "prunable_units", "batch", "shapes_from")
_FLOATS = ("param_bytes", "avg_weight_bits", "relative_bops", "relative_macs",
           "relative_param_bytes", "group_sparsity")
_LAYER = ("kind", "module", "weight", "in_channels", "out_channels", "kept_channels",
          "ref_channels", "params", "macs", "w_bits", "a_bits", "bops")


def _trained(build: Any, mode: str = "weight"
             ) -> tuple[geta_fx.GetaModule, nn.Module, tuple, tuple]:
    torch.manual_seed(0)
    model, x, x_other = build()
    gm = geta_fx.transform(model, x, quantize=mode)
    for i, q in enumerate(gm.quantizers.values()):
        q.set_bit_width(_BITS[i % len(_BITS)])
    for g in gm.prunable_groups():  # a third of every group's units (at least one)
        gm.zero_units(g.id, list(range(0, g.num_units, 3)))
    return gm.eval(), model, x, x_other


def _slim_lowered_loaded(gm: geta_fx.GetaModule, tmp_path: Any) -> list[torch.fx.GraphModule]:
    slim = gm.compress()
    low = geta_fx.lower(slim)
    geta_fx.save(low, tmp_path / "m.pt2")
    return [slim, low, geta_fx.load(tmp_path / "m.pt2")]


def _assert_same(a: Report, b: Report, what: str) -> None:
    for f in _COUNTS:
        assert getattr(a, f) == getattr(b, f), (what, f)
    for f in _FLOATS:
        assert getattr(b, f) == pytest.approx(getattr(a, f), rel=1e-12), (what, f)
    def rows(rep: Report) -> list[list[tuple[str, Any]]]:
        return [[(f, getattr(row, f)) for f in _LAYER] for row in rep.layers]

    assert rows(a) == rows(b), what
    def quant(rep: Report) -> list[tuple[str, str | None, int, float]]:  # weight: its param
        return sorted((q.kind, q.target if q.kind == "weight" else None, q.bits_rounded, q.bits)
                      for q in rep.quantizers)

    qa, qb = quant(a), quant(b)
    assert [q[:3] for q in qa] == [q[:3] for q in qb], what
    assert [q[3] for q in qa] == pytest.approx([q[3] for q in qb], rel=1e-6), what


@pytest.mark.parametrize(("build", "mode"), [(_cnn, "weight"), (_gpt, "weight"),
                                             (_cnn, "weight_act"), (_tied, "weight")],
                         ids=["cnn", "gpt_block", "cnn-weight_act", "tied_head"])
def test_slim_lowered_loaded_report_the_same(build: Any, mode: str, tmp_path: Any) -> None:
    gm, model, x, x_other = _trained(build, mode)
    models = _slim_lowered_loaded(gm, tmp_path)
    slim, low, loaded = models
    assert not any(getattr(m, "is_geta_quantizer", False) for m in low.modules())
    assert any(n.target is torch.ops.geta.unpack_weight.default or
               n.target is torch.ops.geta.lowbit_linear.default for n in loaded.graph.nodes)
    for inputs in (None, x_other):  # capture-time sizes, then another batch
        truth = report(slim, inputs, reference=gm)   # the dense model at hand
        reps = [report(m, inputs) for m in models]
        for what, r in zip(("slim", "lowered", "loaded"), reps, strict=True):
            _assert_same(truth, r, what)
        # against the user's eager model and the slim model's own tensors
        dense = report(model, x if inputs is None else inputs)
        assert truth.fp32_macs == dense.macs and truth.macs < dense.macs
        assert truth.fp32_weight_bytes == 4 * sum(p.numel() for p in model.parameters())
    r = reps[0]
    assert r.params == sum(p.numel() for n, p in slim.named_parameters()
                           if not n.startswith("geta_quant"))
    want = {q.param_fqn: round(float(q.bit_width())) for q in gm.quantizers.values()
            if q.kind == "weight"}
    quantized = [row for row in r.layers if row.weight in want and row.kind != "embedding"]
    for row in quantized:
        assert row.w_bits == want[row.weight]
        assert (row.a_bits == 32) == (mode == "weight")
    dense_params = dict(model.named_parameters())
    for row in r.layers:  # channels total: the eager model's weight, along the output dim
        if row.weight is not None:
            out_dim = 1 if row.kind == "embedding" else 0
            assert row.ref_channels == dense_params[row.weight].shape[out_dim], row
    assert any(row.ref_channels > row.kept_channels for row in quantized)
    assert r.group_sparsity == pytest.approx(
        sum(len(range(0, g.num_units, 3)) for g in gm.prunable_groups())
        / sum(g.num_units for g in gm.prunable_groups()))
    assert r.relative_bops == pytest.approx(r.bops / (dense.macs * 32 * 32))
    # the 3.4-bit weight is stored in 4 bits, yet every form reports its learned 3 bits
    assert any(w.bits == 4 and round(w.learned_bits) == 3 for w in low.meta["geta.lowbit"])
    assert 3 in {row.w_bits for row in quantized}


def test_lowered_graph_without_metadata_still_reports(tmp_path: Any) -> None:
    """An artifact loaded with plain torch.export.load (no geta_fx.load, so no geta metadata)
    is costed from its lowbit ops alone, and the report says what that could not know."""
    gm, _, _, _ = _trained(_cnn)
    slim, _, _ = _slim_lowered_loaded(gm, tmp_path)
    bare = torch.export.load(tmp_path / "m.pt2").module()
    assert not any(k.startswith("geta.") for k in bare.meta)
    r, r_slim = report(bare), report(slim)
    assert (r.params, r.macs) == (r_slim.params, r_slim.macs)  # logical elements, not bytes
    # bits: the packed storage bits (4 where 3.4 was learned: rounded, 3) and 32 for weights
    # that were frozen as float buffers (their learned 12 bits are not in the graph)
    assert [row.w_bits for row in r.layers] == [4, 4, 32]
    assert [row.w_bits for row in r_slim.layers] == [3, 4, 12]
    assert any("without a lowering record" in n for n in r.notes)
    assert any("no dense-origin metadata" in n for n in r.notes)
    assert r.group_sparsity is None and r.fp32_macs == r.macs
    assert all(row.ref_channels is None for row in r.layers)
    # a torch.fx.symbolic_trace graph: no ATen nodes with shapes, still a report
    traced = report(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2))))
    assert traced.params == 8 and traced.macs == 0
    assert any("no compute layer" in n for n in traced.notes)


def test_cost_model_constants_match_lower_quant() -> None:
    from geta_fx.ir import cost
    from geta_fx.passes import lower_quant

    assert (cost.LOWBIT, cost.HOLDER) == (lower_quant.LOWBIT, lower_quant.HOLDER)


def test_record_dense_origin_never_fails_its_caller(caplog: pytest.LogCaptureFixture) -> None:
    from geta_fx.report import record_dense_origin

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = geta_fx.transform(model, (torch.randn(4, 6),))
    slim = gm.compress()
    assert slim.meta[DENSE]["channels"] == {"0.weight:0": 8, "2.weight:0": 3}
    with caplog.at_level("WARNING", logger="geta_fx.report"):
        record_dense_origin(slim, 42)  # nothing the cost model can read
    assert DENSE not in slim.meta and "no dense-origin record" in caplog.text


def test_malformed_dense_origin_is_ignored_with_a_note() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = geta_fx.transform(model, (torch.randn(4, 6),))
    gm.zero_units(gm.prunable_groups()[0].id, [0, 1])
    slim = gm.compress()
    good = report(slim)
    assert good.fp32_macs == 4 * (8 * 6 + 3 * 8) and good.group_sparsity == pytest.approx(2 / 8)
    for bad in ({"format": 1, "channels": {}}, {"format": 99}, "dense"):
        slim.meta[DENSE] = bad
        r = report(slim)  # reports against the graph itself and says why
        assert r.fp32_macs == r.macs == 4 * (6 * 6 + 3 * 6) and r.group_sparsity is None
        assert any("ignored" in n for n in r.notes)


def test_dense_macs_follow_the_report_sizes() -> None:
    """The dense origin is costed at capture-time sizes; at other sizes each dense layer scales
    as its slim layer does (exact: pruning changes only channel dims), and a record whose
    layers do not match the graph's stays at its own sizes, with a note."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = geta_fx.transform(model, (torch.randn(4, 6),))
    gm.zero_units(gm.prunable_groups()[0].id, [0, 1])
    slim = gm.compress()
    x7 = (torch.randn(7, 6),)
    assert report(slim, x7).fp32_macs == report(model, x7).macs == 7 * (8 * 6 + 3 * 8)
    slim.meta[DENSE]["layers"][0][0] = "conv"  # no longer the graph's layers
    r = report(slim, x7)
    assert r.fp32_macs == 4 * (8 * 6 + 3 * 8) and any("do not match" in n for n in r.notes)
    assert report(slim).fp32_macs == 4 * (8 * 6 + 3 * 8)  # at its own sizes: no scaling needed
