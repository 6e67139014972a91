"""QASSO's structured layout (issue #17): per-unit statistics, selection and zeroing read each
group's slices as row views, never per-element index tensors.

    PruneGroup "out" slices ──▶ Slab(tensor, dim, rows, units) ──▶ narrow / index_select
                                   O(rows) index bytes               per-unit sums

Oracles: a per-element loop over the ParamSlices (what the old flat layout computed) and the
user's eager model; negative cases: an overlapping slab (an element in two units) is decayed
once, and a DTensor on a 2-D mesh is refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import geta_fx
from geta_fx.ir import meta
from geta_fx.optim import QASSO
from geta_fx.optim import _saliency
from geta_fx.testing.models import ZOO, GPTBlock


def _gm(name: str = "gpt_block") -> geta_fx.GetaModule:
    m, x = ZOO[name]()
    return geta_fx.transform(m, x, quantize="weight").train()


def _oracle_stats(gm: geta_fx.GetaModule, opt: QASSO, dirs: dict[int, torch.Tensor]
                  ) -> torch.Tensor:
    """(sum x^2, sum x g, sum g^2) per unit by an explicit loop over every slice row."""
    lay = opt.layout
    out = torch.zeros(lay.num_units, 3, dtype=torch.float64)
    by_id = {id(p): i for i, p in enumerate(lay.params)}
    for g, off in zip([g for g in gm.groups if g.prunable and g.num_units], lay.group_offsets):
        seen: set[tuple[int, int]] = set()
        for m in g.out_members:
            t = gm.graph_module.get_parameter(m.fqn) if m.is_param else None
            if t is None or id(t) not in by_id:
                continue
            for row, unit in zip(m.indices.tolist(), m.units.tolist()):
                if (id(t), row, m.dim) in seen:  # type: ignore[comparison-overlap]
                    continue
                x = t.detach().select(m.dim, row).double()
                d = dirs[by_id[id(t)]].select(m.dim, row).double()
                out[off + unit] += torch.stack([(x * x).sum(), (x * d).sum(), (d * d).sum()])
    return out


def test_layout_holds_no_per_element_index() -> None:
    gm = _gm("hf_llama_gqa") if _has_transformers() else _gm()
    opt = QASSO(gm, variant="adamw", lr=1e-3)
    n = opt.layout.num_elems
    # rows and units only: far below one byte per weight (the flat layout held 32)
    assert 0 < opt.layout.index_bytes() < n, (opt.layout.index_bytes(), n)
    assert all(s.index.numel() <= s.units.numel() for s in opt.layout.slabs)


def test_unit_stats_match_a_per_row_loop() -> None:
    gm = _gm()
    opt = QASSO(gm, variant="adam", lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    lay = opt.layout
    dirs = {i: torch.randn(p.shape, generator=gen) for i, p in enumerate(lay.params)}
    stats = torch.zeros(lay.num_units, 3)
    for i, p in enumerate(lay.params):
        _saliency.add_unit_stats(stats, lay.param_slabs(i), p.detach(), dirs[i])
    want = _oracle_stats(gm, opt, dirs)
    assert torch.allclose(stats.double(), want, rtol=1e-5, atol=1e-6)
    assert (stats[:, 0] > 0).all()  # every unit has weights: the loop covered all rows


def test_qasso_prunes_exactly_k_and_matches_eager_on_kept_units() -> None:
    torch.manual_seed(0)
    model = GPTBlock(d=16, heads=4, vocab=20).eval()
    ids = torch.randint(0, 20, (2, 8))
    gm = geta_fx.transform(model, (ids,), quantize=None).train()
    opt = QASSO(gm, variant="adamw", lr=1e-2, target_sparsity=0.4, start_pruning_step=2,
                pruning_steps=4, pruning_periods=2, start_projection_step=0,
                projection_steps=2)
    for _ in range(8):
        loss = gm(ids).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = opt.metrics()
    assert m["num_pruned"] == m["num_zero_units"] == opt.k_target > 0
    slim = gm.compress()
    with torch.no_grad():
        assert torch.allclose(slim(ids), gm.eval()(ids), atol=1e-5)


class _Overlap(nn.Module):
    """A bias-like vector in two groups' slices (rows 0-3 shared): an element in two units."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.linspace(1.0, 2.0, 6))


class _FakeGeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.graph_module = _Overlap()
        self.quantizers = nn.ModuleDict()
        ar = torch.arange
        sl = [meta.ParamSlice("v", 0, ar(0, 4), ar(0, 4), "out", True),
              meta.ParamSlice("v", 0, ar(2, 6), ar(0, 4), "out", True)]
        self.groups = tuple(meta.PruneGroup(i, 4, True, None, (s,), (), 1, 4 * i)
                            for i, s in enumerate(sl))


def test_overlapping_slabs_decay_each_element_once() -> None:
    fake = _FakeGeta()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = QASSO(fake, variant="sgd", lr=0.0, target_sparsity=0.5, min_kept=1,
                    start_projection_step=0, projection_steps=1, start_pruning_step=1,
                    pruning_steps=3, pruning_periods=1, nonfinite_patience=None)
    assert opt.layout.overlap == [True]
    v = fake.graph_module.v
    v.grad = v.detach().clone()  # aligned with v: the positive branch, gamma = 1/(T - t)
    opt.step()   # warm-up/projection (lr 0: nothing moves)
    before = v.detach().clone()
    opt.step()   # selection + first joint step of a 3-step period: gamma = 1/2
    red = opt._redundant  # noqa: SLF001 - the plan under test
    per_slab = [set(s.index[red[s.units]].tolist()) for s in opt.layout.slabs]
    rows = per_slab[0] | per_slab[1]
    assert per_slab[0] & per_slab[1], per_slab  # some element is redundant in two units
    after = v.detach()
    for r in range(6):
        want = before[r] * 0.5 if r in rows else before[r]  # once, not once per unit
        assert torch.isclose(after[r], want), (r, after[r], want)
    assert rows and len(rows) < 6


def test_dtensor_on_2d_mesh_is_refused() -> None:
    from geta_fx.errors import GetaFxError
    from geta_fx.optim._layout import _shard_info

    class Fake2D:
        placements = (object(), object())

        class device_mesh:  # noqa: N801
            ndim = 2

    class P:
        def __init__(self) -> None:
            self.is_shard = lambda: True
            self.dim = 0

    Fake2D.placements = (P(), P())
    with pytest.raises(GetaFxError, match="w.*2-D mesh"):
        _shard_info(Fake2D(), "w")  # type: ignore[arg-type]


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        transformers.LlamaConfig  # noqa: B018
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True
