"""BatchNorm running statistics follow PyTorch's semantics in a GetaModule: every momentum
(None = cumulative average), num_batches_tracked advanced once per train-mode call only,
eval calls never touch a buffer; whatever mode the model was captured in."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import geta_fx
from geta_fx.ir import meta


def _net(momentum: float | None) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=momentum))


@pytest.mark.parametrize("momentum", [0.1, 0.5, None, 0.0])
@pytest.mark.parametrize("captured_training", [False, True])
def test_running_stats_equal_the_eager_model(momentum: float | None,
                                             captured_training: bool) -> None:
    model = _net(momentum).train(captured_training)
    ref = copy.deepcopy(model)
    gm = geta_fx.transform(model, (torch.randn(4, 3, 8, 8),))
    assert model[1].momentum == momentum  # the user's module is left as it was
    for step in range(4):
        for training in (True, False, True):
            x = torch.randn(5, 3, 8, 8)
            gm.train(training)
            ref.train(training)
            torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5,
                                       msg=f"step {step}, training={training}")
    ours = dict(gm.graph_module.named_buffers())
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(ours[name], buf, rtol=1e-6, atol=1e-6, msg=name)
    assert int(ours["1.num_batches_tracked"]) == 8


def test_eval_calls_never_mutate_buffers() -> None:
    model = _net(0.1).train()
    gm = geta_fx.transform(model, (torch.randn(4, 3, 8, 8),)).eval()
    before = {k: v.clone() for k, v in gm.graph_module.named_buffers()}
    for _ in range(3):
        gm(torch.randn(2, 3, 8, 8))
    for k, v in gm.graph_module.named_buffers():
        assert torch.equal(v, before[k]), k
    add_ = torch.ops.aten.add_.Tensor
    assert not any(n.target is add_ for n in gm.graph_module.graph.nodes)


def test_states_are_recorded_and_slim_graph_is_exact() -> None:
    model = _net(None).eval()
    gm = geta_fx.transform(model, (torch.randn(2, 3, 8, 8),))
    states = gm.graph_module.meta[meta.BATCHNORM]
    assert [s.module for s in states] == ["1", "4"] and all(s.cumulative for s in states)
    gm.train()
    for _ in range(3):
        gm(torch.randn(4, 3, 8, 8))
    gm.eval()
    gm.zero_units(gm.prunable_groups()[0].id, [0, 2])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm.compress()(x), gm(x), rtol=1e-5, atol=1e-6)
    gm.train()
    with pytest.warns(RuntimeWarning, match="num_batches_tracked"):
        gm.compress()


def test_untracked_batch_norm_has_no_state() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    gm = geta_fx.transform(model.train(), (torch.randn(2, 3, 8, 8),))
    assert not gm.graph_module.meta.get(meta.BATCHNORM)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))
