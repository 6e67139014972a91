"""QASSO under DistributedDataParallel (gloo, 2 CPU ranks): identical masks and bit widths.

    rank 0 ─┐ DDP(gm) + QASSO(gm), own data shard  ─┐
            ├─ all-reduced grads, rank-0 selection ─┼─▶ all_gather(masks, bits, weights)
    rank 1 ─┘                                      ─┘   equal on both ranks
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import run_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD = 2
STEPS = 14


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        import geta_fx
        from geta_fx.optim import QASSO
        from zoo import GPTBlock

        torch.manual_seed(0)
        model = GPTBlock(d=16, heads=4, vocab=20).eval()
        ids = torch.randint(0, 20, (4, 8))
        gm = geta_fx.transform(model, (ids,), quantize="weight").train()
        ddp = DDP(gm)
        opt = QASSO(gm, variant="adam", lr=1e-2, lr_quant=1e-2, target_sparsity=0.5,
                    bit_range=(4, 16), bit_reduction=4, start_projection_step=1,
                    projection_steps=4, projection_periods=2, start_pruning_step=5,
                    pruning_steps=6, pruning_periods=2)
        gen = torch.Generator().manual_seed(100 + rank)  # a different shard per rank
        for _ in range(STEPS):
            x = torch.randint(0, 20, (4, 9), generator=gen)
            opt.zero_grad()
            logits = ddp(x[:, :-1])
            F.cross_entropy(logits.reshape(-1, 20), x[:, 1:].reshape(-1)).backward()
            opt.step()
        m = opt.metrics()
        state = {
            "pruned": opt.pruned_units.to(torch.float32),
            "bits": opt.bit_widths(),
            "weights": torch.cat([p.detach().reshape(-1) for p in gm.parameters()]),
        }
        for name, t in state.items():
            gathered = [torch.zeros_like(t) for _ in range(WORLD)]
            dist.all_gather(gathered, t)
            if not torch.equal(gathered[0], gathered[1]):
                raise AssertionError(f"rank {rank}: {name} differs between ranks")
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{m['num_pruned']} {m['K']} {m['num_zero_units']} {m['stage']} "
                    f"{m['bits_min']:.4f} {m['bits_max']:.4f}\n")
        dist.barrier()  # both ranks are done before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo ranks: ~5 s
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks_identical_masks_and_bits(tmp_path) -> None:
    run_ranks(_worker, (str(tmp_path / "init"), str(tmp_path)), WORLD,
              [str(tmp_path / f"rank{r}.txt") for r in range(WORLD)], start_method="spawn")
    lines = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(WORLD)]
    assert lines[0] == lines[1]
    num_pruned, k, zero, stage, bmin, bmax = lines[0]
    assert stage == "cooldown" and num_pruned == k == zero and int(k) > 0
    assert 4 - 1e-3 <= float(bmin) <= float(bmax) <= 8 + 1e-3
