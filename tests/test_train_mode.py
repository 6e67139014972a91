"""train_mode and retarget_device: the flag and device rewrites GetaModule.train()/.to() and
lower run, as passes: numerics equal the eager model in each mode, honest ``modified``."""

from __future__ import annotations

import torch
from torch import nn

import geta_fx
from geta_fx.ir import meta
from geta_fx.passes import RetargetDevice, SetTrainingMode
from geta_fx.passes.retarget_device import recorded_devices
from geta_fx.passes.train_mode import graph_modes
from geta_fx.pipeline import Pipeline


class DropBN(nn.Module):
    """x -> conv -> bn -> dropout -> (+ arange(n, device=x.device))"""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.bn(self.conv(x)))
        return y + torch.arange(y.shape[-1], device=x.device, dtype=y.dtype)


def test_flags_follow_the_mode_and_match_eager() -> None:
    model = DropBN().train()
    gm = geta_fx.capture(model, (torch.randn(2, 3, 8, 8),)).graph_module
    assert graph_modes(gm) == {True: 2}
    res = Pipeline([SetTrainingMode(False)])(gm)
    assert res.modified and graph_modes(gm) == {False: 2}
    assert "train_flags" in gm.meta[meta.FACTS] and gm.meta[meta.LOG][-1].name == "train_mode"
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(gm(x), model.eval()(x))
    assert SetTrainingMode(False)(gm).modified is False  # idempotent, honest


def test_mixed_flags_break_the_fact() -> None:
    gm = geta_fx.capture(DropBN().train(), (torch.randn(2, 3, 8, 8),)).graph_module
    bn = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default)
    bn.update_arg(5, False)
    assert "disagree" in str(meta.check_fact(gm, "train_flags"))


def test_getamodule_train_eval_do_not_grow_the_log() -> None:
    gm = geta_fx.transform(DropBN().eval(), (torch.randn(2, 3, 8, 8),))
    n = len(gm.graph_module.meta[meta.LOG])
    for _ in range(3):
        gm.train()
        gm.eval()
    assert len(gm.graph_module.meta[meta.LOG]) == n and graph_modes(gm.graph_module) == {False: 2}


def test_retarget_device_rewrites_factory_devices() -> None:
    gm = geta_fx.capture(DropBN().eval(), (torch.randn(2, 3, 8, 8),)).graph_module
    assert recorded_devices(gm) == ["cpu"]
    res = Pipeline([RetargetDevice(torch.device("meta"))])(gm)
    assert res.modified and recorded_devices(gm) == ["meta"]
    assert RetargetDevice(torch.device("meta"))(gm).modified is False
    assert meta.check_fact(gm, "device") is None
