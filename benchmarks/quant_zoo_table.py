"""QADG invariance with quantizers on the whole zoo, plus a ResNet-20 report.

For each zoo model: groups with quantize="weight_act" identical to without (yes/no); max
relative error of the 16-bit model vs float; after setting weights to 4 bits and
activations to 6 bits and zeroing 50% of every prunable group, the max relative error of
compress() vs the zeroed model.  Then geta_fx.report() of a ResNet-20 (W4/A6, 50% zeroed)
before and after compress.

    python benchmarks/quant_zoo_table.py
"""

from __future__ import annotations

import os
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

import geta_fx
from geta_fx.testing import max_rel_err, zero_random_units
from geta_fx.testing.models import ZOO


def _signature(gm: geta_fx.GetaModule) -> list:
    return [(g.num_units, g.prunable, sorted((m.fqn, m.dim, m.role, tuple(m.indices.tolist()))
                                              for m in g.members)) for g in gm.groups]


def _low_bits(gm: geta_fx.GetaModule) -> None:
    for q in gm.quantizers.values():
        q.set_bit_width(4.0 if q.kind == "weight" else 6.0)


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                            capture_output=True).stdout.strip()
    print(f"# quant zoo  torch={torch.__version__}  commit={commit}  "
          f"date={time.strftime('%Y-%m-%d')}\n")
    print("| model | quantizers (w/a) | groups identical | W16A16 vs float | "
          "compress vs zeroed (W4A6, 50% zeroed) |")
    print("|---|---|---|---|---|")
    for name, build in ZOO.items():
        model, inputs = build()
        plain = geta_fx.transform(model, inputs)
        gm = geta_fx.transform(model, inputs, quantize="weight_act")
        qs = list(gm.quantizers.values())
        nw = sum(q.kind == "weight" for q in qs)
        err16 = max_rel_err(model(*inputs), gm(*inputs))
        _low_bits(gm)
        zero_random_units(gm, 0.5)
        err = max_rel_err(gm(*inputs), gm.compress()(*inputs))
        same = "yes" if _signature(gm) == _signature(plain) else "NO"
        print(f"| {name} | {nw}/{len(qs) - nw} | {same} | {err16:.1e} | {err:.1e} |")
    model, inputs = ZOO["resnet20"]()
    gm = geta_fx.transform(model, inputs, quantize="weight_act")
    _low_bits(gm)
    zero_random_units(gm, 0.5)
    print("\n## ResNet-20, W4/A6, 50% of every prunable group zeroed\n")
    print(geta_fx.report(gm))
    print("\n## after compress()\n")
    print(geta_fx.report(gm.compress(), reference=gm))


if __name__ == "__main__":
    main()
