"""QASSO overhead: a full training step with QASSO vs torch.optim.AdamW, per GETA stage.

For each model (CIFAR ResNet-20 at 32x32, a small character GPT), two copies of the same
GetaModule (``quantize="weight"``) are trained side by side on the same batches:

    qasso   QASSO(variant="adamw"), schedule: warm-up, projection, pruning (2 periods),
            cool-down, ``--steps`` timed steps per stage
    adamw   torch.optim.AdamW (PyTorch's default implementation for the device)

A "step" is zero_grad + forward + loss + backward + optimizer step (CUDA: synchronized).  Steps of
the two copies alternate, so machine noise hits both alike.  Per stage the table reports the
median step time of each and their ratio (goal: <= 1.25x), plus QASSO's mean (which includes the
once-per-period selection/commit steps) and its slowest step.

    python benchmarks/bench_qasso.py                       # both models, CPU
    python benchmarks/bench_qasso.py --device cuda --steps 30
    python benchmarks/bench_qasso.py --models gpt --threads 2
    python benchmarks/bench_qasso.py --memory 25M 125M 350M --threads 1   # memory table

``--memory`` (issue #17): per Llama shape and optimizer, a fresh subprocess builds the
GetaModule (``quantize="weight"``), then measures the peak RSS growth (CPU; sampled every ms
from /proc) or the peak allocated CUDA memory from creating the optimizer through 3 training
steps (QASSO: projection, then the selection step of a pruning period and a joint step); then
``--time-steps`` more steps are timed (process CPU time on CPU -- the machine is shared, and
CPU time is what contention inflates least -- synchronized wall time on CUDA): the median
training step of each optimizer and their ratio, and QASSO's joint- and selection-step
medians (QASSO schedule: pruning periods of 4 steps = 1 selection, 2 joint steps, 1 plain
step).  Projects bytes per parameter to 1B/3B/7B.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import commit as _commit
import geta_fx
from geta_fx.testing.models import CharGPT, ResNetCifar  # the tests' tiny models
from geta_fx.optim import QASSO


STAGES = ("warmup", "projection", "pruning", "cooldown")


# ------------------------------------------------------------------------------ models
def _resnet(batch: int, device: str) -> tuple[nn.Module, Callable[[int], tuple[Tensor, Tensor]],
                                               Callable[[Tensor, Tensor], Tensor]]:
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(4, batch, 3, 32, 32, generator=gen).to(device)
    ys = torch.randint(0, 10, (4, batch), generator=gen).to(device)
    return ResNetCifar(depth=20), lambda i: (xs[i % 4], ys[i % 4]), F.cross_entropy


def _gpt(batch: int, device: str) -> tuple[nn.Module, Callable[[int], tuple[Tensor, Tensor]],
                                           Callable[[Tensor, Tensor], Tensor]]:
    gen = torch.Generator().manual_seed(0)
    vocab, block = 96, 64
    seqs = torch.randint(0, vocab, (4, batch, block + 1), generator=gen).to(device)

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
    model = CharGPT(vocab, block=block, d=128, heads=4, layers=4)
    return model, lambda i: (seqs[i % 4, :, :-1], seqs[i % 4, :, 1:]), loss


MODELS = {"resnet20": _resnet, "gpt": _gpt}


# ------------------------------------------------------------------------------ timing
def _timed_step(module: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                loss_fn: Callable[[Tensor, Tensor], Tensor], cuda: bool,
                clock: Callable[[], float] = time.perf_counter,
                split: list[float] | None = None) -> float:
    """One training step's time; ``split`` gets the ``opt.step()`` part appended."""
    if cuda:
        torch.cuda.synchronize()
    t0 = clock()
    opt.zero_grad(set_to_none=True)
    loss_fn(module(x), y).backward()
    if cuda:
        torch.cuda.synchronize()
    t1 = clock()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    t2 = clock()
    if split is not None:
        split.append(t2 - t1)
    return t2 - t0


def bench_model(name: str, steps: int, batch: int, device: str, warm: int) -> list[dict]:
    model, batch_fn, loss_fn = MODELS[name](batch, device)
    model = model.to(device).eval()
    x0, _ = batch_fn(0)
    gm_q = geta_fx.transform(model, (x0,), quantize="weight").to(device).train()
    gm_a = copy.deepcopy(gm_q)
    s = steps
    qasso = QASSO(gm_q, variant="adamw", lr=1e-3, lr_quant=1e-3, weight_decay=1e-2,
                  target_sparsity=0.5, bit_range=(4, 16), bit_reduction=2,
                  start_projection_step=warm + s, projection_steps=s, projection_periods=2,
                  start_pruning_step=warm + 2 * s, pruning_steps=s, pruning_periods=2)
    adamw = torch.optim.AdamW(gm_a.parameters(), lr=1e-3, weight_decay=1e-2)
    cuda = device.startswith("cuda")
    times: dict[str, dict[str, list[float]]] = {st: {"qasso": [], "adamw": []} for st in STAGES}
    total = warm + 4 * s
    for i in range(total):
        x, y = batch_fn(i)
        tq = _timed_step(gm_q, qasso, x, y, loss_fn, cuda)
        stage = qasso.stage
        ta = _timed_step(gm_a, adamw, x, y, loss_fn, cuda)
        if i >= warm:
            times[stage]["qasso"].append(tq)
            times[stage]["adamw"].append(ta)
    m = qasso.metrics()
    rows = []
    for st in STAGES:
        q, a = times[st]["qasso"], times[st]["adamw"]
        if not q:
            continue
        rows.append({"model": name, "stage": st, "steps": len(q),
                     "qasso_ms": 1e3 * statistics.median(q), "adamw_ms": 1e3 * statistics.median(a),
                     "ratio": statistics.median(q) / statistics.median(a),
                     "qasso_mean_ms": 1e3 * statistics.fmean(q),
                     "adamw_mean_ms": 1e3 * statistics.fmean(a),
                     "qasso_max_ms": 1e3 * max(q)})
    rows[-1]["note"] = (f"pruned {m['num_pruned']}/{m['num_units']} units, bits "
                        f"{m['bits_min']:.1f}-{m['bits_max']:.1f}")
    return rows


# ------------------------------------------------------------------------------ memory
#: Llama shapes: hidden, layers, intermediate, heads, vocab (untied head).
LLAMA = {"25M": (512, 7, 1376, 8, 4096), "125M": (768, 12, 2048, 12, 24000),
         "350M": (1024, 24, 2816, 16, 24000)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _qasso_kind(opt: QASSO) -> str:
    """What QASSO's next step is: "select", "joint" or "plain"."""
    sch, k = opt.schedule, opt.step_count + 1
    return "select" if sch.is_selection_step(k) else "joint" if sch.is_joint_step(k) else "plain"


def _memory_child(size: str, which: str, device: str, time_steps: int) -> dict:
    """One configuration in this (fresh) process: peak memory growth and step times."""
    import threading

    import transformers as tf

    h, layers, inter, heads, vocab = LLAMA[size]
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=64,
                         use_cache=False, tie_word_embeddings=False)
    ids = torch.randint(0, vocab, (1, 33)).to(device)
    gm = geta_fx.transform(tf.LlamaForCausalLM(cfg).eval(), (ids[:, :-1],),
                           quantize="weight").to(device).train()
    n = sum(p.numel() for p in gm.parameters())
    cuda = device.startswith("cuda")
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else _rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if which == "qasso":
        opt: torch.optim.Optimizer = QASSO(
            gm, variant="adamw", lr=1e-4, target_sparsity=0.3, start_projection_step=0,
            projection_steps=1, start_pruning_step=1, pruning_steps=4 * (2 + time_steps // 4),
            pruning_periods=2 + time_steps // 4)
    else:
        opt = torch.optim.AdamW(gm.parameters(), lr=1e-4)

    def loss_fn(out: object, y: Tensor) -> Tensor:
        logits = out.logits  # type: ignore[attr-defined]
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
    for _ in range(3):
        _timed_step(gm, opt, ids[:, :-1], ids[:, 1:], loss_fn, cuda)
    stop.set()
    sampler.join()
    grown = (torch.cuda.max_memory_allocated() if cuda else max(peak[0], _rss())) - base
    clock = time.perf_counter if cuda else time.process_time
    times: dict[str, list[float]] = {"all": [], "select": [], "joint": [], "plain": [],
                                     "opt": []}
    for _ in range(time_steps):
        kind = _qasso_kind(opt) if isinstance(opt, QASSO) else "plain"
        t = _timed_step(gm, opt, ids[:, :-1], ids[:, 1:], loss_fn, cuda, clock, times["opt"])
        times["all"].append(t)
        times[kind].append(t)
    lay = getattr(opt, "layout", None)
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    return {"size": size, "opt": which, "params": n, "peak_mb": grown / 2**20,
            "bytes_per_param": grown / n, "step_s": med["all"], "joint_s": med["joint"],
            "opt_s": med["opt"],
            "select_s": med["select"],
            "index_mb": lay.index_bytes() / 2**20 if lay is not None else 0.0}


def memory_table(sizes: list[str], device: str, threads: int, time_steps: int) -> None:
    """Run every (size, optimizer) in a fresh subprocess and print the table."""
    import json
    import subprocess
    import sys

    print(f"{'shape':6} {'params':>8} {'AdamW MB':>9} {'QASSO MB':>9} {'ratio':>6} "
          f"{'B/param A':>9} {'B/param Q':>9} {'layout MB':>9} {'step A s':>8} "
          f"{'step Q s':>8} {'t ratio':>7} {'joint Q s':>9} {'select Q s':>10} "
          f"{'opt A s':>7} {'opt Q s':>7}")
    per_param: dict[str, list[float]] = {"adamw": [], "qasso": []}
    for size in sizes:
        res = {}
        for which in ("adamw", "qasso"):
            cmd = [sys.executable, __file__, "--_child", size, which, "--device", device,
                   "--threads", str(threads), "--time-steps", str(time_steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[which] = json.loads(out.strip().splitlines()[-1])
            per_param[which].append(res[which]["bytes_per_param"])
        a, q = res["adamw"], res["qasso"]
        print(f"{size:6} {a['params'] / 1e6:7.1f}M {a['peak_mb']:9.0f} {q['peak_mb']:9.0f} "
              f"{q['peak_mb'] / a['peak_mb']:5.2f}x {a['bytes_per_param']:9.2f} "
              f"{q['bytes_per_param']:9.2f} {q['index_mb']:9.2f} {a['step_s']:8.2f} "
              f"{q['step_s']:8.2f} {q['step_s'] / a['step_s']:6.2f}x {q['joint_s']:9.2f} "
              f"{q['select_s']:10.2f} {a['opt_s']:7.3f} {q['opt_s']:7.3f}", flush=True)
    a_b, q_b = per_param["adamw"][-1], per_param["qasso"][-1]
    print(f"projection from the largest shape's bytes/param (AdamW {a_b:.1f}, QASSO {q_b:.1f};"
          " optimizer step only, activations of other batch sizes not included):")
    for billions in (1, 3, 7):
        print(f"  {billions}B params: AdamW {a_b * billions:6.1f} GB, QASSO {q_b * billions:6.1f}"
              " GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per stage")
    ap.add_argument("--warm", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--memory", nargs="*", choices=list(LLAMA),
                    help="memory table for these Llama shapes instead of the timing table")
    ap.add_argument("--time-steps", type=int, default=8,
                    help="--memory: timed steps after the memory window")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        import json

        print(json.dumps(_memory_child(*args._child, args.device, args.time_steps)))
        return
    dev = args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() \
        or platform.machine()
    print(f"# bench_qasso  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"commit {_commit()}  torch {torch.__version__}  device {dev} ({name})  "
          f"threads {torch.get_num_threads()}  " +
          (f"batch 1x32 tokens  timed steps {args.time_steps}" if args.memory else
           f"batch {args.batch}  steps/stage {args.steps}"))
    header = (f"{'model':9} {'stage':10} {'QASSO ms':>9} {'AdamW ms':>9} {'ratio':>6} "
              f"{'QASSO mean':>10} {'AdamW mean':>10} {'QASSO max':>9}")
    if args.memory:
        memory_table(args.memory, dev, args.threads, args.time_steps)
        return
    print(header)
    print("-" * len(header))
    for model in args.models:
        for r in bench_model(model, args.steps, args.batch, dev, args.warm):
            print(f"{r['model']:9} {r['stage']:10} {r['qasso_ms']:9.2f} {r['adamw_ms']:9.2f} "
                  f"{r['ratio']:5.2f}x {r['qasso_mean_ms']:10.2f} {r['adamw_mean_ms']:10.2f} "
                  f"{r['qasso_max_ms']:9.2f}" + (f"   {r['note']}" if "note" in r else ""),
                  flush=True)


if __name__ == "__main__":
    main()
