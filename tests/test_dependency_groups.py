"""dependency_groups: structure of the groups for the coupling patterns of DESIGN §4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geta_fx
from geta_fx.ir import meta


def _groups(model: nn.Module, *inputs: torch.Tensor) -> tuple[geta_fx.PruneGroup, ...]:
    return geta_fx.transform(model.eval(), inputs).groups


def _group_of(groups: tuple, fqn: str, dim: int = 0, role: str = "out") -> geta_fx.PruneGroup:
    return next(g for g in groups for m in g.members
                if m.fqn == fqn and m.dim == dim and m.role == role)


class Concat(nn.Module):
    """a(4) ; b(6) -> cat -> bn(10) -> conv"""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.bn, self.c = nn.BatchNorm2d(10), nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


def test_concat_offsets_split_consumer_params_between_groups() -> None:
    groups = _groups(Concat(), torch.randn(1, 3, 4, 4))
    ga, gb = _group_of(groups, "a.weight"), _group_of(groups, "b.weight")
    assert ga.id != gb.id and ga.num_units == 4 and gb.num_units == 6
    bn_a = next(m for m in ga.members if m.fqn == "bn.weight")
    bn_b = next(m for m in gb.members if m.fqn == "bn.weight")
    assert bn_a.indices.tolist() == [0, 1, 2, 3]
    assert bn_b.indices.tolist() == [4, 5, 6, 7, 8, 9]
    assert bn_b.units.tolist() == list(range(6))
    c_b = next(m for m in gb.members if m.fqn == "c.weight")
    assert c_b.role == "in" and c_b.dim == 1 and c_b.indices.tolist() == [4, 5, 6, 7, 8, 9]


def test_flatten_linear_expands_each_channel_to_its_spatial_block() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4, 2))
    groups = _groups(model, torch.randn(1, 3, 4, 4))
    g = _group_of(groups, "0.weight")
    fc = next(m for m in g.members if m.fqn == "3.weight")
    assert fc.dim == 1 and fc.units.tolist() == [u for u in range(5) for _ in range(4)]


def test_groupnorm_unit_is_a_norm_group_and_depthwise_joins_producer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    groups = _groups(model, torch.randn(1, 3, 4, 4))
    g = _group_of(groups, "0.weight")
    assert g.num_units == 4 and g.unit_size == 2
    assert _group_of(groups, "3.weight").id == g.id  # depthwise conv is in the same group


def test_residual_add_ties_producers_and_sigmoid_input_pins() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)
            self.d = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x) + self.b(x)
            return self.c(h) + self.d(torch.sigmoid(h)).sum(1, keepdim=True)

    groups = _groups(Res(), torch.randn(2, 4))
    g = _group_of(groups, "a.weight")
    assert _group_of(groups, "b.weight").id == g.id
    # sigmoid(0) = 0.5: pruned channels would still feed `d`, so the group is pinned
    assert not g.prunable and "not zero" in g.reason


def test_softmax_over_channels_pins_with_reason() -> None:
    class Soft(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).softmax(-1))

    g = _group_of(_groups(Soft(), torch.randn(2, 4)), "a.weight")
    assert not g.prunable and "softmax" in g.reason


def test_node_annotations_and_not_modified() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    gm = geta_fx.transform(model.eval(), (torch.randn(1, 3, 4, 4),))
    code = gm.graph_module.code
    res = geta_fx.passes.DependencyGroups()(gm.graph_module)
    assert res.modified is False and gm.graph_module.code == code
    relu = next(n for n in gm.graph_module.graph.nodes if n.name == "relu")
    (member,) = relu.meta[meta.GROUP]
    assert member.group_id == 0 and member.dims == (1,)


def test_ids_are_deterministic() -> None:
    a = [repr(g) for g in _groups(Concat(), torch.randn(1, 3, 4, 4))]
    b = [repr(g) for g in _groups(Concat(), torch.randn(1, 3, 4, 4))]
    assert a == b


class HandLinear(nn.Module):
    """Linear layers written as ``x @ W.T + b`` (like transformers' FalconLinear), ``W.t()``
    and ``W.mT``: the weight reaches the matmul through a transposing view."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(24, 12)), nn.Parameter(torch.randn(24))
        self.w2 = nn.Parameter(torch.randn(16, 24))
        self.w3 = nn.Parameter(torch.randn(4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x @ self.w1.T + self.b1)
        h = F.gelu(torch.matmul(h, self.w2.t()))
        return h @ self.w3.mT


def test_weights_through_transposing_views_are_grouped() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12)
    gm = geta_fx.transform(HandLinear(), (x,))
    by_fqn = {frozenset(m.fqn for m in g.members): g for g in gm.groups}
    g1 = by_fqn[frozenset({"w1", "b1", "w2"})]
    g2 = by_fqn[frozenset({"w2", "w3"})]
    assert g1.prunable and g1.num_units == 24 and g2.prunable and g2.num_units == 16
    gm.zero_units(g1.id, [0, 5, 7])
    gm.zero_units(g2.id, [1, 2])
    slim = gm.compress()
    assert slim.w1.shape == (21, 12) and slim.w2.shape == (14, 21) and slim.w3.shape == (4, 14)
    torch.testing.assert_close(slim(x), gm(x))


def test_hf_falcon_fused_linear_layers_prune_exactly() -> None:
    pytest.importorskip("transformers")
    from geta_fx.cli import build_hf

    model, inputs = build_hf("FalconForCausalLM")  # FalconLinear: x @ self.weight.T
    gm = geta_fx.transform(model, inputs)
    mlp = [g for g in gm.groups if g.prunable
           and any("dense_h_to_4h" in m.fqn for m in g.members)]
    assert mlp, [str(g) for g in gm.groups]
    for g in gm.groups:
        if g.prunable:
            gm.zero_units(g.id, list(range(0, g.num_units, 2)))
    gm.eval()
    slim = gm.compress()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in gm.parameters())
    torch.testing.assert_close(slim(*inputs).logits, gm(*inputs).logits, atol=1e-5, rtol=1e-4)


class WhereScalar(nn.Module):
    def __init__(self, fill: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fill = nn.Linear(6, 10), nn.Linear(10, 3), fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.where(h > 0, h, self.fill))  # where.ScalarOther


def test_where_with_a_scalar_branch_is_zero_invariant_only_for_zero() -> None:
    x = torch.randn(4, 6)
    gm = geta_fx.transform(WhereScalar(0.0), (x,))
    (g,) = [g for g in gm.groups if g.prunable]
    gm.zero_units(g.id, [2, 7])
    torch.testing.assert_close(gm.compress()(x), gm(x))
    gm = geta_fx.transform(WhereScalar(-1.0), (x,))  # a zeroed channel becomes -1: not zero
    (hidden,) = [g for g in gm.groups if any(m.fqn == "fc1.weight" for m in g.members)]
    assert not hidden.prunable and "non-zero" in hidden.reason


class BiasedAttention(nn.Module):
    """4-head attention with a per-head additive bias: a learned table over relative distance
    (T5-style, the bias carries the heads as channels) or fixed slopes (ALiBi-style, computed)."""

    def __init__(self, table: bool) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)
        self.table = table
        if table:
            self.rel = nn.Embedding(7, 4)  # [distance bucket, head]
        else:
            self.register_buffer("slopes", torch.linspace(0.1, 0.8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (h.view(b, t, 4, 4).transpose(1, 2) for h in self.qkv(x).chunk(3, dim=-1))
        pos = torch.arange(t)
        dist = (pos[None, :] - pos[:, None]).abs()
        if self.table:
            bias = self.rel(dist.clamp(max=6)).permute(2, 0, 1)[None]
        else:
            bias = -self.slopes.view(1, 4, 1, 1) * dist[None, None].float()
        y = F.scaled_dot_product_attention(q, k, v, bias)
        return self.o(y.transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("table", [True, False])
def test_per_head_attention_bias_keeps_heads_prunable(table: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    gm = geta_fx.transform(BiasedAttention(table).eval(), (x,))
    (heads,) = [g for g in gm.groups if any(m.fqn == "o.weight" for m in g.members)
                and g.num_units == 4]
    assert heads.prunable, heads
    assert ("rel.weight" in {m.fqn for m in heads.members}) == table
    gm.zero_units(heads.id, [1, 3])
    slim = gm.compress()
    assert slim.qkv.weight.shape == (24, 16)
    if table:
        assert slim.rel.weight.shape == (7, 2)
    torch.testing.assert_close(slim(x), gm(x), atol=1e-6, rtol=1e-5)


def test_parameters_in_no_group_each_get_a_reason() -> None:
    class ScaledByCumsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x) * self.scale.cumsum(0))

    gm = geta_fx.transform(ScaledByCumsum(), (torch.randn(3, 4),))
    grouped = {s.fqn for g in gm.groups for s in g.members}
    assert {"fc.weight", "out.weight"} <= grouped
    assert [(n.fqn, n.reason) for n in meta.get_ungrouped(gm.graph_module)] == [
        ("scale", "read only by cumsum.default, which carry no channel of any layer")]
    plain = geta_fx.transform(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)),
                              (torch.randn(3, 4),))
    assert meta.get_ungrouped(plain.graph_module) == ()


def test_no_group_at_all_is_a_warning_naming_each_parameter(
        caplog: pytest.LogCaptureFixture) -> None:
    class OnlyCumsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w.cumsum(0)

    with caplog.at_level("WARNING", logger="geta_fx.passes.dependency_groups"):
        gm = geta_fx.transform(OnlyCumsum(), (torch.randn(2, 3),))
    assert gm.groups == ()
    assert "found no prune group" in caplog.text and "w (read only by cumsum" in caplog.text


class Lgamma(nn.Module):
    """conv(4) -> lgamma (no rule) -> conv: the channels lgamma touches are pinned"""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.lgamma(F.relu(self.a(x)) + 1))


def test_an_op_without_a_rule_pins_its_channels_with_the_reason() -> None:
    groups = _groups(Lgamma(), torch.randn(1, 3, 4, 4))
    ga = _group_of(groups, "a.weight")
    assert not ga.prunable and "unsupported op lgamma.default" in ga.reason


def test_a_rule_that_fails_pins_its_channels_instead_of_crashing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from geta_fx.ir import ops_table, registry

    def boom(an: object, node: torch.fx.Node) -> None:
        raise RuntimeError("boom")

    relu = torch.ops.aten.relu.default
    assert ops_table.RULES[relu].analyze is not boom
    monkeypatch.setitem(registry._RULES, relu, registry.ChannelRule(relu, boom, no_rewrite="t"))
    ga = _group_of(_groups(Concat(), torch.randn(1, 3, 4, 4)), "a.weight")
    assert not ga.prunable and "relu.default: could not analyse (RuntimeError: boom)" in ga.reason
