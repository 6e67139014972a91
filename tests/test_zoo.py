"""Every zoo model: transform is exact; zero random units -> compress is exact and smaller.

    model --transform--> GetaModule --zero_units--> zeroed --compress--> slim
    assert gm(x) == model(x);  slim(x) == zeroed(x);  params(slim) < params(gm)
"""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_err, num_params, zero_random_units
from zoo import ZOO, ResNetCifar, vgg7_bn

import geta_fx

# Every zoo model must expose at least one prunable group; these counts pin what the
# analysis finds so a regression in the rule table shows up as a diff.
EXPECTED_PRUNABLE_UNITS = {
    "mlp": 56, "vgg_bn": 144, "resnet20": 448, "densenet": 26, "mobilenetv2_block": 40,
    "grouped_conv": 4, "unet_convtranspose": 40, "groupnorm": 4, "flatten_linear": 16,
    "weight_sharing": 16, "multi_io": 20, "glu_chunk": 16, "gpt_block": 164,
    "hf_llama_gqa": 132, "hf_bert": 104, "hf_gpt2": 296, "hf_vit": 104,
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_transform_zero_compress(name: str) -> None:
    model, inputs = ZOO[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    gm = geta_fx.transform(model, inputs)
    # The user's model is untouched: same weights, same mode, weights not shared.
    assert model.training == training
    gm_params = {p.data_ptr() for p in gm.parameters()}
    assert not gm_params & {p.data_ptr() for p in model.parameters()}
    assert max_rel_err(model(*inputs), gm(*inputs)) == 0.0
    prunable = [g for g in gm.groups if g.prunable]
    assert sum(g.num_units for g in prunable) == EXPECTED_PRUNABLE_UNITS[name]

    assert zero_random_units(gm, 0.5) > 0
    for g in prunable:
        if g.num_units > 1:
            assert gm.zero_mask(g.id).any()
    zeroed_out = gm(*inputs)
    slim = gm.compress()
    assert max_rel_err(zeroed_out, slim(*inputs)) <= 1e-4
    assert num_params(slim) < num_params(gm)
    # The slim graph is a real program: torch.export captures it again.
    ep = torch.export.export(slim, inputs)
    assert max_rel_err(zeroed_out, ep.module()(*inputs)) <= 1e-4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resnet20_has_448_prunable_units_in_13_groups() -> None:
    gm = geta_fx.transform(ResNetCifar().eval(), (torch.randn(1, 3, 32, 32),))
    assert len(gm.groups) == 13
    assert sum(g.num_units for g in gm.groups if g.prunable) == 448
    (last,) = [g for g in gm.groups if not g.prunable]
    assert {m.fqn for m in last.members} == {"fc.weight", "fc.bias"}


def test_vgg7_bn_has_2816_units_and_unprunable_classifier() -> None:
    model = vgg7_bn().eval()
    gm = geta_fx.transform(model, (torch.randn(1, 3, 32, 32),))
    prunable = [g for g in gm.groups if g.prunable]
    assert sorted(g.num_units for g in prunable) == [128, 128, 256, 256, 512, 512, 1024]
    assert sum(g.num_units for g in prunable) == 2816
    (last,) = [g for g in gm.groups if not g.prunable]
    assert {m.fqn for m in last.members if m.role == "out"} == {"13.weight", "13.bias"} or \
        last.reason.startswith("reaches a graph output")
    assert "graph output" in last.reason


def test_attention_units_are_heads_and_gqa_couples_q_heads() -> None:
    model, inputs = ZOO["hf_llama_gqa"]()
    gm = geta_fx.transform(model, inputs)
    head_groups = [g for g in gm.groups if g.prunable and any(
        m.fqn.endswith("k_proj.weight") and m.role == "out" for m in g.members)]
    assert len(head_groups) == 2  # one per layer
    for g in head_groups:
        assert g.num_units == 2  # kv heads
        q = next(m for m in g.members if m.fqn.endswith("q_proj.weight") and m.role == "out")
        # every unit owns 2 q heads x head_dim 8 rows
        assert torch.bincount(q.units).tolist() == [16, 16]
        o = next(m for m in g.members if m.fqn.endswith("o_proj.weight"))
        assert o.role == "in" and o.dim == 1


def test_hidden_size_behind_rmsnorm_is_prunable_and_exact() -> None:
    """Llama's residual stream: RMSNorm's mean over hidden keeps the original count."""
    model, inputs = ZOO["hf_llama_gqa"]()
    gm = geta_fx.transform(model, inputs)
    (hidden,) = [g for g in gm.groups if any(m.fqn == "model.embed_tokens.weight"
                                              for m in g.members)]
    assert hidden.prunable and hidden.num_units == 32
    assert {m.fqn for m in hidden.out_members} >= {
        "model.norm.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight"}
    gm.zero_units(hidden.id, torch.arange(0, 32, 3))
    zeroed = gm(*inputs)
    slim = gm.compress()
    assert slim.model.embed_tokens.weight.shape[1] == 32 - len(range(0, 32, 3))
    assert max_rel_err(zeroed, slim(*inputs)) <= 1e-4

