"""QASSO's plain step against torch.optim, and in mixed precision (issue #17, items 1-2).

Oracle: ``torch.optim.AdamW`` / ``Adam`` / ``SGD`` on a deep copy of the same GetaModule, the
weights in one group (``lr``, ``weight_decay``), the quantizer scalars in another (``lr_quant``,
no weight decay), fed the *same* gradients.  In warm-up QASSO's step is that step (GETA_SPEC
C.4) up to float32 rounding.

Why the same gradients and not two forward passes: a GPT block's key bias has an exactly zero
true gradient (softmax is shift invariant), so what autograd returns is rounding noise (~1e-11),
and Adam normalises noise to steps of size ``lr``; two runs that differ by one ulp then drift
apart by ~lr per step on those entries (and a quantizer's ``log_d`` gradient jumps when a weight
crosses a rounding boundary).  In float64 the noise is 1e-20 and the two runs agree to 1e-10:
that end-to-end check is below too.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch

import geta_fx
from geta_fx.optim import QASSO
from geta_fx.testing.models import GPTBlock

#: warm-up for the whole test (projection never starts)
_WARMUP = {"start_projection_step": 1000, "projection_steps": 1, "start_pruning_step": 1001,
           "pruning_steps": 1}


@functools.cache
def _captured(quantize: str | None, dtype: torch.dtype
              ) -> tuple[geta_fx.GetaModule, torch.Tensor]:
    torch.manual_seed(0)
    model = GPTBlock(d=16, heads=4, vocab=20).eval().to(dtype)
    ids = torch.randint(0, 20, (2, 8))
    return geta_fx.transform(model, (ids,), quantize=quantize).train(), ids


def _gpt(quantize: str | None = "weight", dtype: torch.dtype = torch.float32
         ) -> tuple[geta_fx.GetaModule, torch.Tensor]:
    """A fresh copy of a captured GPT block (captured once per setting)."""
    gm, ids = _captured(quantize, dtype)
    return copy.deepcopy(gm), ids


def _reference(gm: geta_fx.GetaModule, opt: QASSO, variant: str, lr: float, lr_quant: float,
               wd: float, quant_wd: float = 0.0) -> tuple[geta_fx.GetaModule, Any]:
    """A deep copy of ``gm`` and the torch optimizer QASSO's warm-up step must equal."""
    ref = copy.deepcopy(gm)
    qids = {id(p) for p in opt.param_groups[1]["params"]} if len(opt.param_groups) > 1 else set()
    qnames = {n for n, p in gm.named_parameters() if id(p) in qids}
    rp = dict(ref.named_parameters())
    groups = [{"params": [p for n, p in rp.items() if n not in qnames]}]
    if qnames:
        groups.append({"params": [rp[n] for n in qnames], "lr": lr_quant,
                       "weight_decay": quant_wd})
    if variant == "adamw":
        return ref, torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    if variant == "adam":
        return ref, torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    return ref, torch.optim.SGD(groups, lr=lr, momentum=0.9, dampening=0.1, weight_decay=wd)


def _feed_same_grads(models: list[geta_fx.GetaModule], step: int) -> None:
    """The same random gradient (and a smaller one for quantizer scalars) on every model."""
    gen = torch.Generator().manual_seed(100 + step)
    named = [dict(m.named_parameters()) for m in models]
    for n, p in named[0].items():
        scale = 0.05 if ".geta_quant." in n or "log_" in n else 1.0
        g = torch.randn(p.shape, generator=gen) * scale
        for params in named:
            params[n].grad = g.to(params[n].dtype).clone()


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, str]:
    pb = dict(b.named_parameters())
    return max(((p.detach().float() - pb[n].detach().float()).abs().max().item(), n)
               for n, p in a.named_parameters())


@pytest.mark.parametrize("variant", ["adamw", "adam", "sgd"])
def test_warmup_step_is_the_torch_optimizer_step(variant: str) -> None:
    gm, _ = _gpt()
    kw = {"momentum": 0.9, "dampening": 0.1} if variant == "sgd" else {}
    opt = QASSO(gm, variant=variant, lr=1e-2, lr_quant=1e-3, weight_decay=0.05, **kw,
                **_WARMUP)
    assert len(opt.param_groups) == 2  # the quantizer scalars are in the comparison
    ref, ropt = _reference(gm, opt, variant, 1e-2, 1e-3, 0.05)
    for k in range(12):
        _feed_same_grads([gm, ref], k)
        opt.step()
        ropt.step()
    diff, name = _max_diff(gm, ref)
    assert diff <= 1e-6, (variant, name, diff)
    assert opt.stage == "warmup"


def test_quantizer_scalars_get_no_weight_decay() -> None:
    """Negative: the oracle with weight decay on the quantizer scalars is *not* QASSO's step
    (so the test above would notice a decayed scalar), while the weights still agree."""
    gm, _ = _gpt()
    opt = QASSO(gm, variant="adamw", lr=1e-2, lr_quant=1e-1, weight_decay=0.5, **_WARMUP)
    ref, ropt = _reference(gm, opt, "adamw", 1e-2, 1e-1, 0.5, quant_wd=0.5)
    for k in range(5):
        _feed_same_grads([gm, ref], k)
        opt.step()
        ropt.step()
    qids = {id(p) for p in opt.param_groups[1]["params"]}
    rp = dict(ref.named_parameters())
    wdiff = max((p - rp[n]).abs().max().item() for n, p in gm.named_parameters()
                if id(p) not in qids)
    qdiff = max((p - rp[n]).abs().max().item() for n, p in gm.named_parameters()
                if id(p) in qids)
    assert wdiff <= 1e-6 and qdiff > 1e-3, (wdiff, qdiff)


def test_float64_training_matches_adamw_end_to_end() -> None:
    """Real forward/backward passes on both copies: float64 rounding noise is too small for
    Adam to amplify (see the module docstring), so the runs agree to 1e-10."""
    gm, ids = _gpt(quantize=None, dtype=torch.float64)
    opt = QASSO(gm, variant="adamw", lr=1e-2, weight_decay=0.01, **_WARMUP)
    ref, ropt = _reference(gm, opt, "adamw", 1e-2, 0.0, 0.01)
    for _ in range(5):
        for m, o in ((gm, opt), (ref, ropt)):
            o.zero_grad()
            m(ids).square().mean().backward()
            o.step()
    diff, name = _max_diff(gm, ref)
    assert diff <= 1e-10, (name, diff)
    moved, _ = _max_diff(gm, _gpt(quantize=None, dtype=torch.float64)[0])
    assert moved > 1e-3  # the runs trained


# ------------------------------------------------------------------ mixed precision (item 2)
_SCHEDULE = {"start_projection_step": 1, "projection_steps": 2, "start_pruning_step": 3,
             "pruning_steps": 4, "pruning_periods": 2, "target_sparsity": 0.3}


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_bf16_weights_step_as_adamw_on_fp32_master_copies(variant: str) -> None:
    """bf16 weights: QASSO keeps fp32 master copies (and moments); they follow the torch
    optimizer on fp32 copies of the weights, and the bf16 weights are those copies rounded."""
    gm, _ = _gpt()
    gm = gm.to(torch.bfloat16)
    for q in gm.quantizers.values():  # the quantizer scalars stay fp32
        q.float()
    kw = {"momentum": 0.9, "dampening": 0.1} if variant == "sgd" else {}
    opt = QASSO(gm, variant=variant, lr=1e-2, lr_quant=1e-3, weight_decay=0.05, **kw,
                **_WARMUP)
    ref, ropt = _reference(gm, opt, variant, 1e-2, 1e-3, 0.05)
    ref = ref.float()
    for k in range(12):
        _feed_same_grads([gm, ref], k)  # bf16 values on both sides
        rp = dict(ref.named_parameters())
        for n, p in gm.named_parameters():
            rp[n].grad = p.grad.float()
        opt.step()
        ropt.step()
    rp = dict(ref.named_parameters())
    qids = {id(p) for p in opt.param_groups[1]["params"]}
    finer = 0.0
    for n, p in gm.named_parameters():
        if id(p) in qids:
            assert p.dtype == torch.float32 and "master" not in opt.state.get(p, {}), n
            assert (p - rp[n]).abs().max() <= 1e-6, n
            continue
        st = opt.state[p]
        moment = st["exp_avg"] if variant == "adamw" else st["momentum_buffer"]
        assert st["master"].dtype == moment.dtype == torch.float32, n
        assert (st["master"] - rp[n]).abs().max() <= 1e-6, n
        assert torch.equal(p, st["master"].to(torch.bfloat16)), n
        finer = max(finer, float((st["master"] - p.detach().float()).abs().max()))
    assert finer > 0  # the master copies hold what bf16 cannot (they are really used)


def _train(gm: geta_fx.GetaModule, opt: QASSO, ids: torch.Tensor, steps: int,
           autocast: bool = False) -> None:
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = gm(ids)
        out.float().square().mean().backward()
        opt.step()


def test_bf16_weights_prune_to_target_and_resume_bit_exactly() -> None:
    gm, ids = _gpt()
    gm = gm.to(torch.bfloat16)
    for q in gm.quantizers.values():
        q.float()
    start = copy.deepcopy(gm)
    opt = QASSO(gm, variant="adamw", lr=1e-2, **_SCHEDULE)
    _train(gm, opt, ids, 5)
    ckpt = copy.deepcopy({"module": gm.state_dict(), "optim": opt.state_dict()})
    _train(gm, opt, ids, 5)
    m = opt.metrics()
    assert m["num_pruned"] == m["num_zero_units"] == opt.k_target > 0
    for p, st in opt.state.items():  # committed rows are zero in the masters too
        if "master" in st:
            assert torch.equal(p, st["master"].to(p.dtype))
    gm2 = start
    opt2 = QASSO(gm2, variant="adamw", lr=1e-2, **_SCHEDULE)
    gm2.load_state_dict(ckpt["module"])
    opt2.load_state_dict(ckpt["optim"])
    assert all(st["master"].dtype == torch.float32 for st in opt2.state.values() if "master" in st)
    _train(gm2, opt2, ids, 5)
    for (n, a), (_, b) in zip(gm.named_parameters(), gm2.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    for p, p2 in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"], strict=True):
        assert torch.equal(opt.state[p]["master"], opt2.state[p2]["master"])


def test_bf16_autocast_steps_as_adamw_and_prunes() -> None:
    """fp32 weights, bf16 autocast forward: the gradients are fp32 and QASSO's warm-up steps
    are AdamW's on them; a run through every stage reaches the target, scalars stay fp32."""
    gm, ids = _gpt()
    opt = QASSO(gm, variant="adamw", lr=1e-2, lr_quant=1e-3, weight_decay=0.05, **_WARMUP)
    ref, ropt = _reference(gm, opt, "adamw", 1e-2, 1e-3, 0.05)
    rp = dict(ref.named_parameters())
    for _ in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gm(ids)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        for n, p in gm.named_parameters():
            assert p.grad is None or p.grad.dtype == torch.float32, n
            rp[n].grad = None if p.grad is None else p.grad.clone()
        opt.step()
        ropt.step()
    diff, name = _max_diff(gm, ref)
    assert diff <= 1e-6, (name, diff)

    gm, ids = _gpt()
    opt = QASSO(gm, variant="adamw", lr=1e-2, **_SCHEDULE)
    _train(gm, opt, ids, 10, autocast=True)
    m = opt.metrics()
    assert m["stage"] == "cooldown" and m["num_pruned"] == m["num_zero_units"] == opt.k_target
    assert all(p.dtype == torch.float32 for p in opt.param_groups[1]["params"])
    assert 4 <= m["bits_min"] <= m["bits_max"] <= 16
