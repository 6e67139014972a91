"""GETA on a ``transformers`` causal LM sharded with FSDP2: QASSO on DTensor shards, compress.

Run (CPU, gloo; any number of ranks that divides the batch)::

    torchrun --nproc-per-node 2 examples/fsdp2_llama.py [--steps 40] [--out DIR]

What every rank does::

    LlamaForCausalLM(tiny config)  --geta_fx.transform-->  GetaModule        (same seed: same model)
        fully_shard(gm)                          parameters become DTensor shards (dim 0)
        QASSO(gm, variant="adamw", total_steps)  unit statistics all_reduced, rank 0 selects,
        train on the rank's half of each batch   every rank zeroes its own rows
    full state dict gathered to rank 0  ->  an unsharded copy  ->  compress()  ->  report

Rank 0 then checks that the slim model gives the logits of the trained (zeroed) model and prints
its cost report.  The data are random token ids (no download); the point is the mechanics, not
the loss.

Why the root and not each decoder layer is the FSDP2 unit: the captured graph is flat -- it
reads ``model.layers.0.self_attn.q_proj.weight`` as an attribute, it never *calls* the layer
modules, so per-layer ``fully_shard`` pre-forward hooks (which all-gather a layer's shards)
would never fire.  With the root as the one unit, parameters are all-gathered for the whole
forward/backward (peak parameter memory: the full model on every rank), while gradients and
the optimizer state (AdamW moments, QASSO's slabs) stay sharded: ``1/world`` of the 12 bytes
per parameter of state.  ``--out DIR`` also writes one sharded checkpoint per rank
(``torch.distributed.checkpoint``-free: ``gm.state_dict()`` and ``opt.state_dict()`` per rank),
which QASSO resumes from bit-exactly (tests/test_qasso_fsdp.py).
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


def build_model() -> tuple[nn.Module, Tensor]:
    """A tiny Llama (2 layers, hidden 64, grouped-query attention) and an example batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
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
    args = p.parse_args(argv)

    import geta_fx
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model, ids = build_model()
        gm = geta_fx.transform(model, (ids,), quantize="weight").train()
        plain = copy.deepcopy(gm) if rank == 0 else None  # unsharded twin for compress()
        fully_shard(gm)
        opt = train(gm, args.steps, rank, world)
        m = opt.metrics()  # type: ignore[attr-defined]
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            torch.save({"module": gm.state_dict(), "optim": opt.state_dict()},  # type: ignore[attr-defined]
                       os.path.join(args.out, f"rank{rank}.pt"))
        state = gather_full(gm)
        if rank == 0:
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
