"""``geta_fx.optim.recalibrate_batch_norms``: BatchNorm statistics re-estimated at the final
weights, checked against the eager model (``torch.optim.swa_utils.update_bn`` and the same
cumulative average with dropout off).

    gm (stale running stats) ── recalibrate_batch_norms(gm, batches) ──▶ stats of these weights
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import geta_fx
from geta_fx.errors import InputError
from geta_fx.optim import recalibrate_batch_norms


def _net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (6,)))
            for _ in range(n)]


def _stats(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _eager_oracle(model: nn.Module, batches: list) -> nn.Module:
    """The same estimate on the eager model: BatchNorms in train mode with momentum=None
    (cumulative average) after a reset, everything else in eval mode."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        for x, _ in batches:
            ref(x)
    return ref.eval()


def _stale(model: nn.Module) -> nn.Module:
    """Running statistics far from the data's (as after weights moved late in QAT)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(0.1)
    return model


def test_matches_swa_update_bn_on_the_eager_model() -> None:
    model = _stale(_net()).train()
    batches = _batches()
    gm = geta_fx.transform(model, (batches[0][0],))
    moved = recalibrate_batch_norms(gm, batches)
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, ref)
    got, want = _stats(gm.graph_module), _stats(ref)
    assert got.keys() == want.keys() and len(got) == 6
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert gm.training  # the mode the user had
    gm.eval()
    ref.eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)
    # the stale means (5.0) were several standard deviations off; the report says which
    assert set(moved) == {"1", "5"} and min(moved.values()) > 1.0, moved


def test_dropout_is_off_and_graph_flags_are_restored() -> None:
    model = _stale(_net(dropout=0.5)).train()
    batches = _batches()
    gm = geta_fx.transform(model, (batches[0][0],))
    recalibrate_batch_norms(gm, batches)
    ref = _eager_oracle(model, batches)
    got, want = _stats(gm.graph_module), _stats(ref)
    for k in want:
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # afterwards a train-mode step updates the stats exactly as the eager model does
    # (momentum 0.1, counters advanced): the batch_norm nodes got their arguments back
    ref = copy.deepcopy(model)   # momentum 0.1 (the oracle's BatchNorms had None)
    ref.load_state_dict({**ref.state_dict(), **got})
    ref.train()
    gm.train()
    x = batches[0][0]
    torch.manual_seed(3)
    out_ref = ref(x)
    torch.manual_seed(3)
    out = gm(x)
    torch.testing.assert_close(out, out_ref)
    for k, v in _stats(ref).items():
        torch.testing.assert_close(_stats(gm.graph_module)[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_only_running_statistics_change_and_quantized_graphs_work() -> None:
    model = _stale(_net()).eval()
    batches = _batches()
    gm = geta_fx.transform(model, (batches[0][0],), quantize="weight_act")
    params = {k: v.clone() for k, v in gm.named_parameters()}
    recalibrate_batch_norms(gm, itertools.cycle(batches), num_batches=len(batches))
    assert not gm.training
    for k, v in gm.named_parameters():
        assert torch.equal(v, params[k]), k
    counts = [v for k, v in _stats(gm.graph_module).items() if k.endswith("tracked")]
    assert counts and all(int(c) == len(batches) for c in counts)


def test_slim_graph_module_recalibrates_like_its_getamodule() -> None:
    """compress() copies the statistics of the kept channels: recalibrating the slim
    GraphModule gives the same model as recalibrating before compress()."""
    model = _stale(_net()).eval()
    batches = _batches()
    gm = geta_fx.transform(model, (batches[0][0],))
    group = gm.prunable_groups()[0]
    gm.zero_units(group.id, torch.tensor([0, 3, 5]))
    slim_after = gm.compress()
    recalibrate_batch_norms(slim_after, batches)
    recalibrate_batch_norms(gm, batches)
    slim_before = gm.compress()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(slim_after(x), slim_before(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slim_before(x), gm.eval()(x), rtol=1e-5, atol=1e-5)


def test_batch_forms_and_no_batch_norm() -> None:
    model = _stale(_net()).eval()
    batches = _batches(3)
    gm = geta_fx.transform(model, (batches[0][0],))
    recalibrate_batch_norms(gm, [x for x, _ in batches])            # bare tensors
    a = _stats(gm.graph_module)
    gm2 = geta_fx.transform(_stale(_net()).eval(), (batches[0][0],))
    recalibrate_batch_norms(gm2, batches, forward=lambda m, b: m(b[0]))
    for k, v in a.items():
        torch.testing.assert_close(_stats(gm2.graph_module)[k], v)
    plain = geta_fx.transform(nn.Linear(4, 2), (torch.randn(2, 4),))
    assert recalibrate_batch_norms(plain, [torch.randn(2, 4)]) == {}


def test_bad_input_is_refused_and_nothing_changes() -> None:
    model = _stale(_net()).train()
    batches = _batches()
    gm = geta_fx.transform(model, (batches[0][0],))
    before = _stats(gm.graph_module)
    with pytest.raises(InputError, match="swa_utils.update_bn"):
        recalibrate_batch_norms(model, batches)
    with pytest.raises(InputError, match="yielded no batch"):
        recalibrate_batch_norms(gm, [])
    with pytest.raises(InputError, match="num_batches must be >= 1"):
        recalibrate_batch_norms(gm, batches, num_batches=0)
    with pytest.raises(InputError, match="batch of type int"):
        recalibrate_batch_norms(gm, [batches[0], 7])
    # a failing forward half-way: the statistics are those from before the call
    bad = [batches[0], (torch.randn(6, 5, 8, 8), None)]
    with pytest.raises(Exception):  # noqa: B017 (whatever the graph raises on 5 channels)
        recalibrate_batch_norms(gm, bad)
    for k, v in _stats(gm.graph_module).items():
        assert torch.equal(v, before[k]), k
    assert gm.training
    # and training still updates them with the module's momentum, as before the calls
    ref = copy.deepcopy(model).train()
    x = batches[1][0]
    torch.testing.assert_close(gm(x), ref(x))
    for k, v in _stats(ref).items():
        torch.testing.assert_close(_stats(gm.graph_module)[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _train_to_cooldown(model: nn.Module, bit_range: tuple[float, float], caplog) -> list[str]:
    """QASSO through its bit freeze; the geta_fx.optim log lines."""
    import logging

    import torch.nn.functional as F

    from geta_fx.optim import QASSO
    batches = _batches(4)
    gm = geta_fx.transform(model, (batches[0][0],), quantize="weight")
    opt = QASSO(gm, variant="adam", lr=1e-2, target_sparsity=0.25, bit_range=bit_range,
                bit_reduction=0, total_steps=12)
    gm.train()
    with caplog.at_level(logging.INFO, logger="geta_fx.optim"):
        for x, y in itertools.islice(itertools.cycle(batches), 12):
            opt.zero_grad()
            F.cross_entropy(gm(x), y).backward()
            opt.step()
    assert opt.metrics()["stage"] == "cooldown"
    return [r.getMessage() for r in caplog.records if "recalibrate_batch_norms(" in r.getMessage()]


def test_qasso_names_recalibration_at_the_bit_freeze_for_low_bit_batch_norm_models(
        caplog) -> None:
    hint = _train_to_cooldown(_net(), (4, 6), caplog)
    assert len(hint) == 1          # once, at the freeze, not every step
    assert "2 BatchNorms (1, 5) and weights at 4 bits" in hint[0]
    caplog.clear()
    assert _train_to_cooldown(_net(), (6, 8), caplog) == []     # no weight at <= 4 bits
    caplog.clear()
    no_bn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    assert _train_to_cooldown(no_bn, (4, 6), caplog) == []
