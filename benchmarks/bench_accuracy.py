"""Accuracy vs BOPs: GETA on scikit-learn's digits at several group-sparsity and bit-width
targets, next to the dense FP32 model, in one run.

Each row is ``run_digits`` of examples/demo.py (the `geta-fx demo digits` job: a small CNN trained
densely with AdamW, then GETA = QASSO from the partly trained dense model; 1,437 train / 360
test images, fixed stratified split) with one target: ``--sparsity`` (fraction of prunable
channels zeroed, exactly) x ``--bits`` (final weight/activation bit range b_l-b_u; b_u starts
``--bit-reduction`` x ``--projection-periods`` higher and is projected down).  Test accuracy is
the compressed (physically pruned) model's; BOPs are relative to the FP32 dense model at 32x32
bits (``geta_fx.report``).

    python benchmarks/bench_accuracy.py                         # 3 sparsities x 2 bit ranges
    python benchmarks/bench_accuracy.py --sparsity 0.5 --bits 4-8 --quantize weight
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import time

import torch

from _common import commit
from geta_fx.cli import load_demos

run_digits = load_demos().run_digits  # examples/demo.py of the checkout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", default="0.3,0.5,0.7")
    ap.add_argument("--bits", default="4-8,2-6", help="final bit ranges b_l-b_u")
    ap.add_argument("--quantize", default="weight_act", choices=("weight", "weight_act"))
    ap.add_argument("--bit-reduction", type=int, default=2)
    ap.add_argument("--projection-periods", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sparsities = [float(s) for s in args.sparsity.split(",")]
    ranges = [tuple(int(b) for b in r.split("-")) for r in args.bits.split(",")]
    print(f"# bench_accuracy: digits, torch {torch.__version__}, commit {commit()}, python "
          f"{platform.python_version()}, {args.threads} thread(s), quantize={args.quantize}, "
          f"seed {args.seed}\n")
    print("| model | target sparsity | final bits | test acc | vs dense | group sparsity "
          "| avg weight bits | BOPs vs FP32 | params | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    dense = None
    for sp in sparsities:
        for lo, hi in ranges:
            start_hi = hi + args.bit_reduction * args.projection_periods
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # run_digits prints its own table
                res = run_digits(target_sparsity=sp, bit_range=(lo, start_hi),
                                 bit_reduction=args.bit_reduction,
                                 projection_periods=args.projection_periods,
                                 quantize=args.quantize, seed=args.seed, threads=args.threads,
                                 progress=False)
            seconds = time.perf_counter() - t0
            if dense is None:
                dense = res["dense"]
                print(f"| dense FP32 | - | 32 | {dense['accuracy']:.2%} | - | 0% | 32.0 | "
                      f"100% | {dense['params']:,} | |", flush=True)
            g = res["geta"]
            print(f"| GETA | {sp:.0%} | {lo}-{hi} | {g['accuracy']:.2%} | "
                  f"{100 * (g['accuracy'] - dense['accuracy']):+.2f} pt | "
                  f"{g['group_sparsity']:.1%} | {g['avg_weight_bits']:.2f} | "
                  f"{g['relative_bops']:.2%} | {g['params']:,} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
