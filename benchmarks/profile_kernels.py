"""Run the CUDA kernels a few times for a profiler (``ncu``): low-bit GEMV at M = 1 and 8
(4-bit, 4096x4096, fp16) and the fp16 quantizer forward (linear, nonlinear) on 4096x4096.

    ncu -k regex:'gemv_kernel|quantize_forward' --section SpeedOfLight \
        --section WarpStateStats python benchmarks/profile_kernels.py
"""

from __future__ import annotations

import torch

import geta_fx.kernels as kernels
import geta_fx.lowbit_kernels as lowbit_kernels
from geta_fx.ops.lowbit import level_offset, pack_levels


def main() -> None:
    kernels.ensure_loaded()
    lowbit_kernels.ensure_loaded()
    gen = torch.Generator().manual_seed(0)
    k = n = 4096
    off = level_offset(4, True)
    packed = pack_levels(torch.randint(-(off - 1), off, (n, k), generator=gen), 4, True).cuda()
    scale = torch.tensor([0.01], device="cuda")
    for m in (1, 8):
        x = torch.randn(m, k, generator=gen).cuda().half()
        for _ in range(2):
            torch.ops.geta.lowbit_linear.default(x, packed, scale, 4, k, True, None)
    x = torch.randn(n, k, device="cuda").half()
    for t in (1.0, 1.5):
        p = [torch.tensor([v], device="cuda") for v in (3.0**t / 127, 3.0, t)]
        for _ in range(2):
            torch.ops.geta.quantize(x, *p, True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
