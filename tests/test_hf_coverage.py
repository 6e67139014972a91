"""Architecture coverage: transformers models nobody here wrote (tiny random configs, nothing
downloaded) go through capture -> passes -> zero half of every prunable group -> compress, and
the slim model computes what the zeroed one does.  CNNs, vision transformers, encoders and
decoder-only language models (MHA, GQA, multi-query, parallel attention, hand-written linear
layers)."""

from __future__ import annotations

import pytest
import torch

import geta_fx

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # ~45 s: 18 architectures (`python -m pytest -q -m slow`)

ARCHS = ["ResNetModel", "MobileNetV2Model", "ConvNextModel", "DeiTModel", "DistilBertModel",
         "RobertaModel", "OPTForCausalLM", "GPTNeoXForCausalLM", "PhiForCausalLM",
         "GemmaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "FalconForCausalLM",
         "BloomForCausalLM", "StableLmForCausalLM", "Dinov2Model", "RegNetModel",
         "T5EncoderModel"]


def _tensors(out: object) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("arch", ARCHS)
def test_transform_prune_compress_is_exact(arch: str) -> None:
    from geta_fx.cli import build_hf

    model, inputs = build_hf(arch)
    gm = geta_fx.transform(model, inputs)
    prunable = [g for g in gm.groups if g.prunable and g.num_units >= 2]
    assert prunable, [str(g) for g in gm.groups]
    gen = torch.Generator().manual_seed(0)
    for g in prunable:
        gm.zero_units(g.id, torch.randperm(g.num_units, generator=gen)[: g.num_units // 2].tolist())
    gm.eval()
    slim = gm.compress()
    ref, out = _tensors(gm(*inputs)), _tensors(slim(*inputs))
    assert len(ref) == len(out)
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in gm.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_split_into_blocks_keeps_outputs_and_gradients(arch: str) -> None:
    """geta_fx.distributed.split_blocks (the per-block FSDP2 units) on every architecture:
    blocks found, outputs and gradients bit-identical to the flat graph (~2 s each)."""
    import copy

    from geta_fx.cli import build_hf
    from geta_fx.distributed import split_blocks

    model, inputs = build_hf(arch)
    flat = geta_fx.transform(model, inputs, quantize="weight").train()
    gm = copy.deepcopy(flat)
    assert len(split_blocks(gm)) >= 2
    outs = []
    for m in (flat, gm):
        torch.manual_seed(0)  # the same dropout masks
        out = _tensors(m(*inputs))
        sum(t.float().pow(2).mean() for t in out if t.is_floating_point()).backward()
        outs.append(out)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    for (n, p), (_, q) in zip(flat.named_parameters(), gm.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        assert p.grad is None or torch.equal(p.grad, q.grad), n
