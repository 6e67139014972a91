"""benchmarks/bench_pretrained.py --quick (issue #12): the pretrained-compression benchmark runs
end to end in CI, and its baseline is what it says (L2 pruning of the same groups)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from helpers import run_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_pretrained.py")

pytest.importorskip("sklearn", reason="the benchmark's digits task needs scikit-learn")


def _bench():
    sys.path.insert(0, os.path.dirname(SCRIPT))  # the script imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("bench_pretrained", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_pretrained"] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return mod


def test_l2_prune_zeroes_the_smallest_units_of_every_group():
    import geta_fx
    from geta_fx.ir.units import unit_sq_norms
    from geta_fx.testing.models import DigitsCNN

    bench = _bench()
    gm = geta_fx.transform(DigitsCNN(8, 16, 16, 32).eval(), (torch.randn(4, 1, 8, 8),))
    norms = {g.id: unit_sq_norms(gm.graph_module, g, role=None) for g in gm.prunable_groups()}
    n = bench.l2_prune(gm, 0.5)
    assert n == sum(round(0.5 * g.num_units) for g in gm.prunable_groups())
    for g in gm.prunable_groups():
        zero = gm.zero_mask(g.id)
        k = round(0.5 * g.num_units)
        assert int(zero.sum()) == k
        # the zeroed units are exactly the k of smallest norm before pruning
        assert set(torch.argsort(norms[g.id])[:k].tolist()) == set(zero.nonzero().flatten().tolist())


@pytest.mark.slow
def test_quick_run_prints_geta_and_baseline_rows(tmp_path):
    out = run_benchmark("bench_pretrained.py", "--quick", cwd=tmp_path)
    table = [line for line in out.splitlines() if line.startswith("| digits |")]
    methods = [line.split("|")[2].strip() for line in table]
    assert methods == ["GETA", "L2+QAT"], out
    for line in table:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        acc = float(cells[4].rstrip("%"))
        assert 10.0 < acc <= 100.0, line  # a compressed model that still classifies
        assert cells[6] == "50.0%", line  # both reach the requested group sparsity


def test_mean_row_averages_the_seeds_and_shows_their_spread():
    bench = _bench()

    def row(q: float, bops: float, speed: float) -> object:
        return bench.Row("mnist", "acc", "GETA", 0.7, "4-8", q, 0.98, 0.7, 5.0, bops, 1000,
                         {"channel": "1/2"}, dict.fromkeys(("slim", "lowered", "fp32 exact",
                                                             "fp32 auto"), speed), 10.0)

    m = bench.mean_row([row(0.95, 0.01, 1.0), row(0.93, 0.03, 2.0)])
    assert m.quality == pytest.approx(0.94) and m.bops == pytest.approx(0.02)
    assert m.speedups["slim"] == pytest.approx(1.5) and m.per_seed == (0.95, 0.93)
    cell = m.cells()[4]
    assert cell.startswith("94.00% ±1.4 (95.0/93.0)"), cell  # sd of 95 and 93: 1.41
    assert "±" not in bench.mean_row([row(0.95, 0.01, 1.0)]).cells()[4]  # one seed: no spread
