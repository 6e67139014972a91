"""GETA on a ``transformers`` causal LM sharded with FSDP2: QASSO on DTensor shards, compress.

Run (CPU, gloo; any number of ranks that divides the batch)::

    torchrun --nproc-per-node 2 examples/fsdp2_llama.py [--steps 40] [--out DIR]

What every rank does::

    LlamaForCausalLM(tiny config)  --geta_fx.transform-->  GetaModule        (same seed: same model)
        fully_shard_blocks(gm)                   every decoder layer its own FSDP2 unit, then the
                                                 root; parameters become DTensor shards (dim 0)
        QASSO(gm, variant="adamw", total_steps)  unit statistics all_reduced, rank 0 selects,
        train on the rank's half of each batch   every rank zeroes its own rows
    full state dict gathered to rank 0  ->  an unsharded copy  ->  compress()  ->  report

Rank 0 then checks that the slim model gives the logits of the trained (zeroed) model and prints
its cost report.  The data are random token ids (no download); the point is the mechanics, not
the loss.

Per-block units: the captured graph is flat (it reads ``model.layers.0.self_attn.q_proj.weight``
as an attribute and never calls the layer), so ``geta_fx.distributed.fully_shard_blocks`` first
splits it into one GraphModule per decoder layer, installed at the layer's own path (parameter
names unchanged), and shards each: a layer's weights are all-gathered only while it runs.  The
script prints the most parameter bytes rank 0 held whole at once during a forward (sampled at
every unit's forward hooks), plus its shards, next to the model's size; ``--root-only`` shards
only the root (the whole model is gathered for every forward/backward; gradients and optimizer
state stay sharded).
``--out DIR`` also writes one sharded checkpoint per rank (``gm.state_dict()`` and
``opt.state_dict()`` per rank), which QASSO resumes from bit-exactly
(tests/test_qasso_fsdp.py, tests/test_distributed_blocks.py).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 128


def build_model(layers: int = 2, hidden: int = 64) -> tuple[nn.Module, Tensor]:
    """A tiny Llama (grouped-query attention; 2 layers, hidden 64 by default) and a batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(cfg).eval(), torch.randint(0, VOCAB, (4, 16))


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token cross entropy of ``ids``."""
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def train(gm: nn.Module, steps: int, rank: int, world: int) -> object:
    """QASSO on the sharded GetaModule; every rank trains on its slice of the same batches."""
    from geta_fx.optim import QASSO

    opt = QASSO(gm, variant="adamw", lr=3e-3, lr_quant=1e-3, target_sparsity=0.3,
                bit_range=(4, 16), total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2 * world, 17), generator=gen).chunk(world)[rank]
        opt.zero_grad()
        lm_loss(gm, ids).backward()
        opt.grad_clipping()
        opt.step()
    return opt


def track_whole_parameters(gm: nn.Module) -> list[int]:
    """``[peak]``: the most bytes of parameters held whole (not DTensor shards) at any forward
    hook of an FSDP2 unit, updated as the model runs."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    peak = [0]

    def sample(*_: object) -> None:
        peak[0] = max(peak[0], sum(p.numel() * p.element_size() for p in gm.parameters()
                                   if not isinstance(p, DTensor)))

    for m in gm.modules():
        if isinstance(m, FSDPModule):
            m.register_forward_pre_hook(sample)
            m.register_forward_hook(sample)
    return peak


def gather_full(gm: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on rank 0 (empty elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True,
                                                             cpu_offload=True))


def compress_and_report(plain: nn.Module, state: dict[str, Tensor], ids: Tensor) -> None:
    """Rank 0: load the trained weights into an unsharded copy, compress, check, report."""
    from geta_fx.report import report

    plain.load_state_dict(state)
    plain.eval()
    slim = plain.compress()
    with torch.no_grad():
        want, got = plain(ids).logits, slim(ids).logits
    diff = float((want - got).abs().max())
    print(f"slim vs trained GetaModule logits: max |diff| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"the compressed model disagrees with the trained one ({diff})")
    print(report(plain, compressed=True))


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point (reads RANK / WORLD_SIZE / MASTER_* from the environment)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=None, help="write one checkpoint per rank here")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--root-only", action="store_true",
                   help="one FSDP2 unit (the root) instead of one per decoder layer")
    args = p.parse_args(argv)

    import geta_fx
    from torch.distributed.fsdp import fully_shard

    from geta_fx.distributed import fully_shard_blocks

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model, ids = build_model(args.layers, args.hidden)
        gm = geta_fx.transform(model, (ids,), quantize="weight").train()
        plain = copy.deepcopy(gm) if rank == 0 else None  # unsharded twin for compress()
        total = sum(p.numel() * p.element_size() for p in gm.parameters())
        if args.root_only:
            fully_shard(gm)
            units = 1
        else:
            units = len(fully_shard_blocks(gm)) + 1
        shards = sum(p.to_local().numel() * p.element_size() for p in gm.parameters())
        peak = track_whole_parameters(gm)
        opt = train(gm, args.steps, rank, world)
        m = opt.metrics()  # type: ignore[attr-defined]
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            torch.save({"module": gm.state_dict(), "optim": opt.state_dict()},  # type: ignore[attr-defined]
                       os.path.join(args.out, f"rank{rank}.pt"))
        state = gather_full(gm)
        if rank == 0:
            mb = 2.0 ** -20
            print(f"{units} FSDP2 unit(s) ({'root only' if args.root_only else 'per block'}):"
                  f" parameters held whole during a forward: peak {peak[0] * mb:.2f} MB of "
                  f"{total * mb:.2f} MB ({peak[0] / total:.0%}); with this rank's shards "
                  f"({shards * mb:.2f} MB) {(shards + peak[0]) * mb:.2f} MB "
                  f"({(shards + peak[0]) / total:.0%} of one unsharded copy)")
            print(f"{world} ranks, {m['step']} QASSO steps: {m['num_pruned']} of "
                  f"{m['num_units']} units pruned (K={m['K']}), weight bits "
                  f"{m['bits_min']:.1f}-{m['bits_max']:.1f}")
            assert plain is not None
            compress_and_report(plain, state, ids)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
