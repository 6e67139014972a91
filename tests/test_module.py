"""GetaModule: train()/eval() rewrite the captured flags; zero_units/zero_mask are exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import geta_fx


class DropBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Dropout(0.5)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("captured_training", [True, False])
def test_train_eval_switch_dropout_and_batchnorm(captured_training: bool) -> None:
    model = DropBN().train(captured_training)
    x = torch.randn(4, 3, 8, 8)
    gm = geta_fx.transform(model, (x,))
    assert gm.training is captured_training
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))
    assert torch.equal(gm(x), gm(x))  # deterministic in eval
    gm.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(1)
    b = gm(x)
    assert not torch.equal(a, b)  # dropout is live again
    rm = gm.graph_module.bn.running_mean.clone()
    gm(x)
    assert not torch.equal(rm, gm.graph_module.bn.running_mean)  # batch statistics update


def test_zero_units_and_zero_mask() -> None:
    gm = geta_fx.transform(DropBN().eval(), (torch.randn(2, 3, 8, 8),))
    (g,) = [g for g in gm.groups if g.prunable]
    assert not gm.zero_mask(g.id).any()
    gm.zero_units(g.id, [1, 4])
    assert gm.zero_mask(g.id).tolist() == [False, True, False, False, True, False]
    w = gm.graph_module.conv.weight
    assert w[1].abs().sum() == 0 and w[4].abs().sum() == 0 and w[0].abs().sum() > 0
    assert gm.graph_module.bn.weight[1] == 0 and gm.graph_module.conv.bias[4] == 0
    assert gm.graph_module.fc.weight[:, 1].abs().sum() > 0  # consumer columns untouched
    with pytest.raises(IndexError):
        gm.zero_units(g.id, [6])
    unprunable = next(x for x in gm.groups if not x.prunable)
    with pytest.raises(geta_fx.InputError, match="not prunable"):
        gm.zero_units(unprunable.id, [0])
    with pytest.raises(geta_fx.InputError, match="out of range"):
        gm.zero_mask(99)


def test_compress_without_zeros_is_identity_and_module_untouched() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(DropBN().eval(), (x,))
    slim = gm.compress()
    torch.testing.assert_close(slim(x), gm(x))
    gm.zero_units(0, [0, 2])
    before = gm.graph_module.conv.weight.shape
    slim = gm.compress()
    assert slim.conv.weight.shape[0] == 4 and gm.graph_module.conv.weight.shape == before


def test_compress_lower_packs_weights_and_matches(tmp_path) -> None:
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    gm = geta_fx.transform(m, (x,), quantize="weight")
    for q in gm.quantizers.values():
        q.set_bit_width(4.0)
    gm.zero_units(0, [0, 5, 7])
    slim = gm.compress(lower=True)
    assert "lowbit" in slim.code or "unpack_weight" in slim.code
    torch.testing.assert_close(slim(x), gm(x), atol=1e-5, rtol=1e-4)
    geta_fx.save(slim, tmp_path / "m.pt2", example_inputs=(x,))
    torch.testing.assert_close(geta_fx.load(tmp_path / "m.pt2")(x), gm(x), atol=1e-5, rtol=1e-4)
