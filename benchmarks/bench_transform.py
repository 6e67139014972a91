"""Benchmark: capture + pass pipeline on the zoo and on a Llama-2-7B-shaped model.

Prints two tables:
1. zoo: groups, prunable units, parameter reduction after zeroing 50% of every prunable
   group's units, transform seconds;
2. Llama-2-7B shape built on the `meta` device (no real weights): seconds per stage
   (torch.export capture vs each geta_fx pass), groups and units found, peak RSS of the
   process that ran it (a fresh subprocess, so the number is its own).

    python benchmarks/bench_transform.py            # both tables
    python benchmarks/bench_transform.py --7b-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from _common import commit as _commit

HERE = os.path.dirname(os.path.abspath(__file__))


def zoo_table() -> None:
    from geta_fx.testing import num_params, zero_random_units
    from geta_fx.testing.models import ZOO, vgg7_bn

    import geta_fx

    models = dict(ZOO)
    models["vgg7_bn_full"] = lambda: (vgg7_bn().eval(), (torch.randn(2, 3, 32, 32),))
    print("| model | groups | prunable groups | prunable units | params | params after 50% "
          "zeroed | reduction | transform s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, build in models.items():
        model, inputs = build()
        t0 = time.perf_counter()
        gm = geta_fx.transform(model, inputs)
        dt = time.perf_counter() - t0
        prunable = [g for g in gm.groups if g.prunable]
        full = num_params(gm)
        zero_random_units(gm, 0.5)
        slim = num_params(gm.compress())
        print(f"| {name} | {len(gm.groups)} | {len(prunable)} | "
              f"{sum(g.num_units for g in prunable)} | {full:,} | {slim:,} | "
              f"{1 - slim / full:.1%} | {dt:.2f} |")


def run_7b() -> dict:
    import transformers as tf

    import geta_fx
    from geta_fx.pipeline import Pipeline

    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, use_cache=False)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    cap = geta_fx.capture(model, (ids,))
    capture_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    Pipeline(geta_fx.default_pipeline())(cap.graph_module)
    passes_s = time.perf_counter() - t0
    log = cap.graph_module.meta["geta.log"]
    groups = cap.graph_module.meta["geta.groups"]
    return {
        "build_s": build, "capture_s": capture_s, "passes_s": passes_s,
        "per_pass": {r.name: r.seconds for r in log},
        "nodes": len(cap.graph_module.graph.nodes),
        "groups": len(groups), "prunable_groups": sum(g.prunable for g in groups),
        "prunable_units": sum(g.num_units for g in groups if g.prunable),
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def table_7b() -> None:
    out = subprocess.check_output([sys.executable, __file__, "--7b-child"], text=True,
                                  stderr=subprocess.DEVNULL)
    r = json.loads(out.strip().splitlines()[-1])
    total = r["capture_s"] + r["passes_s"]
    print(f"\nLlama-2-7B shape ({r['params'] / 1e9:.2f} B params on meta, {r['nodes']} nodes)")
    print("| stage | seconds |")
    print("|---|---|")
    print(f"| build model (meta) | {r['build_s']:.2f} |")
    print(f"| capture (torch.export) | {r['capture_s']:.2f} |")
    for name, s in r["per_pass"].items():
        print(f"| pass {name} | {s:.2f} |")
    print(f"| **capture + passes** | **{total:.2f}** |")
    print(f"\ngroups {r['groups']} (prunable {r['prunable_groups']}), prunable units "
          f"{r['prunable_units']:,}; peak RSS {r['peak_rss_gb']:.2f} GB; "
          f"passes / capture = {r['passes_s'] / r['capture_s']:.2f}x "
          f"(goal: whole analysis <= 60 s, <= 4 GB, passes < capture)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--7b-only", dest="only7b", action="store_true")
    ap.add_argument("--7b-child", dest="child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_7b()))
        return
    print(f"# bench_transform  device=cpu ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)  torch={torch.__version__}  commit={_commit()}  "
          f"date={time.strftime('%Y-%m-%d')}\n")
    if not args.only7b:
        zoo_table()
    table_7b()


if __name__ == "__main__":
    main()
