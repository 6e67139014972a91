"""Mixed precision that is mixed: a bit budget met exactly, bits where the loss can afford them.

Issue #20 item 3.  From the converged dense models of ``bench_pretrained.py`` (the MNIST
ResNet-8 and the char LM; cached in ``benchmarks/.cache/``; the char LM here is trained for
``--lm-epochs`` epochs, to convergence), at ``--sparsity`` (30%) group sparsity and each
average weight-bit budget of ``--budgets`` (3, 4, 6), three runs with the same steps, batches,
peak LR, cosine decay and loss (task loss + KL distillation from the dense model) (five, with
the measured-sensitivity and the BOPs-matched mixed runs):

    mixed      QASSO(target_avg_bits=B, bit_range=(2, 8)): bits allocated by Fisher-weighted
               quantization error (geta_fx.optim._budget), pinned from projection, redone
               exactly on the pruned model at cool-down
    uniform    QASSO(bit_range=(B, B)): every weight quantizer at the budget's bit width,
               the same pruning (uniform-bit QAT of the same pruned model)
    mixed measured   the same with ``budget_loss``: each layer's loss change at each bit width
               measured on 4 fixed training batches (the training loss), instead of the Fisher
               proxy
    mixed@BOPs QASSO(target_bops=<the uniform run's BOPs>, bit_range=(2, 8)): the same
               allocation rule at the uniform model's BOPs instead of its size
    reference  QASSO(bit_range=(B, 8)), no budget: GETA's own rule (GETA_SPEC C.6/C.7: the
               joint step drives every layer of a pruned group to b_l = B, the others keep
               what they learned), i.e. what a user of the reference sets to get B bits

All three quantize weights and activations (``quantize="weight_act"``, activations pinned at 8
bits: ``act_bit_range=(8, 8)``), use ``variant="adamw"``, ``max_sparsity=target + 0.05`` and
the stage shares ``SHARES`` (warm-up 2%, projection 10%, pruning 30%: what its tables in
benchmarks/README.md were measured with).  Columns: held-out accuracy / validation loss of
the compressed model (``gm.compress()``) and its change against the dense model, the average
bits per quantized weight on the slim model (``report().avg_quantized_weight_bits``), the
histogram of weight-quantizer bit widths (``bits:count``), parameter bytes at the learned bit
widths, BOPs vs the dense FP32 model, and the training seconds.

    python benchmarks/bench_mixed.py                       # both tasks, budgets 3, 4, 6
    python benchmarks/bench_mixed.py --tasks mnist --budgets 4 --steps 100
    python benchmarks/bench_mixed.py --quick               # CI: digits CNN, budget 4
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from collections import Counter
from typing import Any

import torch
from torch import nn

from _common import commit
from bench_pretrained import (CharLMTask, DigitsTask, MnistTask, Task, _loss,
                              _train_loop, _transformed, train_dense)

from geta_fx.optim import QASSO, Distiller, schedule
from geta_fx.report import report

#: Stage shares of ``schedule`` this benchmark's tables were measured with (bench_pretrained
#: now uses ``preset="converged"``, 2/5/15: not re-run here).
SHARES = {"warmup": 0.02, "projection": 0.10, "pruning": 0.30}

HEAD = ["task", "budget", "method", "test acc / val loss", "vs dense", "avg w bits",
        "weight bits: quantizers", "param bytes", "BOPs vs FP32", "train s"]


def run(dense: nn.Module, task: Task, method: str, budget: float, sparsity: float,
        steps: int, lr: float, seed: int, hi: int, bops: float | None = None
        ) -> tuple[Any, QASSO, float]:
    torch.manual_seed(seed)
    gm = _transformed(copy.deepcopy(dense), task)
    b = int(budget)
    distill = Distiller(dense)
    loss_fn = _loss(task, distill)
    # held-out for the allocation: fixed training batches (never the test split)
    x_cal, y_cal = task.split[0][-4 * task.batch:], task.split[1][-4 * task.batch:]

    def calibration_loss() -> torch.Tensor:
        return sum(loss_fn(gm(x_cal[i:i + task.batch]), x_cal[i:i + task.batch],
                           y_cal[i:i + task.batch]) for i in range(0, len(y_cal), task.batch))

    kw: dict[str, Any] = {
        "mixed": {"bit_range": (2, hi), "target_avg_bits": budget},
        "mixed measured": {"bit_range": (2, hi), "target_avg_bits": budget,
                           "budget_loss": calibration_loss},
        "mixed@BOPs": {"bit_range": (2, hi), "target_bops": bops},
        "uniform": {"bit_range": (b, b)},
        "reference": {"bit_range": (b, hi)},
    }[method]
    opt = QASSO(gm, variant="adamw", lr=lr, lr_quant=1e-3, weight_decay=task.weight_decay,
                target_sparsity=sparsity, max_sparsity=min(1.0, sparsity + 0.05),
                bit_reduction=0, act_bit_range=(8, 8), **kw, **schedule(steps, **SHARES))
    secs = _train_loop(gm, opt, task, steps, seed, loss_fn)
    return gm.eval(), opt, secs


def measure(task: Task, gm: Any, secs: float) -> dict[str, Any]:
    slim = gm.compress()
    rep = report(gm, compressed=True)
    hist = Counter(round(float(m.bit_width().detach())) for m in gm.quantizers.values()
                   if m.kind == "weight")
    return {"q": task.evaluate(slim), "bits": rep.avg_quantized_weight_bits,
            "hist": " ".join(f"{b}:{n}" for b, n in sorted(hist.items())),
            "bytes": rep.param_bytes, "bops": rep.relative_bops, "secs": secs}


def row(task: Task, budget: float, method: str, runs: list[dict[str, Any]],
        dense_q: float) -> list[str]:
    """One table row: quality as the mean over the seeds (each seed's value after it), the
    rest as means; the bit histogram of the first seed."""
    def mean(k: str) -> float:
        return sum(r[k] for r in runs) / len(runs)

    q = mean("q")
    each = ", ".join((f"{r['q']:.2%}" if task.metric == "acc" else f"{r['q']:.4f}")
                     for r in runs) if len(runs) > 1 else ""
    if task.metric == "acc":
        qs, dq = f"{q:.2%}", f"{100 * (q - dense_q):+.2f} pt"
    else:
        qs, dq = f"{q:.4f} (ppl {math.exp(q):.3f})", f"{q - dense_q:+.4f}"
    if each:
        qs += f" [{each}]"
    return [task.name, f"{budget:g}", method, qs, dq, f"{mean('bits'):.3f}", runs[0]["hist"],
            f"{mean('bytes') / 1024:.1f} KiB", f"{mean('bops'):.3%}", f"{mean('secs'):.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="mnist,charlm")
    ap.add_argument("--budgets", default="3,4,6")
    ap.add_argument("--methods", default="uniform,mixed,mixed measured,mixed@BOPs,reference")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-bits", type=int, default=8, help="b_u of mixed and reference")
    ap.add_argument("--lm-epochs", type=int, default=12,
                    help="dense char-LM epochs (bench_pretrained's 4 leave it short of "
                         "convergence)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the dense models and data")
    ap.add_argument("--seeds", default="0",
                    help="compression seeds (batch order, quantizer init): quality is their "
                         "mean")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke run: digits CNN, budget 4, 80 steps")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.budgets, args.steps = "digits", "4", 80
    torch.set_num_threads(args.threads)
    print(f"# bench_mixed  {time.strftime('%Y-%m-%d')}  commit {commit()}  torch "
          f"{torch.__version__}  device cpu ({platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s))  steps {args.steps}  sparsity {args.sparsity:.0%}  "
          f"seed {args.seed}  compression seeds {args.seeds}\n")
    seeds = [int(v) for v in args.seeds.split(",")]
    rows: list[list[str]] = []
    t0 = time.perf_counter()
    for name in args.tasks.split(","):
        task: Task = {"mnist": MnistTask, "digits": DigitsTask, "charlm": CharLMTask}[name]()
        if name == "charlm":
            task.dense_epochs = args.lm_epochs
        task.load(args.seed)
        dense, info = train_dense(task, args.seed)
        dense_q = task.evaluate(dense)
        print(f"{name}: dense {info['steps']} AdamW steps, last-epoch train loss "
              f"{info['last_epoch_loss']:.4f} (previous {info['prev_epoch_loss']:.4f}), "
              f"held-out {task.metric} {dense_q:.4f}", flush=True)
        for budget in (float(b) for b in args.budgets.split(",")):
            runs: dict[str, list[dict[str, Any]]] = {}
            for seed in seeds:
                bops = None  # the uniform run's BOPs: the budget of "mixed@BOPs"
                for method in args.methods.split(","):
                    if method == "mixed@BOPs" and bops is None:
                        raise SystemExit("--methods: mixed@BOPs needs uniform before it")
                    gm, opt, secs = run(dense, task, method, budget, args.sparsity,
                                        args.steps, args.lr, seed, args.max_bits, bops)
                    r = measure(task, gm, secs)
                    if method == "uniform":
                        bops = r["bops"]
                    runs.setdefault(method, []).append(r)
                    alloc = opt.bit_allocation() or {}
                    print(f"  seed {seed} {name} {budget:g} {method}: {task.metric} "
                          f"{r['q']:.4f}, {r['bits']:.3f} bits, BOPs {r['bops']:.3%}" +
                          ("; " + ", ".join(
                              f"{n.removeprefix('geta_quant.').removesuffix('_weight')}={b}"
                              for n, b in alloc.items()) if alloc else ""), flush=True)
            rows += [row(task, budget, m, rs, dense_q) for m, rs in runs.items()]
    print(f"\n{time.perf_counter() - t0:.0f} s in all\n")
    print("| " + " | ".join(HEAD) + " |\n|" + "---|" * len(HEAD))
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))


if __name__ == "__main__":
    main()
