"""Attention heads as units: packed q/k/v picked apart by select/unbind, heads interleaved with
a dynamic batch (``[L, B*H, D]``), einsum attention, a class token on the sequence dim.

Every prunable case zeroes units, compresses, and checks the slim model against the user's
eager model holding the same zeroed weights (the oracle), at the capture sizes and at others
(the batch and sequence stay dynamic); every rule has a case where it must pin.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import geta_fx
from geta_fx.ir.rules_attention import parse_equation
from geta_fx.testing.models import EinsumAttention, PackedMHA, UnbindQKV
from helpers import max_rel_err, zero_eager


def _group_of(gm: geta_fx.GetaModule, fqn: str) -> geta_fx.PruneGroup:
    return next(g for g in gm.groups if any(m.fqn == fqn and m.role == "out" for m in g.members))


def _check_slim(model: nn.Module, gm: geta_fx.GetaModule, *inputs: torch.Tensor) -> nn.Module:
    """compress() == the zeroed eager model, on each input."""
    slim = gm.compress()
    oracle = zero_eager(model, gm).eval()
    for x in inputs:
        with torch.no_grad():
            assert max_rel_err(slim(x), oracle(x)) < 1e-5
    return slim


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_heads_are_units(batch_first: bool, need_weights: bool) -> None:
    """linear -> unflatten(-1, (3, E)) -> unsqueeze/transpose/squeeze -> select(0, i) -> view
    [L, B*H, D] -> sdpa (or bmm/softmax/bmm with need_weights): a unit is one head's q, k
    and v rows of in_proj_weight/in_proj_bias (and out_proj's columns)."""
    torch.manual_seed(0)
    model = PackedMHA(16, 4, batch_first=batch_first, need_weights=need_weights).eval()
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    gm = geta_fx.transform(model, (torch.randn(*shape),))
    heads = _group_of(gm, "mha.in_proj_weight")
    assert heads.prunable, heads.reason
    assert (heads.num_units, heads.unit_size) == (4, 12)  # 4 heads x (q, k, v) x head_dim 4
    assert {(m.fqn, m.dim) for m in heads.members} == {
        ("mha.in_proj_weight", 0), ("mha.in_proj_bias", 0), ("mha.out_proj.weight", 1)}
    gm.zero_units(heads.id, [1, 3])
    other = (3, 7, 16) if batch_first else (7, 3, 16)
    slim = _check_slim(model, gm, torch.randn(*shape), torch.randn(*other))
    assert slim.mha.in_proj_weight.shape == (24, 16)
    assert slim.mha.out_proj.weight.shape == (16, 8)
    row = torch.arange(48).view(3, 4, 4)[:, [0, 2]].reshape(-1)  # the kept heads' rows
    torch.testing.assert_close(slim.mha.in_proj_weight, gm.graph_module.mha.in_proj_weight[row])


def test_head_averaged_attention_weights_pin_the_heads() -> None:
    """Returning the weights averaged over heads: a pruned head's softmax is not zero, and
    the average's divisor is the head count, so the heads must stay whole."""
    model = PackedMHA(16, 4, return_weights=True).eval()
    gm = geta_fx.transform(model, (torch.randn(2, 5, 16),))
    heads = _group_of(gm, "mha.in_proj_weight")
    assert not heads.prunable and "reduces over the channel dim" in heads.reason


def test_unbind_of_packed_qkv_keeps_heads_prunable() -> None:
    """timm's ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``."""
    torch.manual_seed(0)
    model = UnbindQKV(16, 4).eval()
    gm = geta_fx.transform(model, (torch.randn(2, 5, 16),))
    heads = _group_of(gm, "qkv.weight")
    assert heads.prunable, heads.reason
    assert (heads.num_units, heads.unit_size) == (4, 12)
    gm.zero_units(heads.id, [0])
    slim = _check_slim(model, gm, torch.randn(2, 5, 16), torch.randn(3, 9, 16))
    assert slim.qkv.weight.shape == (36, 16)


class _PackedAlsoReadWhole(nn.Module):
    """The unflattened q/k/v is picked apart *and* reduced over its q/k/v dim."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, 8))
        return self.head(qkv.select(-2, 0) * qkv.amax(-2))


def test_select_of_a_packed_dim_read_whole_elsewhere_pins() -> None:
    gm = geta_fx.transform(_PackedAlsoReadWhole().eval(), (torch.randn(2, 8),))
    g = _group_of(gm, "qkv.weight")
    assert not g.prunable and "select picks one channel" in g.reason


class _TiledThenSliced(nn.Module):
    """Heads interleaved with a dynamic batch ([B*H, T, D]), then sliced along that dim."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.proj(x).transpose(0, 1).reshape(t, b * 4, 2)
        h = torch.cat([h[:, :1] * 2, h[:, 1:]], 1)  # touches one (batch, head) pair only
        return self.head(h.reshape(t, b, 8).transpose(0, 1))


def test_tiled_heads_reaching_an_op_that_cannot_follow_them_pin() -> None:
    model = _TiledThenSliced().eval()
    x = torch.randn(2, 5, 8)
    gm = geta_fx.transform(model, (x,))
    g = _group_of(gm, "proj.weight")
    assert not g.prunable and "tiled" in g.reason
    torch.testing.assert_close(gm(x), model(x))


# --------------------------------------------------------------------------- einsum

def test_einsum_attention_heads_and_einsum_layer_prune_exactly() -> None:
    """bhqd,bhkd->bhqk and bhqk,bhkd->bhqd unify q/k/v heads; bld,hd->blh is a stem over a
    bare weight parameter (its rows "out", the consumer's columns "in")."""
    torch.manual_seed(0)
    model = EinsumAttention(16, 4, inner=6).eval()
    x = torch.randn(2, 5, 16)
    gm = geta_fx.transform(model, (x,))
    heads, inner = _group_of(gm, "qkv.weight"), _group_of(gm, "w_up")
    assert heads.prunable and inner.prunable, (heads.reason, inner.reason)
    assert (heads.num_units, heads.unit_size) == (4, 12) and inner.num_units == 6
    assert {(m.fqn, m.dim, m.role) for m in inner.members} == {
        ("w_up", 0, "out"), ("down.weight", 1, "in")}
    hidden = _group_of(gm, "proj.weight")  # the residual stream reads w_up's columns
    assert ("w_up", 1, "in") in {(m.fqn, m.dim, m.role) for m in hidden.members}
    gm.zero_units(heads.id, [2])
    gm.zero_units(inner.id, [0, 5])
    slim = _check_slim(model, gm, x, torch.randn(3, 7, 16))
    assert slim.qkv.weight.shape == (36, 16) and slim.w_up.shape == (4, 16)


class _EinsumPins(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.a, self.b, self.head = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.case == "contract_nonzero":  # neither factor is zero on a pruned channel
            s = torch.einsum("bc,bc->b", torch.sigmoid(self.a(x)), torch.sigmoid(self.b(x)))
            return self.head(self.a(x) * s[:, None])
        if self.case == "computed_operand":  # y runs along a's channels, unlabelled
            return self.head(torch.einsum("bc,bc->bc", self.a(x), y))
        return self.head(torch.einsum("bcc->bc", self.a(x)[:, :, None].expand(-1, -1, 6)))


@pytest.mark.parametrize(("case", "reason"), [
    ("contract_nonzero", "not zero when pruned"),
    ("computed_operand", "carries no channels and is no parameter"),
    ("diagonal", "repeated in an operand"),
])
def test_einsum_pins_what_it_cannot_prove(case: str, reason: str) -> None:
    model = _EinsumPins(case).eval()
    x, y = torch.randn(2, 8), torch.randn(2, 6)
    gm = geta_fx.transform(model, (x, y))
    g = _group_of(gm, "a.weight")
    assert not g.prunable and reason in g.reason, g.reason
    torch.testing.assert_close(gm(x, y), model(x, y))


def test_parse_equation_expands_ellipsis_and_implicit_output() -> None:
    assert parse_equation("...ij,...jk->...ik", [4, 3]) == (["01ij", "1jk"], "01ik")
    assert parse_equation("ij,jk", [2, 2]) == (["ij", "jk"], "ik")
    assert parse_equation("ij,jk->ik", [3, 2]) is None


# --------------------------------------------------------------------------- class token

class _TokenViT(nn.Module):
    """patch embedding -> cat([class token, patches], dim=1) + position embedding -> LN ->
    MLP -> the class token's row -> head (ViT/DeiT with a [1, 1, E] token, CLIP with [E];
    ``token="input"``: the token is a caller's tensor)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.embed, self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.cls = nn.Parameter(torch.randn(8) if token == "1d" else torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.ln = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        cls = tok if self.token == "input" else self.cls.expand(b, 1, -1)
        h = torch.cat([cls, self.embed(x)], dim=1) + self.pos
        h = h + self.fc(torch.relu(self.ln(h)))
        return self.head(h[:, 0])


@pytest.mark.parametrize("token", ["1d", "3d"])
def test_class_token_channels_are_sliced_with_the_hidden_units(token: str) -> None:
    torch.manual_seed(0)
    model = _TokenViT(token).eval()
    x, tok = torch.randn(2, 4, 6), torch.randn(2, 1, 8)
    gm = geta_fx.transform(model, (x, tok))
    hidden = _group_of(gm, "embed.weight")
    assert hidden.prunable, hidden.reason
    dims = {(m.fqn, m.dim) for m in hidden.members}
    assert {("cls", 0 if token == "1d" else 2), ("pos", 2), ("ln.weight", 0)} <= dims
    gm.zero_units(hidden.id, [1, 4, 6])
    slim = gm.compress()
    oracle = zero_eager(model, gm).eval()
    for b in (2, 3):
        xb = torch.randn(b, 4, 6)
        with torch.no_grad():
            assert max_rel_err(slim(xb, tok), oracle(xb, tok)) < 1e-5
    assert slim.cls.shape[-1] == 5 and slim.pos.shape == (1, 5, 5)


def test_a_token_no_layer_produces_pins_the_hidden_units() -> None:
    model = _TokenViT("input").eval()
    gm = geta_fx.transform(model, (torch.randn(2, 4, 6), torch.randn(2, 1, 8)))
    g = _group_of(gm, "embed.weight")
    assert not g.prunable and "no layer produces" in g.reason
