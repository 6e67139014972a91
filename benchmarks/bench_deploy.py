"""Benchmark deployable compressed models (issue #7), everything in one run.

Tables (markdown, printed as measured):

(a) slim vs dense latency: a ResNet-18-style CNN (CIFAR stem, 8x3x32x32) and a small GPT
    (4 layers, d=384, 6 heads, 2x128 tokens) at 30/50/70% group sparsity (that fraction of the
    units of every prunable group zeroed, at least one kept).  ``dense`` is the captured graph
    with nothing removed (``gm.compress()`` of the untouched model: the same graph code, so the
    ratio isolates pruning); ``slim`` removes the zero units; ``slim W4`` is the slim model with
    4-bit weights lowered to packed levels and geta low-bit ops (``geta_fx.lower``);
    ``dense eager`` is the user's module itself and ``into= eager`` that module sliced by
    ``gm.compress(into=copy)`` (its own ``forward``, the slim graph's parameter count).
(b) low-bit linear vs F.linear: ``geta::lowbit_linear`` at 3/4/8 bits against
    ``torch.nn.functional.linear`` in fp16 and bf16 (and fp32 on CPU), and torch's
    ``_weight_int4pack_mm`` (group size 128, bf16) as the peer, for M in {1, 8, 32, 512} and
    K x N in {4096x4096, 4096x14336}.  Ratios are fp16 time / low-bit time (> 1: low-bit faster).
(c) channel alignment (QASSO's ``group_divisible``): slim latency at 50% sparsity when every
    group keeps an odd number of units vs a multiple of 8 or 16.
(d) ONNX Runtime (``--tables d``, CPU): the small GPT's dense, slim and slim-W4 graphs saved
    with ``geta_fx.save(m, "m.onnx")`` (W4: INT4 DequantizeLinear weights; and with
    ``onnx_matmulnbits=True``: ORT's MatMulNBits): file sizes, ORT latency, eager torch.
(e) AOTInductor (``--tables e``, CPU, slow: one compile per variant): the small GPT's dense and
    slim graphs packaged with ``geta_fx.save(m, "m.pt2", package="aoti")`` vs eager.

CPU timings are ``torch.utils.benchmark.Timer.blocked_autorange`` under
``torch.inference_mode``, baseline and candidate in the same process on the same device; the
per-call time is the fastest Timer block (``--stat median`` for the median), and tables (a) and
(c) interleave baseline and candidates over ``--rounds`` rounds and keep each one's fastest, so
other processes on a shared machine bias no variant.  CUDA timings are GPU time from CUDA-graph
replay (``cuda_graph_ms``): Python launch cost would otherwise dominate these small calls; in
table (b) every variant cycles through enough weight copies that none stays in L2.  The
header names device, threads, torch, commit and which low-bit implementation ran.

    python benchmarks/bench_deploy.py                    # all tables, CPU (+ CUDA if present)
    python benchmarks/bench_deploy.py --tables b --devices cpu --min-time 0.2
    python benchmarks/bench_deploy.py --tables de --devices cpu     # ONNX Runtime, AOTI
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from _common import commit, cpu_name
import geta_fx
import geta_fx.lowbit_kernels as lowbit_kernels
from geta_fx.deploy import lower
from geta_fx.into import CompressIntoError
from geta_fx.module import move_to_device
from geta_fx.passes.physical_prune import align_removed_units, removed_units_from_zeros
from geta_fx.ops.lowbit import level_offset, pack_levels, unpack_weight_reference

HERE = os.path.dirname(os.path.abspath(__file__))
from geta_fx.testing.models import BasicBlock  # the tests' ResNet block


# --------------------------------------------------------------------------------- models
class ResNet18(nn.Module):
    """ResNet-18 with a CIFAR stem (3x3 conv, no max-pool)."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 4096, d: int = 384, heads: int = 6, layers: int = 4,
                 ctx: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "resnet18 (8x3x32x32)": lambda: (ResNet18().eval(), (torch.randn(8, 3, 32, 32),)),
    "gpt 4x384 (2x128 tok)": lambda: (GPT().eval(), (torch.randint(0, 4096, (2, 128)),)),
}


# -------------------------------------------------------------------------------- helpers
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


#: "min" (default): the fastest Timer block, robust to other processes on a shared machine;
#: "median": the Timer median.  Set from --stat.
STAT = "min"
#: "wall" (perf_counter) or "cpu": ``time.thread_time``, this thread's CPU time, with torch on
#: 1 thread: on a shared machine a call that loses its core stalls for a scheduler slice, which
#: wall-clock blocks absorb, while the thread's CPU time is what the model costs.  Set from
#: --clock (CPU devices only).
CLOCK = "wall"


def ms(fn: Callable[[], Any], min_time: float) -> float:
    """Milliseconds per call: the fastest block (or the median) of ``blocked_autorange``.

    Timer synchronises CUDA around each block.
    """
    with torch.inference_mode():
        fn()  # warm-up (and lazy initialisation)
        timer = {"timer": time.thread_time} if CLOCK == "cpu" else {}
        m = Timer(stmt="fn()", globals={"fn": fn}, **timer).blocked_autorange(
            min_run_time=min_time)
    if STAT == "median":
        return m.median * 1e3
    return min(m.raw_times) / m.number_per_run * 1e3


def time_call(device: str, fn: Callable[[], Any], min_time: float) -> float:
    """ms per call: GPU time under CUDA-graph replay on CUDA (``cuda_graph_ms``), else ``ms``."""
    return cuda_graph_ms([fn]) if device == "cuda" else ms(fn, min_time)


def kept_units(n: int, fraction: float, align: int | str = 1) -> int:
    """Units a group of ``n`` keeps at sparsity ``fraction`` under an alignment rule.

    ``base = round((1 - fraction) * n)``; ``1``: base; ``"odd"``: base, minus one if even;
    ``"even"``: an even count that is not a multiple of 8 (base - 2 if base is a multiple of 8);
    8 / 16: base rounded *up* to a multiple (what QASSO's ``group_divisible`` keeps), so an
    aligned variant never has fewer channels than the unaligned ones.
    """
    base = max(1, round((1 - fraction) * n))
    if align == "odd":
        keep = base - 1 if base % 2 == 0 else base
    elif align == "even":
        keep = base - 2 if base % 8 == 0 else base - base % 2
    elif isinstance(align, int) and align > 1:
        keep = -(-base // align) * align
    else:
        keep = base
    return min(max(keep, 1), n)


def zero_fraction(gm: geta_fx.GetaModule, fraction: float, align: int | str = 1,
                  seed: int = 0) -> tuple[int, int]:
    """Zero units of every prunable group down to :func:`kept_units`; returns (kept, total)."""
    g = torch.Generator().manual_seed(seed)
    kept_total = total = 0
    for group in gm.groups:
        if not group.prunable or group.num_units < 2:
            continue
        n = group.num_units
        # alignment is about channel counts: groups of whole heads keep their base count
        keep = kept_units(n, fraction, align if group.unit_size == 1 else 1)
        if keep < n:
            gm.zero_units(group.id, torch.randperm(n, generator=g)[: n - keep])
        kept_total += keep
        total += n
    return kept_total, total


def num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters()) + sum(
        b.numel() for b in m.buffers() if b.dtype == torch.uint8)


# ------------------------------------------------------------------------------- table (a)
def table_a(devices: list[str], sparsities: list[float], min_time: float,
            rounds: int = 3) -> None:
    print("\n### (a) slim vs dense latency\n")
    print("| device | model | group sparsity | params dense | params slim | dense ms | slim ms "
          "| speed-up | slim W4 ms | W4 speed-up | dense eager ms | into= eager ms "
          "| into= speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for name, build in MODELS.items():
            # Captured on the device it runs on: factory ops (e.g. the GPT's position arange)
            # record their device in the graph, as with any torch.export program.
            model, args = build()
            model = model.to(device)
            dev_args = tuple(a.to(device) for a in args)
            gm = geta_fx.transform(model, dev_args)
            gq = geta_fx.transform(model, dev_args, quantize="weight", bits=4.0)
            gm.eval()
            gq.eval()
            init, init_q = copy.deepcopy(gm.state_dict()), copy.deepcopy(gq.state_dict())
            dense_d = gm.compress()  # nothing zeroed yet: the dense graph
            dense = dense_d
            for sp in sparsities:
                gm.load_state_dict(init)
                gq.load_state_dict(init_q)
                zero_fraction(gm, sp)
                zero_fraction(gq, sp)
                slim, low = gm.compress(), lower(gq.compress(), reference=gq)
                # the user's own module, sliced in place (#19): same units as ``slim``
                try:
                    into: nn.Module | None = gm.compress(into=copy.deepcopy(model)).eval()
                except CompressIntoError as e:  # its forward cannot follow the slices
                    print(f"<!-- {name}: compress(into=) refused: {str(e)[:160]} -->")
                    into = None
                variants = {"dense": dense_d, "slim": slim, "low": low, "eager": model,
                            **({"into": into} if into is not None else {})}
                t = dict.fromkeys(variants, float("inf"))
                for _ in range(rounds):  # interleaved: dense, slim, lowered, eager, ...
                    for key, mod in variants.items():
                        # CUDA: GPU time under graph replay (eager launch cost of these small
                        # graphs would hide the work removed); CPU: Timer.
                        t[key] = min(t[key], time_call(device, partial(mod, *dev_args),
                                                       min_time))
                assert into is None or num_params(into) == num_params(slim), name
                into_cols = (f"{t['into']:.3f} | {t['eager'] / t['into']:.2f}x" if into
                             is not None else "refused | -")
                print(f"| {device} | {name} | {sp:.0%} | {num_params(dense):,} | "
                      f"{num_params(slim):,} | {t['dense']:.3f} | {t['slim']:.3f} | "
                      f"{t['dense'] / t['slim']:.2f}x | {t['low']:.3f} | "
                      f"{t['dense'] / t['low']:.2f}x | {t['eager']:.3f} | {into_cols} |",
                      flush=True)


# ------------------------------------------------------------------------------- table (c)
def table_c(devices: list[str], sparsities: list[float], min_time: float,
            rounds: int = 3) -> None:
    print("\n### (c) channel alignment (kept channels per group: odd vs multiples of 8/16)\n")
    print("Kept units per prunable group: base = round((1 - s) n); `odd` = base, minus 1 if "
          "even; `even` = an even count that is not a multiple of 8 (base - 2 if base is one)"
          "; `x8`/`x16` = base rounded up to a multiple (QASSO "
          "`group_divisible=8/16`); `odd+align8` = the odd model compressed with "
          "`compress(align=8)` (zero units kept back to multiples of 8 channels); groups whose "
          "unit is an attention head keep base heads.  "
          "Variants interleaved over rounds; the fastest measurement counts.\n")
    print("| device | model | sparsity | kept units | widths (first groups) | slim ms | vs dense "
          "| vs odd |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, build), sp in ((m, sp) for m in MODELS.items() for sp in sparsities):
        model, args = build()
        gm = geta_fx.transform(model, args)
        gm.eval()
        init = copy.deepcopy(gm.state_dict())
        dense = gm.compress()
        variants: dict[str, tuple[torch.fx.GraphModule, int, int, str]] = {}
        seen: dict[tuple[int, ...], str] = {}
        for align in ("odd", "even", 8, 16):
            gm.load_state_dict(init)
            kept, total = zero_fraction(gm, sp, align)
            counts = tuple(kept_units(g.num_units, sp, align if g.unit_size == 1 else 1)
                           for g in gm.groups if g.prunable and g.num_units >= 2)
            label = align if isinstance(align, str) else f"x{align}"
            if counts in seen:  # e.g. x8 == x16 when n/2 is already a multiple of 16
                seen_label = seen[counts]
                variants[f"{seen_label}={label}"] = variants.pop(seen_label)
                seen[counts] = f"{seen_label}={label}"
                continue
            seen[counts] = label
            widths = ",".join(str(c) for c in counts[:4])
            variants[label] = (gm.compress(), kept, total, widths)
        # the odd model aligned after the fact: compress(align=8) keeps zero units back
        gm.load_state_dict(init)
        zero_fraction(gm, sp, "odd")
        slim8 = gm.compress(align=8)
        removed = align_removed_units(gm.graph_module, removed_units_from_zeros(gm.graph_module), 8)
        counts8 = tuple(int(g.num_units - removed[g.unit_offset: g.unit_offset + g.num_units].sum())
                        for g in gm.groups if g.prunable and g.num_units >= 2)
        variants["odd+align8"] = (slim8, sum(counts8), total,
                                  ",".join(str(c) for c in counts8[:4]))
        for device in devices:
            dev_args = tuple(a.to(device) for a in args)
            # move_to_device also retargets devices recorded in the graph (e.g. an arange)
            mods = {"dense": move_to_device(copy.deepcopy(dense), device)}
            mods.update({k: move_to_device(copy.deepcopy(v[0]), device)
                         for k, v in variants.items()})
            best: dict[str, float] = {}
            for _ in range(rounds):
                for key, mod in mods.items():
                    t = time_call(device, partial(mod, *dev_args), min_time)
                    best[key] = min(best.get(key, t), t)
            t_odd = best["odd"]
            for key, (_, kept, total, widths) in variants.items():
                print(f"| {device} | {name} | {sp:.0%} | {key} {kept}/{total} | {widths} | "
                      f"{best[key]:.2f} | {best['dense'] / best[key]:.2f}x | "
                      f"{t_odd / best[key]:.2f}x |", flush=True)


def table_c_layers(devices: list[str], min_time: float, rounds: int = 3) -> None:
    """Single layers at the channel counts table (c) produces: the alignment effect in isolation."""
    print("\n#### (c') single layers by channel count (fp32; ratio = aligned ms / this ms)\n")
    print("| device | layer | channels | ms | vs aligned |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    cases: list[tuple[str, list[int], Callable[[int], tuple[Any, ...]], Callable[..., Any]]] = [
        ("conv3x3 8xCx32x32 -> C", [31, 32, 45, 48], lambda c: (
            torch.randn(8, c, 32, 32, generator=gen), torch.randn(c, c, 3, 3, generator=gen)),
         partial(F.conv2d, padding=1)),
        ("conv3x3 8xCx16x16 -> C", [63, 64, 89, 96], lambda c: (
            torch.randn(8, c, 16, 16, generator=gen), torch.randn(c, c, 3, 3, generator=gen)),
         partial(F.conv2d, padding=1)),
        ("linear 256xC -> 4C", [191, 192, 269, 272], lambda c: (
            torch.randn(256, c, generator=gen), torch.randn(4 * c, c, generator=gen)),
         F.linear),
    ]
    for device in devices:
        for label, chans, make, op in cases:
            inputs = {c: tuple(t.to(device) for t in make(c)) for c in chans}
            best: dict[int, float] = {}
            for _ in range(rounds):
                for c in chans:
                    t = time_call(device, partial(op, *inputs[c]), min_time)
                    best[c] = min(best.get(c, t), t)
            for i, c in enumerate(chans):
                aligned = chans[i + 1] if i % 2 == 0 else c  # pairs: (unaligned, aligned)
                print(f"| {device} | {label} | {c} | {best[c]:.3f} | "
                      f"{best[aligned] / best[c]:.2f}x |", flush=True)


# ------------------------------------------------------------------------------- table (b)
def _packed_weight(n: int, k: int, bits: int, device: str, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    off = level_offset(bits, True)
    levels = torch.randint(-(off - 1), off, (n, k), generator=gen)
    return pack_levels(levels, bits, True).to(device), torch.tensor([0.01], device=device)


def _int4_peer(x: torch.Tensor, n: int, k: int, device: str, gen: torch.Generator
               ) -> Callable[[], Any] | None:
    """torch's _weight_int4pack_mm (bf16 activations, group size 128) where available."""
    gs = 128
    try:
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        sz = torch.ones(k // gs, n, 2, dtype=torch.bfloat16, device=device)
        xb = x.to(torch.bfloat16)
        if device == "cpu":
            wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            fn: Callable[[], Any] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                xb, wp, gs, sz)
        else:
            u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device)
            wp = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
            fn = lambda: torch.ops.aten._weight_int4pack_mm(xb, wp, gs, sz)  # noqa: E731
        fn()
        return fn
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


#: bytes every variant's rotating weight copies add up to on CUDA (several times any L2)
ROTATE_BYTES = 384 << 20


def cuda_graph_ms(calls: list[Callable[[], Any]], rounds: int = 5) -> float:
    """GPU milliseconds per call: ``calls`` (one per weight copy) captured once in a CUDA graph,
    replayed between CUDA events; the fastest of ``rounds`` replays of >= 2 ms.

    Graph replay removes Python/dispatcher launch cost, which at M = 1 is larger than the
    kernels themselves, so the ratio compares GPU work (the way a decoder runs under CUDA graphs).
    Falls back to eager launches when capture fails (reported as such).
    """
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in calls:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for fn in calls:
                    fn()
            replay: Callable[[], Any] = graph.replay
        except RuntimeError as e:  # not capturable: eager launches
            print(f"# CUDA graph capture failed ({e}); eager timing", flush=True)

            def replay() -> None:
                for fn in calls:
                    fn()
        replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        reps = max(1, int(2.0 / max(start.elapsed_time(end), 1e-3)))
        best = float("inf")
        for _ in range(rounds):
            start.record()
            for _ in range(reps):
                replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / (reps * len(calls)))
        del graph
        return best


def _copies(nbytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // max(nbytes, 1)))


def table_b(devices: list[str], ms_list: list[int], shapes: list[tuple[int, int]],
            bits_list: list[int], min_time: float) -> None:
    print("\n### (b) low-bit linear vs F.linear (ms; ratio = fp16 ms / candidate ms)\n")
    if "cuda" in devices:
        print(f"CUDA: GPU time per call from CUDA-graph replay; each variant cycles through "
              f"copies of its weight totalling >= {ROTATE_BYTES >> 20} MiB, so no weight is "
              f"L2-resident between its uses (as in a real decoder). CPU: Timer, one weight.\n")
    print("| device | K x N | M | fp16 | bf16 | fp32 | int4pack_mm (peer) | "
          + " | ".join(f"W{b} geta" for b in bits_list) + " | "
          + " | ".join(f"W{b} vs fp16" for b in bits_list) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * (2 * len(bits_list)))
    gen = torch.Generator().manual_seed(0)
    for device in devices:
        for k, n in shapes:
            if device == "cuda":
                table_b_cuda(k, n, ms_list, bits_list, gen)
                continue
            w16 = (torch.randn(n, k, generator=gen) * 0.02).to(device, torch.float16)
            wb = w16.to(torch.bfloat16)
            w32 = w16.float()
            packed = {b: _packed_weight(n, k, b, device, gen) for b in bits_list}
            for m in ms_list:
                x = torch.randn(m, k, generator=gen).to(device)
                xh, xb = x.half(), x.bfloat16()
                t16 = ms(partial(F.linear, xh, w16), min_time)
                tb = ms(partial(F.linear, xb, wb), min_time)
                t32 = ms(partial(F.linear, x, w32), min_time)
                peer = _int4_peer(x, n, k, device, gen)
                tp = ms(peer, min_time) if peer is not None else None
                tl = {b: ms(partial(torch.ops.geta.lowbit_linear.default, x, p, s, b, k, True,
                                    None), min_time)
                      for b, (p, s) in packed.items()}  # fp32 activations on CPU
                _row_b(device, k, n, m, t16, tb, t32, tp, tl, bits_list)
            w16 = wb = w32 = packed = None  # free before the next shape  # type: ignore[assignment]
    # correctness guard for what was timed (one small case per device)
    for device in devices:
        p, s = _packed_weight(64, 256, 4, device, gen)
        x = torch.randn(3, 256, generator=gen).to(device)
        w = unpack_weight_reference(p, s, 4, True, [64, 256], torch.float32)
        torch.testing.assert_close(torch.ops.geta.lowbit_linear.default(x, p, s, 4, 256, True,
                                                                          None), x @ w.t(),
                                   rtol=1e-4, atol=1e-4)


def _row_b(device: str, k: int, n: int, m: int, t16: float, tb: float, t32: float | None,
           tp: float | None, tl: dict[int, float], bits_list: list[int]) -> None:
    cells = [f"{t16:.4f}", f"{tb:.4f}", f"{t32:.4f}" if t32 else "-",
             f"{tp:.4f}" if tp else "n/a"]
    cells += [f"{tl[b]:.4f}" for b in bits_list]
    cells += [f"{t16 / tl[b]:.2f}x" for b in bits_list]
    print(f"| {device} | {k}x{n} | {m} | " + " | ".join(cells) + " |", flush=True)


# ------------------------------------------------------------------- tables (d) and (e)
def _deploy_variants(sparsity: float) -> tuple[tuple[torch.Tensor, ...],
                                               dict[str, torch.fx.GraphModule]]:
    """The small GPT (cpu): dense graph, slim at ``sparsity``, and slim with 4-bit weights."""
    model, args = MODELS["gpt 4x384 (2x128 tok)"]()
    gm = geta_fx.transform(model, args)
    gq = geta_fx.transform(model, args, quantize="weight", bits=4.0)
    gm.eval()
    gq.eval()
    dense = gm.compress()
    zero_fraction(gm, sparsity)
    zero_fraction(gq, sparsity)
    return args, {"dense": dense, "slim": gm.compress(),
                  "slim W4": lower(gq.compress(), reference=gq)}


def table_d(sparsity: float, min_time: float, rounds: int = 3) -> None:
    """ONNX Runtime (CPU) latency and file size of the dense, slim and slim-W4 GPT (W4 as
    INT4 ``DequantizeLinear`` weights and as ``MatMulNBits``)."""
    import onnxruntime as ort

    print(f"\n### (d) ONNX Runtime: `geta_fx.save(m, 'm.onnx')` of the gpt 4x384 (2x128 tok), "
          f"{sparsity:.0%} group sparsity, CPUExecutionProvider, "
          f"{torch.get_num_threads()} intra-op threads, onnxruntime {ort.__version__}\n")
    print("Eager is the same GraphModule in torch; `W4`: 4-bit levels as INT4 initializers "
          "(2 per byte) into DequantizeLinear; `W4 MatMulNBits`: the same graph saved with "
          "`onnx_matmulnbits=True`. Interleaved over rounds; the fastest counts.\n")
    print("| variant | params | file MB | eager ms | ORT ms | ORT vs dense ORT | "
          "max abs(ORT - eager) |")
    print("|---|---|---|---|---|---|---|")
    args, mods = _deploy_variants(sparsity)
    mods["slim W4 MatMulNBits"] = mods["slim W4"]
    save_kw: dict[str, dict[str, Any]] = {"slim W4 MatMulNBits": {"onnx_matmulnbits": True}}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    best: dict[str, list[float]] = {k: [float("inf"), float("inf")] for k in mods}
    with tempfile.TemporaryDirectory() as tmp:
        sessions, sizes, diffs = {}, {}, {}
        for name, m in mods.items():
            path = os.path.join(tmp, name.replace(" ", "_") + ".onnx")
            geta_fx.save(m, path, lower_first=False, **save_kw.get(name, {}))
            sizes[name] = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)
                              if f.startswith(os.path.basename(path)))  # + external .data
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)}
            sessions[name] = (sess, feed)
            with torch.inference_mode():
                want = m(*args)
            got = torch.from_numpy(sess.run(None, feed)[0])
            diffs[name] = float((got - want).abs().max())
        for _ in range(rounds):
            for name, m in mods.items():
                sess, feed = sessions[name]
                best[name][0] = min(best[name][0], ms(partial(m, *args), min_time))
                best[name][1] = min(best[name][1], ms(partial(sess.run, None, feed), min_time))
    for name, m in mods.items():
        print(f"| {name} | {num_params(m):,} | {sizes[name] / 2**20:.2f} | {best[name][0]:.2f} "
              f"| {best[name][1]:.2f} | {best['dense'][1] / best[name][1]:.2f}x | "
              f"{diffs[name]:.1e} |", flush=True)


def table_e(sparsity: float, min_time: float, rounds: int = 3) -> None:
    """AOTInductor package (``geta_fx.save(package='aoti')``) vs eager: dense, slim and the
    lowered slim W4 GPT."""
    print(f"\n### (e) AOTInductor: `geta_fx.save(m, 'm.pt2', package='aoti')` of the gpt 4x384 "
          f"(2x128 tok), {sparsity:.0%} group sparsity, cpu, {torch.get_num_threads()} threads"
          "\n")
    print("| variant | params | eager ms | AOTI ms | AOTI vs eager | AOTI vs eager dense | "
          "compile s | max abs(AOTI - eager) |")
    print("|---|---|---|---|---|---|---|---|")
    args, mods = _deploy_variants(sparsity)
    # "slim W4" is the lowered graph: its geta::lowbit_linear ops run through AOTInductor's
    # proxy executor (the registered C++ kernels), so the package needs `import geta_fx`
    runners, compile_s, diffs = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in mods.items():
            path = os.path.join(tmp, f"{name}.pt2")
            t = time.perf_counter()
            geta_fx.save(m, path, lower_first=False, package="aoti")
            compile_s[name] = time.perf_counter() - t
            runners[name] = geta_fx.load(path)
            with torch.inference_mode():
                got, want = runners[name](*args), m(*args)
            got = got[0] if isinstance(got, (tuple, list)) else got
            diffs[name] = float((got - want).abs().max())
        best = {k: [float("inf"), float("inf")] for k in mods}
        for _ in range(rounds):
            for name, m in mods.items():
                best[name][0] = min(best[name][0], ms(partial(m, *args), min_time))
                best[name][1] = min(best[name][1], ms(partial(runners[name], *args), min_time))
    for name, m in mods.items():
        print(f"| {name} | {num_params(m):,} | {best[name][0]:.2f} | {best[name][1]:.2f} | "
              f"{best[name][0] / best[name][1]:.2f}x | {best['dense'][0] / best[name][1]:.2f}x "
              f"| {compile_s[name]:.0f} | {diffs[name]:.1e} |", flush=True)


def table_b_cuda(k: int, n: int, ms_list: list[int], bits_list: list[int],
                 gen: torch.Generator) -> None:
    """One K x N shape on CUDA; fp16 activations for the geta op (the fp16 comparison)."""
    dev = "cuda"
    w16 = (torch.randn(n, k, generator=gen) * 0.02).to(dev, torch.float16)
    c16 = _copies(w16.numel() * 2)
    w16s = [w16.clone() for _ in range(c16)]
    wbs = [w.bfloat16() for w in w16s]
    packed = {}
    for b in bits_list:
        p, s = _packed_weight(n, k, b, dev, gen)
        packed[b] = [(p.clone(), s.clone()) for _ in range(_copies(p.numel()))]
    peer_w = None
    try:  # torch's int4 path: bf16 activations, group size 128
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(dev)
        wp = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        sz = torch.ones(k // 128, n, 2, dtype=torch.bfloat16, device=dev)
        peer_w = [(wp.clone(), sz) for _ in range(_copies(wp.numel() * wp.element_size()))]
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        print(f"# int4pack peer unavailable: {type(e).__name__}: {e}", flush=True)
    lowbit = torch.ops.geta.lowbit_linear.default
    for m in ms_list:
        x = torch.randn(m, k, generator=gen).to(dev)
        xh, xb = x.half(), x.bfloat16()
        t16 = cuda_graph_ms([partial(F.linear, xh, w) for w in w16s])
        tb = cuda_graph_ms([partial(F.linear, xb, w) for w in wbs])
        tp = None
        if peer_w is not None:
            try:
                tp = cuda_graph_ms([partial(torch.ops.aten._weight_int4pack_mm, xb, w, 128, z)
                                    for w, z in peer_w])
            except RuntimeError as e:
                print(f"# int4pack peer failed at M={m}: {e}", flush=True)
        tl = {b: cuda_graph_ms([partial(lowbit, xh, p, s, b, k, True, None)
                                for p, s in packed[b]]) for b in bits_list}
        _row_b(dev, k, n, m, t16, tb, None, tp, tl, bits_list)
    del w16s, wbs, packed, peer_w
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default="abc",
                    help="any of a, b, c; d: ONNX Runtime, e: AOTInductor (slow: not default)")
    ap.add_argument("--deploy-sparsity", type=float, default=0.5, help="tables d and e")
    ap.add_argument("--devices", default=None, help="cpu,cuda (default: cpu + cuda if present)")
    ap.add_argument("--sparsity", default="0.3,0.5,0.7")
    ap.add_argument("--align-sparsity", default="0.3,0.5", help="sparsities of table c")
    ap.add_argument("--m", default="1,8,32,512")
    ap.add_argument("--shapes", default="4096x4096,4096x14336", help="KxN list")
    ap.add_argument("--bits", default="3,4,8")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per Timer measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, tables a and c")
    ap.add_argument("--stat", choices=("min", "median"), default="min",
                    help="per-call time: fastest Timer block (default) or the median")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time this thread's CPU time on 1 torch thread (a shared machine)")
    args = ap.parse_args()
    global STAT, CLOCK
    STAT, CLOCK = args.stat, args.clock
    if CLOCK == "cpu":
        torch.set_num_threads(1)
    devices = (args.devices.split(",") if args.devices else
               ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    st = lowbit_kernels.ensure_loaded()
    print(f"# bench_deploy: torch {torch.__version__}, commit {commit()}, python "
          f"{platform.python_version()}")
    for d in devices:
        print(f"# {d}: {device_name(d)}; geta low-bit impl: {st[d]['impl']} ({st[d]['reason']})")
    if "a" in args.tables:
        table_a(devices, [float(s) for s in args.sparsity.split(",")], args.min_time,
                args.rounds)
    if "c" in args.tables:
        table_c(devices, [float(s) for s in args.align_sparsity.split(",")], args.min_time,
                args.rounds)
        table_c_layers(devices, args.min_time, args.rounds)
    if "d" in args.tables:
        table_d(args.deploy_sparsity, args.min_time, args.rounds)
    if "e" in args.tables:
        table_e(args.deploy_sparsity, args.min_time, args.rounds)
    if "b" in args.tables:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        table_b(devices, [int(m) for m in args.m.split(",")], shapes,  # type: ignore[arg-type]
                [int(b) for b in args.bits.split(",")], args.min_time)


if __name__ == "__main__":
    sys.exit(main())
