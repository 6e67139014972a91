"""LSTM/GRU/RNN hidden units as a prune group (geta_fx/ir/rules_rnn.py).

    x -> Linear stem -> relu -> nn.LSTM | nn.GRU | nn.RNN (layers, directions) -> Linear head

A unit is hidden unit j: its gate rows in every layer and direction, the weight_hh columns,
the next layer's weight_ih columns (both directions' halves) and the head's columns.  The
slim model is checked against the user's eager model holding the same zeroed weights, at the
capture size and at another batch (export keeps the sequence length static); a caller's initial state pins the units.
"""

from __future__ import annotations

import pytest
import torch

import geta_fx
from geta_fx.testing.models import RNNHead
from helpers import max_rel_err, zero_eager


def _group_of(gm: geta_fx.GetaModule, fqn: str) -> geta_fx.PruneGroup:
    return next(g for g in gm.groups if any(m.fqn == fqn and m.role == "out" for m in g.members))


@pytest.mark.parametrize(("kind", "layers", "bidirectional", "batch_first"), [
    ("lstm", 1, False, True), ("lstm", 2, True, True), ("lstm", 2, False, False),
    ("gru", 1, False, True), ("gru", 2, True, False), ("rnn", 2, True, True),
])
def test_hidden_units_prune_exactly(kind: str, layers: int, bidirectional: bool,
                                    batch_first: bool) -> None:
    torch.manual_seed(0)
    model = RNNHead(kind, layers=layers, bidirectional=bidirectional,
                    batch_first=batch_first).eval()
    x = torch.randn(2, 4, 6) if batch_first else torch.randn(4, 2, 6)
    gm = geta_fx.transform(model, (x,))
    hidden = _group_of(gm, "rnn.weight_hh_l0")
    stem = _group_of(gm, "stem.weight")
    assert hidden.prunable and stem.prunable, (hidden.reason, stem.reason)
    assert hidden.num_units == 5 and stem.num_units == 8
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    last = f"rnn.weight_ih_l{layers - 1}" + ("_reverse" if bidirectional else "")
    rows = {(m.fqn, m.dim): len(m.indices) for m in hidden.members}
    assert rows[(last, 0)] == 5 * gates and rows[("rnn.weight_hh_l0", 1)] == 5
    assert rows[("head.weight", 1)] == 5 * (2 if bidirectional else 1)
    assert ("rnn.weight_ih_l0", 1) in {(m.fqn, m.dim) for m in stem.members}
    gm.zero_units(hidden.id, [1, 4])
    gm.zero_units(stem.id, [0, 2, 7])
    slim = gm.compress()
    oracle = zero_eager(model, gm).eval()
    other = torch.randn(3, 4, 6) if batch_first else torch.randn(4, 3, 6)  # another batch
    with torch.no_grad():
        for inp in (x, other):
            assert max_rel_err(slim(inp), oracle(inp)) < 1e-5
    assert slim.rnn.weight_hh_l0.shape == (3 * gates, 3)
    assert slim.rnn.weight_ih_l0.shape == (3 * gates, 5)
    if layers > 1:
        assert slim.rnn.weight_ih_l1.shape[1] == 3 * (2 if bidirectional else 1)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_callers_initial_state_pins_the_hidden_units(kind: str) -> None:
    """With h0 (and c0) from the caller a zeroed unit's state is not zero: pinned."""
    model = RNNHead(kind, pass_state=True).eval()
    x, h0 = torch.randn(2, 4, 6), torch.randn(1, 2, 5)
    state = (h0, torch.randn(1, 2, 5)) if kind == "lstm" else (h0,)
    gm = geta_fx.transform(model, (x, *state))
    hidden = _group_of(gm, "rnn.weight_hh_l0")
    assert not hidden.prunable and "initial state" in hidden.reason
    assert _group_of(gm, "stem.weight").prunable  # the input side still prunes
    torch.testing.assert_close(gm(x, *state), model(x, *state))


def test_projections_pin() -> None:
    """``proj_size`` adds a fifth weight per layer: not supported, so pinned."""
    class Proj(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.rnn = torch.nn.Linear(6, 8), torch.nn.LSTM(8, 5, proj_size=3)
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(self.stem(x))[0])

    gm = geta_fx.transform(Proj().eval(), (torch.randn(4, 2, 6),))
    g = _group_of(gm, "stem.weight")
    assert not g.prunable and "proj_size" in g.reason


def test_train_and_eval_flip_the_recurrent_dropout_flag() -> None:
    """Export bakes ``train`` into aten.lstm (inter-layer dropout); GetaModule.train()/eval()
    rewrite it as they do dropout's."""
    class Deep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(4, 5, num_layers=2, dropout=0.5, batch_first=True)
            self.head = torch.nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    model = Deep().eval()
    x = torch.randn(2, 3, 4)
    gm = geta_fx.transform(model, (x,))
    node = next(n for n in gm.graph_module.graph.nodes if n.target is torch.ops.aten.lstm.input)
    assert node.args[6] is False
    gm.train()
    assert node.args[6] is True and not torch.equal(gm(x), gm(x))  # dropout between layers
    gm.eval()
    assert node.args[6] is False
    torch.testing.assert_close(gm(x), model(x))
