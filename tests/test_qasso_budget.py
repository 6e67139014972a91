"""QASSO bit budgets (issue #20): ``target_avg_bits`` / ``target_bops`` met on the slim model,
bits allocated by sensitivity, unreachable budgets refused up front.

    transform(model) -> QASSO(target_avg_bits=B) ─ steps ─▶ report(gm.compress())
                                                             .avg_quantized_weight_bits ≈ B
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import MLP, GPTBlock, ResNetCifar

import geta_fx
from geta_fx.errors import InputError
from geta_fx.optim import QASSO
from geta_fx.optim import _budget
from geta_fx.report import bit_cost, report

STEPS = 24


def _task(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resnet":
        return ResNetCifar(depth=8, widths=(8, 16, 16)).eval(), torch.randn(8, 3, 8, 8)
    if name == "gpt":
        return GPTBlock(d=16, heads=4, vocab=20).eval(), torch.randint(0, 20, (8, 8))
    return MLP().eval(), torch.randn(8, 12)


def _train(gm: geta_fx.GetaModule, x: torch.Tensor, steps: int = STEPS,
           opt: QASSO | None = None, **kw: object) -> QASSO:
    if opt is None:
        opt = QASSO(gm, variant=kw.pop("variant", "adamw"), lr=kw.pop("lr", 1e-3),
                    total_steps=steps, bit_reduction=0, **kw)  # type: ignore[arg-type]
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        out = gm(x)
        target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1)).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("name,quantize,budget,sparsity", [
    ("resnet", "weight", 4.5, 0.3),
    ("resnet", "weight_act", 3.0, 0.5),
    ("gpt", "weight", 5.0, 0.3),
    ("gpt", "weight_act", 4.0, 0.3),
    ("mlp", "weight", 6.0, 0.0),
])
def test_avg_bits_met_on_slim_model(name: str, quantize: str, budget: float,
                                    sparsity: float) -> None:
    model, x = _task(name)
    gm = geta_fx.transform(model, (x[:2],), quantize=quantize)
    opt = _train(gm, x, target_sparsity=sparsity, bit_range=(2, 8), target_avg_bits=budget,
                 act_bit_range=(6, 8) if quantize == "weight_act" else None)
    m = opt.metrics()
    assert m["budget"] == "avg_bits" and m["budget_target"] == budget
    gm.eval()
    rep = report(gm.compress())
    assert rep.avg_quantized_weight_bits == pytest.approx(m["budget_reached"], abs=1e-9)
    assert abs(rep.avg_quantized_weight_bits - budget) <= 0.05
    alloc = opt.bit_allocation()
    assert alloc is not None and set(alloc.values()) <= set(range(2, 9))
    for qname, q in gm.quantizers.items():  # the frozen bits are the allocation
        b = round(float(q.bit_width().detach()))
        if q.kind == "weight":
            assert b == alloc[qname], qname
        else:  # activation quantizers stay within act_bit_range
            assert 6 <= b <= 8, qname
    if sparsity:
        assert m["sparsity"] == pytest.approx(sparsity, abs=0.02)


def test_bops_budget_met() -> None:
    model, x = _task("gpt")
    gm = geta_fx.transform(model, (x[:2],), quantize="weight_act")
    # the dense model (no pruning) at weight bits 2 and 8, activations pinned at 8 bits
    bc = bit_cost(gm)
    names = list(gm.quantizers)
    w = [gm.quantizers[n].kind == "weight" for n in names]
    lin = _budget.linear_cost(_budget.Budget("bops", 0.5), bc, names, w,
                              dict.fromkeys(names, 8))
    least, most = _budget.reach(lin, 2, 8, torch.tensor(w))
    target = least + 0.55 * (most - least)
    opt = _train(gm, x, target_sparsity=0.0, bit_range=(2, 8), act_bit_range=(8, 8),
                 target_bops=target)
    gm.eval()
    rep = report(gm.compress())
    assert opt.metrics()["budget_reached"] == pytest.approx(rep.relative_bops, rel=1e-9)
    assert abs(rep.relative_bops / target - 1) <= 0.01
    assert len(set(opt.bit_allocation().values())) > 1  # a mixed allocation


def test_bops_budget_with_pruning() -> None:
    model, x = _task("resnet")
    gm = geta_fx.transform(model, (x[:2],), quantize="weight")
    rep0 = report(gm)  # activations unquantized: weight bits x 32
    target = rep0.relative_bops / 16 * 4 * 0.55  # 4-bit weights on a ~30%-pruned model
    opt = _train(gm, x, target_sparsity=0.3, bit_range=(2, 8), target_bops=target)
    gm.eval()
    rep = report(gm.compress())
    assert abs(rep.relative_bops / target - 1) <= 0.01, (rep.relative_bops, target)
    assert opt.metrics()["budget_reached"] == pytest.approx(rep.relative_bops, rel=1e-9)


class TwoPaths(nn.Module):
    """``a`` feeds the loss at full scale, ``b`` at 1e-4: quantizing ``b`` costs nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32, bias=False)
        self.b = nn.Linear(32, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 1e-4 * self.b(x)


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_sensitive_layer_keeps_bits(variant: str) -> None:
    torch.manual_seed(0)
    model = TwoPaths().eval()
    x = torch.randn(64, 32)
    with torch.no_grad():
        target = model(x)
    gm = geta_fx.transform(model, (x[:2],), quantize="weight")
    opt = QASSO(gm, variant=variant, lr=1e-4, total_steps=12, target_sparsity=0.0,
                bit_range=(2, 8), bit_reduction=0, target_avg_bits=5)
    for _ in range(12):
        opt.zero_grad()
        F.mse_loss(gm(x), target).backward()
        opt.step()
    alloc = opt.bit_allocation()
    qa = next(n for n in alloc if n.endswith(".a_weight"))
    qb = next(n for n in alloc if n.endswith(".b_weight"))
    assert (alloc[qa], alloc[qb]) == (8, 2), alloc
    assert opt.metrics()["budget_reached"] == pytest.approx(5.0)


def test_measured_sensitivity_with_budget_loss() -> None:
    """budget_loss: the allocation measures the loss per layer and bit width (eval mode, no
    grad); the quantizers are left as they were between allocations."""
    torch.manual_seed(0)
    model = TwoPaths().eval()
    x, held_out = torch.randn(64, 32), torch.randn(32, 32)
    with torch.no_grad():
        target, held_target = model(x), model(held_out)
    gm = geta_fx.transform(model, (x[:2],), quantize="weight")
    calls = []

    def held_out_loss() -> torch.Tensor:
        calls.append((gm.training, torch.is_grad_enabled()))
        return F.mse_loss(gm(held_out), held_target)

    opt = QASSO(gm, variant="adamw", lr=1e-4, total_steps=12, target_sparsity=0.0,
                bit_range=(2, 8), bit_reduction=0, target_avg_bits=5,
                budget_loss=held_out_loss)
    gm.train()
    for _ in range(12):
        opt.zero_grad()
        F.mse_loss(gm(x), target).backward()
        opt.step()
    assert gm.training  # restored
    alloc = opt.bit_allocation()
    assert (alloc["geta_quant.a_weight"], alloc["geta_quant.b_weight"]) == (8, 2), alloc
    assert len(calls) == 2 * (1 + 2 * 7) and set(calls) == {(False, False)}
    with pytest.raises(InputError, match="budget_loss is only used with"):
        QASSO(gm, target_sparsity=0.0, budget_loss=held_out_loss)


def test_allocate_known_answer() -> None:
    """The knapsack: the loss-ignored layer goes to the floor, sizes respected."""
    sens = torch.tensor([[4.0 ** -b for b in range(2, 9)],     # sensitive
                         [0.0] * 7,                             # ignored
                         [4.0 ** -b * 0.01 for b in range(2, 9)]], dtype=torch.float64)
    lin = _budget.Linear(torch.tensor([100.0, 100.0, 200.0], dtype=torch.float64), 0.0,
                         5.0 * 400, 400.0)
    bits, got = _budget.allocate(sens, lin, 2, 8, 0.05, torch.tensor([True, True, True]))
    assert bits[1] == 2 and bits[0] > bits[2]
    assert abs(got - 5.0) <= 0.05


def test_budget_price_known_answer() -> None:
    """The least price that makes the plan meet the limit; none when saliency meets it."""
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    saving = torch.tensor([0.0, 0.0, 1.0, 1.0])

    def plan(adjusted: torch.Tensor) -> torch.Tensor:  # the one lowest unit
        return torch.arange(4) == adjusted.argmin()

    lam, cost = _budget.budget_price(scores, saving, 2.0, 1.5, plan)
    assert lam == pytest.approx(0.2, abs=1e-6) and cost == 1.0  # just past unit 0's 0.1
    adjusted = _budget.priced(scores, saving, lam)
    assert int(adjusted.argmin()) == 2  # the cheaper of the two savers
    assert torch.equal(adjusted[:2], scores[:2])
    assert _budget.budget_price(scores, saving, 2.0, 2.0, plan) == (0.0, 2.0)  # saliency: ok
    assert _budget.priced(scores, saving, 0.0) is scores
    lam, cost = _budget.budget_price(scores, saving, 2.0, 0.5, plan)
    assert cost == 1.0 and bool(saving[_budget.priced(scores, saving, lam).argmin()] == 1)


def _attention_budget_run(budget_selection: bool, share: float
                          ) -> tuple[QASSO, geta_fx.GetaModule, list[str]]:
    """A GPT block at 32 tokens, whose FP32 attention matmuls (activation x activation, not
    quantized) dominate its BOPs; the budget is ``share`` of those matmuls alone."""
    torch.manual_seed(0)
    model, x = GPTBlock(d=16, heads=4, vocab=20).eval(), torch.randint(0, 20, (4, 32))
    gm = geta_fx.transform(model, (x[:2],), quantize="weight_act")
    bc = bit_cost(gm)
    attention = sum(m * w * a for m, w, a in bc.terms
                    if isinstance(w, int) and isinstance(a, int)) / bc.fp32_bops
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = _train(gm, x, target_sparsity=0.3, bit_range=(2, 8), act_bit_range=(8, 8),
                     target_bops=share * attention, budget_selection=budget_selection)
    return opt, gm.eval(), [str(w.message) for w in rec]


def test_bops_budget_prices_the_selection() -> None:
    """Only removing a head meets this budget: GETA's saliency alone keeps every head (MLP
    channels score lowest) and misses it with every weight at 2 bits; priced by what each
    unit saves, the selection removes a head and the budget is met."""
    opt, gm, said = _attention_budget_run(False, 0.9)
    heads = next(g for g in gm.prunable_groups() if g.num_units == 4)
    assert int(gm.zero_mask(heads.id).sum()) == 0
    assert any("missed" in w for w in said), said
    assert set(opt.bit_allocation().values()) == {2}

    assert "selection_price" not in opt.metrics()

    opt, gm, said = _attention_budget_run(True, 0.9)
    assert not any("missed" in w for w in said), said
    m = opt.metrics()
    assert 0 <= m["selection_price"] <= m["selection_price_max"]
    assert int(gm.zero_mask(heads.id).sum()) >= 1
    target = opt.config["target_bops"]
    assert abs(report(gm.compress()).relative_bops / target - 1) <= 0.01
    assert opt.metrics()["sparsity"] == pytest.approx(0.3, abs=0.02)  # same unit count


def test_budget_selection_keeps_saliency_when_the_budget_is_loose() -> None:
    """A budget the provisional bits cannot spend: the price is 0, the units are GETA's."""
    model, x = _task("resnet")
    masks = []
    for priced in (False, True):
        gm = geta_fx.transform(model, (x[:2],), quantize="weight")
        rep0 = report(gm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pruned model cannot spend it: "missed"
            opt = _train(gm, x, target_sparsity=0.3, bit_range=(2, 8),
                         target_bops=rep0.relative_bops / 16 * 8 * 0.9,
                         budget_selection=priced)
        masks.append(opt.pruned_units)
    assert opt.metrics()["selection_price_max"] == 0  # saliency alone met it: no price
    assert bool(masks[0].any()) and torch.equal(masks[0], masks[1])


def test_unreachable_budgets_raise() -> None:
    model, x = _task("mlp")
    gm = geta_fx.transform(model, (x[:2],), quantize="weight")
    with pytest.raises(InputError, match=r"target_avg_bits=9 cannot be reached .*\[2, 8\]"):
        QASSO(gm, bit_range=(2, 8), bit_reduction=0, target_avg_bits=9)
    with pytest.raises(InputError, match="target_avg_bits=3 cannot be reached"):
        QASSO(gm, bit_range=(4, 8), bit_reduction=0, target_avg_bits=3)
    with pytest.raises(InputError, match=r"target_avg_bits=7 cannot be reached .*\[4, 6\]"):
        QASSO(gm, bit_range=(4, 8), bit_reduction=2, target_avg_bits=7)  # final b_u = 6
    with pytest.raises(InputError, match="not both"):
        QASSO(gm, target_avg_bits=4, target_bops=0.1)
    with pytest.raises(InputError, match="target_bops is a fraction"):
        QASSO(gm, target_bops=2.0)
    with pytest.raises(InputError, match="target_bops=0.0001 cannot be reached"):
        QASSO(gm, bit_range=(2, 8), bit_reduction=0, target_bops=1e-4)
    with pytest.raises(InputError, match="no integer bit width"):
        QASSO(gm, bit_range=(4.2, 4.8), bit_reduction=0, target_avg_bits=4.5)
    float_gm = geta_fx.transform(MLP().eval(), (x[:2],), quantize=None)
    with pytest.raises(InputError, match="needs weight quantizers"):
        QASSO(float_gm, target_avg_bits=4)


def test_granularity_is_checked() -> None:
    """Two equal layers between 4 and 5 bits average 4, 4.5 or 5: 4.25 is refused."""
    torch.manual_seed(0)
    model = TwoPaths().eval()
    gm = geta_fx.transform(model, (torch.randn(2, 32),), quantize="weight")
    with pytest.raises(InputError, match="not reachable within 0.05 bits"):
        QASSO(gm, bit_range=(4, 5), bit_reduction=0, target_avg_bits=4.25, target_sparsity=0)
    QASSO(gm, bit_range=(4, 5), bit_reduction=0, target_avg_bits=4.5, target_sparsity=0)


def test_budget_state_resumes() -> None:
    model, x = _task("mlp")
    gm = geta_fx.transform(model, (x[:2],), quantize="weight")
    opt = _train(gm, x, target_sparsity=0.3, bit_range=(2, 8), target_avg_bits=4)
    sd = opt.state_dict()
    opt2 = QASSO(gm, **opt.config)
    opt2.load_state_dict(sd)
    assert opt2.bit_allocation() == opt.bit_allocation()
    assert opt2.metrics()["budget_reached"] == opt.metrics()["budget_reached"]
    assert opt.config["target_avg_bits"] == 4


def test_no_budget_keeps_reference_rule() -> None:
    """Without a budget nothing changes: no allocation, the bits follow GETA_SPEC C.6/C.7,
    and a floor of 2 bits says up front where the pruned layers will end."""
    model, x = _task("mlp")
    gm = geta_fx.transform(model, (x[:2],), quantize="weight")
    with pytest.warns(UserWarning, match=r"b_l=2 without a bit budget.*end at 2 bits.*"
                                         r"target_bops=") as rec:
        opt = QASSO(gm, variant="adamw", lr=1e-3, total_steps=STEPS, bit_reduction=0,
                    target_sparsity=0.3, bit_range=(2, 8))
    assert rec[0].filename == __file__  # the warning points at the user's QASSO(...) line
    _train(gm, x, opt=opt)
    assert opt.bit_allocation() is None and "budget" not in opt.metrics()
    # what the warning states: the layers of the pruned groups are at the floor
    pruned = {gid for gid, m in opt.unit_masks().items() if bool(m.any())}
    assert pruned
    out = {m.fqn for g in gm.groups if g.id in pruned for m in g.out_members}
    rows = [r for r in report(gm).quantizers if r.kind == "weight" and r.target in out]
    assert rows and all(r.bits_rounded == 2 for r in rows), rows


@pytest.mark.parametrize("kw", [
    {"bit_range": (4, 8)},                                   # floor above 3 bits
    {"bit_range": (2, 8), "target_avg_bits": 5},             # a budget allocates instead
    {"bit_range": (2, 8), "target_sparsity": 0.0},           # nothing is pruned
    {"bit_range": (2, 2)},                                   # fixed bits: nothing to choose
])
def test_no_low_floor_warning_when_nothing_goes_to_the_floor(kw: dict) -> None:
    model, x = _task("mlp")
    gm = geta_fx.transform(model, (x[:2],), quantize="weight")
    kw = {"target_sparsity": 0.3, **kw}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without a bit budget")
        QASSO(gm, variant="adamw", lr=1e-3, total_steps=STEPS, bit_reduction=0, **kw)
