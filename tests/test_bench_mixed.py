"""benchmarks/bench_mixed.py --quick (issue #20): the mixed-precision benchmark runs end to end,
every method meets the average-bit budget it is given and mixed is mixed."""

from __future__ import annotations

import pytest
from helpers import run_benchmark

pytest.importorskip("sklearn", reason="the benchmark's digits task needs scikit-learn")


@pytest.mark.slow
def test_quick_run_meets_the_budget(tmp_path):
    out = run_benchmark("bench_mixed.py", "--quick", cwd=tmp_path)
    table = [line for line in out.splitlines() if line.startswith("| digits |")]
    rows = {c[2]: c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in table)}
    assert list(rows) == ["uniform", "mixed", "mixed measured", "mixed@BOPs",
                          "reference"], out
    for cells in rows.values():
        assert 10.0 < float(cells[3].rstrip("%")) <= 100.0, cells  # still classifies
    assert abs(float(rows["mixed"][5]) - 4.0) <= 0.05
    assert abs(float(rows["mixed measured"][5]) - 4.0) <= 0.05
    assert rows["uniform"][6] == "4:5" and float(rows["uniform"][5]) == 4.0
    assert len(rows["mixed"][6].split()) > 1, rows["mixed"]  # several bit widths
    # mixed@BOPs meets the uniform model's BOPs within 1%
    bops = {m: float(c[8].rstrip("%")) for m, c in rows.items()}
    assert abs(bops["mixed@BOPs"] / bops["uniform"] - 1) <= 0.01, bops
