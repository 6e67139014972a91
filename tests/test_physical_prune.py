"""physical_prune: slim == zeroed == a hand-pruned reference module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geta_fx
from geta_fx.passes import PhysicalPrune


class Net(nn.Module):
    def __init__(self, c1: int = 6, c2: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(h)).mean((2, 3)))


def test_matches_hand_pruned_reference() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(model, (x,))
    gm.zero_units(0, [1, 4])
    gm.zero_units(1, [0])
    slim = gm.compress()
    keep1, keep2 = [0, 2, 3, 5], [1, 2, 3, 4]
    ref = Net(4, 4).eval()
    src = gm.graph_module
    with torch.no_grad():
        ref.conv1.weight.copy_(src.conv1.weight[keep1])
        ref.conv1.bias.copy_(src.conv1.bias[keep1])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref.bn1, name).copy_(getattr(src.bn1, name)[keep1])
        ref.conv2.weight.copy_(src.conv2.weight[keep2][:, keep1])
        ref.conv2.bias.copy_(src.conv2.bias[keep2])
        ref.fc.weight.copy_(src.fc.weight[:, keep2])
        ref.fc.bias.copy_(src.fc.bias)
    torch.testing.assert_close(slim(x), ref(x))
    torch.testing.assert_close(slim(x), gm(x))
    assert slim.conv2.weight.shape == (4, 4, 3, 3)
    assert slim.bn1.running_mean.shape == (4,)
    assert slim.conv2.weight.requires_grad


def test_nothing_zero_not_modified_and_explicit_units() -> None:
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(model, (x,))
    import copy

    g = copy.deepcopy(gm.graph_module)
    code = g.code
    assert PhysicalPrune()(g).modified is False and g.code == code
    removed = np.zeros(sum(grp.num_units for grp in gm.groups), dtype=bool)
    removed[[0, 1]] = True  # first two units of group 0, even though they are not zero
    slim = gm.compress(removed_units=removed)
    assert slim.conv1.weight.shape[0] == 4


def test_shape_constants_rewritten_for_heads_and_chunks() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 4)
            self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = (y.view(b, t, 4, 4).transpose(1, 2) for y in self.qkv(x).split(16, -1))
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16)
            a, g = self.up(y).chunk(2, -1)
            return self.out(self.down(a * F.silu(g)))

    x = torch.randn(2, 5, 16)
    gm = geta_fx.transform(Heads().eval(), (x,))
    heads = next(g for g in gm.groups if any(m.fqn == "qkv.weight" for m in g.out_members))
    glu = next(g for g in gm.groups if any(m.fqn == "up.weight" for m in g.out_members))
    assert heads.prunable and glu.prunable
    assert (heads.num_units, heads.unit_size) == (4, 12)  # q, k, v rows of one head
    assert (glu.num_units, glu.unit_size) == (16, 2)  # value channel + its gate channel
    gm.zero_units(heads.id, [2])
    gm.zero_units(glu.id, [0, 3, 9])
    slim = gm.compress()
    torch.testing.assert_close(slim(x), gm(x), atol=1e-5, rtol=1e-4)
    assert slim.qkv.weight.shape[0] == 36 and slim.up.weight.shape[0] == 26
    assert "split_with_sizes" in slim.code  # chunk(2) became explicit sizes


def test_align_keeps_channel_counts_multiples_and_outputs_exact() -> None:
    torch.manual_seed(1)
    model = Net(20, 13).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(model, (x,))
    gm.zero_units(0, [0, 3, 4, 7, 9, 11, 15])  # 13 of 20 kept
    gm.zero_units(1, [2, 5])  # 11 of 13 kept
    plain = gm.compress()
    assert plain.conv1.weight.shape[0] == 13 and plain.conv2.weight.shape[0] == 11
    slim = gm.compress(align=4)
    # 13 -> 16 (three zero units kept back); 11 -> 12 (13 is not reachable as a multiple: 12)
    assert slim.conv1.weight.shape[0] == 16 and slim.conv2.weight.shape[0] == 12
    torch.testing.assert_close(slim(x), gm(x))
    torch.testing.assert_close(slim(x), plain(x))
    # a group that cannot reach a multiple keeps all its units: 13 channels, align 8 -> 13
    full = gm.compress(align=8)
    assert full.conv1.weight.shape[0] == 16 and full.conv2.weight.shape[0] == 13
    torch.testing.assert_close(full(x), gm(x))


class WideMLP(nn.Module):
    """x -> fc1 (64) -> relu -> fc2 (16) -> relu -> fc3: two prunable hidden groups."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 64), nn.Linear(64, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize(("zero64", "zero16", "want64", "want16"), [
    (20, 5, 48, 11),  # 44 -> 48 (+4 <= 44/8); 11 -> 16 would add 5 > 11/8: stays 11
    (3, 0, 64, 16),   # 61 -> 64 (+3): nothing removed, as the dense width
    (33, 8, 32, 8),   # 31 -> 32 (+1); 8 is already a multiple
])
def test_auto_align_rounds_up_only_where_the_rule_says_it_pays(zero64: int, zero16: int,
                                                                want64: int,
                                                                want16: int) -> None:
    torch.manual_seed(0)
    gm = geta_fx.transform(WideMLP().eval(), (torch.randn(4, 8),))
    g64, g16 = (g for g in gm.prunable_groups() if g.num_units in (64, 16))
    if zero64:
        gm.zero_units(g64.id, list(range(zero64)))
    if zero16:
        gm.zero_units(g16.id, list(range(zero16)))
    x = torch.randn(5, 8)
    auto, exact = gm.compress(), gm.compress(align=1)
    assert exact.fc1.weight.shape[0] == 64 - zero64 and exact.fc2.weight.shape[0] == 16 - zero16
    kept64, kept16 = auto.fc1.weight.shape[0], auto.fc2.weight.shape[0]
    assert (kept64, kept16) == (want64, want16)
    torch.testing.assert_close(auto(x), gm(x))
    torch.testing.assert_close(auto(x), exact(x))


def test_align_rejects_bad_values() -> None:
    gm = geta_fx.transform(Net().eval(), (torch.randn(1, 3, 8, 8),))
    for bad in (0, -2, 2.0, True, "8"):
        with pytest.raises(geta_fx.InputError, match="align"):
            gm.compress(align=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="align"):
        PhysicalPrune(align=0)


class TwoNorms(nn.Module):
    """A norm reading a norm over the pruned hidden dim (Bloom: embedding LayerNorm, then the
    first block's LayerNorm): the second rewrite must see the first one's replacement."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.ln1, self.ln2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.rms = nn.RMSNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.rms(self.ln2(self.ln1(self.fc1(x)))))


def test_chained_norms_over_a_pruned_dim_stay_exact() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    gm = geta_fx.transform(TwoNorms().eval(), (x,))
    (hidden,) = [g for g in gm.groups if g.prunable]
    assert {"ln1.weight", "ln2.weight", "rms.weight"} <= {m.fqn for m in hidden.members}
    gm.zero_units(hidden.id, [1, 4, 9, 10, 15])
    slim = gm.compress()
    assert slim.fc1.weight.shape == (11, 8) and slim.ln2.weight.shape == (11,)
    torch.testing.assert_close(slim(x), gm(x), atol=1e-5, rtol=1e-5)


def _call(slim: torch.fx.GraphModule, target: object) -> torch.fx.Node:
    return next(n for n in slim.graph.nodes if n.op == "call_function" and n.target is target)


class HeadsAndNarrow(nn.Module):
    """a(8) -> unflatten(1, (2, 4)) -> relu -> flatten -> b;  a -> narrow(1, 2, 4) -> c"""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h.unflatten(1, (2, 4)).relu().flatten(1, 2)) + self.c(h.narrow(1, 2, 4))


def test_unflatten_sizes_and_narrow_bounds_follow_the_kept_channels() -> None:
    x = torch.randn(2, 3, 4, 4)
    gm = geta_fx.transform(HeadsAndNarrow().eval(), (x,))
    (blocks,) = [g for g in gm.groups if g.prunable]
    assert blocks.num_units == 2 and blocks.unit_size == 4  # unflatten makes 4-blocks whole
    gm.zero_units(blocks.id, [0])
    slim = gm.compress()
    torch.testing.assert_close(slim(x), gm(x))
    aten = torch.ops.aten
    assert list(_call(slim, aten.unflatten.int).args[2]) == [1, 4]
    assert _call(slim, aten.narrow.default).args[1:] == (1, 0, 2)  # channels 4, 5 of 2..5
    assert slim.c.weight.shape == (2, 2, 1, 1)


class SelectAfterCat(nn.Module):
    """cat(a(4), b(4)) -> select(1, 6) (pins b's group) ; a's group pruned: index 6 moves"""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.a(x), self.b(x)], 1)
        return self.c(h) + h.select(1, 6).unsqueeze(1)


def test_select_index_follows_the_kept_channels() -> None:
    x = torch.randn(2, 3, 4, 4)
    gm = geta_fx.transform(SelectAfterCat().eval(), (x,))
    ga = next(g for g in gm.groups for m in g.members if m.fqn == "a.weight" and m.role == "out")
    gb = next(g for g in gm.groups for m in g.members if m.fqn == "b.weight" and m.role == "out")
    assert ga.prunable and not gb.prunable and "select picks one channel" in gb.reason
    gm.zero_units(ga.id, [0, 2])
    slim = gm.compress()
    torch.testing.assert_close(slim(x), gm(x))
    assert _call(slim, torch.ops.aten.select.int).args[1:] == (1, 4)
