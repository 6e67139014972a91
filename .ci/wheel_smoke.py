"""Smoke test of an installed geta_fx wheel, run by .ci/run from outside the checkout.

    geta_fx (site-packages) -> kernels fused on the CPU -> transform(ResNetCifar, weight_act)
    -> zero units -> compress -> lower (packed, geta::lowbit_linear) -> save -> load (a fresh
    process) -> same outputs as the eager-mode zeroed model at every step

Exits non-zero (an AssertionError naming the step) on any packaging regression: a missing
module, source or library, kernels that do not load, a wheel that imports from the checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import geta_fx
import geta_fx.kernels as kernels
import geta_fx.lowbit_kernels as lowbit_kernels
from geta_fx import deploy
from geta_fx.testing import max_rel_err
from geta_fx.testing.models import ResNetCifar

CHECKOUT = Path(__file__).resolve().parent.parent


def check_installed() -> None:
    where = Path(geta_fx.__file__).resolve()
    assert "site-packages" in where.parts, f"geta_fx imported from {where}, not the wheel"
    assert Path.cwd() != CHECKOUT and CHECKOUT not in Path.cwd().parents, Path.cwd()
    assert CHECKOUT / "geta_fx" not in where.parents, f"geta_fx imported from the checkout {where}"
    for loader in (kernels, lowbit_kernels):
        st = loader.ensure_loaded()["cpu"]
        assert st["impl"] == "fused", f"{loader.__name__}: {st}"
        assert Path(st["library"]).parent == where.parent / "kernels", st
    assert "torch.utils.cpp_extension" not in sys.modules, "import geta_fx loaded the compiler"


def check_pipeline(tmp: Path) -> None:
    torch.manual_seed(0)
    model = ResNetCifar(depth=8, widths=(8, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    gm = geta_fx.transform(model, (x,), quantize="weight").eval()
    for i, q in enumerate(q for q in gm.quantizers.values() if q.kind == "weight"):
        q.set_bit_width((4, 6, 8)[i % 3])
    prunable = [g for g in gm.groups if g.prunable and g.num_units > 1]
    assert prunable, "no prunable group in ResNetCifar"
    for g in prunable:
        gm.zero_units(g.id, list(range(0, g.num_units, 2)))
    want = gm(x)
    slim = gm.compress()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in gm.parameters())
    assert max_rel_err(slim(x), want) < 1e-4, "compress changed the outputs"
    low = deploy.lower(slim, reference=gm)
    assert max_rel_err(low(x), want) < 1e-4, "lower changed the outputs"
    fused = [n for n in low.graph.nodes if n.target is torch.ops.geta.lowbit_linear.default]
    assert fused, "the lowered fc does not run geta::lowbit_linear"
    path = tmp / "resnet.pt2"
    deploy.save(low, path)
    torch.save(x, tmp / "x.pt")
    child = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path), str(tmp / "x.pt"), str(tmp / "y.pt")],
        capture_output=True, text=True, check=False, cwd=tmp)
    assert child.returncode == 0, f"load in a fresh process failed: {child.stderr[-3000:]}"
    status = json.loads(child.stdout.strip().splitlines()[-1])
    assert status["impl"] == "fused", status
    assert max_rel_err(torch.load(tmp / "y.pt"), want) < 1e-4, "save/load changed the outputs"


_LOAD = """
import json, sys
import torch
from geta_fx import deploy
import geta_fx.lowbit_kernels as lk
m = deploy.load(sys.argv[1])
torch.save(m(torch.load(sys.argv[2])), sys.argv[3])
print(json.dumps(lk.status()["cpu"]))
"""


def main() -> int:
    check_installed()
    with tempfile.TemporaryDirectory() as tmp:
        check_pipeline(Path(tmp))
    print(f"wheel smoke test passed: geta_fx {geta_fx.__file__}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
