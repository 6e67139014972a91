"""Recipe helpers of geta_fx.optim (issue #12, deliverable 1).

    schedule(N) / QASSO(total_steps=N)    six step numbers from a budget; explicit ones win
    distillation_loss / Distiller         the original model as teacher (KL / BCE / MSE)
    min_kept / max_sparsity / skip        per-group limits; default protection of small groups
    metrics(loss) / Progress              one line per N steps; warnings when K is unreachable
    non-finite gradients                  step skipped bit-exactly; N in a row: TrainingError
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from zoo import MLP, ResNetCifar

import geta_fx
from geta_fx.errors import GetaFxError, InputError, TrainingError
from geta_fx.optim import (QASSO, Distiller, Progress, Schedule, distillation_loss,
                           format_metrics, load_checkpoint, logits_of, recalibrate_batch_norms,
                           save_checkpoint, schedule)
from geta_fx.optim import _distill, _saliency
from geta_fx.optim._checkpoint import Recipe

SCHED = dict(start_projection_step=1, projection_steps=2, start_pruning_step=3,
             pruning_steps=4, pruning_periods=2)


def _mlp(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return MLP().eval(), torch.randn(16, 12), torch.randint(0, 5, (16,))


@pytest.fixture(scope="module")
def mlp_q() -> tuple[geta_fx.GetaModule, torch.Tensor, torch.Tensor]:
    model, x, y = _mlp()
    return geta_fx.transform(model, (x,), quantize="weight"), x, y


@pytest.fixture(scope="module")
def resnet() -> tuple[geta_fx.GetaModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    return geta_fx.transform(ResNetCifar(depth=8, widths=(8, 16, 16)).eval(), (x,)), x


def _fresh(base: geta_fx.GetaModule) -> geta_fx.GetaModule:
    return copy.deepcopy(base).train()


def _run(gm: torch.nn.Module, opt: QASSO, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()


def _no_warnings(fn):  # noqa: ANN001, ANN202
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    assert not [w for w in rec if "QASSO" in str(w.message)], [str(w.message) for w in rec]
    return out


# ----------------------------------------------------------------------------- schedule


def test_schedule_proportions_and_stage_lengths() -> None:
    s = schedule(1000)
    assert s == {"start_projection_step": 50, "projection_steps": 200, "projection_periods": 1,
                 "start_pruning_step": 250, "pruning_steps": 350, "pruning_periods": 10}
    sch = Schedule(**s)
    stages = [sch.stage(k) for k in range(1, 1001)]
    assert [stages.count(n) for n in ("warmup", "projection", "pruning", "cooldown")] == [
        50, 200, 350, 400]
    assert schedule(100)["pruning_periods"] == 3            # periods of >= 10 steps
    assert schedule(2)["start_pruning_step"] + schedule(2)["pruning_steps"] <= 2
    for n in (2, 3, 7, 19, 101, 5000):                      # always a valid schedule in budget
        s = schedule(n)
        assert Schedule(**s).pruning_end <= n, n
    with pytest.raises(InputError, match="total_steps"):
        schedule(1)
    with pytest.raises(InputError, match="sum"):
        schedule(100, warmup=0.5, projection=0.5, pruning=0.5)



def test_schedule_converged_preset_removes_early_and_explicit_shares_win() -> None:
    s = schedule(1000, preset="converged")
    assert s == {"start_projection_step": 20, "projection_steps": 50, "projection_periods": 1,
                 "start_pruning_step": 70, "pruning_steps": 150, "pruning_periods": 10}
    stages = [Schedule(**s).stage(k) for k in range(1, 1001)]
    assert [stages.count(n) for n in ("warmup", "projection", "pruning", "cooldown")] == [
        20, 50, 150, 780]
    # an explicit share replaces only that share of the preset
    one = schedule(300, preset="converged", pruning=1 / 300)
    assert (one["start_pruning_step"], one["pruning_steps"], one["pruning_periods"]) == (21, 1, 1)
    assert schedule(1000, preset="default") == schedule(1000)
    assert schedule(1000, preset="converged", warmup=0.05, projection=0.20, pruning=0.35) == \
        schedule(1000)
    with pytest.raises(InputError, match="unknown preset 'pretrained'.*converged"):
        schedule(100, preset="pretrained")
    with pytest.raises(InputError, match="sum"):
        schedule(100, preset="converged", warmup=0.9, projection=0.2)

def test_qasso_total_steps_explicit_wins_and_contradictions(mlp_q) -> None:
    gm = _fresh(mlp_q[0])
    opt = QASSO(gm, total_steps=200)
    assert opt.schedule == Schedule(**schedule(200), bit_range=(4.0, 16.0))
    assert opt.config["total_steps"] == 200 and opt.config["start_pruning_step"] == 50
    opt = QASSO(gm, total_steps=200, pruning_periods=2, start_pruning_step=60)
    assert (opt.schedule.pruning_periods, opt.schedule.start_pruning_step) == (2, 60)
    assert opt.schedule.pruning_steps == schedule(200)["pruning_steps"]
    assert QASSO(gm, **opt.config).schedule == opt.schedule  # config rebuilds it
    # without a budget the historic defaults stay
    assert QASSO(gm).schedule == Schedule()
    with pytest.raises(InputError, match=r"ends at step 270, after total_steps=200.*"
                                         r"start_pruning_step=200 \(given\).*from total_steps"):
        QASSO(gm, total_steps=200, start_pruning_step=200)
    with pytest.raises(InputError, match=r"start_pruning_step=5 \(given\) < "
                                         r"start_projection_step=10 \(from total_steps\)"):
        QASSO(gm, total_steps=200, start_pruning_step=5)
    with pytest.raises(InputError, match="pruning_periods=50 \\(given\\)"):
        QASSO(gm, total_steps=200, pruning_periods=50, pruning_steps=10)


# ----------------------------------------------------------------------------- distillation


def test_distillation_loss_kinds_against_formulas() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 7, requires_grad=True), torch.randn(4, 3, 7)
    T = 2.0
    p = F.softmax(t / T, -1).reshape(-1, 7)
    ref = (p * (p.log() - F.log_softmax(s / T, -1).reshape(-1, 7))).sum(-1).mean() * T * T
    torch.testing.assert_close(distillation_loss(s, t, temperature=T), ref)
    sig = torch.sigmoid(t / T)
    ref_bce = -(sig * F.logsigmoid(s / T) + (1 - sig) * F.logsigmoid(-s / T)).mean() * T * T
    torch.testing.assert_close(distillation_loss(s, t, kind="bce", temperature=T), ref_bce)
    torch.testing.assert_close(distillation_loss(s, t, kind="mse", temperature=T),
                               ((s - t) ** 2).mean())
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    loss = distillation_loss(s, t.requires_grad_())
    loss.backward()
    assert s.grad is not None and t.grad is None            # the teacher side is detached
    with pytest.raises(InputError, match="kind"):
        distillation_loss(s, t, kind="js")
    with pytest.raises(InputError, match=r"\(4, 3, 7\).*\(4, 7\)"):
        distillation_loss(s, t[:, 0])
    with pytest.raises(InputError, match="temperature"):
        distillation_loss(s, t, temperature=0)


def test_logits_of_model_outputs() -> None:
    from transformers.modeling_outputs import SequenceClassifierOutput

    a, b = torch.randn(2, 3), torch.randn(2, 5)
    assert logits_of(a) == (a, "output")
    out = SequenceClassifierOutput(loss=torch.tensor(1.0), logits=a)
    got, where = logits_of(out)
    assert got is a and where == "output.logits"
    assert logits_of({"hidden": b, "logits": a})[1] == "output['logits']"
    assert logits_of({"hidden": b, "x": a}) == (b, "output['hidden']")
    got, where = logits_of((None, [b, a]))
    assert got is b and where == "output[1][0]"
    with pytest.raises(InputError, match="no tensor"):
        logits_of((None, "text"))


def test_distiller_teacher_is_the_untouched_original(mlp_q, caplog) -> None:
    model, x, y = _mlp()
    teacher_state = copy.deepcopy(model.state_dict())
    gm = geta_fx.transform(model, (x,), quantize="weight").train()
    distill = Distiller(model, kind="kl", temperature=2.0)
    opt = QASSO(gm, variant="adamw", lr=1e-2, target_sparsity=0.3, **SCHED)
    _distill._said.clear()                                   # said once per process
    with caplog.at_level(logging.INFO, logger="geta_fx.optim"):
        for _ in range(10):
            out = gm(x)
            loss = 0.5 * F.cross_entropy(out, y) + 0.5 * distill(out, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert "student output, teacher output" in caplog.text
    assert not model.training
    for n, v in model.state_dict().items():                 # the teacher was never stepped
        assert torch.equal(v, teacher_state[n]), n
    assert all(p.grad is None for p in model.parameters())   # ... nor received gradients
    with torch.no_grad():
        assert float(distillation_loss(gm(x), model(x))) > 0  # the student did move


def test_distiller_on_a_transformers_classifier() -> None:
    """A tiny random BERT (nothing downloaded): the GetaModule and the teacher both return a
    SequenceClassifierOutput; the loss reads .logits of both and trains the student only."""
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (4, 8))
    before = copy.deepcopy(model.state_dict())
    gm = geta_fx.transform(model, (ids,), quantize="weight").train()
    out = gm(ids)
    assert logits_of(out)[1] == "output.logits" == logits_of(model(ids))[1]
    distill = Distiller(model, kind="kl", temperature=2.0)
    opt = QASSO(gm, variant="adamw", lr=1e-2, target_sparsity=0.3, total_steps=12)
    losses = []
    for _ in range(12):
        loss = distill(gm(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] < 1e-4                       # the student starts as the teacher (16 bits)
    assert all(math.isfinite(v) for v in losses) and max(losses) > 10 * losses[0]  # it moved
    for n, v in model.state_dict().items():
        assert torch.equal(v, before[n]), n
    assert opt.metrics()["num_pruned"] == opt.k_target > 0


# ----------------------------------------------------------------------------- limits


def test_select_units_keeps_keep_min_per_group() -> None:
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    start, size = torch.tensor([0, 4]), torch.tensor([4, 4])
    pruned = torch.zeros(8, dtype=torch.bool)
    sel = _saliency.select_units(scores, pruned, group, start, size, torch.tensor(6))
    assert sel.tolist() == [True] * 3 + [False] + [True] * 3 + [False]   # one kept each
    sel = _saliency.select_units(scores, pruned, group, start, size, torch.tensor(6),
                                 keep_min=torch.tensor([3, 1]))
    assert sel.tolist() == [True, False, False, False, True, True, True, False]
    pruned[0] = True                                          # already pruned units count
    sel = _saliency.select_units(scores, pruned, group, start, size, torch.tensor(2),
                                 keep_min=torch.tensor([2, 4]))
    assert sel.tolist() == [False, True] + [False] * 6


def _weak_fc1(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """fc1 scaled down 1000x: a magnitude ranking puts all of its units first."""
    model, x, y = _mlp(seed)
    with torch.no_grad():
        model.fc1.weight.mul_(1e-3)
        model.fc1.bias.mul_(1e-3)
    return model, x, y


MAGNITUDE = {"magnitude": 1.0}


def _kept(opt: QASSO) -> list[int]:
    return [int((~m).sum()) for m in opt.unit_masks().values()]


def test_default_protection_vs_one_unit_per_group() -> None:
    model, x, y = _weak_fc1()
    base = geta_fx.transform(model, (x,))
    sizes = [g.num_units for g in base.groups if g.prunable]
    assert sizes == [32, 24]
    kw = dict(variant="sgd", lr=0.0, target_sparsity=0.6, start_pruning_step=0,
              pruning_steps=1, importance=MAGNITUDE)
    # the old rule (min_kept=1): the weak layer is cut to one unit
    gm = _fresh(base)
    opt = QASSO(gm, min_kept=1, **kw)
    _run(gm, opt, x, y, 2)
    assert _kept(opt)[0] == 1
    # the default: every group keeps ceil((1 - 0.6) / 2 * n) = 7 of 32, 5 of 24; still K = 33
    gm = _fresh(base)
    opt = _no_warnings(lambda: QASSO(gm, **kw))
    assert opt.limits.keep_min == (7, 5)
    _run(gm, opt, x, y, 2)
    assert _kept(opt)[0] == 7 and opt.metrics()["num_pruned"] == opt.k_target == 33
    assert geta_fx.report(gm.eval()) is not None


@pytest.mark.parametrize("limit,expect", [
    (dict(min_kept=10), (10, 10)), (dict(min_kept=0.5), (16, 12)),
    (dict(max_sparsity=0.25), (24, 18)), (dict(min_kept=20, max_sparsity=0.5), (20, 20)),
    (dict(min_kept=30), (30, 24))])
def test_min_kept_and_max_sparsity(limit: dict, expect: tuple[int, int]) -> None:
    model, x, y = _weak_fc1()
    gm = geta_fx.transform(model, (x,)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = QASSO(gm, variant="sgd", lr=0.0, target_sparsity=0.5, start_pruning_step=0,
                    pruning_steps=1, importance=MAGNITUDE, **limit)
    assert opt.limits.keep_min == expect
    _run(gm, opt, x, y, 2)
    kept = _kept(opt)
    assert all(k >= e for k, e in zip(kept, expect, strict=True)), kept
    assert opt.metrics()["num_pruned"] == min(opt.k_target, 56 - sum(expect))


def test_limits_per_pattern(resnet) -> None:
    base, _ = resnet
    order = [g.id for g in base.groups if g.prunable]
    owner = {m.fqn: order.index(g.id) for g in base.groups if g.prunable for m in g.out_members}
    a, b = owner["blocks.1.conv1.weight"], owner["blocks.2.conv1.weight"]
    blocks1 = {i for f, i in owner.items() if f.startswith("blocks.1.")} - {a}
    opt = QASSO(_fresh(base), target_sparsity=0.5,
                min_kept={"blocks.1.conv1": 12, "blocks.1.*": 0.5},
                max_sparsity={"blocks.2.conv1": 0.25})
    keep, sizes = opt.limits.keep_min, opt.limits.sizes
    assert keep[a] == 12 and keep[b] == 12       # the strictest of two patterns; ceil(0.75 * 16)
    assert blocks1 and all(keep[i] == sizes[i] // 2 for i in blocks1)   # "blocks.1.*": 0.5
    rest = set(range(len(keep))) - blocks1 - {a, b}
    assert rest and all(keep[i] == math.ceil(0.25 * sizes[i]) for i in rest)  # the default
    assert opt.config["min_kept"] == {"blocks.1.conv1": 12, "blocks.1.*": 0.5}
    with pytest.raises(InputError, match="min_kept pattern 'blocks.7.\\*' matches no"):
        QASSO(_fresh(base), min_kept={"blocks.7.*": 2})
    with pytest.raises(InputError, match="max_sparsity must lie in"):
        QASSO(_fresh(base), max_sparsity={"blocks.1.*": 1.5})


@pytest.mark.parametrize("bad,match", [
    (dict(min_kept=0), "at least one unit"), (dict(min_kept=1.5), r"\(0, 1\)"),
    (dict(min_kept=True), "int"), (dict(max_sparsity=0.0), "max_sparsity"),
    (dict(skip=["nope.*"]), "'nope.\\*' matches no parameter or module"),
    (dict(skip=[""]), "non-empty"), (dict(nonfinite_patience=0), "nonfinite_patience")])
def test_limit_arguments_are_checked(mlp_q, bad: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        QASSO(_fresh(mlp_q[0]), **bad)


def test_skip_patterns_protect_groups_by_module_or_parameter(resnet) -> None:
    base, x = resnet
    y = torch.randint(0, 10, (4,))
    owner = {m.fqn: g.id for g in base.groups if g.prunable for m in g.out_members}
    g_conv1 = owner["blocks.0.conv1.weight"]
    for pattern in ("blocks.0.conv1", "blocks.0.conv1.weight", "blocks.0.bn1*"):
        gm = _fresh(base)
        opt = QASSO(gm, variant="sgd", lr=0.01, target_sparsity=0.5, skip=[pattern],
                    start_pruning_step=0, pruning_steps=2, pruning_periods=2)
        assert opt.limits.skipped == (g_conv1,), pattern
        _run(gm, opt, x, y, 3)
        masks = opt.unit_masks()
        assert not masks[g_conv1].any(), pattern
        assert opt.metrics()["num_pruned"] == opt.k_target  # the others made up for it
        assert gm.zero_mask(g_conv1).sum() == 0
    # a pattern naming a parameter of no prunable group (the classifier) is accepted
    assert QASSO(_fresh(base), skip="fc").limits.skipped == ()
    with pytest.raises(InputError, match="'blocks.9.conv1' matches no"):
        QASSO(_fresh(base), skip=["blocks.9.conv1"])


# ----------------------------------------------------------------------------- warnings


def test_group_divisible_too_large_warns_with_what_is_reachable(resnet, caplog) -> None:
    base, x = resnet
    gm = _fresh(base)
    with caplog.at_level(logging.WARNING, logger="geta_fx.optim"), \
            pytest.warns(UserWarning, match=r"target_sparsity=50.0% asks for 40 of 80 prunable "
                                            r"units, but at most 0 \(0.0%\) can be removed: "
                                            r"group_divisible=32: group 0 \(8 units\) keeps 8, "
                                            r"group 1 \(8 units\) keeps 8, group 2 \(16 units\) "
                                            r"keeps 16, group 3 \(16 units\) keeps 16, \.\.\. 2 "
                                            r"more \[80 units kept in all\]"):
        opt = QASSO(gm, lr=0.01, target_sparsity=0.5, group_divisible=32,
                    start_pruning_step=0, pruning_steps=2)
    assert "group_divisible=32" in caplog.text
    assert opt.max_prunable == 0 and opt.metrics()["reachable_sparsity"] == 0.0
    _run(gm, opt, x, torch.randint(0, 10, (4,)), 3)
    assert opt.metrics()["num_pruned"] == 0


def test_min_kept_and_skip_and_one_unit_warnings(mlp_q, resnet) -> None:
    with pytest.warns(UserWarning, match=r"asks for 28 of 56 .* at most 16 \(28.6%\) can be "
                                         r"removed: min_kept: group \d+ \(32 units\) keeps "
                                         r"20, group \d+ \(24 units\) keeps 20 "
                                         r"\[40 units kept in all\]$") as rec:
        QASSO(_fresh(mlp_q[0]), target_sparsity=0.5, min_kept=20)
    assert rec[0].filename == __file__  # the warning points at the user's QASSO(...) line
    with pytest.warns(UserWarning, match=r"skip: group \d+ \(16 units\) keeps 16"):
        QASSO(_fresh(resnet[0]), target_sparsity=0.9, skip=["blocks.1.conv1"])
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.ReLU(), torch.nn.Linear(1, 6),
                               torch.nn.ReLU(), torch.nn.Linear(6, 2))
    gm = geta_fx.transform(tiny, (torch.randn(2, 4),))
    assert [g.num_units for g in gm.groups if g.prunable] == [1, 6]
    with pytest.warns(UserWarning, match=r"asks for 6 of 7 .* at most 5 \(71.4%\) can be "
                                         r"removed: one-unit group: group 0 \(1 unit\) keeps 1; "
                                         r"one unit per group: group 1 \(6 units\) keeps 1$"):
        QASSO(gm, target_sparsity=0.9)
    gm = geta_fx.transform(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    with pytest.warns(UserWarning, match="no prunable groups"):
        QASSO(gm, target_sparsity=0.5)
    _no_warnings(lambda: QASSO(gm, target_sparsity=0.0))
    # reachable targets do not warn
    _no_warnings(lambda: QASSO(_fresh(mlp_q[0]), target_sparsity=0.5))
    _no_warnings(lambda: QASSO(_fresh(resnet[0]), target_sparsity=0.5, group_divisible=4))


def test_end_of_pruning_warns_when_divisibility_left_a_shortfall(resnet) -> None:
    base, x = resnet
    gm = _fresh(base)
    # every group has a multiple of 4 units, so only multiples of 4 can go: 41 cannot
    opt = _no_warnings(lambda: QASSO(gm, lr=0.01, target_sparsity=41 / 80,
                                     group_divisible=4, start_pruning_step=0,
                                     pruning_steps=2, pruning_periods=2))
    assert opt.k_target == 41 <= opt.max_prunable
    with pytest.warns(UserWarning, match="pruning ended with 40 of the 41 target units") as rec:
        _run(gm, opt, x, torch.randint(0, 10, (4,)), 3)
    assert rec[0].filename == __file__ and rec[0].lineno == _run.__code__.co_firstlineno + 4


# ----------------------------------------------------------------------------- metrics


def test_metrics_every_step_and_progress_line(mlp_q, caplog) -> None:
    gm = _fresh(mlp_q[0])
    x, y = mlp_q[1], mlp_q[2]
    opt = QASSO(gm, variant="adam", lr=1e-2, lr_quant=1e-2, target_sparsity=0.5,
                total_steps=40, pruning_periods=2)
    progress = Progress(opt, every=10, bar=False)
    lines = []
    with caplog.at_level(logging.INFO, logger="geta_fx.optim"):
        for k in range(1, 41):
            opt.zero_grad()
            loss = F.cross_entropy(gm(x), y)
            loss.backward()
            opt.step()
            m = opt.metrics(loss=loss)
            assert m["step"] == k and m["stage"] == opt.schedule.stage(k)
            assert m["loss"] == pytest.approx(float(loss.detach()))
            assert m["sparsity"] == m["num_pruned"] / m["num_units"]
            assert m["bits_min"] <= m["bits_mean"] <= m["bits_max"]
            if k > opt.schedule.start_projection_step:      # the bit range holds from here
                assert 4 - 1e-4 <= m["bits_min"] and m["bits_max"] <= 16 + 1e-4
            assert m["target_sparsity"] == 0.5 and m["skipped_steps"] == 0
            if progress(loss) is not None:
                lines.append(k)
    assert lines == [10, 20, 30, 40]
    logged = [r.getMessage() for r in caplog.records if " | sparsity " in r.getMessage()]
    assert len(logged) == 4
    assert logged[-1].startswith("QASSO step 40/40 cooldown | sparsity 50.0%/50.0% (short 0) "
                                 "| bits ")
    assert " | loss " in logged[-1] and logged[-1].endswith("skipped 0")
    stage_lines = [r.getMessage() for r in caplog.records if " starts" in r.getMessage()]
    assert [ln.split(":")[0] for ln in stage_lines] == [
        f"QASSO step {k}" for k in (1, 3, 11, 25)]        # schedule(40): 2 / 8 / 14 / 16 steps
    assert "pruning starts (2 periods of 7 steps, 28 of 56 units to remove)" in stage_lines[2]
    commits = [r.getMessage() for r in caplog.records if "committed" in r.getMessage()]
    assert len(commits) == 2 and commits[-1].endswith("period 2/2 committed, 28 of 56 units "
                                                      "removed")
    mid = format_metrics(opt.metrics() | {"stage": "pruning", "period": 1})
    assert "pruning p2/2" in mid and "loss" not in mid
    with pytest.raises(InputError, match="every"):
        Progress(opt, every=0)


def test_progress_tqdm_bar_when_asked(mlp_q) -> None:
    pytest.importorskip("tqdm")
    gm = _fresh(mlp_q[0])
    opt = QASSO(gm, total_steps=20)
    progress = Progress(opt, every=5, bar=True)
    _run(gm, opt, mlp_q[1], mlp_q[2], 5)
    assert progress(None) is not None and progress._bar.n == 5
    progress.close()


# ----------------------------------------------------------------------------- non-finite


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g))
            for _ in range(n)]


def _state_tensors(opt: QASSO) -> dict[str, torch.Tensor]:
    sd = opt.state_dict()
    out = {f"s{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()
           if isinstance(v, torch.Tensor)}
    out |= {f"q.{k}": v for k, v in sd["qasso"]["quant_state"].items()
            if isinstance(v, torch.Tensor)}
    return out | {"pruned": sd["qasso"]["pruned"], "redundant": sd["qasso"]["redundant"]}


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_nan_batch_is_skipped_exactly(mlp_q, variant: str, caplog) -> None:
    base, *_ = mlp_q
    kw = dict(variant=variant, lr=1e-2, lr_quant=1e-2, target_sparsity=0.4, **SCHED)
    if variant == "sgd":
        kw["momentum"] = 0.9
    batches = _batches(1, 8)
    bad_x = batches[4][0].clone()
    bad_x[3, 2] = float("nan")
    ref, gm = _fresh(base), _fresh(base)
    ref_opt, opt = QASSO(ref, **kw), QASSO(gm, **kw)
    for i, (x, y) in enumerate(batches):
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        if i == 4:  # the same run gets one poisoned batch first
            opt.zero_grad()
            F.cross_entropy(gm(bad_x), y).backward()
            before = ({n: p.detach().clone() for n, p in gm.named_parameters()},
                      _state_tensors(opt), opt.step_count)
            with caplog.at_level(logging.WARNING, logger="geta_fx.optim"):
                opt.step()
            assert opt.step_count == before[2] and opt.skipped_steps == 1
            for n, p in gm.named_parameters():
                assert torch.equal(p, before[0][n]), n
            for n, v in _state_tensors(opt).items():
                assert torch.equal(v, before[1][n]), n
            assert f"step {before[2] + 1} skipped" in caplog.text
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    for (n, a), (_, b) in zip(ref.state_dict().items(), gm.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n                    # as if the batch never came
    m = opt.metrics()
    assert m["skipped_steps"] == 1 and m["nonfinite_streak"] == 0
    assert m["num_pruned"] == ref_opt.metrics()["num_pruned"] > 0


def test_nonfinite_streak_raises_training_error_naming_the_gradient(mlp_q) -> None:
    gm = _fresh(mlp_q[0])
    x, y = mlp_q[1], mlp_q[2]
    opt = QASSO(gm, lr=1e-2, nonfinite_patience=3, **SCHED)
    _run(gm, opt, x, y, 2)
    weights = {n: p.detach().clone() for n, p in gm.named_parameters()}
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        dict(gm.named_parameters())["graph_module.fc2.weight"].grad[0, 1] = float("inf")
        if k < 2:
            opt.step()
        else:
            with pytest.raises(TrainingError, match=r"3 steps in a row .* the last at step 3 .*"
                                                    r"gradient of graph_module.fc2.weight has "
                                                    r"inf values first; 1 of \d+ gradients"):
                opt.step()
    assert opt.step_count == 2 and opt.skipped_steps == 3
    for n, p in gm.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert issubclass(TrainingError, GetaFxError) and geta_fx.TrainingError is TrainingError
    # a finite step resets the streak
    _run(gm, opt, x, y, 1)
    assert opt.metrics()["nonfinite_streak"] == 0 and opt.step_count == 3


def test_nonfinite_closure_loss_and_check_off(mlp_q) -> None:
    gm = _fresh(mlp_q[0])
    x, y = mlp_q[1], mlp_q[2]
    opt = QASSO(gm, lr=1e-2, nonfinite_patience=1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        return torch.tensor(float("nan"))
    with pytest.raises(TrainingError, match="the loss is nan"):
        opt.step(closure)
    # huge but finite gradients overflow the fused L2 check; the element-wise check keeps them
    opt = QASSO(gm, lr=0.0, nonfinite_patience=1)
    opt.zero_grad()
    F.cross_entropy(gm(x), y).backward()
    dict(gm.named_parameters())["graph_module.fc1.weight"].grad[:2, 0] = 3e38
    opt.step()
    assert opt.skipped_steps == 0 and opt.step_count == 1
    # None: no check, the NaN flows in (what every plain optimizer does)
    opt = QASSO(gm, lr=1e-2, nonfinite_patience=None)
    opt.zero_grad()
    F.cross_entropy(gm(torch.full_like(x, float("nan"))), y).backward()
    opt.step()
    assert torch.isnan(dict(gm.named_parameters())["graph_module.fc1.weight"]).all()


def test_counters_resume_and_version_2_states_load(tmp_path) -> None:
    model, x, y = _mlp()
    recipe = Recipe(model, (x,), {"quantize": "weight"})
    gm = recipe.build().train()
    opt = QASSO(gm, lr=1e-2, target_sparsity=0.3, **SCHED)
    _run(gm, opt, x, y, 2)
    opt.zero_grad()
    F.cross_entropy(gm(torch.full_like(x, float("nan"))), y).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["qasso"]["version"] == 3 and sd["qasso"]["skipped_steps"] == 1
    again = QASSO(gm, **opt.config)
    again.load_state_dict(sd)
    assert again.skipped_steps == 1 and again.metrics()["nonfinite_streak"] == 1
    # a version 2 state (before these counters and limits): loads, counters at 0, and
    # load_checkpoint keeps its "one unit per group" rule
    old = copy.deepcopy(sd)
    old["qasso"]["version"] = 2
    for key in ("skipped_steps", "nonfinite_streak"):
        del old["qasso"][key]
    for key in ("total_steps", "min_kept", "max_sparsity", "skip", "nonfinite_patience"):
        del old["qasso"]["config"][key]
    again.load_state_dict(old)
    assert again.skipped_steps == 0
    save_checkpoint(tmp_path / "v2.pt", gm, again, recipe=recipe)
    payload = torch.load(tmp_path / "v2.pt", weights_only=False)
    payload["optimizer"] = old
    torch.save(payload, tmp_path / "v2.pt")
    ck = load_checkpoint(tmp_path / "v2.pt")
    assert ck.optimizer.config["min_kept"] == 1 and ck.optimizer.limits.keep_min == (1, 1)
    assert ck.optimizer.step_count == 2
    assert math.isclose(ck.optimizer.metrics()["target_sparsity"], 0.3)


# ----------------------------------------------------------------------------- README


def test_readme_recipe_loop(caplog) -> None:
    """README "Compressing a trained model": the loop with Distiller, total_steps, skip,
    max_sparsity and Progress, then compress() (here on the zoo's ResNet, stem "conv")."""
    torch.manual_seed(0)
    model = ResNetCifar(depth=8, widths=(8, 16, 16)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(40)]
    before = copy.deepcopy(model.state_dict())
    x = batches[0][0]
    distill = Distiller(model, kind="kl", temperature=2.0)
    gm = geta_fx.transform(model, (x,), quantize="weight")
    opt = _no_warnings(lambda: QASSO(gm, variant="adamw", lr=1e-3, target_sparsity=0.5,
                                     bit_range=(4, 8), total_steps=len(batches),
                                     skip=["conv"], max_sparsity=0.8))
    progress = Progress(opt, every=10, bar=False)
    with caplog.at_level(logging.INFO, logger="geta_fx.optim"):
        for x, y in batches:
            out = gm(x)
            loss = 0.5 * F.cross_entropy(out, y) + 0.5 * distill(out, x)
            opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702  (as in the README)
            progress(loss)
    assert [r.getMessage().split(" ")[2] for r in caplog.records
            if " | sparsity " in r.getMessage()] == [
        f"{k}/40" for k in (10, 20, 30, 40)]
    m = opt.metrics()
    assert m["stage"] == "cooldown" and m["num_pruned"] == opt.k_target == 40
    (skipped,) = opt.limits.skipped
    assert not opt.unit_masks()[skipped].any()
    for gid, mask in opt.unit_masks().items():
        assert (~mask).sum() >= math.ceil(0.2 * len(mask) - 1e-9), gid   # max_sparsity=0.8
    for n, v in model.state_dict().items():
        assert torch.equal(v, before[n]), n
    mode = gm.training
    moved = recalibrate_batch_norms(gm, (x for x, _ in batches), num_batches=20)
    assert moved and all(math.isfinite(v) for v in moved.values()) and gm.training == mode
    gm.eval()
    slim = gm.compress()
    torch.testing.assert_close(slim(x), gm(x), rtol=1e-4, atol=1e-5)
