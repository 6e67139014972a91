"""Benchmark KV-cache generation of compressed causal LMs (issue #16 item 1, #19 item 4).

One table, everything measured in one run on one prompt: a Llama-shaped transformers model
(random weights; default 4 layers, hidden 256, 8 heads / 4 key-value heads, MLP 688, vocabulary
8192: ~7.4M parameters), greedy, batch 1.  Rows: dense, then 30% and 50% group sparsity (that
fraction of the units of every prunable group zeroed, at least one kept,
``geta_fx.testing.zero_random_units``).  Columns, each ms per generated token after the first
(decode) and tokens/s over the whole call (prefill included):

* ``HF dense``: the user's dense model, ``model.generate(use_cache=True, do_sample=False)``
  (the baseline of every row);
* ``geta``: ``geta_fx.generate(gm.compress(), ...)``: the prefill graph once, then one
  decode-step graph call per token with the pruned KV cache (the dense row: nothing zeroed, the
  same graphs with nothing removed, so the column isolates the executor);
* ``HF into``: ``gm.compress(into=copy_of_model)``, then transformers' own ``generate`` and
  cache on the sliced eager model.

Timing: each variant runs ``generate`` for 1 and for N new tokens; decode ms/token is
``(t_N - t_1) / (N - 1)``, tokens/s is ``N / t_N``; variants are interleaved over ``--rounds``
rounds and each keeps its fastest time.  The clock is this thread's CPU time with torch on one
thread (``--clock cpu``, the default: on a shared machine a call that loses its core stalls
for scheduler slices, which wall time would count; CPU time is what the model costs), or wall
time (``--clock wall``, with ``--threads``).  The tokens of ``geta`` and
``HF into`` are compared (same zeroed model: they must be equal; the table says whether they
are).  The header names device, threads, torch, transformers, commit and date.

    python benchmarks/bench_generate.py                         # ~3 min, 1 thread
    python benchmarks/bench_generate.py --new-tokens 32 --rounds 2 --sparsity 0.5
    python benchmarks/bench_generate.py --saved --sparsity 0.5  # + geta_fx.load(save) column
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from _common import commit, cpu_name
import geta_fx
from geta_fx.testing import zero_random_units


def build(args: argparse.Namespace) -> nn.Module:
    """The Llama-shaped model (random weights, seed 0), eval mode, no stop token."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.mlp, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.max_positions)
    model = tf.LlamaForCausalLM(cfg).eval()
    _no_stop(model)
    return model


def _no_stop(model: nn.Module) -> None:
    """No stop token: HF generate, and geta_fx.generate (which takes its default stop token
    from the captured model's generation_config), run exactly max_new_tokens."""
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, None


def hf_call(model: nn.Module, ids: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """``n -> model.generate(ids, n new tokens)``: greedy, transformers' KV cache."""
    mask = torch.ones_like(ids)

    def run(n: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True)
    return run


def geta_call(slim: torch.fx.GraphModule, ids: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """``n -> geta_fx.generate(slim, ids, n)`` (greedy)."""
    return lambda n: geta_fx.generate(slim, ids, max_new_tokens=n)


def variants(model: nn.Module, ids: torch.Tensor, sparsity: float, saved: str | None = None
             ) -> tuple[dict[str, Callable[[int], torch.Tensor]], int, int]:
    """The geta and HF-into generators at ``sparsity`` (0: nothing zeroed); their params.
    ``saved``: a .pt2 path; adds ``geta loaded``, ``geta_fx.load`` of ``geta_fx.save(slim)``."""
    gm = geta_fx.transform(model, (ids.expand(2, -1).clone(),))
    if sparsity > 0:
        zero_random_units(gm, sparsity)
    gm.eval()
    slim = gm.compress()
    into = gm.compress(into=copy.deepcopy(model))
    _no_stop(into)
    params = sum(p.numel() for p in slim.parameters())
    geta_fx.generate(slim, ids, max_new_tokens=2)  # capture the two graphs (not timed)
    calls = {"geta": geta_call(slim, ids), "HF into": hf_call(into, ids)}
    if saved is not None:
        geta_fx.save(slim, saved)
        calls["geta loaded"] = geta_call(geta_fx.load(saved), ids)
    return calls, params, sum(p.numel() for p in into.parameters())


def fastest(calls: dict[str, Callable[[int], torch.Tensor]], n: int, rounds: int,
            clock: Callable[[], float]) -> dict[str, tuple[float, float, torch.Tensor]]:
    """name -> (fastest t_1, fastest t_N, tokens), interleaving the calls over rounds."""
    best: dict[str, list[Any]] = {k: [float("inf"), float("inf"), None] for k in calls}
    with torch.inference_mode():
        for call in calls.values():
            call(2)  # warm-up
        for _ in range(rounds):
            for name, call in calls.items():
                for slot, tokens in ((0, 1), (1, n)):
                    t = clock()
                    out = call(tokens)
                    best[name][slot] = min(best[name][slot], clock() - t)
                    if tokens == n:
                        best[name][2] = out
    return {k: (v[0], v[1], v[2]) for k, v in best.items()}


def cells(t1: float, tn: float, n: int) -> tuple[float, float]:
    """(decode ms per token, tokens per second over the whole call)."""
    return (tn - t1) / (n - 1) * 1e3, n / tn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", default="0.3,0.5", help="comma list (a dense row is added)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (batch 1)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-positions", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core VM, 2 threads spin against "
                         "other jobs and time 4x slower and noisier)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu (default): this thread's CPU time (time.thread_time; needs "
                         "--threads 1), robust to other jobs on a shared machine; wall: "
                         "perf_counter")
    ap.add_argument("--saved", action="store_true",
                    help="add a 'geta loaded' column: geta_fx.generate of geta_fx.load(path) "
                         "after geta_fx.save(slim, path) (a temporary .pt2), and its file size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu times this thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    import transformers

    model = build(args)
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator()
                        .manual_seed(1))
    n = args.new_tokens
    dense_params = sum(p.numel() for p in model.parameters())
    print(f"# bench_generate: {cpu_name()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, commit {commit()}, "
          f"{datetime.date.today().isoformat()}")
    print(f"# Llama {args.layers}x{args.hidden}, {args.heads} heads / {args.kv_heads} kv, MLP "
          f"{args.mlp}, vocab {args.vocab}: {dense_params:,} params; prompt 1x{args.prompt}, "
          f"{n} new tokens, greedy; fastest of {args.rounds} interleaved rounds, "
          f"{args.clock} clock\n")
    extra = " geta loaded ms/tok (file MB) | loaded tokens == geta |" if args.saved else ""
    print("| group sparsity | params (slim / into) | HF dense ms/tok | geta ms/tok | "
          "HF into ms/tok | HF dense tok/s | geta tok/s | HF into tok/s | geta vs HF dense "
          "(decode) | HF into vs HF dense (decode) | geta tokens == HF into |" + extra)
    print("|---|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * bool(extra))
    tmp = tempfile.TemporaryDirectory()
    saved = os.path.join(tmp.name, "slim.pt2") if args.saved else None
    for s in [0.0] + [float(x) for x in args.sparsity.split(",")]:
        calls, p_slim, p_into = variants(model, ids, s, saved)
        got = fastest({"HF dense": hf_call(model, ids), **calls}, n, args.rounds, clock)
        ms_tok = {k: cells(t1, tn, n) for k, (t1, tn, _) in got.items()}
        same = torch.equal(got["geta"][2], got["HF into"][2])
        d = ms_tok["HF dense"][0]
        print(f"| {'dense' if s == 0 else f'{s:.0%}'} | {p_slim:,} / {p_into:,} | "
              f"{d:.2f} | {ms_tok['geta'][0]:.2f} | {ms_tok['HF into'][0]:.2f} | "
              f"{ms_tok['HF dense'][1]:.0f} | {ms_tok['geta'][1]:.0f} | "
              f"{ms_tok['HF into'][1]:.0f} | {d / ms_tok['geta'][0]:.2f}x | "
              f"{d / ms_tok['HF into'][0]:.2f}x | {'yes' if same else 'NO'} |"
              + (f" {ms_tok['geta loaded'][0]:.2f} ({os.path.getsize(saved) / 1e6:.1f}) | "
                 f"{'yes' if torch.equal(got['geta loaded'][2], got['geta'][2]) else 'NO'} |"
                 if saved else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
