"""tie_weights: a tensor the user's model registers under two names is one parameter, one
get_attr node, one quantizer and one table in the slim model, with the user's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import num_params
from torch import nn

import geta_fx
from geta_fx.ir import meta
from geta_fx.passes import TieWeights
from geta_fx.testing import qasso_steps


class TiedLM(nn.Module):
    """ids -> emb(E) -> fc -> relu -> fc2 -> head(E) (head.weight is emb.weight):

        ids --emb[V,D]--> fc[D->H] --relu--> fc2[H->D] --> linear(., E) --> logits[V]
    """

    def __init__(self, vocab: int = 12, d: int = 8, h: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: one tensor, two names

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.relu(self.fc(self.emb(ids)))))


def _weights(gm: geta_fx.GetaModule) -> int:
    """Parameters less the quantizers' own scalars."""
    scalars = sum(num_params(q) for q in gm.quantizers.values())
    return num_params(gm) - scalars


def _gpt2() -> tuple[nn.Module, torch.Tensor]:
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    return tf.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 64, (2, 8))


def test_gpt2_tied_embedding_is_one_parameter_with_the_users_gradient() -> None:
    pytest.importorskip("transformers")
    model, ids = _gpt2()
    gm = geta_fx.transform(model, (ids,), quantize="weight")
    assert _weights(gm) == num_params(model)
    g = gm.graph_module
    assert g.meta[meta.TIED] == {"lm_head.weight": "transformer.wte.weight"}
    assert len([n for n in g.graph.find_nodes(op="get_attr")
                if n.target == "transformer.wte.weight"]) == 1
    assert not any(n.target == "lm_head.weight" for n in g.graph.find_nodes(op="get_attr"))
    quantized = [q for q in gm.quantizers if "wte" in q or "lm_head" in q]
    assert len(quantized) == 1, quantized
    # gradients: the tied table gets the sum of both uses, as in the user's model
    ref = copy.deepcopy(model)
    gm_noq = geta_fx.transform(model, (ids,))
    ref(ids).logits.square().sum().backward()
    gm_noq(ids).logits.square().sum().backward()
    torch.testing.assert_close(gm_noq.graph_module.transformer.wte.weight.grad,
                               ref.transformer.wte.weight.grad, rtol=1e-4, atol=1e-5)


def test_tied_tensor_stays_one_through_training_and_compress() -> None:
    model = TiedLM().eval()
    x = torch.randint(0, 12, (4, 5))
    gm = geta_fx.transform(model, (x,), quantize="weight")
    assert _weights(gm) == num_params(model) == 12 * 8 + 8 * 6 + 6 + 6 * 8 + 8
    assert len(gm.quantizers) == 3  # fc, fc2 and one for the tied emb/head table
    hidden = [g for g in gm.groups if any(m.fqn == "emb.weight" for m in g.members)]
    assert {(m.fqn, m.dim) for g in hidden for m in g.members} >= {("emb.weight", 1),
                                                                 ("fc2.weight", 0)}
    qasso_steps(gm, x)
    gm.eval()
    slim = gm.compress()
    torch.testing.assert_close(slim(x), gm(x), rtol=1e-5, atol=1e-6)
    names = [n for n, _ in slim.named_parameters()]
    assert "head.weight" not in names and "emb.weight" in names
    assert num_params(slim) < num_params(model)
    assert model.head.weight is model.emb.weight  # the user's model is untouched


def test_pass_is_honest_and_idempotent() -> None:
    cap = geta_fx.capture(TiedLM().eval(), (torch.randint(0, 12, (2, 5)),))
    gm = cap.graph_module
    x = torch.randint(0, 12, (3, 4))
    ref = gm(x)
    assert TieWeights()(gm).modified
    gm.recompile()
    torch.testing.assert_close(gm(x), ref)
    assert not TieWeights()(gm).modified
    untied = geta_fx.capture(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)),
                             (torch.randn(2, 6),)).graph_module
    code = untied.code
    assert not TieWeights()(untied).modified and untied.code == code


class TiedAcrossRoles(nn.Module):
    """One [6, 6] weight W used twice, so its dim 1 is both x's features and mid's outputs:

        x --enc(W)--> relu --mid--> relu --dec(W)-->
    mid's output channels meet the graph input through W: they must not be pruned.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6, bias=False)
        self.mid = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.mid(torch.relu(self.enc(x)))))


def test_a_tie_couples_the_channel_spaces_of_both_uses() -> None:
    model = TiedAcrossRoles().eval()
    gm = geta_fx.transform(model, (torch.randn(4, 6),))
    mid = next(g for g in gm.groups if any(m.fqn == "mid.bias" for m in g.members))
    assert not mid.prunable and "tied weight" in str(mid.reason)
    x = torch.randn(3, 6)
    torch.testing.assert_close(gm.compress()(x), model(x))
