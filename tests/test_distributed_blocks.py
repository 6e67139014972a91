"""geta_fx.distributed: the flat graph split into per-block GraphModules (issue #17, FSDP2 units).

    flat GetaModule ──split_blocks──▶ root graph calls model.layers.<i> ──merge_blocks──▶ flat
          │                                  │                                         │
          └──────── same outputs, gradients, parameter names, quantizers, QASSO run ────┘

The oracle is the unsplit GetaModule (itself checked against the eager model elsewhere): every
check here compares the split module with a deep copy of the flat one, bit for bit.  The last
test shards each block with FSDP2 on 2 gloo ranks and compares with one process.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn
from helpers import run_ranks
from zoo import ZOO

import geta_fx
from geta_fx.distributed import find_blocks, fully_shard_blocks, merge_blocks, split_blocks
from geta_fx.errors import InputError
from geta_fx.optim import QASSO

HF = ("hf_llama_gqa", "hf_bert", "hf_vit", "hf_gpt2")


def _tensors(y: object) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


def _loss(y: object) -> torch.Tensor:
    return sum(t.float().pow(2).mean() for t in _tensors(y) if t.is_floating_point())


def _pair(name: str, quantize: str | None = "weight", train: bool = True):  # noqa: ANN202
    if name in HF:
        pytest.importorskip("transformers")
    model, x = ZOO[name]()
    gm = geta_fx.transform(model, x, quantize=quantize).train(train)
    flat = copy.deepcopy(gm)
    return flat, gm, x


@pytest.mark.parametrize(("name", "quantize", "blocks"), [
    ("hf_llama_gqa", "weight", ("model.layers.0", "model.layers.1")),
    ("hf_bert", "weight_act", ("encoder.layer.0", "encoder.layer.1")),
    ("hf_vit", "weight", None),
    ("resnet20", "weight_act", None),   # BasicBlocks with BatchNorm in train mode
    ("gpt_block", None, None),
])
def test_split_keeps_outputs_gradients_buffers_and_names(name: str, quantize: str | None,
                                                         blocks: tuple[str, ...] | None) -> None:
    flat, gm, x = _pair(name, quantize)
    if name == "gpt_block":  # nothing repeated: name the blocks
        with pytest.raises(InputError, match="no repeated blocks"):
            split_blocks(gm)
        blocks = ("fc", "fc2")
    paths = split_blocks(gm, blocks)
    assert paths == (blocks or find_blocks(flat.graph_module))
    assert len(paths) >= 2 or blocks
    for p in paths:  # the block is a module the graph calls, at its own path
        assert isinstance(gm.graph_module.get_submodule(p), torch.fx.GraphModule)
        assert any(n.op == "call_module" and n.target == p for n in gm.graph_module.graph.nodes)
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in flat.named_parameters()]
    assert list(gm.state_dict()) == list(flat.state_dict())
    assert list(gm.quantizers) == list(flat.quantizers)
    for seed in range(2):  # twice: BatchNorm running statistics move on
        torch.manual_seed(seed)  # dropout draws the same masks in the same order
        want = flat(*x)
        torch.manual_seed(seed)
        got = gm(*x)
        for a, b in zip(_tensors(want), _tensors(got), strict=True):
            assert torch.equal(a, b)
        _loss(want).backward()
        _loss(got).backward()
    for (n, p), (_, q) in zip(flat.named_parameters(), gm.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        assert p.grad is None or torch.equal(p.grad, q.grad), n
    for (n, a), (_, b) in zip(flat.named_buffers(), gm.named_buffers(), strict=True):
        assert torch.equal(a, b), n


def test_merge_restores_the_flat_graph() -> None:
    flat, gm, x = _pair("hf_llama_gqa")
    split_blocks(gm)
    merge_blocks(gm)
    g = gm.graph_module
    assert geta_fx.ir.meta.BLOCKS not in g.meta
    before = {n.name: n for n in flat.graph_module.graph.nodes}
    after = {n.name: n for n in g.graph.nodes}
    assert before.keys() == after.keys()
    for k, n in before.items():  # same ops on the same values, same geta metadata
        m = after[k]
        assert (m.op, m.target) == (n.op, n.target), k
        assert [str(a) for a in m.all_input_nodes] == [str(a) for a in n.all_input_nodes], k
        assert m.meta.get("geta.group") == n.meta.get("geta.group"), k
        assert m.meta.get("geta.quantizer") == n.meta.get("geta.quantizer"), k
    assert not any(isinstance(m, torch.fx.GraphModule) for m in g.modules() if m is not g)
    assert torch.equal(gm(*x).logits, flat(*x).logits)
    split_blocks(gm)  # and it splits again
    assert torch.equal(gm(*x).logits, flat(*x).logits)


def test_compress_report_deepcopy_pickle_and_modes_of_a_split_module() -> None:
    flat, gm, x = _pair("hf_bert", "weight_act")
    split_blocks(gm)
    for m in (flat, gm):
        for g in (1, 4):
            m.zero_units(g, torch.arange(0, m.groups[g].num_units, 2))
    gm.eval()
    flat.eval()
    blk = gm.graph_module.get_submodule("encoder.layer.0")
    flags = [n.args[2] for n in blk.graph.nodes if n.target == torch.ops.aten.dropout.default]
    assert flags and not any(flags)  # eval() reached the dropouts inside the blocks
    want = flat(*x).last_hidden_state
    assert torch.equal(gm(*x).last_hidden_state, want)
    slim_flat, slim = flat.compress(), gm.compress()
    assert geta_fx.ir.meta.BLOCKS not in slim.meta
    assert torch.equal(slim(*x).last_hidden_state, slim_flat(*x).last_hidden_state)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in gm.parameters())
    assert str(geta_fx.report(gm)) == str(geta_fx.report(flat))
    twin = copy.deepcopy(gm)
    assert twin.graph_module.meta[geta_fx.ir.meta.BLOCKS] == gm.graph_module.meta["geta.blocks"]
    assert list(twin.quantizers) == list(gm.quantizers)
    assert torch.equal(twin(*x).last_hidden_state, want)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(*x).last_hidden_state, want)
    assert list(loaded.quantizers) == list(gm.quantizers)


def test_compress_into_and_dtype_moves_of_a_split_module() -> None:
    pytest.importorskip("transformers")
    model, x = ZOO["hf_llama_gqa"]()
    gm = geta_fx.transform(model, x, quantize="weight").eval()
    split_blocks(gm)
    g = gm.groups[3]
    gm.zero_units(g.id, torch.arange(0, g.num_units, 2))
    ids = torch.randint(0, 64, (2, 6))  # another shape than the capture's
    want = gm(ids).logits
    eager = copy.deepcopy(model)
    assert gm.compress(into=eager) is eager  # the user's module, sliced from the split graph
    assert torch.equal(eager(ids).logits, want)
    assert sum(p.numel() for p in eager.parameters()) < sum(p.numel() for p in model.parameters())
    half = copy.deepcopy(gm).to(torch.bfloat16)  # reaches the blocks' parameters
    dtypes = {(n.startswith("graph_module.geta_quant"), p.dtype)
              for n, p in half.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}  # scalars stay fp32


KW = dict(lr=1e-2, lr_quant=1e-2, target_sparsity=0.4, bit_range=(4, 16), bit_reduction=4,
          start_projection_step=1, projection_steps=3, projection_periods=2,
          start_pruning_step=4, pruning_steps=6, pruning_periods=2)


def _lm_loss(gm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = gm(ids[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       ids[:, 1:].reshape(-1))


def _train(gm: nn.Module, opt: QASSO, batches: list[torch.Tensor], rank: int | None = None,
           world: int = 1) -> None:
    for ids in batches:
        opt.zero_grad()
        _lm_loss(gm, ids if rank is None else ids.chunk(world)[rank]).backward()
        opt.step()


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (4, 9), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_qasso_on_a_split_module_is_the_flat_run_bit_for_bit(variant: str) -> None:
    flat, gm, _ = _pair("hf_llama_gqa")
    split_blocks(gm)
    batches = _batches(11)
    opts = [QASSO(m, variant=variant, **KW) for m in (flat, gm)]
    for m, opt in zip((flat, gm), opts, strict=True):
        _train(m, opt, batches)
    assert torch.equal(opts[0].pruned_units, opts[1].pruned_units)
    assert opts[1].metrics()["num_zero_units"] == opts[1].k_target > 0
    for (n, p), (_, q) in zip(flat.named_parameters(), gm.named_parameters(), strict=True):
        assert torch.equal(p, q), n


class _Tied(nn.Module):
    """Two blocks; the head reads block 1's weight (tied across the block boundary)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x @ self.blocks[1][0].weight


class _Interleaved(nn.Module):
    """The parent calls the block's children with its own op in between: not one region."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.scale = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block[1](self.scale(self.block[0](x)))


def test_split_refuses_what_it_cannot_split_and_leaves_the_module_alone() -> None:
    x = torch.randn(3, 8)
    gm = geta_fx.transform(_Tied(), (x,), quantize=None)
    code = gm.graph_module.code
    with pytest.raises(InputError, match=r"blocks\.1\.0\.weight.*also read outside"):
        split_blocks(gm)
    with pytest.raises(InputError, match="no op of the graph runs in module 'blocks.7'"):
        split_blocks(gm, ["blocks.7"])
    with pytest.raises(InputError, match="lies inside block 'blocks.0'"):
        split_blocks(gm, ["blocks.0", "blocks.0.0"])
    with pytest.raises(InputError, match="named twice"):
        split_blocks(gm, ["blocks.0", "blocks.0"])
    assert gm.graph_module.code == code  # nothing was rewritten
    split_blocks(gm, ["blocks.0"])
    with pytest.raises(InputError, match="split already"):
        split_blocks(gm, ["blocks.0"])
    tied_q = geta_fx.transform(_Tied(), (x,), quantize="weight")  # the quantized weight is a
    want = tied_q(x)                                   # new tensor: it may leave its block
    split_blocks(tied_q)
    assert torch.equal(tied_q(x), want)
    gi = geta_fx.transform(_Interleaved(), (x,), quantize=None)
    with pytest.raises(InputError, match=r"\['block'\] do not form one region"):
        split_blocks(gi, ["block"])
    with pytest.raises(InputError, match="expected a GetaModule"):
        split_blocks(nn.Linear(2, 2))


# --------------------------------------------------------------------------- FSDP2, 2 ranks
WORLD = 2
STEPS = 11
RESUME_AT = 7
SGD = dict(variant="sgd", momentum=0.9, **KW)


def _full(gm: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in gm.named_parameters()}


def _sharded(gm0: nn.Module) -> tuple[nn.Module, QASSO]:
    gm = copy.deepcopy(gm0)
    fully_shard_blocks(gm)
    return gm, QASSO(gm, **SGD)


def _worker(rank: int, gm0: nn.Module, batches: list[torch.Tensor], init: str,
            out: str) -> None:
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        gm, opt = _sharded(gm0)
        g = gm.graph_module
        w0, w1 = (f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1))
        seen: list[tuple[bool, bool]] = []  # in layer 1's forward: is layer 0 / 1 sharded?
        g.get_submodule("model.layers.1").register_forward_pre_hook(
            lambda *_: seen.append((isinstance(g.get_parameter(w0), DTensor),
                                    isinstance(g.get_parameter(w1), DTensor))))
        _train(gm, opt, batches[:RESUME_AT], rank, WORLD)
        ckpt = os.path.join(out, f"ckpt{rank}.pt")
        torch.save({"module": gm.state_dict(), "optim": opt.state_dict()}, ckpt)
        _train(gm, opt, batches[RESUME_AT:], rank, WORLD)
        result = {"params": _full(gm), "pruned": opt.pruned_units, "seen": seen,
                  "sharded": opt.layout.sharded}
        gm2, opt2 = _sharded(gm0)
        state = torch.load(ckpt, weights_only=False)
        gm2.load_state_dict(state["module"])
        opt2.load_state_dict(state["optim"])
        _train(gm2, opt2, batches[RESUME_AT:], rank, WORLD)
        result["resumed"] = _full(gm2)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~15 s: 2 forked gloo ranks, each sharding every decoder layer
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_per_block_two_ranks_match_one_process_and_resume(tmp_path) -> None:
    pytest.importorskip("transformers")
    gm0, _, _ = _pair("hf_llama_gqa")
    batches = _batches(STEPS)
    run_ranks(_worker, (gm0, batches, str(tmp_path / "init"), str(tmp_path)), WORLD,
              [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)])
    gm = copy.deepcopy(gm0)
    opt = QASSO(gm, **SGD)
    _train(gm, opt, batches)
    want = _full(gm)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["sharded"]
        # per-block units: while layer 1 runs, layer 0 is resharded and layer 1 is whole
        assert got["seen"] and all(s == (True, False) for s in got["seen"]), got["seen"]
        assert torch.equal(got["pruned"], opt.pruned_units), r
        diff = max(float((got["params"][n] - w).abs().max()) for n, w in want.items())
        assert diff <= 1e-6, (r, diff)
        for n, w in got["params"].items():
            assert torch.equal(got["resumed"][n], w), n
