"""Which part of QASSO's recipe costs accuracy at a baseline's BOPs: fast paired sweeps.

Issue #12.  ``bench_pretrained.py --matched`` puts GETA at the BOPs of L2 pruning + fixed-bit
QAT and reports where it loses; this script varies one piece of GETA's recipe at a time at
such points and pairs every variant with the baseline seed by seed (same seeds, same batches,
BatchNorm statistics re-estimated for both, as there).  It trains and evaluates only (no
latency), so ten seeds of the digits CNN take about 4 s a run on one core.

A variant is ``STRUCT-CRIT-FLOOR-STAGES`` (QASSO with ``target_bops`` = the baseline's,
activations at its bits, weight bits allocated in ``[FLOOR, 8]``):

    STRUCT  def    max_sparsity = target + 0.05 (bench_pretrained's GETA rows)
            even   max_sparsity = target (every group loses the same share, as the baseline)
    CRIT    def    the five criteria of GETA_SPEC C.6 over each unit's own rows
            mag    importance={"magnitude": 1}
            rem    the five criteria, importance_scope="removed" (the consumers' input rows too)
            magrem magnitude over every row the removal deletes (the baseline's L2 norm)
    FLOOR   the weight-bit floor b_l (2 = bench_pretrained's; the activation bits: uniform)
    STAGES  pre    schedule(300, preset="converged"): warm-up 2%, projection 5%, pruning 15%
            os     the same with a one-step pruning stage
            early  no warm-up, one projection step, one pruning step (the baseline's step-0
                   pruning, as near as QASSO's stages go)

An optional fifth part ``-sal`` selects by saliency alone (``budget_selection=False``, the
selection before commit 9bd7860); without it the selection is priced for the budget
(QASSO's default).

``base`` is the baseline itself (L2 over all rows, QAT at the activation bits), ``base-out``
the baseline with L2 norms over each unit's own rows only (what ``importance_scope="group"``
reads).

    python benchmarks/ablate_pretrained.py --points 0.7:4,0.7:3,0.5:4 \\
        --variants base,base-out,def-def-2-pre,even-magrem-2-early
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pretrained as bp  # noqa: E402
from _common import commit  # noqa: E402

from geta_fx.errors import InputError  # noqa: E402
from geta_fx.report import report  # noqa: E402

CRITERIA: dict[str, dict[str, Any]] = {
    "def": {},
    "mag": {"importance": {"magnitude": 1.0}},
    "rem": {"importance_scope": "removed"},
    "magrem": {"importance": {"magnitude": 1.0}, "importance_scope": "removed"},
}
STAGES = {"pre": {}, "os": {"pruning": "one"},
          "early": {"warmup": 0.0, "projection": "one", "pruning": "one"}}


def run_variant(variant: str, dense: torch.nn.Module, task: bp.Task, sp: float, act: int,
                bops: float, steps: int, lr: float, seed: int) -> Any:
    """One compression run of ``variant`` (module docstring); the eval-mode GetaModule."""
    if variant in ("base", "base-out"):
        return bp.run_baseline(dense, task, sp, act, steps, lr, seed,
                               role="out" if variant == "base-out" else None)[0]
    try:
        struct, crit, floor, stages, *price = variant.split("-")
        if price not in ([], ["sal"]):
            raise ValueError(variant)
        saliency, shares = dict(CRITERIA[crit], budget_selection=not price), dict(STAGES[stages])
        slack = {"def": 0.05, "even": 0.0}[struct]
        floor_bits = int(floor)
    except (KeyError, ValueError):
        raise SystemExit(f"unknown variant {variant!r} (module docstring)") from None
    shares = {k: 1 / steps if v == "one" else v for k, v in shares.items()}
    return bp.run_geta_matched(dense, task, sp, act, bops, steps, lr, seed, (floor_bits, 8),
                               saliency, slack, shares)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="digits", choices=sorted(bp.TASKS))
    ap.add_argument("--points", default="0.7:4,0.7:3,0.5:4",
                    help="SPARSITY:BITS of the baseline, comma-separated")
    ap.add_argument("--variants", default="base,base-out,def-def-2-pre,even-magrem-2-early")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # QASSO's limit/budget notes, once per run
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    if "base" not in variants:
        variants.insert(0, "base")
    task = bp.TASKS[args.task]()
    task.load(0)
    dense, _ = bp.train_dense(task, 0)
    print(f"# ablate_pretrained  {time.strftime('%Y-%m-%d')}  commit {commit()}  torch "
          f"{torch.__version__}  task {args.task}  steps {args.steps}  seeds {args.seeds}  "
          f"BN recalibration all batches\n")
    print("| task | target | bits | variant | test acc (mean) | BOPs / baseline | - baseline "
          "(mean) | 95% CI | verdict |\n|---|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for point in args.points.split(","):
        sp, act = float(point.split(":")[0]), int(point.split(":")[1])
        probe = bp.run_baseline(dense, task, sp, act, 2, args.lr, 0)[0]
        bops = report(probe, compressed=True).relative_bops  # the baseline's structure & bits
        acc: dict[str, list[float]] = {}
        cost: dict[str, list[float]] = {}
        for v in variants:
            for seed in seeds:
                try:
                    gm = run_variant(v, dense, task, sp, act, bops, args.steps, args.lr, seed)
                except InputError as e:  # e.g. a bit floor the budget cannot afford
                    print(f"| {args.task} | {sp:.0%} | A{act} | {v} | not run: {e} |",
                          flush=True)
                    break
                acc.setdefault(v, []).append(100 * task.evaluate(gm.compress()))
                cost.setdefault(v, []).append(report(gm, compressed=True).relative_bops / bops)
        for v in (v for v in variants if v in acc):
            mean = sum(acc[v]) / len(acc[v])
            cells = [args.task, f"{sp:.0%}", f"A{act}", v, f"{mean:.2f}%",
                     f"{sum(cost[v]) / len(cost[v]):.2f}"]
            if v == "base" or len(seeds) < 2:
                cells += ["", "", ""]
            else:
                m, h, verdict = bp.paired_interval([a - b for a, b in zip(acc[v], acc["base"])])
                cells += [f"{m:+.2f} pt", f"[{m - h:+.2f}, {m + h:+.2f}]", verdict.split()[0]]
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
