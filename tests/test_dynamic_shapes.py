"""Dynamic shapes: every input dim the model allows stays symbolic through transform, compress,
lower and save/load; the eager model is the oracle at sizes other than the example's; a shape
the graph cannot take is an InputError naming the input and the dim."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_err, zero_random_units
from torch import nn
from zoo import ZOO, ResNetCifar

import geta_fx

pytest.importorskip("transformers")


def _symbolic_dims(gm: geta_fx.GetaModule) -> list[list[bool]]:
    return [[isinstance(s, torch.SymInt) and not s.node.expr.is_number for s in n.meta["val"].shape]
            for n in gm.graph_module.graph.find_nodes(op="placeholder")]


def _zeroed_and_slim(gm: geta_fx.GetaModule) -> torch.fx.GraphModule:
    zero_random_units(gm)
    gm.eval()
    return gm.compress()


def test_llama_runs_at_any_sequence_length() -> None:
    """ids [2, 16] at capture; [2, 24], [3, 7] and [1, 1] afterwards (GQA heads pruned)."""
    model, _ = ZOO["hf_llama_gqa"]()
    gm = geta_fx.transform(model, (torch.randint(0, 64, (2, 16)),), quantize="weight")
    assert _symbolic_dims(gm) == [[True, True]]
    for shape in [(2, 24), (3, 7), (1, 1)]:
        ids = torch.randint(0, 64, shape)
        assert max_rel_err(model(ids), gm(ids)) < 1e-4, shape
    slim = _zeroed_and_slim(gm)
    for shape in [(2, 24), (3, 7)]:
        ids = torch.randint(0, 64, shape)
        assert max_rel_err(gm(ids), slim(ids)) < 1e-4, shape


def test_cnn_runs_at_any_resolution_and_batch_one_does_not_freeze_the_batch() -> None:
    model = ResNetCifar().eval()
    gm = geta_fx.transform(model, (torch.randn(1, 3, 32, 32),))
    assert _symbolic_dims(gm) == [[True, False, True, True]]  # channels stay static
    for shape in [(3, 3, 48, 48), (2, 3, 20, 36), (1, 3, 32, 32)]:
        x = torch.randn(shape)
        assert max_rel_err(model(x), gm(x)) == 0.0, shape
    slim = _zeroed_and_slim(gm)
    x = torch.randn(4, 3, 48, 40)
    assert max_rel_err(gm(x), slim(x)) < 1e-4


def test_lowered_and_saved_models_keep_the_dynamism(tmp_path: object) -> None:
    model, _ = ZOO["gpt_block"]()
    gm = geta_fx.transform(model, (torch.randint(0, 50, (2, 8)),), quantize="weight")
    zero_random_units(gm)
    gm.eval()
    lowered = gm.compress(lower=True)
    path = f"{tmp_path}/m.pt2"
    geta_fx.save(lowered, path)
    loaded = geta_fx.load(path)
    for shape in [(3, 5), (1, 12)]:
        idx = torch.randint(0, 50, shape)
        ref = gm(idx)
        assert max_rel_err(ref, lowered(idx)) < 5e-2, shape  # packed weights: quantized, close
        torch.testing.assert_close(loaded(idx), lowered(idx))


def test_explicit_dynamic_shapes_pass_through() -> None:
    model, _ = ZOO["hf_llama_gqa"]()
    ids = torch.randint(0, 64, (2, 16))
    static = geta_fx.transform(model, (ids,), dynamic_shapes="static")
    assert _symbolic_dims(static) == [[False, False]]
    with pytest.raises(geta_fx.InputError, match=r"'input_ids' dim 1 has size 24.*static at 16"):
        static(torch.randint(0, 64, (2, 24)))
    batch = geta_fx.transform(model, (ids,), dynamic_shapes="batch")
    assert _symbolic_dims(batch) == [[True, False]]
    seq = torch.export.Dim("seq", min=4, max=32)
    given = geta_fx.transform(model, (ids,), dynamic_shapes=({1: seq},))
    assert _symbolic_dims(given) == [[False, True]]
    ids = torch.randint(0, 64, (2, 9))
    assert max_rel_err(model(ids), given(ids)) < 1e-4
    with pytest.raises(geta_fx.InputError, match=r"'input_ids' dim 1 has size 40.*4 <= s\d+ <= 32"):
        given(torch.randint(0, 64, (2, 40)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + y  # x's and y's leading dims must agree


def test_wrong_shapes_name_the_input_and_dim() -> None:
    model = TwoInputs().eval()
    gm = geta_fx.transform(model, (torch.randn(3, 6), torch.randn(3, 4)))
    assert gm(torch.randn(5, 6), torch.randn(5, 4)).shape == (5, 4)
    with pytest.raises(geta_fx.InputError, match=r"'x' dim 1 has size 7.*static at 6"):
        gm(torch.randn(5, 7), torch.randn(5, 4))
    with pytest.raises(geta_fx.InputError, match=r"'y' dim 0 has size 4 but 'x' dim 0 has size 5"):
        gm(torch.randn(5, 6), torch.randn(4, 4))
    with pytest.raises(geta_fx.InputError, match=r"'x' has 3 dims"):
        gm(torch.randn(5, 6, 1), torch.randn(5, 4))
    slim = gm.compress()  # the slim graph checks its inputs the same way
    with pytest.raises(geta_fx.InputError, match=r"'x' dim 1 has size 7"):
        slim(torch.randn(5, 7), torch.randn(5, 4))


class FixedLength(nn.Module):
    """Reshapes the sequence into blocks of 4: the length must stay a multiple of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return self.fc(x).view(b, t // 4, 4, c).sum(2)


def test_relations_the_ranges_cannot_express_are_input_errors_too() -> None:
    model = FixedLength().eval()
    gm = geta_fx.transform(model, (torch.randn(2, 8, 8),))
    x = torch.randn(3, 12, 8)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(geta_fx.InputError):
        gm(torch.randn(3, 10, 8))
