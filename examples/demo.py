"""End-to-end GETA demos on real data that ships with the Python environment (no downloads).

``run_digits``: a small CNN on scikit-learn's bundled 8x8 handwritten digits (1,797 images,
fixed stratified 75/25 split).  ``run_charlm``: a small character-level GPT on the English
documentation CPython ships in ``pydoc_data.topics`` (~465k characters; first 90 % train, last
10 % validation; validation loss and perplexity).

Each demo makes two runs of the same length from the same initial weights:

    dense   the plain model, AdamW with a cosine LR, ``steps`` steps
    GETA    the dense model after ``steps - geta_steps`` of those steps (``geta_steps ==
            steps``: from scratch) -> ``geta_fx.transform(quantize=...)`` -> activation
            quantizers calibrated on training batches -> QASSO for ``geta_steps`` steps
            (warm-up, projection, pruning, cool-down) -> ``compress()``

Starting GETA from a partly trained model gives the activation quantizers real ranges to
calibrate from (at random init, batch-norm and activation ranges change too much while
training for a fixed clipping range).  The table compares the *compressed* GETA model with the
dense one: quality, group sparsity, weight bits (average over all parameters, and the range of
the weight quantizers), MACs, BOPs relative to FP32 (32x32-bit), parameter count and wall time
(GETA's includes the shared dense part before it started).  MACs/BOPs/bits come from
:func:`geta_fx.report.report`.  Progress goes to stderr as a one-line bar (hand-rolled; no tqdm
dependency).  Run from a checkout with ``geta-fx demo digits|charlm`` or ``python
examples/demo.py digits|charlm``; every keyword argument is a command-line flag.  The digits demo
needs scikit-learn (``pip install -e ".[examples]"``); the library itself does not.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geta_fx.testing.models import CharGPT, DigitsCNN

__all__ = ["CharGPT", "DigitsCNN", "run_charlm", "run_digits"]  # models: geta_fx.testing


# =============================================================================== progress
class _Progress:
    """One-line progress bar on stderr: ``desc [#####.....] 52% 312/600 4.1s key=value``."""

    def __init__(self, total: int, desc: str, enabled: bool = True, width: int = 24) -> None:
        self.total, self.desc, self.enabled, self.width = max(total, 1), desc, enabled, width
        self.n = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1, **info: Any) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and self.n < self.total):
            return
        self._last = now
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in info.items())
        sys.stderr.write(f"\r{self.desc} [{bar}] {frac:4.0%} {self.n}/{self.total} "
                         f"{now - self.start:5.1f}s {extra}\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# =============================================================================== data
def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn digits, pixel values / 16, stratified 75/25 split with ``random_state``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25,
                                      random_state=seed, stratify=d.target)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def load_topics_text() -> str:
    """CPython's pydoc topic texts, joined in key order."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def _epoch_batches(n: int, batch: int, gen: torch.Generator) -> Iterator[Tensor]:
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n - batch + 1, batch):
        yield perm[i:i + batch]


# =============================================================================== training
def _cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)) * 0.95 + 0.05)


def _train(module: nn.Module, opt: torch.optim.Optimizer, steps: int,
           batch_fn: Callable[[int], tuple[Tensor, Tensor]],
           loss_fn: Callable[[Tensor, Tensor], Tensor], desc: str, progress: bool,
           info: Callable[[], dict[str, Any]] | None = None,
           snapshot_at: int | None = None) -> tuple[float, nn.Module | None, float]:
    """``steps`` optimizer steps with a cosine LR schedule.

    Returns ``(wall seconds, copy of the module after snapshot_at steps, seconds until then)``.
    """
    sched = _cosine(opt, steps)
    bar = _Progress(steps, desc, progress)
    module.train()
    t0 = time.perf_counter()
    snap, t_snap = (copy.deepcopy(module).eval(), 0.0) if snapshot_at == 0 else (None, 0.0)
    loss_ema = None
    for step in range(steps):
        x, y = batch_fn(step)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if snapshot_at is not None and step + 1 == snapshot_at:
            t_snap = time.perf_counter() - t0
            snap = copy.deepcopy(module).eval()
        if progress and (step % 10 == 0 or step == steps - 1):
            v = float(loss.detach())
            loss_ema = v if loss_ema is None else 0.9 * loss_ema + 0.1 * v
            bar.update(min(10, steps - bar.n), loss=loss_ema, **(info() if info else {}))
    bar.close()
    return time.perf_counter() - t0, snap, t_snap


def _qasso_schedule(steps: int, fractions: tuple[float, float, float],
                    projection_periods: int, pruning_periods: int) -> dict[str, int]:
    """Step counts from (warm-up, projection, pruning) fractions of the run; cool-down is the
    rest."""
    warm, proj, prune = (int(round(f * steps)) for f in fractions)
    prune = max(prune, pruning_periods)
    return {"start_projection_step": warm, "projection_steps": proj,
            "projection_periods": projection_periods, "start_pruning_step": warm + proj,
            "pruning_steps": prune, "pruning_periods": pruning_periods}


def _stage_info(opt: Any) -> Callable[[], dict[str, Any]]:
    return lambda: {"stage": opt.stage}


def _summary(name: str, quality: dict[str, float], rep: Any, bits: tuple[float, float] | None,
             seconds: float) -> dict[str, Any]:
    return {
        "model": name, **quality,
        "group_sparsity": rep.group_sparsity or 0.0,
        "avg_weight_bits": rep.avg_weight_bits,
        "weight_bits_min": bits[0] if bits else 32.0,
        "weight_bits_max": bits[1] if bits else 32.0,
        "macs": rep.macs, "relative_macs": rep.relative_macs,
        "relative_bops": rep.relative_bops, "params": rep.params, "seconds": seconds,
    }


def _table(rows: list[dict[str, Any]], quality: list[tuple[str, str, str]]) -> str:
    head = ["run", *[q[1] for q in quality], "group sparsity", "avg bits", "w bits",
            "MACs", "BOPs vs FP32", "slim params", "wall time"]
    body = []
    for r in rows:
        body.append([r["model"], *[format(r[q[0]], q[2]) for q in quality],
                     f"{r['group_sparsity']:.1%}", f"{r['avg_weight_bits']:.2f}",
                     f"{r['weight_bits_min']:.0f}-{r['weight_bits_max']:.0f}",
                     f"{r['macs'] / 1e6:.2f}M ({r['relative_macs']:.0%})",
                     f"{r['relative_bops']:.2%}", f"{r['params']:,}", f"{r['seconds']:.0f}s"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
        enumerate(zip(cells, widths, strict=True)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def _weight_bits(gm: Any) -> tuple[float, float] | None:
    from geta_fx.report import quantizer_bits

    bits = [round(quantizer_bits(q)) for q in gm.quantizers.values() if q.kind == "weight"]
    return (min(bits), max(bits)) if bits else None


def _geta_run(model: nn.Module, example: tuple[Tensor, ...], *, quantize: str | None,
              calib: list[tuple[Tensor, ...]], steps: int,
              batch_fn: Callable[[int], tuple[Tensor, Tensor]],
              loss_fn: Callable[[Tensor, Tensor], Tensor], qasso_kwargs: dict[str, Any],
              progress: bool) -> tuple[Any, Any, float]:
    """transform (+ activation calibration on training batches) and QASSO training."""
    import geta_fx
    from geta_fx.optim import QASSO

    t0 = time.perf_counter()
    gm = geta_fx.transform(model, example, quantize=quantize)
    if any(q.kind == "act" for q in gm.quantizers.values()):
        geta_fx.calibrate(gm, calib)
    opt = QASSO(gm, **qasso_kwargs)
    prep = time.perf_counter() - t0
    seconds, _, _ = _train(gm, opt, steps, batch_fn, loss_fn, "GETA ", progress,
                           _stage_info(opt))
    return gm, opt, prep + seconds


def _dense_run(model: nn.Module, *, steps: int, snapshot_at: int, lr: float,
               weight_decay: float, batch_fn: Callable[[int], tuple[Tensor, Tensor]],
               loss_fn: Callable[[Tensor, Tensor], Tensor],
               progress: bool) -> tuple[float, nn.Module, float]:
    """Train the plain (eager) model in place with AdamW; also returns a copy of it after
    ``snapshot_at`` steps (where GETA starts) and the seconds until then."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    seconds, snap, t_snap = _train(model, opt, steps, batch_fn, loss_fn, "dense", progress,
                                   snapshot_at=snapshot_at)
    assert snap is not None
    return seconds, snap, t_snap


def _qasso_kwargs(lr: float, lr_quant: float, weight_decay: float, target_sparsity: float,
                  bit_range: tuple[int, int], bit_reduction: int, steps: int,
                  fractions: tuple[float, float, float], projection_periods: int,
                  pruning_periods: int) -> dict[str, Any]:
    return {"variant": "adamw", "lr": lr, "lr_quant": lr_quant, "weight_decay": weight_decay,
            "target_sparsity": target_sparsity, "bit_range": tuple(bit_range),
            "bit_reduction": bit_reduction,
            **_qasso_schedule(steps, fractions, projection_periods, pruning_periods)}


# =============================================================================== digits
def run_digits(*, epochs: int = 40, geta_epochs: int = 30, batch_size: int = 64,
               lr: float = 3e-3, geta_lr: float = 2e-3, lr_quant: float = 1e-3,
               weight_decay: float = 1e-4, target_sparsity: float = 0.5,
               bit_range: tuple[int, int] = (4, 16), bit_reduction: int = 2,
               projection_periods: int = 4, pruning_periods: int = 4,
               warmup_frac: float = 0.05, projection_frac: float = 0.2,
               pruning_frac: float = 0.35, quantize: str = "weight_act", width: int = 16,
               seed: int = 0, threads: int = 1, progress: bool = True) -> dict[str, Any]:
    """Dense vs GETA on scikit-learn's digits; prints the table and returns the numbers.

    Args:
        epochs: dense training epochs (AdamW, cosine LR); both runs train this long.
        geta_epochs: GETA (QASSO) epochs, from the dense model at epoch epochs - geta_epochs.
        batch_size: images per step (the last partial batch of an epoch is dropped).
        lr: learning rate of the dense run (cosine-decayed to 5 %).
        geta_lr: QASSO learning rate of the weights (cosine-decayed to 5 %).
        lr_quant: QASSO learning rate of the quantizer scalars.
        weight_decay: decoupled weight decay (both runs).
        target_sparsity: fraction of prunable channels GETA zeroes (exactly).
        bit_range: initial (b_l, b_u) of the bit widths.
        bit_reduction: b_u drops by this per projection period.
        projection_periods: number of b_u reductions (final b_u = b_u - periods * reduction).
        pruning_periods: pruning periods P.
        warmup_frac: fraction of GETA steps before projection starts.
        projection_frac: fraction of GETA steps in the projection stage.
        pruning_frac: fraction of GETA steps in the pruning stage (the rest is cool-down).
        quantize: "weight_act" (weights and layer inputs) or "weight".
        width: channels of the first conv (the others scale with it).
        seed: seed of the split, the initial weights and the batch order.
        threads: torch CPU threads (0: torch's default; 1 stays fast on a busy 2-core machine).
        progress: show a progress bar on stderr.
    """
    from geta_fx.report import report

    if threads:
        torch.set_num_threads(threads)
    if not 0 < geta_epochs <= epochs:
        raise ValueError(f"need 0 < geta_epochs <= epochs, got {geta_epochs}, {epochs}")
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    steps_per_epoch = len(y_tr) // batch_size
    steps, geta_steps = epochs * steps_per_epoch, geta_epochs * steps_per_epoch
    torch.manual_seed(seed)
    base = DigitsCNN(width, 2 * width, 2 * width, 4 * width).eval()
    example = (x_tr[:batch_size],)

    def batches() -> Callable[[int], tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        it: Iterator[Tensor] = iter(())

        def batch(step: int) -> tuple[Tensor, Tensor]:
            nonlocal it
            idx = next(it, None)
            if idx is None:
                it = _epoch_batches(len(y_tr), batch_size, gen)
                idx = next(it)
            return x_tr[idx], y_tr[idx]
        return batch

    @torch.no_grad()
    def accuracy(m: nn.Module) -> float:
        m.eval()
        return float((m(x_te).argmax(1) == y_te).float().mean())

    loss_fn = F.cross_entropy
    dense = copy.deepcopy(base)
    pre_steps = steps - geta_steps
    t_dense, start, t_pre = _dense_run(dense, steps=steps, snapshot_at=pre_steps, lr=lr,
                                       weight_decay=weight_decay, batch_fn=batches(),
                                       loss_fn=loss_fn, progress=progress)
    dense_row = _summary("dense", {"accuracy": accuracy(dense)}, report(dense, example), None,
                         t_dense)

    kwargs = _qasso_kwargs(geta_lr, lr_quant, weight_decay, target_sparsity, bit_range,
                           bit_reduction, geta_steps,
                           (warmup_frac, projection_frac, pruning_frac), projection_periods,
                           pruning_periods)
    calib = [(x_tr[i:i + 256],) for i in range(0, len(y_tr), 256)]
    gm, opt, t_geta = _geta_run(start, example, quantize=quantize, calib=calib,
                                steps=geta_steps, batch_fn=batches(), loss_fn=loss_fn,
                                qasso_kwargs=kwargs, progress=progress)
    gm.eval()
    slim = gm.compress()
    acc_gm, acc_slim = accuracy(gm), accuracy(slim)
    geta_row = _summary("GETA", {"accuracy": acc_slim}, report(gm, compressed=True),
                        _weight_bits(gm), t_pre + t_geta)
    m = opt.metrics()
    print(f"digits: {len(y_tr)} train / {len(y_te)} test images (fixed stratified split); "
          f"dense: {steps} AdamW steps; GETA: the dense model after {pre_steps} steps, then "
          f"{geta_steps} QASSO steps; batch {batch_size}, quantize={quantize}")
    print(_table([dense_row, geta_row], [("accuracy", "test acc", ".2%")]))
    print(f"GETA: {m['num_pruned']}/{m['num_units']} prunable channels zero (K={m['K']}, "
          f"shortfall {m['shortfall']}); accuracy {100 * (acc_slim - dense_row['accuracy']):+.2f}"
          f" points vs dense; compressed == uncompressed accuracy: {acc_slim == acc_gm}; "
          f"MACs/BOPs/params of the compressed model vs the FP32 model")
    return {"dense": dense_row, "geta": geta_row, "qasso": m, "dense_steps": steps,
            "geta_steps": geta_steps, "geta_uncompressed_accuracy": acc_gm}


# =============================================================================== charlm
def run_charlm(*, steps: int = 5000, geta_steps: int = 1500, pretrained: bool = True,
               batch_size: int = 16,
               block: int = 64, d_model: int = 64, heads: int = 4, layers: int = 2,
               lr: float = 3e-3, geta_lr: float = 3e-3, lr_quant: float = 1e-3,
               weight_decay: float = 1e-2, target_sparsity: float = 0.4,
               bit_range: tuple[int, int] = (4, 16), bit_reduction: int = 2,
               projection_periods: int = 4, pruning_periods: int = 4,
               warmup_frac: float = 0.05, projection_frac: float = 0.2,
               pruning_frac: float = 0.35, quantize: str = "weight_act",
               eval_batches: int = 40, seed: int = 0, threads: int = 1,
               progress: bool = True) -> dict[str, Any]:
    """Dense vs GETA character-level GPT on ``pydoc_data.topics``; prints the table.

    Args:
        steps: dense training steps (AdamW, cosine LR).
        geta_steps: GETA (QASSO) steps.
        pretrained: GETA starts from the dense model at the end of its training (converged,
            as a user's pretrained model; the val loss over its last 20% of steps is printed);
            False: from its step steps - geta_steps snapshot (both runs train steps in all).
        batch_size: sequences per step.
        block: context length in characters.
        d_model: embedding width.
        heads: attention heads per layer.
        layers: transformer blocks.
        lr: learning rate of the dense run (cosine-decayed to 5 %).
        geta_lr: QASSO learning rate of the weights (cosine-decayed to 5 %).
        lr_quant: QASSO learning rate of the quantizer scalars.
        weight_decay: decoupled weight decay (both runs).
        target_sparsity: fraction of prunable units (heads, MLP channels) GETA zeroes.
        bit_range: initial (b_l, b_u) of the bit widths.
        bit_reduction: b_u drops by this per projection period.
        projection_periods: number of b_u reductions.
        pruning_periods: pruning periods P.
        warmup_frac: fraction of GETA steps before projection starts.
        projection_frac: fraction of GETA steps in the projection stage.
        pruning_frac: fraction of GETA steps in the pruning stage (the rest is cool-down).
        quantize: "weight_act" (weights and layer inputs) or "weight".
        eval_batches: validation batches (fixed positions) for loss/perplexity.
        seed: seed of the initial weights and the batch positions.
        threads: torch CPU threads (0: torch's default; 1 stays fast on a busy 2-core machine).
        progress: show a progress bar on stderr.
    """
    from geta_fx.report import report

    if threads:
        torch.set_num_threads(threads)
    if geta_steps <= 0 or (not pretrained and geta_steps > steps) or steps < 5:
        raise ValueError(f"need steps >= 5 and 0 < geta_steps (<= steps unless pretrained), "
                         f"got {geta_steps}, {steps}")
    text = load_topics_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    vocab = len(chars)

    def windows(src: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(block + 1)
        w = src[idx]
        return w[:, :-1], w[:, 1:]

    def batches() -> Callable[[int], tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)

        def batch(step: int) -> tuple[Tensor, Tensor]:
            return windows(train, torch.randint(0, len(train) - block - 1, (batch_size,),
                                                generator=gen))
        return batch

    val_gen = torch.Generator().manual_seed(seed + 1)
    val_starts = torch.randint(0, len(val) - block - 1, (eval_batches, batch_size),
                               generator=val_gen)

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    @torch.no_grad()
    def val_loss(m: nn.Module) -> float:
        m.eval()
        total = 0.0
        for starts in val_starts:
            xb, yb = windows(val, starts)
            total += float(loss_fn(m(xb), yb))
        return total / len(val_starts)

    torch.manual_seed(seed)
    base = CharGPT(vocab, block, d_model, heads, layers).eval()
    example = (windows(train, torch.arange(batch_size))[0],)

    dense = copy.deepcopy(base)
    pre_steps = int(0.8 * steps) if pretrained else steps - geta_steps
    t_dense, snap, t_pre = _dense_run(dense, steps=steps, snapshot_at=pre_steps, lr=lr,
                                      weight_decay=weight_decay, batch_fn=batches(),
                                      loss_fn=loss_fn, progress=progress)
    vl = val_loss(dense)
    if pretrained:  # GETA compresses the trained model; the snapshot shows how far it is
        vl_snap, start, t_pre = val_loss(snap), copy.deepcopy(dense).eval(), 0.0
        origin = (f"GETA: the trained dense model (val loss {vl_snap:.4f} after {pre_steps} "
                  f"steps, {vl:.4f} after {steps}: {(vl - vl_snap) / vl_snap:+.1%} over the "
                  f"last 20%), then {geta_steps} QASSO steps")
    else:
        start, vl_snap = snap, None
        origin = f"GETA: the dense model after {pre_steps} steps, then {geta_steps} QASSO steps"
    dense_row = _summary("dense", {"val_loss": vl, "perplexity": math.exp(vl)},
                         report(dense, example), None, t_dense)
    kwargs = _qasso_kwargs(geta_lr, lr_quant, weight_decay, target_sparsity, bit_range,
                           bit_reduction, geta_steps,
                           (warmup_frac, projection_frac, pruning_frac), projection_periods,
                           pruning_periods)
    calib_gen = torch.Generator().manual_seed(seed + 2)
    calib = [(windows(train, torch.randint(0, len(train) - block - 1, (batch_size,),
                                           generator=calib_gen))[0],) for _ in range(8)]
    gm, opt, t_geta = _geta_run(start, example, quantize=quantize, calib=calib,
                                steps=geta_steps, batch_fn=batches(), loss_fn=loss_fn,
                                qasso_kwargs=kwargs, progress=progress)
    gm.eval()
    slim = gm.compress()
    vl_gm, vl_slim = val_loss(gm), val_loss(slim)
    geta_row = _summary("GETA", {"val_loss": vl_slim, "perplexity": math.exp(vl_slim)},
                        report(gm, compressed=True), _weight_bits(gm), t_pre + t_geta)
    m = opt.metrics()
    print(f"charlm: {len(train):,} train / {len(val):,} validation characters of "
          f"pydoc_data.topics, vocab {vocab}; dense: {steps} AdamW steps; {origin}; batch "
          f"{batch_size}x{block}, quantize={quantize}")
    print(_table([dense_row, geta_row], [("val_loss", "val loss", ".3f"),
                                         ("perplexity", "ppl", ".2f")]))
    print(f"GETA: {m['num_pruned']}/{m['num_units']} prunable units (heads, MLP channels) zero "
          f"(K={m['K']}, shortfall {m['shortfall']}); val loss "
          f"{vl_slim - dense_row['val_loss']:+.3f} vs dense; compressed {vl_slim:.4f} vs "
          f"uncompressed {vl_gm:.4f}; MACs/BOPs/params of the compressed model vs the FP32 "
          f"model")
    return {"dense": dense_row, "geta": geta_row, "qasso": m, "dense_steps": steps,
            "geta_steps": geta_steps, "geta_uncompressed_val_loss": vl_gm,
            "pretrained": pretrained,
            "dense_snapshot_val_loss": vl_snap}


# =============================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    """``python examples/demo.py digits|charlm [--flag value ...]`` (flags = keyword args)."""
    import inspect

    demos = {"digits": run_digits, "charlm": run_charlm}
    parser = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="demo", required=True)
    for name, fn in demos.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0])
        for arg, par in inspect.signature(fn).parameters.items():
            flag = "--" + arg.replace("_", "-")
            d = par.default
            if isinstance(d, bool):
                p.add_argument(flag, dest=arg, action=argparse.BooleanOptionalAction, default=d)
            elif isinstance(d, tuple):
                p.add_argument(flag, dest=arg, nargs=len(d), type=type(d[0]), default=d)
            else:
                p.add_argument(flag, dest=arg, type=type(d), default=d)
    args = vars(parser.parse_args(argv))
    fn = demos[args.pop("demo")]
    fn(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
