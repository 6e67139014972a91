"""QASSO (issue #4): schedule, exact K, bit range, joint rules, resume, variants.

    transform(model, quantize="weight") -> GetaModule ─ QASSO steps ─▶ K units zero,
                                                                      bits in [b_l, b_u(k)],
                                                                      compress() exact
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import max_rel_err
from torch import nn
from zoo import MLP, GPTBlock, ResNetCifar

import geta_fx
from geta_fx.errors import InputError
from geta_fx.optim import QASSO, Schedule, load_checkpoint, save_checkpoint
from geta_fx.optim import _joint, _saliency
from geta_fx.optim._checkpoint import Recipe

# ----------------------------------------------------------------------------- fixtures

SCHED = dict(start_projection_step=2, projection_steps=6, projection_periods=3,
             start_pruning_step=8, pruning_steps=9, pruning_periods=3)  # T = 3


def _resnet() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return ResNetCifar(depth=8, widths=(8, 16, 16)).eval(), (torch.randn(4, 3, 8, 8),)


def _gpt() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return GPTBlock(d=16, heads=4, vocab=20).eval(), (torch.randint(0, 20, (4, 8)),)


@pytest.fixture(scope="module")
def resnet_q() -> tuple[geta_fx.GetaModule, tuple[torch.Tensor, ...]]:
    model, x = _resnet()
    return geta_fx.transform(model, x, quantize="weight"), x


@pytest.fixture(scope="module")
def gpt_q() -> tuple[geta_fx.GetaModule, tuple[torch.Tensor, ...]]:
    model, x = _gpt()
    return geta_fx.transform(model, x, quantize="weight_act"), x


def _loss(gm: torch.nn.Module, x: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    out = gm(*x)
    target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g).to(out.device)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def _train(gm: torch.nn.Module, opt: QASSO, x: tuple[torch.Tensor, ...], steps: int,
           start: int = 0, check: bool = False) -> list[dict]:
    log = []
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(gm, x, i).backward()
        opt.step()
        if check:
            log.append(opt.metrics() | {"bits": opt.bit_widths()})
    return log


# ----------------------------------------------------------------------------- schedule


def test_schedule_stage_boundaries() -> None:
    s = Schedule(**SCHED)
    stages = [s.stage(k) for k in range(1, 21)]
    assert stages == (["warmup"] * 2 + ["projection"] * 6 + ["pruning"] * 9 + ["cooldown"] * 3)
    assert [s.pruning_position(k) for k in (8, 9, 11, 17, 18)] == [None, (0, 1), (0, 3),
                                                                   (2, 3), None]
    assert [k for k in range(1, 21) if s.is_selection_step(k)] == [9, 12, 15]
    assert [k for k in range(1, 21) if s.is_commit_step(k)] == [10, 13, 16]
    assert [k for k in range(1, 21) if s.is_joint_step(k)] == [9, 10, 12, 13, 15, 16]
    assert [s.forget_rate(k) for k in (9, 10, 11)] == [0.5, 1.0, 0.0]
    assert [s.committed_periods(k) for k in (9, 10, 12, 13, 16, 20)] == [0, 1, 1, 2, 3, 3]


def test_schedule_bit_reduction_b_times_never_below_b_l() -> None:
    s = Schedule(start_projection_step=0, projection_steps=10, projection_periods=5,
                 bit_range=(4, 16), bit_reduction=2)
    assert [s.b_u(k) for k in range(1, 13)] == [14, 14, 12, 12, 10, 10, 8, 8, 6, 6, 6, 6]
    assert s.final_b_u == 6
    s = Schedule(projection_steps=4, projection_periods=7, bit_range=(4, 16), bit_reduction=2,
                 start_pruning_step=4)
    assert s.final_b_u == 4 and min(s.b_u(k) for k in range(1, 10)) == 4  # clamp, no crossing
    # K_b < B: several reductions per step, no ZeroDivisionError; K_b == 0: final at once
    s = Schedule(projection_steps=2, projection_periods=4, bit_range=(2, 16), bit_reduction=2,
                 start_pruning_step=2)
    assert [s.b_u(k) for k in (1, 2, 3)] == [12, 8, 8]
    s = Schedule(projection_steps=0, projection_periods=3, bit_range=(4, 16))
    assert s.b_u(1) == 10


def test_schedule_single_step_periods_and_validation() -> None:
    s = Schedule(start_pruning_step=1, pruning_steps=3, pruning_periods=3)
    assert [k for k in range(1, 6) if s.is_selection_step(k)] == [2, 3, 4]
    assert [k for k in range(1, 6) if s.is_commit_step(k)] == [2, 3, 4]
    assert not any(s.is_joint_step(k) for k in range(1, 6))
    assert [s.committed_periods(k) for k in range(1, 6)] == [0, 1, 2, 3, 3]
    with pytest.raises(InputError, match="pruning_steps"):
        Schedule(pruning_steps=2, pruning_periods=3)
    with pytest.raises(InputError, match="bit_range"):
        Schedule(bit_range=(8, 4))
    with pytest.raises(InputError, match="start_pruning_step"):
        Schedule(start_projection_step=5, start_pruning_step=2)


# ----------------------------------------------------------------------------- selection


def test_selection_excludes_pruned_first_and_takes_lowest() -> None:
    # two groups of 4 units; unit 0 already pruned (score 0 would win otherwise)
    unit_group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    start, size = torch.tensor([0, 4]), torch.tensor([4, 4])
    scores = torch.tensor([0.0, 5.0, 0.3, 0.1, 0.2, 9.0, 0.4, 0.05])
    pruned = torch.zeros(8, dtype=torch.bool)
    pruned[0] = True
    sel = _saliency.select_units(scores, pruned, unit_group, start, size, torch.tensor(3))
    assert sel.nonzero().flatten().tolist() == [3, 4, 7]
    # asking for everything: each group keeps its highest-scoring live unit
    sel = _saliency.select_units(scores, pruned, unit_group, start, size, torch.tensor(8))
    assert sel.nonzero().flatten().tolist() == [2, 3, 4, 6, 7]
    assert _saliency.max_prunable(size, 1) == 6


def test_selection_group_divisible() -> None:
    unit_group = torch.tensor([0] * 6 + [1] * 4)
    start, size = torch.tensor([0, 6]), torch.tensor([6, 4])
    scores = torch.arange(10, dtype=torch.float32)
    pruned = torch.zeros(10, dtype=torch.bool)
    sel = _saliency.select_units(scores, pruned, unit_group, start, size, torch.tensor(5), 2)
    kept = size - torch.zeros(2, dtype=torch.long).index_add_(0, unit_group, sel.long())
    assert (kept % 2 == 0).all() and int(sel.sum()) == 4  # 5 rounded down per group
    assert _saliency.max_prunable(size, 4) == 2 + 0


def test_importance_criteria_are_checked() -> None:
    with pytest.raises(InputError, match="unknown importance"):
        _saliency.check_importance({"magnitudes": 1.0})
    assert _saliency.check_importance(None) == _saliency.DEFAULT_IMPORTANCE


# ----------------------------------------------------------------------------- joint rules


def test_forget_rate_norm_guard_and_clamp() -> None:
    # rows: aligned (-> rate), zero weights (guard -> 0), anti-aligned (small > 0), no grad (0)
    stats = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    gamma = _joint._forget_rate(stats, rate=0.5, lr=0.1)
    assert gamma[0] == 0.5 and gamma[1] == 0 and gamma[3] == 0
    assert 0 < gamma[2] < 1e-3
    # a negative signed mean does not trip the guard (G.2 #8): only the norm matters
    x = torch.tensor([-3.0, -2.0, 1.0])
    c_stats = torch.stack([(x * x).sum(), (x * x).sum(), (x * x).sum()])[None]
    assert _joint._forget_rate(c_stats, 0.25, 0.1)[0] == 0.25


def test_step_size_respects_bit_bounds() -> None:
    d_lo, d_hi = torch.tensor([1e-3, 1e-3, 1e-3]), torch.tensor([1e-1, 1e-1, 1e-1])
    stats = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [-1.0, 1e6, 1e-6]])
    gamma = torch.tensor([0.5, 0.5, 0.5])
    d, g = _joint._step_size(stats, gamma, d_lo, d_hi, lr=1.0)
    assert d[0] == d_hi[0] and g[0] == 0.5                      # cos_r >= 0 -> b_l bits
    assert (d >= d_lo).all() and (d <= d_hi).all()
    assert d[1] == d_hi[1] and g[1] == 0.5                      # d* above d_hi: clipped
    # d* below d_lo: gamma backs off by 0.8 until d* >= d_lo, keeping gamma * d* constant
    d_star = 0.9 * 0.999 * 1e-3 / (0.5 * 1e3)
    assert g[2] < 0.5 and d[2] >= d_lo[2]
    assert torch.isclose(g[2] * d[2], torch.tensor(0.5 * d_star), rtol=1e-4)


def test_fake_quant_matches_op() -> None:
    x = torch.randn(64) * 2
    x[3] = 0
    for t in (1.0, 1.3):
        ref = geta_fx.quantize(x, torch.tensor([0.05]), torch.tensor([1.5]), torch.tensor([t]))
        got = _joint.fake_quant(x, torch.full_like(x, 0.05), torch.full_like(x, 1.5),
                                torch.full_like(x, t), torch.ones_like(x, dtype=torch.bool))
        assert torch.allclose(ref, got, atol=0.05 + 1e-6)
        assert got[3] == 0


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("which", ["resnet_q", "gpt_q"])
def test_exact_k_bit_range_and_compress(which: str, request: pytest.FixtureRequest) -> None:
    base, x = request.getfixturevalue(which)
    gm = copy.deepcopy(base).train()
    opt = QASSO(gm, variant="adam", lr=1e-2, lr_quant=1e-2, target_sparsity=0.4,
                bit_range=(4, 16), bit_reduction=3, **SCHED)
    log = _train(gm, opt, x, 20, check=True)
    s = opt.schedule
    weight = torch.tensor([q.kind == "weight" for q in gm.quantizers.values()])
    for k, m in enumerate(log, start=1):
        assert m["stage"] == s.stage(k)
        if k > s.start_projection_step:  # bit range holds at every step after projection
            b = m["bits"][weight]
            assert (b >= s.b_l - 1e-4).all() and (b <= s.b_u(k) + 1e-4).all(), (k, b)
        # units are committed only at commit steps
        if k > 1 and m["num_pruned"] != log[k - 2]["num_pruned"]:
            assert s.is_commit_step(k)
    end = log[s.pruning_end - 1]
    assert end["num_pruned"] == end["num_zero_units"] == end["K"] == math.floor(
        0.4 * end["num_units"]) and end["shortfall"] == 0
    # cool-down: bits frozen at integers
    cool = [m["bits"] for m in log[s.cooldown_start - 1:]]
    for b in cool:
        assert torch.allclose(b, cool[0], atol=1e-4)
        assert torch.allclose(b, b.round(), atol=1e-4)
    # the optimizer's masks agree with the module's, and compress is exact
    for gid, mask in opt.unit_masks().items():
        assert torch.equal(gm.zero_mask(gid), mask)
    gm.eval()
    slim = gm.compress()
    assert max_rel_err(gm(*x), slim(*x)) < 1e-5
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in gm.parameters())


def test_shortfall_when_k_exceeds_one_unit_per_group(resnet_q) -> None:
    base, x = resnet_q
    gm = copy.deepcopy(base).train()
    with pytest.warns(UserWarning, match=r"asks for 79 of 80 .* at most 74 \(92.5%\)"):
        opt = QASSO(gm, variant="sgd", lr=0.01, target_sparsity=0.99, start_pruning_step=1,
                    pruning_steps=2, pruning_periods=2)
    _train(gm, opt, x, 3)
    m = opt.metrics()
    assert m["num_pruned"] == opt.max_prunable == m["num_zero_units"]
    assert m["shortfall"] == m["K"] - opt.max_prunable > 0
    for gid, mask in opt.unit_masks().items():
        assert not mask.all(), gid  # every group keeps a unit


def test_group_divisible_keeps_multiples(resnet_q) -> None:
    base, x = resnet_q
    gm = copy.deepcopy(base).train()
    opt = QASSO(gm, variant="sgd", lr=0.01, target_sparsity=0.5, group_divisible=4,
                start_pruning_step=1, pruning_steps=4, pruning_periods=2)
    _train(gm, opt, x, 5)
    for mask in opt.unit_masks().values():
        kept = int((~mask).sum())
        assert kept == len(mask) or kept % 4 == 0
    assert opt.metrics()["num_pruned"] == opt.k_target


def test_quantizer_scalars_no_weight_decay_and_lr_quant(gpt_q) -> None:
    base, x = gpt_q
    gm = copy.deepcopy(base).train()
    opt = QASSO(gm, variant="adamw", lr=1e-2, lr_quant=0.0, weight_decay=0.5,
                start_projection_step=100, start_pruning_step=100)
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if "geta_quant" in n}
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(gm, opt, x, 3)
    sched.step()
    for n, p in gm.named_parameters():
        if n in before:  # lr_quant = 0 and no decay: untouched
            assert torch.equal(p, before[n]), n
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)
    assert opt.param_groups[1]["lr_quant"] == 0.0


def test_adam_moments_start_at_zero() -> None:
    model, x = _gpt()
    gm = geta_fx.transform(model, x).train()
    opt = QASSO(gm, variant="adam", lr=1e-3, start_pruning_step=100, start_projection_step=100)
    w = gm.graph_module.fc.weight
    before = w.detach().clone()
    _train(gm, opt, x, 1)
    step = (w.detach() - before).abs()
    moved = step[step > 0]
    # bias-corrected first Adam step: |dp| = lr * |g| / (|g| + eps) ~ lr (the reference: 0.32 lr)
    assert torch.allclose(moved, torch.full_like(moved, 1e-3), rtol=1e-2)


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_resume_is_bit_exact(variant: str, tmp_path) -> None:
    torch.manual_seed(0)
    model, x = MLP().eval(), (torch.randn(8, 12),)
    recipe = Recipe(model, x, {"quantize": "weight"})
    kw = dict(variant=variant, lr=0.01, lr_quant=1e-2, target_sparsity=0.3, **SCHED)
    if variant == "sgd":
        kw["momentum"] = 0.9
    gm = recipe.build().train()
    opt = QASSO(gm, **kw)
    _train(gm, opt, x, 9)                        # mid-period: selected, not committed
    assert opt.metrics()["num_pruned"] == 0 and bool(opt._redundant.any())
    save_checkpoint(tmp_path / "ck.pt", gm, opt, recipe=recipe, extra={"epoch": 3})
    _train(gm, opt, x, 11, start=9)              # reference run
    # a fresh process would rebuild the module from the recipe; sgd passes a rebuilt one in
    ck = load_checkpoint(tmp_path / "ck.pt", gm=recipe.build() if variant == "sgd" else None)
    assert ck.extra == {"epoch": 3} and ck.optimizer.step_count == 9
    _train(ck.module, ck.optimizer, x, 11, start=9)
    for (n, a), (_, b) in zip(gm.state_dict().items(), ck.module.state_dict().items(),
                              strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n
    assert torch.equal(opt.pruned_units, ck.optimizer.pruned_units)
    assert ck.optimizer.metrics()["stage"] == "cooldown"


def test_load_state_dict_rejects_other_model(resnet_q, gpt_q) -> None:
    a = QASSO(copy.deepcopy(resnet_q[0]), lr=0.1)
    b = QASSO(copy.deepcopy(gpt_q[0]), lr=0.1)
    with pytest.raises(InputError, match="other prunable groups"):
        b.load_state_dict(a.state_dict())


def test_requires_geta_module() -> None:
    with pytest.raises(InputError, match="GetaModule"):
        QASSO(torch.nn.Linear(2, 2))


@pytest.mark.cuda
def test_cuda_exact_and_no_host_sync_between_period_boundaries() -> None:
    """On CUDA, step() never syncs with the host except at selection/commit steps (with the
    non-finite check off: that check costs one sync per step, as GradScaler's does)."""
    model, x = _resnet()
    dev = torch.device("cuda")
    x = tuple(t.to(dev) for t in x)
    gm = geta_fx.transform(model.to(dev), x, quantize="weight").train()
    opt = QASSO(gm, variant="adam", lr=1e-2, lr_quant=1e-2, target_sparsity=0.4,
                nonfinite_patience=None, **SCHED)
    s = opt.schedule
    for i in range(20):
        opt.zero_grad()
        _loss(gm, x, i).backward()
        k = opt.step_count + 1
        boundary = s.is_selection_step(k) or s.is_commit_step(k)
        torch.cuda.set_sync_debug_mode(0 if boundary else "error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    m = opt.metrics()
    assert m["num_pruned"] == m["num_zero_units"] == m["K"] > 0
    assert s.b_l - 1e-4 <= m["bits_min"] <= m["bits_max"] <= s.final_b_u + 1e-4
    gm.eval()
    assert max_rel_err(gm(*x), gm.compress()(*x)) < 1e-5


# ----------------------------------------------------------------------------- q_m > 0


README_QASSO = dict(variant="adamw", lr=1e-3, target_sparsity=0.5, bit_range=(4, 8),
                    start_projection_step=0, projection_steps=20, projection_periods=2,
                    start_pruning_step=20, pruning_steps=40, pruning_periods=4)


def _valid_quantizers(gm: geta_fx.GetaModule) -> None:
    gm.validate()
    for name, q in gm.quantizers.items():
        assert float(q.q_m.detach()) > 0, name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_readme_train_compress_deploy_snippet_never_ends_invalid(seed: int) -> None:
    """README "Train, compress, deploy": the QASSO loop, then compress(lower=True)."""
    torch.manual_seed(seed)
    model = MLP().eval()
    x = torch.randn(16, 12)
    y = torch.randint(0, 4, (16,))
    gm = geta_fx.transform(model, (x,), quantize="weight")
    opt = QASSO(gm, **README_QASSO)
    for _ in range(70):                                   # past the last pruning period
        loss = F.cross_entropy(gm(x), y)
        opt.zero_grad(); loss.backward(); opt.step()      # noqa: E702  (as in the README)
    _valid_quantizers(gm)
    gm.eval()
    slim = gm.compress(lower=True)
    assert opt.metrics()["num_pruned"] == opt.k_target > 0
    assert max_rel_err(gm(x), slim(x)) < 1e-4


def test_q_m_stays_positive_when_the_loss_shrinks_it() -> None:
    """A loss that rewards a smaller clipping range at every step.

    ``sum |Q(W)|`` with every weight clipped (q_m set to half of max |W|): dL/dq_m > 0 at every
    step, so Adam moves q_m by about lr_quant per step.  An additive q_m crossed zero at step 4
    (QuantizerError "q_m = -0.024 is not positive" at compress); log_q_m shrinks it
    geometrically, and the run ends in a valid, lowerable quantizer.
    """
    model = torch.nn.Linear(8, 8, bias=False)
    x = torch.eye(8)
    gm = geta_fx.transform(model, (x,), quantize="weight").train()
    (q,) = gm.quantizers.values()
    bits = float(q.bit_width().detach())
    q.set_q_m(0.5 * float(model.weight.detach().abs().max()))
    q.set_bit_width(bits)
    q_m0 = float(q.q_m.detach())
    opt = QASSO(gm, **(README_QASSO | dict(lr_quant=0.05, target_sparsity=0.0)))
    for k in range(1, 41):
        loss = gm(x).abs().sum()
        opt.zero_grad()
        loss.backward()
        assert float(q.log_q_m.grad) > 0, k  # the loss wants a smaller range
        opt.step()
        _valid_quantizers(gm)
    assert float(q.q_m.detach()) < 0.5 * q_m0  # it did shrink, by a factor, not through 0
    b = opt.bit_widths()
    assert (b >= 4 - 1e-4).all() and (b <= 8 + 1e-4).all()
    gm.eval()
    slim = gm.compress(lower=True)
    assert max_rel_err(gm(x), slim(x)) < 1e-5


def test_load_state_dict_explains_a_version_1_state(resnet_q) -> None:
    opt = QASSO(copy.deepcopy(resnet_q[0]), lr=0.1)
    sd = opt.state_dict()
    sd["qasso"] = dict(sd["qasso"], version=1)
    with pytest.raises(InputError, match="version 1.*raw q_m.*log_q_m"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("other", ["network", "quantize"])
def test_load_checkpoint_into_a_model_it_does_not_fit_writes_nothing(other: str,
                                                                      tmp_path) -> None:
    torch.manual_seed(0)
    model, x = MLP().eval(), (torch.randn(8, 12),)
    gm = geta_fx.transform(model, x, quantize="weight").train()
    opt = QASSO(gm, lr=0.01, target_sparsity=0.3, **SCHED)
    _train(gm, opt, x, 3)
    save_checkpoint(tmp_path / "ck.pt", gm, opt)
    if other == "network":
        target = geta_fx.transform(nn.Sequential(nn.Linear(12, 16), nn.ReLU(),
                                                 nn.Linear(16, 3)), x, quantize="weight")
    else:  # the same network, without its quantizers
        target = geta_fx.transform(model, x)
    before = {k: v.clone() for k, v in target.state_dict().items()
              if isinstance(v, torch.Tensor)}
    with pytest.raises(InputError, match="does not fit this GetaModule.*nothing was loaded"):
        load_checkpoint(tmp_path / "ck.pt", gm=target)
    for k, v in target.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- importance scope


def _scope_model() -> tuple[geta_fx.GetaModule, torch.Tensor]:
    """fc1 (4 -> 6) -> relu -> fc2 (6 -> 3): one prunable group of 6 hidden units.  Units 0-2
    have small fc1 rows but large fc2 columns (they matter downstream), units 3-5 the reverse,
    so the unit's own rows and its whole footprint rank them oppositely."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([0.1] * 3 + [1.0] * 3)[:, None].expand(6, 4))
        m[0].bias.zero_()
        m[2].weight.copy_(torch.tensor([3.0] * 3 + [0.2] * 3).expand(3, 6))
    x = torch.randn(8, 4)
    return geta_fx.transform(m, (x,), quantize="weight"), x


@pytest.mark.parametrize("scope", ["group", "removed"])
def test_importance_scope_reads_the_rows_a_removal_deletes(scope: str) -> None:
    gm, x = _scope_model()
    group = next(g for g in gm.prunable_groups() if g.num_units == 6)
    opt = QASSO(gm, variant="sgd", lr=1e-6, target_sparsity=0.5, bit_range=(8, 8),
                bit_reduction=0, importance={"magnitude": 1.0}, importance_scope=scope,
                start_projection_step=0, projection_steps=1, projection_periods=1,
                start_pruning_step=1, pruning_steps=3, pruning_periods=1)
    assert opt.config["importance_scope"] == scope
    _train(gm, opt, (x,), 6)
    zero = gm.zero_mask(group.id).nonzero().flatten().tolist()
    own = geta_fx.ir.units.unit_sq_norms(gm.graph_module, group, role="out")
    every = geta_fx.ir.units.unit_sq_norms(gm.graph_module, group, role=None)
    assert own.sum() > 0 and every.sum() > own.sum()  # the fc2 columns are counted by role=None
    # "group": the smallest fc1 rows go (GETA_SPEC C.6); "removed": the smallest footprint,
    # fc2's columns included (Torch-Pruning's L2 group importance), i.e. the other half
    assert zero == ([0, 1, 2] if scope == "group" else [3, 4, 5])
    slim = gm.eval().compress()
    assert torch.allclose(slim(x), gm(x), atol=1e-6)


def test_importance_scope_is_checked() -> None:
    gm, _ = _scope_model()
    with pytest.raises(InputError, match="importance_scope must be 'group' or 'removed'"):
        QASSO(gm, importance_scope="all")  # type: ignore[arg-type]
