"""Channel rules for vision blocks (issue #14): in-place ops, gates, shuffles, windows, GRN.

Each rule: zero units of the groups it makes prunable, ``compress()``, and compare with the
zeroed model (itself checked against the user's eager model); and a case where it must pin.

    model --transform--> gm (== model) --zero half of every group--> zeroed --compress--> slim
    assert slim(x) == zeroed(x) and the op's channels are in a prunable group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import max_rel_err, num_params, zero_random_units
from torch import nn

import geta_fx
from geta_fx.ir import meta, op_sets
from geta_fx.ir.registry import RULES, rule_for
from geta_fx.passes import DependencyGroups

aten = torch.ops.aten


def _exact(model: nn.Module, x: torch.Tensor) -> geta_fx.GetaModule:
    """Transform (== eager), zero half of every prunable group, compress (== zeroed)."""
    model = model.eval()
    gm = geta_fx.transform(model, (x,))
    assert max_rel_err(model(x), gm(x)) <= 1e-6
    assert zero_random_units(gm, 0.5) > 0
    zeroed = gm(x)
    slim = gm.compress()
    assert max_rel_err(zeroed, slim(x)) <= 1e-5
    assert num_params(slim) < num_params(gm)
    return gm


def _group(gm: geta_fx.GetaModule, fqn: str) -> geta_fx.PruneGroup:
    return next(g for g in gm.groups for m in g.members if m.fqn == fqn and m.role == "out")


def _targets(gm: geta_fx.GetaModule) -> set:
    return {n.target for n in gm.graph_module.graph.nodes if n.op == "call_function"}


# --------------------------------------------------------------------------- in-place ops


def test_every_inplace_variant_resolves_to_its_siblings_rule() -> None:
    assert {aten.relu_.default, aten.hardswish_.default, aten.dropout_.default,
            aten.add_.Tensor, aten.mul_.Tensor, aten.hardsigmoid_.default,
            aten.silu_.default, aten.sigmoid_.default} <= op_sets.INPLACE
    for op in op_sets.INPLACE:
        base = op_sets.out_of_place(op)
        rule = rule_for(op)
        assert op not in RULES and rule is not None and rule.op is op, op
        assert rule.no_rewrite == RULES[base].no_rewrite, op
    # no sibling, a sibling without a rule, or one that is a view: no rule (pins)
    for op in (aten.copy_.default, aten.fill_.Scalar, aten.unsqueeze_.default,
               aten.transpose_.default, aten.add.out):
        assert rule_for(op) is None, op


class InplaceActs(nn.Module):
    """MobileNetV3-style in-place activations, residual ``+=``, in-place gate and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.drop = nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.c1(x)))
        y = F.relu(self.bn2(self.c2(h)), inplace=True)
        y += h
        g = F.hardsigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))),
                          inplace=True)
        y.mul_(g)
        return self.head(self.drop(y))


def test_inplace_ops_prune_exactly() -> None:
    gm = _exact(InplaceActs(), torch.randn(2, 3, 8, 8))
    assert {aten.hardswish_.default, aten.relu_.default, aten.add_.Tensor, aten.mul_.Tensor,
            aten.hardsigmoid_.default, aten.dropout_.default} <= _targets(gm)
    g = _group(gm, "c1.weight")
    assert g.prunable and g.num_units == 8
    assert {"c2.weight", "fc2.weight", "bn1.weight"} <= {m.fqn for m in g.members}
    assert _group(gm, "fc1.weight").prunable


class StaleView(nn.Module):
    """A view made before an in-place sigmoid_ and read after it sees sigmoid's values."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        v = h.transpose(2, 3)
        h.sigmoid_()
        return self.c2(v)


def test_inplace_write_read_through_an_older_view_pins() -> None:
    model = StaleView().eval()
    x = torch.randn(2, 3, 4, 5)
    gm = geta_fx.transform(model, (x,))
    assert max_rel_err(model(x), gm(x)) == 0.0
    assert aten.sigmoid_.default in _targets(gm)
    g = _group(gm, "c1.weight")
    assert not g.prunable and "in-place write makes pruned channels non-zero" in g.reason


def test_inplace_write_read_through_the_mutated_tensor_pins() -> None:
    """A graph that reads the operand of ``sigmoid_`` itself afterwards (export always reads
    the result instead, so the graph is edited): the operand takes the result's label."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(self.c1(x).sigmoid_())

    x = torch.randn(2, 3, 4, 4)
    gm = geta_fx.transform(Net().eval(), (x,)).graph_module
    (sig,) = [n for n in gm.graph.nodes if n.target is aten.sigmoid_.default]
    (conv2,) = [n for n in gm.graph.nodes if n.target is aten.conv2d.default and
                n.args[0] is sig]
    conv2.args = (sig.args[0], *conv2.args[1:])  # read the mutated conv1 output
    gm.recompile()
    DependencyGroups()(gm)
    g = next(g for g in gm.meta[meta.GROUPS] for m in g.members if m.fqn == "c1.weight")
    assert not g.prunable and "input channels are not zero" in g.reason


# --------------------------------------------------------------------------- gates


class SE(nn.Module):
    """Squeeze-excitation: ``h * gate(fc2(relu(fc1(pool(h)))))``."""

    def __init__(self, gate: str, gate_first: bool = False) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.gate, self.gate_first = gate, gate_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.c1(x)))
        s = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1))))
        g = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid,
             "cos": lambda t: t.cos() + 2.0}[self.gate](s)
        return self.c2(g * h if self.gate_first else h * g)


@pytest.mark.parametrize(("gate", "gate_first"), [("sigmoid", False), ("hardsigmoid", True),
                                                  ("cos", False)])
def test_a_gate_keeps_the_gated_channels_prunable(gate: str, gate_first: bool) -> None:
    """``h * g``: a channel of ``h`` that is zero gives zero whatever the gate (non-zero at a
    pruned channel: sigmoid(0) = 0.5) says; the gate's channels join ``h``'s units."""
    gm = _exact(SE(gate, gate_first), torch.randn(2, 3, 6, 6))
    g = _group(gm, "c1.weight")
    assert g.prunable and g.num_units == 8
    assert {"fc2.weight", "fc2.bias", "fc1.weight", "c2.weight"} <= {m.fqn for m in g.members}
    assert _group(gm, "fc1.weight").prunable


class NoZeroFactor(nn.Module):
    """Neither factor is zero at a pruned channel: ``sigmoid(h) * g``; or the zero factor
    does not carry the channels: ``relu(c0(x)) [B,1,H,W] * g [B,C,1,1]``."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 8, 1)
        self.fc = nn.Conv2d(8, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.case = case

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        g = torch.sigmoid(self.fc(h.mean((2, 3), keepdim=True)))
        a = torch.sigmoid(h) if self.case == "both_nonzero" else F.relu(self.c0(x))
        return self.c2(a * g)


@pytest.mark.parametrize("case", ["both_nonzero", "zero_factor_broadcast"])
def test_a_product_without_a_zero_factor_on_the_channel_pins(case: str) -> None:
    gm = geta_fx.transform(NoZeroFactor(case).eval(), (torch.randn(2, 3, 4, 4),))
    g = _group(gm, "fc.weight")
    assert not g.prunable and "input channels are not zero when pruned" in g.reason


# --------------------------------------------------------------------------- GRN


class GRNBlock(nn.Module):
    """A ConvNeXt-V2 block: dwconv, LayerNorm, pw1, GELU, GRN, pw2 (channels last).

    GRN: ``gx = ||y||_2 over (H, W)``, ``nx = gx / (mean_C(gx) + eps)``, then
    ``gamma * (y * nx) + beta + y`` (``form="paper"``) or timm's
    ``y + addcmul(beta.view(1, 1, 1, -1), gamma.view(1, 1, 1, -1), y * nx)``.
    ``act="sigmoid"`` makes the GRN input non-zero at pruned channels (must pin).
    """

    def __init__(self, form: str = "paper", act: str = "gelu", c: int = 8,
                 hidden: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.gamma = nn.Parameter(torch.randn(hidden) * 0.5)
        self.beta = nn.Parameter(torch.randn(hidden) * 0.1)
        self.head = nn.Linear(c, 3)
        self.form, self.act = form, act

    def grn(self, y: torch.Tensor) -> torch.Tensor:
        gx = y.norm(p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        if self.form == "paper":
            return self.gamma * (y * nx) + self.beta + y
        shape = (1, 1, 1, -1)
        return y + torch.addcmul(self.beta.view(shape), self.gamma.view(shape), y * nx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = self.pw1(self.norm(self.dw(h).permute(0, 2, 3, 1)))
        y = F.gelu(y) if self.act == "gelu" else torch.sigmoid(y)
        y = self.pw2(self.grn(y)).permute(0, 3, 1, 2)
        return self.head((h + y).mean((2, 3)))


@pytest.mark.parametrize("form", ["paper", "timm"])
def test_grn_channels_prune_exactly(form: str) -> None:
    """GRN's mean over channels counts pruned (zero) channels in its denominator: the slim
    mean divides by the original count, so the kept channels' values do not change."""
    gm = _exact(GRNBlock(form), torch.randn(2, 3, 5, 5))
    g = _group(gm, "pw1.weight")
    assert g.prunable and g.num_units == 16
    assert {"gamma", "beta", "pw2.weight"} <= {m.fqn for m in g.members}
    assert next(m for m in g.members if m.fqn == "gamma").role == "out"
    assert (aten.addcmul.default in _targets(gm)) == (form == "timm")


@pytest.mark.parametrize("form", ["paper", "timm"])
def test_grn_over_channels_that_are_not_zero_pins(form: str) -> None:
    gm = geta_fx.transform(GRNBlock(form, act="sigmoid").eval(), (torch.randn(2, 3, 5, 5),))
    g = _group(gm, "pw1.weight")
    assert not g.prunable and "reduces over the channel dim" in g.reason


def test_addcmul_needs_a_zero_term_and_a_zero_factor() -> None:
    """``s + t1 * t2``: zero if ``s`` and one factor are; a non-trainable (buffer) ``s`` is
    not zeroed with the unit."""
    class Net(nn.Module):
        def __init__(self, trainable: bool) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)
            self.s = nn.Parameter(torch.randn(6, 1, 1), requires_grad=trainable)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c1(x)
            return self.c2(torch.addcmul(self.s, torch.sigmoid(h), h, value=0.5))

    x = torch.randn(2, 3, 4, 4)
    gm = _exact(Net(True), x)
    assert _group(gm, "c1.weight").prunable
    gm = geta_fx.transform(Net(False).eval(), (x,))
    g = _group(gm, "c1.weight")
    assert not g.prunable and "input channels are not zero" in g.reason


# --------------------------------------------------------------------------- channel shuffle


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle."""
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)


class Shuffled(nn.Module):
    """conv -> bn -> relu -> shuffle -> grouped conv (-> shuffle again, as ShuffleNet v1)."""

    def __init__(self, groups: int = 2, twice: bool = False) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.c3 = nn.Conv2d(12, 5, 1)
        self.groups, self.twice = groups, twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = channel_shuffle(F.relu(self.bn(self.c1(x))), self.groups)
        h = self.c2(h)
        if self.twice:
            h = channel_shuffle(h, 4)
        return self.c3(F.relu(h))


@pytest.mark.parametrize(("groups", "twice"), [(2, False), (3, False), (3, True)])
def test_channel_shuffle_keeps_one_unit_per_channel(groups: int, twice: bool) -> None:
    gm = _exact(Shuffled(groups, twice), torch.randn(2, 3, 5, 5))
    g = _group(gm, "c1.weight")
    assert g.prunable and g.num_units == 12 and g.unit_size == 1
    dw = next(m for m in g.members if m.fqn == "c2.weight" and m.dim == 0)
    # the depthwise conv's channel j reads c1's channel perm[j]: shuffled, not merged
    perm = torch.arange(12).reshape(groups, -1).T.reshape(-1)
    assert torch.equal(dw.units[dw.indices.argsort()], perm)
    slim = gm.compress()
    assert aten.index_select.default in {n.target for n in slim.graph.nodes}
    assert aten.transpose.int not in {n.target for n in slim.graph.nodes}


def test_a_shuffle_whose_inner_view_is_read_elsewhere_merges_rows() -> None:
    """The split view read by a second op is no pure index map: the generic reshape rule
    applies (a unit is a whole row of C / g channels)."""
    class Net(Shuffled):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.bn(self.c1(x)))
            b, c, hh, w = h.shape
            v = h.view(b, 2, c // 2, hh, w)
            s = v.transpose(1, 2).contiguous().view(b, c, hh, w)
            return self.c3(F.relu(self.c2(s))) + v.sum((1, 2)).mean().reshape(1, 1, 1, 1)

    gm = _exact(Net(), torch.randn(2, 3, 5, 5))
    g = _group(gm, "c1.weight")
    assert g.num_units == 2 and g.unit_size == 6


# --------------------------------------------------------------------------- Swin windows


class Windows(nn.Module):
    """Swin's shifted windows around a per-token MLP: roll, partition, MLP, merge, roll back
    (channels last).  ``roll_dims`` other than the token grid's must pin."""

    def __init__(self, roll_dims: tuple[int, ...] | None = (1, 2), c: int = 8,
                 ws: int = 2) -> None:
        super().__init__()
        self.embed, self.mlp, self.head = nn.Linear(3, c), nn.Linear(c, c), nn.Linear(c, 2)
        self.roll_dims, self.ws = roll_dims, ws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, hh, w, c = h.shape
        ws, dims = self.ws, self.roll_dims
        shift = (-1,) * len(dims) if dims else -1
        t = torch.roll(h, shifts=shift, dims=dims) if dims else torch.roll(h, -1)
        t = t.view(b, hh // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        t = F.gelu(self.mlp(t.reshape(-1, ws * ws, c)))
        t = t.view(b, hh // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, w, c)
        return self.head((h + torch.roll(t, shifts=1, dims=(1,))).mean((1, 2)))


def test_swin_windows_and_roll_keep_the_hidden_dim_prunable() -> None:
    gm = _exact(Windows(), torch.randn(2, 4, 6, 3))
    assert aten.roll.default in _targets(gm)
    for fqn in ("embed.weight", "mlp.weight"):
        g = _group(gm, fqn)
        assert g.prunable and g.num_units == 8, fqn


@pytest.mark.parametrize("dims", [(3,), (2, 3), None])
def test_a_roll_across_the_channels_pins(dims: tuple[int, ...] | None) -> None:
    gm = geta_fx.transform(Windows(dims).eval(), (torch.randn(2, 4, 6, 3),))
    g = _group(gm, "embed.weight")
    assert not g.prunable and "roll moves entries across the channel dim" in g.reason


# --------------------------------------------------------------------------- pad


class Padded(nn.Module):
    """``F.pad`` of a conv's output, channels first: ``widths`` pairs from the last dim."""

    def __init__(self, widths: tuple[int, ...], mode: str = "constant", value: float = 0.0,
                 out_in: int = 6) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 6, 1), nn.Conv1d(out_in, 2, 1)
        self.widths, self.mode, self.value = widths, mode, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        if self.mode == "constant":
            h = F.pad(h, self.widths, value=self.value)
        else:  # a copy mode pads the trailing dims: put the channels last
            h = F.pad(h.transpose(1, 2), self.widths, mode=self.mode).transpose(1, 2)
        return self.c2(h)


@pytest.mark.parametrize(("widths", "out_in"), [((1, 2), 6), ((0, 0, 2, 1), 9),
                                                ((1, 1, 0, 3), 9)])
def test_zero_padding_keeps_channels_prunable(widths: tuple[int, ...], out_in: int) -> None:
    """Spatial zero padding passes; padding the channel dim with zeros adds channels no
    layer produces on both sides (the pad widths stay right after pruning)."""
    gm = _exact(Padded(widths, out_in=out_in), torch.randn(2, 3, 5))
    g = _group(gm, "c1.weight")
    assert g.prunable and g.num_units == 6
    cols = next(m for m in g.members if m.fqn == "c2.weight")
    before = widths[2] if len(widths) > 2 else 0
    assert cols.indices.tolist() == list(range(before, before + 6))


@pytest.mark.parametrize(("widths", "mode", "value", "reason"), [
    ((1, 1), "constant", 0.5, "input channels are not zero"),
    ((1, 1), "reflect", 0.0, "pads a channel dim other than with a constant"),
    ((0, 0, -1, 0), "constant", 0.0, "pads a channel dim other than with a constant"),
])
def test_padding_that_is_not_zero_or_copies_channels_pins(widths: tuple[int, ...], mode: str,
                                                         value: float, reason: str) -> None:
    out_in = 6 + sum(widths[2:])
    model = Padded(widths, mode, value, out_in=out_in if mode == "constant" else 8)
    gm = geta_fx.transform(model.eval(), (torch.randn(2, 3, 5),))
    g = _group(gm, "c1.weight")
    assert not g.prunable and reason in g.reason
