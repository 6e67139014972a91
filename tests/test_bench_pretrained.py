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


@pytest.mark.parametrize("role", [None, "out"])
def test_l2_prune_zeroes_the_smallest_units_of_every_group(role):
    import geta_fx
    from geta_fx.ir.units import unit_sq_norms
    from geta_fx.testing.models import DigitsCNN

    bench = _bench()
    gm = geta_fx.transform(DigitsCNN(8, 16, 16, 32).eval(), (torch.randn(4, 1, 8, 8),))
    norms = {g.id: unit_sq_norms(gm.graph_module, g, role=role) for g in gm.prunable_groups()}
    n = bench.l2_prune(gm, 0.5, role)
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
    assert "BN recalibration all batches" in out   # the recipe's last step, for both methods
    table = [line for line in out.splitlines() if line.startswith("| digits |")]
    methods = [line.split("|")[2].strip() for line in table]
    assert methods == ["GETA", "L2+QAT"], out
    for line in table:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        acc = float(cells[4].rstrip("%"))
        assert 10.0 < acc <= 100.0, line  # a compressed model that still classifies
        assert cells[6] == "50.0%", line  # both reach the requested group sparsity


@pytest.mark.slow
def test_ablation_pairs_each_variant_with_the_baseline(tmp_path):
    pytest.importorskip("scipy")
    out = run_benchmark("ablate_pretrained.py", "--seeds", "0,1", "--steps", "12",
                        "--points", "0.5:4",
                        "--variants", "base-out,even-magrem-2-early,def-def-2-pre-sal",
                        cwd=tmp_path)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| digits |")]
    assert [r[3] for r in rows] == ["base", "base-out", "even-magrem-2-early",
                                    "def-def-2-pre-sal"], out
    assert rows[0][6] == "" and rows[1][6].endswith(" pt"), out  # paired against "base"
    assert rows[1][5] == "1.00" and float(rows[2][5]) <= 1.02, out  # at the baseline's BOPs
    assert all(r[8] in ("better", "worse", "tie") for r in rows[1:]), out


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


def test_paired_table_pairs_seeds_and_matched_rows_with_their_baseline():
    """GETA - baseline seed by seed with a t interval; a row at a baseline's BOPs is paired
    with that baseline only; a loss metric counts a lower GETA loss as better."""
    pytest.importorskip("scipy", reason="the paired table's t quantile")
    bench = _bench()

    def row(method, bits, per_seed, metric="acc", bops=0.01):
        return bench.Row("digits", metric, method, 0.5, bits, sum(per_seed) / len(per_seed),
                         0.99, 0.5, 4.0, bops, 100, {}, {}, 0.0, tuple(per_seed))

    geta = row("GETA", "4-8", [0.980, 0.990, 0.985, 0.990])
    l2_4 = row("L2+QAT", "4", [0.970, 0.975, 0.980, 0.978], bops=0.004)
    l2_8 = row("L2+QAT", "8", [0.990, 0.995, 0.990, 0.998], bops=0.016)
    at4 = row("GETA @ its BOPs", "2-8 / A4", [0.971, 0.976, 0.980, 0.979], bops=0.004)
    lines = bench.paired([geta, l2_4, l2_8, at4]).splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    pairs = {(c[2], c[4]): c for c in cells}
    assert set(pairs) == {("GETA", "L2+QAT 4"), ("GETA", "L2+QAT 8"),
                          ("GETA @ its BOPs", "L2+QAT 4")}
    assert pairs["GETA", "L2+QAT 4"][7] == "+1.05 pt"  # (1.0 + 1.5 + 0.5 + 1.2) / 4
    assert pairs["GETA", "L2+QAT 4"][9] == "better"
    assert pairs["GETA", "L2+QAT 8"][9] == "worse"
    assert pairs["GETA @ its BOPs", "L2+QAT 4"][9].startswith("tie")
    assert pairs["GETA", "L2+QAT 4"][5] == "2.50"
    loss_g = row("GETA", "4-8", [1.40, 1.41, 1.39], metric="loss")
    loss_b = row("L2+QAT", "8", [1.60, 1.62, 1.61], metric="loss")
    (only,) = bench.paired([loss_g, loss_b]).splitlines()[2:]
    assert "+0.210 (loss)" in only and only.rstrip(" |").endswith("better")
    assert bench.paired([row("GETA", "4-8", [0.9]), row("L2+QAT", "4", [0.8])]) == ""
